"""Pipeline benchmark: synthetic source -> filter transform -> discard output, in one agent.

    python benchmarks/pipeline.py [--points 20000000] [--series 10] [--batch 1000]

Prints the points per second through the real pipeline (the plugins as the agent starts them, with
acknowledgements on), beside a baseline measured in the same run: the same batches passed through a
bare trio memory channel to a task that counts them. The ratio says what the pipeline's queues,
dispatch, transform and acks cost over moving batches at all. Last line: JSON with the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import trio

from agent.config import AgentConfig, AgentSection
from agent.manager import build_plugin_manager, collect_plugins
from agent.runtime import Agent
from agent.units import Duration
from agent_plugins.synthetic.plugin import SyntheticConfig, SyntheticSource


async def baseline(points: int, series: int, batch_points: int) -> float:
    """Points/s of the same batches through one bounded trio channel, counted at the other end."""
    source = SyntheticSource(SyntheticConfig(series=series, points_per_batch=batch_points))
    counts = [batch_points // series] * series
    send, receive = trio.open_memory_channel(64)
    received = 0

    async def consume() -> None:
        nonlocal received
        async with receive:
            async for batch in receive:
                received += len(batch)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        async with send:
            sent = 0
            while sent < points:
                batch = source.build_batch(counts, time.time_ns())
                await send.send(batch)
                sent += batch_points
    return received / (time.perf_counter() - start)


def pipeline_rate(points: int, series: int, batch_points: int) -> tuple[float, int]:
    pm = build_plugin_manager()
    plugins = collect_plugins(pm)
    cfg = AgentConfig(
        agent=AgentSection(self_metrics_interval=Duration(0)),
        path=Path("/tmp/agent-bench.toml"),
        plugins={
            "synthetic": plugins["synthetic"].cls.Config(
                enable=True, series=series, points_per_batch=batch_points, total_points=points
            ),
            "filter": plugins["filter"].cls.Config(enable=True, include=["synthetic_*"]),
            "discard": plugins["discard"].cls.Config(enable=True),
        },
    )
    agent = Agent(cfg, plugins, pm)
    pipeline = agent.start_plugins()
    discard = next(e.obj for e in agent.elements if e.kind == "output")

    async def main() -> float:
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: agent.run(handle_signals=False, task_status=task_status))
            while discard.points < points:
                await trio.sleep(0.005)
            elapsed = time.perf_counter() - start
            pipeline.stop()
        return discard.points / elapsed

    rate = trio.run(main)
    return rate, pipeline.counters()["discard"]["dropped"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=20_000_000)
    parser.add_argument("--series", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1000, help="points per batch")
    args = parser.parse_args()

    raw = trio.run(baseline, args.points, args.series, args.batch)
    rate, dropped = pipeline_rate(args.points, args.series, args.batch)
    print(f"batches of {args.batch} points over {args.series} series, {args.points:,} points")
    print(f"baseline (bare trio channel):             {raw / 1e6:8.2f} M points/s")
    print(f"pipeline (synthetic -> filter -> discard): {rate / 1e6:8.2f} M points/s")
    print(f"ratio pipeline/baseline: {rate / raw:.2f}   dropped: {dropped}")
    print(json.dumps({"points_per_s": round(rate), "baseline_points_per_s": round(raw), "ratio": round(rate / raw, 3)}))


if __name__ == "__main__":
    main()
