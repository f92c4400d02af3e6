"""The data model: resources, consumers, metric definitions and columnar batches of points.

Everything that moves through the pipeline is a `Batch`. A batch holds `Series`: the metric, resource,
consumer and attributes are stored once per series, the points as two parallel lists (timestamps in
nanoseconds since the Unix epoch, UTC, and values). This shape is what makes the agent fast: msgspec
decodes columns roughly eight times faster than one Struct per point, and plugins work per series,
not per point.

Sources such as Graphite, where every point has its own metric path, put one name per point in
`Series.metric` (a list parallel to the timestamps) instead of a single name.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Literal

import msgspec

AttributeValue = str | bool | int | float
Value = int | float

#: Resource kinds named after Alumet's, so that configs and outputs read the same. Any other string
#: is a custom kind.
RESOURCE_KINDS = ("local_machine", "cpu_package", "cpu_core", "dram", "gpu", "disk", "network_interface")
CONSUMER_KINDS = ("local_machine", "process", "cgroup")

ValueType = Literal["float", "int"]


class Resource(msgspec.Struct, frozen=True, array_like=True):
    """What is measured: the machine, a CPU package, a core, a DRAM domain, a GPU, a disk..."""

    kind: str
    id: str = ""


class Consumer(msgspec.Struct, frozen=True, array_like=True):
    """Who consumes the resource: the whole machine, a process, a cgroup..."""

    kind: str
    id: str = ""


LOCAL_MACHINE = Resource("local_machine")
LOCAL_MACHINE_CONSUMER = Consumer("local_machine")


class MetricDef(msgspec.Struct, frozen=True, array_like=True):
    """A metric definition: unit as a UCUM code (`W`, `J`, `By`, `%`, `s`, `1`...)."""

    name: str
    unit: str = "1"
    value_type: ValueType = "float"
    description: str = ""


class Series(msgspec.Struct, array_like=True):
    """Points that share metric, resource, consumer and attributes, as parallel columns.

    `metric` is usually one name. Where each point has its own name (Graphite paths), it is a list of
    names parallel to `timestamps`; `names()` gives one name per point in both cases.
    """

    metric: str | list[str]
    resource: Resource
    consumer: Consumer
    attributes: dict[str, AttributeValue]
    timestamps: list[int]
    values: list[Value]

    def __len__(self) -> int:
        return len(self.timestamps)

    def names(self) -> list[str]:
        metric = self.metric
        if isinstance(metric, str):
            return [metric] * len(self.timestamps)
        return metric


class BatchIdentity(msgspec.Struct, frozen=True, array_like=True):
    """Who sent a batch, and which one it is, so that an output can tell a resent batch from a new one.

    The source that can resend a batch sets it: the relay server uses (client name, stream id, sequence
    number), a subscription input would use (stream name, consumer, stream sequence). Two batches with
    the same identity hold the same points. Outputs that can deduplicate (postgres) record it in the
    same transaction as the points; the others ignore it.
    """

    origin: str
    stream: str
    seq: int

    def __str__(self) -> str:
        return f"{self.origin}/{self.stream}#{self.seq}"


class Batch(msgspec.Struct):
    """The unit of work of the pipeline: a list of series, and the batch's identity if its source gave
    it one (the dispatcher carries it over when a transform returns a new batch)."""

    series: list[Series] = msgspec.field(default_factory=list)
    # Last, with a default: encoded batches from before it still decode.
    identity: BatchIdentity | None = None

    def __len__(self) -> int:
        """The number of points (not of series)."""
        return sum(len(s.timestamps) for s in self.series)

    def points(self) -> Iterator[tuple[str, int, Value, Series]]:
        """Yields (metric name, timestamp, value, series) per point, for outputs that write rows."""
        for s in self.series:
            names = s.names()
            yield from zip(names, s.timestamps, s.values, (s,) * len(s.timestamps), strict=True)


def now_ns() -> int:
    """Wall-clock time in nanoseconds since the epoch (UTC)."""
    return time.time_ns()


class MetricConflictError(ValueError):
    """A metric name was registered twice with different definitions."""


class MetricRegistry:
    """Metric definitions by name and by id; ids are small integers in registration order.

    Registering the same definition again (same unit and value type) returns the existing id, so that several plugins (or
    several relay clients) can share a metric; a definition that differs is an error, unless the caller
    asks for a renamed copy (`register_or_rename`).
    """

    def __init__(self) -> None:
        self._by_name: dict[str, int] = {}
        self._defs: list[MetricDef] = []

    def register(self, definition: MetricDef) -> int:
        existing = self._by_name.get(definition.name)
        if existing is not None:
            known = self._defs[existing]
            # The description is documentation: a different wording is not a conflict.
            if (known.unit, known.value_type) != (definition.unit, definition.value_type):
                raise MetricConflictError(
                    f"metric {definition.name!r} is already registered as {_describe(self._defs[existing])},"
                    f" not {_describe(definition)}"
                )
            return existing
        metric_id = len(self._defs)
        self._defs.append(definition)
        self._by_name[definition.name] = metric_id
        return metric_id

    def register_or_rename(self, definition: MetricDef, suffix: str) -> tuple[int, str]:
        """Registers `definition`; if its name is taken by a different definition, registers it as
        `NAME_SUFFIX` instead. Returns (id, the name used)."""
        try:
            return self.register(definition), definition.name
        except MetricConflictError:
            renamed = msgspec.structs.replace(definition, name=f"{definition.name}_{suffix}")
            return self.register(renamed), renamed.name

    def get(self, name: str) -> MetricDef | None:
        metric_id = self._by_name.get(name)
        return None if metric_id is None else self._defs[metric_id]

    def id_of(self, name: str) -> int | None:
        return self._by_name.get(name)

    def by_id(self, metric_id: int) -> MetricDef:
        return self._defs[metric_id]

    def __iter__(self) -> Iterator[MetricDef]:
        return iter(list(self._defs))

    def __len__(self) -> int:
        return len(self._defs)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name


def _describe(d: MetricDef) -> str:
    return f"(unit={d.unit!r}, type={d.value_type})"
