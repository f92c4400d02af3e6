"""`agent exec` and `agent watch` as a user runs them: the command's processes measured as consumers,
the summary on stderr, signals passed on, the PID checks of `watch`."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

from agent.testing import run_agent

AGENT = [sys.executable, "-m", "agent.cli"]
MEASURE = ["--plugins", "procfs,energy-estimation-tdp,energy-attribution,csv"]
BURN = "import os, time\nos.write(1, (str(os.getpid()) + '\\n').encode())  # one write: children print at once\nend = time.time() + {seconds}\nwhile time.time() < end: pass"


def run(args: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(AGENT + args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f, delimiter=";"))


def of_process(table: list[dict[str, str]], metric: str, pid: str) -> list[float]:
    return [float(r["value"]) for r in table if r["metric"] == metric and r["consumer_kind"] == "process"
            and r["consumer_id"] == pid]


def test_exec_measures_the_command_and_prints_a_summary(tmp_path: Path) -> None:
    # The "done when" of the issue: an empty folder, no config file.
    result = run(["exec", *MEASURE, "--", sys.executable, "-c", BURN.format(seconds=2)], tmp_path)
    assert result.returncode == 0, result.stderr
    pid = result.stdout.split()[0]
    table = rows(tmp_path / "agent-output.csv")
    cpu = of_process(table, "cpu_time_delta", pid)
    energy = of_process(table, "attributed_energy", pid)
    assert sum(cpu) > 0.2 and sum(energy) > 0, result.stderr
    assert all(r["attributes"] == "estimated=true" for r in table if r["metric"] == "attributed_energy")
    energy_line = next(line for line in result.stderr.splitlines() if "energy" in line and " J " in line)
    assert "estimated" in energy_line
    cpu_line = next(line for line in result.stderr.splitlines() if line.strip().startswith("cpu"))
    assert re.search(r"\d+\.\d+ s", cpu_line)
    # The summary's energy is what the CSV holds for the command.
    summary_joules = float(re.search(r"([\d.]+) J", energy_line).group(1))
    assert summary_joules == round(sum(energy), 3) or abs(summary_joules - sum(energy)) < 0.01


def test_exec_attributes_never_exceed_the_machine(tmp_path: Path) -> None:
    script = f"import subprocess, sys\nps = [subprocess.Popen([sys.executable, '-c', {BURN.format(seconds=1.5)!r}]) for _ in range(2)]\n[p.wait() for p in ps]"
    result = run(["exec", *MEASURE, "--", sys.executable, "-c", script], tmp_path)
    assert result.returncode == 0, result.stderr
    table = rows(tmp_path / "agent-output.csv")
    children = result.stdout.split()
    for pid in children:  # each child is a consumer of its own
        assert sum(of_process(table, "cpu_time_delta", pid)) > 0, (pid, result.stderr)
    machine = {r["timestamp"]: float(r["value"]) for r in table if r["metric"] == "estimated_energy"}
    shared: dict[str, float] = {}
    for r in table:
        if r["metric"] == "attributed_energy" and r["consumer_kind"] == "process":
            shared[r["timestamp"]] = shared.get(r["timestamp"], 0.0) + float(r["value"])
    assert shared
    for timestamp, joules in shared.items():
        assert joules <= machine[timestamp] + 1e-9
    assert "3 processes" in result.stderr


def test_exec_passes_sigterm_on_and_measures_until_the_command_exits(tmp_path: Path) -> None:
    script = (
        "import signal, sys, time\n"
        "def bye(*_):\n    time.sleep(0.5); print('bye', flush=True); sys.exit(7)\n"
        "signal.signal(signal.SIGTERM, bye)\nprint('up', flush=True)\ntime.sleep(60)"
    )
    with run_agent(None, "exec", *MEASURE, "--", sys.executable, "-c", script, directory=tmp_path) as agent:
        agent.wait_for(lambda: agent.stdout == "up\n", what="the command to start")
        assert agent.stop() == 7, agent.stderr
    assert agent.stdout == "up\nbye\n" and "SIGTERM received: passed on to the command" in agent.stderr
    assert "exited with code 7" in agent.stderr


def test_options_after_the_sub_command(tmp_path: Path) -> None:
    config = tmp_path / "elsewhere.toml"
    config.write_text("[plugins.csv]\npath = 'out.csv'\n[plugins.procfs]\n")
    result = run(["exec", "--config", str(config), "--", sys.executable, "-c", "print(1)"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.csv").exists() and not (tmp_path / "agent.toml").exists()
    assert "energy       not measured" in result.stderr
    result = run(["--plugins", "csv", "watch", "--plugins", "procfs,csv", "--config", str(config), "999999999"], tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == "watch: no process with PID 999999999"


def test_watch_measures_a_running_process_until_it_exits(tmp_path: Path) -> None:
    target = subprocess.Popen([sys.executable, "-c", BURN.format(seconds=600)], stdout=subprocess.PIPE, text=True)
    try:
        assert target.stdout is not None
        pid = target.stdout.readline().strip()
        with run_agent(None, "watch", *MEASURE, pid, directory=tmp_path) as watcher:
            output = tmp_path / "agent-output.csv"
            # Measured while it runs: its CPU time shows in the CSV (waiting for it, however loaded the
            # machine); the watcher fails the wait if it exits first.
            watcher.wait_for(
                lambda: output.exists() and sum(of_process(rows(output), "cpu_time_delta", pid)) > 0,
                60,
                "the process's CPU time in the csv",
                every=0.2,
            )
            target.kill()
            assert watcher.wait(30) == 0, watcher.stderr
    finally:
        if target.poll() is None:
            target.kill()
        target.wait()
    stderr = watcher.stderr
    assert f"process {pid}" in stderr and re.search(r"energy +[\d.]+ J", stderr)
    assert re.search(r"cpu +[\d.]+ s", stderr)


def test_watch_a_pid_that_does_not_exist_exits_2_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    result = run(["watch", str(proc.pid)], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"watch: no process with PID {proc.pid}"
    assert not os.path.exists(tmp_path / "agent-output.csv")
