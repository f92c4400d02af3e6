"""Carbon's pickle protocol: framing, safe decoding, encoding as carbon's relay does."""

from __future__ import annotations

import copyreg
import math
import os
import pickle
import struct
import time
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_plugins.graphite.protocol.pickle_codec import (
    CARBON_POINTS_PER_FRAME,
    DEFAULT_MAX_FRAME_BYTES,
    FrameTooLargeError,
    PickleBatch,
    PickleCodecError,
    PickleFrameError,
    decode_frame,
    encode_frames,
    split_frames,
)

NOW = 1_800_000_000_000_000_000
S = 1_000_000_000

# One point, ("a.b", (1700000000, 1.5)), as carbon's relay frames it: "!L" length, then protocol 2:
# PROTO 2, EMPTY_LIST, BINPUT 0, BINUNICODE "a.b", BINPUT 1, BININT 1700000000, BINFLOAT 1.5, TUPLE2,
# BINPUT 2, TUPLE2, BINPUT 3, APPEND, STOP.
GOLDEN_FRAME = (
    b"\x00\x00\x00\x25"
    b"\x80\x02]q\x00X\x03\x00\x00\x00a.bq\x01J\x00\xf1SeG?\xf8\x00\x00\x00\x00\x00\x00\x86q\x02\x86q\x03a."
)
# The same point as a Python 2 carbon sends it: the path is a byte string (SHORT_BINSTRING).
PYTHON2_PAYLOAD = b"\x80\x02]q\x00U\x03a.bq\x01J\x00\xf1SeG?\xf8\x00\x00\x00\x00\x00\x00\x86q\x02\x86q\x03a."


def decode(payload: bytes, **options) -> PickleBatch:
    options.setdefault("now_ns", NOW)
    return decode_frame(payload, **options)


def columns(batch: PickleBatch) -> list[tuple[str, int, float]]:
    return list(zip(batch.paths, batch.timestamps, batch.values, strict=True))


def test_golden_frame_encoding():
    assert encode_frames(["a.b"], [1700000000], [1.5]) == [GOLDEN_FRAME]


def test_golden_frame_decoding():
    frames, rest = split_frames(GOLDEN_FRAME)
    assert rest == b""
    assert columns(decode(frames[0])) == [("a.b", 1700000000 * S, 1.5)]


def test_python2_byte_string_paths():
    assert columns(decode(PYTHON2_PAYLOAD)) == [("a.b", 1700000000 * S, 1.5)]


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_every_pickle_protocol_decodes(protocol):
    points = [
        ("servers.a.load", (1700000000, 0.5)),
        ("servers.b.load", (1700000001.25, 3)),
        ("c;k=v", [1, -2.0]),
    ]
    batch = decode(pickle.dumps(points, protocol=protocol))
    assert columns(batch) == [
        ("servers.a.load", 1700000000 * S, 0.5),
        ("servers.b.load", 1700000001_250000000, 3.0),
        ("c;k=v", 1 * S, -2.0),
    ]
    assert all(type(value) is float for value in batch.values)


def test_float_timestamps_as_carbon_relays_them():
    batch = decode(pickle.dumps([("a", (1700000000.0, 1.0)), ("b", (1700000000.5, 2.0))], protocol=2))
    assert batch.timestamps == [1700000000 * S, 1700000000_500000000]


def test_empty_list_is_an_empty_batch():
    assert len(decode(pickle.dumps([]))) == 0


# --- Malicious and malformed frames --------------------------------------------------------------------


class _RunsACommand:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _OpensAFile:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("payload_class", [_RunsACommand, _OpensAFile])
def test_reduce_payloads_are_refused_and_not_run(tmp_path, protocol, payload_class):
    marker = tmp_path / "pwned"
    payload = pickle.dumps([("a", (1, payload_class(str(marker))))], protocol=protocol)
    with pytest.raises(PickleFrameError, match=r"refers to (posix|builtins|io)\.\w+: only lists"):
        decode(payload)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        b"cbuiltins\neval\n(S'1'\ntR.",  # GLOBAL + REDUCE, protocol 0
        b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x8c\x04eval\x93.",  # STACK_GLOBAL
        b"\x80\x02cos\nsystem\nq\x00.",
    ],
)
def test_class_lookups_are_refused(payload):
    with pytest.raises(PickleFrameError, match="only lists, tuples, str, bytes, int and float"):
        decode(payload)


