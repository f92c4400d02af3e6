"""The sqlite output: what lands in the tables, read back with the sqlite3 module and shell."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
import trio

from agent.config import convert_section
from agent.model import Batch, Consumer, MetricDef, MetricRegistry, Resource, Series
from agent.pipeline import Pipeline
from agent.plugin import StartContext
from agent.testing import make_batch, make_series, output_element, run_output
from agent_plugins.sqlite.plugin import SqliteConfig, SqliteOutput, SqlitePlugin

T0 = 1_795_313_679_123_456_789


def registry_with(*defs: MetricDef) -> MetricRegistry:
    registry = MetricRegistry()
    for d in defs:
        registry.register(d)
    return registry


def query(path: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def test_points_and_definitions_land_in_their_tables(tmp_path: Path) -> None:
    path = tmp_path / "agent.sqlite3"
    registry = registry_with(
        MetricDef("rapl_power", "W", "float", "power"),
        MetricDef("memory_used", "By", "int", "memory in use"),
        MetricDef("never_measured", "J", "float", "registered, no points"),
    )
    batch = make_batch(
        make_series(
            "rapl_power", [12.5, 13.0], timestamps=[T0, T0 + 1], resource=Resource("cpu_package", "0")
        ),
        make_series(
            "memory_used",
            [2**40],
            timestamps=[T0],
            consumer=Consumer("process", "42"),
            attributes={"name": "python3", "busy": True, "n": 3},
        ),
        make_series("unregistered", [7], timestamps=[T0]),
    )
    counters = await run_output(SqliteOutput(path, registry), [batch])
    assert counters["written"] == 4

    rows = query(
        path,
        "SELECT metric, timestamp_ns, value, typeof(value), resource_kind, resource_id, consumer_kind,"
        " consumer_id, attributes FROM points ORDER BY rowid",
    )
    assert rows == [
        ("rapl_power", T0, 12.5, "real", "cpu_package", "0", "local_machine", "", "{}"),
        ("rapl_power", T0 + 1, 13.0, "real", "cpu_package", "0", "local_machine", "", "{}"),
        ("memory_used", T0, 2**40, "integer", "local_machine", "", "process", "42", rows[2][8]),
        ("unregistered", T0, 7, "integer", "local_machine", "", "local_machine", "", "{}"),
    ]
    assert json.loads(rows[2][8]) == {"name": "python3", "busy": True, "n": 3}
    assert query(path, "SELECT * FROM metrics ORDER BY name") == [
        ("memory_used", "By", "int", "memory in use"),
        ("never_measured", "J", "float", "registered, no points"),
        ("rapl_power", "W", "float", "power"),
    ]
    assert query(path, "SELECT time, unit FROM points_readable WHERE metric = 'rapl_power' LIMIT 1") == [
        ("2026-11-22T02:14:39.123Z", "W")
    ]
    assert query(path, "PRAGMA journal_mode") == [("wal",)]
    assert query(path, "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'points'") == [
        ("points_metric_timestamp",)
    ]


async def test_metrics_registered_later_are_added_when_their_points_arrive(tmp_path: Path) -> None:
    path = tmp_path / "agent.sqlite3"
    registry = MetricRegistry()
    output = SqliteOutput(path, registry, flush_interval=0)
    pipeline = Pipeline([output_element(output, "sqlite")])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        sink = pipeline.sink()
        assert await sink.send_and_wait(make_batch(make_series("late_metric", [1.0])))
        assert query(path, "SELECT count(*) FROM metrics") == [(0,)]
        # A relay client registers its metric while the agent runs.
        registry.register(MetricDef("late_metric", "J", "float", "from a relay client"))
        assert await sink.send_and_wait(make_batch(make_series("late_metric", [2.0])))
        assert query(path, "SELECT * FROM metrics") == [("late_metric", "J", "float", "from a relay client")]
        pipeline.stop()
    assert query(path, "SELECT value FROM points") == [(1.0,), (2.0,)]
    assert output.transactions == 2


async def test_acknowledged_points_are_committed(tmp_path: Path) -> None:
    path = tmp_path / "agent.sqlite3"
    output = SqliteOutput(path, MetricRegistry(), flush_interval=0)
    pipeline = Pipeline([output_element(output, "sqlite")])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        for i in range(3):
            assert await pipeline.sink().send_and_wait(make_batch(make_series("m", [i] * 100)))
            # Another connection sees every acknowledged point at once.
            assert query(path, "SELECT count(*) FROM points") == [((i + 1) * 100,)]
        pipeline.stop()


async def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    path = tmp_path / "agent.sqlite3"
    output = SqliteOutput(path, MetricRegistry())
    await output.open()
    good = make_series("m", [1, 2, 3])
    broken = Series(
        "m", Resource("local_machine"), Consumer("local_machine"), {}, [T0, T0], [1]
    )  # 2 ts, 1 value
    with pytest.raises(ValueError):
        await output.write([Batch([good, broken])])
    assert query(path, "SELECT count(*) FROM points") == [(0,)]
    await output.write([Batch([good])])
    await output.close()
    assert query(path, "SELECT count(*) FROM points") == [(3,)]


async def test_values_sqlite_cannot_hold(tmp_path: Path) -> None:
    path = tmp_path / "agent.sqlite3"
    await run_output(
        SqliteOutput(path, MetricRegistry()), [make_batch(make_series("m", [2**64 - 1, float("nan"), -5]))]
    )
    assert query(path, "SELECT value, typeof(value) FROM points ORDER BY rowid") == [
        (float(2**64 - 1), "real"),  # beyond SQLite's signed 64 bits: stored as a float
        (None, "null"),  # SQLite stores NaN as NULL
        (-5, "integer"),
    ]


async def test_one_name_per_point_and_appending_runs(tmp_path: Path) -> None:
    path = tmp_path / "agent.sqlite3"
    series = Series(
        ["a.b", "c.d"], Resource("local_machine"), Consumer("local_machine"), {}, [T0, T0 + 1], [1, 2]
    )
    await run_output(SqliteOutput(path, MetricRegistry()), [Batch([series])])
    await run_output(SqliteOutput(path, MetricRegistry()), [Batch([series])])
    assert query(path, "SELECT metric, count(*) FROM points GROUP BY metric") == [("a.b", 2), ("c.d", 2)]


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="the sqlite3 shell is not installed")
async def test_queryable_with_the_sqlite3_shell(tmp_path: Path) -> None:
    path = tmp_path / "agent.sqlite3"
    registry = registry_with(MetricDef("cpu_percent", "%", "float", "busy"))
    await run_output(SqliteOutput(path, registry), [make_batch(make_series("cpu_percent", [1.5, 2.5]))])
    proc = subprocess.run(
        ["sqlite3", str(path), "SELECT metric, sum(value), unit FROM points_readable GROUP BY metric"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "cpu_percent|4.0|%\n"


def test_start_fails_clearly_on_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "not-a-db.sqlite3"
    path.write_text("hello, this is text\n" * 100)
    ctx = StartContext("sqlite", MetricRegistry(), tmp_path, None)
    config = convert_section({"path": str(path)}, SqliteConfig, "plugins.sqlite")
    with pytest.raises(OSError, match=rf"cannot use SQLite database {path}: file is not a database"):
        SqlitePlugin().start(ctx, config)
    assert ctx.elements == []


def test_start_adds_the_output(tmp_path: Path) -> None:
    ctx = StartContext("sqlite", MetricRegistry(), tmp_path, None)
    config = convert_section(
        {"path": str(tmp_path / "db" / "x.sqlite3"), "flush_interval": "2s", "synchronous": "normal"},
        SqliteConfig,
        "plugins.sqlite",
    )
    SqlitePlugin().start(ctx, config)
    [element] = ctx.elements
    assert element.kind == "output" and element.obj.flush_interval == 2.0
    assert (tmp_path / "db" / "x.sqlite3").exists()
