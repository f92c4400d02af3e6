"""Bulk parser for the carbon plaintext protocol: `path value timestamp\\n`.

First stage of the Graphite input: the trio layer reads a chunk from a socket (typically 64 KiB) and calls
`parse_chunk` with it and the partial line left over from the previous chunk. The result holds the points
as columns (paths, values, timestamps in nanoseconds), the tagged series among them, the new leftover, and
the bad lines counted by reason with a few samples for the admin API. Pure code, no I/O.

What is accepted (what real clients send): LF or CRLF line ends (collectd's write_graphite), any run of
spaces or tabs between fields, leading and trailing whitespace, empty lines (skipped), integer, decimal or
exponent values (`12`, `12.5`, `1.2e+03`), integer or decimal timestamps (`1700000000`, `1700000000.5`, kept
to the nanosecond), and the timestamp `-1`, which means "now" (the `now_ns` argument).

Validation levels, with carbon-relay-ng's meaning for legacy (non metrics-2.0) names:

- `none`: only what is needed to parse at all: three fields, a number for the value, a timestamp in range,
  a path that is valid UTF-8. A tagged path whose tags do not parse is kept as a plain path.
- `medium` (the default): also every byte of the line is printable ASCII (tabs separate fields; NUL,
  other control bytes and bytes >= 0x80 are refused, `bad_chars`), the tag part of a tagged path is well
  formed (carbon's rules, see tags.py; `bad_tags`) and the name before it is not empty (`bad_name`). NaN
  values are dropped (`nan_value`) as carbon drops them; carbon-relay-ng passes them on, which only moves the
  drop downstream. Infinite values are kept: carbon stores them.
- `strict`: also the metric name (before any `;`) uses only `[A-Za-z0-9_.-]` and has no `..` (`bad_name`).

At every level the timestamp must be between 0 and 2**32 - 1 seconds (carbon-relay-ng parses it into a
uint32), or -1; the value `NaN` is kept only at level `none`.

Bad lines are dropped and counted by a short, stable reason (`BAD_LINE_REASONS`), which is meant to become a
counter label. A line longer than `max_line_length` (default 16384 bytes, carbon's limit, so that a line we
accept never makes a carbon receiver drop the relay's connection) is counted as `line_too_long` and sets
`PlaintextChunk.line_too_long`, also when the line has not ended yet and the leftover has grown past the
limit: the stream is then out of step and the caller closes that connection.

Speed: a chunk whose lines are all `path SP value SP timestamp` (the usual case) is checked with a few
whole-chunk operations (one `bytes.translate` gives the "shape" of the chunk: which bytes are spaces and
newlines, and whether any byte is not allowed), split once, and its columns decoded by msgspec from JSON
arrays built with `join` (values as floats, timestamps as nanoseconds by appending nine zeros to the
digits). Without tags, the chunk is decoded to text and split as text, so that the paths come out as `str`
at once; with tags, or when a value or timestamp does not decode that way, it is split as bytes. A column
that does not decode in bulk (a decimal timestamp, `nan`, a value with `_`...) falls back to a per-item
parse of that column only; a chunk whose shape is not clean (tabs, extra spaces, empty lines, bad bytes,
wrong field counts) is split line by line first. The results are the same either way; the tests check it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Context, Decimal, InvalidOperation
from itertools import repeat
from typing import Annotated, Literal

import msgspec

from agent.decoding import DECODE_ERRORS

from .tags import TagError, TaggedName, parse_tagged_path

ValidationLevel = Literal["none", "medium", "strict"]
VALIDATION_LEVELS: tuple[ValidationLevel, ...] = ("none", "medium", "strict")

#: carbon's limit (Twisted LineOnlyReceiver.MAX_LENGTH); carbon-relay-ng's is 64 KiB.
DEFAULT_MAX_LINE_LENGTH = 16384
DEFAULT_MAX_BAD_SAMPLES = 10
#: A tag cache passed to parse_chunk is emptied beyond this many paths (about 200 bytes each).
TAG_CACHE_MAX_ENTRIES = 100_000
#: How much of a bad line a sample keeps.
SAMPLE_LINE_CHARS = 200

NS_PER_SECOND = 1_000_000_000
MAX_TIMESTAMP_SECONDS = 2**32 - 1

# Bad line reasons: stable identifiers, used as counter labels.
FIELD_COUNT = "field_count"
BAD_VALUE = "bad_value"
NAN_VALUE = "nan_value"
BAD_TIMESTAMP = "bad_timestamp"
BAD_CHARS = "bad_chars"
BAD_TAGS = "bad_tags"
BAD_NAME = "bad_name"
LINE_TOO_LONG = "line_too_long"
BAD_LINE_REASONS = (
    FIELD_COUNT,
    BAD_VALUE,
    NAN_VALUE,
    BAD_TIMESTAMP,
    BAD_CHARS,
    BAD_TAGS,
    BAD_NAME,
    LINE_TOO_LONG,
)


#: What a tag cache holds per tagged path: the parsed path or the (reason, message) of its refusal, and
#: why its metric name fails the strict rules (None when it passes).
TagCacheEntry = tuple[TaggedName | tuple[str, str], str | None]


class BadLine(msgspec.Struct, frozen=True):
    """One dropped line, for the admin API's "recent bad lines": why, in words, and the line itself
    (decoded with backslash escapes for invalid UTF-8, cut to SAMPLE_LINE_CHARS)."""

    reason: str
    message: str
    line: str


class PlaintextChunk(msgspec.Struct):
    """What `parse_chunk` found in one chunk.

    `paths`, `values` and `timestamps` are parallel columns, one entry per accepted point; a tagged path
    is stored normalised (tags sorted) and also appears as a key of `tagged`, which gives its metric name
    and tags. `leftover` is the partial last line to pass to the next call. `bad_counts` counts dropped
    lines by reason; `bad_samples` keeps the first few of them. `line_too_long` tells the caller to close
    the connection.
    """

    paths: list[str]
    values: list[float]
    timestamps: list[int]
    tagged: dict[str, TaggedName]
    leftover: bytes
    bad_counts: dict[str, int]
    bad_samples: list[BadLine]
    line_too_long: bool = False

    def __len__(self) -> int:
        return len(self.paths)


def parse_chunk(
    chunk: bytes | bytearray | memoryview,
    leftover: bytes = b"",
    *,
    now_ns: int,
    validation: ValidationLevel = "medium",
    max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
    max_bad_samples: int = DEFAULT_MAX_BAD_SAMPLES,
    tag_cache: dict[str, TagCacheEntry] | None = None,
) -> PlaintextChunk:
    """Parses the complete lines of `leftover + chunk`; the partial last line becomes the new leftover.

    `now_ns` is the arrival time given to points sent with the timestamp -1. `tag_cache` is an optional
    dict that the caller keeps per connection: parsed tagged paths (and why a bad one was refused) are
    remembered there, so that a series sent every interval is parsed once; it is emptied when it holds
    more than TAG_CACHE_MAX_ENTRIES. Never raises on bad input; raises ValueError only for an unknown
    validation level.
    """
    if validation not in VALIDATION_LEVELS:
        raise ValueError(
            f"unknown validation level {validation!r}, expected one of {', '.join(VALIDATION_LEVELS)}"
        )
    data = leftover + chunk if leftover else bytes(chunk)
    body, _, rest = data.rpartition(b"\n")
    bad = _BadLineLog(max_bad_samples)
    line_too_long = False
    if len(rest) > max_line_length:
        bad.add(LINE_TOO_LONG, f"line longer than {max_line_length} bytes (no newline yet)", rest)
        rest = b""
        line_too_long = True
    if b"\r" in body:
        # CRLF line ends; the last line's \r sits just before the newline that rpartition removed.
        body = body.replace(b"\r\n", b"\n")
        if body.endswith(b"\r"):
            body = body[:-1]
    if not body:
        return PlaintextChunk([], [], [], {}, rest, bad.counts, bad.samples, line_too_long)

    line_count = _clean_line_count(body, validation, max_line_length)
    fields = None
    if line_count is not None:
        # The shape proved the strict names' characters but for `=` (checked with the tags); `..` remains
        # (in a value it is a bad value anyway).
        check_strict_names = validation == "strict" and (b"=" in body or _DOUBLE_DOT.search(body) is not None)
        if not check_strict_names and b";" not in body:
            columns = _decode_clean_text(body, line_count, now_ns)
            if columns is not None:
                paths, values, timestamps = columns
                return PlaintextChunk(
                    paths, values, timestamps, {}, rest, bad.counts, bad.samples, line_too_long
                )
        fields = body.split()
        if len(fields) != 3 * line_count:
            fields = None
    if fields is not None:
        path_fields, value_fields, timestamp_fields = fields[0::3], fields[1::3], fields[2::3]
        raw_lines = None
    else:
        check_strict_names = validation == "strict"
        path_fields, value_fields, timestamp_fields, raw_lines, too_long = _split_lines(
            body, validation, max_line_length, bad
        )
        line_too_long = line_too_long or too_long
    paths, values, timestamps, tagged = _decode_columns(
        path_fields,
        value_fields,
        timestamp_fields,
        raw_lines,
        validation,
        now_ns,
        bad,
        any_tags=b";" in body,
        check_strict_names=check_strict_names,
        tag_cache=tag_cache,
        # Without quotes and backslashes, the paths can be decoded as JSON strings.
        json_safe_paths=b'"' not in body and b"\\" not in body,
    )
    return PlaintextChunk(paths, values, timestamps, tagged, rest, bad.counts, bad.samples, line_too_long)


class PathCheck(msgspec.Struct):
    """What `check_paths` found: the paths (tagged ones normalised, refused ones unchanged), the tagged
    series, and the refused paths by index with the bad line reason and message."""

    paths: list[str]
    tagged: dict[str, TaggedName]
    refused: dict[int, tuple[str, str]]


def check_paths(
    paths: list[str],
    *,
    validation: ValidationLevel = "medium",
    tag_cache: dict[str, TagCacheEntry] | None = None,
) -> PathCheck:
    """Applies the validation level to paths that did not come from a plaintext line (pickle frames).

    Same rules as `parse_chunk`, plus one that plaintext gets from its grammar: at every level a path is
    refused if it is empty or holds ASCII whitespace, which would break the line when the point is sent on
    as plaintext. `paths` is not modified.
    """
    if validation not in VALIDATION_LEVELS:
        raise ValueError(
            f"unknown validation level {validation!r}, expected one of {', '.join(VALIDATION_LEVELS)}"
        )
    paths = list(paths)
    refused: dict[int, tuple[str, str]] = {}
    if not paths:
        return PathCheck(paths, {}, refused)
    try:
        joined = "\n".join(paths).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which a pickle can hold
        shape = None
    else:
        # Medium and strict: only printable ASCII but the separators; none: no whitespace but the separators.
        shape = joined.translate(None, _SHAPE_DELETE["medium" if validation != "none" else "none"])
    if shape != b"\n" * (len(paths) - 1) or "" in paths:
        for index, path in enumerate(paths):
            problem = _path_problem(path, validation)
            if problem is not None:
                refused[index] = problem
    tagged = _check_names(
        paths, validation, refused, ";" in "".join(paths), validation == "strict", tag_cache
    )
    return PathCheck(paths, tagged, refused)


def _path_problem(path: str, validation: str) -> tuple[str, str] | None:
    if not path:
        return BAD_NAME, "empty path"
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError as error:
        return (
            BAD_CHARS,
            f"path {path[:40]!r} holds {path[error.start]!r}, a lone surrogate that UTF-8 cannot encode",
        )
    whitespace = encoded.translate(None, _SHAPE_DELETE["none"])
    if whitespace:
        return BAD_CHARS, f"path {_show(encoded)} holds whitespace ({whitespace[0]:#04x})"
    if validation != "none":
        refused_bytes = encoded.translate(None, _PRINTABLE_LINE)
        if refused_bytes:
            return BAD_CHARS, f"path {_show(encoded)} holds byte {refused_bytes[0]:#04x}, not printable ASCII"
    return None


# --- Splitting ------------------------------------------------------------------------------------------

_STRICT_NAME_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"
# Deleting these from a chunk leaves its "shape": what separates the fields and lines, and any byte the
# level refuses. Medium allows printable ASCII only, so everything else stays in the shape; level none
# allows any byte in a field, so only the whitespace that bytes.split() splits on stays. The strict fast
# path takes only the bytes of strict names (plain numbers are made of them too) and `;` `=` for tags, so a
# clean shape proves the names' characters unless there is a `=` (which may then sit in a name); anything
# else (tag values with other characters, `1e+03`) goes the line by line way.
_SHAPE_DELETE: dict[str, bytes] = {
    "none": bytes(b for b in range(256) if b not in b" \n\t\r\x0b\x0c"),
    "medium": bytes(range(0x21, 0x7F)),
    "strict": _STRICT_NAME_BYTES + b";=",
}
_SHAPE_LINE = b"  \n"
# Bytes allowed in a medium or strict line: printable ASCII and the tab as a field separator.
_PRINTABLE_LINE = bytes(range(0x20, 0x7F)) + b"\t"


def _clean_line_count(body: bytes, validation: str, max_line_length: int) -> int | None:
    """The number of lines of a chunk whose every line is `field SP field SP field` and no longer than
    the limit (at medium and strict, of printable ASCII only), or None.

    The shape check proves that each line has exactly two spaces and no other whitespace (nor, at medium
    and strict, any refused byte); then every line has three fields exactly when the whole chunk splits
    into three fields per line (a leading, trailing or doubled space would lose a field somewhere), which
    the caller checks when it splits.
    """
    shape = body.translate(None, _SHAPE_DELETE[validation])
    line_count = len(shape) // 3 + 1
    if len(shape) % 3 != 2 or shape != _SHAPE_LINE * (line_count - 1) + b"  ":
        return None
    if _has_long_line(body, max_line_length):
        return None
    return line_count


def _decode_clean_text(
    body: bytes, line_count: int, now_ns: int
) -> tuple[list[str], list[float], list[int]] | None:
    """The columns of a clean chunk (`_clean_line_count`) without tags, if every value and timestamp is
    a plain number (else None: the caller takes the general way, which finds and reports the bad ones).

    Splitting the decoded text rather than the bytes gives the paths as `str` at once (no second pass to
    decode them), and msgspec parses the joined value and timestamp fields from the same text.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:  # possible at level none
        return None
    fields = text.split()
    # str.split() also splits on whitespace that bytes.split() keeps (\x1c-\x1f, U+0085, U+00A0...,
    # allowed in a path at level none): then there are more fields than lines allow.
    if len(fields) != 3 * line_count:
        return None
    try:
        values = _VALUES_DECODER.decode("[" + ",".join(fields[1::3]) + "]")
    except msgspec.DecodeError:
        return None
    # A field with a comma in it would decode as several numbers.
    if len(values) != line_count:
        return None
    joined = "000000000,".join(fields[2::3])
    timestamps = _decode_ns_timestamps("[" + joined + "000000000]", line_count, now_ns, "-" in joined)
    if timestamps is None:
        return None
    return fields[0::3], values, timestamps


