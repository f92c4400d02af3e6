"""The latest value of every series, and its rendering in Prometheus' text format and OpenMetrics.

Pure code (no I/O), so that the formats are tested without a server:

- `sanitize_metric_name` / `sanitize_label_name`: Prometheus' name rules (`[a-zA-Z_:][a-zA-Z0-9_:]*`
  for metrics without the ':' that recording rules own, `[a-zA-Z_][a-zA-Z0-9_]*` for labels, `__`
  reserved); every other character becomes `_`.
- `SeriesStore`: the latest sample per (family, label set), with the time it was last updated, so that
  series not updated for `expire_after` leave the exposition.
- `render`: text format 0.0.4 (`# HELP`, `# TYPE`, samples, timestamps in milliseconds) or OpenMetrics
  1.0.0 (counters as families without `_total`, timestamps in seconds, `# EOF`).
- `negotiate`: which of the two the `Accept` header asks for.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from agent import AttributeValue, MetricDef, Series

Format = Literal["text", "openmetrics"]

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"

#: Labels every series may carry, from the point's resource and consumer (left out when empty).
RESOURCE_LABELS = ("resource_kind", "resource_id", "consumer_kind", "consumer_id")
#: Beyond these, a series is refused (logged): a scrape is no place for a thousand labels.
MAX_LABELS = 64
MAX_LABEL_VALUE_CHARS = 4096

_METRIC_BAD = re.compile(r"[^a-zA-Z0-9_]")
_LABEL_BAD = re.compile(r"[^a-zA-Z0-9_]")


def sanitize_metric_name(name: str) -> str:
    """A valid Prometheus metric name: characters outside [a-zA-Z0-9_] become '_', and a leading digit
    gets a '_' in front. (':' is valid but reserved for recording rules, so it becomes '_' too.)"""
    clean = _METRIC_BAD.sub("_", name)
    if not clean or clean[0].isdigit():
        clean = "_" + clean
    return clean


def sanitize_label_name(name: str) -> str:
    """A valid label name that does not use the reserved `__` prefix."""
    clean = _LABEL_BAD.sub("_", name)
    if not clean or clean[0].isdigit():
        clean = "_" + clean
    if clean.startswith("__"):
        clean = "_" + clean.lstrip("_")
        if clean == "_":
            clean = "_label"
    return clean


def _label_value(value: AttributeValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str, fmt: Format) -> str:
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if fmt == "openmetrics" else text


def format_value(value: int | float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class RefusedSeries(ValueError):
    """A series that cannot be exposed; str() says why, for one log line."""


def series_labels(series: Series) -> tuple[tuple[str, str], ...]:
    """The sorted label pairs of a series: resource and consumer (empty ones left out), then its
    attributes with sanitised names. An attribute whose name collides with another label is renamed
    `attr_NAME`. Raises RefusedSeries for too many labels or a value too long."""
    labels: dict[str, str] = {}
    for name, value in zip(
        RESOURCE_LABELS,
        (series.resource.kind, series.resource.id, series.consumer.kind, series.consumer.id),
        strict=True,
    ):
        if value:
            labels[name] = value
    if len(series.attributes) + len(labels) > MAX_LABELS:
        raise RefusedSeries(f"{len(series.attributes) + len(labels)} labels (at most {MAX_LABELS})")
    for key, raw in series.attributes.items():
        name = sanitize_label_name(key)
        if name in labels:
            name = sanitize_label_name(f"attr_{name}")
        value = _label_value(raw)
        if len(value) > MAX_LABEL_VALUE_CHARS:
            raise RefusedSeries(f"the value of attribute {key!r} has {len(value)} characters (at most {MAX_LABEL_VALUE_CHARS})")
        if value:  # an empty label value means "no label" to Prometheus
            labels[name] = value
    return tuple(sorted(labels.items()))


@dataclass
class Family:
    """One exposed metric: its sanitised name, type, help text and series."""

    name: str  # the base name; counters are exposed as NAME_total
    counter: bool
    description: str
    unit: str  # UCUM, "" when dimensionless or unknown
    metric: str  # the name as the agent knows it
    # label pairs -> (value, timestamp in ns, last update on the trio clock)
    samples: dict[tuple[tuple[str, str], ...], tuple[int | float, int, float]] = field(default_factory=dict)
    origins: set[str] = field(default_factory=set)


class SeriesStore:
    """The latest sample of every series, by family."""

    def __init__(self, counters: Iterable[str] = ()) -> None:
        self.families: dict[str, Family] = {}
        self.declared_counters = set(counters)

    def family_of(self, metric: str, definition: MetricDef | None) -> Family:
        counter = metric.endswith("_total") or metric in self.declared_counters
        base = sanitize_metric_name(metric)
        if counter and base.endswith("_total"):
            base = base[: -len("_total")] or "_"
        family = self.families.get(base)
        if family is None:
            description = definition.description.strip() if definition else ""
            unit = definition.unit if definition and definition.unit not in ("", "1") else ""
            family = Family(base, counter, description, unit, metric)
            self.families[base] = family
        return family

    def update(self, metric: str, definition: MetricDef | None, labels: tuple[tuple[str, str], ...], value: int | float, timestamp_ns: int, now: float) -> None:
        family = self.family_of(metric, definition)
        previous = family.samples.get(labels)
        # Points of one series can arrive out of order (a relay client catching up): keep the newest.
        if previous is None or timestamp_ns >= previous[1]:
            family.samples[labels] = (value, timestamp_ns, now)
        for name, label_value in labels:
            if name == "relay_client":
                family.origins.add(label_value)

    def expire(self, now: float, expire_after: float) -> int:
        """Forgets series not updated for `expire_after` seconds (0: never). Returns how many."""
        if expire_after <= 0:
            return 0
        limit = now - expire_after
        removed = 0
        for name in list(self.families):
            family = self.families[name]
            stale = [labels for labels, (_, _, seen) in family.samples.items() if seen < limit]
            for labels in stale:
                del family.samples[labels]
            removed += len(stale)
            if not family.samples:
                del self.families[name]
        return removed

    def __len__(self) -> int:
        return sum(len(f.samples) for f in self.families.values())


def help_text(family: Family) -> str:
    """The metric's description; without one, what is known of it: its name, unit and where it came
    from (promtool refuses an empty HELP)."""
    if family.origins:
        shown = sorted(family.origins)
        origin = f"from relay clients {', '.join(shown[:5])}{', ...' if len(shown) > 5 else ''}"
    else:
        origin = "measured by this agent"
    if family.description:
        return f"{family.description} ({origin})" if family.origins else family.description
    unit = f" in {family.unit}" if family.unit else ""
    return f"{family.metric}{unit} ({origin})"


def render(store: SeriesStore, fmt: Format, *, timestamps: bool = False) -> str:
    lines: list[str] = []
    for base in sorted(store.families):
        family = store.families[base]
        if not family.samples:
            continue
        kind = "counter" if family.counter else "gauge"
        sample_name = f"{base}_total" if family.counter else base
        # In the text format the counter family is named like its samples (NAME_total); OpenMetrics
        # names the family without the suffix.
        family_name = base if fmt == "openmetrics" else sample_name
        lines.append(f"# HELP {family_name} {escape_help(help_text(family), fmt)}")
        lines.append(f"# TYPE {family_name} {kind}")
        for labels in sorted(family.samples):
            value, timestamp_ns, _ = family.samples[labels]
            label_text = ",".join(f'{n}="{escape_label_value(v)}"' for n, v in labels)
            line = f"{sample_name}{{{label_text}}} {format_value(value)}" if labels else f"{sample_name} {format_value(value)}"
            if timestamps:
                if fmt == "openmetrics":
                    line += f" {timestamp_ns // 1_000_000 / 1000:.3f}"
                else:
                    line += f" {timestamp_ns // 1_000_000}"
            lines.append(line)
    if fmt == "openmetrics":
        lines.append("# EOF")
    return "\n".join(lines) + "\n" if lines else ""


def negotiate(accept: str) -> Format:
    """OpenMetrics 1.0.0 when the Accept header prefers it (as Prometheus does), else the text format."""
    best: tuple[float, int, Format] | None = None
    for position, part in enumerate(accept.split(",")):
        fields = [f.strip() for f in part.split(";")]
        media = fields[0].lower()
        params = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
        try:
            q = float(params.get("q", "1"))
        except ValueError:
            q = 0.0
        if q <= 0:
            continue
        if media == "application/openmetrics-text" and params.get("version", "1.0.0") in ("1.0.0", "0.0.1"):
            fmt: Format = "openmetrics"
        elif media in ("text/plain", "*/*", "text/*"):
            fmt = "text"
        else:
            continue
        candidate = (q, -position, fmt)
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    return best[2] if best else "text"
