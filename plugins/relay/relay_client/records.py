"""Encoding what the relay client takes from its queue into log records: one batch frame per record.

A record is the complete frame of one `BatchMessage` (length prefix included), encoded once when the
batch enters the buffer, with the sequence number the log is about to give the record: the log's
record number *is* the batch's sequence number, and it never changes, so every (re)send writes the
stored bytes as they are, without encoding or copying them again.

A frame must fit the frame size limit, so a batch too large is split, by series first, then by slicing
the columns of a long series; each part is a batch of its own, with its own sequence number. Pure
code: no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from agent.model import Batch, Series
from agent_plugins.relay.protocol import (
    BatchMessage,
    FrameEncoder,
    FrameTooLargeError,
    WireSeries,
    batch_to_wire,
)

log = logging.getLogger(__name__)


@dataclass
class EncodedRecords:
    #: Complete frames, numbered first_seq, first_seq + 1...
    frames: list[bytearray] = field(default_factory=list)
    #: Points that could not be encoded into any frame (a single point larger than the limit).
    dropped_points: int = 0


def encode_records(
    encoder: FrameEncoder, series: Sequence[Series], metric_ids: Mapping[str, int], first_seq: int
) -> EncodedRecords:
    """The frames for `series`, numbered from `first_seq`; each body is at most the encoder's
    `max_frame_size`. Every metric name must have an id in `metric_ids`."""
    wire = batch_to_wire(first_seq, Batch(list(series)), metric_ids).series
    out = EncodedRecords()
    _encode_into(encoder, wire, first_seq, out)
    return out


def _encode_into(encoder: FrameEncoder, wire: list[WireSeries], first_seq: int, out: EncodedRecords) -> None:
    seq = first_seq + len(out.frames)
    try:
        out.frames.append(encoder.encode(BatchMessage(seq, wire)))
        return
    except FrameTooLargeError as exc:
        too_large = exc
    if len(wire) > 1:
        middle = len(wire) // 2
        _encode_into(encoder, wire[:middle], first_seq, out)
        _encode_into(encoder, wire[middle:], first_seq, out)
        return
    [single] = wire
    count = len(single.timestamps)
    if count <= 1:
        out.dropped_points += count
        log.error(
            "relay-client: dropped a point (client metric %r): alone it does not fit in a frame: %s;"
            " raise max_frame_size on both sides",
            single.metric if isinstance(single.metric, int) else single.metric[0],
            too_large,
        )
        return
    middle = count // 2
    for part in (slice(0, middle), slice(middle, count)):
        metric = single.metric if isinstance(single.metric, int) else single.metric[part]
        piece = WireSeries(
            metric,
            single.resource,
            single.consumer,
            single.attributes,
            single.timestamps[part],
            single.values[part],
        )
        _encode_into(encoder, [piece], first_seq, out)


__all__ = ["EncodedRecords", "encode_records"]