def _has_long_line(body: bytes, max_line_length: int) -> bool:
    """Whether a line of `body` is longer than max_line_length, in about len(body) / max_line_length steps.

    From the start of a line, the last newline within the next max_line_length + 1 bytes ends every line
    in between within the limit; no newline there means the line is too long (unless the body ends first).
    """
    start = 0
    end = len(body)
    while end - start > max_line_length:
        newline = body.rfind(b"\n", start, start + max_line_length + 1)
        if newline < 0:
            return True
        start = newline + 1
    return False


def _split_lines(
    body: bytes, validation: str, max_line_length: int, bad: _BadLineLog
) -> tuple[list[bytes], list[bytes], list[bytes], list[bytes], bool]:
    """Line by line split for chunks that are not clean: checks field count, length and bytes."""
    paths: list[bytes] = []
    values: list[bytes] = []
    timestamps: list[bytes] = []
    raw_lines: list[bytes] = []
    check_bytes = validation != "none"
    line_too_long = False
    for line in body.split(b"\n"):
        fields = line.split()
        if not fields:
            continue
        if len(line) > max_line_length:
            bad.add(LINE_TOO_LONG, f"line of {len(line)} bytes is longer than {max_line_length}", line)
            line_too_long = True
            continue
        if len(fields) != 3:
            bad.add(FIELD_COUNT, f"expected 3 fields (path value timestamp), found {len(fields)}", line)
            continue
        if check_bytes:
            refused = line.translate(None, _PRINTABLE_LINE)
            if refused:
                bad.add(BAD_CHARS, f"byte {refused[0]:#04x} is not printable ASCII", line)
                continue
        paths.append(fields[0])
        values.append(fields[1])
        timestamps.append(fields[2])
        raw_lines.append(line)
    return paths, values, timestamps, raw_lines, line_too_long


