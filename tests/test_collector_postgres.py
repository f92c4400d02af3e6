"""End to end: a node agent (synthetic source -> relay-client) feeds a collector agent (relay-server ->
postgres) whose database connection is cut for a while, and which is killed (SIGKILL) and restarted in
the middle of the stream. Every point lands in PostgreSQL exactly once."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import trio

from agent.testing import CuttingProxy, open_agent, require_service

URL = os.environ.get("POSTGRES_URL", "postgresql://127.0.0.1:5432/test")
TOTAL = 12_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def count_points(schema: str) -> tuple[int, int]:
    """(points stored, points stored more than once)."""
    try:
        with psycopg.connect(URL, autocommit=True) as conn:
            total = conn.execute(f'SELECT count(*) FROM "{schema}".points').fetchone()[0]
            duplicates = conn.execute(
                f'SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM "{schema}".points'
                " GROUP BY metric_id, time HAVING count(*) > 1) AS d"
            ).fetchone()[0]
            return total, duplicates
    except psycopg.errors.UndefinedTable:
        return 0, 0


async def wait_for_points(schema: str, at_least: int, timeout: float, *agents) -> None:
    """Polls in a thread: the proxy runs on this event loop, and a query blocked behind the collector's
    transaction must not stop the proxy that this transaction waits on."""
    with trio.fail_after(timeout):
        while (await trio.to_thread.run_sync(count_points, schema))[0] < at_least:
            for agent in agents:
                assert agent.returncode is None, f"{agent.name} exited:\n{agent.stderr_tail()}"
            await trio.sleep(0.2)


@pytest.mark.slow
async def test_a_collector_cut_off_from_its_database_and_killed_stores_every_point_once(tmp_path: Path) -> None:
    parts = urlsplit(URL)
    require_service("PostgreSQL", parts.hostname or "127.0.0.1", parts.port or 5432)
    schema = f"agent_e2e_{uuid.uuid4().hex[:10]}"
    relay_port = free_port()
    proxy = CuttingProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    try:
        async with trio.open_nursery() as nursery:
            db_port = await nursery.start(proxy.run)
            netloc = parts.netloc.rsplit("@", 1)
            host = f"127.0.0.1:{db_port}"
            proxied = urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))
            collector_config = (
                f'[agent]\ndata_dir = "{tmp_path / "collector-data"}"\nself_metrics_interval = "0s"\n'
                f'[plugins.relay-server]\naddress = "127.0.0.1:{relay_port}"\n'
                f'[plugins.postgres]\nurl = "{proxied}"\nschema = "{schema}"\nflush_interval = "100ms"\n'
            )
            node_config = (
                f'[agent]\ndata_dir = "{tmp_path / "node-data"}"\nself_metrics_interval = "0s"\n'
                "[plugins.synthetic]\nseries = 4\npoints_per_batch = 200\nrate = 3000.0\n"
                f"total_points = {TOTAL}\n"
                f'[plugins.relay-client]\nclient_name = "node-1"\nrelay_server = "127.0.0.1:{relay_port}"\n'
                '[plugins.relay-client.retry]\ninitial_delay = "100ms"\nmax_delay = "500ms"\n'
            )
            async with open_agent(collector_config, directory=tmp_path, name="collector") as collector:
                async with open_agent(node_config, directory=tmp_path, name="node") as node:
                    await wait_for_points(schema, 1000, 30, collector, node)
                    proxy.cut()  # the database goes away for two seconds
                    await trio.sleep(2)
                    proxy.restore()
                    await wait_for_points(schema, 4000, 30, collector, node)
                    collector.kill()  # no drain, no goodbye: what was not committed is resent by the node
                    async with open_agent(collector_config, directory=tmp_path, name="collector-2") as again:
                        await wait_for_points(schema, TOTAL, 60, again, node)
                        # Nothing more arrives: no point was stored twice, none is missing.
                        await trio.sleep(1)
                        assert await trio.to_thread.run_sync(count_points, schema) == (TOTAL, 0)
                        assert proxy.cuts == 1
            nursery.cancel_scope.cancel()
    finally:
        with psycopg.connect(URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
