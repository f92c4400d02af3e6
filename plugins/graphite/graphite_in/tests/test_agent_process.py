"""graphite-in in the real agent process (`python -m agent.cli --config X`): lines in = lines out, towards
two fake carbon-caches through graphite-out's consistent hashing, and into the csv output.

Every agent process is started by `running_agent`, which kills it on any way out of the test (a failed
assertion, the `fail_after` guard, a cancelled nursery): a test run never leaves an agent behind."""

from __future__ import annotations

import contextlib
import csv
import json
import pickle
import re
import signal
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from agent_plugins.graphite.graphite_out.testing import FakeCarbon
from agent_plugins.graphite.protocol.hashing import ConsistentHashRing

T0 = 1_700_000_000
LISTENING = re.compile(r"graphite-in: listening: (.*)")


class AgentProcess:
    """The agent as a child process, with its stderr collected as it comes."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.stderr = ""
        self._changed = trio.Event()
        self._stderr_closed = trio.Event()

    async def collect_stderr(self) -> None:
        assert self.process.stderr is not None
        try:
            async for data in self.process.stderr:
                self.stderr += data.decode(errors="replace")
                self._changed.set()
                self._changed = trio.Event()
        finally:
            self._stderr_closed.set()

    async def wait_for_stderr(self, pattern: re.Pattern[str]) -> re.Match[str]:
        while (match := pattern.search(self.stderr)) is None:
            if self.process.returncode is not None:
                raise AssertionError(f"the agent exited ({self.process.returncode}):\n{self.stderr}")
            with trio.move_on_after(0.1):
                await self._changed.wait()
        return match

    async def listening(self) -> dict[str, int]:
        """The port of each graphite-in listener, from its log line."""
        line = (await self.wait_for_stderr(LISTENING)).group(1)
        return {
            name: int(port)
            for name, port in re.findall(r"(plaintext|udp|pickle) on 127\.0\.0\.1:(\d+)", line)
        }

    async def stop(self) -> int:
        """SIGTERM, as a service manager stops it; returns the exit status once its last words are read."""
        self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            returncode = await self.process.wait()
        with trio.move_on_after(5):
            await self._stderr_closed.wait()
        return returncode


@contextlib.asynccontextmanager
async def running_agent(tmp_path: Path, config: str) -> AsyncIterator[AgentProcess]:
    """The agent with `config`, its stderr collected; killed when the block is left with it still running."""
    (tmp_path / "agent.toml").write_text(config)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "agent.cli", "--config", str(tmp_path / "agent.toml")],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    agent = AgentProcess(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.collect_stderr)
            yield agent
            nursery.cancel_scope.cancel()
    finally:
        # Shielded: a test that timed out is being cancelled, and the agent must still go.
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            assert process.stderr is not None
            await process.stderr.aclose()


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
            async with running_agent(
                tmp_path,
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
            ) as agent:
                ports = await agent.listening()
                plain = [f"e2e.plain.{i} {i} {T0 + i}\n" for i in range(plain_count)]
                plain += ["e2e.bad line\n", "e2e.tagged;host=web1;dc=eu 1.5 -1\n"]
                await send_tcp(ports["plaintext"], "".join(plain).encode())
                frame = pickle.dumps(
                    [(f"e2e.pickle.{i}", (T0 + i, float(i))) for i in range(pickle_count)], protocol=2
                )
                await send_tcp(ports["pickle"], struct.pack("!L", len(frame)) + frame)
                expected = plain_count + 1 + pickle_count
                while sum(len(c.points) for c in carbons) < expected:
                    await trio.sleep(0.05)
                await trio.sleep(0.2)  # nothing more (no duplicates) arrives
                assert sum(len(c.points) for c in carbons) == expected
                # graphite-out's admin API shows graphite-in's recent bad lines.
                admin = await agent.wait_for_stderr(
                    re.compile(r"admin HTTP API on http://127\.0\.0\.1:(\d+)")
                )
                bad_lines = json.loads(await http_get(int(admin.group(1)), "/badlines"))
                returncode = await agent.stop()
            nursery.cancel_scope.cancel()
    assert returncode == 0, agent.stderr
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
        async with running_agent(
            tmp_path,
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
        ) as agent:
            ports = await agent.listening()
            assert set(ports) == {"plaintext", "udp"}
            await send_tcp(ports["plaintext"], b"csv.plain 1.5 1700000000\ncsv.tagged;b=2;a=1 7 1700000001\n")
            udp = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
            with udp:
                await udp.sendto(b"csv.udp 3 1700000002", ("127.0.0.1", ports["udp"]))
            output = tmp_path / "out.csv"
            while not output.exists() or output.read_text().count("\n") < 4:
                await trio.sleep(0.05)
            returncode = await agent.stop()
    assert returncode == 0, agent.stderr
    with (tmp_path / "out.csv").open(newline="") as f:
        rows = {row["metric"]: row for row in csv.DictReader(f, delimiter=";")}
    assert set(rows) == {"csv.plain", "csv.tagged;a=1;b=2", "csv.udp"}
    assert rows["csv.plain"]["value"] == "1.5"
    assert rows["csv.plain"]["timestamp"].startswith("2023-11-14T22:13:20")
    assert rows["csv.tagged;a=1;b=2"]["attributes"] == "a=1,b=2"
    assert rows["csv.udp"]["resource_kind"] == "local_machine"


async def test_an_agent_is_killed_when_the_test_times_out(tmp_path: Path) -> None:
    # What the other tests rely on: leaving running_agent by a timeout (a cancellation) kills the agent.
    config = '[plugins.graphite-in]\nplaintext = "127.0.0.1:0"\npickle = ""\n'
    with trio.fail_after(30):
        with trio.move_on_after(20) as timeout:
            async with running_agent(tmp_path, config) as agent:
                await agent.listening()
                timeout.deadline = trio.current_time() + 0.1
                await trio.sleep_forever()  # a test stuck waiting for something that never comes
    assert timeout.cancelled_caught
    assert agent.process.returncode == -signal.SIGKILL
