"""energy-estimation-tdp: the estimate from /proc/stat samples, and the source on this machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent import Event
from agent.config import ConfigError
from agent.testing import poll_once, start_plugin
from agent_plugins.measure.energy_estimation_tdp.plugin import (
    TdpConfig,
    TdpPlugin,
    TdpSource,
    estimated_joules,
)


def stat_text(user: int, idle: int, guest: int = 0) -> str:
    return (
        f"cpu  {user} 0 0 {idle} 0 0 0 0 {guest} 0\n"
        f"cpu0 {user // 2} 0 0 {idle // 2} 0 0 0 0 0 0\n"
        f"cpu1 {user - user // 2} 0 0 {idle - idle // 2} 0 0 0 0 0 0\nctxt 1\n"
    )


async def test_a_fully_busy_machine_draws_the_tdp(tmp_path: Path) -> None:
    path = tmp_path / "stat"
    path.write_text(stat_text(0, 0))
    source = TdpSource(TdpConfig(tdp=50.0), stat_path=path)
    first = await poll_once(source)
    [series] = first.series
    assert series.values == [0.0] and series.attributes == {"estimated": True}
    assert series.resource.kind == "cpu_package" and series.metric == "estimated_energy"
    ticks = os.sysconf("SC_CLK_TCK")
    # Both CPUs busy for 2 s (guest time is inside user time, not counted twice), then idle for 2 s.
    path.write_text(stat_text(4 * ticks, 0, guest=ticks))
    assert (await poll_once(source)).series[0].values == [pytest.approx(100.0)]
    path.write_text(stat_text(4 * ticks, 4 * ticks, guest=ticks))
    assert (await poll_once(source)).series[0].values == [0.0]


def test_half_busy_is_half_the_power() -> None:
    ticks = os.sysconf("SC_CLK_TCK")
    assert estimated_joules(100.0, 1 * ticks, 2) == pytest.approx(50.0)


async def test_it_runs_without_a_config_and_announces_its_resource() -> None:
    from agent import EventBus

    events = EventBus()
    seen: list[Event] = []
    events.subscribe(seen.append)
    ctx = start_plugin(TdpPlugin, {}, events=events)
    assert ctx.registry.get("estimated_energy").unit == "J"
    assert [e.kind for e in seen] == ["resource_started"] and seen[0].attributes["estimated"] is True
    [source] = [e.obj for e in ctx.elements]
    batch = await poll_once(source)
    assert batch.series[0].values == [0.0]


def test_a_bad_tdp_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="tdp"):
        start_plugin(TdpPlugin, {"tdp": 0})
