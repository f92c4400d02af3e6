"""The `filter` transform: keeps or drops points by metric name.

Works per series: a series with one metric name is kept or dropped whole, with one cached lookup per
distinct name. Only series that carry one name per point (Graphite paths) are filtered point by point.
"""

from __future__ import annotations

import fnmatch
import re

import msgspec

from agent import Batch, Plugin, PluginConfig, Series, StartContext, Transform, hookimpl


class FilterConfig(PluginConfig, kw_only=True):
    """The `[plugins.filter]` table."""

    include: list[str] = msgspec.field(default_factory=list)
    exclude: list[str] = msgspec.field(default_factory=list)


def _globs_to_regex(globs: list[str]) -> re.Pattern[str] | None:
    if not globs:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))


class MetricFilter(Transform):
    """Keeps a metric if it matches `include` (or `include` is empty) and does not match `exclude`."""

    def __init__(self, include: list[str], exclude: list[str]) -> None:
        self._include = _globs_to_regex(include)
        self._exclude = _globs_to_regex(exclude)
        # Metric names repeat batch after batch: decide once per name (bounded, as Graphite paths are many).
        self._decisions: dict[str, bool] = {}
        self.dropped_points = 0

    def keeps(self, name: str) -> bool:
        decision = self._decisions.get(name)
        if decision is None:
            decision = (self._include is None or self._include.match(name) is not None) and (
                self._exclude is None or self._exclude.match(name) is None
            )
            if len(self._decisions) >= 100_000:
                self._decisions.clear()
            self._decisions[name] = decision
        return decision

    def apply(self, batch: Batch) -> Batch | None:
        kept: list[Series] = []
        for series in batch.series:
            if isinstance(series.metric, str):
                if self.keeps(series.metric):
                    kept.append(series)
                else:
                    self.dropped_points += len(series.timestamps)
                continue
            keep = [i for i, name in enumerate(series.metric) if self.keeps(name)]
            if len(keep) == len(series.metric):
                kept.append(series)
                continue
            self.dropped_points += len(series.metric) - len(keep)
            if keep:
                kept.append(
                    Series(
                        [series.metric[i] for i in keep],
                        series.resource,
                        series.consumer,
                        series.attributes,
                        [series.timestamps[i] for i in keep],
                        [series.values[i] for i in keep],
                    )
                )
        if not kept:
            return None
        batch.series = kept
        return batch


class FilterPlugin(Plugin):
    name = "filter"
    version = "0.1.0"
    agent_api = ">=1,<2"
    description = "Keeps or drops points by metric name (include and exclude globs)."
    Config = FilterConfig
    provides = ("transform",)

    def start(self, ctx: StartContext, config: FilterConfig) -> None:
        ctx.add_transform(MetricFilter(config.include, config.exclude))


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [FilterPlugin]
