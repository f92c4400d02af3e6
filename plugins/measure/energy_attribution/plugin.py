"""The `energy-attribution` transform: shares the machine's CPU energy among consumers (processes,
cgroups) by their CPU time over the same interval.

Inputs, as they pass through the pipeline:

- the machine's energy: `rapl_consumed_energy` of the `package` domains (contrib `rapl` plugin) when
  there is any, else `estimated_energy` (`energy-estimation-tdp`); summed over packages per timestamp;
- the machine's busy CPU time: `kernel_cpu_time` of `local_machine` (`procfs`), every state but idle,
  iowait and the guest states;
- each consumer's CPU time: `cpu_time_delta` of `process` consumers (`procfs`) and `cgroup` consumers
  (`cgroups`): the kind `total` when the series has it, else the sum of the other kinds.

Every input is a delta from its series' previous timestamp to its own (sources give zero deltas at their
first poll to open the intervals). For each energy interval, once the CPU inputs reach its end (or
`max_delay` after it, with what there is), the transform adds `attributed_energy` points (J) stamped
with the energy interval's timestamp: for processes, shares of the machine's energy among all of them;
for cgroups, shares among the children of each parent (see `align.share`). Points of an estimated
energy carry `estimated = true`.

An input that never comes is said once in the log, naming it and the plugin that provides it, instead
of producing nothing silently (Alumet issue #186).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

from agent import (
    LOCAL_MACHINE,
    Batch,
    Consumer,
    NonNegativeDuration,
    Plugin,
    PluginConfig,
    Resource,
    Series,
    StartContext,
    Transform,
    hookimpl,
)
from agent_plugins.measure.energy_attribution.align import (
    Interval,
    amount_in_window,
    parent_path,
    share,
)
from agent_plugins.measure.linux.proc import NOT_BUSY_STATES

log = logging.getLogger(__name__)

NS = 1_000_000_000
CONSUMER_KINDS = ("process", "cgroup")
#: An energy interval is attributed when the CPU data reaches this close to its end (as a share of its
#: length): two sources' final polls at shutdown are a few milliseconds apart.
END_TOLERANCE = 0.25


class AttributionConfig(PluginConfig, kw_only=True):
    """The `[plugins.energy-attribution]` table."""

    max_delay: NonNegativeDuration = NonNegativeDuration(10.0)


@dataclass
class _Stream:
    """Deltas of one series, as intervals from its previous timestamp to its own."""

    last: int | None = None
    intervals: list[Interval] = field(default_factory=list)

    def add(self, timestamp: int, value: float, first_start: int | None = None) -> None:
        """`first_start`: where the stream's first delta starts, if known (the source's previous poll,
        for a consumer that appeared since); without it the first delta is an instant."""
        if self.last is None:
            start = first_start if first_start is not None and first_start < timestamp else timestamp
        else:
            start = min(self.last, timestamp)
        self.intervals.append(Interval(start, timestamp, value))
        self.last = max(timestamp, self.last or timestamp)

    def prune(self, before: int) -> None:
        self.intervals = [i for i in self.intervals if i.end > before]


@dataclass
class _Energy:
    start: int
    end: int
    joules: float
    estimated: bool
    resource: Resource


class EnergyAttribution(Transform):
    def __init__(self, max_delay: float, logger: logging.Logger = log) -> None:
        self.max_delay_ns = int(max_delay * NS)
        self.log = logger
        self._energy_last: int | None = None
        self._pending: list[_Energy] = []
        self._rapl_seen = False
        self._busy = _Stream()
        # consumer -> per-timestamp CPU (the kinds of one poll summed before they become an interval)
        self._cpu: dict[Consumer, _Stream] = {}
        self._attributes: dict[Consumer, dict[str, object]] = {}
        # The latest timestamp of each consumer kind: the previous poll of its source.
        self._kind_last: dict[str, int] = {}
        self._said: set[str] = set()
        self._energy_intervals_seen = 0
        self._cpu_points_seen = 0
        self._busy_points_seen = 0

    # -- collecting --

    def _collect(self, batch: Batch) -> None:
        energy: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
        energy_resource: dict[int, Resource] = {}
        estimated: dict[int, bool] = {}
        busy: dict[int, float] = defaultdict(float)
        cpu: dict[Consumer, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        cpu_total: dict[Consumer, dict[int, float]] = defaultdict(dict)
        for series in batch.series:
            metric = series.metric
            if not isinstance(metric, str):
                continue
            if metric == "rapl_consumed_energy" and series.attributes.get("domain") == "package":
                if not self._rapl_seen:
                    self._rapl_seen = True
                    self._pending = [e for e in self._pending if not e.estimated]
                for t, v in zip(series.timestamps, series.values, strict=True):
                    energy[t][0] += v
                    energy_resource.setdefault(t, series.resource)
                    estimated[t] = False
            elif metric == "estimated_energy" and not self._rapl_seen:
                for t, v in zip(series.timestamps, series.values, strict=True):
                    energy[t][0] += v
                    energy_resource.setdefault(t, series.resource)
                    estimated[t] = True
            elif metric == "kernel_cpu_time" and series.resource == LOCAL_MACHINE:
                counted = series.attributes.get("state") not in NOT_BUSY_STATES
                for t, v in zip(series.timestamps, series.values, strict=True):
                    busy[t] += v if counted else 0.0
            elif metric == "cpu_time_delta" and series.consumer.kind in CONSUMER_KINDS:
                kind = series.attributes.get("kind")
                target = cpu_total[series.consumer] if kind == "total" else cpu[series.consumer]
                for t, v in zip(series.timestamps, series.values, strict=True):
                    target[t] = target.get(t, 0.0) + v
                # The consumer's own attributes (a cgroup's unit, job...) go on its attributed energy.
                self._attributes[series.consumer] = {k: v for k, v in series.attributes.items() if k != "kind"}
        for t in sorted(busy):
            self._busy.add(t, busy[t])
            self._busy_points_seen += 1
        kind_last = dict(self._kind_last)
        for consumer in set(cpu) | set(cpu_total):
            by_time = cpu_total.get(consumer) or cpu[consumer]
            stream = self._cpu.get(consumer)
            if stream is None:
                stream = self._cpu[consumer] = _Stream()
            for t in sorted(by_time):
                stream.add(t, by_time[t], self._previous_poll(consumer.kind, t, kind_last))
                self._cpu_points_seen += 1
                if t > self._kind_last.get(consumer.kind, -1):
                    self._kind_last[consumer.kind] = t
        for t in sorted(energy):
            if self._energy_last is not None and t > self._energy_last:
                resource = energy_resource[t]
                self._pending.append(_Energy(self._energy_last, t, energy[t][0], estimated[t], resource))
                self._energy_intervals_seen += 1
            if self._energy_last is None or t > self._energy_last:
                self._energy_last = t

    def _previous_poll(self, kind: str, t: int, kind_last: dict[str, int]) -> int | None:
        """Where a new consumer's first delta starts: the previous poll of the source of its kind (a
        consumer that appears between two polls is new since the earlier one). Before any point of
        the kind, the previous poll of the machine's CPU time, which procfs gives at the same polls."""
        last = kind_last.get(kind)
        if last is not None and last < t:
            return last
        if kind == "process":
            return max((i.end for i in self._busy.intervals if i.end < t), default=None)
        return None

    # -- attributing --

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self.log.warning("energy-attribution: %s", message)

    def _check_inputs(self) -> None:
        if self._energy_intervals_seen >= 3 and self._busy_points_seen == 0:
            self._say_once(
                "busy",
                "no kernel_cpu_time points (the machine's CPU time, from the procfs source with kernel ="
                " true): the machine's energy cannot be shared; enable procfs",
            )
        if self._energy_last is None and (self._busy_points_seen >= 3 or self._cpu_points_seen >= 3):
            self._say_once(
                "energy",
                "no machine energy arrives: neither rapl_consumed_energy of the package domain (rapl)"
                " nor estimated_energy (energy-estimation-tdp); enable one of them",
            )
        if self._energy_intervals_seen >= 3 and self._busy_points_seen and not self._cpu:
            self._say_once(
                "consumers",
                "no cpu_time_delta of processes or cgroups: nothing to share the energy among; enable"
                " procfs (with processes = [...], or under agent exec/watch) or cgroups",
            )

    def _ready(self, energy: _Energy, newest: int) -> bool:
        if newest - energy.end >= self.max_delay_ns:
            return True  # waited long enough: attribute with what there is
        needed = energy.end - int((energy.end - energy.start) * END_TOLERANCE)
        if self._busy.last is None or self._busy.last < needed:
            return False
        # Each kind of consumer comes from its own source (procfs, cgroups), polled at its own times.
        for kind in CONSUMER_KINDS:
            reach = max((s.last for c, s in self._cpu.items() if c.kind == kind and s.last is not None), default=None)
            if reach is not None and energy.start <= reach < needed:
                return False
        return True

    def _attribute(self, energy: _Energy) -> list[Series]:
        start, end = energy.start, energy.end
        busy = amount_in_window(self._busy.intervals, start, end)
        cpu_by_consumer: dict[Consumer, float] = {}
        for consumer, stream in self._cpu.items():
            if stream.intervals and stream.intervals[-1].end > start and stream.intervals[0].start <= end:
                cpu_by_consumer[consumer] = amount_in_window(stream.intervals, start, end)
        groups: dict[tuple[str, str], dict[Consumer, float]] = defaultdict(dict)
        for consumer, seconds in cpu_by_consumer.items():
            group = ("process", "") if consumer.kind == "process" else ("cgroup", parent_path(consumer.id))
            groups[group][consumer] = seconds
        out: list[Series] = []
        for members in groups.values():
            shares = share(energy.joules, busy, {c.id: s for c, s in members.items()})
            for consumer in members:
                attributes = dict(self._attributes.get(consumer, {}))
                if energy.estimated:
                    attributes["estimated"] = True
                out.append(
                    Series("attributed_energy", energy.resource, consumer, attributes, [end], [shares[consumer.id]])
                )
        return out

    def apply(self, batch: Batch) -> Batch | None:
        self._collect(batch)
        self._check_inputs()
        if not self._pending:
            return batch
        newest = max(self._energy_last or 0, self._busy.last or 0)
        added: list[Series] = []
        while self._pending and self._ready(self._pending[0], newest):
            energy = self._pending.pop(0)
            if self._busy.last is None:
                continue  # said once by _check_inputs; nothing to share by
            added += self._attribute(energy)
        if added:
            batch.series.extend(added)
        # Keep what the pending (or, without any, the next) energy interval may still need.
        horizon = self._pending[0].start if self._pending else (self._energy_last or newest)
        horizon -= self.max_delay_ns
        self._busy.prune(horizon)
        for consumer, stream in list(self._cpu.items()):
            stream.prune(horizon)
            if not stream.intervals and stream.last is not None and stream.last < horizon:
                del self._cpu[consumer]
                self._attributes.pop(consumer, None)
        return batch


class AttributionPlugin(Plugin):
    name = "energy-attribution"
    version = "0.1.0"
    agent_api = ">=1,<2"
    description = "Shares the machine's CPU energy (RAPL or estimated) among processes and cgroups by CPU time."
    Config = AttributionConfig
    provides = ("transform",)

    def start(self, ctx: StartContext, config: AttributionConfig) -> None:
        ctx.create_metric(
            "attributed_energy",
            "J",
            "float",
            "the consumer's share of the machine's CPU energy over the interval ending at the timestamp",
        )
        ctx.add_transform(EnergyAttribution(float(config.max_delay), ctx.logger))


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [AttributionPlugin]
