"""The `graphite-out` output: routes each batch to Graphite destinations, and runs their writers.

Where it sits: it is the `Output` the plugin adds to the pipeline, and implements `run` over its inbox
itself. For each batch taken from the inbox it

1. builds columns (path, timestamp in seconds, value): Graphite points keep their own paths (a `Series`
   whose `metric` is a list), other series get one path each from the path template (`render.py`);
2. applies the blocklist and rewriters, feeds the aggregators, and routes (`graphite.protocol.routing`,
   carbon-relay-ng's order); aggregator results come back on a timer and are routed like other points;
3. hands each destination its share with `Destination.offer`, which queues or spools without waiting;
4. acknowledges the batch (`env.done(True)`): from then on the points are the destinations' to deliver.

Live changes: the admin ports (`admin_http.py`, `admin_line.py`, both through `control.py`; services that
the plugin adds next to this output, which knows nothing of them) change the routes, destinations, blocklist, rewriters and aggregators with `GraphiteOutput.apply`. It checks the whole
new configuration first (an invalid change is refused and nothing changes), then swaps the routing state
in one step between two batches: no point is routed by half a table. Destinations that stay (same route
key and address) keep their queue, spool, connection and counters. A removed destination takes no new
points; its writer keeps writing what it holds in memory for up to 30 s, then whatever is left goes to its
spool, which stays on disk and is replayed if the same route and address come back (at runtime or after a
restart). With its spool off, what is left is dropped and counted (`removed`).

Shutdown: when the inbox is exhausted, aggregators emit every bucket they hold, destinations write what
they hold in memory for up to half the agent's grace period, and whatever is still in memory then goes to
the spools (or is dropped and counted as `shutdown` where the spool is off). Spools are replayed at the
next start.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import msgspec
import trio

from agent import DropCounter, Output, supervise
from agent.model import Batch
from agent_plugins.graphite.protocol.aggregation import Aggregator, AggregatorConfig
from agent_plugins.graphite.protocol.badlines import RecentBadLines
from agent_plugins.graphite.protocol.routing import HashRoute, RewriterConfig, RouteConfig, RoutingTable

from .config import GraphiteOutConfig, load_aggregation_rules
from .destination import Destination
from .render import Chunk, PathTemplate, take, to_seconds

log = logging.getLogger(__name__)


class LiveSettings(msgspec.Struct, kw_only=True):
    """What the admin API can change at runtime; `GraphiteOutput.settings` is the one in force."""

    routes: list[RouteConfig]
    blocklist: list[str]
    rewriters: list[RewriterConfig]
    aggregators: list[AggregatorConfig]


@dataclass
class RoutingState:
    """One consistent routing setup: the table, each route's destinations (index = ring slot), the
    aggregators. Replaced whole by `apply`, never changed in place (except hash-ring failover marks)."""

    settings: LiveSettings
    table: RoutingTable
    route_destinations: dict[str, list[Destination]]
    aggregators: list[Aggregator]
    drop_raw: bool


@dataclass
class OutputCounters:
    batches: int = 0
    points_in: int = 0
    #: Points the blocklist dropped.
    blocked: int = 0
    #: Points no route took.
    unroutable: int = 0
    #: Points whose series rendered to an empty path (a template without the series' fields).
    empty_path: int = 0
    #: Points the aggregators emitted (routed like the others).
    aggregated: int = 0
    #: Points that could not be routed because of an internal error (logged with a traceback).
    failed: int = 0


class GraphiteOutput(Output):
    """Routes batches to Graphite destinations. See the module docstring."""

    def __init__(
        self,
        config: GraphiteOutConfig,
        *,
        spool_dir: Path,
        config_dir: Path | None = None,
        grace_period: float = 10.0,
        aggregation_tick: float = 1.0,
        wall_clock: Any = time.time,
    ) -> None:
        self.config = config
        self.flush_interval = float(config.flush_interval)
        self.batch_max_points = config.batch_max_points
        self.template = PathTemplate(config.template, config.prefix, config.extra_fields)
        self.spool_dir = spool_dir
        self.drain_timeout = max(0.5, grace_period / 2)
        self.aggregation_tick = aggregation_tick
        self.wall_clock = wall_clock
        self.counters = OutputCounters()
        self.route_drops: dict[str, DropCounter] = {}
        #: Every destination with a writer (or waiting for one), retired ones included until they stop.
        self.destinations: dict[tuple[str, str], Destination] = {}
        #: When each destination address was first registered (Unix time), for `getdest`.
        self.registered: dict[str, float] = {}
        #: The graphite-in plugins' recent bad lines, filled in by the plugin's agent_pipeline_started hook.
        self.bad_line_sources: list[RecentBadLines] = []
        self._writers: trio.Nursery | None = None
        self._running = False
        aggregators = list(config.aggregators) + load_aggregation_rules(config.aggregation_rules, config_dir)
        settings = LiveSettings(
            routes=list(config.routes),
            blocklist=list(config.blocklist),
            rewriters=list(config.rewriters),
            aggregators=aggregators,
        )
        self.state: RoutingState = self._install(settings, self._check(settings))
        if not settings.routes:
            log.warning(
                "graphite-out: no routes configured: every point is dropped and counted as unroutable "
                "(add [[plugins.graphite-out.routes]] or use the admin API)"
            )

    # -- configuration --

    @property
    def settings(self) -> LiveSettings:
        return self.state.settings

    def _check(self, settings: LiveSettings) -> tuple[RoutingTable, list[Aggregator]]:
        """Validates a whole configuration. Raises ValueError naming what is wrong; changes nothing."""
        keys = [route.key for route in settings.routes]
        for key in keys:
            if keys.count(key) > 1:
                raise ValueError(f"route {key!r}: key: another route already uses this key")
        table = RoutingTable(settings.routes, settings.blocklist, settings.rewriters)
        reusable = list(self.state.aggregators) if hasattr(self, "state") else []
        aggregators = []
        for config in settings.aggregators:
            for old in reusable:
                if old.config == config:
                    reusable.remove(old)
                    aggregators.append(old)  # keeps its buckets
                    break
            else:
                aggregators.append(Aggregator(config))
        return table, aggregators

    def apply(self, settings: LiveSettings) -> None:
        """Validates `settings` and puts them in force at once. Raises ValueError (nothing changes)."""
        checked = self._check(settings)
        self.state = self._install(settings, checked)

    def _install(
        self, settings: LiveSettings, checked: tuple[RoutingTable, list[Aggregator]]
    ) -> RoutingState:
        table, aggregators = checked
        route_destinations: dict[str, list[Destination]] = {}
        wanted: set[tuple[str, str]] = set()
        for route in settings.routes:
            failover = float(route.failover_after) if route.type == "hash_route" else None
            destinations = []
            for config in route.destination_configs:
                address = str(config.parsed_address)
                key = (route.key, address)
                wanted.add(key)
                destination = self.destinations.get(key)
                if destination is not None and not destination.finished:
                    destination.reconfigure(config, route.format, failover)
                else:
                    destination = Destination(route.key, config, route.format, self.spool_dir, self, failover)
                    self.destinations[key] = destination
                    self.registered.setdefault(address, time.time())
                    if self._running:
                        self._start_writer(destination)
                destinations.append(destination)
            route_destinations[route.key] = destinations
            compiled = table.routes[route.key]
            if isinstance(compiled, HashRoute):
                for slot, destination in enumerate(destinations):
                    if destination.failed_over:
                        compiled.mark_destination_down(slot)
            self.route_drops.setdefault(route.key, DropCounter(f"graphite-out route {route.key!r}", log))
        for key, destination in list(self.destinations.items()):
            if key not in wanted and not destination.retired:
                log.info("%s: removed from the routing table", destination.name)
                destination.retire()
                if not self._running:
                    destination.discard()
                    del self.destinations[key]
        return RoutingState(
            settings=settings,
            table=table,
            route_destinations=route_destinations,
            aggregators=aggregators,
            drop_raw=any(aggregator.config.drop_raw for aggregator in aggregators),
        )

    # -- routing (synchronous: one batch is routed in one step) --

    def route_batches(self, batches: Sequence[Batch]) -> None:
        """Routes the points of `batches` to the destinations' queues and spools."""
        self.counters.batches += 1
        series_list = [series for batch in batches for series in batch.series if series.timestamps]
        if len(series_list) == 1 and not isinstance(series_list[0].metric, str):
            # One batch of Graphite points (graphite-in sends one series per chunk read): its columns are
            # used as they are; the output only reads them.
            series = series_list[0]
            self.route_chunk(Chunk(series.metric, to_seconds(series.timestamps), series.values))  # type: ignore[arg-type]
            return
        paths: list[str] = []
        timestamps: list[int] = []
        values: list[int | float] = []
        render = self.template.render
        for series in series_list:
            count = len(series.timestamps)
            metric = series.metric
            if isinstance(metric, str):
                path = render(series)
                if not path:
                    self.counters.empty_path += count
                    continue
                paths.extend(repeat(path, count))
            else:
                paths.extend(metric)
            timestamps.extend(to_seconds(series.timestamps))
            values.extend(series.values)
        if paths:
            self.route_chunk(Chunk(paths, timestamps, values))

    def route_chunk(self, chunk: Chunk, *, aggregated: bool = False) -> None:
        """Blocklist, rewriters, aggregators (skipped for aggregator output, as in carbon-relay-ng), routes."""
        state = self.state
        count = len(chunk)
        if aggregated:
            self.counters.aggregated += count
            paths = chunk.paths
            candidates: list[int] = list(range(count))
        else:
            self.counters.points_in += count
            paths, candidates = state.table.prepare(chunk.paths)
            self.counters.blocked += count - len(candidates)
            if state.aggregators and candidates:
                consumed: set[int] = set()
                for aggregator in state.aggregators:
                    matched = aggregator.add(paths, chunk.timestamps, chunk.values, candidates)
                    if aggregator.config.drop_raw:
                        consumed.update(matched)
                if consumed:
                    candidates = [i for i in candidates if i not in consumed]
            chunk = Chunk(paths, chunk.timestamps, chunk.values)
        if not candidates:
            return
        selections, unroutable = state.table.route(paths, candidates)
        self.counters.unroutable += len(unroutable)
        for key, selection in selections.items():
            for destination, indexes in zip(
                state.route_destinations[key], selection.per_destination, strict=True
            ):
                if indexes:
                    destination.offer(take(chunk, indexes))
            if selection.unrouted:
                self.route_drops[key].add("unroutable", len(selection.unrouted), "no destination took them")

    def flush_aggregators(self, now: float) -> None:
        """Emits the aggregators' finished buckets and routes them."""
        for aggregator in self.state.aggregators:
            out = aggregator.flush(now)
            if len(out):
                self.route_chunk(Chunk(out.paths, out.timestamps, list(out.values)), aggregated=True)

    # -- DestinationOwner: hash_route failover --

    def _slot(self, destination: Destination) -> tuple[HashRoute, int] | None:
        state = self.state
        route = state.table.routes.get(destination.route_key)
        if not isinstance(route, HashRoute):
            return None
        for slot, candidate in enumerate(state.route_destinations.get(destination.route_key, ())):
            if candidate is destination:
                return route, slot
        return None

    def destination_failed(self, destination: Destination) -> bool:
        found = self._slot(destination)
        if found is None:
            return False
        route, slot = found
        if not any(other != slot for other in route.ring.up_slots):
            return False  # the last one stays: its points wait in its spool
        route.mark_destination_down(slot)
        return True

    def destination_back(self, destination: Destination) -> None:
        found = self._slot(destination)
        if found is not None:
            route, slot = found
            route.mark_destination_up(slot)

    def redistribute(self, destination: Destination, chunks: Sequence[Chunk]) -> None:
        state = self.state
        route = state.table.routes.get(destination.route_key)
        if route is None:
            destination.drops.add("unroutable", sum(len(c) for c in chunks), "its route is gone")
            return
        destinations = state.route_destinations[destination.route_key]
        for chunk in chunks:
            selection = route.select(chunk.paths)
            for target, indexes in zip(destinations, selection.per_destination, strict=True):
                if indexes and target is not destination:
                    target.offer(take(chunk, indexes))
            if selection.unrouted:
                destination.drops.add(
                    "unroutable", len(selection.unrouted), "no destination of the ring is up"
                )

    # -- running --

    def _start_writer(self, destination: Destination) -> None:
        assert self._writers is not None
        self._writers.start_soon(self._run_writer, destination, name=destination.name)

    async def _run_writer(self, destination: Destination) -> None:
        # A bug or a disk error in one destination must not take the others down: it restarts alone.
        await supervise(f"{destination.name}: writer", destination.run, logger=log)
        if destination.retired and not destination.finished:
            await destination.finish("removed")
            if self.destinations.get(destination.key) is destination:
                del self.destinations[destination.key]

    async def run(self, inbox: Any, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        if any(destination.finished for destination in self.destinations.values()):
            # A previous run ended (the core restarts a crashed output): start over with fresh destinations.
            self.destinations = {k: d for k, d in self.destinations.items() if not d.finished}
            self.state = self._install(self.state.settings, self._check(self.state.settings))
        try:
            async with trio.open_nursery() as timers:
                async with trio.open_nursery() as writers:
                    self._writers = writers
                    self._running = True
                    for destination in list(self.destinations.values()):
                        self._start_writer(destination)
                    timers.start_soon(self._aggregation_loop)
                    task_status.started()
                    await self._route_loop(inbox)
                    self.flush_aggregators(math.inf)
                    await self._drain()
                    writers.cancel_scope.cancel()
                timers.cancel_scope.cancel()
        finally:
            self._running = False
            self._writers = None
            with trio.CancelScope(shield=True):
                for key, destination in list(self.destinations.items()):
                    if not destination.finished:
                        await destination.finish("removed" if destination.retired else "shutdown")
                    if destination.retired:
                        del self.destinations[key]
                for counter in self.route_drops.values():
                    counter.flush()

    async def _route_loop(self, inbox: Any) -> None:
        while True:
            envelopes = await inbox.receive_batch(self.batch_max_points, self.flush_interval)
            if not envelopes:
                return
            live = [envelope for envelope in envelopes if not envelope.settled]
            try:
                self.route_batches([envelope.batch for envelope in live])
                ok = True
            except Exception:
                # A bug must not stop the relay: these points are reported as not written.
                self.counters.failed += sum(envelope.points for envelope in live)
                log.exception("graphite-out: routing a batch failed; its points are dropped")
                ok = False
            for envelope in live:
                envelope.done(ok)
            # receive_batch does not yield when points are waiting: let the writers and admin ports run.
            await trio.lowlevel.checkpoint()

    async def _drain(self) -> None:
        destinations = list(self.destinations.values())
        for destination in destinations:
            destination.request_drain()
        with trio.move_on_after(self.drain_timeout) as scope:
            for destination in destinations:
                await destination.wait_exited()
        if scope.cancelled_caught:
            left = sum(destination.memory_points for destination in destinations)
            log.warning(
                "graphite-out: %d points not written within %.1fs at shutdown go to the spools",
                left,
                self.drain_timeout,
            )

    async def _aggregation_loop(self) -> None:
        while True:
            await trio.sleep(self.aggregation_tick)
            if self.state.aggregators:
                self.flush_aggregators(self.wall_clock())

    # -- what the admin API shows --

    def stats(self) -> dict[str, Any]:
        counters = self.counters
        return {
            "batches": counters.batches,
            "points_in": counters.points_in,
            "blocked": counters.blocked,
            "unroutable": counters.unroutable,
            "empty_path": counters.empty_path,
            "aggregated": counters.aggregated,
            "failed": counters.failed,
            "routes": {
                key: {"dropped": dict(counter.by_reason)} for key, counter in self.route_drops.items()
            },
            "aggregators": [
                {
                    "index": index,
                    "function": aggregator.config.function,
                    "format": aggregator.config.format,
                    "pending": aggregator.pending,
                    "late_points": aggregator.late_points,
                    "nan_points": aggregator.nan_points,
                }
                for index, aggregator in enumerate(self.state.aggregators)
            ],
            "destinations": [destination.stats() for destination in self.destinations.values()],
        }
