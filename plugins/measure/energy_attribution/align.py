"""Time alignment and sharing for energy attribution: pure functions over intervals, no I/O, no clock.

Every input is a delta over an interval (start, end]: the machine's energy, the machine's busy CPU time,
each consumer's CPU time. Series from different sources are polled at different moments, so the CPU time
of a consumer over an energy interval is re-windowed: each of its deltas contributes the part of it that
overlaps the window, assuming a constant rate within the delta. (Alumet interpolates the cumulative
values at the reference timestamps instead, which blends deltas of different lengths.)

Sharing: a consumer receives `E * cpu / D`, where D is the machine's busy CPU time over the window, or
the sum of the consumers' CPU times when that is larger (tick rounding can make it so). Hence the shares
of any set of consumers given the same D sum to at most E.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple


class Interval(NamedTuple):
    """A delta: `value` accumulated over (start, end], times in nanoseconds."""

    start: int
    end: int
    value: float


def amount_in_window(intervals: Iterable[Interval], start: int, end: int) -> float:
    """The part of the deltas that falls in (start, end], each spread evenly over its interval.
    A zero-length interval counts whole when its instant is in the window."""
    total = 0.0
    for interval in intervals:
        if interval.end <= interval.start:
            if start < interval.end <= end:
                total += interval.value
            continue
        overlap = min(end, interval.end) - max(start, interval.start)
        if overlap > 0:
            total += interval.value * overlap / (interval.end - interval.start)
    return total


def coverage_end(intervals: Iterable[Interval]) -> int | None:
    """How far in time the deltas reach (the latest end), or None without any."""
    return max((i.end for i in intervals), default=None)


def share(energy: float, busy: float, cpu: Mapping[str, float]) -> dict[str, float]:
    """Shares `energy` among the consumers in `cpu` (their CPU time over the window), given the
    machine's busy CPU time `busy` over the same window. The shares sum to at most `energy`."""
    denominator = max(busy, sum(cpu.values()))
    if denominator <= 0 or energy <= 0:
        return {name: 0.0 for name in cpu}
    # The fraction first: seconds / denominator <= 1 holds exactly in floating point, where
    # energy * seconds / denominator can round above energy when the times are subnormal.
    return {name: energy * (max(0.0, seconds) / denominator) for name, seconds in cpu.items()}


def parent_path(path: str) -> str:
    """The parent of a cgroup path: `/a/b` -> `/a`, `/a` -> `/`, `/` -> `` (the root has none)."""
    if path in ("", "/"):
        return ""
    parent = path.rstrip("/").rpartition("/")[0]
    return parent or "/"
