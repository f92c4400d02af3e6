"""The `agent` command as a user runs it: real processes, real files, real signals."""

from __future__ import annotations

import csv
import os
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from agent.manager import build_plugin_manager, collect_plugins
from agent.testing import run_agent

from .test_third_party_plugins import install_fake_distribution

AGENT = [sys.executable, "-m", "agent.cli"]


def run(
    args: list[str], cwd: Path, timeout: float = 60, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        AGENT + args,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f, delimiter=";"))


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_no_config_generates_one_and_writes_csv(tmp_path: Path) -> None:
    with run_agent(None, directory=tmp_path) as agent:
        output = tmp_path / "agent-output.csv"
        # Within a few seconds: the first poll goes out at once (about 1.5 s on an idle machine).
        agent.wait_for(lambda: output.exists() and len(read_csv(output)) > 0, 10, "rows in the csv file")
        assert agent.stop() == 0, agent.stderr
    stderr = agent.stderr
    assert "no config file, wrote one" in stderr
    config = tomllib.loads((tmp_path / "agent.toml").read_text())
    installed = collect_plugins(build_plugin_manager())
    assert set(config["plugins"]) == set(installed)
    assert {name for name, table in config["plugins"].items() if table["enable"]} == {"system", "csv"}
    rows = read_csv(tmp_path / "agent-output.csv")
    metrics = {r["metric"] for r in rows}
    assert any(m.startswith("cpu") for m in metrics), metrics
    assert set(rows[0]) >= {
        "metric",
        "timestamp",
        "value",
        "resource_kind",
        "resource_id",
        "consumer_kind",
        "consumer_id",
    }


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            '[plugins.csv]\nenable = true\nflush_interval = "soon"\n',
            "config error: plugins.csv.flush_interval: expected a duration",
        ),
        ("[plugins.csv]\nenable = true\npth = 'x.csv'\n", "config error: plugins.csv.pth: unknown key"),
        (
            "[plugins.nosuch]\nenable = true\n",
            "config error: plugins.nosuch: no plugin of that name is installed",
        ),
        ("[plugins.csv\n", "config error: agent.toml: invalid TOML: "),
        (
            "[plugins.csv]\nqueue_max_points = 'many'\n",
            "config error: plugins.csv.queue_max_points: expected int, got str",
        ),
        ('[agent]\ngrace_period = "forever"\n', "config error: agent.grace_period: expected a duration"),
    ],
)
def test_config_errors_exit_2_with_one_line(tmp_path: Path, config: str, expected: str) -> None:
    path = write_config(tmp_path, config)
    result = run(["--config", "agent.toml"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(expected), result.stderr
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert path.read_text() == config  # left as it was


@pytest.mark.parametrize(
    ("command", "config", "expected"),
    [
        (["plugins", "list"], "[plugins.csv\n", "config error: agent.toml: invalid TOML: "),
        (
            ["exec", "--", "true"],
            "[plugins.nosuch]\n",
            "config error: plugins.nosuch: no plugin of that name",
        ),
        (
            ["--once"],
            "[plugins.csv]\nflush_interval = 'soon'\n",
            "config error: plugins.csv.flush_interval: expected",
        ),
    ],
)
def test_every_command_checks_the_config(
    tmp_path: Path, config: str, expected: str, command: list[str]
) -> None:
    write_config(tmp_path, config)
    result = run(command, tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1, result.stderr


def test_config_from_env_var(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[plugins.csv]\nenable = true\nflush_interval = 'bad'\n")
    result = run([], tmp_path, env={"AGENT_CONFIG": str(path)})
    assert result.returncode == 2 and "plugins.csv.flush_interval" in result.stderr


def test_once_polls_and_flushes_then_exits_0(tmp_path: Path) -> None:
    write_config(
        tmp_path, "[plugins.system]\nenable = true\n[plugins.csv]\nenable = true\npath = 'once.csv'\n"
    )
    result = run(["--once"], tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_csv(tmp_path / "once.csv")
    assert len({r["timestamp"] for r in rows if r["metric"].startswith("memory")}) == 1


TICKER = """
    from pathlib import Path

    from agent import (
        LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, Plugin, PolledSource, PolledSourceConfig, hookimpl,
    )

    class TickerConfig(PolledSourceConfig, kw_only=True):
        path: str = "ticks.txt"

    class TickerSource(PolledSource):
        # Measures 1, 2, 3...; writes each number to a file too, so that a test sees every poll.

        def __init__(self, config):
            self.poll_interval, self.flush_interval = config.poll_interval, config.flush_interval
            self.path, self.polls = Path(config.path), 0

        async def poll(self, points, timestamp_ns):
            self.polls += 1
            points.add("tick", self.polls, timestamp_ns, LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER)
            with self.path.open("a") as f:
                f.write(f"{self.polls}\\n")

    class Ticker(Plugin):
        name = "ticker"
        Config = TickerConfig
        provides = ("source",)

        def start(self, ctx, config):
            ctx.create_metric("tick", value_type="int")
            ctx.add_source(TickerSource(config))

    @hookimpl
    def agent_plugins():
        return [Ticker]
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_writes_every_buffered_point(tmp_path: Path, signum: signal.Signals) -> None:
    # The source flushes only every hour and the CSV output too: everything measured is still buffered
    # when the signal comes (all but the first poll, which goes out at once, in the source), and must be
    # written anyway. SIGINT (Ctrl-C) drains like SIGTERM.
    site = tmp_path / "site"
    install_fake_distribution(
        site, "agent-ticker", "1.0.0", {"agent_ticker": TICKER}, "[agent.plugins]\nticker = agent_ticker\n"
    )
    config = (
        "[agent]\nself_metrics_interval = '0s'\n"
        "[plugins.ticker]\npoll_interval = '100ms'\nflush_interval = '1h'\n"
        "[plugins.csv]\nflush_interval = '1h'\n"
    )
    ticks = tmp_path / "ticks.txt"
    with run_agent(config, directory=tmp_path, env={"PYTHONPATH": str(site)}) as agent:
        agent.wait_for(lambda: ticks.exists() and ticks.read_text().count("\n") >= 5, 20, "5 polls")
        assert agent.stop(signum=signum) == 0, agent.stderr
    assert f"{signum.name} received" in agent.stderr and "Traceback" not in agent.stderr
    polls = [int(line) for line in ticks.read_text().split()]
    written = [int(r["value"]) for r in read_csv(tmp_path / "agent-output.csv") if r["metric"] == "tick"]
    assert written == polls == list(range(1, len(polls) + 1))


def test_exec_exits_with_the_command_code(tmp_path: Path) -> None:
    write_config(tmp_path, "[plugins.system]\nenable = true\n[plugins.csv]\nenable = true\n")
    result = run(["exec", "--", sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path)
    assert result.returncode == 3, result.stderr
    rows = read_csv(tmp_path / "agent-output.csv")
    # One poll when the command starts and one after it exits.
    assert len({r["timestamp"] for r in rows if r["metric"].startswith("memory")}) >= 2
    assert run(["exec", "--", "true"], tmp_path).returncode == 0
    missing = run(["exec", "--", "/nonexistent/command"], tmp_path)
    assert missing.returncode == 127 and "cannot run" in missing.stderr


def test_plugins_list(tmp_path: Path) -> None:
    write_config(tmp_path, "[plugins.csv]\nenable = true\n")
    result = run(["plugins", "list"], tmp_path)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert {"system", "csv", "sqlite", "console", "synthetic", "discard"} <= set(lines)
    assert lines["csv"][3] == "yes" and lines["system"][3] == "no"
    assert lines["csv"][4:] == [">=1,<2", "built-in"]


def test_config_regen_rewrites_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[plugins.csv]\nenable = true\n")
    result = run(["--config", str(path), "config", "regen"], tmp_path)
    assert result.returncode == 0, result.stderr
    text = path.read_text()
    assert "[plugins.system]" in text and "[agent]" in text
    # The regenerated file is valid as it is.
    assert run(["--config", str(path), "--once"], tmp_path).returncode == 0


def test_bad_log_level(tmp_path: Path) -> None:
    result = run(["--log-level", "loud", "--once"], tmp_path)
    assert result.returncode == 2 and "--log-level" in result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--log-level", "loud", "plugins", "list"], "config error: --log-level: unknown level 'loud'"),
        (["--plugins", ",", "--once"], "config error: --plugins: expected plugin names separated by commas"),
        (
            ["--plugins", "csv,sytem", "--once"],
            "config error: --plugins: no plugin named 'sytem' is installed",
        ),
        (
            ["--relay-in", "0.0.0.0:99999", "--once"],
            "config error: --relay-in: '0.0.0.0:99999': port",
        ),
        (["--relay-out", "[bad]:1", "--once"], "config error: --relay-out: '[bad]:1'"),
    ],
)
def test_bad_command_line_values_exit_2_naming_the_flag(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    write_config(tmp_path, "[plugins.csv]\n")
    result = run(args, tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1, result.stderr


def test_agent_log_level_in_the_config_is_checked(tmp_path: Path) -> None:
    write_config(tmp_path, "[agent]\nlog_level = 'loud'\n[plugins.csv]\n")
    result = run(["--once"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(
        "config error: agent.log_level: invalid enum value 'loud'; expected one of:"
    )


def test_relay_flags_enable_their_plugins_without_a_table(tmp_path: Path) -> None:
    write_config(tmp_path, "[plugins.csv]\n")
    result = run(
        ["--relay-out", "collector.example:50051", "--relay-in", "127.0.0.1:0", "plugins", "list"], tmp_path
    )
    assert result.returncode == 0, result.stderr
    enabled = {line.split()[0]: line.split()[3] for line in result.stdout.splitlines()[1:]}
    assert enabled["relay-client"] == enabled["relay-server"] == enabled["csv"] == "yes"
    assert enabled["system"] == "no"
    # --plugins keeps them: the flag is an explicit request.
    result = run(["--plugins", "csv", "--relay-out", "collector.example:50051", "plugins", "list"], tmp_path)
    enabled = {line.split()[0]: line.split()[3] for line in result.stdout.splitlines()[1:]}
    assert [name for name, on in enabled.items() if on == "yes"] == ["csv", "relay-client"]


def test_help_lists_the_flags_that_plugins_declare(tmp_path: Path) -> None:
    result = run(["--help"], tmp_path, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "--relay-out" in result.stdout and "HOST:PORT" in result.stdout
    assert "--relay-in" in result.stdout and "ADDR:PORT" in result.stdout


def test_once_flushes_every_output_whatever_its_flush_interval(tmp_path: Path) -> None:
    write_config(
        tmp_path,
        "[plugins.system]\nflush_interval = '1h'\n"
        "[plugins.csv]\nflush_interval = '1h'\n"
        "[plugins.sqlite]\npath = 'points.sqlite3'\nflush_interval = '1h'\n",
    )
    started_at = time.monotonic()
    result = run(["--once"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started_at < 30
    csv_rows = [r for r in read_csv(tmp_path / "agent-output.csv") if r["metric"] == "memory_used"]
    conn = sqlite3.connect(tmp_path / "points.sqlite3")
    try:
        db_rows = conn.execute(
            "SELECT timestamp_ns, value FROM points WHERE metric = 'memory_used'"
        ).fetchall()
        unit = conn.execute("SELECT unit FROM metrics WHERE name = 'memory_used'").fetchall()
    finally:
        conn.close()
    assert len(csv_rows) == 1 and len(db_rows) == 1  # one poll
    assert int(csv_rows[0]["value"]) == db_rows[0][1] and unit == [("By",)]


def test_exec_polls_before_the_command_starts_and_after_it_ends(tmp_path: Path) -> None:
    write_config(tmp_path, "[plugins.system]\npoll_interval = '1h'\nflush_interval = '1h'\n[plugins.csv]\n")
    command = "import time; print(time.time_ns(), flush=True); time.sleep(0.5); print(time.time_ns())"
    result = run(["exec", "--", sys.executable, "-c", command], tmp_path)
    assert result.returncode == 0, result.stderr
    began, ended = (int(line) for line in result.stdout.split())
    polls = sorted(
        _ns(r["timestamp"]) for r in read_csv(tmp_path / "agent-output.csv") if r["metric"] == "memory_used"
    )
    assert len(polls) == 2
    assert polls[0] < began and ended < polls[1]


def _ns(rfc3339: str) -> int:
    """2026-11-22T02:14:39.123456789Z -> nanoseconds since the epoch."""
    import calendar

    seconds, fraction = rfc3339.rstrip("Z").split(".")
    return calendar.timegm(time.strptime(seconds, "%Y-%m-%dT%H:%M:%S")) * 10**9 + int(fraction)


@pytest.mark.parametrize(("script", "code"), [("kill -KILL $$", 137), ("kill -TERM $$", 143)])
def test_exec_exit_code_when_the_command_is_killed(tmp_path: Path, script: str, code: int) -> None:
    write_config(tmp_path, "[plugins.csv]\n")
    result = run(["exec", "--", "sh", "-c", script], tmp_path)
    assert result.returncode == code, result.stderr


def test_exec_interrupted_by_sigint_still_polls_after_the_command(tmp_path: Path) -> None:
    # Ctrl-C in a terminal: the agent and the command (same process group) both get SIGINT.
    config = "[plugins.system]\npoll_interval = '1h'\nflush_interval = '1h'\n[plugins.csv]\n"
    command = "import time; print('up', flush=True); time.sleep(60)"
    with run_agent(config, "exec", "--", sys.executable, "-c", command, directory=tmp_path) as agent:
        agent.wait_for(lambda: agent.stdout == "up\n", what="the command to start")
        agent.signal_group(signal.SIGINT)
        assert agent.wait() == 130, agent.stderr  # the command's: 128 + SIGINT
    polls = {r["timestamp"] for r in read_csv(tmp_path / "agent-output.csv") if r["metric"] == "memory_used"}
    assert len(polls) == 2, agent.stderr
