"""The `system` source: CPU, memory, swap, disks, network, load average and chosen processes, via psutil.

A polled source: the core calls `SystemSource.poll` every `poll_interval` and sends the points on every
`flush_interval`. The measuring (reads of /proc) runs in a worker thread, so a slow /proc never stalls the
event loop; the points are added to the batch back on the trio thread.

Counters are emitted as psutil reads them, cumulative since boot (metric names ending in `_total`);
rates are for the reader to compute. The only derived values are the CPU percentages, which need two
samples: the source keeps the previous CPU times itself (rather than psutil's module-wide state used by
`cpu_percent(interval=None)`), so two sources never disturb each other's intervals.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec
import psutil
import trio

from agent import (
    LOCAL_MACHINE,
    LOCAL_MACHINE_CONSUMER,
    BatchBuilder,
    Consumer,
    Duration,
    Plugin,
    PluginConfig,
    PolledSource,
    Resource,
    StartContext,
    ValueType,
    hookimpl,
)

log = logging.getLogger(__name__)


class SystemConfig(PluginConfig, kw_only=True):
    """The `[plugins.system]` table."""

    poll_interval: Duration = Duration(1.0)
    flush_interval: Duration = Duration(5.0)
    per_cpu: bool = True
    exclude_disks: list[str] = msgspec.field(default_factory=lambda: ["loop*", "ram*"])
    exclude_interfaces: list[str] = msgspec.field(default_factory=list)
    processes: list[str] = msgspec.field(default_factory=list)
    process_min_cpu_percent: float = 0.0
    max_processes: int = 20

    def __post_init__(self) -> None:
        if self.poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, got {self.poll_interval!r}")
        if self.flush_interval < self.poll_interval:
            raise ValueError(
                f"flush_interval ({self.flush_interval!r}) must not be shorter than poll_interval ({self.poll_interval!r})"
            )
        if self.max_processes < 1:
            raise ValueError(f"max_processes must be at least 1, got {self.max_processes}")
        if self.process_min_cpu_percent < 0:
            raise ValueError(
                f"process_min_cpu_percent must not be negative, got {self.process_min_cpu_percent}"
            )


class MetricSpec(NamedTuple):
    name: str
    unit: str
    value_type: ValueType
    description: str


#: Every metric of this plugin, registered in `start`.
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("cpu_time_total", "s", "float", "CPU time spent in each state (attribute state) since boot"),
    MetricSpec(
        "cpu_percent",
        "%",
        "float",
        "share of the CPU that was busy (not idle, not waiting for I/O) over the last poll interval",
    ),
    MetricSpec("memory_size", "By", "int", "physical memory installed"),
    MetricSpec("memory_available", "By", "int", "memory that can be given to processes without swapping"),
    MetricSpec("memory_used", "By", "int", "memory in use (total - free - buffers - cache)"),
    MetricSpec("swap_size", "By", "int", "swap space configured"),
    MetricSpec("swap_used", "By", "int", "swap space in use"),
    MetricSpec("disk_read_bytes_total", "By", "int", "bytes read from the disk since boot"),
    MetricSpec("disk_written_bytes_total", "By", "int", "bytes written to the disk since boot"),
    MetricSpec("disk_reads_total", "1", "int", "read operations completed since boot"),
    MetricSpec("disk_writes_total", "1", "int", "write operations completed since boot"),
    MetricSpec("network_received_bytes_total", "By", "int", "bytes received on the interface since boot"),
    MetricSpec("network_sent_bytes_total", "By", "int", "bytes sent on the interface since boot"),
    MetricSpec("network_received_packets_total", "1", "int", "packets received on the interface since boot"),
    MetricSpec("network_sent_packets_total", "1", "int", "packets sent on the interface since boot"),
    MetricSpec("network_receive_errors_total", "1", "int", "receive errors on the interface since boot"),
    MetricSpec("network_send_errors_total", "1", "int", "send errors on the interface since boot"),
    MetricSpec(
        "network_receive_drops_total", "1", "int", "incoming packets dropped on the interface since boot"
    ),
    MetricSpec(
        "network_send_drops_total", "1", "int", "outgoing packets dropped on the interface since boot"
    ),
    MetricSpec(
        "load_average",
        "1",
        "float",
        "average number of runnable and uninterruptible tasks (attribute window)",
    ),
    MetricSpec(
        "process_cpu_percent",
        "%",
        "float",
        "CPU used by the process over the last poll interval (100 = one core; more on several cores)",
    ),
    MetricSpec("process_memory_rss", "By", "int", "resident memory of the process"),
)

# (psutil field, metric) pairs for the per-device counters.
_DISK_FIELDS = (
    ("read_bytes", "disk_read_bytes_total"),
    ("write_bytes", "disk_written_bytes_total"),
    ("read_count", "disk_reads_total"),
    ("write_count", "disk_writes_total"),
)
_NET_FIELDS = (
    ("bytes_recv", "network_received_bytes_total"),
    ("bytes_sent", "network_sent_bytes_total"),
    ("packets_recv", "network_received_packets_total"),
    ("packets_sent", "network_sent_packets_total"),
    ("errin", "network_receive_errors_total"),
    ("errout", "network_send_errors_total"),
    ("dropin", "network_receive_drops_total"),
    ("dropout", "network_send_drops_total"),
)
_LOAD_WINDOWS = ({"window": "1m"}, {"window": "5m"}, {"window": "15m"})

#: Shorter than this between two samples, /proc/stat's 10 ms ticks make a percentage mostly noise.
MIN_CPU_PERCENT_INTERVAL = 0.05

# One measured point: metric, value, resource, consumer, attributes.
Point = tuple[str, int | float, Resource, Consumer, dict[str, Any] | None]


def cpu_busy_percent(before: Any, after: Any) -> float | None:
    """The busy share between two psutil `cpu_times` samples, as psutil's `cpu_percent` computes it:
    busy = total - idle - iowait, where the total leaves out guest time (already counted in user and
    nice on Linux). None if no time passed."""

    def total_and_idle(t: Any) -> tuple[float, float]:
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        return total, t.idle + getattr(t, "iowait", 0.0)

    total0, idle0 = total_and_idle(before)
    total1, idle1 = total_and_idle(after)
    elapsed = total1 - total0
    if elapsed <= 0:
        return None
    busy = (total1 - idle1) - (total0 - idle0)
    return min(100.0, max(0.0, 100.0 * busy / elapsed))


def matches_any(patterns: Sequence[str], *texts: str) -> bool:
    return any(fnmatch.fnmatchcase(text, pattern) for pattern in patterns for text in texts if text)


@dataclass
class _TrackedProcess:
    process: psutil.Process
    name: str
    primed: bool = False  # psutil's first cpu_percent() call only starts its interval


class SystemSource(PolledSource):
    """Reads psutil once per poll; keeps the previous CPU samples and the tracked processes."""

    def __init__(self, config: SystemConfig) -> None:
        self.config = config
        self.poll_interval = float(config.poll_interval)
        self.flush_interval = float(config.flush_interval)
        self._core_resources: list[Resource] = []
        self._state_attributes: dict[str, dict[str, Any]] = {}
        # The priming sample: the first poll's percentages cover the time since start.
        self._last_cpu_sample = self._cpu_sample()
        self._last_cpu_time = time.monotonic()
        # pid -> the tracked process, or None for a process that does not match the patterns.
        self._processes: dict[int, _TrackedProcess | None] = {}
        self._failed_sections: set[str] = set()

    # -- measuring (worker thread) --

    def _cpu_sample(self) -> tuple[Any, list[Any]]:
        return psutil.cpu_times(), (psutil.cpu_times(percpu=True) if self.config.per_cpu else [])

    def measure(self) -> list[Point]:
        """Every point of one poll. Each section fails on its own: a /proc file missing in a container
        costs that section, not the others."""
        points: list[Point] = []
        sections: tuple[tuple[str, Callable[[list[Point]], None]], ...] = (
            ("cpu", self._measure_cpu),
            ("memory", self._measure_memory),
            ("swap", self._measure_swap),
            ("load average", self._measure_load),
            ("disks", self._measure_disks),
            ("network", self._measure_network),
            ("processes", self._measure_processes),
        )
        for section, measure in sections:
            try:
                measure(points)
            except Exception as exc:
                level = logging.DEBUG if section in self._failed_sections else logging.WARNING
                self._failed_sections.add(section)
                log.log(level, "system: cannot measure %s: %s", section, exc)
        return points

    def _state_attrs(self, state: str) -> dict[str, Any]:
        attrs = self._state_attributes.get(state)
        if attrs is None:
            attrs = self._state_attributes[state] = {"state": state}
        return attrs

    def _core(self, index: int) -> Resource:
        while len(self._core_resources) <= index:
            self._core_resources.append(Resource("cpu_core", str(len(self._core_resources))))
        return self._core_resources[index]

    def _measure_cpu(self, points: list[Point]) -> None:
        total, cores = self._cpu_sample()
        now = time.monotonic()
        last_total, last_cores = self._last_cpu_sample
        with_percent = now - self._last_cpu_time >= MIN_CPU_PERCENT_INTERVAL
        samples = [(LOCAL_MACHINE, total, last_total)]
        samples += [
            (self._core(i), core, last_cores[i] if i < len(last_cores) else None)
            for i, core in enumerate(cores)
        ]
        for resource, sample, previous in samples:
            for state, seconds in zip(sample._fields, sample, strict=True):
                points.append(
                    (
                        "cpu_time_total",
                        float(seconds),
                        resource,
                        LOCAL_MACHINE_CONSUMER,
                        self._state_attrs(state),
                    )
                )
            if with_percent and previous is not None:
                percent = cpu_busy_percent(previous, sample)
                if percent is not None:
                    points.append(("cpu_percent", percent, resource, LOCAL_MACHINE_CONSUMER, None))
        if with_percent:
            # After too short an interval the old sample stays, so that the next percentage covers
            # both intervals instead of a sliver.
            self._last_cpu_sample = (total, cores)
            self._last_cpu_time = now

    def _measure_memory(self, points: list[Point]) -> None:
        mem = psutil.virtual_memory()
        points += [
            ("memory_size", int(mem.total), LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, None),
            ("memory_available", int(mem.available), LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, None),
            ("memory_used", int(mem.used), LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, None),
        ]

    def _measure_swap(self, points: list[Point]) -> None:
        swap = psutil.swap_memory()
        points += [
            ("swap_size", int(swap.total), LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, None),
            ("swap_used", int(swap.used), LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, None),
        ]

    def _measure_load(self, points: list[Point]) -> None:
        for value, attrs in zip(psutil.getloadavg(), _LOAD_WINDOWS, strict=True):
            points.append(("load_average", float(value), LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, attrs))

    def _measure_disks(self, points: list[Point]) -> None:
        counters = psutil.disk_io_counters(perdisk=True) or {}
        for disk, c in counters.items():
            if matches_any(self.config.exclude_disks, disk):
                continue
            resource = Resource("disk", disk)
            for field, metric in _DISK_FIELDS:
                points.append((metric, int(getattr(c, field)), resource, LOCAL_MACHINE_CONSUMER, None))

    def _measure_network(self, points: list[Point]) -> None:
        counters = psutil.net_io_counters(pernic=True) or {}
        for nic, c in counters.items():
            if matches_any(self.config.exclude_interfaces, nic):
                continue
            resource = Resource("network_interface", nic)
            for field, metric in _NET_FIELDS:
                points.append((metric, int(getattr(c, field)), resource, LOCAL_MACHINE_CONSUMER, None))

    def _measure_processes(self, points: list[Point]) -> None:
        patterns = self.config.processes
        if not patterns:
            return
        pids = set(psutil.pids())
        for gone in self._processes.keys() - pids:
            del self._processes[gone]
        for pid in pids - self._processes.keys():
            self._processes[pid] = self._match_process(pid, patterns)

        measured: list[tuple[float | None, int, int, str]] = []
        for pid, tracked in list(self._processes.items()):
            if tracked is None:
                continue
            try:
                with tracked.process.oneshot():
                    cpu = tracked.process.cpu_percent(interval=None)
                    rss = tracked.process.memory_info().rss
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                del self._processes[pid]
                continue
            except psutil.AccessDenied:
                continue
            measured.append((cpu if tracked.primed else None, int(rss), pid, tracked.name))
            tracked.primed = True

        floor = self.config.process_min_cpu_percent
        # Processes seen for the first time have no CPU share yet: they rank last, and are only kept
        # when no CPU floor is asked for.
        selected = [
            m for m in measured if (m[0] is not None and m[0] >= floor) or (m[0] is None and floor <= 0)
        ]
        selected.sort(key=lambda m: -1.0 if m[0] is None else m[0], reverse=True)
        for cpu, rss, pid, name in selected[: self.config.max_processes]:
            consumer = Consumer("process", str(pid))
            attrs = {"name": name}
            if cpu is not None:
                points.append(("process_cpu_percent", float(cpu), LOCAL_MACHINE, consumer, attrs))
            points.append(("process_memory_rss", rss, LOCAL_MACHINE, consumer, attrs))

    @staticmethod
    def _match_process(pid: int, patterns: Sequence[str]) -> _TrackedProcess | None:
        """Decided once per process: its name and command line rarely change, and reading them for every
        process at every poll would cost more than the measurements."""
        try:
            process = psutil.Process(pid)
            name = process.name()
            try:
                cmdline = " ".join(process.cmdline())
            except psutil.AccessDenied:
                cmdline = ""
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            return None
        return _TrackedProcess(process, name) if matches_any(patterns, name, cmdline) else None

    # -- the pipeline's side --

    async def poll(self, points: BatchBuilder, timestamp_ns: int) -> None:
        measured = await trio.to_thread.run_sync(self.measure)
        add = points.add
        for metric, value, resource, consumer, attrs in measured:
            add(metric, value, timestamp_ns, resource, consumer, attrs)


class SystemPlugin(Plugin):
    name = "system"
    version = "0.1.0"
    agent_api = ">=1,<2"
    description = "CPU, memory, swap, disk, network, load average and per-process metrics (psutil)."
    Config = SystemConfig
    enabled_by_default = True
    provides = ("source",)

    def start(self, ctx: StartContext, config: SystemConfig) -> None:
        for spec in METRICS:
            ctx.create_metric(spec.name, spec.unit, spec.value_type, spec.description)
        ctx.add_source(SystemSource(config))


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [SystemPlugin]
