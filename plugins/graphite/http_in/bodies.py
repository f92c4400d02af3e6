"""What http-in accepts, as pure functions from request bodies to batches: no I/O, fuzzed by the tests.

- `POST /v1/batches`: the standalone batch encoding (`agent.batch_codec`, MessagePack,
  `application/msgpack`): the series as the relay encodes them with the definitions of their metrics,
  and the batch identity if the sender gave one.
- `POST /v1/points`: JSON, a list of objects `{"metric": "cpu_percent", "value": 12.5, "timestamp":
  1764547200.25, "resource": {"kind": "cpu_core", "id": "3"}, "consumer": {"kind": "process", "id":
  "1234"}, "attributes": {"host": "a"}}`; `timestamp` (seconds since the epoch, UTC; default: the
  arrival time), `resource`, `consumer` (default: the local machine) and `attributes` are optional.
- `POST /v1/graphite`: Graphite plaintext lines (`path value timestamp`), through the same parser and
  validation as graphite-in.

Each decoder returns a `Decoded` (the batch, the metric definitions it brings) or raises `BadBody`,
whose message is the one-line reason of the 400 response. A body is taken whole or not at all: a body
with one bad line or point is refused, so the sender can fix it and send it again without duplicates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal

import msgspec

from agent import BatchBuilder, MalformedData, decode_untrusted
from agent.batch_codec import InvalidBatch, decode_batch
from agent.model import (
    LOCAL_MACHINE,
    LOCAL_MACHINE_CONSUMER,
    AttributeValue,
    Batch,
    BatchIdentity,
    Consumer,
    MetricDef,
    Resource,
)
from agent_plugins.graphite.graphite_in.series import graphite_series
from agent_plugins.graphite.protocol.plaintext import ValidationLevel, parse_chunk

NS_PER_SECOND = 1_000_000_000
#: Timestamps accepted in JSON points: from 1970 to the year 2554 (what fits in int64 nanoseconds).
MAX_TIMESTAMP_SECONDS = (2**63 - 1) // NS_PER_SECOND


class BadBody(ValueError):
    """A body that cannot be taken; the message is the reason, one line."""


@dataclass
class Decoded:
    batch: Batch
    metrics: list[MetricDef] = field(default_factory=list)
    identity: BatchIdentity | None = None
    #: Graphite: bad lines by reason (the body is refused when there is any).
    bad_counts: dict[str, int] = field(default_factory=dict)


class JsonEntity(msgspec.Struct, forbid_unknown_fields=True):
    kind: str
    id: str = ""


class JsonPoint(msgspec.Struct, forbid_unknown_fields=True):
    metric: str
    value: int | float
    timestamp: float | None = None
    resource: JsonEntity | None = None
    consumer: JsonEntity | None = None
    attributes: dict[str, AttributeValue] = msgspec.field(default_factory=dict)


_POINTS_DECODER = msgspec.json.Decoder(list[JsonPoint])


def decode_batches_body(body: bytes) -> Decoded:
    try:
        message, batch = decode_batch(body)
    except MalformedData as exc:
        raise BadBody(f"not a batch (standalone relay batch encoding, MessagePack): {exc}") from None
    except InvalidBatch as exc:
        raise BadBody(f"invalid batch: {exc}") from None
    return Decoded(batch, list(message.metrics), message.identity)


def decode_points_body(body: bytes, now_ns: int) -> Decoded:
    try:
        points: list[JsonPoint] = decode_untrusted(_POINTS_DECODER, body)
    except MalformedData as exc:
        raise BadBody(f"not a JSON list of points: {exc}") from None
    builder = BatchBuilder()
    for index, point in enumerate(points):
        if not point.metric:
            raise BadBody(f"point {index}: empty metric name")
        value = point.value
        if isinstance(value, float) and not math.isfinite(value):
            raise BadBody(f"point {index}: value must be a finite number")
        if point.timestamp is None:
            timestamp_ns = now_ns
        else:
            if not 0 <= point.timestamp <= MAX_TIMESTAMP_SECONDS:
                raise BadBody(f"point {index}: timestamp {point.timestamp!r} is not seconds since 1970")
            # From the number as written (the shortest repr of the float), not float * 1e9, whose
            # rounding moves 1764547200.25 to ...249999872 ns.
            timestamp_ns = int(Decimal(repr(point.timestamp)) * NS_PER_SECOND)
        resource = Resource(point.resource.kind, point.resource.id) if point.resource else LOCAL_MACHINE
        consumer = (
            Consumer(point.consumer.kind, point.consumer.id) if point.consumer else LOCAL_MACHINE_CONSUMER
        )
        builder.add(point.metric, value, timestamp_ns, resource, consumer, point.attributes)
    return Decoded(builder.take())


def decode_graphite_body(
    body: bytes, now_ns: int, validation: ValidationLevel = "medium", max_line_length: int = 16384
) -> Decoded:
    if body and not body.endswith(b"\n"):
        body += b"\n"
    chunk = parse_chunk(body, now_ns=now_ns, validation=validation, max_line_length=max_line_length)
    if chunk.bad_counts:
        total = sum(chunk.bad_counts.values())
        first = chunk.bad_samples[0] if chunk.bad_samples else None
        detail = f"; first: {first.reason}: {first.message}: {first.line!r}" if first else ""
        error = BadBody(f"{total} bad line{'s' if total != 1 else ''}{detail}")
        error.bad_counts = dict(chunk.bad_counts)  # type: ignore[attr-defined]
        raise error
    return Decoded(Batch(graphite_series(chunk.paths, chunk.timestamps, chunk.values, chunk.tagged)))


__all__ = [
    "BadBody",
    "Decoded",
    "JsonPoint",
    "decode_batches_body",
    "decode_graphite_body",
    "decode_points_body",
]
