"""InfluxDB benchmark: points per second from the pipeline into InfluxDB through the influxdb output.

    INFLUXDB_URL=http://127.0.0.1:8086 python benchmarks/influxdb.py [--points 1000000] [--series 100]
        [--batch 5000]

The server must have a database `agent`. The output runs as the agent runs it (pipeline queue, line
protocol encoding, gzip, one request per `batch_max_points`, acknowledgements once InfluxDB answered).
The baseline, in the same run against the same server, POSTs the same line protocol, encoded and
gzipped beforehand, in requests of the same size with one httpx client: the ceiling. Each run writes
its own measurements (a random prefix), dropped at the end. Last line: JSON with the figures.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import trio

from agent import Batch, MetricRegistry, Series
from agent.model import Consumer, Resource
from agent.testing import running_pipeline, start_plugin
from agent_plugins.influxdb.line_protocol import encode
from agent_plugins.influxdb.plugin import InfluxdbPlugin

URL = os.environ.get("INFLUXDB_URL", "http://127.0.0.1:8086")
T0 = 1_780_000_000_000_000_000


def make_batches(prefix: str, points: int, series: int, per_batch: int) -> list[Batch]:
    per_series = max(1, per_batch // series)
    batches = []
    t = T0
    made = 0
    while made < points:
        batch = []
        for s in range(series):
            batch.append(
                Series(
                    f"{prefix}_metric_{s % 10}",
                    Resource("cpu_core", str(s)),
                    Consumer("local_machine"),
                    {"node": "node-1"},
                    [t + i * 1_000_000 for i in range(per_series)],
                    [float(i) for i in range(per_series)],
                )
            )
        t += per_series * 1_000_000
        made += per_series * series
        batches.append(Batch(batch))
    return batches


async def baseline(batches: list[Batch]) -> float:
    bodies = [gzip.compress(encode([b], lambda _: None).body, 1) for b in batches]
    points = sum(len(b) for b in batches)
    headers = {"Content-Encoding": "gzip", "Content-Type": "text/plain; charset=utf-8"}
    async with httpx.AsyncClient(base_url=URL, timeout=30) as client:
        start = time.perf_counter()
        for body in bodies:
            response = await client.post("/write", params={"db": "agent", "precision": "ns"}, headers=headers, content=body)
            assert response.status_code == 204, response.text
        return points / (time.perf_counter() - start)


async def through_output(batches: list[Batch], per_batch: int, data_dir: Path) -> float:
    ctx = start_plugin(
        InfluxdbPlugin,
        {"enable": True, "url": URL, "flush_interval": "0s", "batch_max_points": per_batch},
        data_dir=data_dir,
        registry=MetricRegistry(),
    )
    [output] = [e.obj for e in ctx.elements if e.kind == "output"]
    points = sum(len(b) for b in batches)
    done = trio.Event()
    acked = 0

    def on_done(ok: bool) -> None:
        nonlocal acked
        assert ok
        acked += 1
        if acked == len(batches):
            done.set()

    async with running_pipeline(ctx.elements) as pipeline:
        start = time.perf_counter()
        for batch in batches:
            await pipeline.sink().send(batch, on_done)
        await done.wait()
        elapsed = time.perf_counter() - start
    assert output.points_written == points and output.rejected_points == 0
    return points / elapsed


async def drop(prefix: str) -> None:
    async with httpx.AsyncClient(base_url=URL, timeout=30) as client:
        for i in range(10):
            await client.post("/query", params={"db": "agent", "q": f'DROP MEASUREMENT "{prefix}_metric_{i}"'})


async def run(args: argparse.Namespace) -> tuple[float, float]:
    # Two prefixes: the baseline must not overwrite the output's points (same series, same times).
    out_prefix, base_prefix = f"bench_{uuid.uuid4().hex[:6]}", f"bench_{uuid.uuid4().hex[:6]}"
    try:
        with tempfile.TemporaryDirectory() as data_dir:
            rate = await through_output(make_batches(out_prefix, args.points, args.series, args.batch), args.batch, Path(data_dir))
        raw = await baseline(make_batches(base_prefix, args.points, args.series, args.batch))
    finally:
        await drop(out_prefix)
        await drop(base_prefix)
    return rate, raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--series", type=int, default=100)
    parser.add_argument("--batch", type=int, default=5000, help="points per batch and per request")
    args = parser.parse_args()
    rate, raw = trio.run(run, args)
    print(f"{args.points} points in batches (and requests) of {args.batch}, {args.series} series each")
    print(f"influxdb output     : {rate:,.0f} points/s")
    print(f"POST of the same LP : {raw:,.0f} points/s (baseline, encoded and gzipped beforehand)")
    print(f"ratio               : {rate / raw:.2f}")
    print(json.dumps({"points_per_s": round(rate), "baseline_points_per_s": round(raw), "ratio": round(rate / raw, 3)}))


if __name__ == "__main__":
    main()
