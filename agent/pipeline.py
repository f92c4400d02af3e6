"""The pipeline: sources -> transforms (in config order) -> one bounded queue and one task per output.

    polled sources ─┐                                  ┌─> OutputInbox ─> output task (csv)
    autonomous ─────┼─> source channel ─> dispatcher ──┼─> OutputInbox ─> output task (relay-client)
    self-metrics ───┘   (bounded: backpressure)        └─> OutputInbox ─> output task (...)

Each output has its own queue, bounded in points, with an explicit overflow policy: `drop_oldest`
(the default: a slow or dead output loses its oldest points, counted, and never stalls the others) or
`block` (back-pressure up to the sources). Every batch can carry an acknowledgement callback that fires
once every output that took the batch has written it, or reports failure: sources such as the relay
server use it to acknowledge only what is safe. The cost is one small object per batch and output.

Shutdown: polled sources poll once more if asked, flush what they hold and stop; autonomous sources are
cancelled; the dispatcher drains the source channel; each output drains its queue. All of it within the
grace period, after which what is left is reported as dropped.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from agent.backoff import Backoff
from agent.model import LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, Batch, Series, now_ns
from agent.plugin import (
    AckCallback,
    AutonomousSource,
    BatchBuilder,
    Element,
    Output,
    OutputConfig,
    PolledSource,
    SourceSink,
    Transform,
)

log = logging.getLogger(__name__)


class _BatchTracker:
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

    def __init__(self, batch: Batch, points: int, tracker: _BatchTracker | None, inbox: OutputInbox) -> None:
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
        self._changed = trio.Event()

    # -- producer side (the dispatcher) --

    @property
    def queued_points(self) -> int:
        return self._queued_points + self._taken_points

    async def put(self, envelope: Envelope) -> None:
        self.counters.received += envelope.points
        if self.overflow == "block":
            # Wait for room, but always accept into an empty queue (a batch larger than the queue
            # must not block forever).
            while self.queued_points and self.queued_points + envelope.points > self.max_points:
                await self._wait_change()
        else:
            while self._queue and self.queued_points + envelope.points > self.max_points:
                oldest = self._queue.popleft()
                self._queued_points -= oldest.points
                self._drop(oldest, "queue full (overflow = drop_oldest)")
        self._queue.append(envelope)
        self._queued_points += envelope.points
        self._notify()

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
        if wait > 0 and not self._closed and self._queued_points < max_points:
            with trio.move_on_after(wait):
                while not self._closed and self._queued_points < max_points:
                    await self._wait_change()
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
    def closed(self) -> bool:
        return self._closed

    @property
    def exhausted(self) -> bool:
        return self._closed and not self._queue

    async def wait_closed_or_items(self) -> None:
        while not self._queue and not self._closed:
            await self._wait_change()

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
        if self.counters.dropped == 0 or math.log2(self.counters.dropped + 1).is_integer():
            log.warning("output %s: dropped %d points: %s", self.name, env.points, reason)
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
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_change(self) -> None:
        await self._changed.wait()


async def run_write_loop(
    output: Output, inbox: OutputInbox, task_status: Any = trio.TASK_STATUS_IGNORED
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


def _well_formed(series: Series) -> bool:
    n = len(series.timestamps)
    return len(series.values) == n and (isinstance(series.metric, str) or len(series.metric) == n)


class StartupError(Exception):
    """An element could not start; the message names it and says why."""


def describe_exception(exc: BaseException) -> str:
    """One line for a log: the message of the exception, or of the exceptions inside a group."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe_exception(e) for e in exc.exceptions)
    text = str(exc).strip().replace("\n", " ")
    text = (
        f"{type(exc).__name__}: {text}"
        if text and not isinstance(exc, StartupError | OSError)
        else (text or type(exc).__name__)
    )
    return text if len(text) < 300 else text[:297] + "..."


@dataclass
class SourceState:
    element: Element
    polls: int = 0
    errors: int = 0
    points: int = 0


