"""The standalone batch encoding: one `Batch` as MessagePack bytes that carry everything needed to read them.

Over a relay session (docs/relay-protocol.md), metric definitions travel once and batches name metrics by
a session id. A batch that is stored or handed on by something else (a NATS JetStream message, an HTTP
POST to http-in) is read by whoever gets it, in any order, after any restart: so this form carries the
definitions of the metrics it uses, then the series exactly as the relay encodes them (`WireSeries`,
whose metric is an index into the definitions, or a list of names for Graphite paths), then the batch
identity when it has one:

    ["pub", version, [MetricDef...], [WireSeries...], origin, stream, seq]

Array-like msgspec Structs, with the relay's evolution rules: a new field goes at the end with a
default. `origin`/`stream`/`seq` are "", "", 0 for a batch without identity. Content type
`application/msgpack`. Pure code, no I/O; the relay protocol (plugins/relay/protocol) takes `WireSeries`
from here, so both encodings stay byte-for-byte the same per series.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from agent.decoding import MalformedData, decode_untrusted
from agent.model import AttributeValue, Batch, BatchIdentity, Consumer, MetricDef, Resource, Series, Value

#: The version this code writes and reads; a reader refuses a version it does not know.
STANDALONE_VERSION = 1

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]


class WireSeries(msgspec.Struct, array_like=True):
    """One series as the relay encodes it: `agent.model.Series` with the metric name replaced by an id
    (a session's client metric id in the relay protocol, an index into `StandaloneBatch.metrics` here).
    Where every point has its own name (Graphite paths), `metric` is the list of names, parallel to
    `timestamps`, as in the model."""

    metric: NonNegativeInt | list[str]
    resource: Resource
    consumer: Consumer
    attributes: dict[str, AttributeValue]
    timestamps: list[int]
    values: list[Value]


class StandaloneBatch(msgspec.Struct, array_like=True, frozen=True, tag="pub"):
    """One batch with the definitions of its metrics: metric ids index `metrics`."""

    version: int
    metrics: list[MetricDef]
    series: list[WireSeries]
    origin: str = ""
    stream: str = ""
    seq: NonNegativeInt = 0

    @property
    def identity(self) -> BatchIdentity | None:
        return BatchIdentity(self.origin, self.stream, self.seq) if self.origin else None


class InvalidBatch(ValueError):
    """Bytes that decode but do not make a batch (unknown version, metric id out of range, columns of
    different lengths). The message is one line naming the series."""


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(StandaloneBatch)


def encode_batch(
    batch: Batch, metric_defs: dict[str, MetricDef], identity: BatchIdentity | None = None
) -> bytes:
    """The standalone bytes of `batch`. `metric_defs` gives the definition of each metric name that a
    series names once (a name missing from it travels with the default unit "1")."""
    ids: dict[str, int] = {}
    metrics: list[MetricDef] = []
    wire: list[WireSeries] = []
    for series in batch.series:
        metric: int | list[str]
        if isinstance(series.metric, str):
            name = series.metric
            metric_id = ids.get(name)
            if metric_id is None:
                metric_id = ids[name] = len(metrics)
                metrics.append(metric_defs.get(name) or MetricDef(name))
            metric = metric_id
        else:
            metric = series.metric
        wire.append(
            WireSeries(
                metric, series.resource, series.consumer, series.attributes, series.timestamps, series.values
            )
        )
    origin, stream, seq = (identity.origin, identity.stream, identity.seq) if identity else ("", "", 0)
    return _ENCODER.encode(StandaloneBatch(STANDALONE_VERSION, metrics, wire, origin, stream, seq))


def decode_batch(data: bytes) -> tuple[StandaloneBatch, Batch]:
    """The message and its model batch (without identity: the caller decides which to give it). Raises
    MalformedData for bytes that are not a standalone batch, InvalidBatch for one that is inconsistent."""
    message: StandaloneBatch = decode_untrusted(_DECODER, data)
    if message.version != STANDALONE_VERSION:
        raise InvalidBatch(
            f"batch version {message.version} is not supported (this agent reads {STANDALONE_VERSION})"
        )
    model: list[Series] = []
    for index, series in enumerate(message.series):
        count = len(series.timestamps)
        metric: str | list[str]
        if isinstance(series.metric, int):
            if series.metric >= len(message.metrics):
                raise InvalidBatch(
                    f"series {index}: metric id {series.metric} but the batch defines {len(message.metrics)} metrics"
                )
            metric = message.metrics[series.metric].name
        else:
            if len(series.metric) != count:
                raise InvalidBatch(
                    f"series {index}: {len(series.metric)} metric names for {count} timestamps"
                )
            metric = series.metric
        if len(series.values) != count:
            raise InvalidBatch(f"series {index}: {len(series.values)} values for {count} timestamps")
        model.append(
            Series(
                metric, series.resource, series.consumer, series.attributes, series.timestamps, series.values
            )
        )
    return message, Batch(model)


__all__ = [
    "STANDALONE_VERSION",
    "InvalidBatch",
    "MalformedData",
    "StandaloneBatch",
    "WireSeries",
    "decode_batch",
    "encode_batch",
]
