"""Frames: length prefix, any chunking, the maximum frame size and each decoding error."""

import tracemalloc

import msgspec
import pytest

from agent_plugins.relay.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    Ack,
    ClientMessage,
    FrameDecoder,
    FrameEncoder,
    FrameTooLargeError,
    Goodbye,
    Heartbeat,
    Hello,
    MalformedMessageError,
    ProtocolError,
    ServerMessage,
    TruncatedStreamError,
    UnknownMessageTypeError,
)

HELLO = Hello(1, "node-7", "stream-1", "0.1.0")


def frame_of(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def test_a_frame_is_a_big_endian_length_then_the_body():
    frame = FrameEncoder().encode(Ack(300))
    body = msgspec.msgpack.encode(["ack", 300])
    assert bytes(frame) == len(body).to_bytes(4, "big") + body


def test_frames_split_at_every_byte_decode_to_the_same_messages():
    messages = [HELLO, Heartbeat(), Goodbye("shutdown", "bye")]
    encoder = FrameEncoder()
    stream = b"".join(encoder.encode(m) for m in messages)
    decoder = FrameDecoder(ClientMessage)
    received = []
    for i in range(len(stream)):
        received.extend(decoder.feed(stream[i : i + 1]))
        # Nothing comes out before a frame's last byte arrives.
        assert len(received) <= sum(1 for end in _frame_ends(stream) if end <= i + 1)
    assert received == messages
    assert decoder.pending_bytes == 0
    decoder.eof()


def _frame_ends(stream: bytes) -> list[int]:
    ends, position = [], 0
    while position < len(stream):
        position += 4 + int.from_bytes(stream[position : position + 4], "big")
        ends.append(position)
    return ends


def test_messages_not_consumed_stay_buffered_for_the_next_feed():
    decoder = FrameDecoder(ServerMessage)
    encoder = FrameEncoder()
    iterator = decoder.feed(encoder.encode(Ack(1)) + encoder.encode(Ack(2)))
    assert next(iterator) == Ack(1)
    del iterator  # e.g. the handler was cancelled
    assert list(decoder.feed(encoder.encode(Ack(3)))) == [Ack(2), Ack(3)]


def test_a_length_over_the_maximum_is_refused_from_the_header_alone():
    decoder = FrameDecoder(ClientMessage, max_frame_size=1000)
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLargeError) as caught:
            list(decoder.feed((2**32 - 1).to_bytes(4, "big")))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (
        str(caught.value) == "incoming frame of 4294967295 bytes exceeds the maximum frame size of 1000 bytes"
    )
    assert (caught.value.size, caught.value.max_frame_size) == (2**32 - 1, 1000)
    assert peak < 100_000


def test_a_frame_of_exactly_the_maximum_is_accepted():
    frame = FrameEncoder().encode(Goodbye("shutdown", "x" * 100))
    size = len(frame) - 4
    assert list(FrameDecoder(ClientMessage, max_frame_size=size).feed(frame)) == [
        Goodbye("shutdown", "x" * 100)
    ]
    with pytest.raises(
        FrameTooLargeError, match=f"frame of {size} bytes exceeds the maximum frame size of {size - 1} bytes"
    ):
        list(FrameDecoder(ClientMessage, max_frame_size=size - 1).feed(frame))


def test_the_encoder_refuses_a_body_over_the_peers_maximum():
    encoder = FrameEncoder(max_frame_size=1024)
    with pytest.raises(
        FrameTooLargeError,
        match=r"^outgoing frame of 2\d\d\d bytes exceeds the maximum frame size of 1024 bytes$",
    ):
        encoder.encode(Goodbye("shutdown", "x" * 2000))
    # The encoder stays usable, and the limit can follow Accept.max_frame_size.
    encoder.max_frame_size = DEFAULT_MAX_FRAME_SIZE
    assert len(encoder.encode(Goodbye("shutdown", "x" * 2000))) > 2000


def test_the_encoder_returns_a_buffer_the_caller_owns():
    encoder = FrameEncoder()
    first = encoder.encode(Ack(1))
    encoder.encode(Ack(2))
    assert list(FrameDecoder(ServerMessage).feed(first)) == [Ack(1)]


@pytest.mark.parametrize("size", [0, 3, 2**32])
def test_an_impossible_maximum_frame_size_is_a_configuration_error(size):
    with pytest.raises(ValueError, match="max_frame_size must be between 4 and 4294967295"):
        FrameDecoder(ClientMessage, max_frame_size=size)


