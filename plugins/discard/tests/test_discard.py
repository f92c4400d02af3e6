"""The discard output: counts what it is given, writes nothing, acknowledges everything."""

from __future__ import annotations

from pathlib import Path

import trio

from agent.config import convert_section
from agent.model import MetricRegistry
from agent.pipeline import Pipeline
from agent.plugin import StartContext
from agent.testing import make_batch, make_series, output_element, run_output
from agent_plugins.discard.plugin import DiscardConfig, DiscardOutput, DiscardPlugin
from agent_plugins.synthetic.plugin import SyntheticConfig, SyntheticSource


async def test_counts_points_series_and_batches() -> None:
    output = DiscardOutput()
    batches = [
        make_batch(make_series("a", [1, 2, 3]), make_series("b", [4])),
        make_batch(make_series("c", [5.0])),
    ]
    counters = await run_output(output, batches)
    assert counters == {"received": 5, "written": 5, "dropped": 0, "queued": 0}
    assert (output.points, output.series, output.batches) == (5, 3, 2)


async def test_gathers_for_its_flush_interval(autojump_clock) -> None:
    output = DiscardOutput(flush_interval=2.0)
    pipeline = Pipeline([output_element(output, "discard")])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        for _ in range(4):
            await pipeline.sink().send(make_batch(make_series("a", [1])))
            await trio.sleep(0.1)
        await trio.sleep(3)
        assert (output.writes, output.batches, output.points) == (1, 4, 4)
        pipeline.stop()


async def test_synthetic_into_discard_acknowledges_every_point() -> None:
    source = SyntheticSource(SyntheticConfig(series=10, points_per_batch=10_000, total_points=200_000))
    output = DiscardOutput()
    pipeline = Pipeline([output_element(output, "discard")])
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(pipeline.run)
            await source.run(pipeline.sink())
            while source.points_acknowledged < 200_000:
                await trio.sleep(0.01)
            pipeline.stop()
    assert output.points == 200_000 and source.points_failed == 0


def test_start_adds_an_output(tmp_path: Path) -> None:
    ctx = StartContext("discard", MetricRegistry(), tmp_path, None)
    DiscardPlugin().start(ctx, convert_section({"queue_max_points": 10}, DiscardConfig, "plugins.discard"))
    [element] = ctx.elements
    assert element.kind == "output" and element.config.queue_max_points == 10
