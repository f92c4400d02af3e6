"""CSV text for the csv output: the header, field quoting, RFC 3339 timestamps and the rows of a batch.

Pure code, no I/O: `plugin.py` hands the text to the file. The console output uses the timestamp
formatter too.

Row layout (one point per row, fields quoted as in RFC 4180 with the configured separator):

    metric;timestamp;value;resource_kind;resource_id;consumer_kind;consumer_id;attributes

The attributes are one field, `key=value` pairs joined by `,` (a `\\`, `,` or `=` inside a key or a
value is escaped with a backslash), so the header never changes and a file can be appended to by any
later run, whatever attributes its points carry.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from agent.model import Batch

COLUMNS = (
    "metric",
    "timestamp",
    "value",
    "resource_kind",
    "resource_id",
    "consumer_kind",
    "consumer_id",
    "attributes",
)

_NS_PER_S = 1_000_000_000


def header(separator: str) -> str:
    return separator.join(COLUMNS) + "\n"


def needs_quotes(text: str, separator: str) -> bool:
    return separator in text or '"' in text or "\n" in text or "\r" in text


def quote_field(text: str, separator: str) -> str:
    """Quotes a field that contains the separator, a quote or a line break (RFC 4180)."""
    if needs_quotes(text, separator):
        return '"' + text.replace('"', '""') + '"'
    return text


def _escape_attribute_part(text: str) -> str:
    if "\\" in text or "," in text or "=" in text:
        return text.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=")
    return text


def attribute_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def format_attributes(attributes: Mapping[str, Any]) -> str:
    """`k=v,k2=v2` in the series' order (unquoted: the caller quotes the whole field)."""
    return ",".join(
        f"{_escape_attribute_part(str(k))}={_escape_attribute_part(attribute_text(v))}"
        for k, v in attributes.items()
    )


class TimestampFormatter:
    """Formats nanosecond timestamps as RFC 3339 UTC with nine fractional digits:
    `2026-11-22T02:14:39.123456789Z`.

    The points of a batch fall into few distinct seconds, so the date and time part is computed once
    per second and cached; what is left per point is a divmod and a string concatenation.
    """

    __slots__ = ("_seconds",)

    #: The cache is cleared beyond this many seconds, so a long run does not grow it forever.
    MAX_CACHED_SECONDS = 4096

    def __init__(self) -> None:
        self._seconds: dict[int, str] = {}

    def _second(self, seconds: int) -> str:
        text = self._seconds.get(seconds)
        if text is None:
            if len(self._seconds) >= self.MAX_CACHED_SECONDS:
                self._seconds.clear()
            text = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(seconds))
            self._seconds[seconds] = text
        return text

    def format(self, timestamp_ns: int) -> str:
        seconds, nanos = divmod(timestamp_ns, _NS_PER_S)
        return f"{self._second(seconds)}{nanos:09d}Z"

    def format_many(self, timestamps: Iterable[int]) -> list[str]:
        cache = self._seconds
        second = self._second
        out = []
        append = out.append
        for ts in timestamps:
            seconds, nanos = divmod(ts, _NS_PER_S)
            prefix = cache.get(seconds) or second(seconds)
            append(f"{prefix}{nanos:09d}Z")
        return out


def format_batches(batches: Iterable[Batch], separator: str, timestamps: TimestampFormatter) -> str:
    """The rows of every point of `batches`, each ending with a newline.

    Per series, the fields that do not change (resource, consumer, attributes, and the metric when the
    series has one name) are formatted once; the per-point work is the timestamp and one C-level join.
    """
    sep = separator
    parts: list[str] = []
    for batch in batches:
        for series in batch.series:
            if not series.timestamps:
                continue
            resource, consumer = series.resource, series.consumer
            tail = (
                sep.join(
                    (
                        quote_field(resource.kind, sep),
                        quote_field(resource.id, sep),
                        quote_field(consumer.kind, sep),
                        quote_field(consumer.id, sep),
                        quote_field(format_attributes(series.attributes), sep) if series.attributes else "",
                    )
                )
                + "\n"
            )
            stamps = timestamps.format_many(series.timestamps)
            values = map(str, series.values)  # str(float) is repr: the shortest exact form
            metric = series.metric
            if isinstance(metric, str):
                prefix = quote_field(metric, sep) + sep
                suffix = sep + tail
                parts.append(prefix)
                parts.append((suffix + prefix).join(map(sep.join, zip(stamps, values, strict=True))))
                parts.append(suffix)
            else:
                # One name per point (Graphite paths): check them all at once, quote only if needed.
                names = metric
                joined = "\n".join(names)
                if sep in joined or '"' in joined or "\r" in joined or joined.count("\n") != len(names) - 1:
                    names = [quote_field(n, sep) for n in names]
                parts.append(
                    "".join(map(sep.join, zip(names, stamps, values, (tail,) * len(names), strict=True)))
                )
    return "".join(parts)
