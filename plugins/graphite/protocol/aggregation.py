"""Aggregators for the `graphite-out` plugin, and a parser for carbon's aggregation-rules.conf.

Where it sits: after the blocklist and rewriters and before the routes (carbon-relay-ng's order; see
`routing.RoutingTable`). An `Aggregator` takes the points whose path matches its regex, groups them by
output name (the regex's groups put into `format`) and by time bucket (`ts - ts % interval`), and when the
caller's timer calls `flush(now)` it emits one point per output name for every bucket that is at least
`wait` seconds old (bucket start <= now - wait). A point for a bucket that was already flushed is late: it
is counted and dropped, never re-emitted. The caller routes the emitted points like any others. Pure code:
no clock, no I/O; timestamps are Graphite's, in seconds.

Functions: sum, avg, min, max, count, last (last point to arrive), delta (max - min), derive (value change
per second between the oldest and newest timestamp; no output for a single timestamp), stdev (population
standard deviation, as carbon-relay-ng) and the percentiles p25 ... p999. Percentiles interpolate linearly
between closest ranks exactly as carbon's aggregator does (rank = p * (n - 1)), which is also Python's
`statistics.quantiles(method="inclusive")`; carbon-relay-ng's own percentile code reads past the end of
its array for some inputs, so we do not follow it. NaN values are skipped and counted.

`parse_aggregation_rules` reads carbon's aggregation-rules.conf ("output_template (frequency) = method
input_pattern") into rules that convert to `AggregatorConfig`s. carbon re-emits a bucket every frequency
while points keep coming; here a rule's bucket is emitted once, `wait` seconds after it starts (two
frequencies unless told otherwise).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Literal, get_args

import msgspec

from agent.units import Duration

from .routing import GroupTemplate, compile_regex

logger = logging.getLogger(__name__)

AggregateFunction = Literal[
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "last",
    "delta",
    "derive",
    "stdev",
    "p25",
    "p50",
    "p75",
    "p80",
    "p90",
    "p95",
    "p99",
    "p999",
]
PERCENTILES: dict[str, float] = {
    "p25": 0.25,
    "p50": 0.50,
    "p75": 0.75,
    "p80": 0.80,
    "p90": 0.90,
    "p95": 0.95,
    "p99": 0.99,
    "p999": 0.999,
}
AGGREGATE_FUNCTIONS: tuple[str, ...] = get_args(AggregateFunction)
#: The methods carbon's aggregation-rules.conf accepts.
CARBON_METHODS: tuple[str, ...] = (
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "p50",
    "p75",
    "p80",
    "p90",
    "p95",
    "p99",
    "p999",
)

#: Paths whose output name is remembered per aggregator before the memo starts over.
DEFAULT_NAME_CACHE_SIZE = 100_000


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """carbon's percentile: linear interpolation at rank fraction * (n - 1) of sorted, non-empty values."""
    rank = fraction * (len(sorted_values) - 1)
    left = math.floor(rank)
    right = math.ceil(rank)
    if left == right:
        return float(sorted_values[left])
    return sorted_values[left] * (right - rank) + sorted_values[right] * (rank - left)


def aggregate(
    function: str, values: Sequence[float], timestamps: Sequence[int] | None = None
) -> float | None:
    """One aggregate of non-empty `values` (arrival order). derive needs the parallel `timestamps` and
    returns None when they are all equal; every other function always has a result."""
    if function == "sum":
        return math.fsum(values)
    if function == "avg":
        return math.fsum(values) / len(values)
    if function == "min":
        return float(min(values))
    if function == "max":
        return float(max(values))
    if function == "count":
        return float(len(values))
    if function == "last":
        return float(values[-1])
    if function == "delta":
        return float(max(values) - min(values))
    if function == "stdev":
        mean = math.fsum(values) / len(values)
        return math.sqrt(math.fsum((value - mean) ** 2 for value in values) / len(values))
    if function == "derive":
        if timestamps is None:
            raise ValueError("derive needs the timestamps of the values")
        # The first point seen wins among equal timestamps, as in carbon-relay-ng.
        oldest = min(range(len(values)), key=timestamps.__getitem__)
        newest = max(range(len(values)), key=timestamps.__getitem__)
        span = timestamps[newest] - timestamps[oldest]
        if span == 0:
            return None
        return (values[newest] - values[oldest]) / span
    fraction = PERCENTILES.get(function)
    if fraction is None:
        raise ValueError(
            f"unknown aggregation function {function!r}; expected one of {', '.join(AGGREGATE_FUNCTIONS)}"
        )
    return percentile(sorted(values), fraction)


class AggregatorConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One `[[plugins.graphite-out.aggregators]]` table (carbon-relay-ng's [[aggregation]]).

    Example: function = "sum", regex = '^servers\\.[^.]+\\.(cpu|mem)\\.used$', format = "servers.all.$1.used",
    interval = "10s", wait = "20s". `prefix` and `substr`, when set, are cheap tests a path must also pass
    (they spare the regex for most paths). `drop_raw` tells the caller not to route the matched inputs.
    """

    function: AggregateFunction
    regex: str
    format: str
    interval: Duration
    wait: Duration
    prefix: str = ""
    substr: str = ""
    drop_raw: bool = False

    def __post_init__(self) -> None:
        where = f"aggregator {self.format!r}"
        if self.function not in AGGREGATE_FUNCTIONS:
            raise ValueError(
                f"{where}: function: expected one of {', '.join(AGGREGATE_FUNCTIONS)}, got {self.function!r}"
            )
        if self.interval < 1 or self.interval != int(self.interval):
            raise ValueError(f"{where}: interval: must be a whole number of seconds, at least 1s")
        if self.wait < 0:
            raise ValueError(f"{where}: wait: must not be negative")
        pattern = compile_regex(self.regex, f"{where}: regex")
        GroupTemplate(self.format, pattern, f"{where}: format")


class AggregatedPoints(msgspec.Struct):
    """Points emitted by a flush, as parallel columns (timestamps are bucket starts, in seconds)."""

    paths: list[str]
    timestamps: list[int]
    values: list[float]

    def __len__(self) -> int:
        return len(self.paths)


_UNSEEN = object()


class Aggregator:
    """A running `AggregatorConfig`: `add` batches of points, `flush(now)` on a timer."""

    def __init__(self, config: AggregatorConfig, *, name_cache_size: int = DEFAULT_NAME_CACHE_SIZE) -> None:
        self.config = config
        where = f"aggregator {config.format!r}"
        self._pattern = compile_regex(config.regex, f"{where}: regex")
        self._template = GroupTemplate(config.format, self._pattern, f"{where}: format")
        self._interval = int(config.interval)
        self._wait = float(config.wait)
        self._keeps_timestamps = config.function == "derive"
        self._names: dict[str, str | None] = {}
        self._name_cache_size = max(1, name_cache_size)
        # bucket start -> output name -> values (or (timestamps, values) for derive), in arrival order.
        self._buckets: dict[int, dict[str, list]] = {}
        self._closed_through = -math.inf
        #: Points dropped because their bucket was already flushed, and NaN values skipped.
        self.late_points = 0
        self.nan_points = 0

    @property
    def pending(self) -> int:
        """Output points waiting for their bucket to be flushed."""
        return sum(len(names) for names in self._buckets.values())

    def _output_name(self, path: str) -> str | None:
        match = self._pattern.search(path)
        name = self._template.expand(match) if match else None
        if len(self._names) >= self._name_cache_size:
            self._names.clear()
        self._names[path] = name
        return name

    def add(
        self,
        paths: Sequence[str],
        timestamps: Sequence[float],
        values: Sequence[float],
        candidates: Sequence[int] | None = None,
    ) -> list[int]:
        """Feeds points (parallel columns; `candidates` limits which indexes). Returns the indexes whose path
        matched, late ones included, so that the caller can drop them from routing when `drop_raw` is set."""
        indexes: Sequence[int] = range(len(paths)) if candidates is None else candidates
        if self.config.prefix:
            prefix = self.config.prefix
            indexes = [i for i in indexes if paths[i].startswith(prefix)]
        if self.config.substr:
            substr = self.config.substr
            indexes = [i for i in indexes if substr in paths[i]]
        names_get = self._names.get
        output_name = self._output_name
        buckets = self._buckets
        interval = self._interval
        closed_through = self._closed_through
        keeps_timestamps = self._keeps_timestamps
        matched: list[int] = []
        for i in indexes:
            path = paths[i]
            name = names_get(path, _UNSEEN)
            if name is _UNSEEN:
                name = output_name(path)
            if name is None:
                continue
            matched.append(i)
            value = values[i]
            if value != value:
                self.nan_points += 1
                continue
            timestamp = int(timestamps[i])
            bucket = timestamp - timestamp % interval
            if bucket <= closed_through:
                self.late_points += 1
                continue
            by_name = buckets.get(bucket)
            if by_name is None:
                by_name = buckets[bucket] = {}
            state = by_name.get(name)  # type: ignore[arg-type]
            if state is None:
                state = by_name[name] = [[], []] if keeps_timestamps else []  # type: ignore[index]
            if keeps_timestamps:
                state[0].append(timestamp)
                state[1].append(value)
            else:
                state.append(value)
        return matched

    def flush(self, now: float) -> AggregatedPoints:
        """Emits every bucket that starts at or before now - wait; later points for them count as late."""
        threshold = now - self._wait
        out = AggregatedPoints([], [], [])
        function = self.config.function
        for bucket in sorted(bucket for bucket in self._buckets if bucket <= threshold):
            for name, state in self._buckets.pop(bucket).items():
                if self._keeps_timestamps:
                    result = aggregate(function, state[1], state[0])
                else:
                    result = aggregate(function, state)
                if result is None:
                    continue
                out.paths.append(name)
                out.timestamps.append(bucket)
                out.values.append(result)
        self._closed_through = max(self._closed_through, threshold)
        return out


# carbon's aggregation-rules.conf.


class AggregationRulesError(ValueError):
    """Every bad line of a rules file, one message per line ("file:12: ...")."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class AggregationRule(msgspec.Struct, frozen=True, kw_only=True):
    """One line of aggregation-rules.conf, with the regex and output format carbon would derive from it."""

    line_number: int
    output_template: str
    frequency: int
    method: str
    input_pattern: str
    #: The anchored regex built from input_pattern (<field> -> (?P<field>[^.]+?), <<field>> -> (?P<field>.+?),
    #: a lone * -> [^.]+, any other * -> [^.]*).
    regex: str
    #: output_template with ${field} references, for `AggregatorConfig.format`.
    format: str

    def to_aggregator_config(self, wait: float | None = None) -> AggregatorConfig:
        """The equivalent aggregator; `wait` defaults to two frequencies."""
        return AggregatorConfig(
            function=self.method,  # type: ignore[arg-type]  # a carbon method is an AggregateFunction
            regex=self.regex,
            format=self.format,
            interval=Duration(self.frequency),
            wait=Duration(2 * self.frequency if wait is None else wait),
        )


_PATTERN_TOKEN = re.compile(r"<<([^<>]*)>>|<([^<>]*)>|\*")


def input_pattern_regex(pattern: str) -> tuple[str, list[str]]:
    """carbon's input pattern -> (anchored regex, field names). Raises ValueError for a bad field name.

    Text around the fields is passed through as regex, as carbon does, so patterns written for carbon
    keep working; dots separate parts and match literally.
    """
    fields: list[str] = []
    parts = []
    for part in pattern.split("."):
        if part == "*":
            parts.append("[^.]+")
            continue
        pieces = []
        position = 0
        for token in _PATTERN_TOKEN.finditer(part):
            pieces.append(part[position : token.start()])
            position = token.end()
            if token.group(0) == "*":
                pieces.append("[^.]*")
                continue
            greedy_field, field = token.group(1), token.group(2)
            name = greedy_field if greedy_field is not None else field
            if not name.isidentifier():
                raise ValueError(
                    f"field name {name!r} must be letters, digits and '_', not starting with a digit"
                )
            fields.append(name)
            pieces.append(f"(?P<{name}>.+?)" if greedy_field is not None else f"(?P<{name}>[^.]+?)")
        pieces.append(part[position:])
        parts.append("".join(pieces))
    return "^" + "\\.".join(parts) + "$", fields


_OUTPUT_FIELD = re.compile(r"<<([^<>]*)>>|<([^<>]*)>")


def _output_format(template: str, fields: list[str]) -> str:
    pieces = []
    position = 0
    for token in _OUTPUT_FIELD.finditer(template):
        pieces.append(template[position : token.start()].replace("$", "$$"))
        position = token.end()
        name = token.group(1) if token.group(1) is not None else token.group(2)
        if name not in fields:
            raise ValueError(f"output field <{name}> does not appear in the input pattern")
        pieces.append(f"${{{name}}}")
    pieces.append(template[position:].replace("$", "$$"))
    return "".join(pieces)


def parse_aggregation_rule(line: str, line_number: int = 1) -> AggregationRule:
    """Parses one rule line. Raises ValueError saying what is wrong (without the location)."""
    left, equals, right = line.partition("=")
    if not equals:
        raise ValueError("expected 'output_template (frequency) = method input_pattern'")
    left_fields, right_fields = left.split(), right.split()
    if len(left_fields) != 2:
        raise ValueError("left of '=' should be 'output_template (frequency)'")
    if len(right_fields) != 2:
        raise ValueError("right of '=' should be 'method input_pattern'")
    output_template, frequency_text = left_fields
    method, input_pattern = right_fields
    frequency_digits = frequency_text.lstrip("(").rstrip(")")
    if not frequency_digits.isdigit() or int(frequency_digits) < 1:
        raise ValueError(f"frequency should be a whole number of seconds like (60), got {frequency_text!r}")
    if method not in CARBON_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(CARBON_METHODS)}")
    regex, fields = input_pattern_regex(input_pattern)
    compile_regex(regex, f"input pattern {input_pattern!r}")
    return AggregationRule(
        line_number=line_number,
        output_template=output_template,
        frequency=int(frequency_digits),
        method=method,
        input_pattern=input_pattern,
        regex=regex,
        format=_output_format(output_template, fields),
    )


def parse_aggregation_rules(text: str, source: str = "aggregation-rules.conf") -> list[AggregationRule]:
    """Parses a whole rules file; blank lines and lines starting with # are skipped.

    Raises AggregationRulesError listing every bad line as "source:line: problem: 'the line'", so the
    caller can log them all and keep its previous rules.
    """
    rules = []
    errors = []
    for line_number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            rules.append(parse_aggregation_rule(line, line_number))
        except ValueError as error:
            errors.append(f"{source}:{line_number}: {error}: {line!r}")
    if errors:
        raise AggregationRulesError(errors)
    return rules