def test_extension_registry_lookups_are_refused():
    copyreg.add_extension("os", "system", 0xF0)
    try:
        with pytest.raises(PickleFrameError, match="refers to os.system"):
            decode(b"\x80\x02\x82\xf0.")  # EXT1 0xf0
    finally:
        copyreg.remove_extension("os", "system", 0xF0)


def test_bytes_pickled_by_python3_with_protocol_2_are_refused():
    # Python 3 pickles bytes below protocol 3 as a call to _codecs.encode: a class lookup, refused.
    with pytest.raises(PickleFrameError, match="refers to _codecs.encode"):
        decode(pickle.dumps([(b"a", (1, 2))], protocol=2))


def test_persistent_ids_are_refused():
    with pytest.raises(PickleFrameError, match="persistent id"):
        decode(b"\x80\x02X\x01\x00\x00\x00aQ.")


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        ({"a": 1}, "holds a dict of 1 items, expected a list"),
        (("a", (1, 2)), "holds a tuple of 2 items, expected a list"),
        ("a b c", "holds a str 'a b c'"),
        (None, "holds NoneType None"),
        ([("a", (1, 2)), ("b", 1, 2)], "point 1 is a tuple of 3 items"),
        ([("a", (1, 2)), "b"], "point 1 is a str 'b'"),
        ([(1, (1, 2))], "point 0 has a path that is int 1, expected str or bytes"),
        ([("a", 1)], "point 0 has int 1 after the path, expected (timestamp, value)"),
        ([("a", (1, 2, 3))], "point 0 has a tuple of 3 items after the path"),
        ([("a", (1, "2"))], "point 0 has a value that is a str '2', expected int or float"),
        ([("a", ("1", 2))], "point 0 has a timestamp that is a str '1'"),
        ([("a", (1, True))], "point 0 has a value that is bool True"),
        ([("a", (1, None))], "point 0 has a value that is NoneType None"),
        ([("a", (1, [2]))], "point 0 has a value that is a list of 1 items"),
        ([(bytearray(b"a"), (1, 2))], "path that is a bytearray"),
        ([("a", (1, {2}))], "value that is a set of 1 items"),
    ],
)
def test_structure_errors_name_what_was_found_and_where(obj, fragment):
    with pytest.raises(PickleFrameError) as caught:
        decode(pickle.dumps(obj, protocol=5))
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"garbage",
        b"\x80\x02]q\x00",
        b"\x80\x02]q\x00X\xff\xff\xff\xffab",
        b"\x80\x02X\x02\x00\x00\x00\xff\xfe.",
    ],
)
def test_not_a_pickle(payload):
    with pytest.raises(PickleFrameError, match="not a valid pickle"):
        decode(payload)


def test_bytes_after_the_pickle():
    with pytest.raises(PickleFrameError, match="3 bytes after the end of the pickle"):
        decode(pickle.dumps([("a", (1, 2))]) + b"xyz")


def test_huge_declared_byte_length_fails_fast():
    # BINBYTES8 declaring 2**40 bytes: refused without reading or keeping anything of that size.
    started = time.monotonic()
    with pytest.raises(PickleFrameError):
        decode(b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"abc.")
    assert time.monotonic() - started < 1


def test_too_many_points():
    payload = pickle.dumps([("a", (1, 2))] * 11, protocol=2)
    assert len(decode(payload, max_points=11)) == 11
    with pytest.raises(PickleFrameError, match="holds 11 points, more than the 10 allowed"):
        decode(payload, max_points=10)


def test_shared_references_cannot_exceed_the_point_limit():
    # 20000 references to one tuple: a small frame that would expand into a large batch.
    payload = pickle.dumps([("a", (1, 2))] * 20_000, protocol=2)
    assert len(payload) < 100_000
    with pytest.raises(PickleFrameError, match="20000 points"):
        decode(payload)


