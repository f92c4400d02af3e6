"""Frames of the relay protocol: a 4-byte big-endian body length, then a MessagePack body.

`FrameEncoder` turns messages into frames; `FrameDecoder` is fed bytes as they come from the socket,
in any chunking, and yields decoded messages. Both are built once per connection (one msgspec Encoder,
one typed Decoder) and do no I/O: the relay-client and relay-server plugins move the bytes.

A length above the receiver's maximum frame size is refused as soon as the 4 header bytes arrive,
before any buffer of that size exists, so a peer cannot make us allocate more than the maximum.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, Generic, Literal, TypeVar

import msgspec

from agent.decoding import DECODE_ERRORS, MalformedData, decode_untrusted

from .messages import Message, PreEncodedBatch, ProtocolError, WireSeries

#: 16 MiB: a batch of about 800 000 points. A client splits larger batches.
DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024
#: The largest length the 4-byte header can express.
FRAME_SIZE_LIMIT = 2**32 - 1

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size

M = TypeVar("M", bound=Message)


class FrameTooLargeError(ProtocolError):
    """A frame longer than the maximum frame size. The stream cannot be resynchronised after it."""

    def __init__(self, size: int, max_frame_size: int, direction: str) -> None:
        super().__init__(
            f"{direction} frame of {size} bytes exceeds the maximum frame size of {max_frame_size} bytes"
        )
        self.size = size
        self.max_frame_size = max_frame_size


class MalformedMessageError(ProtocolError):
    """A frame body that is not a valid message: not MessagePack, or fields of the wrong type."""


class UnknownMessageTypeError(MalformedMessageError):
    """A frame body whose tag is not a message this side expects."""


class TruncatedStreamError(ProtocolError):
    """The connection ended in the middle of a frame."""


def _check_max_frame_size(max_frame_size: int) -> int:
    if not HEADER_SIZE <= max_frame_size <= FRAME_SIZE_LIMIT:
        raise ValueError(
            f"max_frame_size must be between {HEADER_SIZE} and {FRAME_SIZE_LIMIT}, got {max_frame_size}"
        )
    return max_frame_size


class FrameEncoder:
    """Encodes messages into frames, refusing bodies above `max_frame_size` (the peer's limit: a client
    sets it from Accept.max_frame_size)."""

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = _check_max_frame_size(max_frame_size)
        self._encoder = msgspec.msgpack.Encoder()

    def encode(self, message: Message) -> bytearray:
        """One frame (header and body) in a new buffer that the caller owns (it may keep it for a
        resend). Raises FrameTooLargeError if the body exceeds `max_frame_size`."""
        # The body is written behind a reserved header, so that the frame is built without a copy.
        frame = bytearray(HEADER_SIZE)
        self._encoder.encode_into(message, frame, HEADER_SIZE)
        size = len(frame) - HEADER_SIZE
        if size > self.max_frame_size:
            raise FrameTooLargeError(size, self.max_frame_size, "outgoing")
        _HEADER.pack_into(frame, 0, size)
        return frame

    def encode_series(self, series: list[WireSeries]) -> bytes:
        """The series of a batch as MessagePack, to store (in a durable log) and frame later with
        `encode_batch`."""
        return self._encoder.encode(series)

    def encode_batch(self, seq: int, encoded_series: bytes) -> bytearray:
        """The frame of a batch whose series `encode_series` encoded: byte for byte the frame of
        `encode(BatchMessage(seq, series))`, with one copy of the series instead of an encoding."""
        return self.encode(PreEncodedBatch(seq, msgspec.Raw(encoded_series)))


class FrameDecoder(Generic[M]):
    """Decodes a byte stream into messages of `message_type` (ClientMessage on a server, ServerMessage
    on a client).

    `feed(data)` buffers the bytes and returns an iterator over the messages completed so far. Messages
    not consumed from that iterator stay buffered and come out of the next one. Errors are
    ProtocolError subclasses with a one-line message: FrameTooLargeError (fatal: the stream cannot be
    resynchronised), MalformedMessageError and UnknownMessageTypeError (the bad frame is skipped, so
    decoding could go on, though the protocol ends the session).
    """

    def __init__(self, message_type: Any, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = _check_max_frame_size(max_frame_size)
        self._decoder: msgspec.msgpack.Decoder[M] = msgspec.msgpack.Decoder(message_type)
        self._types_by_tag = _types_by_tag(message_type)
        self._buffer = bytearray()

    @property
    def pending_bytes(self) -> int:
        """Bytes received that do not yet form a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[M]:
        self._buffer += data
        return self._drain()

    def eof(self) -> None:
        """To call when the peer closed the connection: raises TruncatedStreamError if it did so in the
        middle of a frame."""
        if self._buffer:
            raise TruncatedStreamError(
                f"connection closed in the middle of a frame ({len(self._buffer)} bytes pending)"
            )

    def _drain(self) -> Iterator[M]:
        buffer = self._buffer
        while len(buffer) >= HEADER_SIZE:
            (size,) = _HEADER.unpack_from(buffer)
            if size > self.max_frame_size:
                raise FrameTooLargeError(size, self.max_frame_size, "incoming")
            end = HEADER_SIZE + size
            if len(buffer) < end:
                return
            # The views must be released before the buffer is resized, hence the with block.
            with memoryview(buffer) as whole, whole[HEADER_SIZE:end] as body:
                try:
                    message = decode_untrusted(self._decoder, body)
                except MalformedData as error:
                    described = self._describe(error, body)
                else:
                    described = None
            # Deleting from the front of a bytearray is O(1) in CPython: it moves a start offset.
            del buffer[:end]
            if described is not None:
                raise described
            yield message

    def _describe(self, malformed: MalformedData, body: memoryview) -> ProtocolError:
        """A one-line error naming the message type (when the tag is readable) and the bad field.

        Which of these it is comes from reading the body again (its first element, then each field on
        its own), not from msgspec's message, whose wording changes between releases; that message
        only describes the problem."""
        if not malformed.validation:
            return MalformedMessageError(f"undecodable frame body ({len(body)} bytes): {malformed}")
        described = _one_line(malformed.__cause__ or malformed)
        tag = _read_tag(body)
        if tag is None:
            return MalformedMessageError(f"frame body is not a tagged message: {described}")
        if tag is False:
            return UnknownMessageTypeError(f"message tag is not a string: {described}")
        message_type = self._types_by_tag.get(tag)
        if message_type is None:
            expected = ", ".join(sorted(self._types_by_tag))
            return UnknownMessageTypeError(
                f"unexpected message type {_one_line(repr(tag))} (expected one of: {expected})"
            )
        field = _first_bad_field(body, message_type)
        named = f" (field {field!r})" if field is not None else ""
        return MalformedMessageError(f"invalid {tag!r} message: {described}{named}")


