"""A plugin from another distribution: once `plugins-contrib/rapl` is pip-installed, the agent lists it
with its distribution as origin and runs it, with no change to the core.

.ci/run installs it (`pip install -e ./plugins-contrib/rapl`). Under CI=true a missing `agent_rapl` is
a failure; elsewhere these tests are skipped with the command that installs it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.testing import run_agent, wait_for


@pytest.fixture(autouse=True)
def rapl_installed() -> None:
    if importlib.util.find_spec("agent_rapl") is None:
        message = "agent-plugin-rapl is not installed (pip install -e plugins-contrib/rapl)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must install it")
        pytest.skip(message)


#: The end of each csv row of the package's power.
PACKAGE_POWER = ";cpu_package;0;local_machine;;domain=package"


def agent_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent.cli", *args]


def make_powercap(root: Path) -> Path:
    for dirname, name in (("intel-rapl:0", "package-0"), ("intel-rapl:0:0", "dram")):
        zone = root / dirname
        zone.mkdir(parents=True)
        (zone / "name").write_text(name + "\n")
        (zone / "energy_uj").write_text("1000000\n")
        (zone / "max_energy_range_uj").write_text("262143328850\n")
    return root


def test_plugins_list_shows_rapl_from_its_distribution(tmp_path: Path) -> None:
    version = importlib.metadata.version("agent-plugin-rapl")
    proc = subprocess.run(
        agent_command("--config", str(tmp_path / "agent.toml"), "plugins", "list"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert re.fullmatch(
        rf"rapl\s+0\.1\.0\s+source\s+no\s+>=1,<2\s+agent-plugin-rapl {re.escape(version)}", rows["rapl"]
    )
    assert rows["csv"].endswith("built-in")
    assert not (tmp_path / "agent.toml").exists()  # listing never writes a config


def test_agent_runs_rapl_on_a_fake_tree_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    powercap = make_powercap(tmp_path / "powercap")
    csv_path = tmp_path / "out.csv"
    config = f"""
[agent]
data_dir = "data"
self_metrics_interval = "0s"
grace_period = "5s"

[plugins.rapl]
powercap_root = "{powercap}"
poll_interval = "100ms"
flush_interval = "100ms"

[plugins.csv]
path = "{csv_path}"
flush_interval = "100ms"
"""
    counter = powercap / "intel-rapl:0" / "energy_uj"
    energy = 1_000_000

    def package_power_rows() -> int:
        """Moves the package's counter on (0.5 J a call, about every 50 ms: about 10 W), as the kernel
        would, and counts the package's power rows written so far."""
        nonlocal energy
        energy += 500_000
        # Replaced in one step: a reader never sees a half-written counter.
        (counter.parent / "energy_uj.new").write_text(f"{energy}\n")
        os.replace(counter.parent / "energy_uj.new", counter)
        text = csv_path.read_text() if csv_path.exists() else ""
        return text.count(PACKAGE_POWER)

    with run_agent(config, "--plugins", "rapl,csv", directory=tmp_path) as agent:
        wait_for(lambda: package_power_rows() >= 4, 30, "4 package power rows", watch=[agent], every=0.05)
        assert agent.stop(timeout=20) == 0, agent.stderr
    assert re.search(r"started plugins: (rapl, csv|csv, rapl)$", agent.stderr, re.MULTILINE), agent.stderr

    lines = csv_path.read_text().splitlines()
    package_power = [
        float(line.split(";")[2])
        for line in lines
        if line.startswith("rapl_power;") and PACKAGE_POWER in line
    ]
    dram_energy = [line for line in lines if line.startswith("rapl_consumed_energy;") and ";dram;0;" in line]
    assert package_power and dram_energy
    assert all(line.split(";")[2] == "0.0" for line in dram_energy)  # its counter never moved
    # Writes every 50 ms, polls every 100 ms: around 10 W, allowing for a loaded machine's timing.
    assert 2.0 < sorted(package_power)[len(package_power) // 2] < 30.0
