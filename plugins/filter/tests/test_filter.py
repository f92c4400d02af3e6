"""The filter transform keeps and drops what its globs say, per series and per Graphite path."""

from __future__ import annotations

from agent.model import LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, Series
from agent.testing import CollectingOutput, make_batch, make_series, running_pipeline, transform_element
from agent_plugins.filter.plugin import MetricFilter


def test_include_then_exclude() -> None:
    f = MetricFilter(include=["cpu_*", "memory_*"], exclude=["cpu_time*"])
    batch = make_batch(
        make_series("cpu_percent", [1, 2]),
        make_series("cpu_time_seconds_total", [3]),
        make_series("memory_used_bytes", [4]),
        make_series("disk_read_bytes_total", [5]),
    )
    result = f.apply(batch)
    assert result is not None
    assert [s.metric for s in result.series] == ["cpu_percent", "memory_used_bytes"]
    assert f.dropped_points == 2


def test_everything_dropped_gives_none() -> None:
    f = MetricFilter(include=[], exclude=["*"])
    assert f.apply(make_batch(make_series("a", [1]))) is None


def test_graphite_paths_are_filtered_point_by_point() -> None:
    f = MetricFilter(include=["servers.*"], exclude=["*.debug.*"])
    series = Series(
        ["servers.a.cpu", "other.x", "servers.b.debug.y", "servers.c.mem"],
        LOCAL_MACHINE,
        LOCAL_MACHINE_CONSUMER,
        {},
        [1, 2, 3, 4],
        [1.0, 2.0, 3.0, 4.0],
    )
    result = f.apply(make_batch(series))
    assert result is not None
    (kept,) = result.series
    assert kept.metric == ["servers.a.cpu", "servers.c.mem"]
    assert kept.timestamps == [1, 4] and kept.values == [1.0, 4.0]


async def test_in_a_pipeline() -> None:
    out = CollectingOutput()
    async with running_pipeline([transform_element(MetricFilter(["keep*"], []))], [out]) as pipeline:
        await pipeline.sink().send(make_batch(make_series("keep_me", [1]), make_series("drop_me", [2])))
    assert out.values() == [1]
