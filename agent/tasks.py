"""Long-running tasks: restart with backoff, reconnect with outage logging, wake waiters on change.

Three facilities that every long-running part of the agent needs, written once:

- `supervise`: runs a task again after it crashed, with backoff (the pipeline's sources, outputs and
  services, and any plugin's own workers);
- `Reconnector`: the bookkeeping of a client that keeps reconnecting (delays, outage start, what to log
  when): pure, so the caller owns its I/O and tests drive it without sockets;
- `ChangeNotifier`: "something changed, look again", for queues and state that several tasks wait on.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from agent.backoff import Backoff
from agent.errors import describe_exception


class ChangeNotifier:
    """Wakes every task waiting in `wait` when `notify` is called. A waiter re-checks its condition
    after waking: `while not condition: await notifier.wait()`."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Returns once `condition()` is true (at once if it already is)."""
        while not condition():
            await self._event.wait()


async def supervise(
    name: str,
    run: Callable[[], Awaitable[Any]],
    *,
    logger: logging.Logger,
    backoff: Backoff | None = None,
    on_failure: Callable[[BaseException], None] | None = None,
    give_up: Callable[[BaseException], bool] | None = None,
) -> Any:
    """Runs `run()` until it returns (its result is returned); restarts it with backoff when it raises.

    Each failure is logged on one line (`NAME failed: ...; restarting in 1.0s`, the traceback at debug
    level) and passed to `on_failure` (to count it, or to put work back in a queue) before the delay.
    A failure for which `give_up(exc)` is true is raised instead (a task that never got ready).
    Cancellation is never caught.
    """
    backoff = backoff or Backoff(1.0, 60.0)
    while True:
        try:
            return await run()
        except Exception as exc:
            if give_up is not None and give_up(exc):
                raise
            if on_failure is not None:
                on_failure(exc)
            delay = backoff.next_delay()
            logger.error("%s failed: %s; restarting in %.1fs", name, describe_exception(exc), delay)
            logger.debug("%s failure", name, exc_info=True)
            await trio.sleep(delay)


class Reconnector:
    """What a reconnecting client does between attempts: how long to wait and what to log.

    The caller connects and reports: `connected()` once a connection is up, `failed(reason)` after an
    attempt that did not get one (returns the delay before the next attempt), `ended(reason)` when an
    established connection ended (returns the delay before reconnecting). Logging: each of the first
    `warn_attempts - 1` failures of an outage is a warning; then one error that says the outage goes on
    (how long, how many attempts, the last reason, and `summary()` such as what is buffered), repeated
    every `reminder_interval`; the others go to debug. A refusal (`failed(..., refused=True)`: the peer
    answered and said no, as for a wrong token) is an error once per distinct reason and then every
    `reminder_interval`. The end of an outage is logged with its length. `peer` (an address) makes the
    lines name what cannot be reached.
    """

    def __init__(
        self,
        what: str,
        logger: logging.Logger,
        backoff: Backoff,
        *,
        warn_attempts: int = 8,
        reminder_interval: float = 60.0,
        summary: Callable[[], str] | None = None,
        clock: Callable[[], float] = trio.current_time,
        peer: str = "",
    ) -> None:
        self.what = what
        self.logger = logger
        self.backoff = backoff
        self.warn_attempts = max(1, warn_attempts)
        self.reminder_interval = reminder_interval
        self.summary = summary
        self.clock = clock
        self.peer = peer
        #: Failed attempts since the last connection.
        self.failures = 0
        #: When the current outage started (None while connected or before the first attempt).
        self.down_since: float | None = None
        self.last_error = ""
        self._last_reminder = float("-inf")
        self._last_refusal_logged: str | None = None

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def connected(self) -> None:
        if self.down_since is not None:
            self.logger.info(
                "%s: connected again%s after %.1fs (%d failed attempts)",
                self.what,
                f" to {self.peer}" if self.peer else "",
                self.clock() - self.down_since,
                self.failures,
            )
        self.failures = 0
        self.down_since = None
        self.last_error = ""
        self._last_reminder = float("-inf")
        self._last_refusal_logged = None
        self.backoff.reset()

    def ended(self, reason: str, level: int = logging.WARNING) -> float:
        """An established connection ended; returns the delay before reconnecting."""
        self.logger.log(
            level,
            "%s: connection%s ended: %s; reconnecting",
            self.what,
            f" to {self.peer}" if self.peer else "",
            reason,
        )
        return self.backoff.next_delay()

    def failed(self, reason: str, *, delay: float | None = None, refused: bool = False) -> float:
        """An attempt failed; returns the delay before the next one (`delay` overrides the backoff, for
        a peer that refused us and will not change its mind soon). `refused`: the peer answered and said
        no (see the class docstring for how that is logged)."""
        now = self.clock()
        if self.down_since is None:
            self.down_since = now
        self.failures += 1
        self.last_error = reason
        wait = self.backoff.next_delay() if delay is None else delay
        # A delay drawn from the maximum's jitter range reads as the maximum: "retrying every 4s".
        maximum = self.backoff.maximum
        every = maximum if delay is None or maximum / 2 <= delay <= maximum else delay
        unreachable = f"cannot reach {self.peer}: " if self.peer else ""
        if refused:
            if reason != self._last_refusal_logged or now - self._last_reminder >= self.reminder_interval:
                self._last_refusal_logged = reason
                self._last_reminder = now
                self.logger.error(
                    "%s: %s; retrying every %gs",
                    self.what,
                    f"{self.peer} {reason}" if self.peer else reason,
                    every,
                )
            else:
                self.logger.debug("%s: still refused: %s", self.what, reason)
        elif self.failures < self.warn_attempts:
            self.logger.warning(
                "%s: %s%s; retrying in %.2gs (attempt %d)",
                self.what,
                unreachable,
                reason,
                wait,
                self.failures,
            )
        elif now - self._last_reminder >= self.reminder_interval:
            self._last_reminder = now
            extra = f"; {self.summary()}" if self.summary is not None else ""
            self.logger.error(
                "%s: outage: %sunreachable for %.1fs (%d attempts; last: %s)%s; retrying every %gs",
                self.what,
                f"{self.peer} " if self.peer else "",
                now - self.down_since,
                self.failures,
                reason,
                extra,
                every,
            )
        else:
            self.logger.debug("%s: still %s%s", self.what, unreachable or "unreachable: ", reason)
        return wait


__all__ = ["ChangeNotifier", "Reconnector", "supervise"]
