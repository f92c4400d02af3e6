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
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from agent.backoff import Backoff
from agent.errors import StartupError, describe_exception
from agent.inbox import AckCallback, BatchTracker, Envelope, OutputInbox
from agent.model import LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, Batch, Series, now_ns
from agent.plugin import (
    AutonomousSource,
    BatchBuilder,
    Element,
    Output,
    OutputConfig,
    PolledSource,
    Service,
    SourceSink,
    Transform,
)
from agent.tasks import ChangeNotifier, supervise

log = logging.getLogger(__name__)


def _well_formed(series: Series) -> bool:
    n = len(series.timestamps)
    return len(series.values) == n and (isinstance(series.metric, str) or len(series.metric) == n)


@dataclass
class SourceState:
    element: Element
    polls: int = 0
    errors: int = 0
    points: int = 0
    last_error: str = ""
    # -- runtime control (agent.control): a polled source re-reads these whenever `changed` fires --
    paused: bool = False
    poll_now: bool = False
    flush_now: bool = False
    #: When the next scheduled poll is due (trio clock), and when the last one was.
    next_poll: float = 0.0
    last_tick: float = 0.0
    changed: ChangeNotifier = field(default_factory=ChangeNotifier)
    #: Sources added while running: removed by their plugin (`remove_source`), and their scope.
    removed: bool = False
    cancel_scope: trio.CancelScope | None = None
    # -- removal at run time (a config reload): the source stops on its own, by `stop_deadline` --
    removing: bool = False
    stop_deadline: float = float("inf")
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)


@dataclass
class TransformState:
    element: Element
    enabled: bool = True
    errors: int = 0
    last_error: str = ""


