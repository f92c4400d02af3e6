"""The `synthetic` source: a load generator. It pushes batches of made-up points into the pipeline,
at a given rate or as fast as the pipeline takes them, for benchmarks and demos.

Building a batch costs no per-point Python: values are copied from a list made once, timestamps come
from `range`. Each batch holds every series (metrics `PREFIX_0`, `PREFIX_1`...), with the batch's
points spread evenly over them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio

from agent import (
    LOCAL_MACHINE,
    LOCAL_MACHINE_CONSUMER,
    AutonomousSource,
    Batch,
    Plugin,
    PluginConfig,
    Series,
    SourceSink,
    StartContext,
    hookimpl,
    now_ns,
)

log = logging.getLogger(__name__)

#: Behind schedule by more than this, the generator starts counting again from now instead of bursting
#: to catch up.
MAX_LAG_SECONDS = 1.0


class SyntheticConfig(PluginConfig, kw_only=True):
    """The `[plugins.synthetic]` table."""

    series: int = 10
    points_per_batch: int = 1000
    rate: float = 0.0
    total_points: int = 0
    metric_prefix: str = "synthetic"

    def __post_init__(self) -> None:
        if self.series < 1:
            raise ValueError(f"series must be at least 1, got {self.series}")
        if self.points_per_batch < self.series:
            raise ValueError(
                f"points_per_batch ({self.points_per_batch}) must be at least series ({self.series}):"
                " every batch holds a point of every series"
            )
        if self.rate < 0:
            raise ValueError(f"rate must be 0 (as fast as possible) or positive, got {self.rate}")
        if self.total_points < 0:
            raise ValueError(f"total_points must be 0 (unlimited) or positive, got {self.total_points}")
        if not self.metric_prefix:
            raise ValueError("metric_prefix must not be empty")


def spread(points: int, series: int) -> list[int]:
    """`points` split over `series` as evenly as possible, the first ones taking the remainder."""
    base, extra = divmod(points, series)
    return [base + 1 if i < extra else base for i in range(series)]


class SyntheticSource(AutonomousSource):
    """Generates batches until `total_points` are sent (or forever). Counts what it sent and what the
    outputs acknowledged."""

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        self.metric_names = [f"{config.metric_prefix}_{i}" for i in range(config.series)]
        self._counts = spread(config.points_per_batch, config.series)
        # Values cycle through 0.0 .. 999.0; one template, sliced per series.
        self._values = [float(j % 1000) for j in range(max(self._counts))]
        # Within a batch, one series' points are 1/rate_per_series apart (1 µs when unpaced).
        per_series_rate = config.rate / config.series if config.rate > 0 else 0.0
        self._step_ns = max(1, round(1e9 / per_series_rate)) if per_series_rate > 0 else 1_000
        self.points_sent = 0
        self.batches_sent = 0
        self.points_acknowledged = 0
        self.points_failed = 0

    def build_batch(self, counts: list[int], start_ns: int) -> Batch:
        values, step = self._values, self._step_ns
        return Batch(
            [
                Series(
                    name,
                    LOCAL_MACHINE,
                    LOCAL_MACHINE_CONSUMER,
                    {},
                    list(range(start_ns, start_ns + n * step, step)),
                    values[:n],
                )
                for name, n in zip(self.metric_names, counts, strict=True)
                if n
            ]
        )

    def _acknowledge(self, points: int) -> Any:
        def done(ok: bool) -> None:
            if ok:
                self.points_acknowledged += points
            else:
                self.points_failed += points

        return done

    async def run(
        self, sink: SourceSink, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        config = self.config
        task_status.started()
        started = time.perf_counter()
        deadline = trio.current_time()
        per_batch = config.points_per_batch
        while config.total_points == 0 or self.points_sent < config.total_points:
            remaining = config.total_points - self.points_sent if config.total_points else per_batch
            counts = self._counts if remaining >= per_batch else spread(remaining, config.series)
            points = min(remaining, per_batch)
            await sink.send(self.build_batch(counts, now_ns()), self._acknowledge(points))
            self.points_sent += points
            self.batches_sent += 1
            if config.rate > 0:
                deadline += points / config.rate
                now = trio.current_time()
                if now - deadline > MAX_LAG_SECONDS:
                    deadline = now
                await trio.sleep_until(deadline)
        elapsed = time.perf_counter() - started
        log.info(
            "synthetic: sent %d points in %d batches in %.2fs (%.0f points/s)",
            self.points_sent,
            self.batches_sent,
            elapsed,
            self.points_sent / elapsed if elapsed > 0 else 0.0,
        )


class SyntheticPlugin(Plugin):
    name = "synthetic"
    version = "0.1.0"
    agent_api = ">=1,<2"
    description = "A load generator: batches of made-up points, at a rate or as fast as possible."
    Config = SyntheticConfig
    enabled_by_default = False
    provides = ("source",)

    def start(self, ctx: StartContext, config: SyntheticConfig) -> None:
        source = SyntheticSource(config)
        for name in source.metric_names:
            ctx.create_metric(name, "1", "float", "a made-up value from the synthetic load generator")
        ctx.add_source(source)


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [SyntheticPlugin]
