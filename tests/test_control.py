"""Runtime control of a real agent process: `agent control` pauses, resumes, re-times and polls a source,
disables and enables an output, stops the agent; `agent tap` prints the points that flow; the HTTP API
answers the same requests; errors are one line with the contract's exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import testing
from agent.control_client import ControlClient, NoAgent

AGENT = [sys.executable, "-m", "agent.cli"]
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")

CONFIG = """
[agent]
data_dir = "data"
self_metrics_interval = "0s"
grace_period = "5s"
{agent_extra}
[plugins.system]
poll_interval = "{poll}"
flush_interval = "{poll}"
per_cpu = false
[plugins.csv]
path = "out.csv"
flush_interval = "0s"
[plugins.discard]
"""


def wait_for(predicate: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    """agent.testing's wait, with this file's longer default: agents here answer through a socket."""
    return testing.wait_for(predicate, timeout, what)


class RunningAgent:
    """An agent started by agent.testing.run_agent, with this file's ways to talk to it."""

    def __init__(self, process: testing.AgentProcess) -> None:
        self.process = process
        self.proc = process.process
        self.tmp_path = process.directory
        self.config = process.directory / "agent.toml"
        self.client = ControlClient(self.tmp_path / "data" / "control.sock")

    def control(self, *args: str, config_first: bool = False) -> subprocess.CompletedProcess:
        where = ["--config", str(self.config)]
        argv = where + ["control", *args] if config_first else ["control", *args, *where]
        return subprocess.run(AGENT + argv, capture_output=True, text=True, timeout=60, cwd=self.tmp_path)

    def element(self, name: str) -> dict[str, Any]:
        status = self.client.request("status")
        return next(e for e in status["elements"] if e["name"] == name) | {"uptime": status["uptime"]}

    def log(self) -> str:
        return self.process.stderr


@contextlib.contextmanager
def running_agent(tmp_path: Path, poll: str = "200ms", agent_extra: str = "") -> Iterator[RunningAgent]:
    with testing.run_agent(CONFIG.format(poll=poll, agent_extra=agent_extra), directory=tmp_path) as process:
        agent = RunningAgent(process)

        def up() -> bool:
            try:
                return agent.element("system")["counters"]["polls"] > 0
            except NoAgent:
                return False

        process.wait_for(up, 30, "the agent answers on its socket")
        yield agent


def polls_per_second(agent: RunningAgent, seconds: float) -> float:
    """The source's polls over `seconds` of the agent's own clock (its uptime), per second."""
    first = agent.element("system")
    wait_for(lambda: agent.element("system")["uptime"] >= first["uptime"] + seconds, what="time passes")
    last = agent.element("system")
    return (last["counters"]["polls"] - first["counters"]["polls"]) / (last["uptime"] - first["uptime"])


def test_pause_resume_and_halve_the_period_of_a_source(tmp_path: Path) -> None:
    with running_agent(tmp_path) as agent:
        listed = agent.control("list")
        assert listed.returncode == 0, listed.stderr
        rows = [line.split() for line in listed.stdout.splitlines()]
        assert rows == [
            ["system", "source", "running"],
            ["csv", "output", "running"],
            ["discard", "output", "running"],
        ]

        paused = agent.control("pause", "system")
        assert paused.returncode == 0 and "paused" in paused.stdout, paused.stderr
        assert ["system", "source", "paused"] in [
            line.split() for line in agent.control("list").stdout.splitlines()
        ]
        # Paused: no new points reach the outputs while the agent runs on for 10 poll intervals.
        wait_for(lambda: agent.element("csv")["counters"]["queued"] == 0, what="csv drained")
        before = agent.element("csv")
        wait_for(lambda: agent.element("csv")["uptime"] >= before["uptime"] + 2.0, what="time passes")
        assert agent.element("csv")["counters"]["in"] == before["counters"]["in"]

        assert agent.control("resume", "system").returncode == 0
        wait_for(
            lambda: agent.element("csv")["counters"]["in"] > before["counters"]["in"], what="points again"
        )

        rate = polls_per_second(agent, 3.0)
        assert 3.0 < rate < 6.0  # 200ms
        changed = agent.control("set-period", "system", "100ms", config_first=True)
        assert changed.returncode == 0, changed.stderr
        assert "poll_interval 100ms" in changed.stdout
        doubled = polls_per_second(agent, 3.0)
        assert 1.6 < doubled / rate < 2.5, (rate, doubled)
        # The status says what differs from the file.
        assert agent.element("system")["changed"]["poll_interval"] == {"config": "200ms", "now": "100ms"}


