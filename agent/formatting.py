"""Points as text, the same way in every output that shows them to people or files (csv, console).

- `TimestampFormatter`: nanosecond timestamps as RFC 3339 UTC with nine fractional digits
  (`2026-11-22T02:14:39.123456789Z`), cached per second so that a batch costs a divmod per point;
- `attribute_text`: an attribute value as text (booleans as `true`/`false`, as in TOML and JSON).

Pure code, no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

_NS_PER_S = 1_000_000_000


def attribute_text(value: Any) -> str:
    """An attribute value as text: `true`/`false` for booleans, `str` for the rest."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class TimestampFormatter:
    """Formats nanosecond timestamps as RFC 3339 UTC with nine fractional digits:
    `2026-11-22T02:14:39.123456789Z`.

    The points of a batch fall into few distinct seconds, so the date and time part is computed once
    per second and cached; what is left per point is a divmod and a string concatenation. One formatter
    per output (it is not shared between threads).
    """

    __slots__ = ("_seconds",)

    #: The cache is cleared beyond this many seconds, so a long run does not grow it forever.
    MAX_CACHED_SECONDS = 4096

    def __init__(self) -> None:
        self._seconds: dict[int, str] = {}

    def _second(self, seconds: int) -> str:
        text = self._seconds.get(seconds)
        if text is None:
            if len(self._seconds) >= self.MAX_CACHED_SECONDS:
                self._seconds.clear()
            text = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(seconds))
            self._seconds[seconds] = text
        return text

    def format(self, timestamp_ns: int) -> str:
        seconds, nanos = divmod(timestamp_ns, _NS_PER_S)
        return f"{self._second(seconds)}{nanos:09d}Z"

    def format_many(self, timestamps: Iterable[int]) -> list[str]:
        cache = self._seconds
        second = self._second
        out = []
        append = out.append
        for ts in timestamps:
            seconds, nanos = divmod(ts, _NS_PER_S)
            prefix = cache.get(seconds) or second(seconds)
            append(f"{prefix}{nanos:09d}Z")
        return out


__all__ = ["TimestampFormatter", "attribute_text"]