def test_deeply_nested_lists_are_refused():
    payload = _nested_pickle(100_000)
    with pytest.raises(PickleFrameError, match="point 0"):
        decode(payload)


def _nested_pickle(depth: int) -> bytes:
    """[[[...]]] nested `depth` times, written opcode by opcode (pickle.dumps would recurse)."""
    return b"\x80\x02" + b"(" * depth + b"]" + b"l" * depth + b"."


# --- Points dropped one by one --------------------------------------------------------------------------


def test_points_dropped_one_by_one_like_carbon():
    points = [
        ("ok", (1700000000, 1.0)),
        ("nan", (1700000000, math.nan)),
        ("too_late", (2**32, 1.0)),
        ("negative", (-5, 1.0)),
        ("inf_ts", (math.inf, 1.0)),
        ("nan_ts", (math.nan, 1.0)),
        (b"\xff\xfe", (1700000000, 1.0)),
        (b"bytes.ok", (1700000000, 3.0)),
        ("huge_value", (1700000000, 10**400)),
        ("huge_ts", (10**5000, 1.0)),
        ("now", (-1, 2.0)),
        ("inf_value", (1700000000, math.inf)),
    ]
    batch = decode(pickle.dumps(points, protocol=3))
    assert columns(batch) == [
        ("ok", 1700000000 * S, 1.0),
        ("bytes.ok", 1700000000 * S, 3.0),
        ("now", NOW, 2.0),
        ("inf_value", 1700000000 * S, math.inf),
    ]
    assert batch.dropped == {"nan_value": 1, "bad_timestamp": 5, "bad_chars": 1, "bad_value": 1}
    messages = {sample.line.split(",")[0]: sample.message for sample in batch.bad_samples}
    assert "integer too large" in messages["('huge_value'"]
    assert "<int of 16610 bits>" in messages["('huge_ts'"]
    assert "not valid UTF-8" in messages["(b'\\xff\\xfe'"]


def test_nan_kept_on_request():
    batch = decode(pickle.dumps([("a", (1, math.nan))]), keep_nan=True)
    assert math.isnan(batch.values[0])


# --- Framing --------------------------------------------------------------------------------------------


def test_split_frames_keeps_partial_header_and_partial_payload():
    frame = GOLDEN_FRAME
    assert split_frames(frame[:3]) == ([], frame[:3])
    assert split_frames(frame[:10]) == ([], frame[:10])
    frames, rest = split_frames(frame + frame + frame[:5])
    assert frames == [frame[4:], frame[4:]]
    assert rest == frame[:5]


def test_declared_length_over_the_cap_is_refused_from_the_header_alone():
    header = struct.pack("!L", DEFAULT_MAX_FRAME_BYTES + 1)
    with pytest.raises(FrameTooLargeError, match=f"declares {DEFAULT_MAX_FRAME_BYTES + 1} bytes, more than"):
        split_frames(GOLDEN_FRAME + header)
    assert split_frames(struct.pack("!L", 100), max_frame_bytes=100) == ([], struct.pack("!L", 100))
    with pytest.raises(FrameTooLargeError, match="header at byte 0"):
        split_frames(struct.pack("!L", 101), max_frame_bytes=100)


def test_zero_length_frame_is_a_bad_frame_not_a_framing_error():
    frames, rest = split_frames(b"\x00\x00\x00\x00" + GOLDEN_FRAME)
    assert frames[0] == b""
    with pytest.raises(PickleFrameError):
        decode(frames[0])
    assert len(decode(frames[1])) == 1


# --- Encoding -------------------------------------------------------------------------------------------


def test_encoding_uses_carbons_batch_size():
    n = 1201
    frames = encode_frames([f"m.{i}" for i in range(n)], list(range(n)), [float(i) for i in range(n)])
    sizes = [len(pickle.loads(frame[4:])) for frame in frames]
    assert sizes == [CARBON_POINTS_PER_FRAME, CARBON_POINTS_PER_FRAME, 201]
    for frame in frames:
        assert struct.unpack("!L", frame[:4])[0] == len(frame) - 4
        assert frame[4:6] == b"\x80\x02", "protocol 2"


