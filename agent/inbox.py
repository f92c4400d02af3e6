"""The queue in front of each output, and the default loop that writes from it.

    dispatcher ─> OutputInbox.put ─> [bounded queue, in points] ─> receive_batch ─> output ─> Envelope.done

Each output has its own `OutputInbox`, bounded in points, with an explicit overflow policy: `drop_oldest`
(a slow or dead output loses its oldest points, counted, and never stalls the others) or `block`
(back-pressure up to the sources). Every batch travels to each output in an `Envelope`; the output calls
`done(True)` once the batch is safe, `done(False)` if it never will be, and when every output has settled
its envelope the source's acknowledgement callback fires (end-to-end acknowledgements).

Outputs that implement `write` get `run_write_loop` (gather, write, acknowledge, retry with backoff);
outputs that pipeline their own work implement `run` over the inbox and settle envelopes themselves.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from agent.backoff import Backoff
from agent.errors import describe_exception
from agent.model import Batch
from agent.ratelimit import RateLimitedLog
from agent.tasks import ChangeNotifier

#: Called once per batch with True (every output that took it wrote it) or False (one could not).
AckCallback = Callable[[bool], None]

log = logging.getLogger(__name__)


class BatchTracker:
    """Counts the outputs that still have to write one batch; calls the source's callback once."""

    __slots__ = ("pending", "ok", "callback")

    def __init__(self, pending: int, callback: AckCallback) -> None:
        self.pending = pending
        self.ok = True
        self.callback = callback

    def output_done(self, ok: bool) -> None:
        if not ok:
            self.ok = False
        self.pending -= 1
        if self.pending == 0:
            try:
                self.callback(self.ok)
            except Exception:
                log.exception("acknowledgement callback failed")


class Envelope:
    """One batch on its way to one output. Call `done(True)` once written, `done(False)` if it never
    will be; calling it again does nothing."""

    __slots__ = ("batch", "points", "_tracker", "_inbox", "settled")

    def __init__(self, batch: Batch, points: int, tracker: BatchTracker | None, inbox: OutputInbox) -> None:
        self.batch = batch
        self.points = points
        self._tracker = tracker
        self._inbox = inbox
        self.settled = False

    def done(self, ok: bool = True) -> None:
        if self.settled:
            return
        self.settled = True
        self._inbox._settle(self, ok)
        if self._tracker is not None:
            self._tracker.output_done(ok)


@dataclass
class OutputCounters:
    received: int = 0
    written: int = 0
    dropped: int = 0
    failed_writes: int = 0


