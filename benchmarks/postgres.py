"""PostgreSQL benchmark: points per second from the pipeline into PostgreSQL through the postgres output.

    POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/test python benchmarks/postgres.py [--points 1000000]
        [--series 100] [--batch 10000] [--buffer disk|memory]

The output runs as the agent runs it (pipeline queue, buffer on disk by default, identities recorded,
one transaction per write, acknowledgements once committed). The baseline, measured in the same run on
the same server, is psycopg's own binary `COPY` of the same rows, built beforehand, into a plain
table of the same columns: the ceiling that the output's per-point work (and its bookkeeping) is
measured against. The goal is at least half of it. Both write into a schema of their own, dropped at
the end. Last line: JSON with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import trio

from agent import Batch, BatchIdentity, MetricRegistry, Series
from agent.model import Consumer, Resource
from agent.testing import running_pipeline, start_plugin
from agent_plugins.postgres.plugin import PostgresPlugin
from agent_plugins.postgres.store import COPY_TYPES, PG_EPOCH_US, attributes_json

URL = os.environ.get("POSTGRES_URL", "postgresql://127.0.0.1:5432/test")
T0 = 1_780_000_000_000_000_000


def make_batches(points: int, series: int, batch_points: int) -> list[Batch]:
    per_series = max(1, batch_points // series)
    batches = []
    seq = 0
    t = T0
    while seq * per_series * series < points:
        seq += 1
        batch = []
        for s in range(series):
            timestamps = [t + i * 1_000_000 for i in range(per_series)]
            batch.append(
                Series(
                    f"metric_{s % 10}",
                    Resource("cpu_core", str(s)),
                    Consumer("local_machine"),
                    {"node": "node-1", "core": s},
                    timestamps,
                    [float(i) for i in range(per_series)],
                )
            )
        t += per_series * 1_000_000
        batches.append(Batch(batch, BatchIdentity("bench", "s", seq)))
    return batches


def baseline(batches: list[Batch], schema: str) -> float:
    """Points/s of psycopg's binary COPY of the same rows, prepared beforehand, into a table with the
    same columns and index, in transactions as large as the output's writes (100 000 points)."""
    rows = [
        (t // 1000 - PG_EPOCH_US, s % 10 + 1, v, "cpu_core", s_.resource.id, "local_machine", "", attributes_json(s_.attributes))
        for b in batches
        for s, s_ in enumerate(b.series)
        for t, v in zip(s_.timestamps, s_.values, strict=True)
    ]
    rows_per_batch = [rows[i : i + 100_000] for i in range(0, len(rows), 100_000)]
    points = sum(len(r) for r in rows_per_batch)
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(
            f'CREATE TABLE "{schema}".copy_baseline (time timestamptz, metric_id integer, value double precision,'
            " resource_kind text, resource_id text, consumer_kind text, consumer_id text, attributes jsonb)"
        )
        conn.execute(f'CREATE INDEX ON "{schema}".copy_baseline (metric_id, time)')
        start = time.perf_counter()
        for rows in rows_per_batch:
            with conn.transaction(), conn.cursor().copy(
                f'COPY "{schema}".copy_baseline FROM STDIN (FORMAT BINARY)'
            ) as copy:
                copy.set_types(COPY_TYPES)
                for row in rows:
                    copy.write_row(row)
        elapsed = time.perf_counter() - start
    return points / elapsed


async def through_output(batches: list[Batch], schema: str, buffer: str, data_dir: Path) -> float:
    ctx = start_plugin(
        PostgresPlugin,
        {"enable": True, "url": URL, "schema": schema, "flush_interval": "0s", "buffer": buffer},
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
        sink = pipeline.sink()
        start = time.perf_counter()
        for batch in batches:
            await sink.send(batch, on_done)
        await done.wait()
        elapsed = time.perf_counter() - start
    assert output.points_written == points, (output.points_written, points)
    return points / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--series", type=int, default=100)
    parser.add_argument("--batch", type=int, default=10_000, help="points per batch")
    parser.add_argument("--buffer", choices=("disk", "memory"), default="disk")
    args = parser.parse_args()
    schema = f"agent_bench_{uuid.uuid4().hex[:8]}"
    batches = make_batches(args.points, args.series, args.batch)
    points = sum(len(b) for b in batches)
    try:
        with tempfile.TemporaryDirectory() as data_dir:
            rate = trio.run(through_output, batches, schema, args.buffer, Path(data_dir))
        raw = baseline(batches, schema)
    finally:
        with psycopg.connect(URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    print(f"{points} points in {len(batches)} batches of {args.batch}, {args.series} series each, buffer={args.buffer}")
    print(f"postgres output: {rate:,.0f} points/s")
    print(f"psycopg COPY   : {raw:,.0f} points/s (baseline, the same rows prepared beforehand)")
    print(f"ratio          : {rate / raw:.2f}")
    print(json.dumps({"points_per_s": round(rate), "baseline_points_per_s": round(raw), "ratio": round(rate / raw, 3)}))


if __name__ == "__main__":
    main()
