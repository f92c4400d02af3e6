"""Recent bad lines: a small bounded record of the input lines the Graphite input refused, for the admin API.

Where it sits: the `graphite-in` plugin owns one `RecentBadLines` per listener and exposes it as the
attribute `recent_bad_lines` of the source it adds to the pipeline. Once the pipeline runs, the
`graphite-out` plugin finds every such attribute among the pipeline's elements (its
`agent_pipeline_started` hook, see `find_recent_bad_lines`) and serves them at `GET /badlines` of its
admin HTTP port. Nothing is global: the object travels with the element that owns it.

Recording is cheap (a deque append of a small Struct) and bounded (the oldest entries go first), so a
flood of bad input costs no memory. Lines are kept as text, cut to `max_line_chars`, with invalid UTF-8
shown as backslash escapes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

import msgspec

DEFAULT_MAX_ENTRIES = 100
DEFAULT_MAX_LINE_CHARS = 200


class BadLineRecord(msgspec.Struct, frozen=True):
    """One refused line: when (Unix seconds), from whom ("host:port"), why (a short stable reason such as
    `field_count`, with an optional message after ": "), and the line itself (cut)."""

    time: float
    peer: str
    reason: str
    line: str


class RecentBadLines:
    """The last `max_entries` refused lines, oldest first, and how many were recorded in total by reason."""

    def __init__(
        self,
        name: str = "graphite-in",
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_line_chars: int = DEFAULT_MAX_LINE_CHARS,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.name = name
        self.max_line_chars = max_line_chars
        self._entries: deque[BadLineRecord] = deque(maxlen=max_entries)
        self.counts: dict[str, int] = {}

    def record(self, peer: str, reason: str, line: bytes | str, when: float | None = None) -> None:
        """Keeps one refused line. `reason` may be "reason" or "reason: explanation"; the counts use the part
        before the first ":"."""
        if isinstance(line, bytes | bytearray | memoryview):
            text = bytes(line[: self.max_line_chars * 4]).decode("utf-8", "backslashreplace")
        else:
            text = line
        if len(text) > self.max_line_chars:
            text = text[: self.max_line_chars] + "..."
        key = reason.split(":", 1)[0]
        self.counts[key] = self.counts.get(key, 0) + 1
        self._entries.append(BadLineRecord(time.time() if when is None else when, peer, reason, text))

    def record_many(self, peer: str, entries: Iterable[tuple[str, bytes | str]]) -> None:
        """Keeps several (reason, line) pairs from one peer, e.g. the samples of a parsed chunk."""
        now = time.time()
        for reason, line in entries:
            self.record(peer, reason, line, now)

    def snapshot(self) -> list[BadLineRecord]:
        """The kept lines, oldest first."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def find_recent_bad_lines(elements: Iterable[object]) -> list[RecentBadLines]:
    """The `recent_bad_lines` registries of pipeline elements (`agent.plugin.Element` or the objects
    themselves) that have one, in order, without duplicates."""
    found: list[RecentBadLines] = []
    for element in elements:
        obj = getattr(element, "obj", element)
        registry = getattr(obj, "recent_bad_lines", None)
        if isinstance(registry, RecentBadLines) and all(registry is not known for known in found):
            found.append(registry)
    return found
