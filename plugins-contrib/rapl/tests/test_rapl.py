"""The rapl source on a fake powercap tree: discovery, joules and watts, wrap-around, errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

try:
    from agent_rapl.plugin import RaplConfig, RaplPlugin, RaplSource, discover_domains, energy_delta_uj
except ImportError:  # the distribution is installed by .ci/run; a dev venv may lack it
    if os.environ.get("CI") == "true":
        raise
    pytest.skip(
        "agent-plugin-rapl is not installed (pip install -e plugins-contrib/rapl)", allow_module_level=True
    )

from agent.config import ConfigError, convert_section
from agent.model import MetricRegistry
from agent.plugin import StartContext
from agent.testing import poll_once

MAX = 262_143_328_850


def make_zone(root: Path, dirname: str, name: str, energy: int, max_range: int = MAX) -> Path:
    zone = root / dirname
    zone.mkdir(parents=True)
    (zone / "name").write_text(name + "\n")
    (zone / "energy_uj").write_text(f"{energy}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_range}\n")
    return zone


@pytest.fixture
def powercap(tmp_path: Path) -> Path:
    """Two packages, each with core and dram subdomains, a psys zone, and an mmio duplicate."""
    root = tmp_path / "powercap"
    make_zone(root, "intel-rapl:0", "package-0", 1_000_000)
    make_zone(root, "intel-rapl:0:0", "core", 500_000)
    make_zone(root, "intel-rapl:0:1", "dram", 200_000)
    make_zone(root, "intel-rapl:1", "package-1", 3_000_000)
    make_zone(root, "intel-rapl:1:0", "dram", 0)
    make_zone(root, "intel-rapl:2", "psys", 10)
    make_zone(root, "intel-rapl-mmio:0", "package-0", 1_000_000)
    (root / "intel-rapl").mkdir()  # the control type folder
    return root


def set_energy(root: Path, dirname: str, energy: int) -> None:
    (root / dirname / "energy_uj").write_text(f"{energy}\n")


def start(root: Path, **table: object) -> tuple[RaplSource, MetricRegistry]:
    registry = MetricRegistry()
    ctx = StartContext("rapl", registry, root, None)
    config = convert_section({"powercap_root": str(root), **table}, RaplConfig, "plugins.rapl")
    RaplPlugin().start(ctx, config)
    [element] = ctx.elements
    return element.obj, registry


def points(batch) -> dict[tuple[str, str, str, str], float]:
    return {
        (s.metric, s.resource.kind, s.resource.id, s.attributes["domain"]): v
        for s in batch.series
        for v in s.values
    }


async def test_joules_and_watts_per_package_and_dram(powercap: Path) -> None:
    source, registry = start(powercap)
    assert {(d.name, d.unit) for d in registry} == {("rapl_consumed_energy", "J"), ("rapl_power", "W")}
    assert [(d.domain, d.resource.kind, d.resource.id) for d in source.domains] == [
        ("package", "cpu_package", "0"),
        ("dram", "dram", "0"),
        ("package", "cpu_package", "1"),
        ("dram", "dram", "1"),
    ]
    # The first poll only records the counters.
    assert len(await poll_once(source, 10_000_000_000)) == 0

    set_energy(powercap, "intel-rapl:0", 1_000_000 + 30_000_000)  # +30 J
    set_energy(powercap, "intel-rapl:0:1", 200_000 + 4_000_000)  # +4 J
    set_energy(powercap, "intel-rapl:1", 3_000_000 + 15_000_000)  # +15 J
    batch = await poll_once(source, 12_000_000_000)  # 2 s later
    assert points(batch) == {
        ("rapl_consumed_energy", "cpu_package", "0", "package"): 30.0,
        ("rapl_power", "cpu_package", "0", "package"): 15.0,
        ("rapl_consumed_energy", "dram", "0", "dram"): 4.0,
        ("rapl_power", "dram", "0", "dram"): 2.0,
        ("rapl_consumed_energy", "cpu_package", "1", "package"): 15.0,
        ("rapl_power", "cpu_package", "1", "package"): 7.5,
        ("rapl_consumed_energy", "dram", "1", "dram"): 0.0,
        ("rapl_power", "dram", "1", "dram"): 0.0,
    }
    assert {t for s in batch.series for t in s.timestamps} == {12_000_000_000}


async def test_wrap_around_uses_the_range(powercap: Path) -> None:
    source, _ = start(powercap, domains=["package"])
    set_energy(powercap, "intel-rapl:0", MAX - 1_000_000)
    await poll_once(source, 0)
    set_energy(powercap, "intel-rapl:0", 2_000_000)  # wrapped: 1 J before the wrap, 2 J after
    batch = await poll_once(source, 1_000_000_000)
    assert points(batch)[("rapl_consumed_energy", "cpu_package", "0", "package")] == pytest.approx(3.0)
    assert energy_delta_uj(10, 25, 100) == 15
    assert energy_delta_uj(90, 5, 100) == 15


async def test_other_domains_on_request(powercap: Path) -> None:
    source, _ = start(powercap, domains=["core", "psys"])
    assert [(d.domain, d.resource.kind, d.resource.id) for d in source.domains] == [
        ("core", "cpu_package", "0"),
        ("psys", "local_machine", ""),
    ]


async def test_a_counter_that_fails_at_runtime_costs_only_its_domain(powercap: Path, caplog) -> None:
    source, _ = start(powercap, domains=["package"])
    await poll_once(source, 0)
    (powercap / "intel-rapl:1" / "energy_uj").unlink()
    set_energy(powercap, "intel-rapl:0", 2_000_000)
    batch = await poll_once(source, 1_000_000_000)
    assert points(batch) == {
        ("rapl_consumed_energy", "cpu_package", "0", "package"): 1.0,
        ("rapl_power", "cpu_package", "0", "package"): 1.0,
    }
    assert "cannot read" in caplog.text and "intel-rapl:1" in caplog.text
    # Back again: a new interval starts, no delta over the gap.
    set_energy(powercap, "intel-rapl:1", 5_000_000)
    assert len(points(await poll_once(source, 2_000_000_000))) == 2
    assert len(points(await poll_once(source, 3_000_000_000))) == 4


def test_no_domain_is_a_clear_start_error(tmp_path: Path) -> None:
    with pytest.raises(
        RuntimeError, match=rf"^no RAPL domain under {tmp_path}/missing: .* does not exist.*permissions\?"
    ):
        start(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="has no intel-rapl:N zone"):
        start(tmp_path / "empty")


def test_unreadable_counters_are_named_in_the_start_error(powercap: Path, monkeypatch) -> None:
    # The tests may run as root, which reads any file: simulate the kernel's 0400 energy_uj instead.
    real_read_text = Path.read_text

    def read_text(self: Path, *args, **kwargs) -> str:
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(RuntimeError) as error:
        start(powercap)
    message = str(error.value)
    assert message.startswith(
        f"no RAPL domain under {powercap}: {powercap}/intel-rapl:0/energy_uj: permission denied;"
    )
    assert "permissions?" in message


def test_partly_readable_tree_starts_with_a_warning(powercap: Path, caplog) -> None:
    (powercap / "intel-rapl:1:0" / "energy_uj").write_text("garbage\n")
    source, _ = start(powercap)
    assert [d.resource for d in source.domains if d.domain == "dram"] == [source.domains[1].resource]
    assert "RAPL zone left out: intel-rapl:1:0 (dram)" in caplog.text


def test_discovery_ignores_mmio_and_unknown_zones(powercap: Path) -> None:
    make_zone(powercap, "intel-rapl:3", "mystery", 0)
    domains, problems = discover_domains(powercap, ["package", "dram", "core", "uncore", "psys"])
    assert len(domains) == 6 and problems == []
    assert all("mmio" not in d.path.name for d in domains)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"domains": ["gpu"]}, r"unknown domains \['gpu'\]"),
        ({"domains": []}, "domains must name at least one domain"),
        ({"poll_interval": "10s"}, "flush_interval .* must not be shorter than poll_interval"),
    ],
)
def test_bad_config(table: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=f"plugins.rapl: {message}"):
        convert_section(table, RaplConfig, "plugins.rapl")


def test_domains_are_announced_as_resources(powercap: Path) -> None:
    from agent import EventBus
    from agent.testing import start_plugin

    events = EventBus()
    start_plugin(RaplPlugin, {"powercap_root": str(powercap)}, events=events)
    announced = [(e.kind, e.resource.kind, e.resource.id, e.attributes["domain"]) for e in events.active()]
    assert announced == [
        ("resource_started", "cpu_package", "0", "package"),
        ("resource_started", "dram", "0", "dram"),
        ("resource_started", "cpu_package", "1", "package"),
        ("resource_started", "dram", "1", "dram"),
    ]
