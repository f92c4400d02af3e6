"""Graphite 1.1 tagged paths: `name;tag1=value1;tag2=value2`.

Used by the Graphite input (plaintext and pickle) to split a tagged path into the metric name and its
tags (which become the series attributes), and to normalise the path the way carbon does before hashing
or forwarding it, so that `cpu;b=2;a=1` and `cpu;a=1;b=2` are the same series everywhere.

The rules are carbon's (docs/tags.rst and `TaggedSeries` in carbon's util.py):

- tag names have at least one character and none of `;` `!` `^` `=` (nor a space: a space would split the
  plaintext line);
- tag values have at least one character, no `;` and no space, and do not start with `~`; a value may
  contain `=` (`a=b=c` is the tag `a` with the value `b=c`). carbon-relay-ng's "medium" validation refuses
  `=` in values; we follow carbon, the program that stores the series;
- the name is everything before the first `;`. Carbon indexes it as the tag `name` with any leading `~`
  removed, and builds the normalised path from that tag, so `~cpu;a=1` becomes `cpu;a=1` and a name of only
  `~` is invalid. A `name=...` tag given by the client is replaced by the metric name, as in carbon;
- when a tag appears twice, the last value wins;
- the normalised path is the name followed by the `;tag=value` strings sorted as strings. Sorting the
  rendered strings is what carbon does; it differs from sorting by tag name when one tag name is a prefix
  of another (`;a-b=1` sorts before `;a=1` because `-` < `=`), and hashing must match carbon byte for byte.

Pure code, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import msgspec

#: Characters that carbon refuses in a tag name, plus the space (which would split a plaintext line).
FORBIDDEN_IN_TAG_NAME = frozenset(";!^= ")
#: Characters refused in a tag value (a leading `~` is refused separately).
FORBIDDEN_IN_TAG_VALUE = frozenset("; ")


# One or more `;tag=value` with carbon's rules (see check_tag, which gives the reasons when this fails).
_VALID_TAG_SEGMENTS = re.compile(r"(?:;[^;!^= ]+=[^;~ ][^; ]*)+")


class TagError(ValueError):
    """A tagged path that carbon would refuse. The message names the path and what is wrong."""


class TaggedName(msgspec.Struct, frozen=True):
    """A parsed tagged path.

    `name` is the metric name as carbon indexes it (leading `~` removed); `tags` holds the other tags
    (never `name`); `path` is the normalised path, `name` followed by the tags sorted as carbon sorts them.
    """

    name: str
    tags: dict[str, str]
    path: str


def is_tagged(path: str) -> bool:
    """True when the path carries tags (contains `;`)."""
    return ";" in path


def check_tag(tag: str, value: str) -> str | None:
    """Returns why carbon would refuse this tag name and value, or None when they are valid."""
    if not tag:
        return "empty tag name"
    bad = FORBIDDEN_IN_TAG_NAME.intersection(tag)
    if bad:
        return f"tag name {tag!r} contains {_quote_chars(bad)}"
    if not value:
        return f"tag {tag!r} has an empty value"
    bad = FORBIDDEN_IN_TAG_VALUE.intersection(value)
    if bad:
        return f"value {value!r} of tag {tag!r} contains {_quote_chars(bad)}"
    if value[0] == "~":
        return f"value {value!r} of tag {tag!r} starts with '~'"
    return None


def format_tagged_path(name: str, tags: Mapping[str, str]) -> str:
    """Renders a normalised tagged path: the name, then `;tag=value` for each tag, sorted as carbon sorts.

    A `name` entry in `tags` is ignored (the name is the first argument). The tags are not validated: use
    `check_tag` or build them with `parse_tagged_path`.
    """
    return name + "".join(sorted(f";{tag}={value}" for tag, value in tags.items() if tag != "name"))


def parse_tagged_path(path: str) -> TaggedName:
    """Parses `name;tag=value;...` and normalises it; raises TagError naming what is wrong.

    A path without `;` is valid and has no tags; its normalised path is itself.
    """
    name, separator, tag_part = path.partition(";")
    if not separator:
        # Carbon only parses paths that contain ';': an untagged path is kept exactly as it is.
        if not path:
            raise TagError("empty metric path")
        return TaggedName(path, {}, path)
    indexed_name = name.lstrip("~")
    if not indexed_name:
        if name:
            raise TagError(f"{path!r}: metric name {name!r} is only '~' characters")
        raise TagError(f"{path!r}: no metric name before the first ';'")
    segments = tag_part.split(";")
    if _VALID_TAG_SEGMENTS.fullmatch(path, len(name)):
        # The common case, checked by one regex: build the tags and the sorted path without per-tag checks.
        tags = dict(segment.split("=", 1) for segment in segments)
        if len(tags) == len(segments) and "name" not in tags:
            # Sorting "tag=value" strings gives the same order as sorting ";tag=value" strings.
            return TaggedName(indexed_name, tags, indexed_name + ";" + ";".join(sorted(segments)))
        tags.pop("name", None)
        return TaggedName(indexed_name, tags, format_tagged_path(indexed_name, tags))
    tags: dict[str, str] = {}
    for segment in segments:
        tag, equals, value = segment.partition("=")
        if not equals:
            raise TagError(f"{path!r}: tag segment {segment!r} has no '='")
        problem = check_tag(tag, value)
        if problem is not None:
            raise TagError(f"{path!r}: {problem}")
        tags[tag] = value
    # Carbon overwrites a client-given `name` tag with the metric name.
    tags.pop("name", None)
    return TaggedName(indexed_name, tags, format_tagged_path(indexed_name, tags))


def normalise_path(path: str) -> str:
    """The path carbon would store: unchanged when untagged, else tags sorted. Raises TagError."""
    if ";" not in path:
        return path
    return parse_tagged_path(path).path


def _quote_chars(chars: set[str] | frozenset[str]) -> str:
    return ", ".join(repr(c) for c in sorted(chars))
