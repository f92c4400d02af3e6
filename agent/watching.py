"""What `agent exec` and `agent watch` need besides the pipeline: following a process tree, waiting for
a process to exit, forwarding signals, and the summary printed at the end.

- `ProcessTree` announces the command and each of its descendants as `process` consumers on the event
  bus (so `procfs` follows them), and ends them as they exit;
- `SummaryObserver` is a transform, run after the plugins' ones, that adds up what the pipeline
  measured for the tree (CPU time, resident memory, attributed energy);
- `wait_for_exit` waits on a pidfd (Linux 5.3+), or polls /proc where there is none;
- `format_summary` writes the lines, as `time` does but with memory and energy.
"""

from __future__ import annotations

import errno
import os
import signal
from collections import defaultdict
from dataclasses import dataclass, field

import psutil
import trio

from agent.events import EventBus
from agent.model import Batch, Consumer
from agent.plugin import Transform

#: How often the tree is scanned for new children. Children that live shorter than this may be missed
#: as consumers of their own (their CPU time still counts in the summary of `exec`, through wait4).
TREE_SCAN_INTERVAL = 0.2
#: The signals passed on to the command under `exec`.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class ProcessTree:
    """The root process and its descendants, each announced as a consumer of its own."""

    def __init__(self, root: int, events: EventBus) -> None:
        self.root = root
        self.events = events
        # pid -> create time (psutil's identity of a process: a reused PID is another process).
        self.alive: dict[int, float] = {}
        #: Every PID ever announced, for the summary.
        self.announced: set[str] = set()

    def _announce(self, pid: int, created: float) -> None:
        self.alive[pid] = created
        self.announced.add(str(pid))
        self.events.consumer_started(Consumer("process", str(pid)))

    def start(self) -> None:
        """Announces the root: called right after it was spawned (or found, for `watch`)."""
        try:
            created = psutil.Process(self.root).create_time()
        except psutil.Error:
            created = 0.0
        self._announce(self.root, created)

    def scan(self) -> None:
        """Announces new descendants and ends those that are gone."""
        try:
            children = psutil.Process(self.root).children(recursive=True)
        except psutil.Error:
            children = []
        seen: dict[int, float] = {}
        for child in children:
            try:
                seen[child.pid] = child.create_time()
            except psutil.Error:
                continue
        for pid, created in list(self.alive.items()):
            if pid != self.root and seen.get(pid) != created:
                del self.alive[pid]
                self.events.consumer_ended(Consumer("process", str(pid)))
        for pid, created in seen.items():
            if pid not in self.alive:
                self._announce(pid, created)

    async def follow(self) -> None:
        """Scans until cancelled."""
        while True:
            await trio.to_thread.run_sync(self.scan)
            await trio.sleep(TREE_SCAN_INTERVAL)

    def end_all(self) -> None:
        for pid in list(self.alive):
            self.events.consumer_ended(Consumer("process", str(pid)))
        self.alive.clear()


@dataclass
class SummaryObserver(Transform):
    """Adds up the points of the followed processes as batches go by; changes nothing."""

    pids: set[str]
    cpu_by_kind: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    energy: float = 0.0
    energy_points: int = 0
    energy_estimated: bool = False
    resident_by_time: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def apply(self, batch: Batch) -> Batch | None:
        for series in batch.series:
            consumer = series.consumer
            if consumer.kind != "process" or consumer.id not in self.pids:
                continue
            metric = series.metric
            if metric == "attributed_energy":
                self.energy += sum(series.values)
                self.energy_points += len(series.values)
                self.energy_estimated = self.energy_estimated or bool(series.attributes.get("estimated"))
            elif metric == "cpu_time_delta":
                self.cpu_by_kind[str(series.attributes.get("kind", "total"))] += sum(series.values)
            elif metric == "memory_usage" and series.attributes.get("kind") == "resident":
                for t, v in zip(series.timestamps, series.values, strict=True):
                    self.resident_by_time[t] += int(v)
        return batch

    @property
    def peak_resident(self) -> int:
        return max(self.resident_by_time.values(), default=0)


@dataclass
class Summary:
    wall_seconds: float
    user_seconds: float
    system_seconds: float
    peak_memory_bytes: int
    peak_memory_note: str
    processes: int
    energy: SummaryObserver
    energy_plugins: bool


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def format_summary(title: str, s: Summary) -> str:
    """The summary lines (for stderr): wall time, CPU time, peak memory, energy."""
    lines = [
        title,
        f"  wall time    {s.wall_seconds:.3f} s",
        f"  cpu          {s.user_seconds + s.system_seconds:.3f} s (user {s.user_seconds:.3f} s,"
        f" system {s.system_seconds:.3f} s), {s.processes} process{'es' if s.processes != 1 else ''}",
        f"  peak memory  {_size(s.peak_memory_bytes)} ({s.peak_memory_note})",
    ]
    observer = s.energy
    if observer.energy_points:
        how = (
            "estimated from CPU use and the TDP (energy-estimation-tdp), attributed by CPU time"
            if observer.energy_estimated
            else "measured (RAPL), attributed by CPU time"
        )
        lines.append(f"  energy       {observer.energy:.3f} J ({how})")
    elif s.energy_plugins:
        lines.append(
            "  energy       0.000 J (no interval of the machine's energy was attributed during the run)"
        )
    else:
        lines.append(
            "  energy       not measured (enable procfs, energy-attribution and rapl or"
            " energy-estimation-tdp: --plugins procfs,energy-estimation-tdp,energy-attribution,csv)"
        )
    return "\n".join(lines)


def open_pidfd(pid: int) -> int | None:
    """A pidfd for `pid`, None where the kernel or Python has none. Raises ProcessLookupError if the
    process does not exist."""
    if not hasattr(os, "pidfd_open"):
        os.kill(pid, 0)
        return None
    try:
        return os.pidfd_open(pid)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise ProcessLookupError(pid) from exc
        if exc.errno in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
            os.kill(pid, 0)
            return None
        raise


async def wait_for_exit(pid: int, pidfd: int | None, poll_interval: float = 0.2) -> None:
    """Returns once `pid` has exited. With a pidfd, at once; without, within `poll_interval` (a zombie
    counts as exited: it does no more work)."""
    if pidfd is not None:
        await trio.lowlevel.wait_readable(pidfd)
        return
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        except psutil.Error:
            pass
        await trio.sleep(poll_interval)


__all__ = [
    "FORWARDED_SIGNALS",
    "ProcessTree",
    "Summary",
    "SummaryObserver",
    "format_summary",
    "open_pidfd",
    "wait_for_exit",
]
