"""The `agent` command as a user runs it: real processes, real files, real signals."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

AGENT = [sys.executable, "-m", "agent.cli"]


def run(args: list[str], cwd: Path, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        AGENT + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


@contextlib.contextmanager
def started(args: list[str], cwd: Path) -> Iterator[subprocess.Popen]:
    """An agent process that is killed if the test leaves without stopping it."""
    proc = subprocess.Popen(AGENT + args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f, delimiter=";"))


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_no_config_generates_one_and_writes_csv(tmp_path: Path) -> None:
    with started([], tmp_path) as proc:
        output = tmp_path / "agent-output.csv"
        wait_for(lambda: output.exists() and len(read_csv(output)) > 0)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "no config file, wrote one" in stderr
    config = (tmp_path / "agent.toml").read_text()
    assert "[plugins.system]" in config and "[plugins.csv]" in config
    rows = read_csv(tmp_path / "agent-output.csv")
    metrics = {r["metric"] for r in rows}
    assert any(m.startswith("cpu") for m in metrics), metrics
    assert set(rows[0]) >= {"metric", "timestamp", "value", "resource_kind", "resource_id", "consumer_kind", "consumer_id"}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ('[plugins.csv]\nenable = true\nflush_interval = "soon"\n', "config error: plugins.csv.flush_interval: expected a duration"),
        ("[plugins.csv]\nenable = true\npth = 'x.csv'\n", "config error: plugins.csv.pth: unknown key"),
        ("[plugins.nosuch]\nenable = true\n", "config error: plugins.nosuch: no plugin of that name is installed"),
        ("[plugins.csv\n", "config error: "),
        ('[agent]\ngrace_period = "forever"\n', "config error: agent.grace_period: expected a duration"),
    ],
)
def test_config_errors_exit_2_with_one_line(tmp_path: Path, config: str, expected: str) -> None:
    path = write_config(tmp_path, config)
    result = run(["--config", str(path)], tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(expected), result.stderr
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_config_from_env_var(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[plugins.csv]\nenable = true\nflush_interval = 'bad'\n")
    result = run([], tmp_path, env={"AGENT_CONFIG": str(path)})
    assert result.returncode == 2 and "plugins.csv.flush_interval" in result.stderr


def test_once_polls_and_flushes_then_exits_0(tmp_path: Path) -> None:
    write_config(tmp_path, "[plugins.system]\nenable = true\n[plugins.csv]\nenable = true\npath = 'once.csv'\n")
    result = run(["--once"], tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_csv(tmp_path / "once.csv")
    assert len({r["timestamp"] for r in rows if r["metric"].startswith("memory")}) == 1


def test_sigterm_writes_every_buffered_point(tmp_path: Path) -> None:
    # Sources flush only every hour and the CSV output too: everything measured is still buffered when
    # SIGTERM comes, and must be written anyway.
    write_config(
        tmp_path,
        "[agent]\nself_metrics_interval = '0s'\n"
        "[plugins.system]\nenable = true\npoll_interval = '200ms'\nflush_interval = '1h'\n"
        "[plugins.csv]\nenable = true\nflush_interval = '1h'\n",
    )
    with started([], tmp_path) as proc:
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    rows = read_csv(tmp_path / "agent-output.csv")
    polls = {r["timestamp"] for r in rows if r["metric"].startswith("memory")}
    assert len(polls) >= 5, stderr


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
    assert lines["csv"][4] == "built-in"


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