@pytest.mark.parametrize(
    ("body", "error_type", "error"),
    [
        (b"", MalformedMessageError, "undecodable frame body (0 bytes): Input data was truncated"),
        (
            b"\xc1",
            MalformedMessageError,
            "undecodable frame body (1 bytes): MessagePack data is malformed: invalid opcode '\\xc1' (byte 0)",
        ),
        (
            msgspec.msgpack.encode({"tag": "hello"}),
            MalformedMessageError,
            "frame body is not a tagged message: Expected `array`, got `object`",
        ),
        (
            msgspec.msgpack.encode(["ack", 1]),
            UnknownMessageTypeError,
            "unexpected message type 'ack' (expected one of: batch, bye, defs, hb, hello)",
        ),
        (
            msgspec.msgpack.encode(["launch", 1]),
            UnknownMessageTypeError,
            "unexpected message type 'launch' (expected one of: batch, bye, defs, hb, hello)",
        ),
        (
            msgspec.msgpack.encode(["bad\ntag"]),
            UnknownMessageTypeError,
            "unexpected message type 'bad\\ntag' (expected one of: batch, bye, defs, hb, hello)",
        ),
        (
            msgspec.msgpack.encode([7, 1]),
            UnknownMessageTypeError,
            "message tag is not a string: Expected `str`, got `int` - at `$[0]`",
        ),
        (
            msgspec.msgpack.encode(["hello", "1", "node", "s", "v"]),
            MalformedMessageError,
            "invalid 'hello' message: Expected `int`, got `str` - at `$[1]` (field 'protocol_version')",
        ),
        (
            msgspec.msgpack.encode(["hello", 1, "node"]),
            MalformedMessageError,
            "invalid 'hello' message: Expected `array` of at least length 5, got 3",
        ),
        (
            msgspec.msgpack.encode(
                ["batch", 1, [[0, ["dram", ""], ["local_machine", ""], {}, [1, "2"], [1.0, 2.0]]]]
            ),
            MalformedMessageError,
            "invalid 'batch' message: Expected `int`, got `str` - at `$[2][0][4][1]` (field 'series')",
        ),
        (
            msgspec.msgpack.encode(
                ["batch", 1, [[0, ["dram", ""], ["local_machine", ""], {"k": [1]}, [], []]]]
            ),
            MalformedMessageError,
            "invalid 'batch' message: Expected `bool | int | float | str`, got `array` - at `$[2][0][3][...]` (field 'series')",
        ),
    ],
)
def test_each_bad_body_gets_a_one_line_error(body, error_type, error):
    with pytest.raises(error_type) as caught:
        list(FrameDecoder(ClientMessage).feed(frame_of(body)))
    assert str(caught.value) == error


class RewordingDecoder:
    """msgspec.msgpack.Decoder as a release that words every validation error differently would be."""

    def __init__(self, *args, **kwargs) -> None:
        self._decoder = REAL_DECODER(*args, **kwargs)

    def decode(self, data):
        return reworded(self._decoder.decode, data)


REAL_DECODER = msgspec.msgpack.Decoder
REAL_DECODE = msgspec.msgpack.decode


def reworded(decode, *args, **kwargs):
    try:
        return decode(*args, **kwargs)
    except msgspec.ValidationError:
        raise msgspec.ValidationError("Value rejected") from None