def test_set_period_cuts_a_long_wait_short_and_poll_sends_at_once(tmp_path: Path) -> None:
    with running_agent(tmp_path, poll="1h") as agent:
        polls = agent.element("system")["counters"]["polls"]
        assert polls == 1
        csv_in = agent.element("csv")["counters"]["in"]
        assert agent.control("poll", "system").returncode == 0
        wait_for(lambda: agent.element("csv")["counters"]["in"] > csv_in, timeout=10, what="poll now")
        assert agent.element("system")["counters"]["polls"] == 2
        # Without the cut, the next poll would be an hour away.
        assert agent.control("set-period", "system", "100ms").returncode == 0
        wait_for(lambda: agent.element("system")["counters"]["polls"] >= 5, timeout=10, what="new period")


def test_a_disabled_output_counts_its_points_as_dropped(tmp_path: Path) -> None:
    with running_agent(tmp_path) as agent:
        disabled = agent.control("disable", "discard")
        assert disabled.returncode == 0 and "disabled" in disabled.stdout
        start = agent.element("discard")["counters"]
        wait_for(
            lambda: agent.element("discard")["counters"]["dropped"] > start["dropped"] + 50, what="drops"
        )
        after = agent.element("discard")
        assert after["state"] == "disabled" and after["counters"]["out"] == start["out"]
        # The other output keeps writing.
        csv_out = agent.element("csv")["counters"]["out"]
        wait_for(lambda: agent.element("csv")["counters"]["out"] > csv_out, what="csv writes")

        assert agent.control("enable", "discard").returncode == 0
        dropped = agent.element("discard")["counters"]["dropped"]
        wait_for(lambda: agent.element("discard")["counters"]["out"] > start["out"], what="writes again")
        assert agent.element("discard")["counters"]["dropped"] == dropped