class OutputInbox:
    """The bounded queue in front of one output, counted in points."""

    def __init__(self, name: str, max_points: int, overflow: str) -> None:
        self.name = name
        self.max_points = max(1, max_points)
        self.overflow = overflow
        self.counters = OutputCounters()
        self._queue: deque[Envelope] = deque()
        self._queued_points = 0
        # Envelopes handed to the output and not yet settled: they count against the capacity too, and
        # go back to the front of the queue if the output task crashes and restarts.
        self._taken: dict[int, Envelope] = {}
        self._taken_points = 0
        self._closed = False
        # Set by `flush`: the next `receive_batch` returns without gathering for its `wait`.
        self._flush_now = False
        self._drop_log = RateLimitedLog(log)
        self._changed = ChangeNotifier()

    # -- producer side (the dispatcher) --

    @property
    def queued_points(self) -> int:
        return self._queued_points + self._taken_points

    async def put(self, envelope: Envelope) -> None:
        self.counters.received += envelope.points
        if self.overflow == "block":
            # Wait for room, but always accept into an empty queue (a batch larger than the queue
            # must not block forever).
            while (
                not self._closed
                and self.queued_points
                and self.queued_points + envelope.points > self.max_points
            ):
                await self._wait_change()
        if self._closed:
            # The output was removed (a reload) while this batch waited for room: nobody will take it.
            self._drop(envelope, "the output was removed")
            return
        else:
            while self._queue and self.queued_points + envelope.points > self.max_points:
                oldest = self._queue.popleft()
                self._queued_points -= oldest.points
                self._drop(oldest, "queue full (overflow = drop_oldest)")
        self._queue.append(envelope)
        self._queued_points += envelope.points
        self._notify()

    def flush(self) -> None:
        """The output gets what is queued now (or the next batch that arrives), without waiting for the
        rest of its flush interval (`agent control flush`)."""
        self._flush_now = True
        self._notify()

    def refuse(self, envelope: Envelope, reason: str) -> None:
        """Counts the envelope as received and dropped without queueing it (a disabled output)."""
        self.counters.received += envelope.points
        self._drop(envelope, reason)

    def close(self) -> None:
        self._closed = True
        self._notify()

    # -- consumer side (the output task) --

    async def receive_batch(self, max_points: int = 100_000, wait: float = 0.0) -> list[Envelope]:
        """Waits for envelopes and returns up to `max_points` points of them (at least one envelope).

        With `wait` > 0, gathers for up to `wait` seconds after the first envelope arrived, unless
        `max_points` are there sooner or the inbox is closing. Returns [] once closed and empty.
        """
        while not self._queue:
            if self._closed:
                return []
            await self._wait_change()
        if wait > 0 and not self._closed and not self._flush_now and self._queued_points < max_points:
            with trio.move_on_after(wait):
                while not self._closed and not self._flush_now and self._queued_points < max_points:
                    await self._wait_change()
        self._flush_now = False
        return self.receive_nowait(max_points)

    def receive_nowait(self, max_points: int = 100_000) -> list[Envelope]:
        """What `receive_batch` would return now, without waiting ([] if nothing is queued)."""
        taken: list[Envelope] = []
        points = 0
        while self._queue and (not taken or points + self._queue[0].points <= max_points):
            env = self._queue.popleft()
            self._queued_points -= env.points
            points += env.points
            self._taken[id(env)] = env
            self._taken_points += env.points
            taken.append(env)
        if taken:
            self._notify()
        return taken

    @property
    def exhausted(self) -> bool:
        return self._closed and not self._queue

    # -- internals --

    def _settle(self, env: Envelope, ok: bool) -> None:
        if self._taken.pop(id(env), None) is not None:
            self._taken_points -= env.points
        if ok:
            self.counters.written += env.points
        else:
            self.counters.dropped += env.points
        self._notify()

    def _drop(self, env: Envelope, reason: str) -> None:
        self._drop_log.warn(
            "drop", env.points, "output %s: dropped %d points: %s", self.name, env.points, reason
        )
        env.done(False)

    def requeue_taken(self) -> None:
        """Puts envelopes that a crashed output task had taken back at the front, in order."""
        if not self._taken:
            return
        envs = list(self._taken.values())
        self._taken.clear()
        self._taken_points = 0
        for env in reversed(envs):
            if not env.settled:
                self._queue.appendleft(env)
                self._queued_points += env.points
        self._notify()

    def drop_everything(self, reason: str) -> int:
        """Settles every unsettled envelope as failed (shutdown after the grace period)."""
        envs = list(self._taken.values()) + list(self._queue)
        self._queue.clear()
        self._queued_points = 0
        points = 0
        for env in envs:
            if not env.settled:
                points += env.points
                env.done(False)
        if points:
            log.error("output %s: %d points not written: %s", self.name, points, reason)
        return points

    def _notify(self) -> None:
        self._changed.notify()

    async def _wait_change(self) -> None:
        await self._changed.wait()


class WritingOutput(Protocol):
    """What `run_write_loop` needs of an output (see `agent.plugin.Output`)."""

    flush_interval: float
    batch_max_points: int

    async def open(self) -> None: ...
    async def write(self, batches: list[Batch]) -> None: ...
    async def close(self) -> None: ...


async def run_write_loop(
    output: WritingOutput, inbox: OutputInbox, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
) -> None:
    """The loop behind `Output.write`: gather, write, acknowledge; retry with backoff on errors."""
    await output.open()
    task_status.started()
    backoff = Backoff(0.5, 30.0)
    try:
        while True:
            envs = await inbox.receive_batch(output.batch_max_points, output.flush_interval)
            if not envs:
                return
            while True:
                live = [e for e in envs if not e.settled]  # the queue may have dropped some meanwhile
                if not live:
                    break
                try:
                    await output.write([e.batch for e in live])
                except Exception as exc:
                    inbox.counters.failed_writes += 1
                    delay = backoff.next_delay()
                    log.error(
                        "output %s: write failed: %s; retrying in %.1fs",
                        inbox.name,
                        describe_exception(exc),
                        delay,
                    )
                    log.debug("output %s: write failure", inbox.name, exc_info=True)
                    await trio.sleep(delay)
                    continue
                backoff.reset()
                for e in live:
                    e.done(True)
                break
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(5):
                await output.close()


__all__ = [
    "AckCallback",
    "BatchTracker",
    "Envelope",
    "OutputCounters",
    "OutputInbox",
    "WritingOutput",
    "run_write_loop",
]