@dataclass
class Pipeline:
    """Runs the elements of all started plugins. Build with the elements, then `await run()`."""

    elements: list[Element]
    source_channel_size: int = 64
    self_metrics_interval: float = 0.0
    restart_backoff: tuple[float, float] = (1.0, 60.0)
    inboxes: dict[str, OutputInbox] = field(default_factory=dict)
    sources: dict[str, SourceState] = field(default_factory=dict)
    transform_states: dict[str, TransformState] = field(default_factory=dict)
    transform_errors: int = 0
    invalid_series: int = 0
    #: What each output, service and autonomous source passed to `task_status.started` (its bound
    #: addresses, typically), by element name; None is left out. Complete once `run` reported started.
    ready: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.transforms: list[tuple[str, Transform]] = [
            (e.full_name, e.obj) for e in self.elements if e.kind == "transform"
        ]
        self.transform_states = {
            e.full_name: TransformState(e) for e in self.elements if e.kind == "transform"
        }
        #: The transforms that run (all but the disabled ones) and the outputs that take points: the
        #: dispatcher reads both at the start of each batch, and they change together (`_set_routes`).
        self._active_transforms = list(self.transforms)
        self._active_inboxes: list[OutputInbox] = []
        self.disabled_outputs: set[str] = set()
        #: Each running output's and service's cancel scope and end, by name (to remove one at run time).
        self._tasks: dict[str, tuple[trio.CancelScope, trio.Event]] = {}
        #: The nurseries that run outputs, services and sources, once `run` has opened them.
        self._nurseries: dict[str, trio.Nursery] = {}
        #: True while the dispatcher routes a batch; `_routed` wakes whoever waits for its end.
        self._routing = False
        self._routed = ChangeNotifier()
        #: Taps (`agent tap`): each gets every batch after the transforms, without ever waiting.
        self.taps: list[Tap] = []
        self.outputs: list[tuple[Element, OutputInbox]] = []
        for e in self.elements:
            if e.kind == "output":
                cfg: OutputConfig = e.config or OutputConfig()
                inbox = OutputInbox(e.full_name, cfg.queue_max_points, cfg.overflow)
                self.inboxes[e.full_name] = inbox
                self.outputs.append((e, inbox))
            elif e.kind == "source":
                self.sources[e.full_name] = SourceState(e, paused=e.start_paused)
        self.services: list[Element] = [e for e in self.elements if e.kind == "service"]
        self._active_inboxes = [inbox for _, inbox in self.outputs]
        self._send_channel, self._receive_channel = trio.open_memory_channel[
            tuple[Batch, AckCallback | None]
        ](self.source_channel_size)
        self._stop_sources = trio.Event()
        self._final_poll = False
        # Set when stopping: everything left must be done by then (see `run`).
        self._shutdown_deadline = float("inf")
        #: Set once every polled source has polled once (`agent exec` starts its command then).
        self.first_polls_done = trio.Event()
        # Sources that start paused are not waited for: they may never poll.
        self._first_polls_pending = sum(
            isinstance(state.element.obj, PolledSource) and not state.paused
            for state in self.sources.values()
        )
        # Where sources added while running are started (set by `run`).
        self._source_nurseries: tuple[trio.Nursery, trio.Nursery] | None = None
        self._once = False
        if self._first_polls_pending == 0:
            self.first_polls_done.set()

    # -- public control --

    def stop(self, final_poll: bool = False) -> None:
        """Asks the pipeline to stop: sources flush and stop, outputs drain (see `run`)."""
        self._final_poll = self._final_poll or final_poll
        self._stop_sources.set()
        for state in self.sources.values():
            state.changed.notify()

    @property
    def stopping(self) -> bool:
        return self._stop_sources.is_set()

    # -- runtime control (the requests of agent.control; each takes effect at once) --

    def set_paused(self, name: str, paused: bool) -> None:
        """A paused polled source skips its polls; a paused autonomous source's sends wait."""
        state = self.sources[name]
        state.paused = paused
        state.changed.notify()

    def set_intervals(self, name: str, poll_interval: float, flush_interval: float | None = None) -> None:
        """Changes a polled source's intervals; a pending wait is cut short (the next poll is due
        `poll_interval` after the last one). `flush_interval` None keeps it, raised to the poll
        interval if shorter."""
        state = self.sources[name]
        source: PolledSource = state.element.obj
        source.poll_interval = poll_interval
        if flush_interval is not None:
            source.flush_interval = flush_interval
        if source.flush_interval and source.flush_interval < poll_interval:
            source.flush_interval = poll_interval
        state.next_poll = state.last_tick + poll_interval
        state.changed.notify()

    def add_source(self, element: Element) -> None:
        """Adds a source while the pipeline runs (before `run`, it starts with the others). A source
        added after the stop request is not started."""
        name = element.full_name
        if name in self.sources:
            raise ValueError(f"source {name} already exists")
        state = SourceState(element, paused=element.start_paused)
        self.sources[name] = state
        if self._source_nurseries is None:
            self.elements.append(element)
            if (
                isinstance(element.obj, PolledSource)
                and not state.paused
                and not self.first_polls_done.is_set()
            ):
                self._first_polls_pending += 1
            return
        if self._stop_sources.is_set():
            log.info("source %s added during shutdown: not started", name)
            return
        polled, autonomous = self._source_nurseries
        if isinstance(element.obj, PolledSource):
            state.cancel_scope = trio.CancelScope()
            polled.start_soon(self._run_added, name, state)
        else:
            state.cancel_scope = trio.CancelScope()
            autonomous.start_soon(self._run_added, name, state)

    async def _run_added(self, name: str, state: SourceState) -> None:
        assert state.cancel_scope is not None
        with state.cancel_scope:
            if isinstance(state.element.obj, PolledSource):
                await self._run_polled(name, state, self._once)
            else:
                await self._run_autonomous(name, state, state.element.obj)

    def remove_source(self, name: str) -> None:
        """Ends a source added while running: a polled one hands over what it holds first."""
        state = self.sources.get(name)
        if state is None:
            return
        state.removed = True
        state.changed.notify()
        if not isinstance(state.element.obj, PolledSource) and state.cancel_scope is not None:
            state.cancel_scope.cancel()

    def poll_now(self, name: str) -> None:
        """The polled source polls now (paused or not) and sends what it holds at once."""
        state = self.sources[name]
        state.poll_now = True
        state.changed.notify()

    def flush_sources(self) -> None:
        """Every polled source sends the points it holds now, without waiting for its flush interval."""
        for state in self.sources.values():
            state.flush_now = True
            state.changed.notify()

    async def flush(self, timeout: float = 5.0) -> None:
        """Every polled source sends what it holds, then every output writes what is queued without
        waiting for its flush interval. Waits (up to `timeout`) for the sources' points to reach the
        outputs' queues first, so that they are part of the flush."""
        self.flush_sources()
        with trio.move_on_after(timeout):
            while (
                any(state.flush_now for state in self.sources.values())
                or self._receive_channel.statistics().current_buffer_used
            ) and not self._stop_sources.is_set():
                await trio.sleep(0.005)
        for inbox in self.inboxes.values():
            inbox.flush()

    def set_transform_enabled(self, name: str, enabled: bool) -> None:
        """A disabled transform is skipped: batches go on unchanged."""
        self.transform_states[name].enabled = enabled
        self._set_routes()

    def _set_routes(self) -> None:
        """The dispatcher's transforms and outputs, both replaced in one step (no await in between):
        a batch is routed with the old pair or the new one, never a mix."""
        self._active_transforms = [(n, t) for n, t in self.transforms if self.transform_states[n].enabled]
        self._active_inboxes = [inbox for _, inbox in self.outputs]

    def set_output_enabled(self, name: str, enabled: bool) -> None:
        """A disabled output's points are dropped and counted as dropped; `enable` writes what comes
        from then on."""
        if enabled:
            self.disabled_outputs.discard(name)
        else:
            self.disabled_outputs.add(name)

    # -- changing the elements while running (a config reload) --

    async def remove_elements(self, names: Collection[str], grace_period: float = 10.0) -> None:
        """Takes the named elements out of the running pipeline; the others keep running.

        Their sources stop (a polled one hands over what it holds); their transforms and outputs leave
        the dispatcher's routes between two batches (a transform hands on what it holds back); each
        output then writes what its queue holds and ends; their services are cancelled. What an output
        has not written after `grace_period` is dropped and logged."""
        deadline = trio.current_time() + grace_period
        removed = [e for e in self.elements if e.full_name in names]
        states = [state for name, state in self.sources.items() if name in names]
        for state in states:
            state.removing = True
            state.stop_deadline = deadline
            if not isinstance(state.element.obj, PolledSource):
                state.scope.cancel()
            state.changed.notify()
        for state in states:
            with trio.move_on_at(deadline):
                await state.done.wait()
            state.scope.cancel()
            await state.done.wait()
            del self.sources[state.element.full_name]

        old_transforms = list(self._active_transforms)
        gone = [inbox for e, inbox in self.outputs if e.full_name in names]
        self.transforms = [(n, t) for n, t in self.transforms if n not in names]
        self.outputs = [(e, inbox) for e, inbox in self.outputs if e.full_name not in names]
        self._set_routes()
        # The batch being routed may still be on its way into a removed output's queue: let it arrive.
        with trio.move_on_at(deadline):
            await self._routed.wait_for(lambda: not self._routing)
        await self._finish_transforms(old_transforms, self._active_inboxes, only=set(names))
        for name in names:
            self.transform_states.pop(name, None)

        for inbox in gone:
            inbox.close()
        for inbox in gone:
            scope, done = self._tasks.pop(inbox.name)
            with trio.move_on_at(deadline):
                await done.wait()
            if not done.is_set():
                scope.cancel()
                await done.wait()
                inbox.drop_everything("the grace period ran out while the output was removed")
            del self.inboxes[inbox.name]
            self.disabled_outputs.discard(inbox.name)
        for element in removed:
            if element.kind == "service":
                scope, done = self._tasks.pop(element.full_name)
                scope.cancel()
                await done.wait()
        self.services = [e for e in self.services if e.full_name not in names]
        self.elements = [e for e in self.elements if e.full_name not in names]

    async def add_elements(self, elements: Sequence[Element], plugin_order: Sequence[str] = ()) -> None:
        """Starts new elements in the running pipeline: outputs and services first (each up before any
        point is routed to it), then the transforms and outputs join the routes in one step, then the
        sources start. Transforms run in `plugin_order` (plugins not named there keep their place after
        them). An element that cannot start raises StartupError, after the others were removed again."""
        if self.stopping or "outputs" not in self._nurseries:
            raise StartupError("the pipeline is not running (stopping, or not started yet)")
        new_outputs: list[tuple[Element, OutputInbox]] = []
        started: list[str] = []
        try:
            for e in elements:
                if e.kind == "output":
                    cfg: OutputConfig = e.config or OutputConfig()
                    inbox = OutputInbox(e.full_name, cfg.queue_max_points, cfg.overflow)
                    self.inboxes[e.full_name] = inbox
                    started.append(e.full_name)
                    await self._start_output(e, inbox)
                    new_outputs.append((e, inbox))
                elif e.kind == "service":
                    started.append(e.full_name)
                    await self._start_service(e)
                    self.services.append(e)
        except BaseException:
            for _, inbox in new_outputs:
                inbox.close()
            for name in started:
                if name in self._tasks:
                    scope, done = self._tasks.pop(name)
                    scope.cancel()
                    await done.wait()
                self.inboxes.pop(name, None)
            self.services = [e for e in self.services if e.full_name not in started]
            raise
        order = {name: index for index, name in enumerate(plugin_order)}
        self.elements = sorted([*self.elements, *elements], key=lambda e: order.get(e.plugin, len(order)))
        self.transforms = [(e.full_name, e.obj) for e in self.elements if e.kind == "transform"]
        for e in elements:
            if e.kind == "transform":
                self.transform_states[e.full_name] = TransformState(e)
        self.outputs += new_outputs
        self._set_routes()
        states = [SourceState(e) for e in elements if e.kind == "source"]
        for state in states:
            self.sources[state.element.full_name] = state
        for index, state in enumerate(states):
            try:
                await self._start_source(state)
            except BaseException:
                for never_started in states[index + 1 :]:
                    never_started.done.set()
                with trio.CancelScope(shield=True):
                    await self.remove_elements([x.full_name for x in elements], 0.0)
                raise

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

        Start order: outputs (each `run` reports readiness), then services, then sources.
        `task_status.started()` is called once every output, service and autonomous source is up; one
        that fails before it is up raises `StartupError` naming it.
        """
        async with trio.open_nursery() as outer:
            outputs_scope = trio.CancelScope()
            outputs_done = trio.Event()
            await outer.start(self._run_outputs_and_dispatch, outputs_scope, outputs_done)
            # Services (admin listeners, control servers) run until everything is drained.
            await outer.start(self._run_services)

            async with trio.open_nursery() as polled:
                async with trio.open_nursery() as autonomous:
                    self._nurseries.update(polled=polled, autonomous=autonomous)
                    for state in list(self.sources.values()):
                        await self._start_source(state, once)
                    if self.self_metrics_interval > 0 and not once:
                        autonomous.start_soon(self._self_metrics_loop)
                    self._source_nurseries = (polled, autonomous)
                    self._once = once
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

    async def _run_element(
        self,
        label: str,
        run: Callable[..., Awaitable[Any]],
        *,
        name: str,
        on_failure: Callable[[BaseException], None] | None = None,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Runs `run(task_status=...)` of one element: failing before it reports readiness is a
        `StartupError` (a listener that cannot bind); crashing later is logged and restarted with backoff
        (`on_failure` is called first). Returns when `run` returns."""
        ready = False

        async def attempt() -> None:
            nonlocal ready
            try:
                async with trio.open_nursery() as nursery:
                    value = await nursery.start(run)
                    if not ready:
                        ready = True
                        if value is not None:
                            self.ready[name] = value
                        task_status.started()
            except Exception as exc:
                if not ready:
                    raise StartupError(f"{label} could not start: {describe_exception(exc)}") from exc
                raise

        await supervise(
            label,
            attempt,
            logger=log,
            backoff=Backoff(*self.restart_backoff),
            on_failure=on_failure,
            give_up=lambda _: not ready,
        )

    async def _run_autonomous(
        self,
        name: str,
        state: SourceState,
        source: AutonomousSource,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        def count(exc: BaseException) -> None:
            state.errors += 1
            state.last_error = describe_exception(exc)

        async def send(batch: Batch, on_done: AckCallback | None) -> None:
            # Paused: the source's sends wait (back-pressure to its peers) until it is resumed.
            while state.paused and not self._source_stopping(state):
                await state.changed.wait()
            state.points += len(batch)
            await self._send(batch, on_done)

        try:
            with state.scope:
                await self._run_element(
                    f"source {name}",
                    partial(source.run, SourceSink(send)),
                    name=name,
                    on_failure=count,
                    task_status=task_status,
                )
        finally:
            state.done.set()

    async def _run_services(self, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nurseries["services"] = nursery
            for element in self.services:
                await self._start_service(element)
            task_status.started()
            await trio.sleep_forever()

    async def _start_service(self, element: Element) -> None:
        service: Service = element.obj
        run = partial(self._run_element, f"service {element.full_name}", service.run, name=element.full_name)
        await self._nurseries["services"].start(self._cancellable, element.full_name, run)

    async def _start_output(self, element: Element, inbox: OutputInbox) -> None:
        await self._nurseries["outputs"].start(
            self._cancellable, inbox.name, partial(self._run_output, element, inbox)
        )

    async def _cancellable(
        self,
        name: str,
        run: Callable[..., Awaitable[Any]],
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Runs an output or a service under a cancel scope of its own, so that a reload can end it."""
        scope, done = trio.CancelScope(), trio.Event()
        self._tasks[name] = (scope, done)
        try:
            with scope:
                await run(task_status=task_status)
        finally:
            done.set()

    async def _start_source(self, state: SourceState, once: bool = False) -> None:
        name, src = state.element.full_name, state.element.obj
        if isinstance(src, PolledSource):
            self._nurseries["polled"].start_soon(self._run_polled, name, state, once)
        elif not once:
            await self._nurseries["autonomous"].start(self._run_autonomous, name, state, src)
        else:
            state.done.set()

    async def _run_polled(self, name: str, state: SourceState, once: bool) -> None:
        try:
            with state.scope:
                await supervise(
                    f"source {name}",
                    partial(self._polled_loop, state, once),
                    logger=log,
                    backoff=Backoff(*self.restart_backoff),
                )
        finally:
            state.done.set()

    def _source_stopping(self, state: SourceState) -> bool:
        """Removed by a reload (`removing`) or by its plugin (`removed`), or the pipeline stops."""
        return state.removing or state.removed or self._stop_sources.is_set()

    async def _polled_loop(self, state: SourceState, once: bool) -> None:
        source: PolledSource = state.element.obj
        builder = BatchBuilder()
        # The first poll goes out at once, so that a new agent shows points at once; then every
        # `flush_every` polls.
        polls_since_flush = _flush_every(source) - 1
        state.next_poll = trio.current_time()
        try:
            while True:
                # Control requests (agent.control) set flags and wake this loop; the intervals are
                # read again on every round, so that a new period applies at once.
                poll_interval = max(float(source.poll_interval), 1e-6)
                now = trio.current_time()
                scheduled = now >= state.next_poll
                poll_now, state.poll_now = state.poll_now, False
                flush_now, state.flush_now = state.flush_now, False
                if scheduled or poll_now:
                    if not state.paused or poll_now:
                        await self._poll_once(state, builder)
                        polls_since_flush += 1
                    if once:
                        break
                    if scheduled:
                        state.last_tick = state.next_poll
                        state.next_poll += poll_interval
                        now = trio.current_time()
                        if state.next_poll < now:  # we fell behind (slow poll): skip missed ticks
                            state.next_poll = now + (poll_interval - (now - state.next_poll) % poll_interval)
                if len(builder) and (polls_since_flush >= _flush_every(source) or poll_now or flush_now):
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
                if not (self._source_stopping(state) or state.poll_now or state.flush_now):
                    with trio.move_on_at(state.next_poll):
                        await state.changed.wait()
                if self._source_stopping(state):
                    if self._final_poll and not (state.removing or state.removed):
                        await self._poll_once(state, builder)
                    break
        finally:
            if len(builder):
                # Points already measured are handed over at shutdown, unless the outputs are so
                # stuck that the grace period runs out first.
                points = len(builder)
                deadline = min(self._shutdown_deadline, state.stop_deadline)
                with trio.CancelScope(shield=True, deadline=deadline) as handover:
                    await self._send(builder.take(), None)
                if handover.cancelled_caught:
                    log.error(
                        "source %s: %d points not written: the grace period ran out %s",
                        state.element.full_name,
                        points,
                        "while it was removed" if state.removing else "at shutdown",
                    )
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await source.close()

    async def _poll_once(self, state: SourceState, builder: BatchBuilder) -> None:
        before = len(builder)
        try:
            await state.element.obj.poll(builder, now_ns())
        except Exception as exc:
            state.errors += 1
            state.last_error = describe_exception(exc)
            # The 1st, 2nd, 4th, 8th... failure: a source that fails every poll stays visible without
            # a line per poll.
            if state.errors & (state.errors - 1) == 0:
                log.error(
                    "source %s: poll failed (%d so far): %s",
                    state.element.full_name,
                    state.errors,
                    describe_exception(exc),
                )
            log.debug("poll failure", exc_info=True)
        state.polls += 1
        state.points += len(builder) - before
        if state.polls == 1 and not state.element.start_paused and self._first_polls_pending > 0:
            self._first_polls_pending -= 1
            if self._first_polls_pending == 0:
                self.first_polls_done.set()

    async def _run_outputs_and_dispatch(
        self,
        scope: trio.CancelScope,
        done: trio.Event,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                self._nurseries["outputs"] = nursery
                for element, inbox in self.outputs:
                    await self._start_output(element, inbox)
                task_status.started()
                await self._dispatch()
                for _, inbox in self.outputs:
                    inbox.close()
        if scope.cancelled_caught:
            for _, inbox in self.outputs:
                inbox.drop_everything("the grace period ran out at shutdown")
        done.set()

    async def _run_output(
        self,
        element: Element,
        inbox: OutputInbox,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        output: Output = element.obj

        async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            await output.run(inbox, task_status=task_status)
            if not inbox.exhausted:
                # run() returned early without draining: treat like a crash.
                raise RuntimeError("the output stopped before its queue was drained")

        await self._run_element(
            f"output {inbox.name}",
            run,
            name=inbox.name,
            on_failure=lambda _: inbox.requeue_taken(),
            task_status=task_status,
        )

    async def _dispatch(self) -> None:
        async with self._receive_channel:
            async for batch, callback in self._receive_channel:
                if not all(_well_formed(s) for s in batch.series):
                    batch = self._without_malformed(batch)
                self._routing = True
                try:
                    await self._route(batch, callback, self._active_transforms, self._active_inboxes)
                finally:
                    self._routing = False
                    self._routed.notify()
        # Every source has stopped: transforms that hold points back (aggregation windows) hand them
        # over, through the transforms after them, before the outputs drain.
        await self._finish_transforms(list(self._active_transforms), self._active_inboxes)

    async def _finish_transforms(
        self,
        transforms: list[tuple[str, Transform]],
        inboxes: list[OutputInbox],
        only: Collection[str] | None = None,
    ) -> None:
        """Transforms that hold points back (`finish`) hand them on through the transforms after them
        (all of `transforms`, or those named in `only`)."""
        for index, (name, transform) in enumerate(transforms):
            if only is not None and name not in only:
                continue
            finish = getattr(transform, "finish", None)
            if finish is None:
                continue
            try:
                held = finish()
            except Exception as exc:
                log.error("transform %s failed to hand over what it held: %s", name, describe_exception(exc))
                continue
            if held is not None and len(held):
                rest = [t for t in transforms[index + 1 :] if only is None or t[0] not in only]
                await self._route(held, None, rest, inboxes)

    async def _route(
        self,
        batch: Batch,
        callback: AckCallback | None,
        transforms: list[tuple[str, Transform]],
        inboxes: list[OutputInbox],
    ) -> None:
        """Passes one batch through `transforms`, then into every enabled output's queue."""
        for name, transform in transforms:
            try:
                result = transform.apply(batch)
            except Exception as exc:
                # A broken transform must not lose data: the batch goes on unchanged.
                self.transform_errors += 1
                self.transform_states[name].errors += 1
                self.transform_states[name].last_error = describe_exception(exc)
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
            if result is not batch and result.identity is None:
                # The identity names the source's batch, whatever a transform made of it.
                result.identity = batch.identity
            batch = result
        points = len(batch)
        if self.taps and points:
            for tap in self.taps:
                tap.offer(batch)
        if points == 0 or not inboxes:
            if callback is not None:
                callback(True)
            return
        disabled = self.disabled_outputs
        if disabled:
            # A disabled output is out of the pipeline for now: its points are counted as
            # dropped, and acknowledgements wait only for the enabled outputs (an operator's
            # choice must not make every relay client resend for ever).
            for inbox in inboxes:
                if inbox.name in disabled:
                    inbox.refuse(Envelope(batch, points, None, inbox), "the output is disabled")
            enabled = [inbox for inbox in inboxes if inbox.name not in disabled]
            if not enabled:
                if callback is not None:
                    callback(True)
                return
        else:
            enabled = inboxes
        tracker = BatchTracker(len(enabled), callback) if callback is not None else None
        for inbox in enabled:
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
        return Batch(good, batch.identity)

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
                ("agent_output_write_failures_total", c.failed_writes),
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


def _flush_every(source: PolledSource) -> int:
    """Polls per batch: the flush interval in whole polls (at least one)."""
    return max(1, round(float(source.flush_interval) / max(float(source.poll_interval), 1e-6)))


class Tap:
    """A bounded queue of the points that flow after the transforms, for `agent tap`: `offer` never
    waits; what does not fit is counted in `dropped` (the pipeline must never slow down for a viewer)."""

    def __init__(self, accept: Callable[[str], bool], max_points: int = 10_000) -> None:
        self.accept = accept
        self.dropped = 0
        self.send, self.receive = trio.open_memory_channel[tuple[Series, int]](max(1, max_points))

    def offer(self, batch: Batch) -> None:
        for series in batch.series:
            metric = series.metric
            if isinstance(metric, str) and not self.accept(metric):
                continue
            for i in range(len(series.timestamps)):
                if not isinstance(metric, str) and not self.accept(metric[i]):
                    continue
                try:
                    self.send.send_nowait((series, i))
                except trio.WouldBlock:
                    self.dropped += 1


SELF_METRICS: Sequence[tuple[str, str, str]] = (
    ("agent_output_points_received_total", "1", "points handed to the output's queue"),
    ("agent_output_points_written_total", "1", "points the output wrote"),
    ("agent_output_points_dropped_total", "1", "points the output dropped (queue overflow, shutdown)"),
    ("agent_output_points_queued", "1", "points waiting in the output's queue"),
    (
        "agent_output_write_failures_total",
        "1",
        "writes that failed and were retried (server down, connection cut)",
    ),
    ("agent_source_errors_total", "1", "failed polls or restarts of a source"),
)
