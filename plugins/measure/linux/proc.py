"""Parsers for the /proc files the `procfs` source reads: pure functions from text to values, no I/O.

Formats are those of proc(5). Times in /proc/stat and /proc/PID/stat are in clock ticks (USER_HZ);
the caller divides by `os.sysconf("SC_CLK_TCK")`. Every parser raises ValueError on text it cannot
read, so the caller can name the file in one log line.
"""

from __future__ import annotations

import re
from typing import NamedTuple

#: The columns of a `cpu` line of /proc/stat, in order (proc(5)). Kernels older than 2.6.33 have fewer.
CPU_STATES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest", "guest_nice")
#: States that are not work: what is left is busy time. guest and guest_nice are already counted in
#: user and nice (proc(5)), so they are left out of the busy sum too, to count them once.
NOT_BUSY_STATES = frozenset({"idle", "iowait", "guest", "guest_nice"})


class KernelStat(NamedTuple):
    """/proc/stat: ticks per state for the whole machine (`cpu`) and per core (`cpu0`...), and counters."""

    cpus: dict[str, tuple[int, ...]]
    context_switches: int
    forks: int
    procs_running: int
    procs_blocked: int


def parse_kernel_stat(text: str) -> KernelStat:
    cpus: dict[str, tuple[int, ...]] = {}
    counters = {"ctxt": 0, "processes": 0, "procs_running": 0, "procs_blocked": 0}
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        key = fields[0]
        if key.startswith("cpu"):
            ticks = tuple(int(f) for f in fields[1 : 1 + len(CPU_STATES)])
            if len(ticks) < 4:
                raise ValueError(f"line {key!r}: expected at least 4 CPU states, got {len(ticks)}")
            cpus[key] = ticks
        elif key in counters and len(fields) >= 2:
            counters[key] = int(fields[1])
    if "cpu" not in cpus:
        raise ValueError("no 'cpu' line")
    return KernelStat(
        cpus, counters["ctxt"], counters["processes"], counters["procs_running"], counters["procs_blocked"]
    )


def busy_ticks(ticks: tuple[int, ...]) -> int:
    """Ticks spent working: every state but idle, iowait and the guest states (see NOT_BUSY_STATES)."""
    return sum(t for state, t in zip(CPU_STATES, ticks, strict=False) if state not in NOT_BUSY_STATES)


class PidStat(NamedTuple):
    """The fields of /proc/PID/stat that the source uses (clock ticks, except `vsize` in bytes and
    `rss` in pages)."""

    pid: int
    comm: str
    state: str
    ppid: int
    utime: int
    stime: int
    starttime: int
    vsize: int
    rss: int
    guest_time: int


def parse_pid_stat(text: str) -> PidStat:
    """Parses /proc/PID/stat. The command name is between the first '(' and the *last* ')': it may
    itself contain spaces and parentheses (proc(5))."""
    open_at = text.find("(")
    close_at = text.rfind(")")
    if open_at < 0 or close_at < open_at:
        raise ValueError("no '(comm)' field")
    pid = int(text[:open_at])
    comm = text[open_at + 1 : close_at]
    rest = text[close_at + 1 :].split()
    # rest[0] is field (3) state; field (N) is rest[N - 3].
    if len(rest) < 21:
        raise ValueError(f"expected at least 23 fields, got {len(rest) + 2}")

    def field(n: int) -> int:
        return int(rest[n - 3]) if len(rest) > n - 3 else 0

    return PidStat(
        pid=pid,
        comm=comm,
        state=rest[0],
        ppid=field(4),
        utime=field(14),
        stime=field(15),
        starttime=field(22),
        vsize=field(23),
        rss=field(24),
        guest_time=field(43),
    )


class Statm(NamedTuple):
    """/proc/PID/statm, in pages: total program size, resident, shared (file-backed resident)."""

    size: int
    resident: int
    shared: int


def parse_statm(text: str) -> Statm:
    fields = text.split()
    if len(fields) < 3:
        raise ValueError(f"expected at least 3 fields, got {len(fields)}")
    return Statm(int(fields[0]), int(fields[1]), int(fields[2]))


def parse_key_values(text: str) -> dict[str, int]:
    """`key: value [kB]` lines (/proc/meminfo, /proc/PID/io), values in the file's unit, except that a
    `kB` suffix is turned into bytes."""
    result: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        parts = value.split()
        if not parts:
            continue
        number = int(parts[0])
        if len(parts) > 1 and parts[1] == "kB":
            number *= 1024
        result[key.strip()] = number
    return result


_SNAKE_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def meminfo_metric_name(key: str) -> str:
    """`MemTotal` -> `meminfo_mem_total`, `Active(anon)` -> `meminfo_active_anon`,
    `HugePages_Total` -> `meminfo_huge_pages_total`."""
    words = re.sub(r"[^A-Za-z0-9]+", "_", _SNAKE_BOUNDARY.sub("_", key)).strip("_").lower()
    return f"meminfo_{re.sub('_+', '_', words)}"


#: The columns of /proc/net/dev after the interface name: 8 receive, 8 transmit.
NET_FIELDS = ("bytes", "packets", "errs", "drop", "fifo", "frame_or_colls", "compressed", "multicast")


def parse_net_dev(text: str) -> dict[str, dict[str, tuple[int, int]]]:
    """/proc/net/dev: per interface, per field of NET_FIELDS, (received, transmitted)."""
    result: dict[str, dict[str, tuple[int, int]]] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if not sep or "|" in line:
            continue
        numbers = [int(n) for n in rest.split()]
        if len(numbers) < 16:
            raise ValueError(f"interface {name.strip()!r}: expected 16 counters, got {len(numbers)}")
        result[name.strip()] = {
            field: (numbers[i], numbers[8 + i]) for i, field in enumerate(NET_FIELDS)
        }
    return result


def counter_delta(previous: int, current: int) -> int:
    """The increase of a counter; a counter that went back (a reset, a re-created interface) restarts
    from zero, so the delta is its current value rather than a negative number."""
    return current - previous if current >= previous else current