def test_errors_are_one_line_with_their_exit_codes(tmp_path: Path) -> None:
    with running_agent(tmp_path) as agent:
        unknown = agent.control("pause", "nosuch")
        assert unknown.returncode == 2
        assert unknown.stderr.count("\n") == 1
        assert "nosuch" in unknown.stderr and "system, csv, discard" in unknown.stderr
        wrong_kind = agent.control("pause", "csv")
        assert wrong_kind.returncode == 2 and wrong_kind.stderr.count("\n") == 1

        sock = tmp_path / "data" / "control.sock"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600

        # A second agent with the same data_dir does not steal the socket.
        second = subprocess.run(
            AGENT + ["--config", str(agent.config)], capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        assert second.returncode == 1
        assert "another agent is running at" in second.stderr and str(sock) in second.stderr

        stopped = agent.control("stop")
        assert stopped.returncode == 0
        assert agent.proc.wait(timeout=30) == 0
        assert not sock.exists()
    gone = subprocess.run(
        AGENT + ["control", "list", "--config", str(tmp_path / "agent.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gone.returncode == 1
    assert gone.stderr.count("\n") == 1 and "no agent running at" in gone.stderr


def test_a_socket_path_too_long_is_a_start_error_naming_it(tmp_path: Path) -> None:
    deep = "d" * 60 + "/" + "e" * 60
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\ndata_dir = "{deep}"\n[plugins.discard]\n')
    result = subprocess.run(AGENT + ["--config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "too long for a Unix socket" in result.stderr and "control.sock" in result.stderr


def test_a_public_http_address_needs_a_token(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\nhttp = "0.0.0.0:8090"\n[plugins.discard]\n')
    result = subprocess.run(AGENT + ["--config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "http_token" in result.stderr


def http_address(agent: RunningAgent) -> str:
    match = wait_for(lambda: re.search(r"on http://(\S+)/", agent.log()), what="http address logged")
    return match.group(1)


def http(url: str, method: str = "GET", body: Any = None, token: str | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            payload = response.read()
            ctype = response.headers["content-type"]
            return response.status, json.loads(payload) if "json" in ctype else payload.decode()
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_http_api_answers_the_same_requests_with_a_token(tmp_path: Path) -> None:
    extra = 'http = "127.0.0.1:0"\nhttp_token = "s3cret"'
    with running_agent(tmp_path, agent_extra=extra) as agent:
        base = f"http://{http_address(agent)}"
        assert http(f"{base}/api/elements")[0] == 401
        assert http(f"{base}/api/elements", token="wrong")[0] == 401
        status, elements = http(f"{base}/api/elements", token="s3cret")
        assert status == 200
        assert [(e["name"], e["plugin"], e["kind"], e["state"]) for e in elements] == [
            ("system", "system", "source", "running"),
            ("csv", "csv", "output", "running"),
            ("discard", "discard", "output", "running"),
        ]
        assert all(isinstance(e["counters"], dict) for e in elements)

        status, answer = http(
            f"{base}/api/elements/system/set-period", "POST", {"poll_interval": "250ms"}, token="s3cret"
        )
        assert status == 200 and answer["element"]["poll_interval"] == "250ms"
        status, answer = http(f"{base}/api/elements/nosuch/pause", "POST", {}, token="s3cret")
        assert status == 404 and answer["known"] == ["system", "csv", "discard"]
        status, page = http(f"{base}/?token=s3cret")
        assert (
            status == 200
            and "<html" in page
            and "/s" in page
            and "http://" not in page.replace("http://www.w3.org", "")
        )
        status, _ = http(f"{base}/api/stop", "POST", {}, token="s3cret")
        assert status == 200
        assert agent.proc.wait(timeout=30) == 0


def test_tap_prints_the_points_that_flow(tmp_path: Path) -> None:
    with running_agent(tmp_path, poll="100ms") as agent:
        tap = subprocess.run(
            AGENT + ["tap", "--format", "json", "--limit", "20", "--config", str(agent.config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert tap.returncode == 0, tap.stderr
        points = [json.loads(line) for line in tap.stdout.splitlines()]
        assert len(points) == 20
        for point in points:
            assert {"metric", "timestamp", "value"} <= set(point)
            assert RFC3339.match(point["timestamp"]), point
        assert "dropped" in tap.stderr

        only = subprocess.run(
            AGENT + ["--config", str(agent.config), "tap", "--metric", "memory_*", "--limit", "5"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert only.returncode == 0, only.stderr
        lines = only.stdout.splitlines()
        assert len(lines) == 5 and all(line.split()[1].startswith("memory_") for line in lines)
        # The taps are gone once their readers hung up: nothing stays attached to the pipeline.
        agent.control("stop")
        assert agent.proc.wait(timeout=30) == 0


def test_tap_drops_instead_of_slowing_the_agent(tmp_path: Path) -> None:
    """A reader that does not read: the agent's outputs keep their pace, the tap counts what it drops."""
    with running_agent(tmp_path, poll="20ms") as agent:
        sock = agent.client._connect()
        sock.sendall(b'{"action": "tap"}\n')
        try:
            csv_out = agent.element("csv")["counters"]["out"]
            wait_for(
                lambda: agent.element("csv")["counters"]["out"] > csv_out + 20_000, timeout=60, what="flow"
            )
            assert agent.client.request("status")["taps"][0]["dropped"] > 0
        finally:
            sock.close()
        wait_for(lambda: agent.client.request("status")["taps"] == [], what="the tap is closed")


@pytest.mark.skipif(not os.path.exists("/dev/ptmx"), reason="no pseudo-terminals on this machine")
def test_top_shows_the_elements_and_quits_on_q(tmp_path: Path) -> None:
    import pty

    with running_agent(tmp_path) as agent:
        pid, fd = pty.fork()
        if pid == 0:  # the child: `agent top` on the pseudo-terminal
            os.environ["COLUMNS"], os.environ["LINES"] = "120", "30"
            os.execv(sys.executable, AGENT + ["top", "--config", str(agent.config)])
        screen = b""
        try:
            deadline = time.monotonic() + 30
            while b"/s" not in screen or b"discard" not in screen:
                assert time.monotonic() < deadline, screen.decode(errors="replace")
                try:
                    screen += os.read(fd, 65536)
                except OSError:
                    break
            assert b"system" in screen and b"running" in screen
            os.write(fd, b"q")
            deadline = time.monotonic() + 30
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                assert time.monotonic() < deadline, "agent top did not quit on q"
                with contextlib.suppress(OSError):
                    os.read(fd, 65536)
            assert os.waitstatus_to_exitcode(status) == 0
        finally:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            os.close(fd)


def test_plugins_add_status_sections_relay_clients_and_graphite_destinations(tmp_path: Path) -> None:
    """The relay server lists its clients (name, address, last ack, lag); graphite-out its destinations
    (a dead one is down, its queue shown); both through the hook `agent_control_sections`."""
    collector_toml = """
[agent]
data_dir = "data"
self_metrics_interval = "0s"
[plugins.relay-server]
address = "127.0.0.1:0"
[plugins.graphite-out]
admin_http = ""
admin_line = ""
[[plugins.graphite-out.routes]]
key = "carbon"
type = "send_all_match"
destinations = ["127.0.0.1:1"]
"""
    node_toml = """
[agent]
data_dir = "data"
self_metrics_interval = "0s"
[plugins.system]
poll_interval = "100ms"
flush_interval = "100ms"
per_cpu = false
[plugins.relay-client]
client_name = "node-7"
relay_server = "{server}"
disk_buffer = false
"""
    collector, node = tmp_path / "collector", tmp_path / "node"
    with (
        testing.run_agent(collector_toml, directory=collector) as collector_agent,
        testing.run_agent(
            node_toml.format(server=collector_agent.addresses("relay-server")[0]), directory=node
        ) as node_agent,
    ):
        client = ControlClient(collector / "data" / "control.sock")

        def sections() -> dict[str, list[dict[str, Any]]] | None:
            try:
                status = client.request("status")
            except NoAgent:
                return None
            found = {s["name"]: s["rows"] for s in status["sections"]}
            clients = found.get("relay-server clients") or []
            if clients and clients[0]["last ack"] > 0 and found.get("graphite-out destinations"):
                return found
            return None

        found = testing.wait_for(
            sections,
            30,
            "a relay client acknowledged and a destination listed",
            watch=[collector_agent, node_agent],
        )
        [row] = found["relay-server clients"]
        assert row["client"] == "node-7" and row["address"].startswith("127.0.0.1:")
        assert {"last ack", "lag (batches)"} <= set(row)
        [destination] = found["graphite-out destinations"]
        assert destination["address"].startswith("127.0.0.1:1") and destination["route"] == "carbon"
        down = wait_for(
            lambda: (
                [d for d in client.request("status")["sections"] if d["name"] == "graphite-out destinations"][
                    0
                ]["rows"][0]["state"]
                != "up"
            ),
            what="the dead destination is not up",
        )
        assert down
        routes = subprocess.run(
            AGENT
            + [
                "control",
                "run",
                "graphite-out destinations",
                "routes",
                "--config",
                str(collector / "agent.toml"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert routes.returncode == 0, routes.stderr
        assert json.loads(routes.stdout)[0]["key"] == "carbon"
