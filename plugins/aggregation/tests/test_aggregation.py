"""aggregation: windows aligned on the interval, each function, stopped series, and the last windows
handed over at shutdown through the real pipeline."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import LOCAL_MACHINE, Batch, Consumer, MetricDef, Series
from agent.config import ConfigError
from agent.testing import CollectingOutput, running_pipeline, start_plugin, transform_element
from agent_plugins.aggregation.plugin import AggregationPlugin

S = 1_000_000_000
P = Consumer("process", "7")


def cpu(ts: list[float], values: list[float], pid: str = "7") -> Series:
    return Series("cpu_time_delta", LOCAL_MACHINE, Consumer("process", pid), {"kind": "user"},
                  [int(t * S) for t in ts], values)


def aggregation(function: str = "sum", **extra):
    ctx = start_plugin(
        AggregationPlugin,
        {"enable": True, "interval": "10s", "function": function, "metrics": ["cpu_*"], **extra},
    )
    ctx.registry.register(MetricDef("cpu_time_delta", "s"))
    [transform] = [e.obj for e in ctx.elements]
    return ctx, transform


@pytest.mark.parametrize(("function", "expected"), [("sum", 6.0), ("mean", 2.0), ("min", 1.0), ("max", 3.0)])
def test_a_window_closes_when_the_next_one_starts(function: str, expected: float) -> None:
    ctx, t = aggregation(function)
    out = t.apply(Batch([cpu([100, 103, 109.9], [1.0, 2.0, 3.0]), Series("other", LOCAL_MACHINE, P, {}, [1], [5])]))
    assert [s.metric for s in out.series] == ["other"]  # inputs replaced, window still open
    out = t.apply(Batch([cpu([110], [4.0])]))
    [agg] = out.series
    assert agg.metric == f"cpu_time_delta_{function}" and agg.timestamps == [100 * S] and agg.values == [expected]
    assert agg.attributes == {"kind": "user"} and ctx.registry.get(agg.metric).unit == "s"


def test_a_stopped_series_is_handed_over_when_time_moves_on() -> None:
    _, t = aggregation()
    t.apply(Batch([cpu([100], [1.0], pid="1"), cpu([100], [1.0], pid="2")]))
    out = t.apply(Batch([cpu([121], [1.0], pid="2")]))
    assert {(s.consumer.id, s.timestamps[0]) for s in out.series} == {("1", 100 * S), ("2", 100 * S)}


@given(st.lists(st.tuples(st.floats(0, 1000), st.floats(-1e6, 1e6)), min_size=1, max_size=50))
def test_the_sum_over_all_windows_is_the_sum_of_the_points(points: list[tuple[float, float]]) -> None:
    _, t = aggregation("sum")
    points.sort()
    series = cpu([p[0] for p in points], [p[1] for p in points])
    out = t.apply(Batch([series])) or Batch()
    held = t.finish() or Batch()
    total = sum(v for s in out.series + held.series for v in s.values)
    assert total == pytest.approx(sum(p[1] for p in points), abs=1e-6)


def test_keep_inputs() -> None:
    _, t = aggregation(keep_inputs=True)
    out = t.apply(Batch([cpu([100], [1.0])]))
    assert [s.metric for s in out.series] == ["cpu_time_delta"]


def test_metrics_are_required_when_enabled() -> None:
    with pytest.raises(ConfigError, match="metrics"):
        start_plugin(AggregationPlugin, {"enable": True})


async def test_the_last_windows_reach_the_outputs_at_shutdown() -> None:
    _, t = aggregation("mean")
    out = CollectingOutput()
    async with running_pipeline([transform_element(t)], [out]) as pipeline:
        await pipeline.sink().send(Batch([cpu([100, 101], [1.0, 3.0])]))
    assert out.values("cpu_time_delta_mean") == [2.0]