@dataclass
class Pipeline:
    """Runs the elements of all started plugins. Build with the elements, then `await run()`."""

    elements: list[Element]
    source_channel_size: int = 64
    self_metrics_interval: float = 0.0
    restart_backoff: tuple[float, float] = (1.0, 60.0)
    inboxes: dict[str, OutputInbox] = field(default_factory=dict)
    sources: dict[str, SourceState] = field(default_factory=dict)
    transform_errors: int = 0
    invalid_series: int = 0

    def __post_init__(self) -> None:
        self.transforms: list[tuple[str, Transform]] = [
            (e.full_name, e.obj) for e in self.elements if e.kind == "transform"
        ]
        self.outputs: list[tuple[Element, OutputInbox]] = []
        for e in self.elements:
            if e.kind == "output":
                cfg: OutputConfig = e.config or OutputConfig()
                inbox = OutputInbox(e.full_name, cfg.queue_max_points, cfg.overflow)
                self.inboxes[e.full_name] = inbox
                self.outputs.append((e, inbox))
            elif e.kind == "source":
                self.sources[e.full_name] = SourceState(e)
        self._send_channel, self._receive_channel = trio.open_memory_channel[
            tuple[Batch, AckCallback | None]
        ](self.source_channel_size)
        self._stop_sources = trio.Event()
        self._stopping = False
        self._final_poll = False
        # Set when stopping: everything left must be done by then (see `run`).
        self._shutdown_deadline = math.inf
        #: Set once every polled source has polled once (`agent exec` starts its command then).
        self.first_polls_done = trio.Event()
        self._first_polls_pending = sum(
            isinstance(state.element.obj, PolledSource) for state in self.sources.values()
        )
        if self._first_polls_pending == 0:
            self.first_polls_done.set()

    # -- public control --

    def stop(self, final_poll: bool = False) -> None:
        """Asks the pipeline to stop: sources flush and stop, outputs drain (see `run`)."""
        self._final_poll = self._final_poll or final_poll
        self._stopping = True
        self._stop_sources.set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def sink(self) -> SourceSink:
        """A sink into the pipeline, for autonomous sources and tests."""
        return SourceSink(self._send)

    async def _send(self, batch: Batch, on_done: AckCallback | None) -> None:
        await self._send_channel.send((batch, on_done))

    def counters(self) -> dict[str, dict[str, int]]:
        return {
            name: {
                "received": inbox.counters.received,
                "written": inbox.counters.written,
                "dropped": inbox.counters.dropped,
                "queued": inbox.queued_points,
            }
            for name, inbox in self.inboxes.items()
        }

    # -- running --

    async def run(
        self,
        *,
        once: bool = False,
        grace_period: float = 10.0,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Runs until `stop()` (or, with `once`, until every polled source polled once), then drains.

        `task_status.started()` is called once every output and autonomous source is up.
        """
        async with trio.open_nursery() as outer:
            outputs_scope = trio.CancelScope()
            outputs_done = trio.Event()
            outer.start_soon(self._run_outputs_and_dispatch, outputs_scope, outputs_done)

            async with trio.open_nursery() as polled:
                async with trio.open_nursery() as autonomous:
                    for name, state in self.sources.items():
                        src = state.element.obj
                        if isinstance(src, PolledSource):
                            polled.start_soon(
                                self._supervise, f"source {name}", self._polled_loop, state, once
                            )
                        elif not once:
                            await autonomous.start(self._run_autonomous, name, src)
                    if self.self_metrics_interval > 0 and not once:
                        autonomous.start_soon(self._self_metrics_loop)
                    task_status.started()
                    if once:
                        # Polled sources return after their one poll; nothing else runs.
                        self._stop_sources.set()
                    await self._stop_sources.wait()
                    # The whole shutdown (last polls, hand-over, drain) fits in the grace period
                    # counted from the stop request: a blocked queue cannot hold the agent forever.
                    self._shutdown_deadline = trio.current_time() + grace_period
                    polled.cancel_scope.deadline = self._shutdown_deadline
                    outputs_scope.deadline = self._shutdown_deadline
                    autonomous.cancel_scope.cancel()
            # Every source has returned: nothing more comes in. Let the dispatcher drain, then the
            # outputs.
            await self._send_channel.aclose()
            await outputs_done.wait()
            outer.cancel_scope.cancel()

    async def _run_autonomous(
        self,
        name: str,
        source: AutonomousSource,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Runs one autonomous source. Failing before it is ready is a startup error (a listener that
        cannot bind); crashing later is logged and restarted with backoff."""
        backoff = Backoff(*self.restart_backoff)
        ready = False
        while True:
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(partial(source.run, self.sink()))
                    if not ready:
                        ready = True
                        task_status.started()
                    backoff.reset()
                return
            except Exception as exc:
                if not ready:
                    raise StartupError(f"source {name} could not start: {describe_exception(exc)}") from exc
                self.sources[name].errors += 1
                delay = backoff.next_delay()
                log.error("source %s failed: %s; restarting in %.1fs", name, describe_exception(exc), delay)
                log.debug("source %s failure", name, exc_info=True)
                await trio.sleep(delay)

    async def _supervise(self, name: str, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        backoff = Backoff(*self.restart_backoff)
        while True:
            try:
                await fn(*args)
                return
            except Exception as exc:
                delay = backoff.next_delay()
                log.error("%s failed: %s; restarting in %.1fs", name, describe_exception(exc), delay)
                log.debug("%s failure", name, exc_info=True)
                await trio.sleep(delay)

    async def _polled_loop(self, state: SourceState, once: bool) -> None:
        source: PolledSource = state.element.obj
        poll_interval = max(float(source.poll_interval), 1e-6)
        flush_every = max(1, round(float(source.flush_interval) / poll_interval))
        builder = BatchBuilder()
        # The first poll goes out at once, so that a new agent shows points at once; then every
        # `flush_every` polls.
        polls_since_flush = flush_every - 1
        next_poll = trio.current_time()
        try:
            while True:
                await self._poll_once(state, builder)
                polls_since_flush += 1
                if once:
                    break
                if polls_since_flush >= flush_every and len(builder):
                    polls_since_flush = 0
                    batch = builder.take()
                    try:
                        await self._send(batch, None)
                    except trio.Cancelled:
                        # Not sent (a channel send is all or nothing): back into the builder, for
                        # the hand-over below to account for.
                        for series in batch.series:
                            builder.add_series(series)
                        raise
                next_poll += poll_interval
                now = trio.current_time()
                if next_poll < now:  # we fell behind (slow poll): skip missed ticks, do not burst
                    next_poll = now + (poll_interval - (now - next_poll) % poll_interval)
                with trio.move_on_at(next_poll):
                    await self._stop_sources.wait()
                if self._stop_sources.is_set():
                    if self._final_poll:
                        await self._poll_once(state, builder)
                    break
        finally:
            if len(builder):
                # Points already measured are handed over at shutdown, unless the outputs are so
                # stuck that the grace period runs out first.
                points = len(builder)
                with trio.CancelScope(shield=True, deadline=self._shutdown_deadline) as handover:
                    await self._send(builder.take(), None)
                if handover.cancelled_caught:
                    log.error(
                        "source %s: %d points not written: the grace period ran out at shutdown",
                        state.element.full_name,
                        points,
                    )
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await source.close()

    async def _poll_once(self, state: SourceState, builder: BatchBuilder) -> None:
        before = len(builder)
        try:
            await state.element.obj.poll(builder, now_ns())
        except Exception as exc:
            state.errors += 1
            if state.errors == 1 or math.log2(state.errors).is_integer():
                log.error(
                    "source %s: poll failed (%d so far): %s",
                    state.element.full_name,
                    state.errors,
                    describe_exception(exc),
                )
            log.debug("poll failure", exc_info=True)
        state.polls += 1
        state.points += len(builder) - before
        if state.polls == 1:
            self._first_polls_pending -= 1
            if self._first_polls_pending == 0:
                self.first_polls_done.set()

    async def _run_outputs_and_dispatch(self, scope: trio.CancelScope, done: trio.Event) -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                for element, inbox in self.outputs:
                    nursery.start_soon(self._output_task, element, inbox)
                await self._dispatch()
                for _, inbox in self.outputs:
                    inbox.close()
        if scope.cancelled_caught:
            for _, inbox in self.outputs:
                inbox.drop_everything("the grace period ran out at shutdown")
        done.set()

    async def _output_task(self, element: Element, inbox: OutputInbox) -> None:
        output: Output = element.obj
        backoff = Backoff(*self.restart_backoff)
        while True:
            try:
                await output.run(inbox)
                if inbox.exhausted:
                    return
                # run() returned early without draining: treat like a crash.
                raise RuntimeError("the output stopped before its queue was drained")
            except Exception as exc:
                inbox.requeue_taken()
                delay = backoff.next_delay()
                log.error(
                    "output %s failed: %s; restarting in %.1fs", inbox.name, describe_exception(exc), delay
                )
                log.debug("output %s failure", inbox.name, exc_info=True)
                await trio.sleep(delay)

    async def _dispatch(self) -> None:
        inboxes = [inbox for _, inbox in self.outputs]
        async with self._receive_channel:
            async for batch, callback in self._receive_channel:
                if not all(_well_formed(s) for s in batch.series):
                    batch = self._without_malformed(batch)
                for name, transform in self.transforms:
                    try:
                        result = transform.apply(batch)
                    except Exception as exc:
                        # A broken transform must not lose data: the batch goes on unchanged.
                        self.transform_errors += 1
                        log.error(
                            "transform %s failed, batch passed on unchanged: %s",
                            name,
                            describe_exception(exc),
                        )
                        log.debug("transform failure", exc_info=True)
                        continue
                    if result is None:
                        batch = Batch()
                        break
                    batch = result
                points = len(batch)
                if points == 0 or not inboxes:
                    if callback is not None:
                        callback(True)
                    continue
                tracker = _BatchTracker(len(inboxes), callback) if callback is not None else None
                for inbox in inboxes:
                    await inbox.put(Envelope(batch, points, tracker, inbox))

    def _without_malformed(self, batch: Batch) -> Batch:
        """Drops series whose columns differ in length: no output could write them, and one poison
        batch retried forever would hold every batch behind it."""
        good = [s for s in batch.series if _well_formed(s)]
        bad = len(batch.series) - len(good)
        self.invalid_series += bad
        log.error(
            "dropped %d malformed series (columns of different lengths), e.g. metric %r",
            bad,
            next(s.metric for s in batch.series if not _well_formed(s)),
        )
        return Batch(good)

    async def _self_metrics_loop(self) -> None:
        while True:
            await trio.sleep(self.self_metrics_interval)
            await self._send(self.self_metrics_batch(), None)

    def self_metrics_batch(self) -> Batch:
        """The agent's own counters as ordinary points (one series per output and counter)."""
        ts = now_ns()
        series = []
        for name, inbox in self.inboxes.items():
            c = inbox.counters
            for metric, value in (
                ("agent_output_points_received_total", c.received),
                ("agent_output_points_written_total", c.written),
                ("agent_output_points_dropped_total", c.dropped),
                ("agent_output_points_queued", inbox.queued_points),
            ):
                series.append(
                    Series(metric, LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, {"output": name}, [ts], [value])
                )
        for name, state in self.sources.items():
            series.append(
                Series(
                    "agent_source_errors_total",
                    LOCAL_MACHINE,
                    LOCAL_MACHINE_CONSUMER,
                    {"source": name},
                    [ts],
                    [state.errors],
                )
            )
        return Batch(series)


SELF_METRICS: Sequence[tuple[str, str, str]] = (
    ("agent_output_points_received_total", "1", "points handed to the output's queue"),
    ("agent_output_points_written_total", "1", "points the output wrote"),
    ("agent_output_points_dropped_total", "1", "points the output dropped (queue overflow, shutdown)"),
    ("agent_output_points_queued", "1", "points waiting in the output's queue"),
    ("agent_source_errors_total", "1", "failed polls or restarts of a source"),
)
