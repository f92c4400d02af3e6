"""The relay wire protocol, shared by the relay-client and relay-server plugins.

Pure code, no I/O: `messages` defines what is said (a tagged union of msgspec Structs) and converts
wire batches to and from `agent.model.Batch`; `framing` cuts a byte stream into length-prefixed
frames; `streams` is the server's memory of client streams (duplicates, cumulative acks); `session`
the client's resume decision and in-flight window; `address` parses HOST:PORT. The plugins' trio code
only moves bytes. The specification is docs/relay-protocol.md.
"""

from .framing import (
    DEFAULT_MAX_FRAME_SIZE,
    FRAME_SIZE_LIMIT,
    HEADER_SIZE,
    FrameDecoder,
    FrameEncoder,
    FrameTooLargeError,
    MalformedMessageError,
    TruncatedStreamError,
    UnknownMessageTypeError,
)
from .messages import (
    PROTOCOL_VERSION,
    SUPPORTED_PROTOCOL_VERSIONS,
    Accept,
    Ack,
    AnyMessage,
    BatchMessage,
    ClientMessage,
    Goodbye,
    GoodbyeCode,
    Heartbeat,
    Hello,
    InvalidBatchError,
    Message,
    MetricDefs,
    PreEncodedBatch,
    ProtocolError,
    Refused,
    Reject,
    RejectCode,
    ServerMessage,
    UndefinedMetricError,
    WireSeries,
    batch_from_wire,
    batch_to_wire,
)

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "FRAME_SIZE_LIMIT",
    "HEADER_SIZE",
    "PROTOCOL_VERSION",
    "SUPPORTED_PROTOCOL_VERSIONS",
    "Accept",
    "Ack",
    "AnyMessage",
    "BatchMessage",
    "ClientMessage",
    "FrameDecoder",
    "FrameEncoder",
    "FrameTooLargeError",
    "Goodbye",
    "GoodbyeCode",
    "Heartbeat",
    "Hello",
    "InvalidBatchError",
    "MalformedMessageError",
    "Message",
    "MetricDefs",
    "PreEncodedBatch",
    "ProtocolError",
    "Refused",
    "Reject",
    "RejectCode",
    "ServerMessage",
    "TruncatedStreamError",
    "UndefinedMetricError",
    "UnknownMessageTypeError",
    "WireSeries",
    "batch_from_wire",
    "batch_to_wire",
]
