"""The `cgroups` source: CPU, memory, I/O and pressure of every cgroup, for cgroup v2, v1 and the hybrid
layout (v1 controllers under /sys/fs/cgroup/cpu, /sys/fs/cgroup/memory..., v2 at
/sys/fs/cgroup/unified).

At each poll the source reads /proc/self/mountinfo (hierarchies can be mounted later) and walks the
hierarchies: a cgroup is one consumer (`cgroup`, its path inside the hierarchy such as `/batch/job1`)
even when v1 shows it in several hierarchies. New cgroups are announced on the event bus
(`consumer_started`, with the attributes read from the path) and measured from that poll; vanished ones
end (`consumer_ended`) and get no more points. The scan at each poll replaces inotify, which cannot
watch cgroup v1 and needs a watch per directory: a new cgroup is seen at the first poll after it
appears, and a removed one at the first poll after its removal.

Per cgroup, where the kernel has it: CPU time (v2 cpu.stat in µs, else v1 cpuacct.usage in ns and
cpuacct.stat in ticks), memory (v2 memory.current and memory.stat, else v1 memory.usage_in_bytes and
memory.stat), I/O bytes (v2 io.stat) and pressure stall time (v2 *.pressure). Counters are deltas since
the previous poll; a cgroup found at the first poll gives zero deltas (it opens the intervals), one
created since the previous poll gives all of its usage (it is all new).
"""

from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import trio

from agent import (
    LOCAL_MACHINE,
    BatchBuilder,
    Consumer,
    Plugin,
    PolledSource,
    PolledSourceConfig,
    StartContext,
    hookimpl,
)
from agent_plugins.measure.linux.cgroup import (
    CgroupMount,
    cgroup_attributes,
    join_path,
    parse_flat_keyed,
    parse_io_stat,
    parse_mountinfo,
    parse_pressure,
)

log = logging.getLogger(__name__)

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


class CgroupsConfig(PolledSourceConfig, kw_only=True):
    """The `[plugins.cgroups]` table."""

    include: list[str] = msgspec.field(default_factory=lambda: ["*"])
    exclude: list[str] = msgspec.field(default_factory=list)
    max_cgroups: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_cgroups < 1:
            raise ValueError(f"max_cgroups: must be at least 1, got {self.max_cgroups}")


METRICS: tuple[tuple[str, str, str, str], ...] = (
    (
        "cpu_time_delta",
        "s",
        "float",
        "CPU time of the consumer since the previous poll, by kind: user (without guest), system, guest"
        " (processes); total, user, system (cgroups)",
    ),
    ("memory_usage", "By", "int", "memory of the consumer, by kind: resident, virtual, shared (processes);"
     " current, anon, file (cgroups)"),
    ("io_bytes", "By", "int", "bytes read from and written to storage (kind read/write) since the previous poll"),
    (
        "pressure_stall_time",
        "s",
        "float",
        "time some (or all: kind full) tasks of the cgroup stalled on the resource (attribute resource"
        " cpu/memory/io) since the previous poll",
    ),
)

_KIND = {k: {"kind": k} for k in ("total", "user", "system", "current", "anon", "file", "read", "write")}

Point = tuple[str, int | float, Consumer, dict[str, Any]]


@dataclass
class _Cgroup:
    path: str
    consumer: Consumer
    attributes: dict[str, str]
    # counter name -> previous value (None until measured once)
    previous: dict[str, int] = field(default_factory=dict)
    new: bool = False  # created since the previous poll: its first deltas are all its usage


@dataclass
class _Layout:
    """The hierarchies to read: v2 (if any) and the v1 ones that carry the controllers we read."""

    v2: CgroupMount | None
    cpuacct: CgroupMount | None
    memory: CgroupMount | None

    def mounts(self) -> list[CgroupMount]:
        seen: dict[str, CgroupMount] = {}
        for m in (self.v2, self.cpuacct, self.memory):
            if m is not None:
                seen.setdefault(m.mount_point, m)
        return list(seen.values())


