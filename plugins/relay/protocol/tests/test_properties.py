"""Property tests of the relay codec: round trips, chunking, and a fuzz pass over the decoder.

The fuzz tests feed random bytes and mutated valid frames to the decoders of both directions: the
only exception allowed out is the protocol's own ProtocolError, and memory stays bounded by the
maximum frame size.
"""

import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.model import Consumer, MetricDef, Resource
from agent_plugins.relay.protocol import (
    FRAME_SIZE_LIMIT,
    Accept,
    Ack,
    AnyMessage,
    BatchMessage,
    ClientMessage,
    FrameDecoder,
    FrameEncoder,
    FrameTooLargeError,
    Goodbye,
    Heartbeat,
    Hello,
    MetricDefs,
    ProtocolError,
    Refused,
    Reject,
    ServerMessage,
    WireSeries,
)

INT64 = st.integers(-(2**63), 2**63 - 1)
U63 = st.integers(0, 2**63 - 1)
SEQ = st.integers(1, 2**63 - 1)
# NaN is left out because NaN != NaN would fail the equality checks, not the codec.
FLOATS = st.floats(allow_nan=False)
TEXT = st.text(max_size=12)
VALUES = st.one_of(st.integers(-(2**63), 2**64 - 1), FLOATS)
ATTRIBUTES = st.dictionaries(TEXT, st.one_of(TEXT, st.booleans(), INT64, FLOATS), max_size=4)


@st.composite
def wire_series(draw):
    count = draw(st.integers(0, 20))
    metric = draw(st.one_of(U63, st.lists(TEXT, min_size=count, max_size=count)))
    return WireSeries(
        metric,
        draw(st.builds(Resource, TEXT, TEXT)),
        draw(st.builds(Consumer, TEXT, TEXT)),
        draw(ATTRIBUTES),
        draw(st.lists(INT64, min_size=count, max_size=count)),
        draw(st.lists(VALUES, min_size=count, max_size=count)),
    )


METRIC_DEFS = st.builds(MetricDef, TEXT, TEXT, st.sampled_from(["float", "int"]), TEXT)
CLIENT_MESSAGES = st.one_of(
    st.builds(Hello, st.integers(0, 2**31), TEXT, TEXT, TEXT, st.none() | TEXT),
    st.builds(MetricDefs, st.dictionaries(U63, METRIC_DEFS, max_size=5)),
    st.builds(BatchMessage, SEQ, st.lists(wire_series(), max_size=4)),
    st.just(Heartbeat()),
    st.builds(Goodbye, TEXT, TEXT),
)
SERVER_MESSAGES = st.one_of(
    st.builds(
        Accept,
        st.integers(0, 2**31),
        TEXT,
        TEXT,
        U63,
        U63,
        st.integers(1024, FRAME_SIZE_LIMIT),
        st.integers(1, 2**31),
        st.integers(1, 2**31),
    ),
    st.builds(Reject, TEXT, TEXT, st.integers(0, 2**31), TEXT),
    st.builds(Ack, U63),
    st.builds(Refused, SEQ, TEXT),
    st.just(Heartbeat()),
    st.builds(Goodbye, TEXT, TEXT),
)


def typed(value):
    """The value with the type of every scalar, so that 1 and 1.0 and True compare different."""
    if isinstance(value, list | tuple):
        return [typed(v) for v in value]
    if isinstance(value, dict):
        return {typed(k): typed(v) for k, v in value.items()}
    if hasattr(value, "__struct_fields__"):
        return (type(value).__name__, [typed(getattr(value, f)) for f in value.__struct_fields__])
    return (type(value).__name__, value)


@given(st.lists(CLIENT_MESSAGES, max_size=5), st.lists(SERVER_MESSAGES, max_size=5))
def test_every_message_survives_a_round_trip(client_messages, server_messages):
    encoder = FrameEncoder()
    for messages, message_type in ((client_messages, ClientMessage), (server_messages, ServerMessage)):
        stream = b"".join(encoder.encode(m) for m in messages)
        decoded = list(FrameDecoder(message_type).feed(stream))
        assert typed(decoded) == typed(messages)


@given(SEQ, st.lists(wire_series(), max_size=4))
def test_a_batch_framed_from_stored_series_has_the_bytes_of_the_batch(seq, series):
    encoder = FrameEncoder()
    assert encoder.encode_batch(seq, encoder.encode_series(series)) == encoder.encode(
        BatchMessage(seq, series)
    )


@given(st.lists(st.one_of(CLIENT_MESSAGES, SERVER_MESSAGES), min_size=1, max_size=6), st.data())
def test_the_chunking_does_not_change_the_messages(messages, data):
    stream = b"".join(FrameEncoder().encode(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    chunks = [stream[start:end] for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    decoder = FrameDecoder(AnyMessage)
    received = [message for chunk in chunks for message in decoder.feed(chunk)]
    assert typed(received) == typed(messages)
    decoder.eof()


MAX_FRAME = 4096


def drain(decoder: FrameDecoder, data: bytes) -> None:
    """Feeds `data` and decodes all that can be decoded. A bad body skips one frame, so decoding
    resumes after it; only an oversized length stops the stream for good."""
    iterator = decoder.feed(data)
    while True:
        try:
            for _ in iterator:
                pass
            return
        except FrameTooLargeError:
            return
        except ProtocolError:
            iterator = decoder.feed(b"")


def fuzz(data: bytes) -> None:
    for message_type in (ClientMessage, ServerMessage):
        decoder = FrameDecoder(message_type, max_frame_size=MAX_FRAME)
        tracemalloc.start()
        try:
            drain(decoder, data)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # A frame is at most 4 KiB; decoding it may build objects worth some tens of times that.
        assert peak < 64 * MAX_FRAME + len(data) * 2
        try:
            decoder.eof()
        except ProtocolError:
            pass


FUZZ_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ_SETTINGS
@given(st.binary(max_size=3000))
def test_random_bytes_only_raise_protocol_errors(data):
    fuzz(data)


@FUZZ_SETTINGS
@given(st.binary(max_size=600))
def test_random_bodies_in_valid_frames_only_raise_protocol_errors(body):
    """Random bytes behind a correct length: this reaches the body decoder every time."""
    fuzz(len(body).to_bytes(4, "big") + body)


@st.composite
def mutated_frames(draw):
    messages = draw(st.lists(st.one_of(CLIENT_MESSAGES, SERVER_MESSAGES), min_size=1, max_size=3))
    stream = bytearray(b"".join(FrameEncoder().encode(m) for m in messages))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(stream) - 1))
        mutation = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        if mutation == "flip":
            stream[position] ^= 1 << draw(st.integers(0, 7))
        elif mutation == "set":
            stream[position] = draw(st.integers(0, 255))
        elif mutation == "insert":
            stream[position:position] = draw(st.binary(min_size=1, max_size=8))
        else:
            del stream[position : position + draw(st.integers(1, 8))]
        if not stream:
            break
    return bytes(stream)


@FUZZ_SETTINGS
@given(mutated_frames())
def test_mutated_valid_frames_only_raise_protocol_errors(data):
    fuzz(data)


@pytest.mark.parametrize("message_type", [ClientMessage, ServerMessage])
def test_the_fuzz_harness_sees_valid_frames_decode(message_type):
    """The fuzz tests would pass on a decoder that rejects everything: check that it does not."""
    message = Heartbeat()
    decoder = FrameDecoder(message_type, max_frame_size=MAX_FRAME)
    assert list(decoder.feed(FrameEncoder().encode(message))) == [message]
