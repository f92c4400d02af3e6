"""The scale-out deployment of docs/scale-out.md, run for real on loopback: three node agents -> two relay
servers with nats-out -> NATS JetStream -> two nats-in consumers of one group -> PostgreSQL.

Every agent is a `python -m agent.cli` process; the relay servers and the consumers run the configs of
configs/scale-out/ as they are, given their addresses and names through the environment (the nodes take
numbered Graphite lines instead of measuring, so that every point can be checked). Midway, one consumer
and one relay server are killed with SIGKILL and restarted; PostgreSQL must end with every point exactly
once: the count, and a checksum over the values. Each run has its own stream, consumer and schema,
removed at the end.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from agent.testing import require_service

# The consumers write through the postgres output (issue 9): without it there is nothing to run.
pytest.importorskip("agent_plugins.postgres.plugin", reason="the postgres output (issue 9) is not installed")

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "scale-out"
NATS_URL = "nats://127.0.0.1:4222"
POSTGRES_URL = os.environ.get("POSTGRES_URL", "postgresql://127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class AgentProcess:
    """`python -m agent.cli --config FILE` with extra environment, its stderr in a file."""

    def __init__(self, config: Path, name: str, directory: Path, env: dict[str, str]) -> None:
        self.name = name
        self.config = config
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "AGENT_DATA_DIR": str(directory / f"{name}-data"),
            **env,
        }
        self.log_path = directory / f"{name}.log"
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "--config", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=self.directory,
                env=self.env,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    async def terminate(self, timeout: float) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(timeout):
            while self.process.poll() is None:
                await trio.sleep(0.05)
        if self.process.poll() is None:
            self.process.kill()
            raise AssertionError(f"{self.name} did not stop within {timeout}s:\n{self.log()[-3000:]}")
        return self.process.returncode

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


async def until(condition: Callable[[], bool], timeout: float, what: str, agents: list[AgentProcess]) -> None:
    with trio.move_on_after(timeout):
        while not await trio.to_thread.run_sync(condition):
            for agent in agents:
                if agent.exited():
                    raise AssertionError(
                        f"{agent.name} exited while waiting for {what}:\n{agent.log()[-3000:]}"
                    )
            await trio.sleep(0.2)
        return
    logs = "\n".join(f"--- {a.name}\n{a.log()[-1500:]}" for a in agents)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs}")


def node_config(directory: Path, name: str, graphite_port: int, relay_port: int) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(
        f"""
[agent]
data_dir = "{directory / (name + "-data")}"
self_metrics_interval = "0s"

[plugins.graphite-in]
plaintext = "127.0.0.1:{graphite_port}"
pickle = ""

[plugins.relay-client]
client_name = "{name}"
relay_server = "127.0.0.1:{relay_port}"
buffer_max_length = 200
buffer_timeout = "50ms"

[plugins.relay-client.retry]
initial_delay = "50ms"
max_delay = "300ms"
"""
    )
    return path


async def send_lines(port: int, values: range, per_write: int, pause: float) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        for start in range(values.start, values.stop, per_write):
            chunk = range(start, min(start + per_write, values.stop))
            await stream.send_all("".join(f"scale.v{v % 5} {v} 1764547200\n" for v in chunk).encode())
            await trio.sleep(pause)


def stored(schema: str) -> tuple[int, float]:
    """(count, sum of values) of what PostgreSQL holds in the schema."""
    import psycopg

    try:
        with psycopg.connect(POSTGRES_URL, connect_timeout=5) as connection:
            row = connection.execute(
                f'SELECT count(*), coalesce(sum(value), 0) FROM "{schema}".points_readable'
            ).fetchone()
    except psycopg.Error:
        return 0, 0.0  # the schema is not created yet
    assert row is not None
    return int(row[0]), float(row[1])


@pytest.mark.slow
async def test_killing_a_consumer_and_a_relay_mid_stream_stores_every_point_exactly_once(tmp_path) -> None:
    require_service("NATS", "127.0.0.1", 4222)
    require_service("PostgreSQL", "127.0.0.1", 5432)
    run = uuid.uuid4().hex[:8]
    stream, schema = f"SCALE_{run}", f"scale_{run}"
    shared = {
        "NATS_URL": NATS_URL,
        "NATS_STREAM": stream,
        "NATS_SUBJECT_PREFIX": f"scale.{run}",
        "NATS_CONSUMER": "collectors",
        # Short, so that the killed consumer's batches go to the other one soon.
        "NATS_ACK_WAIT": "3s",
        "POSTGRES_URL": POSTGRES_URL,
        "POSTGRES_SCHEMA": schema,
    }
    relay_ports = [free_port(), free_port()]
    graphite_ports = [free_port(), free_port(), free_port()]
    per_node = 6000
    total = 3 * per_node
    agents: list[AgentProcess] = []
    try:
        with trio.fail_after(240):
            relays = [
                AgentProcess(
                    CONFIGS / "relay.toml",
                    f"relay-{i}",
                    tmp_path,
                    {**shared, "RELAY_ADDRESS": f"127.0.0.1:{port}", "RELAY_NAME": f"relay-{i}"},
                )
                for i, port in enumerate(relay_ports)
            ]
            collectors = [
                AgentProcess(CONFIGS / "collector.toml", f"collector-{i}", tmp_path, shared) for i in range(2)
            ]
            agents += relays + collectors
            for port in relay_ports:
                await until(lambda port=port: listening(port), 20, "a relay server to listen", agents)
            # Nodes 0 and 1 send to relay 0, node 2 to relay 1.
            nodes = [
                AgentProcess(
                    node_config(tmp_path, f"node-{i}", graphite_ports[i], relay_ports[min(i // 2, 1)]),
                    f"node-{i}",
                    tmp_path,
                    {},
                )
                for i in range(3)
            ]
            agents += nodes
            for port in graphite_ports:
                await until(lambda port=port: listening(port), 20, "a node's graphite-in", agents)
            async with trio.open_nursery() as nursery:
                for i, port in enumerate(graphite_ports):
                    nursery.start_soon(send_lines, port, range(i * per_node, (i + 1) * per_node), 100, 0.03)
                await until(lambda: stored(schema)[0] >= total // 4, 60, "a quarter of the points", agents)
                collectors[0].kill()
                relays[0].kill()
                at_kill = stored(schema)[0]
                collectors[0].start()
                relays[0].start()
            await until(lambda: stored(schema)[0] >= total, 120, "every point", agents)
            # Whatever was in flight at the kills has settled: nothing more comes.
            for agent in nodes + relays + collectors:
                assert await agent.terminate(20) == 0, agent.log()[-3000:]
        assert at_kill < total, "the kills came after the end of the stream"
        count, checksum = stored(schema)
        assert count == total, f"{count - total} points stored twice"
        assert checksum == sum(range(total))
    finally:
        for agent in agents:
            agent.stop()
        await _cleanup(stream, schema)


async def _cleanup(stream: str, schema: str) -> None:
    import nats
    import psycopg

    from agent.asyncio_bridge import open_asyncio_loop

    def drop_schema() -> None:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as connection:
            connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    with trio.CancelScope(shield=True):
        try:
            await trio.to_thread.run_sync(drop_schema)
        except Exception:
            pass
        async with open_asyncio_loop("cleanup") as aio:
            try:
                nc = await aio.run(nats.connect, NATS_URL)
                try:
                    await aio.run(nc.jetstream().delete_stream, stream)
                finally:
                    await aio.run(nc.close)
            except Exception:
                pass
