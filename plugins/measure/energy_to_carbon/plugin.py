"""The `energy-to-carbon` transform: grams of CO2-equivalent from energy points, with a configured carbon
intensity of electricity (gCO2eq/kWh).

For each series of an energy metric (unit `J`, chosen by `metrics`), it adds a series named
`<metric>_carbon` (unit `g`), same resource, consumer, attributes and timestamps, with
`joules / 3.6e6 * intensity`. Each energy metric gets its own carbon metric, so the carbon of the
machine (`estimated_energy_carbon`) and of its consumers (`attributed_energy_carbon`) are never summed
together by mistake (Alumet puts both in one `carbon_emission` metric). The energy points are kept.
"""

from __future__ import annotations

import fnmatch

import msgspec

from agent import (
    Batch,
    MetricDef,
    MetricRegistry,
    Plugin,
    PluginConfig,
    Series,
    StartContext,
    Transform,
    hookimpl,
)

JOULES_PER_KWH = 3.6e6


class CarbonConfig(PluginConfig, kw_only=True):
    """The `[plugins.energy-to-carbon]` table."""

    intensity: float = 475.0
    metrics: list[str] = msgspec.field(default_factory=lambda: ["*"])

    def __post_init__(self) -> None:
        if not self.intensity >= 0:
            raise ValueError(f"intensity: must be a number of gCO2eq/kWh, 0 or more, got {self.intensity}")


def grams(joules: float, intensity: float) -> float:
    """CO2-equivalent grams of `joules` of electricity at `intensity` gCO2eq/kWh."""
    return joules / JOULES_PER_KWH * intensity


class EnergyToCarbon(Transform):
    def __init__(self, intensity: float, metrics: list[str], registry: MetricRegistry) -> None:
        self.intensity = intensity
        self.patterns = metrics
        self.registry = registry
        # metric name -> the carbon metric's name, or None when it is not an energy metric to convert.
        self._decisions: dict[str, str | None] = {}

    def _carbon_name(self, metric: str) -> str | None:
        if metric in self._decisions:
            return self._decisions[metric]
        definition = self.registry.get(metric)
        name = None
        if (
            definition is not None
            and definition.unit == "J"
            and not metric.endswith("_carbon")
            and any(fnmatch.fnmatchcase(metric, p) for p in self.patterns)
        ):
            name = f"{metric}_carbon"
            # Registered when first seen: the energy metrics come from plugins started in any order.
            self.registry.register(
                MetricDef(name, "g", "float", f"CO2-equivalent of {metric} at the configured carbon intensity")
            )
        self._decisions[metric] = name
        return name

    def apply(self, batch: Batch) -> Batch | None:
        added = []
        for series in batch.series:
            if not isinstance(series.metric, str):
                continue
            name = self._carbon_name(series.metric)
            if name is None:
                continue
            added.append(
                Series(
                    name,
                    series.resource,
                    series.consumer,
                    series.attributes,
                    list(series.timestamps),
                    [grams(v, self.intensity) for v in series.values],
                )
            )
        batch.series.extend(added)
        return batch


class CarbonPlugin(Plugin):
    name = "energy-to-carbon"
    version = "0.1.0"
    agent_api = ">=1,<2"
    description = "Grams of CO2-equivalent from energy points, at a configured carbon intensity."
    Config = CarbonConfig
    provides = ("transform",)

    def start(self, ctx: StartContext, config: CarbonConfig) -> None:
        ctx.add_transform(EnergyToCarbon(float(config.intensity), list(config.metrics), ctx.registry))


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [CarbonPlugin]
