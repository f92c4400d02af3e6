"""The relay end to end: real client and server agents, over real sockets.

In-process pipelines where the test needs to reach inside (a TCP proxy it cuts mid-stream, a
three-level tier), and real `python -m agent.cli` processes where the point is what survives a kill:
a server killed with SIGKILL and restarted mid-stream, a client killed with SIGKILL while the server is
down, a client stopped with SIGTERM with points still in its buffer. Process tests run the agent with
`agent.testing.open_agent` (ports from its readiness line, killed on any way out) and wait on
conditions (files, log lines) with deadlines, not on fixed sleeps.
"""

from __future__ import annotations

import csv
import itertools
import signal
import socket
from collections import Counter
from pathlib import Path

import trio

from agent import config as config_mod
from agent.config import Overrides
from agent.manager import build_plugin_manager, collect_plugins
from agent.model import MetricDef, MetricRegistry
from agent.pipeline import Pipeline
from agent.plugin import AutonomousSource, SourceSink
from agent.runtime import Agent
from agent.testing import (
    CollectingOutput,
    make_batch,
    make_series,
    open_agent,
    output_element,
    partial_run,
    source_element,
    wait_for_async,
)
from agent_plugins.relay.relay_client.client import ClientSettings, RelayClient
from agent_plugins.relay.relay_client.plugin import RELAY_OUT_FLAG
from agent_plugins.relay.relay_client.store import DiskBuffer
from agent_plugins.relay.relay_server.plugin import RELAY_IN_FLAG
from agent_plugins.relay.relay_server.server import RelayServer, ServerSettings

# -- in process --


class CuttableProxy:
    """Forwards TCP connections to `target`; `cut()` breaks every live one, as a network failure would."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.cuts = 0
        self._live: list[trio.CancelScope] = []

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(f"127.0.0.1:{listeners[0].socket.getsockname()[1]}")
        await trio.serve_listeners(self._handle, listeners)

    def cut(self) -> None:
        self.cuts += 1
        for scope in self._live:
            scope.cancel()
        self._live.clear()

    async def _handle(self, downstream: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            self._live.append(scope)
            try:
                upstream = await trio.open_tcp_stream(*self.target)
            except OSError:
                return
            async with upstream, downstream, trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, downstream, upstream, nursery.cancel_scope)
                nursery.start_soon(self._pump, upstream, downstream, nursery.cancel_scope)
        # Cut or closed: both sockets are closed without ceremony, mid-frame if need be.

    @staticmethod
    async def _pump(source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


class NumberedSource(AutonomousSource):
    """Sends `batches` batches of `points` points, every value distinct, at a steady pace."""

    def __init__(self, batches: int, points: int, metric: str = "e2e_value", pause: float = 0.001) -> None:
        self.batches, self.points, self.metric, self.pause = batches, points, metric, pause
        self.sent: list[float] = []

    async def run(self, sink: SourceSink, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        counter = itertools.count()
        for _ in range(self.batches):
            values = [float(next(counter)) for _ in range(self.points)]
            self.sent += values
            await sink.send(make_batch(make_series(self.metric, values)))
            await trio.sleep(self.pause)
        await trio.sleep_forever()


def relay_client(
    name: str, server: str, buffer_dir: Path, registry: MetricRegistry | None = None, **settings
) -> RelayClient:
    options = {
        "buffer_max_length": 50,
        "buffer_timeout": 0.01,
        "initial_delay": 0.01,
        "max_delay": 0.05,
        **settings,
    }
    return RelayClient(
        ClientSettings(name, server, **options), DiskBuffer(buffer_dir, 1 << 26), registry=registry
    )


class GatedOutput(CollectingOutput):
    """A slow output that finishes writes only while its gate is open: closed, the server's pipeline holds
    batches it has not written (so their acks cannot have left) for as long as the test needs."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_open = True
        self._opened = trio.Event()

    def close_gate(self) -> None:
        self.gate_open = False
        self._opened = trio.Event()

    def open_gate(self) -> None:
        self.gate_open = True
        self._opened.set()

    async def write(self, batches) -> None:
        await trio.sleep(0.01)
        # Checked last: a write that began before the gate closed does not finish either.
        while not self.gate_open:
            await self._opened.wait()
        await super().write(batches)


