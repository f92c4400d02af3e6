"""The `procfs` source: the kernel's CPU, memory and network counters, and per-process CPU, memory and
I/O, read straight from /proc.

Processes are followed when their name or command line matches one of `processes` (glob patterns, as
the `system` plugin's key), or when they are announced as consumers on the event bus (`agent exec` and
`agent watch` announce the command and its children). An announced process is followed from its first
poll to its `consumer_ended` event or its disappearance.

Counters go out as deltas stamped at the poll, each covering the time since the source's previous poll
(the same for every series of the source). The first poll gives zero deltas: it opens the intervals
(its timestamp is where the next deltas start). For a process, the first delta is its whole CPU time if
it started after the previous poll (so a short command is counted from its start), zero otherwise.
Reading runs in a worker thread.

A process is identified by its PID *and* start time, so a reused PID is a new process.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import trio

from agent import (
    LOCAL_MACHINE,
    LOCAL_MACHINE_CONSUMER,
    BatchBuilder,
    Consumer,
    Event,
    Plugin,
    PolledSource,
    PolledSourceConfig,
    Resource,
    StartContext,
    hookimpl,
)
from agent_plugins.measure.linux.proc import (
    CPU_STATES,
    KernelStat,
    PidStat,
    counter_delta,
    meminfo_metric_name,
    parse_kernel_stat,
    parse_key_values,
    parse_net_dev,
    parse_pid_stat,
    parse_statm,
)

log = logging.getLogger(__name__)

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class ProcfsConfig(PolledSourceConfig, kw_only=True):
    """The `[plugins.procfs]` table."""

    kernel: bool = True
    per_cpu: bool = False
    meminfo: bool = True
    network: bool = True
    exclude_interfaces: list[str] = msgspec.field(default_factory=list)
    processes: list[str] = msgspec.field(default_factory=list)
    follow_announced: bool = True
    max_processes: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_processes < 1:
            raise ValueError(f"max_processes: must be at least 1, got {self.max_processes}")


#: (name, unit, value type, description) of the metrics whose names are known in advance.
METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("kernel_cpu_time", "s", "float", "CPU time in each state (attribute state) since the previous poll"),
    ("kernel_context_switches", "1", "int", "context switches since the previous poll"),
    ("kernel_new_forks", "1", "int", "processes and threads created since the previous poll"),
    ("kernel_n_procs_running", "1", "int", "runnable processes"),
    ("kernel_n_procs_blocked", "1", "int", "processes blocked on I/O"),
    ("network_bytes", "By", "int", "bytes over the interface since the previous poll (direction rx/tx)"),
    ("network_packets", "1", "int", "packets over the interface since the previous poll"),
    ("network_errors", "1", "int", "errors on the interface since the previous poll"),
    ("network_drops", "1", "int", "packets dropped on the interface since the previous poll"),
    (
        "cpu_time_delta",
        "s",
        "float",
        "CPU time of the consumer since the previous poll, by kind: user (without guest), system, guest",
    ),
    ("memory_usage", "By", "int", "memory of the consumer, by kind: resident, virtual, shared"),
    ("io_bytes", "By", "int", "bytes read from and written to storage (kind read/write) since the previous poll"),
)

_NET_METRICS = (("bytes", "network_bytes"), ("packets", "network_packets"), ("errs", "network_errors"),
                ("drop", "network_drops"))

# One measured point: metric, value, resource, consumer, attributes.
Point = tuple[str, int | float, Resource, Consumer, dict[str, Any] | None]


def matches_any(patterns: Sequence[str], *texts: str) -> bool:
    return any(fnmatch.fnmatchcase(text, pattern) for pattern in patterns for text in texts if text)


@dataclass
class _Process:
    """A followed process: its identity and its previous counters (None before the first sample)."""

    pid: int
    starttime: int
    consumer: Consumer
    announced: bool
    cpu: tuple[int, int, int] | None = None  # user without guest, system, guest (ticks)
    io: tuple[int, int] | None = None  # read_bytes, write_bytes
    io_denied: bool = False


_KIND = {kind: {"kind": kind} for kind in ("user", "system", "guest", "resident", "virtual", "shared",
                                           "read", "write")}


class ProcfsSource(PolledSource):
    """Reads /proc once per poll. Event listeners only record announcements; the worker thread applies
    them at the next poll."""

    def __init__(self, config: ProcfsConfig, proc: Path = Path("/proc")) -> None:
        self.config = config
        self.proc = proc
        self.poll_interval = float(config.poll_interval)
        self.flush_interval = float(config.flush_interval)
        self._kernel: KernelStat | None = None
        self._net: dict[str, dict[str, tuple[int, int]]] | None = None
        # Uptime in ticks at the previous poll: a process that started after it is counted from zero.
        self._previous_uptime_ticks: int | None = None
        self._followed: dict[int, _Process] = {}
        # PIDs already matched against the patterns, with the start time seen (a reused PID is new).
        self._pattern_checked: dict[int, int] = {}
        # Announcements since the last poll: (pid, start time or None, started?).
        self._announcements: list[tuple[int, int | None, bool]] = []
        self._failed: set[str] = set()
        self._state_attributes = {state: {"state": state} for state in CPU_STATES}
        self._cores: dict[str, Resource] = {}

    # -- events (trio thread) --

    def on_event(self, event: Event) -> None:
        consumer = event.consumer
        if consumer is None or consumer.kind != "process" or not self.config.follow_announced:
            return
        try:
            pid = int(consumer.id)
        except ValueError:
            log.warning("procfs: process consumer %r has no numeric PID; not followed", consumer.id)
            return
        start = event.attributes.get("start_ticks")
        self._announcements.append(
            (pid, int(start) if isinstance(start, int) else None, event.kind == "consumer_started")
        )

    # -- measuring (worker thread) --

    def _read(self, *parts: str) -> str:
        return self.proc.joinpath(*parts).read_text()

    def _section(self, name: str, points: list[Point], measure: Any) -> None:
        try:
            measure(points)
        except (OSError, ValueError) as exc:
            # Said once per section: a /proc file missing in a container costs that section only.
            level = logging.DEBUG if name in self._failed else logging.WARNING
            self._failed.add(name)
            log.log(level, "procfs: cannot measure %s: %s", name, exc)

    def measure(self, announcements: list[tuple[int, int | None, bool]]) -> list[Point]:
        points: list[Point] = []
        try:
            # Rounded: 2164.95 s * 100 is 216495.00000000003 in floating point, which would make a
            # process started in that same tick look older than the poll.
            uptime_ticks = round(float(self._read("uptime").split()[0]) * TICKS_PER_SECOND)
        except (OSError, ValueError, IndexError):
            uptime_ticks = None
        if self.config.kernel:
            self._section("kernel counters (/proc/stat)", points, self._measure_kernel)
        if self.config.meminfo:
            self._section("memory (/proc/meminfo)", points, self._measure_meminfo)
        if self.config.network:
            self._section("network (/proc/net/dev)", points, self._measure_network)
        self._apply_announcements(announcements)
        if self.config.processes:
            self._section("process list (/proc)", points, self._match_new_processes)
        self._measure_processes(points)
        self._previous_uptime_ticks = uptime_ticks
        return points

    def _core(self, name: str) -> Resource:
        resource = self._cores.get(name)
        if resource is None:
            resource = self._cores[name] = Resource("cpu_core", name.removeprefix("cpu"))
        return resource

    def _measure_kernel(self, points: list[Point]) -> None:
        stat = parse_kernel_stat(self._read("stat"))
        previous, self._kernel = self._kernel, stat
        points.append(("kernel_n_procs_running", stat.procs_running, LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, None))
        points.append(("kernel_n_procs_blocked", stat.procs_blocked, LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, None))
        if previous is None:
            # The first poll opens the intervals: zero deltas, whose timestamp is where the next
            # poll's deltas start (a transform that aligns series in time needs it).
            previous = stat
        for cpu, ticks in stat.cpus.items():
            if cpu != "cpu" and not self.config.per_cpu:
                continue
            before = previous.cpus.get(cpu)
            if before is None:
                continue
            resource = LOCAL_MACHINE if cpu == "cpu" else self._core(cpu)
            for state, now, then in zip(CPU_STATES, ticks, before, strict=False):
                points.append(
                    (
                        "kernel_cpu_time",
                        counter_delta(then, now) / TICKS_PER_SECOND,
                        resource,
                        LOCAL_MACHINE_CONSUMER,
                        self._state_attributes[state],
                    )
                )
        points.append(
            (
                "kernel_context_switches",
                counter_delta(previous.context_switches, stat.context_switches),
                LOCAL_MACHINE,
                LOCAL_MACHINE_CONSUMER,
                None,
            )
        )
        points.append(
            ("kernel_new_forks", counter_delta(previous.forks, stat.forks), LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, None)
        )

    def _measure_meminfo(self, points: list[Point]) -> None:
        for key, value in parse_key_values(self._read("meminfo")).items():
            points.append((meminfo_metric_name(key), value, LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, None))

    def _measure_network(self, points: list[Point]) -> None:
        counters = parse_net_dev(self._read("net", "dev"))
        previous, self._net = self._net, counters
        if previous is None:
            previous = counters  # zero deltas at the first poll, as for the kernel counters
        for interface, fields in counters.items():
            before = previous.get(interface)
            if before is None or matches_any(self.config.exclude_interfaces, interface):
                continue
            resource = Resource("network_interface", interface)
            for field, metric in _NET_METRICS:
                for index, direction in enumerate(("rx", "tx")):
                    points.append(
                        (
                            metric,
                            counter_delta(before[field][index], fields[field][index]),
                            resource,
                            LOCAL_MACHINE_CONSUMER,
                            {"interface": interface, "direction": direction},
                        )
                    )

    def _read_pid_stat(self, pid: int) -> PidStat | None:
        try:
            return parse_pid_stat(self._read(str(pid), "stat"))
        except (OSError, ValueError):
            return None

    def _follow(self, stat: PidStat, announced: bool) -> None:
        if len(self._followed) >= self.config.max_processes and stat.pid not in self._followed:
            if "max_processes" not in self._failed:
                self._failed.add("max_processes")
                log.warning(
                    "procfs: already following max_processes=%d processes; process %d (%s) and further"
                    " ones are not followed",
                    self.config.max_processes,
                    stat.pid,
                    stat.comm,
                )
            return
        self._followed[stat.pid] = _Process(stat.pid, stat.starttime, Consumer("process", str(stat.pid)), announced)

    def _apply_announcements(self, announcements: list[tuple[int, int | None, bool]]) -> None:
        for pid, start, started in announcements:
            current = self._followed.get(pid)
            if not started:
                if current is not None and current.announced and (start is None or start == current.starttime):
                    del self._followed[pid]
                continue
            stat = self._read_pid_stat(pid)
            if stat is None:
                log.info("procfs: announced process %d has already exited; not followed", pid)
                continue
            if start is not None and stat.starttime != start:
                log.info("procfs: announced process %d is gone (its PID is now another process)", pid)
                continue
            if current is not None and current.starttime == stat.starttime:
                current.announced = True
            else:
                self._follow(stat, announced=True)

    def _match_new_processes(self, points: list[Point]) -> None:
        pids = [int(name) for name in os.listdir(self.proc) if name.isdigit()]
        alive = set(pids)
        for gone in self._pattern_checked.keys() - alive:
            del self._pattern_checked[gone]
        for pid in pids:
            if pid in self._followed:
                continue
            stat = self._read_pid_stat(pid)
            if stat is None or self._pattern_checked.get(pid) == stat.starttime:
                continue
            # Decided once per process: names and command lines rarely change, and reading them for
            # every process at every poll would cost more than the measurements.
            self._pattern_checked[pid] = stat.starttime
            try:
                cmdline = self._read(str(pid), "cmdline").replace("\0", " ").strip()
            except OSError:
                cmdline = ""
            if matches_any(self.config.processes, stat.comm, cmdline):
                self._follow(stat, announced=False)

    def _measure_processes(self, points: list[Point]) -> None:
        previous_uptime = self._previous_uptime_ticks
        for pid, process in list(self._followed.items()):
            stat = self._read_pid_stat(pid)
            if stat is None or stat.starttime != process.starttime:
                # Exited (and reaped), or its PID reused: a new process must be matched again.
                del self._followed[pid]
                continue
            consumer = process.consumer
            guest = stat.guest_time
            cpu = (max(0, stat.utime - guest), stat.stime, guest)
            before = process.cpu
            if before is None:
                if previous_uptime is not None and stat.starttime >= previous_uptime:
                    # Started since the previous poll: all of its CPU time falls in this interval.
                    before = (0, 0, 0)
                else:
                    before = cpu  # running before: this first poll is its baseline (zero deltas)
            process.cpu = cpu
            for kind, now, then in zip(("user", "system", "guest"), cpu, before, strict=True):
                points.append(
                    ("cpu_time_delta", counter_delta(then, now) / TICKS_PER_SECOND, LOCAL_MACHINE, consumer,
                     _KIND[kind])
                )
            if stat.state in ("Z", "X"):
                continue  # a zombie has no memory or I/O left to read; its CPU times are final
            try:
                statm = parse_statm(self._read(str(pid), "statm"))
                points.append(("memory_usage", statm.resident * PAGE_SIZE, LOCAL_MACHINE, consumer, _KIND["resident"]))
                points.append(("memory_usage", statm.size * PAGE_SIZE, LOCAL_MACHINE, consumer, _KIND["virtual"]))
                points.append(("memory_usage", statm.shared * PAGE_SIZE, LOCAL_MACHINE, consumer, _KIND["shared"]))
            except (OSError, ValueError):
                pass
            if not process.io_denied:
                try:
                    io = parse_key_values(self._read(str(pid), "io"))
                except PermissionError:
                    # Another user's process without CAP_SYS_PTRACE: its I/O is not readable, ever.
                    process.io_denied = True
                    continue
                except (OSError, ValueError):
                    continue
                counters = (io.get("read_bytes", 0), io.get("write_bytes", 0))
                io_before, process.io = process.io, counters
                if io_before is None:
                    io_before = (0, 0) if before == (0, 0, 0) else counters
                for kind, now, then in zip(("read", "write"), counters, io_before, strict=True):
                    points.append(("io_bytes", counter_delta(then, now), LOCAL_MACHINE, consumer, _KIND[kind]))

    # -- the pipeline's side --

    async def poll(self, points: BatchBuilder, timestamp_ns: int) -> None:
        announcements, self._announcements = self._announcements, []
        measured = await trio.to_thread.run_sync(self.measure, announcements)
        add = points.add
        for metric, value, resource, consumer, attrs in measured:
            add(metric, value, timestamp_ns, resource, consumer, attrs)


def meminfo_metrics(text: str) -> list[tuple[str, str]]:
    """(metric name, unit) for each /proc/meminfo key: bytes for `kB` lines, a count otherwise."""
    result = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            result.append((meminfo_metric_name(key), "By" if value.strip().endswith("kB") else "1"))
    return result


class ProcfsPlugin(Plugin):
    name = "procfs"
    version = "0.1.0"
    agent_api = ">=1,<2"
    description = "Kernel CPU, memory and network counters and per-process CPU, memory and I/O, from /proc."
    Config = ProcfsConfig
    provides = ("source",)

    def start(self, ctx: StartContext, config: ProcfsConfig) -> None:
        for name, unit, value_type, description in METRICS:
            ctx.create_metric(name, unit, value_type, description)  # type: ignore[arg-type]
        if config.meminfo:
            try:
                text = Path("/proc/meminfo").read_text()
            except OSError as exc:
                raise RuntimeError(f"meminfo = true but /proc/meminfo is unreadable: {exc.strerror}") from exc
            for name, unit in meminfo_metrics(text):
                ctx.create_metric(name, unit, "int", f"/proc/meminfo {name.removeprefix('meminfo_')}")
        source = ProcfsSource(config)
        ctx.subscribe(source.on_event, {"consumer_started", "consumer_ended"})
        ctx.add_source(source)


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [ProcfsPlugin]
