"""Warnings and drop counts that cannot flood the log.

A relay server with 10 000 idle connections whose handshakes time out together, or a destination that
drops a million points, must say so in a few lines, not a few thousand. `RateLimitedLog` logs the first
event of a key at once, then at most one line per `interval`, saying how many it left out (`flush`
says it for a burst that stopped: from a periodic task and at shutdown); `DropCounter`
counts dropped points by reason (for status pages and self-metrics) and logs through one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

#: Default seconds between two lines of the same key.
DEFAULT_INTERVAL = 10.0


class RateLimitedLog:
    """Logs at most one line per key every `interval` seconds, saying how many events it left out."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        level: int = logging.WARNING,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self.level = level
        self._next: dict[str, float] = {}
        self._skipped: dict[str, int] = {}
        #: The last left-out line of each key, which `flush` writes with the count of the others.
        self._last: dict[str, tuple[str, tuple[Any, ...]]] = {}

    def log(self, key: str, count: int, message: str, *args: Any) -> bool:
        """Logs `message % args` (followed by what was left out since the last line of this key) unless
        a line with this key was logged less than `interval` ago. `count` is how many events this one
        stands for. Returns whether a line was written."""
        now = self.clock()
        if now < self._next.get(key, float("-inf")):
            self._skipped[key] = self._skipped.get(key, 0) + count
            self._last[key] = (message, args)
            return False
        skipped = self._skipped.pop(key, 0)
        self._last.pop(key, None)
        self._next[key] = now + self.interval
        if skipped:
            self.logger.log(self.level, message + " (and %d more since the last such line)", *args, skipped)
        else:
            self.logger.log(self.level, message, *args)
        return True

    # The common case reads as what it is.
    warn = log

    def flush(self, *, due_only: bool = False) -> None:
        """Logs the events left out since the last line of each key: the last of them, with the count of
        the others. Without it, a burst that stops is never counted. `due_only`: only the keys whose
        interval has passed (for a periodic task; the limit of one line per interval holds); without it,
        every key (at shutdown)."""
        now = self.clock()
        for key in list(self._skipped):
            if due_only and now < self._next.get(key, float("-inf")):
                continue
            skipped = self._skipped.pop(key)
            message, args = self._last.pop(key)
            self._next[key] = now + self.interval
            if skipped > 1:
                self.logger.log(
                    self.level, message + " (and %d more since the last such line)", *args, skipped - 1
                )
            else:
                self.logger.log(self.level, message, *args)


class DropCounter:
    """Points dropped by reason, with a total; logs the first drop of a reason at once, then at most one
    summary line per `interval` with the count since the last line. `flush` logs what is left (at
    shutdown)."""

    def __init__(
        self,
        name: str,
        logger: logging.Logger,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self.by_reason: dict[str, int] = {}
        self._unlogged: dict[str, int] = {}
        self._last_log: dict[str, float] = {}

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def add(self, reason: str, points: int, detail: str = "") -> None:
        if points <= 0:
            return
        self.by_reason[reason] = self.by_reason.get(reason, 0) + points
        self._unlogged[reason] = self._unlogged.get(reason, 0) + points
        now = self.clock()
        last = self._last_log.get(reason)
        if last is None or now - last >= self.interval:
            self._log(reason, detail)
            self._last_log[reason] = now

    def flush(self) -> None:
        """Logs what was dropped since the last line of each reason."""
        for reason in list(self._unlogged):
            self._log(reason, "")

    def _log(self, reason: str, detail: str) -> None:
        count = self._unlogged.pop(reason, 0)
        if count:
            self.logger.warning(
                "%s: dropped %d points (%s)%s; %d dropped for this reason so far",
                self.name,
                count,
                reason,
                f": {detail}" if detail else "",
                self.by_reason[reason],
            )


__all__ = ["DEFAULT_INTERVAL", "DropCounter", "RateLimitedLog"]