# --- Columns ---------------------------------------------------------------------------------------------

_VALUES_DECODER = msgspec.json.Decoder(list[float])
# Nanoseconds as JSON integers. The lower bound admits -1 second, which means "now".
_NS_TIMESTAMPS_DECODER = msgspec.json.Decoder(
    list[Annotated[int, msgspec.Meta(ge=-NS_PER_SECOND, le=MAX_TIMESTAMP_SECONDS * NS_PER_SECOND)]]
)
_PATHS_DECODER = msgspec.json.Decoder(list[str])

# Timestamps that int() refuses but that are numbers: decimals and exponents, ASCII digits only.
_DECIMAL_TIMESTAMP = re.compile(rb"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_STRICT_NAME_REFUSED = re.compile(r"[^A-Za-z0-9_.\n-]|\.\.")
_DOUBLE_DOT = re.compile(rb"\.\.")


def _decode_columns(
    path_fields: list[bytes],
    value_fields: list[bytes],
    timestamp_fields: list[bytes],
    raw_lines: list[bytes] | None,
    validation: str,
    now_ns: int,
    bad: _BadLineLog,
    *,
    any_tags: bool,
    json_safe_paths: bool,
    check_strict_names: bool,
    tag_cache: dict[str, TagCacheEntry] | None,
) -> tuple[list[str], list[float], list[int], dict[str, TaggedName]]:
    """Decodes the three columns; drops and records the lines with a bad field (first bad field wins)."""
    if not path_fields:
        return [], [], [], {}
    refused: dict[int, tuple[str, str]] = {}
    values = _decode_values(value_fields, validation, refused)
    timestamps = _decode_timestamps(timestamp_fields, now_ns, refused)
    paths = _decode_paths(path_fields, refused, json_safe_paths)
    tagged = _check_names(paths, validation, refused, any_tags, check_strict_names, tag_cache)
    if refused:
        for index in sorted(refused):
            reason, message = refused[index]
            if raw_lines is not None:
                line = raw_lines[index]
            else:
                line = b" ".join((path_fields[index], value_fields[index], timestamp_fields[index]))
            bad.add(reason, message, line)
        kept = [i for i in range(len(paths)) if i not in refused]
        paths = [paths[i] for i in kept]
        values = [values[i] for i in kept]
        timestamps = [timestamps[i] for i in kept]
        if tagged:
            still_there = set(paths)
            tagged = {path: name for path, name in tagged.items() if path in still_there}
    return paths, values, timestamps, tagged


def _decode_values(fields: list[bytes], validation: str, refused: dict[int, tuple[str, str]]) -> list[float]:
    try:
        values = _VALUES_DECODER.decode(b"[" + b",".join(fields) + b"]")
    except msgspec.DecodeError:
        pass
    else:
        # A field with a comma in it would decode as several numbers.
        if len(values) == len(fields):
            return values  # JSON has no NaN: nothing more to check
    keep_nan = validation == "none"
    values = []
    for index, field in enumerate(fields):
        try:
            # float() accepts 1_000; no Graphite client sends it and carbon-relay-ng refuses it.
            if b"_" in field:
                raise ValueError
            value = float(field)
        except ValueError:
            refused.setdefault(index, (BAD_VALUE, f"value {_show(field)} is not a number"))
            value = 0.0
        else:
            if value != value and not keep_nan:
                refused.setdefault(index, (NAN_VALUE, "value is NaN (dropped, as carbon does)"))
        values.append(value)
    return values


def _decode_timestamps(fields: list[bytes], now_ns: int, refused: dict[int, tuple[str, str]]) -> list[int]:
    # Whole seconds: nine zeros turn them into nanoseconds; the decoder checks the range.
    joined = b"000000000,".join(fields)
    timestamps = _decode_ns_timestamps(b"[" + joined + b"000000000]", len(fields), now_ns, b"-" in joined)
    if timestamps is not None:
        return timestamps
    if b"." in joined:
        # Decimal seconds: the whole part followed by the fraction padded to nine digits is the number of
        # nanoseconds, built with C-level maps rather than per item.
        wholes, _, fractions = zip(*map(bytes.partition, fields, repeat(b".")), strict=True)
        if max(map(len, fractions)) <= 9:
            nanoseconds = b",".join(
                map(bytes.__add__, wholes, map(bytes.ljust, fractions, repeat(9), repeat(b"0")))
            )
            timestamps = _decode_ns_timestamps(b"[" + nanoseconds + b"]", len(fields), now_ns, b"-" in joined)
            if timestamps is not None:
                return timestamps
    timestamps = []
    for index, field in enumerate(fields):
        timestamp = parse_timestamp(field, now_ns)
        if timestamp is None:
            refused.setdefault(
                index,
                (
                    BAD_TIMESTAMP,
                    f"timestamp {_show(field)} is not a number of seconds in 0..{MAX_TIMESTAMP_SECONDS} or -1",
                ),
            )
            timestamp = 0
        timestamps.append(timestamp)
    return timestamps


def _decode_ns_timestamps(
    json_array: bytes | str, count: int, now_ns: int, maybe_now: bool
) -> list[int] | None:
    try:
        timestamps = _NS_TIMESTAMPS_DECODER.decode(json_array)
    except msgspec.DecodeError:
        return None
    # A field with a comma in it would decode as several numbers.
    if len(timestamps) != count:
        return None
    if maybe_now:
        timestamps = [now_ns if timestamp == -NS_PER_SECOND else timestamp for timestamp in timestamps]
        # Only "-1" means now; other negatives ("-.5" in the decimal form) go the per-item way and fail.
        if min(timestamps) < 0:
            return None
    return timestamps


def parse_timestamp(field: bytes, now_ns: int) -> int | None:
    """Seconds since the epoch as text (integer or decimal) to nanoseconds; -1 gives `now_ns`.

    Returns None when the text is not such a number or is outside 0..2**32-1 seconds. Decimals are
    converted exactly (truncated to the nanosecond), not through a float.
    """
    whole, _, fraction = field.partition(b".")
    # isdigit() on bytes is ASCII digits only; checking first avoids costly exceptions from int().
    if whole.isdigit() and (fraction.isdigit() or not fraction):
        whole = whole.lstrip(b"0")
        if len(whole) > 10:
            return None
        seconds = int(whole) if whole else 0
        if seconds > MAX_TIMESTAMP_SECONDS:
            return None
        return seconds * NS_PER_SECOND + (int(fraction[:9].ljust(9, b"0")) if fraction else 0)
    if field == b"-1":
        return now_ns
    # Signs, exponents, a leading dot: rare forms, converted exactly with Decimal.
    if _DECIMAL_TIMESTAMP.fullmatch(field) is None:
        return None
    try:
        seconds_decimal = Decimal(field.decode("ascii"))
    except InvalidOperation:
        return None
    if seconds_decimal == -1:
        return now_ns
    if not 0 <= seconds_decimal <= MAX_TIMESTAMP_SECONDS:
        return None
    # A context with as many digits as the text makes the scaling exact; int() then truncates.
    return int(seconds_decimal.scaleb(9, Context(prec=len(field) + 10)))


def _decode_paths(fields: list[bytes], refused: dict[int, tuple[str, str]], json_safe: bool) -> list[str]:
    if json_safe:
        try:
            paths = _PATHS_DECODER.decode(b'["' + b'","'.join(fields) + b'"]')
        except DECODE_ERRORS:
            # Control bytes or invalid UTF-8 (both possible at level none; which exception msgspec
            # raises for the latter depends on its release): the per-field way finds and reports them.
            pass
        else:
            if len(paths) == len(fields):
                return paths
    paths = []
    for index, field in enumerate(fields):
        try:
            path = field.decode("utf-8")
        except UnicodeDecodeError as error:
            refused.setdefault(
                index,
                (BAD_CHARS, f"path is not valid UTF-8 (byte {field[error.start]:#04x} at {error.start})"),
            )
            path = ""
        paths.append(path)
    return paths


def _check_names(
    paths: list[str],
    validation: str,
    refused: dict[int, tuple[str, str]],
    any_tags: bool,
    check_strict_names: bool,
    tag_cache: dict[str, TagCacheEntry] | None,
) -> dict[str, TaggedName]:
    """Checks the metric names if asked (strict); parses and normalises the tagged paths in place."""
    tagged: dict[str, TaggedName] = {}
    if not any_tags:
        if check_strict_names:
            _check_strict_names(paths, range(len(paths)), refused)
        return tagged
    # The same series comes back many times, within a chunk and from one chunk to the next: parse each
    # distinct path once (per call, or per connection when the caller keeps a cache).
    if tag_cache is None:
        tag_cache = {}
    elif len(tag_cache) > TAG_CACHE_MAX_ENTRIES:
        tag_cache.clear()
    keep_bad_tags = validation == "none"
    untagged: list[int] = []
    for index, path in enumerate(paths):
        if ";" not in path:
            if check_strict_names:
                untagged.append(index)
            continue
        if refused and index in refused:
            continue
        entry = tag_cache.get(path)
        if entry is None:
            entry = tag_cache[path] = _parse_tags(path)
        result, strict_problem = entry
        if check_strict_names and strict_problem is not None:
            refused[index] = (BAD_NAME, strict_problem)
        elif type(result) is TaggedName:
            paths[index] = result.path
            tagged[result.path] = result
        elif not keep_bad_tags:
            refused[index] = result
        # At level none a path whose tags do not parse stays a plain path.
    if untagged:
        _check_strict_names([paths[index] for index in untagged], untagged, refused)
    return tagged


def _check_strict_names(
    names: list[str], indices: Sequence[int], refused: dict[int, tuple[str, str]]
) -> None:
    """Refuses (bad_name) the names with characters other than [A-Za-z0-9_.-] or with `..`."""
    joined = "\n".join(names).encode("utf-8", "surrogatepass")
    if not joined.translate(None, _STRICT_NAME_BYTES + b"\n") and not _DOUBLE_DOT.search(joined):
        return
    for name, index in zip(names, indices, strict=True):
        problem = _strict_name_problem(name)
        if problem is not None:
            refused.setdefault(index, (BAD_NAME, problem))


def _strict_name_problem(name: str) -> str | None:
    if _STRICT_NAME_REFUSED.search(name) is None:
        return None
    return f"name {name!r} has characters other than A-Z a-z 0-9 _ . - or has '..'"


def _parse_tags(path: str) -> TagCacheEntry:
    name = path.partition(";")[0]
    strict_problem = _strict_name_problem(name)
    if not name.lstrip("~"):
        return (BAD_NAME, f"no metric name before ';' in {path!r}"), strict_problem
    try:
        return parse_tagged_path(path), strict_problem
    except TagError as error:
        return (BAD_TAGS, str(error)), strict_problem


# --- Bad lines -------------------------------------------------------------------------------------------


class _BadLineLog:
    """Counts of dropped lines by reason and the first few samples, for one call."""

    __slots__ = ("counts", "samples", "max_samples")

    def __init__(self, max_samples: int) -> None:
        self.counts: dict[str, int] = {}
        self.samples: list[BadLine] = []
        self.max_samples = max_samples

    def add(self, reason: str, message: str, line: bytes) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.samples) < self.max_samples:
            text = line[: SAMPLE_LINE_CHARS * 4].decode("utf-8", "backslashreplace")[:SAMPLE_LINE_CHARS]
            self.samples.append(BadLine(reason, message, text))


def _show(field: bytes) -> str:
    """A field for an error message: quoted, escaped, cut."""
    return repr(field[:40].decode("utf-8", "backslashreplace")) + ("..." if len(field) > 40 else "")