async def test_connections_cut_mid_stream_lose_nothing_and_duplicate_nothing(tmp_path) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server = RelayServer(ServerSettings(address="127.0.0.1:0"), MetricRegistry())
            # A slow output: batches wait in the server's pipeline, unacknowledged, when a cut comes.
            received = GatedOutput()
            server_pipeline = Pipeline(
                [source_element(server, "relay-server"), output_element(received, "out")]
            )
            async with trio.open_nursery() as servers:
                await servers.start(partial_run(server_pipeline, 5.0))
                proxy = CuttableProxy(server.bound_addresses[0])
                proxy_address = await nursery.start(proxy.serve)

                source = NumberedSource(batches=400, points=10)
                client = relay_client("node-1", proxy_address, tmp_path, max_in_flight=8)
                client_pipeline = Pipeline(
                    [source_element(source, "numbers"), output_element(client, "relay-client")]
                )
                async with trio.open_nursery() as clients:
                    await clients.start(partial_run(client_pipeline, 5.0))
                    total = 400 * 10
                    for cut in range(1, 7):
                        # Each cut comes while the server's pipeline holds batches not yet written: their
                        # acks cannot have left, so the client resends them (and the server must drop
                        # them). They stay unwritten until the client has resent one, however slow the
                        # reconnection.
                        await wait_for_async(
                            lambda c=cut: received.points >= c * total // 8, 20, f"point {cut * total // 8}"
                        )
                        received.close_gate()
                        await wait_for_async(
                            lambda: server.counters.points > received.points,
                            20,
                            "batches pending in the server",
                        )
                        duplicates = server.counters.duplicate_batches
                        proxy.cut()
                        await wait_for_async(
                            lambda d=duplicates: server.counters.duplicate_batches > d,
                            20,
                            "a batch resent after the cut",
                        )
                        received.open_gate()
                    await wait_for_async(lambda: received.points >= total, 20, f"{total} points")
                    client_pipeline.stop()
                # The client drained: the server acknowledged all it sent. Then the server drains: all
                # it took is in `received`, duplicates included, if any got through.
                server_pipeline.stop()
            nursery.cancel_scope.cancel()
    values = received.values("e2e_value")
    assert proxy.cuts == 6 and client.counters.connections >= 7
    assert Counter(values) == Counter(source.sent)  # every point, once
    assert server.counters.duplicate_batches > 0  # the cuts did make the client resend


async def test_a_tier_of_relays_keeps_the_node_names_and_the_metric_definitions(tmp_path) -> None:
    """nodes -> rack relay (relay-server and relay-client in one agent) -> central collector."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            central_registry = MetricRegistry()
            central = RelayServer(ServerSettings(address="127.0.0.1:0"), central_registry)
            collected = CollectingOutput()
            central_pipeline = Pipeline(
                [source_element(central, "relay-server"), output_element(collected, "out")]
            )
            await nursery.start(partial_run(central_pipeline, 5.0))

            # The rack relay is one agent with both plugins, as `agent --relay-in ... --relay-out ...` starts it.
            pm = build_plugin_manager()
            plugins = collect_plugins(pm)
            rack_config = config_mod.resolve(
                {
                    "agent": {"data_dir": str(tmp_path / "rack"), "self_metrics_interval": "0s"},
                    "plugins": {"relay-client": {"client_name": "rack-1", "buffer_timeout": "10ms"}},
                },
                plugins,
                path=None,
                overrides=Overrides(
                    plugin_flags=[
                        (RELAY_IN_FLAG, "127.0.0.1:0"),
                        (RELAY_OUT_FLAG, central.bound_addresses[0]),
                    ]
                ),
            )
            rack = Agent(rack_config, plugins, pm)
            rack.start_plugins()
            await nursery.start(lambda task_status: rack.run(handle_signals=False, task_status=task_status))
            rack_server = next(e.obj for e in rack.elements if e.plugin == "relay-server")
            assert sorted(rack.started) == ["relay-client", "relay-server"]

            node_pipelines = []
            for node in ("node-a", "node-b"):
                registry = MetricRegistry()
                registry.register(MetricDef("energy", "J", "int", "energy counter"))
                pipeline = Pipeline(
                    [
                        output_element(
                            relay_client(node, rack_server.bound_addresses[0], tmp_path / node, registry),
                            "relay-client",
                        )
                    ]
                )
                await nursery.start(partial_run(pipeline, 5.0))
                node_pipelines.append(pipeline)
            await node_pipelines[0].sink().send(make_batch(make_series("energy", [1, 2])))
            await node_pipelines[1].sink().send(make_batch(make_series("energy", [3])))
            await wait_for_async(lambda: collected.points >= 3, 20, "3 points at the central collector")
            for pipeline in (*node_pipelines, central_pipeline):
                pipeline.stop()
            rack.stop()
    by_node = {s.attributes["relay_client"]: s.values for b in collected.batches for s in b.series}
    assert by_node == {"node-a": [1, 2], "node-b": [3]}
    assert central_registry.get("energy") == MetricDef("energy", "J", "int", "energy counter")


# -- real agent processes --


def free_port() -> int:
    """A port nothing listens on, for a server that a test starts after its client."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def csv_points(path: Path) -> list[tuple[str, float, str]]:
    """(metric, value, attributes) of each well-formed row; a row torn by a SIGKILL is skipped."""
    if not path.exists():
        return []
    rows = []
    with path.open(newline="") as handle:
        for row in csv.reader(handle, delimiter=";"):
            if len(row) != 8 or row[0] == "metric":
                continue
            try:
                rows.append((row[0], float(row[2]), row[7]))
            except ValueError:
                continue
    return rows


