"""The `aggregation` transform: the mean, sum, min or max of each series over tumbling time windows.

Windows are aligned on multiples of `interval` since the epoch, per series (metric, resource, consumer,
attributes). A window is handed over as one point of `<metric>_<function>` (same unit), stamped with the
window's start, when a point of a later window arrives for its series, when the newest point seen in
any batch is a whole interval past its end (a series that stopped still gets its last window), and at
shutdown (`finish`: Alumet's transform drops the last window). The chosen metrics' own points are
removed unless `keep_inputs`.
"""

from __future__ import annotations

import fnmatch
from typing import Literal

import msgspec

from agent import (
    Batch,
    MetricDef,
    MetricRegistry,
    Plugin,
    PluginConfig,
    PositiveDuration,
    Series,
    StartContext,
    Transform,
    hookimpl,
)

Function = Literal["mean", "sum", "min", "max"]
NS = 1_000_000_000


class AggregationConfig(PluginConfig, kw_only=True):
    """The `[plugins.aggregation]` table."""

    interval: PositiveDuration = PositiveDuration(60.0)
    function: Function = "mean"
    metrics: list[str] = msgspec.field(default_factory=list)
    keep_inputs: bool = False

    def __post_init__(self) -> None:
        if self.enable and not self.metrics:
            raise ValueError("metrics: name at least one metric (glob patterns) to aggregate")


class _Window(msgspec.Struct):
    start: int
    count: int = 0
    total: float = 0.0
    low: float = float("inf")
    high: float = float("-inf")

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.low = min(self.low, value)
        self.high = max(self.high, value)

    def result(self, function: Function) -> float:
        if function == "sum":
            return self.total
        if function == "mean":
            return self.total / self.count
        return self.low if function == "min" else self.high


Key = tuple[str, object, object, tuple[tuple[str, object], ...]]


class Aggregation(Transform):
    def __init__(
        self, interval: float, function: Function, metrics: list[str], keep_inputs: bool, registry: MetricRegistry
    ) -> None:
        self.interval_ns = max(1, int(interval * NS))
        self.function = function
        self.patterns = metrics
        self.keep_inputs = keep_inputs
        self.registry = registry
        self._chosen: dict[str, str | None] = {}
        self._windows: dict[Key, _Window] = {}
        self._attributes: dict[Key, dict] = {}
        self._newest = 0

    def _output_name(self, metric: str) -> str | None:
        if metric not in self._chosen:
            name = None
            if any(fnmatch.fnmatchcase(metric, p) for p in self.patterns):
                name = f"{metric}_{self.function}"
                source = self.registry.get(metric)
                self.registry.register(
                    MetricDef(name, source.unit if source else "1", "float", f"{self.function} of {metric} per window")
                )
            self._chosen[metric] = name
        return self._chosen[metric]

    def _close(self, key: Key, window: _Window, out: list[Series]) -> None:
        name = self._output_name(key[0])
        assert name is not None
        out.append(Series(name, key[1], key[2], self._attributes[key], [window.start], [window.result(self.function)]))  # type: ignore[arg-type]

    def apply(self, batch: Batch) -> Batch | None:
        kept: list[Series] = []
        closed: list[Series] = []
        for series in batch.series:
            if not isinstance(series.metric, str) or self._output_name(series.metric) is None:
                kept.append(series)
                continue
            if self.keep_inputs:
                kept.append(series)
            key: Key = (series.metric, series.resource, series.consumer, tuple(sorted(series.attributes.items())))
            self._attributes.setdefault(key, series.attributes)
            for t, v in zip(series.timestamps, series.values, strict=True):
                start = t - t % self.interval_ns
                window = self._windows.get(key)
                if window is not None and window.start != start:
                    if start < window.start:
                        continue  # late for a window already handed over
                    self._close(key, window, closed)
                    window = None
                if window is None:
                    window = self._windows[key] = _Window(start)
                window.add(float(v))
                self._newest = max(self._newest, t)
        for key, window in list(self._windows.items()):
            # A series that stopped: its window is over once the newest point is an interval past it.
            if window.start + 2 * self.interval_ns <= self._newest:
                self._close(key, window, closed)
                del self._windows[key]
        batch.series = kept + closed
        return batch if batch.series else None

    def finish(self) -> Batch | None:
        closed: list[Series] = []
        for key, window in self._windows.items():
            self._close(key, window, closed)
        self._windows.clear()
        return Batch(closed) if closed else None


class AggregationPlugin(Plugin):
    name = "aggregation"
    version = "0.1.0"
    agent_api = ">=1,<2"
    description = "Mean, sum, min or max of chosen metrics over tumbling windows."
    Config = AggregationConfig
    provides = ("transform",)

    def start(self, ctx: StartContext, config: AggregationConfig) -> None:
        ctx.add_transform(
            Aggregation(float(config.interval), config.function, list(config.metrics), config.keep_inputs, ctx.registry)
        )


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [AggregationPlugin]
