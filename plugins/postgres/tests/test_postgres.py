"""The postgres output against the real PostgreSQL (POSTGRES_URL, default 127.0.0.1:5432 database test).

Each test works in a schema of its own, dropped afterwards. The outage tests put a TCP proxy between
the agent and the server that cuts every connection and refuses new ones for a while.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import trio

from agent import Batch, BatchIdentity, MetricRegistry, StartupError
from agent.testing import CuttingProxy, make_series, require_service, running_pipeline, start_plugin
from agent_plugins.postgres.plugin import PostgresPlugin

URL = os.environ.get("POSTGRES_URL", "postgresql://127.0.0.1:5432/test")
T0 = 1_780_000_000_000_000_000  # 2026-05-28T20:26:40Z
DAY_NS = 86_400 * 10**9


@pytest.fixture
def schema() -> Iterator[str]:
    parts = urlsplit(URL)
    require_service("PostgreSQL", parts.hostname or "127.0.0.1", parts.port or 5432)
    name = f"agent_test_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def query(sql: str, *params: object) -> list[tuple]:
    with psycopg.connect(URL, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


def start(schema: str, tmp_path, url: str = URL, registry: MetricRegistry | None = None, **table):
    ctx = start_plugin(
        PostgresPlugin,
        {"enable": True, "url": url, "schema": schema, "flush_interval": "0s", **table},
        data_dir=tmp_path,
        registry=registry,
    )
    [output] = [e.obj for e in ctx.elements if e.kind == "output"]
    return ctx, output


def batch(values: list[float], *, identity: BatchIdentity | None = None, start: int = T0, **kwargs) -> Batch:
    series = make_series(
        kwargs.pop("metric", "cpu_percent"),
        values,
        timestamps=[start + i * 10**9 for i in range(len(values))],
        **kwargs,
    )
    return Batch([series], identity)


async def test_points_are_readable_with_their_metric_unit_and_attributes(schema, tmp_path) -> None:
    registry = MetricRegistry()
    registry.register(__import__("agent").MetricDef("cpu_percent", "%", "float", "CPU use"))
    ctx, output = start(schema, tmp_path, registry=registry)
    async with running_pipeline(ctx.elements) as pipeline:
        sink = pipeline.sink()
        assert await sink.send_and_wait(batch([12.5, 13.0], attributes={"core": 3, "node": "n1"}))
        assert await sink.send_and_wait(batch([2**40], metric="bytes_total", start=T0 + 5 * 10**9))
    rows = query(
        f'SELECT to_char(time AT TIME ZONE \'UTC\', \'YYYY-MM-DD"T"HH24:MI:SS\'), metric, value, unit,'
        f' resource_kind, resource_id, consumer_kind, consumer_id, attributes FROM "{schema}".points_readable'
        " ORDER BY time, metric"
    )
    assert rows == [
        ("2026-05-28T20:26:40", "cpu_percent", 12.5, "%", "local_machine", "", "local_machine", "", {"core": 3, "node": "n1"}),
        ("2026-05-28T20:26:41", "cpu_percent", 13.0, "%", "local_machine", "", "local_machine", "", {"core": 3, "node": "n1"}),
        ("2026-05-28T20:26:45", "bytes_total", float(2**40), None, "local_machine", "", "local_machine", "", {}),
    ]
    [(value_type,)] = query(
        "SELECT data_type FROM information_schema.columns WHERE table_schema = %s"
        " AND table_name = 'points_readable' AND column_name = 'value'",
        schema,
    )
    assert value_type == "double precision"
    assert output.points_written == 3


async def test_points_go_to_one_partition_per_day_and_retention_drops_the_old_ones(schema, tmp_path) -> None:
    now = trio.current_time  # noqa: F841 (wall clock below: retention compares with now())
    today = (__import__("time").time_ns() // DAY_NS) * DAY_NS
    ctx, output = start(schema, tmp_path, retention="2d")
    async with running_pipeline(ctx.elements) as pipeline:
        for days_ago in (5, 1, 0):
            assert await pipeline.sink().send_and_wait(batch([1.0, 2.0], start=today - days_ago * DAY_NS + 3600 * 10**9))
    partitions = [row[0] for row in query(f'SELECT name FROM "{schema}".partitions ORDER BY name')]
    assert len(partitions) == 2  # the one 5 days ago was dropped by retention on the next write
    assert query(f'SELECT count(*) FROM "{schema}".points')[0][0] == 4
    [(strategy,)] = query(
        "SELECT p.partstrat FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = 'points'",
        schema,
    )
    assert strategy == "r"
    children = query(
        "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhparent"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = 'points'",
        schema,
    )
    assert children == [(2,)]


async def test_a_batch_sent_again_with_the_same_identity_is_stored_once(schema, tmp_path) -> None:
    identity = BatchIdentity("node-1", "stream-a", 1)
    for run in range(2):  # two runs of the agent: the second gets the batch again (a lost ack)
        ctx, output = start(schema, tmp_path / str(run))
        async with running_pipeline(ctx.elements) as pipeline:
            assert await pipeline.sink().send_and_wait(batch([1.0, 2.0, 3.0], identity=identity))
            assert await pipeline.sink().send_and_wait(batch([1.0, 2.0, 3.0], identity=identity))
    assert query(f'SELECT count(*) FROM "{schema}".points')[0][0] == 3
    assert query(f'SELECT origin, stream, seq, points FROM "{schema}".batches') == [("node-1", "stream-a", 1, 3)]


async def test_bad_names_and_values_are_stored_or_refused_and_the_output_goes_on(schema, tmp_path, caplog) -> None:
    ctx, output = start(schema, tmp_path)
    async with running_pipeline(ctx.elements) as pipeline:
        sink = pipeline.sink()
        assert await sink.send_and_wait(batch([1.0], metric="nul\x00name", attributes={"k\x00": "v\x00", "big": "x" * 100_000}))
        assert await sink.send_and_wait(batch([10**400, -(10**400), float("nan")]))
        bad_time = Batch([make_series("late", [1.0], timestamps=[2**70])])
        assert await sink.send_and_wait(bad_time)
        assert await sink.send_and_wait(batch([7.0], metric="after"))
        many = Batch([make_series("many", [1.0], timestamps=[T0], attributes={f"a{i}": i for i in range(10_000)})])
        assert await sink.send_and_wait(many)
    rows = dict(query(f'SELECT metric, count(*) FROM "{schema}".points_readable GROUP BY metric'))
    assert rows == {"nul\ufffdname": 1, "cpu_percent": 3, "after": 1, "many": 1}
    [(attributes,)] = query(f"SELECT attributes FROM \"{schema}\".points_readable WHERE metric = 'nul\ufffdname'")
    assert attributes["k\ufffd"] == "v\ufffd"
    assert sorted(v for (v,) in query(f"SELECT value FROM \"{schema}\".points WHERE value <> 'NaN'"))[:2] == [
        float("-inf"),
        1.0,
    ]
    assert "timestamp outside the 64-bit nanosecond range" in caplog.text
    assert output.rejected_points == 1


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"path": "/agent_no_such_database"}, 'database "agent_no_such_database" does not exist'),
        ({"user": "agent_no_such_role"}, 'role "agent_no_such_role" does not exist'),
    ],
)
def test_a_server_that_refuses_us_is_a_one_line_start_error(schema, tmp_path, change, expected) -> None:
    parts = urlsplit(URL)
    if "path" in change:
        parts = parts._replace(path=change["path"])
    else:
        parts = parts._replace(netloc=f"{change['user']}:secret@{parts.hostname}:{parts.port or 5432}")
    with pytest.raises(StartupError) as info:
        start(schema, tmp_path, url=urlunsplit(parts))
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert "secret" not in message


def test_a_schema_the_agent_cannot_create_is_a_start_error(schema, tmp_path) -> None:
    role = f"agent_test_{uuid.uuid4().hex[:8]}"
    query(f'CREATE ROLE "{role}" LOGIN')
    try:
        parts = urlsplit(URL)
        url = urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port or 5432}"))
        with pytest.raises(StartupError, match=f"cannot create or use schema '{schema}'.*permission denied"):
            start(schema, tmp_path, url=url)
    finally:
        query(f'DROP ROLE "{role}"')


def test_an_unreachable_server_at_start_is_waited_for(schema, tmp_path, caplog) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with caplog.at_level(logging.WARNING):
        ctx, _ = start(schema, tmp_path, url=with_port(URL, port), connect_timeout="1s")
    assert "is not reachable" in caplog.text and "points wait in the buffer" in caplog.text


async def test_an_outage_mid_stream_ends_with_every_point_stored_exactly_once(schema, tmp_path) -> None:
    parts = urlsplit(URL)
    proxy = CuttingProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.run)
        ctx, output = start(schema, tmp_path, url=with_port(URL, port))
        acked: list[bool] = []
        async with running_pipeline(ctx.elements) as pipeline:
            sink = pipeline.sink()
            with trio.fail_after(60):
                for seq in range(1, 201):
                    # Batches from a relay client (identity: acked once committed) and from a local
                    # source (no identity: acked once in the buffer), interleaved.
                    identity = BatchIdentity("node-1", "s", seq) if seq % 2 else None
                    await sink.send(batch([float(seq)] * 10, identity=identity, start=T0 + seq * 10**10), acked.append)
                    if seq in (50, 120):
                        proxy.cut()
                    if seq in (80, 160):
                        proxy.restore()
                    await trio.sleep(0.005)
                while len(acked) < 200:
                    await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert acked == [True] * 200
    assert output.failed_writes > 0  # the cuts did make writes fail and retry
    rows = query(f'SELECT value, count(*) FROM "{schema}".points GROUP BY value ORDER BY value')
    assert rows == [(float(seq), 10) for seq in range(1, 201)]


async def test_points_buffered_on_disk_survive_a_restart_during_an_outage(schema, tmp_path) -> None:
    parts = urlsplit(URL)
    proxy = CuttingProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.run)
        url = with_port(URL, port)
        ctx, output = start(schema, tmp_path, url=url)
        proxy.cut()
        # The database is away: local points are acknowledged once on disk, and the agent stops.
        async with running_pipeline(ctx.elements, grace_period=1.0) as pipeline:
            for i in range(5):
                assert await pipeline.sink().send_and_wait(batch([float(i)], start=T0 + i * 10**9))
        assert output.points_written == 0
        proxy.restore()
        ctx, output = start(schema, tmp_path, url=url)
        with trio.fail_after(30):
            async with running_pipeline(ctx.elements):
                while output.points_written < 5:
                    await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert query(f'SELECT value FROM "{schema}".points ORDER BY value') == [(float(i),) for i in range(5)]


async def test_a_lone_surrogate_in_a_name_is_replaced_and_the_output_goes_on(schema, tmp_path) -> None:
    ctx, output = start(schema, tmp_path)
    async with running_pipeline(ctx.elements) as pipeline:
        sink = pipeline.sink()
        # A Graphite pickle can carry a lone surrogate, which UTF-8 (and PostgreSQL) cannot hold.
        assert await sink.send_and_wait(batch([1.0], metric="bad\ud800name", attributes={"k": "v\udfff"}))
        assert await sink.send_and_wait(batch([2.0], metric="after"))
    rows = query(f'SELECT metric, attributes FROM "{schema}".points_readable ORDER BY metric')
    assert rows == [("after", {}), ("bad\ufffdname", {"k": "v\ufffd"})]