def choose_layout(mounts: list[CgroupMount]) -> _Layout:
    v2 = next((m for m in mounts if m.version == 2), None)
    cpuacct = next((m for m in mounts if m.version == 1 and "cpuacct" in m.controllers), None)
    memory = next((m for m in mounts if m.version == 1 and "memory" in m.controllers), None)
    return _Layout(v2, cpuacct, memory)


class CgroupsSource(PolledSource):
    def __init__(self, config: CgroupsConfig, mountinfo: Path = Path("/proc/self/mountinfo")) -> None:
        self.config = config
        self.mountinfo = mountinfo
        self.poll_interval = float(config.poll_interval)
        self.flush_interval = float(config.flush_interval)
        self._cgroups: dict[str, _Cgroup] = {}
        self._first_scan = True
        self._said: set[str] = set()
        #: Set by the plugin: publishes (started, ended) consumers on the event bus, in the trio thread.
        self.publish: Any = None

    def _wanted(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, p) for p in self.config.include) and not any(
            fnmatch.fnmatchcase(path, p) for p in self.config.exclude
        )

    def _scan(self, layout: _Layout) -> dict[str, dict[str, Path]]:
        """Every cgroup path (but the root, which is the machine), with its directory per mount point."""
        found: dict[str, dict[str, Path]] = {}
        for mount in layout.mounts():
            base = Path(mount.mount_point)
            for directory, _subdirs, _ in os.walk(base):
                relative = os.path.relpath(directory, base)
                if relative == ".":
                    continue
                path = join_path(mount.root, relative)
                found.setdefault(path, {})[mount.mount_point] = Path(directory)
        return found

    def measure(self) -> tuple[list[Point], list[_Cgroup], list[_Cgroup]]:
        layout = choose_layout(parse_mountinfo(self.mountinfo.read_text()))
        if not layout.mounts():
            if "no cgroups" not in self._said:
                self._said.add("no cgroups")
                log.warning("cgroups: no cgroup hierarchy is mounted (see /proc/self/mountinfo)")
            return [], [], []
        found = self._scan(layout)
        started: list[_Cgroup] = []
        ended = [self._cgroups.pop(p) for p in list(self._cgroups) if p not in found]
        for path in sorted(found):
            if path in self._cgroups or not self._wanted(path):
                continue
            if len(self._cgroups) >= self.config.max_cgroups:
                if "max" not in self._said:
                    self._said.add("max")
                    log.warning("cgroups: max_cgroups=%d reached; %s and later ones are not measured",
                                self.config.max_cgroups, path)
                break
            cgroup = _Cgroup(path, Consumer("cgroup", path), cgroup_attributes(path), new=not self._first_scan)
            self._cgroups[path] = cgroup
            started.append(cgroup)
        self._first_scan = False
        points: list[Point] = []
        for path, cgroup in self._cgroups.items():
            dirs = found[path]
            try:
                self._measure_one(cgroup, layout, dirs, points)
            except (OSError, ValueError) as exc:
                # Removed between the scan and the read (ENOENT, ENODEV): it ends at the next poll.
                log.debug("cgroups: %s: %s", path, exc)
            cgroup.new = False
        return points, started, ended

    def _delta(self, cgroup: _Cgroup, key: str, value: int) -> int:
        before = cgroup.previous.get(key)
        cgroup.previous[key] = value
        if before is None:
            return value if cgroup.new else 0
        return value - before if value >= before else value

    def _measure_one(self, cgroup: _Cgroup, layout: _Layout, dirs: dict[str, Path], points: list[Point]) -> None:
        consumer, attrs = cgroup.consumer, cgroup.attributes
        v2 = dirs.get(layout.v2.mount_point) if layout.v2 else None
        cpuacct = dirs.get(layout.cpuacct.mount_point) if layout.cpuacct else None
        memory = dirs.get(layout.memory.mount_point) if layout.memory else None

        def add(metric: str, value: int | float, extra: dict[str, Any]) -> None:
            points.append((metric, value, consumer, {**attrs, **extra} if attrs else extra))

        cpu_stat = _read_optional(v2, "cpu.stat")
        if cpu_stat is not None and "usage_usec" in (stat := parse_flat_keyed(cpu_stat)):
            for kind, key in (("total", "usage_usec"), ("user", "user_usec"), ("system", "system_usec")):
                if key in stat:
                    add("cpu_time_delta", self._delta(cgroup, key, stat[key]) / 1e6, _KIND[kind])
        elif (usage := _read_optional(cpuacct, "cpuacct.usage")) is not None:
            add("cpu_time_delta", self._delta(cgroup, "usage_ns", int(usage)) / 1e9, _KIND["total"])
            ticks = parse_flat_keyed(_read_optional(cpuacct, "cpuacct.stat") or "")
            for kind in ("user", "system"):
                if kind in ticks:
                    add("cpu_time_delta", self._delta(cgroup, kind, ticks[kind]) / TICKS_PER_SECOND, _KIND[kind])

        current = _read_optional(v2, "memory.current")
        if current is not None:
            add("memory_usage", int(current), _KIND["current"])
            mem = parse_flat_keyed(_read_optional(v2, "memory.stat") or "")
            for kind in ("anon", "file"):
                if kind in mem:
                    add("memory_usage", mem[kind], _KIND[kind])
        elif (usage := _read_optional(memory, "memory.usage_in_bytes")) is not None:
            add("memory_usage", int(usage), _KIND["current"])
            mem = parse_flat_keyed(_read_optional(memory, "memory.stat") or "")
            # v1: rss is anonymous memory, cache the page cache (cgroup-v1/memory.rst 5.2).
            for kind, key in (("anon", "rss"), ("file", "cache")):
                if key in mem:
                    add("memory_usage", mem[key], _KIND[kind])

        io = _read_optional(v2, "io.stat")
        if io is not None:
            read, written = parse_io_stat(io)
            add("io_bytes", self._delta(cgroup, "io_read", read), _KIND["read"])
            add("io_bytes", self._delta(cgroup, "io_write", written), _KIND["write"])
        for resource in ("cpu", "memory", "io"):
            text = _read_optional(v2, f"{resource}.pressure")
            if text is None:
                continue
            for kind, total in parse_pressure(text).items():
                delta = self._delta(cgroup, f"psi_{resource}_{kind}", total)
                add("pressure_stall_time", delta / 1e6, {"resource": resource, "kind": kind})

    async def poll(self, points: BatchBuilder, timestamp_ns: int) -> None:
        measured, started, ended = await trio.to_thread.run_sync(self.measure)
        if self.publish is not None:
            self.publish(started, ended)
        add = points.add
        for metric, value, consumer, attrs in measured:
            add(metric, value, timestamp_ns, LOCAL_MACHINE, consumer, attrs)


def _read_optional(directory: Path | None, name: str) -> str | None:
    """The file's text, or None where the hierarchy or the controller does not have it."""
    if directory is None:
        return None
    try:
        return (directory / name).read_text()
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None


class CgroupsPlugin(Plugin):
    name = "cgroups"
    version = "0.1.0"
    agent_api = ">=1,<2"
    description = "CPU, memory, I/O and pressure per cgroup (v2, v1, hybrid); cgroups announced as consumers."
    Config = CgroupsConfig
    provides = ("source",)

    def start(self, ctx: StartContext, config: CgroupsConfig) -> None:
        for name, unit, value_type, description in METRICS:
            ctx.create_metric(name, unit, value_type, description)  # type: ignore[arg-type]
        source = CgroupsSource(config)
        events = ctx.events

        def publish(started: list[_Cgroup], ended: list[_Cgroup]) -> None:
            for cgroup in started:
                events.consumer_started(cgroup.consumer, **cgroup.attributes)
            for cgroup in ended:
                events.consumer_ended(cgroup.consumer)

        source.publish = publish
        ctx.add_source(source)


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [CgroupsPlugin]