def server_config(directory: Path, port: int = 0, csv_flush_interval: str = "0s") -> str:
    """`csv_flush_interval`: how long the server's csv output holds batches before it writes them (and
    only then acknowledges them)."""
    return f"""
[agent]
data_dir = "{directory / "server-data"}"
self_metrics_interval = "0s"
grace_period = "5s"

[plugins.relay-server]
address = "127.0.0.1:{port}"
heartbeat_interval = "1s"

[plugins.csv]
path = "{directory / "server.csv"}"
flush_interval = "{csv_flush_interval}"
"""


def client_config(
    directory: Path, server_port: int, body: str, buffer_timeout: str = "50ms", buffer_max_length: int = 100
) -> str:
    return f"""
[agent]
data_dir = "{directory / "client-data"}"
self_metrics_interval = "0s"
grace_period = "5s"

[plugins.relay-client]
client_name = "node-1"
relay_server = "127.0.0.1:{server_port}"
buffer_max_length = {buffer_max_length}
buffer_timeout = "{buffer_timeout}"
max_in_flight = 8

[plugins.relay-client.retry]
initial_delay = "50ms"
max_delay = "200ms"
{body}
"""


async def send_graphite_lines(port: int, lines: list[str], per_write: int, pause: float) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        for start in range(0, len(lines), per_write):
            await stream.send_all("".join(lines[start : start + per_write]).encode())
            await trio.sleep(pause)


async def test_a_server_killed_mid_stream_loses_nothing(tmp_path) -> None:
    """graphite-in on the client, csv on the server: the server is SIGKILLed while points flow, then
    restarted. Every point arrives; the only duplicates are of batches in flight at the kill."""
    # The server's output writes (and only then acknowledges) every 300 ms, and the kill comes half-way
    # between two writes: batches the client sent are in the server's memory, unwritten. A client that
    # let go of batches when it sent them, not when the server acknowledged them, would lose those.
    count, per_write = 12_000, 200
    lines = [f"e2e.m{i % 7} {i} 1700000000\n" for i in range(count)]
    server_csv = tmp_path / "server.csv"
    with trio.fail_after(60):
        server_toml = server_config(tmp_path, csv_flush_interval="300ms")
        async with open_agent(server_toml, directory=tmp_path, name="server") as server:
            server_port = server.port("relay-server")
            graphite_in = '[plugins.graphite-in]\nplaintext = "127.0.0.1:0"\npickle = ""\n'
            client_toml = client_config(tmp_path, server_port, graphite_in)
            async with open_agent(client_toml, directory=tmp_path, name="client") as client:
                graphite_port = client.port("graphite-in", "plaintext")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_graphite_lines, graphite_port, lines, per_write, 0.02)
                    agents = [server, client]
                    await wait_for_async(
                        lambda: len(csv_points(server_csv)) >= count // 3,
                        20,
                        "a third of the points",
                        watch=agents,
                    )
                    written = server_csv.stat().st_size
                    await wait_for_async(
                        lambda: server_csv.stat().st_size > written, 5, "a write", watch=agents
                    )
                    await trio.sleep(0.15)  # not a wait: where the kill falls, half-way to the next write
                    server.kill()
                # Restarted on its port: the client reconnects and sends what was not acknowledged.
                server_toml = server_config(tmp_path, server_port, csv_flush_interval="300ms")
                async with open_agent(server_toml, directory=tmp_path, name="server") as restarted:
                    await wait_for_async(
                        lambda: len({v for _, v, _ in csv_points(server_csv)}) >= count,
                        30,
                        "every point",
                        watch=[restarted, client],
                    )
                    assert await client.stop_async(10) == 0, client.stderr
                    assert await restarted.stop_async(10) == 0, restarted.stderr
    points = csv_points(server_csv)
    values = Counter(v for _, v, _ in points)
    assert set(values) == set(range(count))
    assert all(attributes == "relay_client=node-1" for _, _, attributes in points)
    assert {(m, v) for m, v, _ in points} == {(f"e2e.m{i % 7}", float(i)) for i in range(count)}
    duplicates = sum(n - 1 for n in values.values())
    # At most the window: max_in_flight batches of at most one write of lines each.
    assert duplicates <= 8 * per_write, f"{duplicates} duplicates"
    assert max(values.values()) <= 2


