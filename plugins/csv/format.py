"""CSV text for the csv output: the header, field quoting, RFC 3339 timestamps and the rows of a batch.

Pure code, no I/O: `plugin.py` hands the text to the file. Timestamps and attribute values are
formatted by `agent.formatting`, as in the console output.

Row layout (one point per row, fields quoted as in RFC 4180 with the configured separator):

    metric;timestamp;value;resource_kind;resource_id;consumer_kind;consumer_id;attributes

The attributes are one field, `key=value` pairs joined by `,` (a `\\`, `,` or `=` inside a key or a
value is escaped with a backslash), so the header never changes and a file can be appended to by any
later run, whatever attributes its points carry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from agent.formatting import TimestampFormatter, attribute_text
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


def format_attributes(attributes: Mapping[str, Any]) -> str:
    """`k=v,k2=v2` in the series' order (unquoted: the caller quotes the whole field)."""
    return ",".join(
        f"{_escape_attribute_part(str(k))}={_escape_attribute_part(attribute_text(v))}"
        for k, v in attributes.items()
    )


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
