"""Encoding what the relay client takes from its queue into log records: one encoded batch per record.

A record is the MessagePack of a batch's wire series (`FrameEncoder.encode_series`), encoded once when
the batch enters the buffer and framed with its sequence number at every (re)send. A record must fit
in one frame, so a batch too large for `max_payload` is split, by series first, then by slicing the
columns of a long series. Pure code: no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from agent.model import Batch, Series
from agent_plugins.relay_protocol import FrameEncoder, WireSeries, batch_to_wire

log = logging.getLogger(__name__)

#: What a batch frame adds around the stored series: the 4-byte length, the message array header,
#: the "batch" tag and the sequence number (at most 9 bytes as a MessagePack integer).
FRAME_OVERHEAD = 32


@dataclass
class EncodedRecords:
    payloads: list[bytes] = field(default_factory=list)
    #: Points that could not be encoded into any frame (a single point larger than the limit).
    dropped_points: int = 0


def encode_records(
    encoder: FrameEncoder, series: Sequence[Series], metric_ids: Mapping[str, int], max_payload: int
) -> EncodedRecords:
    """The records for `series` (every metric name must have an id in `metric_ids`)."""
    wire = batch_to_wire(1, Batch(list(series)), metric_ids).series
    out = EncodedRecords()
    _encode_into(encoder, wire, max_payload, out)
    return out


def _encode_into(encoder: FrameEncoder, wire: list[WireSeries], max_payload: int, out: EncodedRecords) -> None:
    payload = encoder.encode_series(wire)
    if len(payload) <= max_payload:
        out.payloads.append(payload)
        return
    if len(wire) > 1:
        middle = len(wire) // 2
        _encode_into(encoder, wire[:middle], max_payload, out)
        _encode_into(encoder, wire[middle:], max_payload, out)
        return
    [single] = wire
    count = len(single.timestamps)
    if count <= 1:
        out.dropped_points += count
        log.error(
            "relay-client: dropped a point of metric %r: alone it takes %d bytes, more than a frame may hold"
            " (%d bytes; raise max_frame_size on both sides)",
            single.metric if isinstance(single.metric, int) else single.metric[0],
            len(payload),
            max_payload,
        )
        return
    middle = count // 2
    for part in (slice(0, middle), slice(middle, count)):
        metric = single.metric if isinstance(single.metric, int) else single.metric[part]
        _encode_into(
            encoder,
            [
                WireSeries(
                    metric,
                    single.resource,
                    single.consumer,
                    single.attributes,
                    single.timestamps[part],
                    single.values[part],
                )
            ],
            max_payload,
            out,
        )


__all__ = ["FRAME_OVERHEAD", "EncodedRecords", "encode_records"]
