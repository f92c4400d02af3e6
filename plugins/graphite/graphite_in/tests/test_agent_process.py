"""graphite-in in the real agent process (`python -m agent.cli --config X`): lines in = lines out, towards
two fake carbon-caches through graphite-out's consistent hashing, and into the csv output.

Every agent process is started by `agent.testing.open_agent`, which kills it on any way out of the test (a
failed assertion, the `fail_after` guard, a cancelled nursery): a test run never leaves an agent behind."""

from __future__ import annotations

import csv
import json
import pickle
import re
import struct
from pathlib import Path

import trio

from agent.testing import AgentProcess, open_agent, wait_for_async
from agent_plugins.graphite.graphite_out.testing import FakeCarbon
from agent_plugins.graphite.protocol.hashing import ConsistentHashRing

T0 = 1_700_000_000


def listening(agent: AgentProcess) -> dict[str, int]:
    """The port of each graphite-in listener, from the agent's readiness line."""
    return {kind: agent.port("graphite-in", kind) for kind in agent.ready["graphite-in"]}


async def http_get(port: int, path: str) -> bytes:
    """The body of a GET answered with 200 (HTTP/1.0: the server closes after the body)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        response = b""
        while data := await stream.receive_some(65536):
            response += data
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200"), head
    return body


async def send_tcp(port: int, data: bytes) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)


async def test_graphite_in_to_graphite_out_consistent_hashing_lines_in_equal_lines_out(
    tmp_path: Path,
) -> None:
    plain_count, pickle_count = 20_000, 1_000
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            carbons = [FakeCarbon(), FakeCarbon()]
            for carbon in carbons:
                await carbon.start(nursery)
            async with open_agent(
                f"""
[agent]
data_dir = "data"
self_metrics_interval = "0s"

[plugins.graphite-in]
plaintext = "127.0.0.1:0"
pickle = "127.0.0.1:0"

[plugins.graphite-out]
admin_http = "127.0.0.1:0"
admin_line = ""
[[plugins.graphite-out.routes]]
key = "carbon"
type = "consistent_hashing"
destinations = ["{carbons[0].address}:a", "{carbons[1].address}:b"]
""",
                directory=tmp_path,
            ) as agent:
                ports = listening(agent)
                plain = [f"e2e.plain.{i} {i} {T0 + i}\n" for i in range(plain_count)]
                plain += ["e2e.bad line\n", "e2e.tagged;host=web1;dc=eu 1.5 -1\n"]
                await send_tcp(ports["plaintext"], "".join(plain).encode())
                frame = pickle.dumps(
                    [(f"e2e.pickle.{i}", (T0 + i, float(i))) for i in range(pickle_count)], protocol=2
                )
                await send_tcp(ports["pickle"], struct.pack("!L", len(frame)) + frame)
                expected = plain_count + 1 + pickle_count
                await agent.wait_for_async(
                    lambda: sum(len(c.points) for c in carbons) >= expected, 30, f"{expected} points"
                )
                # graphite-out's admin API shows graphite-in's recent bad lines.
                admin = await agent.wait_for_async(
                    lambda: re.search(r"admin HTTP API on http://127\.0\.0\.1:(\d+)", agent.stderr)
                )
                bad_lines = json.loads(await http_get(int(admin.group(1)), "/badlines"))
                returncode = await agent.stop_async()
                # Everything the agent sent is read once its connections end: a duplicate would show.
                await wait_for_async(lambda: all(c.closed == c.connections for c in carbons), 10)
            nursery.cancel_scope.cancel()
    assert returncode == 0, agent.stderr
    assert sum(len(c.points) for c in carbons) == expected
    received = {path: index for index, carbon in enumerate(carbons) for path in carbon.paths}
    assert len(received) == expected
    # The tagged path went out normalised; each path went to the carbon-cache that carbon's ring names.
    assert "e2e.tagged;dc=eu;host=web1" in received
    ring = ConsistentHashRing([("127.0.0.1", "a"), ("127.0.0.1", "b")])
    paths = sorted(received)
    assert [received[path] for path in paths] == ring.nodes_for_paths(paths)
    assert all(len(c.points) > expected / 4 for c in carbons)
    points = {path: (value, ts) for c in carbons for path, value, ts in c.points}
    assert points["e2e.plain.7"] == (7.0, T0 + 7) and points["e2e.pickle.9"] == (9.0, T0 + 9)
    [bad] = bad_lines
    assert bad["line"] == "e2e.bad line" and bad["reason"].startswith("field_count: ")
    assert bad["peer"].startswith("127.0.0.1:")
    assert "graphite-in: stopped; plaintext: 20001 points, 1 bad (field_count 1)" in agent.stderr
    assert "pickle: 1000 points" in agent.stderr


async def test_graphite_in_to_csv(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_agent(
            """
[agent]
self_metrics_interval = "0s"

[plugins.graphite-in]
plaintext = "127.0.0.1:0"
pickle = ""
udp = "127.0.0.1:0"

[plugins.csv]
path = "out.csv"
flush_interval = "50ms"
""",
            directory=tmp_path,
        ) as agent:
            ports = listening(agent)
            assert set(ports) == {"plaintext", "udp"}
            await send_tcp(ports["plaintext"], b"csv.plain 1.5 1700000000\ncsv.tagged;b=2;a=1 7 1700000001\n")
            udp = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
            with udp:
                await udp.sendto(b"csv.udp 3 1700000002", ("127.0.0.1", ports["udp"]))
            output = tmp_path / "out.csv"
            await agent.wait_for_async(
                lambda: output.exists() and output.read_text().count("\n") >= 4, 30, "3 rows in the csv file"
            )
            returncode = await agent.stop_async()
    assert returncode == 0, agent.stderr
    with (tmp_path / "out.csv").open(newline="") as f:
        rows = {row["metric"]: row for row in csv.DictReader(f, delimiter=";")}
    assert set(rows) == {"csv.plain", "csv.tagged;a=1;b=2", "csv.udp"}
    assert rows["csv.plain"]["value"] == "1.5"
    assert rows["csv.plain"]["timestamp"].startswith("2023-11-14T22:13:20")
    assert rows["csv.tagged;a=1;b=2"]["attributes"] == "a=1,b=2"
    assert rows["csv.udp"]["resource_kind"] == "local_machine"
