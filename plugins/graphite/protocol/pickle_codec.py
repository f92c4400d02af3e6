"""Carbon's pickle protocol: length-prefixed frames of pickled `[(path, (timestamp, value)), ...]`.

Used by the Graphite input (the pickle listener, carbon's port 2004/2014) and by the Graphite output when it
speaks pickle to carbon. Pure code, no I/O: the trio layer feeds received bytes to `split_frames`, decodes
each frame with `decode_frame`, and writes what `encode_frames` returns.

A frame is a 4-byte big-endian payload length followed by the payload, a pickle (any protocol, 0 to 5) of a
list of `(path, (timestamp, value))`. Carbon's relay sends at most 500 points per frame, with protocol 2.

Pickle runs code when it is asked to (a GLOBAL or STACK_GLOBAL opcode names any function, REDUCE calls it),
so frames are unpickled by an Unpickler whose `find_class` refuses everything: only the built-in containers
and scalars that pickle builds without looking up a class can come out, and the result must then be a list
of 2-item tuples (or lists) holding a str or bytes path and a `(timestamp, value)` pair of ints or floats.
Anything else refuses the whole frame with a `PickleFrameError` naming what was found and where. Size is
bounded before anything is buffered or built: a declared frame length over `max_frame_bytes` (default
1 MiB, carbon's receiver limit; carbon-relay-ng allows 500 MB) raises `FrameTooLargeError` as soon as the
4-byte header is seen, and a frame with more than `max_points` points (default 10000, twenty times what
carbon sends) is refused.

Points themselves, as in carbon, are checked one by one: a NaN value (carbon drops them), a timestamp
outside 0..2**32-1 seconds (-1 means "now", as in plaintext) or a bytes path that is not UTF-8 drops that
point only, counted by the same reasons as plaintext bad lines. Timestamps become nanoseconds: exactly for
ints and whole floats (carbon's relay sends 1700000000.0), to the nearest nanosecond for other floats.
Python 3 pickles `bytes` below protocol 3 as a call to `_codecs.encode`, which is a class lookup and is
refused; Python 2 byte strings and `bytes` from protocol 3 on are accepted. Paths are not validated here: the Graphite
input applies `plaintext.check_paths` to them, as it does to plaintext paths.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
from collections.abc import Sequence

import msgspec

from .plaintext import (
    BAD_CHARS,
    BAD_TIMESTAMP,
    BAD_VALUE,
    MAX_TIMESTAMP_SECONDS,
    NAN_VALUE,
    NS_PER_SECOND,
    SAMPLE_LINE_CHARS,
    BadLine,
)

#: carbon's receiver limit (MetricPickleReceiver.MAX_LENGTH).
DEFAULT_MAX_FRAME_BYTES = 1 << 20
DEFAULT_MAX_POINTS_PER_FRAME = 10_000
DEFAULT_MAX_BAD_SAMPLES = 10
#: What carbon's relay sends per frame, and the protocol it uses.
CARBON_POINTS_PER_FRAME = 500
CARBON_PICKLE_PROTOCOL = 2

_HEADER = struct.Struct("!L")
_SEQUENCE_TYPES = frozenset({tuple, list})
_PATH_TYPES = frozenset({str, bytes})
_NUMBER_TYPES = frozenset({int, float})
_FLOAT_NS_PER_SECOND = float(NS_PER_SECOND)
_USUAL_POINTS = list[tuple[str, tuple[int | float, int | float]]]


class PickleCodecError(ValueError):
    """Base of the errors of this module; nothing else escapes from decoding."""


class FrameTooLargeError(PickleCodecError):
    """A frame header declares more bytes than allowed. The stream cannot be trusted: close the connection."""


class PickleFrameError(PickleCodecError):
    """One frame is refused (not a pickle, a forbidden object, not a list of points). The stream stays in
    step: the next frame can be read."""


class PickleBatch(msgspec.Struct):
    """The points of one frame as columns (timestamps in nanoseconds) and the points dropped by reason,
    with the first few as samples."""

    paths: list[str]
    values: list[float]
    timestamps: list[int]
    dropped: dict[str, int]
    bad_samples: list[BadLine]

    def __len__(self) -> int:
        return len(self.paths)


def split_frames(
    buffer: bytes | bytearray | memoryview, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> tuple[list[bytes], bytes]:
    """Cuts the complete frames out of `buffer`; returns their payloads and the incomplete rest.

    Raises FrameTooLargeError as soon as a header declares more than `max_frame_bytes`, before the
    payload is waited for, so that the caller never buffers it.
    """
    view = memoryview(buffer)
    frames: list[bytes] = []
    offset = 0
    end = len(view)
    while end - offset >= _HEADER.size:
        (length,) = _HEADER.unpack_from(view, offset)
        if length > max_frame_bytes:
            raise FrameTooLargeError(
                f"pickle frame header at byte {offset} declares {length} bytes, more than the {max_frame_bytes} allowed"
            )
        start = offset + _HEADER.size
        if end - start < length:
            break
        frames.append(bytes(view[start : start + length]))
        offset = start + length
    return frames, bytes(view[offset:])


def decode_frame(
    payload: bytes,
    *,
    now_ns: int,
    max_points: int = DEFAULT_MAX_POINTS_PER_FRAME,
    keep_nan: bool = False,
    max_bad_samples: int = DEFAULT_MAX_BAD_SAMPLES,
) -> PickleBatch:
    """Unpickles one frame payload safely and returns its points as columns.

    Raises PickleFrameError (and nothing else) when the frame as a whole is refused. `now_ns` replaces the
    timestamp -1. NaN values are dropped unless `keep_nan` (validation level "none").
    """
    points = _unpickle(payload)
    if type(points) is not list:
        raise PickleFrameError(
            f"pickle frame holds {_describe(points)}, expected a list of (path, (timestamp, value))"
        )
    if len(points) > max_points:
        raise PickleFrameError(f"pickle frame holds {len(points)} points, more than the {max_points} allowed")
    drops = _Drops(max_bad_samples)
    if not points:
        return PickleBatch([], [], [], drops.counts, drops.samples)
    raw_paths, raw_timestamps, raw_values = _columns(points)
    refused: dict[int, tuple[str, str]] = {}
    values = _values(raw_values, keep_nan, refused)
    timestamps = _timestamps(raw_timestamps, now_ns, refused)
    paths = _paths(raw_paths, refused)
    if refused:
        for index in sorted(refused):
            reason, message = refused[index]
            drops.add(reason, message, points[index])
        kept = [index for index in range(len(points)) if index not in refused]
        paths = [paths[index] for index in kept]
        values = [values[index] for index in kept]
        timestamps = [timestamps[index] for index in kept]
    return PickleBatch(paths, values, timestamps, drops.counts, drops.samples)


def encode_frames(
    paths: Sequence[str],
    timestamps: Sequence[int | float],
    values: Sequence[int | float],
    *,
    points_per_frame: int = CARBON_POINTS_PER_FRAME,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> list[bytes]:
    """Frames (header included) of at most `points_per_frame` points, pickled with protocol 2 as carbon's
    relay sends them. Timestamps are in seconds. A frame that would be larger than `max_frame_bytes` (very
    long paths) is split further; a single point that does not fit raises PickleCodecError.
    """
    if not len(paths) == len(timestamps) == len(values):
        raise ValueError(
            f"columns differ in length: {len(paths)} paths, {len(timestamps)} timestamps, {len(values)} values"
        )
    if points_per_frame < 1:
        raise ValueError(f"points_per_frame must be at least 1, got {points_per_frame}")
    points = list(zip(paths, zip(timestamps, values, strict=True), strict=True))
    frames: list[bytes] = []
    for start in range(0, len(points), points_per_frame):
        _encode_into(frames, points[start : start + points_per_frame], max_frame_bytes)
    return frames


def _encode_into(
    frames: list[bytes], points: list[tuple[str, tuple[int | float, int | float]]], limit: int
) -> None:
    payload = pickle.dumps(points, protocol=CARBON_PICKLE_PROTOCOL)
    if len(payload) <= limit:
        frames.append(_HEADER.pack(len(payload)) + payload)
        return
    if len(points) == 1:
        raise PickleCodecError(
            f"point {points[0][0][:80]!r} takes {len(payload)} bytes pickled, more than a frame's {limit}"
        )
    half = len(points) // 2
    _encode_into(frames, points[:half], limit)
    _encode_into(frames, points[half:], limit)


# --- Decoding --------------------------------------------------------------------------------------------


class _NoClassesUnpickler(pickle.Unpickler):
    """Builds only what pickle builds without naming a class: no GLOBAL, STACK_GLOBAL, EXT or persistent
    ids, hence no REDUCE, NEWOBJ or BUILD on anything (they need an object from find_class)."""

    def find_class(self, module: str, name: str) -> object:
        raise PickleFrameError(
            f"pickle frame refers to {_cut(module)}.{_cut(name)}: only lists, tuples, str, bytes, int and float"
            " are accepted"
        )

    def persistent_load(self, pid: object) -> object:
        raise PickleFrameError("pickle frame uses a persistent id: only plain data is accepted")


def _unpickle(payload: bytes) -> object:
    # The C unpickler reads a file without peek() one opcode at a time through Python calls (four times
    # slower than pickle.loads); with peek() it takes the bytes in large blocks.
    stream = io.BufferedReader(io.BytesIO(payload))
    # encoding="bytes": a Python 2 `str` path arrives as bytes and is decoded (or refused) per point.
    unpickler = _NoClassesUnpickler(stream, encoding="bytes")
    try:
        result = unpickler.load()
    except PickleFrameError:
        raise
    except Exception as error:
        # A malformed pickle raises many kinds of errors (UnpicklingError, EOFError, ValueError, KeyError,
        # IndexError, TypeError, UnicodeDecodeError, OverflowError; MemoryError for a huge declared length):
        # all of them mean "not a valid frame".
        raise PickleFrameError(
            f"pickle frame is not a valid pickle: {type(error).__name__}: {_cut(str(error))}"
        ) from None
    trailing = len(payload) - stream.tell()
    if trailing:
        raise PickleFrameError(f"pickle frame has {trailing} bytes after the end of the pickle")
    return result


def _columns(points: list[object]) -> tuple[tuple[object, ...], tuple[object, ...], tuple[object, ...]]:
    """The path, timestamp and value columns, with the structure checked at C level: by msgspec for the
    usual shape (str paths, tuples), else by sets of types (bytes paths from Python 2, lists)."""
    try:
        usual = msgspec.convert(points, _USUAL_POINTS)
    except msgspec.ValidationError:
        pass
    else:
        raw_paths, datapoints = zip(*usual, strict=True)
        raw_timestamps, raw_values = zip(*datapoints, strict=True)
        return raw_paths, raw_timestamps, raw_values
    if set(map(type, points)) <= _SEQUENCE_TYPES and set(map(len, points)) == {2}:
        raw_paths, datapoints = zip(*points, strict=True)
        if (
            set(map(type, raw_paths)) <= _PATH_TYPES
            and set(map(type, datapoints)) <= _SEQUENCE_TYPES
            and set(map(len, datapoints)) == {2}
        ):
            raw_timestamps, raw_values = zip(*datapoints, strict=True)
            if (
                set(map(type, raw_timestamps)) <= _NUMBER_TYPES
                and set(map(type, raw_values)) <= _NUMBER_TYPES
            ):
                return raw_paths, raw_timestamps, raw_values
    raise PickleFrameError(_first_malformed_point(points))


def _first_malformed_point(points: list[object]) -> str:
    for index, point in enumerate(points):
        where = f"pickle frame point {index}"
        if type(point) not in _SEQUENCE_TYPES or len(point) != 2:
            return f"{where} is {_describe(point)}, expected (path, (timestamp, value))"
        path, datapoint = point
        if type(path) not in _PATH_TYPES:
            return f"{where} has a path that is {_describe(path)}, expected str or bytes"
        if type(datapoint) not in _SEQUENCE_TYPES or len(datapoint) != 2:
            return f"{where} has {_describe(datapoint)} after the path, expected (timestamp, value)"
        for role, number in zip(("timestamp", "value"), datapoint, strict=True):
            if type(number) not in _NUMBER_TYPES:
                return f"{where} has a {role} that is {_describe(number)}, expected int or float"
    return "pickle frame is malformed"  # not reached: _columns found a malformed point


def _values(raw: tuple[object, ...], keep_nan: bool, refused: dict[int, tuple[str, str]]) -> list[float]:
    try:
        values = list(map(float, raw))
    except OverflowError:
        pass  # an int too large for a float; find it below
    else:
        total = sum(values)
        # The sum is NaN only if a value is NaN (or inf and -inf are both there): then look closer.
        if keep_nan or total == total:
            return values
    values = []
    for index, number in enumerate(raw):
        try:
            value = float(number)  # type: ignore[arg-type]
        except OverflowError:
            refused.setdefault(index, (BAD_VALUE, "value is an integer too large for a float"))
            value = 0.0
        if value != value and not keep_nan:
            refused.setdefault(index, (NAN_VALUE, "value is NaN (dropped, as carbon does)"))
        values.append(value)
    return values


def _timestamps(raw: tuple[object, ...], now_ns: int, refused: dict[int, tuple[str, str]]) -> list[int]:
    types = set(map(type, raw))
    try:
        if types == {int}:
            if 0 <= min(raw) and max(raw) <= MAX_TIMESTAMP_SECONDS:  # type: ignore[type-var]
                return list(map(NS_PER_SECOND.__mul__, raw))  # type: ignore[arg-type]
        # The sum is finite only without NaN and infinities (min and max are unreliable with NaN).
        elif math.isfinite(sum(raw)) and 0 <= min(raw) and max(raw) <= MAX_TIMESTAMP_SECONDS:  # type: ignore[arg-type, type-var]
            whole_seconds = list(map(int, raw))  # type: ignore[arg-type]
            if tuple(whole_seconds) == raw:
                # Whole seconds as floats, as carbon's relay sends them (1700000000.0).
                return list(map(NS_PER_SECOND.__mul__, whole_seconds))
            return list(map(_seconds_to_ns, raw))  # type: ignore[arg-type]
    except OverflowError:
        pass  # an int too large to add to a float; handled per item
    timestamps = []
    for index, seconds in enumerate(raw):
        if seconds == -1:
            timestamp = now_ns
        elif 0 <= seconds <= MAX_TIMESTAMP_SECONDS:  # type: ignore[operator]
            timestamp = _seconds_to_ns(seconds)  # type: ignore[arg-type]
        else:
            refused.setdefault(
                index,
                (
                    BAD_TIMESTAMP,
                    f"timestamp {_show(seconds)} is not in 0..{MAX_TIMESTAMP_SECONDS} seconds or -1",
                ),
            )
            timestamp = 0
        timestamps.append(timestamp)
    return timestamps


def _seconds_to_ns(seconds: int | float) -> int:
    """Seconds to nanoseconds: exact for ints; a float is rounded to the nearest nanosecond, its whole
    seconds taken apart first (1700000000.25 * 1e9 as one float product would be 128 ns off)."""
    whole = int(seconds)
    return whole * NS_PER_SECOND + round((seconds - whole) * _FLOAT_NS_PER_SECOND)


def _paths(raw: tuple[object, ...], refused: dict[int, tuple[str, str]]) -> list[str]:
    if set(map(type, raw)) == {str}:
        return list(raw)  # type: ignore[arg-type]
    paths = []
    for index, path in enumerate(raw):
        if type(path) is bytes:
            try:
                path = path.decode("utf-8")
            except UnicodeDecodeError as error:
                refused.setdefault(
                    index,
                    (BAD_CHARS, f"path is not valid UTF-8 (byte {path[error.start]:#04x} at {error.start})"),
                )
                path = ""
        paths.append(path)
    return paths  # type: ignore[return-value]


class _Drops:
    """Counts of dropped points by reason and the first few samples, for one frame."""

    __slots__ = ("counts", "samples", "max_samples")

    def __init__(self, max_samples: int) -> None:
        self.counts: dict[str, int] = {}
        self.samples: list[BadLine] = []
        self.max_samples = max_samples

    def add(self, reason: str, message: str, point: object) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.samples) < self.max_samples:
            self.samples.append(
                BadLine(reason, message, _cut(_show(point, SAMPLE_LINE_CHARS), SAMPLE_LINE_CHARS))
            )


def _describe(found: object) -> str:
    """What was found, for an error message, without printing a (possibly huge or deep) structure."""
    kind = type(found).__name__
    if isinstance(found, list | tuple | dict | set | frozenset):
        return f"a {kind} of {len(found)} items"
    if isinstance(found, str | bytes | bytearray):
        return f"a {kind} {_show(found)}"
    if found is None or isinstance(found, bool | int | float):
        return f"{kind} {_show(found)}"
    return f"a {kind}"


def _show(found: object, limit: int = 80, depth: int = 0) -> str:
    """repr() cut to `limit`, safe for anything a frame can hold: containers are shown two levels deep,
    long str and bytes are cut before repr, and an int too large for repr is described."""
    if isinstance(found, str | bytes | bytearray) and len(found) > limit:
        found = found[:limit]
    elif isinstance(found, tuple | list):
        if depth >= 2:
            return _describe(found) if not found else f"<{_describe(found)}>"
        items = ", ".join(_show(item, limit, depth + 1) for item in found[:3])
        return _cut("(" + items + (", ...)" if len(found) > 3 else ")"), limit)
    try:
        return _cut(repr(found), limit)
    except ValueError:  # an int with more digits than int-to-str conversion allows
        return f"<int of {found.bit_length()} bits>"  # type: ignore[union-attr]


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
