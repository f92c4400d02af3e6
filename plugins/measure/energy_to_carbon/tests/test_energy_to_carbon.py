"""energy-to-carbon: one carbon metric per energy metric, same series keys, energy points kept."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import LOCAL_MACHINE, Batch, Consumer, MetricDef, Series
from agent.config import ConfigError
from agent.testing import start_plugin
from agent_plugins.measure.energy_to_carbon.plugin import CarbonPlugin, grams


@given(st.floats(0, 1e12), st.floats(0, 2000))
def test_one_kwh_is_the_intensity(kwh: float, intensity: float) -> None:
    assert grams(kwh * 3.6e6, intensity) == pytest.approx(kwh * intensity)


def test_energy_series_get_a_carbon_twin() -> None:
    ctx = start_plugin(CarbonPlugin, {"intensity": 360.0, "metrics": ["*_energy"]})
    ctx.registry.register(MetricDef("attributed_energy", "J"))
    ctx.registry.register(MetricDef("cpu_time_delta", "s"))
    ctx.registry.register(MetricDef("other_energy", "W"))
    [transform] = [e.obj for e in ctx.elements]
    process = Consumer("process", "42")
    batch = Batch([
        Series("attributed_energy", LOCAL_MACHINE, process, {"estimated": True}, [1, 2], [3.6e6, 1.8e6]),
        Series("cpu_time_delta", LOCAL_MACHINE, process, {"kind": "user"}, [1], [1.0]),
        Series("other_energy", LOCAL_MACHINE, process, {}, [1], [1.0]),
    ])
    out = transform.apply(batch)
    [carbon] = [s for s in out.series if s.metric.endswith("_carbon")]
    assert carbon.metric == "attributed_energy_carbon" and carbon.consumer == process
    assert carbon.values == [pytest.approx(360.0), pytest.approx(180.0)] and carbon.timestamps == [1, 2]
    assert carbon.attributes == {"estimated": True}
    assert ctx.registry.get("attributed_energy_carbon").unit == "g"
    assert len(out.series) == 4  # the energy points are kept


def test_a_negative_intensity_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="intensity"):
        start_plugin(CarbonPlugin, {"intensity": -1})
