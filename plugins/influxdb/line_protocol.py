"""Batches as InfluxDB line protocol: measurement = metric name, tags = resource, consumer and string
attributes, fields = `value` and the numeric and boolean attributes, timestamps in nanoseconds.

    cpu_percent,consumer_kind=local_machine,resource_id=3,resource_kind=cpu_core value=12.5 1780000000000000000

Pure code, so that the encoding is tested (with hypothesis) without a server. What line protocol cannot
carry is left out and counted, never sent broken: NaN and infinite values (no literal exists), empty tag
values (an empty tag is no tag), line breaks (replaced by spaces: one point is one line).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from agent import Batch, Series, ValueType

#: Tags from the point's resource and consumer, left out when empty.
RESOURCE_TAGS = ("resource_kind", "resource_id", "consumer_kind", "consumer_id")

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _escaper(specials: str) -> Callable[[str], str]:
    table = {ord(c): "\\" + c for c in specials}
    table[ord("\n")] = " "
    table[ord("\r")] = " "

    def escape(text: str) -> str:
        return text.translate(table)

    return escape


escape_measurement = _escaper(", ")
escape_key = _escaper(",= ")  # tag keys, tag values and field keys


def escape_string_field(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ").replace("\r", " ") + '"'


def _field_value(value: bool | int | float, as_int: bool) -> str | None:
    """The field literal, or None for what line protocol cannot carry (NaN, infinities)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if as_int and _INT64_MIN <= value <= _INT64_MAX:
            return f"{value}i"
        value = float(value) if abs(value) < 2**1023 else math.inf
    if math.isnan(value) or math.isinf(value):
        return None
    return repr(value)


def _escape_measurement(name: str) -> str:
    # A measurement may not start with '#' (a comment line) nor be empty.
    text = escape_measurement(name) or "_"
    return "_" + text if text[0] == "#" else text


def _all_finite(values: list[int | float]) -> bool:
    """True when every value is finite (their sum is finite only then, unless it overflowed: False
    then, and the per-point path decides)."""
    try:
        return math.isfinite(sum(values))
    except (OverflowError, TypeError):
        return False


@dataclass
class Encoded:
    body: bytes
    points: int
    skipped: int  # values line protocol cannot carry (NaN, infinities)


def series_prefix_parts(series: Series) -> tuple[str, str]:
    """(tags with their leading comma, extra fields with their leading comma) of a series."""
    tags: dict[str, str] = {}
    for name, value in zip(
        RESOURCE_TAGS,
        (series.resource.kind, series.resource.id, series.consumer.kind, series.consumer.id),
        strict=True,
    ):
        if value:
            tags[name] = value
    fields: list[str] = []
    for key, value in series.attributes.items():
        if isinstance(value, str):
            if value and key:
                tags[key if key not in RESOURCE_TAGS else f"attr_{key}"] = value
            continue
        literal = _field_value(value, isinstance(value, int))
        if literal is not None and key:
            field_key = key if key != "value" else "attr_value"
            fields.append(f"{escape_key(field_key)}={literal}")
    tag_text = "".join(f",{escape_key(k)}={escape_key(v)}" for k, v in sorted(tags.items()) if escape_key(v))
    field_text = "".join("," + f for f in fields)
    return tag_text, field_text


def encode(batches: Iterable[Batch], value_type: Callable[[str], ValueType | None]) -> Encoded:
    """Line protocol for every point of the batches. `value_type(name)` says whether a metric's values
    are integers ("int": written as `123i`) or floats; InfluxDB refuses a field whose type changes, so an
    unknown metric is written as float."""
    lines: list[str] = []
    skipped = 0
    types: dict[str, bool] = {}
    for batch in batches:
        for series in batch.series:
            if not series.timestamps:
                continue
            tags, extra = series_prefix_parts(series)
            if isinstance(series.metric, str):
                name = series.metric
                as_int = types.get(name)
                if as_int is None:
                    as_int = types[name] = value_type(name) == "int"
                # The common case in one comprehension: float values that are all finite.
                if not as_int and _all_finite(series.values):
                    head = f"{_escape_measurement(name)}{tags} value="
                    lines.extend([f"{head}{float(v)!r}{extra} {t}" for v, t in zip(series.values, series.timestamps, strict=True)])
                    continue
            names = [series.metric] * len(series.timestamps) if isinstance(series.metric, str) else series.metric
            for name, timestamp, value in zip(names, series.timestamps, series.values, strict=True):
                as_int = types.get(name)
                if as_int is None:
                    as_int = types[name] = value_type(name) == "int"
                literal = _field_value(value, as_int)
                if literal is None:
                    skipped += 1
                    continue
                lines.append(f"{_escape_measurement(name)}{tags} value={literal}{extra} {timestamp}")
    body = ("\n".join(lines) + "\n").encode("utf-8", "replace") if lines else b""
    return Encoded(body, len(lines), skipped)
