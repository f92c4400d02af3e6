"""The synthetic load generator: batch shape, rate under a mock clock, total, acknowledgements."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from agent.config import ConfigError, convert_section
from agent.model import MetricRegistry
from agent.plugin import StartContext
from agent.testing import CollectingOutput, running_pipeline, source_element
from agent_plugins.synthetic.plugin import SyntheticConfig, SyntheticPlugin, SyntheticSource, spread


def make_source(**table: object) -> SyntheticSource:
    return SyntheticSource(convert_section(table, SyntheticConfig, "plugins.synthetic"))


def test_batches_spread_points_over_every_series() -> None:
    source = make_source(series=3, points_per_batch=10, metric_prefix="load")
    batch = source.build_batch(spread(10, 3), 1_000)
    assert [s.metric for s in batch.series] == ["load_0", "load_1", "load_2"]
    assert [len(s) for s in batch.series] == [4, 3, 3]
    assert batch.series[0].timestamps == [1_000, 2_000, 3_000, 4_000]
    assert batch.series[0].values == [0.0, 1.0, 2.0, 3.0]
    # Every batch has lists of its own: a transform that changes one in place changes nothing else.
    again = source.build_batch(spread(10, 3), 1_000)
    again.series[0].values[0] = 99.0
    assert batch.series[0].values[0] == 0.0


async def test_rate_is_kept_per_simulated_second(autojump_clock) -> None:
    source = make_source(series=4, points_per_batch=100, rate=1000)
    out = CollectingOutput()
    async with running_pipeline([source_element(source, "synthetic")], outputs=[out]):
        start = trio.current_time()
        await trio.sleep(5.0)
        at_5s = source.points_sent
        await trio.sleep(5.0)
        at_10s = source.points_sent
    # One batch of 100 at t=0, then one every 0.1 s.
    assert at_5s == 5100
    assert at_10s == 10100
    assert trio.current_time() - start >= 10.0
    assert out.points == source.points_sent
    # Timestamps inside a series are spaced by the per-series rate: 250 points/s -> 4 ms.
    first = out.batches[0].series[0].timestamps
    assert first[1] - first[0] == 4_000_000


async def test_total_points_then_stop_with_everything_acknowledged() -> None:
    source = make_source(series=3, points_per_batch=100, total_points=1050)
    out = CollectingOutput()
    with trio.fail_after(10):
        async with running_pipeline([source_element(source, "synthetic")], outputs=[out]):
            await out.wait_for_points(1050)
            while source.points_acknowledged < 1050:
                await trio.sleep(0.01)
    assert source.points_sent == 1050 and source.batches_sent == 11
    assert [len(s) for s in out.batches[-1].series] == [17, 17, 16]
    assert source.points_failed == 0
    assert out.points == 1050


def test_start_registers_one_metric_per_series(tmp_path: Path) -> None:
    registry = MetricRegistry()
    ctx = StartContext("synthetic", registry, tmp_path, None)
    SyntheticPlugin().start(ctx, SyntheticConfig(series=3, metric_prefix="bench"))
    assert [(d.name, d.unit, d.value_type) for d in registry] == [
        ("bench_0", "1", "float"),
        ("bench_1", "1", "float"),
        ("bench_2", "1", "float"),
    ]
    assert [e.kind for e in ctx.elements] == ["source"]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"series": 0}, "series must be at least 1"),
        ({"series": 20, "points_per_batch": 10}, r"points_per_batch \(10\) must be at least series \(20\)"),
        ({"rate": -1}, "rate must be 0"),
        ({"total_points": -5}, "total_points must be 0"),
        ({"metric_prefix": ""}, "metric_prefix must not be empty"),
    ],
)
def test_bad_config(table: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=f"plugins.synthetic: {message}"):
        convert_section(table, SyntheticConfig, "plugins.synthetic")