class _Head(msgspec.Struct, array_like=True):
    """The first element of a message array, undecoded. Decoding it skips the other elements without
    building them, so reading the tag of a bad frame costs no memory."""

    tag: msgspec.Raw


# The two functions below run only on errors and return plain values: a msgspec.Raw decoded from the
# frame's memoryview holds an export of it, which must be gone before the decoder's buffer is resized.


def _read_tag(body: memoryview) -> str | Literal[False] | None:
    """The tag of a message array; False when its first element is not a string, None when the body is
    not an array of at least one element."""
    try:
        head = msgspec.msgpack.decode(body, type=_Head)
    except DECODE_ERRORS:
        return None
    try:
        return msgspec.msgpack.decode(head.tag, type=str)
    except DECODE_ERRORS:
        return False


def _first_bad_field(body: memoryview, message_type: type[Message]) -> str | None:
    """The first field of a message array (after the tag) whose value does not decode to its type on its
    own; None when each does (the array is too short, or a check of the whole message failed)."""
    try:
        values = msgspec.msgpack.decode(body, type=_field_reader(message_type))
    except DECODE_ERRORS:
        return None
    for info in msgspec.structs.fields(message_type):
        raw = getattr(values, info.name)
        if not raw:  # the array ended before this field
            continue
        try:
            msgspec.msgpack.decode(raw, type=info.type)
        except DECODE_ERRORS:
            return info.name
    return None


def _field_reader(message_type: type[Message]) -> type[msgspec.Struct]:
    """An array-like Struct that reads the tag and each field of `message_type` as undecoded bytes (built
    when a frame is bad, which ends the session: no need to keep it)."""
    fields = [(info.name, msgspec.Raw, msgspec.Raw()) for info in msgspec.structs.fields(message_type)]
    return msgspec.defstruct(
        f"_{message_type.__name__}Fields", [("tag", msgspec.Raw), *fields], array_like=True
    )


#: Error texts quote values from the wire: keep them short and on one line.
_MAX_QUOTED_TEXT = 200


def _one_line(text: object) -> str:
    text = str(text)
    if len(text) > _MAX_QUOTED_TEXT:
        # Keep both ends: msgspec puts the bad value first and its place (`$[2][0]...`) last.
        half = _MAX_QUOTED_TEXT // 2
        text = f"{text[:half]}...{text[-half:]}"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _types_by_tag(message_type: Any) -> dict[str, type[Message]]:
    members = getattr(message_type, "__args__", (message_type,))
    return {member.__struct_config__.tag: member for member in members}


__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "FRAME_SIZE_LIMIT",
    "HEADER_SIZE",
    "FrameDecoder",
    "FrameEncoder",
    "FrameTooLargeError",
    "MalformedMessageError",
    "TruncatedStreamError",
    "UnknownMessageTypeError",
]
