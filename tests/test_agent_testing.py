"""agent.testing's process harness and service check, as a plugin author's tests use them: a real agent
that is always killed, its ports from the readiness line, waits that fail with the agent's log."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import trio

from agent.testing import open_agent, require_service, run_agent, wait_for, wait_for_async

LISTENERS = """
[agent]
self_metrics_interval = "0s"

[plugins.graphite-in]
plaintext = "127.0.0.1:0"
pickle = ""
udp = "127.0.0.1:0"

[plugins.relay-server]
address = "127.0.0.1:0"

[plugins.csv]
path = "out.csv"
flush_interval = "0s"
"""


def test_the_readiness_line_gives_every_bound_port_and_sigterm_drains(tmp_path: Path) -> None:
    with run_agent(LISTENERS, directory=tmp_path) as agent:
        assert set(agent.ready) == {"graphite-in", "relay-server"}
        assert agent.addresses("graphite-in", "udp")[0].startswith("127.0.0.1:")
        assert agent.port("relay-server") > 0
        with socket.create_connection(("127.0.0.1", agent.port("graphite-in", "plaintext"))) as sender:
            sender.sendall(b"harness.test 42 1700000000\n")
        out = tmp_path / "out.csv"
        agent.wait_for(lambda: out.exists() and "harness.test;" in out.read_text(), what="the point in csv")
        assert agent.stop() == 0
    assert "SIGTERM received" in agent.stderr
    assert (tmp_path / "agent.toml").read_text() == LISTENERS


def test_the_agent_is_killed_when_the_test_fails(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="the test failed"):
        with run_agent(LISTENERS, directory=tmp_path) as agent:
            raise AssertionError("the test failed")
    assert agent.returncode == -signal.SIGKILL


def test_the_commands_of_agent_exec_are_killed_with_it(tmp_path: Path) -> None:
    command = "import os, time; print(os.getpid(), flush=True); time.sleep(60)"
    with run_agent(
        "[plugins.csv]\n", "exec", "--", sys.executable, "-c", command, directory=tmp_path
    ) as agent:
        pid = int(agent.wait_for(lambda: agent.stdout.strip(), what="the command's pid"))

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(gone, timeout=10, what=f"the command (pid {pid}) to go")


def test_an_agent_that_cannot_start_fails_the_wait_with_its_log(tmp_path: Path) -> None:
    with pytest.raises(AssertionError) as failure:
        with run_agent("[plugins.csv]\nflush_interval = 'soon'\n", directory=tmp_path):
            pass
    assert "agent exited (2) before it was ready" in str(failure.value)
    assert "config error: plugins.csv.flush_interval: expected a duration" in str(failure.value)
    # Without waiting for readiness, the exit code is the test's to check.
    with run_agent("[plugins.nosuch]\n", directory=tmp_path, ready=False) as agent:
        assert agent.wait() == 2
    assert agent.stderr.startswith("config error: plugins.nosuch: no plugin of that name")


def test_waits_time_out_naming_what_and_fail_at_once_when_the_agent_exits(tmp_path: Path) -> None:
    with run_agent("[plugins.csv]\n", directory=tmp_path, name="node-1") as agent:
        started = time.monotonic()
        with pytest.raises(
            AssertionError, match=r"timed out after 0.2s waiting for the impossible\n--- node-1"
        ):
            agent.wait_for(lambda: False, timeout=0.2, what="the impossible")
        agent.send_signal(signal.SIGTERM)
        with pytest.raises(AssertionError, match=r"node-1 exited \(0\) while waiting for more points"):
            agent.wait_for(lambda: False, timeout=30, what="more points")
        assert time.monotonic() - started < 20
    assert wait_for(lambda: 7, timeout=1) == 7  # the predicate's value comes back


async def test_open_agent_in_a_trio_test_is_killed_when_the_test_times_out(tmp_path: Path) -> None:
    with trio.fail_after(30):
        with trio.move_on_after(20) as timeout:
            async with open_agent(LISTENERS, directory=tmp_path) as agent:
                assert agent.port("relay-server") > 0
                timeout.deadline = trio.current_time() + 0.1
                await trio.sleep_forever()  # a test stuck waiting for something that never comes
    assert timeout.cancelled_caught
    assert agent.returncode == -signal.SIGKILL


async def test_open_agent_waits_and_stops_without_blocking_trio(tmp_path: Path) -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.01)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tick)
            async with open_agent(LISTENERS, directory=tmp_path) as agent:
                await agent.wait_for_async(lambda: "listening" in agent.stderr, what="the log")
                assert await agent.stop_async() == 0
            nursery.cancel_scope.cancel()
    assert ticks > 5  # the clock ran while the agent started and stopped
    assert await wait_for_async(lambda: "ok", timeout=1) == "ok"


def test_run_agent_without_a_directory_uses_a_temporary_one_and_removes_it() -> None:
    with run_agent("[plugins.csv]\n") as agent:
        folder = agent.directory
        assert (folder / "agent.toml").read_text() == "[plugins.csv]\n"
        assert agent.stop() == 0
    assert not folder.exists()


def test_require_service_passes_skips_or_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        require_service("fake service", "127.0.0.1", port)  # reachable: the test goes on
    # Closed now: nothing listens on that port.
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=rf"fake service is not reachable on 127.0.0.1:{port} \("):
        require_service("fake service", "127.0.0.1", port)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"not reachable on .*; CI must provide it"):
        require_service("fake service", "127.0.0.1", port)