async def test_a_client_killed_while_the_server_is_down_delivers_its_disk_buffer_after_both_restart(
    tmp_path,
) -> None:
    server_port = free_port()
    count = 3000
    synthetic = f"""
[plugins.synthetic]
series = 3
points_per_batch = 300
rate = 30000.0
total_points = {count}
metric_prefix = "kill"

[plugins.csv]
path = "{tmp_path / "client.csv"}"
flush_interval = "0s"
"""
    with trio.fail_after(60):
        client_toml = client_config(tmp_path, server_port, synthetic)
        async with open_agent(
            client_toml, "--log-level", "debug", directory=tmp_path, name="client"
        ) as client:
            # The server is down: every point goes to the client's disk buffer, then the client dies.
            await client.wait_for_async(
                lambda: f"{count} points buffered since start" in client.stderr, 20, "the disk buffer"
            )
            client.kill()
        async with open_agent(
            server_config(tmp_path, server_port), directory=tmp_path, name="server"
        ) as server:
            # Restarted without its source: it only delivers what its disk buffer holds.
            client_toml = client_config(tmp_path, server_port, "")
            async with open_agent(client_toml, directory=tmp_path, name="client") as client:
                await wait_for_async(
                    lambda: len(csv_points(tmp_path / "server.csv")) >= count,
                    20,
                    "every buffered point",
                    watch=[server, client],
                )
                assert await client.stop_async(10) == 0, client.stderr
                assert await server.stop_async(10) == 0, server.stderr
    generated = Counter((m, v) for m, v, _ in csv_points(tmp_path / "client.csv"))
    delivered = Counter((m, v) for m, v, _ in csv_points(tmp_path / "server.csv"))
    assert sum(generated.values()) == count
    # synthetic values repeat across batches, so compare as multisets: exactly what was generated.
    assert delivered == generated


async def test_sigterm_flushes_what_the_client_buffered(tmp_path) -> None:
    """buffer_timeout is an hour: the points wait in the client's buffer until SIGTERM sends them."""
    count = 500
    synthetic = f"""
[plugins.synthetic]
series = 5
points_per_batch = 50
total_points = {count}

[plugins.csv]
path = "{tmp_path / "client.csv"}"
flush_interval = "0s"
"""
    with trio.fail_after(60):
        async with open_agent(server_config(tmp_path), directory=tmp_path, name="server") as server:
            client_toml = client_config(
                tmp_path,
                server.port("relay-server"),
                synthetic,
                buffer_timeout="1h",
                buffer_max_length=100_000,
            )
            async with open_agent(client_toml, directory=tmp_path, name="client") as client:
                await client.wait_for_async(
                    lambda: len(csv_points(tmp_path / "client.csv")) >= count, 20, "the points in the client"
                )
                assert csv_points(tmp_path / "server.csv") == []  # still in the client's buffer
                assert await client.stop_async(10) == 0, client.stderr
                # The client exits only once the server acknowledged: the points are written by then.
                assert len(csv_points(tmp_path / "server.csv")) == count
                assert await server.stop_async(10) == 0, server.stderr


async def test_the_command_line_flags_alone_make_a_relay_and_sigint_flushes(tmp_path) -> None:
    """`--relay-in` and `--relay-out` on configs without any relay table: each enables its plugin with
    the defaults (the client's disk buffer under [agent] data_dir, buffer_timeout 30s); SIGINT stops
    the client the way SIGTERM does, delivering what it buffered."""
    count = 500
    server_toml = f"""
[agent]
self_metrics_interval = "0s"

[plugins.csv]
path = "{tmp_path / "server.csv"}"
flush_interval = "0s"
"""
    client_toml = f"""
[agent]
data_dir = "client-data"
self_metrics_interval = "0s"

[plugins.synthetic]
series = 5
points_per_batch = 50
total_points = {count}

[plugins.csv]
path = "{tmp_path / "client.csv"}"
flush_interval = "0s"
"""
    with trio.fail_after(60):
        relay_in = ["--relay-in", "127.0.0.1:0"]
        async with open_agent(server_toml, *relay_in, directory=tmp_path / "server", name="server") as server:
            relay_out = ["--relay-out", server.addresses("relay-server")[0]]
            async with open_agent(
                client_toml, *relay_out, directory=tmp_path / "client", name="client"
            ) as client:
                await client.wait_for_async(
                    lambda: len(csv_points(tmp_path / "client.csv")) >= count, 20, "the points in the client"
                )
                assert csv_points(tmp_path / "server.csv") == []  # within buffer_timeout: still buffered
                assert await client.stop_async(10, signal.SIGINT) == 0, client.stderr
                assert await server.stop_async(10, signal.SIGINT) == 0, server.stderr
    points = csv_points(tmp_path / "server.csv")
    assert len(points) == count
    assert {attributes for _, _, attributes in points} == {f"relay_client={socket.gethostname()}"}
    assert (tmp_path / "client" / "client-data" / "relay-client" / "stream.msgpack").is_file()
    assert "started plugins: csv, relay-server" in server.stderr
