"""The messages of the relay protocol, and the conversion between wire batches and `agent.model.Batch`.

The relay carries measurements from a relay-client agent to a relay-server agent over one TCP (or TLS)
connection. Every frame body (see `framing`) is one of the messages below, encoded with MessagePack as
a tagged union of array-like msgspec Structs: each message is an array whose first element is a short
tag ("hello", "batch", ...) followed by the fields in declaration order. docs/relay-protocol.md is the
specification; this module is its executable form.

Wire compatibility rules (msgspec schema evolution): a field is never removed, renamed in meaning,
reordered or retyped; a new field goes at the end of its Struct with a default. An older peer ignores
trailing fields it does not know, and a newer peer fills the defaults for fields an older peer did not
send. `agent.model.Resource`, `Consumer` and `MetricDef` travel as they are, so the same rules apply
to them. The golden-bytes tests in tests/test_golden.py fail on any accidental change.

This module has no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Annotated

import msgspec

from agent.batch_codec import WireSeries
from agent.model import Batch, MetricDef, Series

#: The protocol version this code speaks. A server accepts a Hello whose version it supports and
#: answers with the version the session will use; otherwise it sends Reject with its own version.
PROTOCOL_VERSION = 1
SUPPORTED_PROTOCOL_VERSIONS = frozenset({1})

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
#: Batch sequence numbers start at 1, so that 0 can mean "nothing acknowledged yet".
SequenceNumber = Annotated[int, msgspec.Meta(ge=1)]


class RejectCode(enum.StrEnum):
    """Why a server refused a Hello. Travels as a plain string: a newer server may send other codes."""

    VERSION = "version"  # the server does not speak the client's protocol version
    AUTH = "auth"  # missing or wrong token, or the TLS client certificate does not match the name
    BUSY = "busy"  # the server is at its connection limit; retry later
    INVALID = "invalid"  # the first message was not a valid Hello


class GoodbyeCode(enum.StrEnum):
    """Why a peer closes a session. Travels as a plain string, like RejectCode."""

    SHUTDOWN = "shutdown"  # the peer is stopping; everything it acknowledged is written
    PROTOCOL_ERROR = "protocol_error"  # the other side broke the protocol (the reason says how)
    SUPERSEDED = "superseded"  # a new connection of the same client stream took over
    TIMEOUT = "timeout"  # nothing received within the heartbeat timeout
    #: Server -> client: an accepted batch could not be written (an output dropped it); reconnect and
    #: resend from Accept.acked_seq. Added in phase 2 without a version change: unknown codes are
    #: treated like protocol_error, on which a client reconnects and resends too.
    RESEND = "resend"


class Message(msgspec.Struct, array_like=True, frozen=True, tag=True):
    """Base of every relay message; the subclasses set a short tag."""


# --- handshake ---------------------------------------------------------------------------------------


class Hello(Message, tag="hello"):
    """Client -> server, first message of every connection.

    `stream_id` names the client's durable log of batches (random, persisted with it): batch sequence
    numbers are counted per stream, so that the server recognises a batch resent after a reconnect.
    """

    protocol_version: int
    client_name: str
    stream_id: str
    agent_version: str
    token: str | None = None


class Accept(Message, tag="accept"):
    """Server -> client: the session is open.

    `acked_seq` is the highest sequence number of this (client name, stream id) that the server has
    already written (0: none it remembers); the client drops those batches from its log and resends
    the rest. `received_seq` (>= acked_seq) is the highest it has received, written or not: above the
    client's last number, it shows that the client's numbering went backwards (a log rolled back by
    a power loss), and the client must start a new stream. `max_in_flight` is how many batches the
    client may send beyond the last Ack; `heartbeat_interval_ms` is how often each side sends
    something (a Heartbeat if idle).
    """

    protocol_version: int
    server_version: str
    session_id: str
    acked_seq: NonNegativeInt
    received_seq: NonNegativeInt
    max_frame_size: Annotated[int, msgspec.Meta(ge=1024, le=2**32 - 1)]
    max_in_flight: Annotated[int, msgspec.Meta(ge=1)]
    heartbeat_interval_ms: Annotated[int, msgspec.Meta(ge=1)]


class Reject(Message, tag="reject"):
    """Server -> client, instead of Accept; the server closes the connection after it.

    `protocol_version` is the newest version the server speaks, so that the client can log
    "server speaks protocol 3, we speak 2". `code` is one of RejectCode.
    """

    code: str
    reason: str
    protocol_version: int
    server_version: str


# --- data --------------------------------------------------------------------------------------------


class MetricDefs(Message, tag="defs"):
    """Client -> server: metric definitions by client metric id, sent in each session before the first
    batch that uses them. The description is kept (Alumet drops it)."""

    definitions: dict[NonNegativeInt, MetricDef]


class BatchMessage(Message, tag="batch"):
    """Client -> server: points, columnar. `seq` increases by at least 1 from one batch to the next
    within a stream, across sessions and client restarts; gaps are allowed."""

    seq: SequenceNumber
    series: list[WireSeries]


class PreEncodedBatch(Message, tag="batch"):
    """Encode-only twin of BatchMessage whose series are already MessagePack (`FrameEncoder.
    encode_series`): the same bytes on the wire. A client stores the encoded series of each batch in
    its durable log, which hands out the seq, and frames them at every (re)send without re-encoding."""

    seq: SequenceNumber
    series: msgspec.Raw


class Ack(Message, tag="ack"):
    """Server -> client, cumulative: every batch of the stream with a sequence number <= `seq` is done
    (written by the server's outputs, a duplicate of such a batch, or refused)."""

    seq: NonNegativeInt


class Refused(Message, tag="refused"):
    """Server -> client: the batch `seq` was decodable but invalid (for instance columns of different
    lengths) and was dropped; resending it cannot help. A later Ack covers it."""

    seq: SequenceNumber
    reason: str


# --- liveness and closing ----------------------------------------------------------------------------


class Heartbeat(Message, tag="hb"):
    """Either direction, when a side has sent nothing for the heartbeat interval."""


class Goodbye(Message, tag="bye"):
    """Either direction, the last message before closing. `code` is one of GoodbyeCode."""

    code: str
    reason: str


#: What a server decodes, and what a client decodes.
ClientMessage = Hello | MetricDefs | BatchMessage | Heartbeat | Goodbye
ServerMessage = Accept | Reject | Ack | Refused | Heartbeat | Goodbye
AnyMessage = Hello | Accept | Reject | MetricDefs | BatchMessage | Ack | Refused | Heartbeat | Goodbye


# --- conversion to and from agent.model.Batch --------------------------------------------------------


class ProtocolError(Exception):
    """Base of every error of the relay protocol. str() is one line naming what was wrong and where."""


class UndefinedMetricError(ProtocolError):
    """A batch references a metric that has no definition in this session."""


class InvalidBatchError(ProtocolError):
    """A decodable batch that breaks a rule msgspec cannot check (parallel columns of equal length)."""


def batch_to_wire(seq: int, batch: Batch, metric_ids: Mapping[str, int]) -> BatchMessage:
    """The wire form of `batch`, with metric names replaced by their client ids.

    Per series, never per point: the timestamps, values and per-point name lists are shared with the
    model batch, not copied. Raises UndefinedMetricError for a name missing from `metric_ids` (its
    MetricDefs must be sent first).
    """
    wire_series = []
    for series in batch.series:
        metric = series.metric
        if isinstance(metric, str):
            try:
                metric = metric_ids[metric]
            except KeyError:
                raise UndefinedMetricError(
                    f"batch {seq}: metric {metric!r} has no client id; send its MetricDefs first"
                ) from None
        wire_series.append(
            WireSeries(
                metric, series.resource, series.consumer, series.attributes, series.timestamps, series.values
            )
        )
    return BatchMessage(seq, wire_series)


def batch_from_wire(message: BatchMessage, metric_names: Mapping[int, str]) -> Batch:
    """The model batch of a received BatchMessage; `metric_names` maps the session's client metric ids
    to the names the server registered them under.

    Raises UndefinedMetricError for an id missing from `metric_names` (the client broke the protocol:
    the session should end, the batch stays in the client's log), InvalidBatchError when the columns
    of a series differ in length (the batch can never be valid: refuse it).
    """
    model_series = []
    for index, wire in enumerate(message.series):
        metric = wire.metric
        count = len(wire.timestamps)
        if isinstance(metric, int):
            try:
                metric = metric_names[metric]
            except KeyError:
                raise UndefinedMetricError(
                    f"batch {message.seq} series {index}: metric id {metric} was not defined in this session"
                ) from None
        elif len(metric) != count:
            raise InvalidBatchError(
                f"batch {message.seq} series {index}: {len(metric)} metric names for {count} timestamps"
            )
        if len(wire.values) != count:
            raise InvalidBatchError(
                f"batch {message.seq} series {index}: {len(wire.values)} values for {count} timestamps"
            )
        model_series.append(
            Series(metric, wire.resource, wire.consumer, wire.attributes, wire.timestamps, wire.values)
        )
    return Batch(model_series)
