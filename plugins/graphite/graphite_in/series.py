"""Graphite points as pipeline series: what `graphite-in` sends for each chunk of lines or pickle frames.

Where it sits: the listeners (`listeners.py`) parse a chunk with `graphite.protocol.plaintext` or
`graphite.protocol.pickle_codec` and hand the columns to `graphite_series`, which returns the `Series`
of one pipeline batch. Pure code, no I/O.

Every Graphite point has its own path, so `Series.metric` is the list of paths, parallel to the
timestamps (`graphite-out` writes them verbatim; csv and the other outputs show the path as the metric
name). Resource and consumer are the local machine: Graphite says nothing about either.

- Untagged points, the usual case, all go into one series with no attributes: the columns from the
  parser are used as they are, with no per-point work.
- Tagged points (`name;k=v`) keep their normalised path (tags sorted as carbon sorts them) as the metric
  and get their tags as attributes (sorted by tag name). A series has one attribute set, so they are
  grouped by tag set: the tag part of the normalised path (`k=v;k2=v2`) is the key, since equal tag
  sets normalise to the same text. Only chunks with tagged points pay for this grouping.
"""

from __future__ import annotations

from itertools import repeat

from agent.model import LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, Series
from agent_plugins.graphite.protocol.tags import TaggedName


def graphite_series(
    paths: list[str],
    timestamps: list[int],
    values: list[float],
    tagged: dict[str, TaggedName],
) -> list[Series]:
    """The series for parallel columns of accepted points (timestamps in nanoseconds).

    `tagged` maps each normalised tagged path among `paths` to its parsed form (the `tagged` result of
    `parse_chunk` or `check_paths`). Points keep their order within each series; untagged points come
    first, then one series per tag set in order of first appearance. The lists may be used as they are.
    """
    if not paths:
        return []
    if not tagged:
        return [Series(paths, LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, {}, timestamps, values)]
    tag_set_of = {path: path.partition(";")[2] for path in tagged}
    keys = list(map(tag_set_of.get, paths, repeat("")))
    first_key = keys[0]
    if keys.count(first_key) == len(keys):
        # One tag set (or none) for the whole chunk: the columns are the series.
        return [_series(paths, timestamps, values, first_key, paths[0], tagged)]
    groups: dict[str, tuple[list[str], list[int], list[float], str]] = {}
    for key, path, timestamp, value in zip(keys, paths, timestamps, values, strict=True):
        group = groups.get(key)
        if group is None:
            group = groups[key] = ([], [], [], path)
        group[0].append(path)
        group[1].append(timestamp)
        group[2].append(value)
    # Untagged points (key "") first, so that a mostly untagged chunk reads naturally.
    ordered = sorted(groups.items(), key=lambda item: item[0] != "")
    return [
        _series(group_paths, group_timestamps, group_values, key, example, tagged)
        for key, (group_paths, group_timestamps, group_values, example) in ordered
    ]


def _series(
    paths: list[str],
    timestamps: list[int],
    values: list[float],
    key: str,
    example_path: str,
    tagged: dict[str, TaggedName],
) -> Series:
    # The parser's TaggedName objects live on in its per-connection cache: the attributes are a copy, so
    # that a transform changing a series' attributes in place cannot change later series. Sorted by tag
    # name, so that a tag set reads the same whatever order the sender wrote it in.
    attributes = dict(sorted(tagged[example_path].tags.items())) if key else {}
    return Series(paths, LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, attributes, timestamps, values)