def test_encoding_splits_frames_over_the_byte_limit():
    paths = ["x" * 1000 + str(i) for i in range(10)]
    frames = encode_frames(paths, [1] * 10, [1.0] * 10, max_frame_bytes=3000)
    assert all(len(frame) - 4 <= 3000 for frame in frames)
    decoded = [path for frame in frames for path in decode(frame[4:]).paths]
    assert decoded == paths


def test_encoding_a_point_larger_than_a_frame_fails():
    with pytest.raises(PickleCodecError, match="more than a frame's 100"):
        encode_frames(["x" * 200], [1], [1.0], max_frame_bytes=100)


def test_encoding_refuses_columns_of_different_lengths():
    with pytest.raises(ValueError, match="2 paths, 1 timestamps, 2 values"):
        encode_frames(["a", "b"], [1], [1.0, 2.0])


# --- Properties -----------------------------------------------------------------------------------------

paths = st.text(st.characters(codec="utf-8"), min_size=1, max_size=30)
seconds = st.one_of(
    st.integers(min_value=0, max_value=2**32 - 1),
    st.integers(min_value=0, max_value=2**32 - 1).map(float),
    st.floats(min_value=0, max_value=2**32 - 1),
)
values = st.one_of(st.floats(allow_nan=False), st.integers(min_value=-(2**63), max_value=2**63))


@settings(max_examples=150)
@given(
    points=st.lists(st.tuples(paths, seconds, values), max_size=60),
    per_frame=st.integers(min_value=1, max_value=25),
    data=st.data(),
)
def test_round_trip_whatever_the_stream_chunking(points, per_frame, data):
    stream = b"".join(
        encode_frames(
            [p for p, _, _ in points],
            [t for _, t, _ in points],
            [v for _, _, v in points],
            points_per_frame=per_frame,
        )
    )
    cuts = sorted(data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=8)))
    decoded: list[tuple[str, int, float]] = []
    buffer = b""
    previous = 0
    for cut in [*cuts, len(stream)]:
        frames, buffer = split_frames(buffer + stream[previous:cut])
        previous = cut
        for frame in frames:
            decoded.extend(columns(decode(frame)))
    assert buffer == b""
    assert [(p, v) for p, _, v in decoded] == [(p, float(v)) for p, _, v in points]
    for (_, ns, _), (_, t, _) in zip(decoded, points, strict=True):
        # Fraction gives the exact value of a float: the nearest nanosecond is half a ns away at most (and
        # a hair more when the float product lands on a tie).
        assert abs(ns - Fraction(t) * S) <= Fraction(1, 2) + Fraction(1, 10**6)


_VALID_PAYLOADS = [
    pickle.dumps([("servers.a.load", (1700000000, 0.5)), ("b", (1.5, 2))], protocol=protocol)
    for protocol in range(6)
] + [PYTHON2_PAYLOAD, GOLDEN_FRAME[4:]]


@settings(max_examples=400)
@given(payload=st.sampled_from(_VALID_PAYLOADS), data=st.data())
def test_mutated_frames_raise_only_the_codecs_error(payload, data):
    mutated = bytearray(payload)
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        action = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        position = data.draw(st.integers(min_value=0, max_value=max(len(mutated) - 1, 0)))
        if action == "flip" and mutated:
            mutated[position] = data.draw(st.integers(min_value=0, max_value=255))
        elif action == "insert":
            mutated[position:position] = data.draw(st.binary(min_size=1, max_size=9))
        elif action == "delete" and mutated:
            del mutated[position]
        else:
            del mutated[position:]
    try:
        batch = decode(bytes(mutated))
    except PickleCodecError:
        return
    assert len(batch.paths) == len(batch.values) == len(batch.timestamps)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_the_codecs_error(data):
    try:
        frames, _ = split_frames(data)
    except FrameTooLargeError:
        return
    for frame in frames:
        try:
            decode(frame)
        except PickleFrameError:
            pass
