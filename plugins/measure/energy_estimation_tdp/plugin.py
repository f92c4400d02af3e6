"""The `energy-estimation-tdp` source: the CPU package's energy, estimated from the machine's CPU use and
its TDP, for machines without RAPL (VMs, many ARM boards, this one).

Model (Alumet's, corrected to give energy rather than power): each second of busy CPU time costs
`tdp / n` joules, where n is the number of CPUs in /proc/stat. Over a poll interval:

    estimated_energy = tdp * busy_ticks / (n * ticks_per_second)

so a fully busy machine draws `tdp` watts and an idle one nothing. Busy time is every state of
/proc/stat but idle, iowait and the guest states (already counted in user and nice). Every point carries
`estimated = true`. The first poll gives 0 J: it opens the intervals, each later point covering the
time since the previous one.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from agent import (
    LOCAL_MACHINE_CONSUMER,
    BatchBuilder,
    Plugin,
    PolledSource,
    PolledSourceConfig,
    Resource,
    StartContext,
    hookimpl,
)
from agent_plugins.measure.linux.proc import busy_ticks, counter_delta, parse_kernel_stat

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
#: The resource of the estimate: every CPU package of the machine together.
CPU_PACKAGE = Resource("cpu_package", "")
ESTIMATED = {"estimated": True}


class TdpConfig(PolledSourceConfig, kw_only=True):
    """The `[plugins.energy-estimation-tdp]` table."""

    tdp: float = 100.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.tdp > 0:
            raise ValueError(f"tdp: must be a positive number of watts, got {self.tdp}")


def estimated_joules(tdp: float, busy: int, cpus: int) -> float:
    """The energy of `busy` ticks of CPU time on a machine of `cpus` CPUs whose package draws `tdp` W
    when every CPU is busy."""
    return tdp * busy / (cpus * TICKS_PER_SECOND)


class TdpSource(PolledSource):
    def __init__(self, config: TdpConfig, stat_path: Path = Path("/proc/stat")) -> None:
        self.tdp = float(config.tdp)
        self.poll_interval = float(config.poll_interval)
        self.flush_interval = float(config.flush_interval)
        self.stat_path = stat_path
        self._previous_busy: int | None = None

    def _sample(self) -> tuple[int, int]:
        stat = parse_kernel_stat(self.stat_path.read_text())
        cpus = sum(1 for name in stat.cpus if name != "cpu") or 1
        return busy_ticks(stat.cpus["cpu"]), cpus

    async def poll(self, points: BatchBuilder, timestamp_ns: int) -> None:
        busy, cpus = await trio.to_thread.run_sync(self._sample)
        previous, self._previous_busy = self._previous_busy, busy
        delta = 0 if previous is None else counter_delta(previous, busy)
        points.add(
            "estimated_energy",
            estimated_joules(self.tdp, delta, cpus),
            timestamp_ns,
            CPU_PACKAGE,
            LOCAL_MACHINE_CONSUMER,
            ESTIMATED,
        )


class TdpPlugin(Plugin):
    name = "energy-estimation-tdp"
    version = "0.1.0"
    agent_api = ">=1,<2"
    description = "CPU package energy estimated from CPU use and a TDP (for machines without RAPL)."
    Config = TdpConfig
    provides = ("source",)

    def start(self, ctx: StartContext, config: TdpConfig) -> None:
        if not Path("/proc/stat").is_file():
            raise RuntimeError("/proc/stat is missing: the CPU use cannot be read")
        ctx.create_metric(
            "estimated_energy",
            "J",
            "float",
            "CPU package energy since the previous poll, estimated from CPU use and the configured TDP",
        )
        ctx.events.resource_started(CPU_PACKAGE, estimated=True, tdp=float(config.tdp))
        ctx.add_source(TdpSource(config))


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [TdpPlugin]