@pytest.mark.parametrize(
    ("body", "error_type", "error"),
    [
        (
            msgspec.msgpack.encode({"tag": "hello"}),
            MalformedMessageError,
            "frame body is not a tagged message: Value rejected",
        ),
        (
            msgspec.msgpack.encode([]),
            MalformedMessageError,
            "frame body is not a tagged message: Value rejected",
        ),
        (
            msgspec.msgpack.encode(["launch", 1]),
            UnknownMessageTypeError,
            "unexpected message type 'launch' (expected one of: batch, bye, defs, hb, hello)",
        ),
        (
            msgspec.msgpack.encode([7, 1]),
            UnknownMessageTypeError,
            "message tag is not a string: Value rejected",
        ),
        (
            msgspec.msgpack.encode(["hello", 1, "node", "s", 5]),
            MalformedMessageError,
            "invalid 'hello' message: Value rejected (field 'agent_version')",
        ),
        (
            msgspec.msgpack.encode(["hello", 1, "node"]),
            MalformedMessageError,
            "invalid 'hello' message: Value rejected",
        ),
        (
            msgspec.msgpack.encode(
                ["batch", 1, [[0, ["dram", ""], ["local_machine", ""], {}, [1, "2"], [1.0, 2.0]]]]
            ),
            MalformedMessageError,
            "invalid 'batch' message: Value rejected (field 'series')",
        ),
    ],
)
def test_what_is_wrong_does_not_depend_on_the_wording_of_msgspec(monkeypatch, body, error_type, error):
    """The message type and the field come from reading the frame again, not from msgspec's text."""
    monkeypatch.setattr(msgspec.msgpack, "Decoder", RewordingDecoder)
    monkeypatch.setattr(msgspec.msgpack, "decode", lambda *a, **k: reworded(REAL_DECODE, *a, **k))
    with pytest.raises(error_type) as caught:
        list(FrameDecoder(ClientMessage).feed(frame_of(body)))
    assert str(caught.value) == error


def test_decoding_goes_on_after_a_frame_with_a_bad_field():
    """Reading the bad frame's fields again leaves no view on the buffer, which is resized after it."""
    encoder = FrameEncoder()
    decoder = FrameDecoder(ServerMessage)
    bad = frame_of(msgspec.msgpack.encode(["ack", "one"]))
    received = []
    with pytest.raises(MalformedMessageError, match=r"invalid 'ack' message: .* \(field 'seq'\)$"):
        for message in decoder.feed(encoder.encode(Ack(1)) + bad + encoder.encode(Ack(2))):
            received.append(message)
    received.extend(decoder.feed(encoder.encode(Ack(3))))
    assert received == [Ack(1), Ack(2), Ack(3)]


def test_a_huge_quoted_value_is_shortened_in_the_error():
    body = msgspec.msgpack.encode(["x" * 100_000])
    with pytest.raises(UnknownMessageTypeError) as caught:
        list(FrameDecoder(ClientMessage).feed(frame_of(body)))
    assert len(str(caught.value)) < 300
    assert "\n" not in str(caught.value)


def test_decoding_goes_on_after_a_bad_frame():
    """The frame boundary is known, so one bad body does not desynchronise the stream."""
    encoder = FrameEncoder()
    decoder = FrameDecoder(ServerMessage)
    stream = encoder.encode(Ack(1)) + frame_of(b"\xc1") + encoder.encode(Ack(2))
    received = []
    with pytest.raises(MalformedMessageError):
        for message in decoder.feed(stream):
            received.append(message)
    received.extend(decoder.feed(b""))
    assert received == [Ack(1), Ack(2)]


def test_a_connection_closed_mid_frame_is_reported():
    decoder = FrameDecoder(ServerMessage)
    frame = FrameEncoder().encode(Ack(1))
    assert list(decoder.feed(frame[:-1])) == []
    with pytest.raises(
        TruncatedStreamError, match=r"^connection closed in the middle of a frame \(9 bytes pending\)$"
    ):
        decoder.eof()


@pytest.mark.parametrize(
    "body",
    [
        b"\xdd\xff\xff\xff\xff",  # array32 of 4 G elements
        b"\xdf\xff\xff\xff\xff",  # map32 of 4 G pairs
        b"\xdb\xff\xff\xff\xff",  # str32 of 4 GB
        b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GB
        b"\x93\xa5batch\x01\x91\x96\x00\x92\xa4dram\xa0\x92\xadlocal_machine\xa0\x80\xdd\xff\xff\xff\xff",  # timestamps
        b"\x93\xa5batch\x01\xdd\xff\xff\xff\xff",  # series
        b"\x92\xa4defs\xdf\xff\xff\xff\xff",  # definitions
    ],
)
def test_lengths_inside_a_small_frame_cannot_cause_a_big_allocation(body):
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            list(FrameDecoder(ClientMessage).feed(frame_of(body)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100_000


def test_a_string_that_is_not_utf8_is_a_malformed_message():
    """Found by the fuzz test; msgspec 0.22 and 0.23 raise different exceptions here, the user sees one."""
    with pytest.raises(MalformedMessageError) as caught:
        list(FrameDecoder(ClientMessage).feed(b"\x00\x00\x00\x04\x91\xa2\xe8b"))
    assert str(caught.value) == "undecodable frame body (4 bytes): a string is not valid UTF-8"
