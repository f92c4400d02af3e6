"""The carbon plaintext parser: what clients send, validation levels, bad line reporting, chunking."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_plugins.graphite.protocol.plaintext import (
    BAD_LINE_REASONS,
    DEFAULT_MAX_LINE_LENGTH,
    MAX_TIMESTAMP_SECONDS,
    PlaintextChunk,
    check_paths,
    parse_chunk,
    parse_timestamp,
)

NOW = 1_800_000_000_123_456_789
S = 1_000_000_000


def parse(data: bytes, **options) -> PlaintextChunk:
    options.setdefault("now_ns", NOW)
    return parse_chunk(data, **options)


def points(result: PlaintextChunk) -> list[tuple[str, float, int]]:
    return list(zip(result.paths, result.values, result.timestamps, strict=True))


def test_typical_lines():
    result = parse(b"servers.web-01.cpu.user 12.5 1700000000\nservers.web-01.cpu.idle 80 1700000010\n")
    assert points(result) == [
        ("servers.web-01.cpu.user", 12.5, 1700000000 * S),
        ("servers.web-01.cpu.idle", 80.0, 1700000010 * S),
    ]
    assert result.leftover == b""
    assert result.bad_counts == {}
    assert result.bad_samples == []
    assert not result.line_too_long
    assert all(type(value) is float for value in result.values)


def test_collectd_crlf_lines():
    result = parse(
        b"collectd.host.load.shortterm 0.150000 1700000000\r\ncollectd.host.load.midterm 0.2 1700000000\r\n"
    )
    assert points(result) == [
        ("collectd.host.load.shortterm", 0.15, 1700000000 * S),
        ("collectd.host.load.midterm", 0.2, 1700000000 * S),
    ]
    assert result.bad_counts == {}


def test_crlf_split_between_chunks():
    first = parse(b"a.b 1 1700000000\r")
    assert first.paths == []
    second = parse(b"\nc.d 2 1700000000\r\n", leftover=first.leftover)
    assert points(second) == [("a.b", 1.0, 1700000000 * S), ("c.d", 2.0, 1700000000 * S)]


def test_tabs_several_spaces_surrounding_whitespace_and_empty_lines():
    data = b"\n  a.b\t1   1700000000  \n\n\t\nc.d  \t 2\t1700000001\n   \n"
    result = parse(data)
    assert points(result) == [("a.b", 1.0, 1700000000 * S), ("c.d", 2.0, 1700000001 * S)]
    assert result.bad_counts == {}


def test_last_line_without_newline_is_kept_for_the_next_chunk():
    first = parse(b"a.b 1 1700000000\nc.d 2 17000")
    assert points(first) == [("a.b", 1.0, 1700000000 * S)]
    assert first.leftover == b"c.d 2 17000"
    second = parse(b"00000\n", leftover=first.leftover)
    assert points(second) == [("c.d", 2.0, 1700000000 * S)]
    assert second.leftover == b""


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (b"12", 12.0),
        (b"-12.5", -12.5),
        (b"1.2e+03", 1200.0),
        (b"1E-3", 0.001),
        (b".5", 0.5),
        (b"5.", 5.0),
        (b"+7", 7.0),
        (b"007", 7.0),
        (b"123456789012345678901234567890", 1.2345678901234568e29),
        (b"inf", math.inf),
        (b"-Infinity", -math.inf),
        (b"1e400", math.inf),
    ],
)
def test_values(text, value):
    result = parse(b"a.b " + text + b" 1700000000\n")
    assert result.values == [value]


@pytest.mark.parametrize(
    ("text", "expected_ns"),
    [
        (b"1700000000", 1700000000 * S),
        (b"1700000000.5", 1700000000 * S + 500_000_000),
        (b"1700000000.123456789", 1700000000_123456789),
        (b"1700000000.1234567899", 1700000000_123456789),  # truncated to the nanosecond
        (b"1700000000.", 1700000000 * S),
        (b"1.7e9", 1700000000 * S),
        (b"17e8", 1700000000 * S),
        (b"0", 0),
        (b"0.25", 250_000_000),
        (b".5", 500_000_000),
        (b"+1700000000", 1700000000 * S),
        (b"0001700000000", 1700000000 * S),
        (b"4294967295", MAX_TIMESTAMP_SECONDS * S),
        (b"-1", NOW),
        (b"-1.0", NOW),
        (b"-1e0", NOW),
    ],
)
def test_timestamps(text, expected_ns):
    result = parse(b"a.b 1 " + text + b"\n")
    assert result.timestamps == [expected_ns]
    assert parse_timestamp(text, NOW) == expected_ns


@pytest.mark.parametrize(
    "text",
    [
        b"4294967296",
        b"-2",
        b"-0.5",
        b"-.5",
        b"1_700_000_000",
        b"nan",
        b"inf",
        b"1e999999",
        b"abc",
        b"1.2.3",
        b"0x10",
        b"\xd9\xa1",
        b"1700000000,5",
        b"[1]",
        b"1700000000.5.5",
    ],
)
def test_bad_timestamps(text):
    result = parse(b"a.b 1 " + text + b"\nok 1 1700000000\n", validation="none")
    assert result.paths == ["ok"]
    assert result.bad_counts == {"bad_timestamp": 1}
    sample = result.bad_samples[0]
    assert sample.reason == "bad_timestamp"
    assert "timestamp" in sample.message
    assert parse_timestamp(text, NOW) is None


@pytest.mark.parametrize("text", [b"abc", b"1_000", b"1,5", b"0x10", b"1..2", b"--1", b"\xd9\xa1"])
def test_bad_values(text):
    result = parse(b"a.b " + text + b" 1700000000\nok 1 1700000000\n", validation="none")
    assert result.paths == ["ok"]
    assert result.bad_counts == {"bad_value": 1}
    assert "is not a number" in result.bad_samples[0].message


def test_nan_is_dropped_like_carbon_except_at_level_none():
    data = b"a.b nan 1700000000\nc.d NaN 1700000000\ne.f 1 1700000000\n"
    medium = parse(data)
    assert medium.paths == ["e.f"]
    assert medium.bad_counts == {"nan_value": 2}
    none = parse(data, validation="none")
    assert none.paths == ["a.b", "c.d", "e.f"]
    assert math.isnan(none.values[0]) and math.isnan(none.values[1])


@pytest.mark.parametrize("line", [b"a.b 1", b"a.b", b"a.b 1 1700000000 extra", b"a b c d e"])
def test_field_count(line):
    for level in ("none", "medium", "strict"):
        result = parse(line + b"\nok 1 1700000000\n", validation=level)
        assert result.paths == ["ok"]
        assert result.bad_counts == {"field_count": 1}
        assert result.bad_samples[0].line == line.decode()


@pytest.mark.parametrize(
    "path", [b"a\x00b", b"caf\xc3\xa9", b"a\x01b", b"a\x7fb", b"\xff\xfe", b"a\x0bb.c d"]
)
def test_medium_refuses_bytes_outside_printable_ascii(path):
    result = parse(path + b" 1 1700000000\nok 1 1700000000\n")
    assert result.paths == ["ok"]
    assert set(result.bad_counts) <= {"bad_chars", "field_count"}
    assert sum(result.bad_counts.values()) == 1


def test_level_none_accepts_utf8_and_control_bytes_but_not_invalid_utf8():
    result = parse(
        b"caf\xc3\xa9.temp 1 1700000000\na\x01b 2 1700000000\n\xff.x 3 1700000000\n", validation="none"
    )
    assert result.paths == ["café.temp", "a\x01b"]
    assert result.bad_counts == {"bad_chars": 1}
    assert "not valid UTF-8" in result.bad_samples[0].message
    assert result.bad_samples[0].line == "\\xff.x 3 1700000000"


@pytest.mark.parametrize("odd", ["\x1c", "\x1f", "\x85", "\xa0", "\u2028", "\u3000"])
def test_level_none_keeps_paths_with_characters_that_str_split_treats_as_whitespace(odd):
    # bytes.split() splits on ASCII whitespace only; a path with these must stay one field at level none,
    # even where splitting it would still leave numbers in the value and timestamp columns.
    data = f"1{odd}2 3 1700000000\n4 5 1700000001\n6 7 1700000002\n".encode()
    result = parse(data, validation="none")
    assert points(result) == [
        (f"1{odd}2", 3.0, 1_700_000_000 * S),
        ("4", 5.0, 1_700_000_001 * S),
        ("6", 7.0, 1_700_000_002 * S),
    ]
    assert parse(data, validation="medium").bad_counts == {"bad_chars": 1}


@pytest.mark.parametrize("path", [b"\x80", b"a\xffb", b"\xc3", b"\xed\xa0\x80"])
def test_level_none_refuses_invalid_utf8_in_an_otherwise_clean_chunk(path):
    # No control byte in the chunk to stop the bulk decoding first: the bad path must still be refused
    # and counted, never raise.
    result = parse(path + b" 1 1700000000\nok.path 2 1700000000\n", validation="none")
    assert result.paths == ["ok.path"]
    assert result.bad_counts == {"bad_chars": 1}


def test_quotes_and_backslashes_in_paths():
    result = parse(b'a"b 1 1700000000\nc\\d 2 1700000000\n')
    assert result.paths == ['a"b', "c\\d"]


@pytest.mark.parametrize(
    "path", [b"a..b", b"a/b", b"a:b", b"a=b", b"a+b", b"a=b;c=d", b"..a;c=d", b"a~b;c=d", b"~a;c=d"]
)
def test_strict_names(path):
    line = path + b" 1 1700000000\nok.name_1-x 1 1700000000\n"
    strict = parse(line, validation="strict")
    assert strict.paths == ["ok.name_1-x"]
    assert strict.bad_counts == {"bad_name": 1}
    assert "A-Z a-z 0-9" in strict.bad_samples[0].message
    assert len(parse(line, validation="medium").paths) == 2


def test_strict_accepts_tags_with_any_printable_value():
    result = parse(b"disk.used;mount=/var/log;host=a 1 1700000000\n", validation="strict")
    assert result.paths == ["disk.used;host=a;mount=/var/log"]


def test_tagged_paths_are_normalised_and_listed():
    result = parse(b"cpu;host=a;dc=eu 1 1700000000\ncpu;dc=eu;host=a 2 1700000000\nplain.path 3 1700000000\n")
    assert result.paths == ["cpu;dc=eu;host=a", "cpu;dc=eu;host=a", "plain.path"]
    assert set(result.tagged) == {"cpu;dc=eu;host=a"}
    tagged = result.tagged["cpu;dc=eu;host=a"]
    assert tagged.name == "cpu"
    assert tagged.tags == {"host": "a", "dc": "eu"}


def test_bad_tags_are_refused_at_medium_and_kept_as_plain_paths_at_none():
    data = b"cpu;host 1 1700000000\ncpu;host=~a 2 1700000000\n;host=a 3 1700000000\n"
    medium = parse(data)
    assert medium.paths == []
    assert medium.bad_counts == {"bad_tags": 2, "bad_name": 1}
    assert [sample.reason for sample in medium.bad_samples] == ["bad_tags", "bad_tags", "bad_name"]
    assert "cpu;host" in medium.bad_samples[0].message
    none = parse(data, validation="none")
    assert none.paths == ["cpu;host", "cpu;host=~a", ";host=a"]
    assert none.tagged == {}


def test_tag_cache_is_used_and_bounded(monkeypatch):
    from agent_plugins.graphite.protocol import plaintext

    cache: dict = {}
    first = parse(b"cpu;b=2;a=1 1 1700000000\ncpu;x 1 1700000000\n", tag_cache=cache)
    assert set(cache) == {"cpu;b=2;a=1", "cpu;x"}
    assert first.paths == ["cpu;a=1;b=2"]
    second = parse(b"cpu;b=2;a=1 1 1700000000\n", tag_cache=cache)
    assert second.tagged["cpu;a=1;b=2"] is first.tagged["cpu;a=1;b=2"], "parsed once, reused"
    monkeypatch.setattr(plaintext, "TAG_CACHE_MAX_ENTRIES", 1)
    parse(b"mem;a=1 1 1700000000\n", tag_cache=cache)
    assert set(cache) == {"mem;a=1"}, "emptied when over the limit, then filled again"


def test_line_longer_than_the_limit_is_reported():
    long_path = b"a" * 100
    result = parse(
        b"ok 1 1700000000\n" + long_path + b" 1 1700000000\nok2 1 1700000000\n", max_line_length=50
    )
    assert result.line_too_long
    assert result.bad_counts == {"line_too_long": 1}
    assert result.paths == ["ok", "ok2"]


def test_line_of_exactly_the_limit_is_accepted():
    line = b"a" * (50 - len(b" 1 1700000000")) + b" 1 1700000000"
    assert len(line) == 50
    result = parse(line + b"\n" + line + b"\n", max_line_length=50)
    assert len(result) == 2
    assert not result.line_too_long


def test_unfinished_line_growing_past_the_limit_is_reported_before_it_ends():
    first = parse(b"ok 1 1700000000\n" + b"a" * 40, max_line_length=50)
    assert not first.line_too_long
    second = parse(b"a" * 40, leftover=first.leftover, max_line_length=50)
    assert second.line_too_long
    assert second.bad_counts == {"line_too_long": 1}
    assert second.leftover == b"", "nothing of the overlong line is kept"
    assert "no newline yet" in second.bad_samples[0].message


def test_default_line_limit_is_carbons():
    assert DEFAULT_MAX_LINE_LENGTH == 16384
    result = parse(b"a" * 16385)
    assert result.line_too_long


def test_samples_are_limited_and_counts_are_complete():
    data = b"".join(b"bad%d x 1700000000\n" % i for i in range(30))
    result = parse(data, max_bad_samples=3)
    assert result.bad_counts == {"bad_value": 30}
    assert [sample.line for sample in result.bad_samples] == [
        "bad0 x 1700000000",
        "bad1 x 1700000000",
        "bad2 x 1700000000",
    ]


def test_sample_lines_are_cut():
    result = parse(b"a" * 1000 + b" x 1700000000\n")
    assert len(result.bad_samples[0].line) == 200


def test_first_bad_field_is_the_reason():
    result = parse(b"a..b x -5\n", validation="strict")
    assert result.bad_counts == {"bad_value": 1}


def test_unknown_validation_level():
    with pytest.raises(ValueError, match="unknown validation level 'lax'"):
        parse(b"a 1 1\n", validation="lax")


def test_empty_input():
    result = parse(b"")
    assert (result.paths, result.leftover, result.bad_counts) == ([], b"", {})
    assert parse(b"\n\n\r\n").paths == []


def test_accepts_bytearray_and_memoryview():
    assert parse(bytearray(b"a 1 1700000000\n")).paths == ["a"]
    assert parse(memoryview(b"a 1 1700000000\n")).paths == ["a"]


# --- check_paths (pickle input) ----------------------------------------------------------------------------


def test_check_paths_applies_the_same_rules():
    checked = check_paths(
        ["a.b", "cpu;b=2;a=1", "a b", "", "caf\u00e9", "x\ny", "cpu;bad"], validation="medium"
    )
    assert checked.paths[:2] == ["a.b", "cpu;a=1;b=2"]
    assert set(checked.tagged) == {"cpu;a=1;b=2"}
    assert {index: reason for index, (reason, _) in checked.refused.items()} == {
        2: "bad_chars",
        3: "bad_name",
        4: "bad_chars",
        5: "bad_chars",
        6: "bad_tags",
    }


def test_check_paths_level_none_refuses_only_whitespace_and_empty():
    checked = check_paths(["caf\u00e9", "a\x01", "a\tb", ""], validation="none")
    assert sorted(checked.refused) == [2, 3]


def test_check_paths_refuses_lone_surrogates_at_every_level():
    # A pickle can hold them; UTF-8 outputs could not encode them.
    for level in ("none", "medium", "strict"):
        checked = check_paths(["ok", "a\ud800b"], validation=level)
        assert list(checked.refused) == [1]
        assert "lone surrogate" in checked.refused[1][1]


@settings(max_examples=200)
@given(paths=st.lists(st.text(max_size=12), max_size=8), level=st.sampled_from(["none", "medium", "strict"]))
def test_check_paths_never_raises_and_accepts_only_sendable_paths(paths, level):
    checked = check_paths(paths, validation=level)
    assert len(checked.paths) == len(paths)
    for index, path in enumerate(checked.paths):
        if index in checked.refused:
            assert checked.refused[index][0] in BAD_LINE_REASONS
            continue
        encoded = path.encode("utf-8")
        assert encoded and len(encoded.split()) == 1 and encoded.strip() == encoded, "one plaintext field"
        if level != "none":
            assert path.isascii() and path.isprintable()


def test_check_paths_strict():
    checked = check_paths(["ok.a-b_c", "a..b", "a/b", "a=b;c=d", "ok;c=/x"], validation="strict")
    assert sorted(checked.refused) == [1, 2, 3]
    assert checked.paths[4] == "ok;c=/x"


# --- Properties -----------------------------------------------------------------------------------------

_NAME = st.text(st.sampled_from("abcxyzABZ019_-"), min_size=1, max_size=12)
strict_paths = st.lists(_NAME, min_size=1, max_size=5).map(".".join)
tagged_paths = st.builds(
    lambda name, tags: name + "".join(sorted(f";{k}={v}" for k, v in tags.items())),
    strict_paths,
    st.dictionaries(
        _NAME, st.text(st.sampled_from("abc019-/:.=!^"), min_size=1, max_size=6), min_size=1, max_size=3
    ),
)
values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(10**15), max_value=10**15).map(float),
    st.sampled_from([math.inf, -math.inf, 0.0, -0.0, 0.5, 12.5]),
)
whole_seconds = st.integers(min_value=0, max_value=MAX_TIMESTAMP_SECONDS)


@st.composite
def timestamps(draw) -> tuple[bytes, int]:
    seconds = draw(whole_seconds)
    form = draw(st.sampled_from(["int", "decimal", "now"]))
    if form == "int":
        return b"%d" % seconds, seconds * S
    if form == "now":
        return b"-1", NOW
    if seconds == MAX_TIMESTAMP_SECONDS:
        seconds -= 1
    fraction = draw(st.text(st.sampled_from("0123456789"), min_size=1, max_size=9))
    return b"%d.%s" % (seconds, fraction.encode()), seconds * S + int(fraction.ljust(9, "0"))


@st.composite
def rendered_lines(draw) -> tuple[bytes, tuple[str, float, int]]:
    path = draw(st.one_of(strict_paths, tagged_paths))
    value = draw(values)
    timestamp_text, timestamp_ns = draw(timestamps())
    separator = draw(st.sampled_from([b" ", b" ", b" ", b"\t", b"  "]))
    end = draw(st.sampled_from([b"\n", b"\n", b"\r\n"]))
    line = path.encode() + separator + repr(value).encode() + separator + timestamp_text + end
    return line, (path, value, timestamp_ns)


def _parse_in_pieces(data: bytes, cuts: list[int], **options) -> tuple[list[tuple[str, float, int]], dict]:
    found: list[tuple[str, float, int]] = []
    counts: dict[str, int] = {}
    leftover = b""
    previous = 0
    for cut in [*sorted(cuts), len(data)]:
        result = parse(data[previous:cut], leftover=leftover, **options)
        found.extend(points(result))
        for reason, count in result.bad_counts.items():
            counts[reason] = counts.get(reason, 0) + count
        leftover = result.leftover
        previous = cut
    assert leftover == b"", "every line ended with a newline"
    return found, counts


@settings(max_examples=120, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(rendered_lines(), max_size=40),
    level=st.sampled_from(["none", "medium", "strict"]),
    data=st.data(),
)
def test_rendered_points_come_back_whatever_the_chunking(lines, level, data):
    stream = b"".join(line for line, _ in lines)
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=6))
    found, counts = _parse_in_pieces(stream, cuts, validation=level)
    assert counts == {}
    assert found == [expected for _, expected in lines]


@settings(max_examples=100)
@given(
    lines=st.lists(rendered_lines(), min_size=1, max_size=20),
    level=st.sampled_from(["none", "medium", "strict"]),
)
def test_fast_and_line_by_line_paths_agree(lines, level):
    stream = b"".join(line for line, _ in lines)
    # A leading empty line sends the chunk the line by line way; the result must not change.
    fast = parse(stream, validation=level)
    slow = parse(b"\n" + stream, validation=level)
    assert points(fast) == points(slow)
    assert fast.bad_counts == slow.bad_counts


_GARBAGE = st.binary(max_size=300) | st.lists(
    st.sampled_from(
        [
            b"a.b",
            b" ",
            b"\t",
            b"\n",
            b"\r\n",
            b"1",
            b"-1",
            b"1.5",
            b"nan",
            b"\x00",
            b"\xff",
            b";",
            b"=",
            b"..",
            b"1e9",
            b'"',
            b"\\",
        ]
    ),
    max_size=60,
).map(b"".join)


@settings(max_examples=300)
@given(
    chunks=st.lists(_GARBAGE, max_size=5),
    level=st.sampled_from(["none", "medium", "strict"]),
    max_line_length=st.sampled_from([8, 40, DEFAULT_MAX_LINE_LENGTH]),
)
def test_garbage_never_raises_and_is_only_counted(chunks, level, max_line_length):
    leftover = b""
    for chunk in chunks:
        result = parse(chunk, leftover=leftover, validation=level, max_line_length=max_line_length)
        assert len(result.paths) == len(result.values) == len(result.timestamps)
        assert set(result.bad_counts) <= set(BAD_LINE_REASONS)
        assert len(result.bad_samples) <= min(10, sum(result.bad_counts.values()))
        assert all(0 <= ts <= MAX_TIMESTAMP_SECONDS * S or ts == NOW for ts in result.timestamps)
        if level != "none":
            assert not any(math.isnan(value) for value in result.values)
        assert len(result.leftover) <= max_line_length
        leftover = result.leftover


@settings(max_examples=100)
@given(lines=st.lists(rendered_lines(), min_size=1, max_size=15), data=st.data())
def test_mutated_streams_never_raise_and_keep_line_accounting(lines, data):
    stream = bytearray(b"".join(line for line, _ in lines))
    for _ in range(data.draw(st.integers(min_value=1, max_value=5))):
        position = data.draw(st.integers(min_value=0, max_value=len(stream) - 1))
        stream[position] = data.draw(st.integers(min_value=0, max_value=255))
    stream += b"\n"
    result = parse(bytes(stream), validation="medium")
    non_empty_lines = [line for line in bytes(stream).split(b"\n") if line.strip()]
    assert len(result) + sum(result.bad_counts.values()) == len(non_empty_lines)
