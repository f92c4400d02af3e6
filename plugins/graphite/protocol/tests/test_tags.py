"""Graphite 1.1 tagged paths: parsing, carbon's validation rules and normalisation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_plugins.graphite.protocol.tags import (
    TagError,
    check_tag,
    format_tagged_path,
    normalise_path,
    parse_tagged_path,
)


def test_parses_name_and_tags_and_sorts_them():
    parsed = parse_tagged_path("disk.used;host=web-01;dc=eu;mount=/var")
    assert parsed.name == "disk.used"
    assert parsed.tags == {"host": "web-01", "dc": "eu", "mount": "/var"}
    assert parsed.path == "disk.used;dc=eu;host=web-01;mount=/var"


def test_untagged_path_is_kept_exactly():
    parsed = parse_tagged_path("~servers.web-01.load")
    assert (parsed.name, parsed.tags, parsed.path) == ("~servers.web-01.load", {}, "~servers.web-01.load")
    assert normalise_path("servers.web-01.load") == "servers.web-01.load"


def test_sorts_rendered_strings_like_carbon_not_tag_names():
    # ";a-b=2" < ";a=1" because "-" (0x2d) < "=" (0x3d): carbon sorts the ";tag=value" strings, and the
    # normalised path feeds the consistent hash, so the order must be carbon's byte for byte.
    assert normalise_path("m;a=1;a-b=2") == "m;a-b=2;a=1"
    assert normalise_path("m;a-b=2;a=1") == "m;a-b=2;a=1"
    assert format_tagged_path("m", {"a": "1", "a-b": "2"}) == "m;a-b=2;a=1"


def test_leading_tildes_are_removed_from_a_tagged_name():
    parsed = parse_tagged_path("~~cpu;host=a")
    assert parsed.name == "cpu"
    assert parsed.path == "cpu;host=a"


def test_name_tag_is_replaced_by_the_metric_name():
    parsed = parse_tagged_path("cpu;name=other;host=a")
    assert parsed.tags == {"host": "a"}
    assert parsed.path == "cpu;host=a"


def test_last_duplicate_tag_wins():
    parsed = parse_tagged_path("cpu;host=a;host=b")
    assert parsed.tags == {"host": "b"}
    assert parsed.path == "cpu;host=b"


def test_value_may_hold_equals_and_other_characters():
    parsed = parse_tagged_path("cpu;query=a=b;x=!^~")
    assert parsed.tags == {"query": "a=b", "x": "!^~"}


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("cpu;", "has no '='"),
        ("cpu;;host=a", "has no '='"),
        ("cpu;host", "has no '='"),
        ("cpu;=a", "empty tag name"),
        ("cpu;host=", "empty value"),
        ("cpu;ho!st=a", "'!'"),
        ("cpu;ho^st=a", "'^'"),
        ("cpu;ho st=a", "' '"),
        ("cpu;host=~a", "starts with '~'"),
        ("cpu;host=a b", "' '"),
        (";host=a", "no metric name"),
        ("~~;host=a", "only '~'"),
        ("", "empty metric path"),
    ],
)
def test_refuses_what_carbon_refuses(path, fragment):
    with pytest.raises(TagError) as caught:
        parse_tagged_path(path)
    assert fragment in str(caught.value)
    if path:
        assert repr(path) in str(caught.value), "the message names the path"


def test_check_tag_explains_each_rule():
    assert check_tag("host", "a") is None
    assert check_tag("", "a") == "empty tag name"
    assert check_tag("a=b", "c") == "tag name 'a=b' contains '='"
    assert check_tag("a", "~b") == "value '~b' of tag 'a' starts with '~'"


# --- Properties -----------------------------------------------------------------------------------------

_NAME_CHARS = st.characters(codec="utf-8", exclude_characters=";")
_TAG_CHARS = st.characters(codec="utf-8", exclude_characters=";!^= ")
_VALUE_CHARS = st.characters(codec="utf-8", exclude_characters="; ")
tag_names = st.text(_TAG_CHARS, min_size=1, max_size=8).filter(lambda t: t != "name")
tag_values = st.text(_VALUE_CHARS, min_size=1, max_size=8).filter(lambda v: not v.startswith("~"))
metric_names = st.text(_NAME_CHARS, min_size=1, max_size=20).filter(lambda n: n.lstrip("~"))


@settings(max_examples=300)
@given(name=metric_names, tags=st.dictionaries(tag_names, tag_values, min_size=1, max_size=6), data=st.data())
def test_any_order_of_valid_tags_gives_the_same_normalised_path(name, tags, data):
    order = data.draw(st.permutations(list(tags.items())))
    path = name + "".join(f";{tag}={value}" for tag, value in order)
    parsed = parse_tagged_path(path)
    assert parsed.name == name.lstrip("~")
    assert parsed.tags == tags
    assert parsed.path == parsed.name + "".join(sorted(f";{tag}={value}" for tag, value in tags.items()))
    assert parse_tagged_path(parsed.path) == parsed, "normalising is idempotent"


def _carbon_rules(path: str) -> tuple[str, dict[str, str]] | None:
    """The rules of carbon's TaggedSeries.parse written out one by one, as the oracle for the fast path."""
    segments = path.split(";")
    tags: dict[str, str] = {}
    for segment in segments[1:]:
        if "=" not in segment:
            return None
        tag, value = segment.split("=", 1)
        if not tag or any(c in tag for c in ";!^= "):
            return None
        if not value or ";" in value or " " in value or value[0] == "~":
            return None
        tags[tag] = value
    name = segments[0].lstrip("~")
    if not name:
        return None
    tags.pop("name", None)
    return name, tags


@settings(max_examples=500)
@given(st.text(st.sampled_from("ab~;=! ^.x"), min_size=1, max_size=16).filter(lambda p: ";" in p))
def test_agrees_with_carbon_rules_on_arbitrary_text(path):
    expected = _carbon_rules(path)
    if expected is None:
        with pytest.raises(TagError):
            parse_tagged_path(path)
    else:
        parsed = parse_tagged_path(path)
        assert (parsed.name, parsed.tags) == expected
        assert parsed.path == format_tagged_path(*expected)
