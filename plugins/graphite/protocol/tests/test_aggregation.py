"""Aggregators emit the right points at the right time, and carbon's aggregation-rules.conf reads as carbon
reads it."""

from __future__ import annotations

import math
import re
import statistics

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.units import Duration, decode_config_value
from agent_plugins.graphite.protocol.aggregation import (
    AGGREGATE_FUNCTIONS,
    CARBON_METHODS,
    AggregationRulesError,
    Aggregator,
    AggregatorConfig,
    aggregate,
    input_pattern_regex,
    parse_aggregation_rules,
)


def aggregator(**fields) -> Aggregator:
    return Aggregator(msgspec.convert(fields, AggregatorConfig, dec_hook=decode_config_value))


def emitted(points) -> list[tuple[str, int, float]]:
    return list(zip(points.paths, points.timestamps, points.values, strict=True))


# Aggregator timing and naming.


def test_points_are_bucketed_named_from_groups_and_flushed_after_wait():
    agg = aggregator(
        function="sum",
        regex=r"^servers\.[^.]+\.(cpu|mem)\.used$",
        format="servers.all.$1.used",
        interval="10s",
        wait="20s",
    )
    paths = ["servers.a.cpu.used", "servers.b.cpu.used", "servers.a.mem.used", "servers.a.disk.used"]
    matched = agg.add(paths, [1000, 1009, 1005, 1000], [1.0, 2.0, 3.0, 4.0])
    assert matched == [0, 1, 2]
    agg.add(paths[:1], [1010], [10.0])

    assert emitted(agg.flush(1019)) == []  # 1000 > 1019 - 20: still waiting
    assert emitted(agg.flush(1020)) == [
        ("servers.all.cpu.used", 1000, 3.0),
        ("servers.all.mem.used", 1000, 3.0),
    ]
    assert agg.pending == 1
    assert emitted(agg.flush(1030)) == [("servers.all.cpu.used", 1010, 10.0)]
    assert emitted(agg.flush(2000)) == []


def test_points_for_a_flushed_bucket_are_late_and_dropped():
    agg = aggregator(function="count", regex="^a", format="count", interval=60, wait=60)
    agg.add(["a.1", "a.2"], [120, 150], [1, 1])
    assert emitted(agg.flush(180)) == [("count", 120, 2.0)]
    assert agg.add(["a.3", "a.4"], [179, 180], [1, 1]) == [0, 1]
    assert agg.late_points == 1
    assert emitted(agg.flush(240)) == [("count", 180, 1.0)]


@pytest.mark.parametrize("template", ["hosts.$1.${2}", "hosts.${1}.$2", "hosts.\\1.\\2", "hosts.${h}.$m"])
def test_output_names_accept_every_group_spelling(template):
    agg = aggregator(function="max", regex=r"^(?P<h>\w+)\.(?P<m>\w+)$", format=template, interval=1, wait=0)
    agg.add(["web.cpu", "web.cpu", "db.mem"], [5, 5, 5], [3, 7, 1])
    assert emitted(agg.flush(5)) == [("hosts.web.cpu", 5, 7.0), ("hosts.db.mem", 5, 1.0)]


def test_prefilters_candidates_and_nan():
    agg = aggregator(
        function="avg", regex="value$", format="avg", interval=10, wait=0, prefix="app.", substr=".x."
    )
    paths = ["app.x.value", "app.y.value", "other.x.value", "app.x.value", "app.x.value"]
    assert agg.add(paths, [10] * 5, [1.0, 100.0, 100.0, float("nan"), 3.0], candidates=[0, 1, 2, 3]) == [0, 3]
    assert agg.nan_points == 1
    assert emitted(agg.flush(10)) == [("avg", 10, 1.0)]


def test_derive_needs_two_timestamps():
    agg = aggregator(function="derive", regex="^c$", format="rate", interval=60, wait=0)
    agg.add(["c", "c", "c"], [60, 70, 90], [100.0, 130.0, 160.0])
    agg.add(["c"], [125], [5.0])
    assert emitted(agg.flush(1000)) == [("rate", 60, 2.0)]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"regex": "("}, r"aggregator 'out': regex: invalid regular expression"),
        ({"format": "out.$2"}, "uses group 2 but the regular expression"),
        ({"interval": "1.5s"}, "interval: must be a whole number of seconds"),
        ({"interval": 0}, "interval: must be a whole number of seconds"),
        ({"wait": -1}, "wait: must not be negative"),
        ({"function": "median"}, "Invalid enum value 'median'"),
        ({"regex": "x", "lol": 1}, "unknown field `lol`"),
    ],
)
def test_bad_aggregator_configs_say_what_is_wrong(fields, message):
    config = {"function": "sum", "regex": "^(a)", "format": "out", "interval": 10, "wait": 10} | fields
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.convert(config, AggregatorConfig, dec_hook=decode_config_value)


# Functions against Python's statistics.

values_lists = st.lists(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False), min_size=2, max_size=60
)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


@given(values_lists)
def test_functions_equal_pythons_statistics(values):
    assert close(aggregate("sum", values), math.fsum(values))
    assert close(aggregate("avg", values), statistics.fmean(values))
    assert aggregate("min", values) == min(values) and aggregate("max", values) == max(values)
    assert aggregate("count", values) == len(values)
    assert aggregate("last", values) == values[-1]
    assert aggregate("delta", values) == max(values) - min(values)
    assert close(aggregate("stdev", values), statistics.pstdev(values))
    for name, n, k in [("p25", 4, 0), ("p50", 2, 0), ("p75", 4, 2), ("p80", 5, 3), ("p90", 10, 8)]:
        assert close(aggregate(name, values), statistics.quantiles(values, n=n, method="inclusive")[k]), name
    for name, n, k in [("p95", 20, 18), ("p99", 100, 98), ("p999", 1000, 998)]:
        assert close(aggregate(name, values), statistics.quantiles(values, n=n, method="inclusive")[k]), name


@given(values_lists, st.sampled_from(AGGREGATE_FUNCTIONS))
def test_an_aggregator_emits_the_function_of_its_bucket(values, function):
    agg = aggregator(function=function, regex="^in$", format="out", interval=100, wait=0)
    timestamps = [1000 + i % 100 for i in range(len(values))]
    agg.add(["in"] * len(values), timestamps, values)
    expected = aggregate(function, values, timestamps)
    points = emitted(agg.flush(1100))
    assert points == ([] if expected is None else [("out", 1000, expected)])


def test_single_values_and_percentile_edges():
    assert aggregate("p50", [7]) == 7.0
    assert aggregate("p999", [1, 2]) == pytest.approx(1.999)
    assert aggregate("stdev", [5]) == 0.0
    assert aggregate("derive", [1.0], [10]) is None


# carbon's aggregation-rules.conf.

RULES = """
# Aggregate requests over all hosts of an app.
<env>.applications.<app>.all.requests (60) = sum <env>.applications.<app>.*.requests

<env>.applications.<app>.all.latency (60) = avg <env>.applications.<app>.*.latency
   # indented comment
stats.<<path>>.p95 (10) = p95 raw.<<path>>.timer
"""


def test_rules_parse_into_carbons_regexes_and_templates():
    first, second, third = parse_aggregation_rules(RULES)
    assert (first.line_number, first.frequency, first.method) == (3, 60, "sum")
    assert first.regex == r"^(?P<env>[^.]+?)\.applications\.(?P<app>[^.]+?)\.[^.]+\.requests$"
    assert first.format == "${env}.applications.${app}.all.requests"
    assert second.method == "avg" and second.line_number == 5
    assert third.regex == r"^raw\.(?P<path>.+?)\.timer$"
    assert third.format == "stats.${path}.p95"


def test_a_rule_aggregates_like_carbon_aggregator():
    rule = parse_aggregation_rules(RULES)[0]
    agg = Aggregator(rule.to_aggregator_config())
    assert agg.config.interval == Duration(60) and agg.config.wait == Duration(120)
    paths = [
        "prod.applications.apache.www01.requests",
        "prod.applications.apache.www02.requests",
        "prod.applications.apache.www02.latency",
        "prod.applications.apache..requests",
    ]
    assert agg.add(paths, [600, 630, 630, 600], [3, 4, 100, 5]) == [0, 1]
    assert emitted(agg.flush(720)) == [("prod.applications.apache.all.requests", 600, 7.0)]


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        ("a.*.c", ["a.b.c", "a.bb.c"], ["a..c", "a.b.b.c", "xa.b.c", "a.b.cx"]),
        ("a.b*.c", ["a.b.c", "a.bxy.c"], ["a.xb.c", "a.b.d.c"]),
        ("a.<x>.c", ["a.b.c"], ["a.b.d.c", "a..c"]),
        ("a.<<x>>.c", ["a.b.c", "a.b.d.c"], ["a..c", "a.c"]),
        ("a.pre<x>post.c", ["a.preXpost.c"], ["a.prepost.c"]),
    ],
)
def test_pattern_wildcards_follow_carbon(pattern, matches, misses):
    regex = re.compile(input_pattern_regex(pattern)[0])
    assert all(regex.match(path) for path in matches)
    assert not any(regex.match(path) for path in misses)


segment = st.text(alphabet="abcxyz019_-", min_size=1, max_size=8)


@given(st.lists(segment, min_size=2, max_size=6), st.data())
def test_a_field_captures_exactly_its_segment(segments, data):
    position = data.draw(st.integers(0, len(segments) - 1))
    pattern = ".".join("<field>" if i == position else re.escape(s) for i, s in enumerate(segments))
    regex, fields = input_pattern_regex(pattern)
    assert fields == ["field"]
    found = re.match(regex, ".".join(segments))
    assert found and found.group("field") == segments[position]
    assert not re.match(regex, ".".join(segments) + ".extra")


def test_every_bad_line_is_reported_with_its_number():
    text = "\n".join(
        [
            "ok.<a> (60) = sum in.<a>.x",
            "no equals sign here",
            "out (sixty) = sum in.x",
            "out (60) = median in.x",
            "out.<b> (60) = sum in.<a>",
            "out (60) = sum in.<a>.<a>",
            "out (60) = sum in.<bad-name>",
            "out extra (60) = sum in.x",
            "out (60) = sum in.x trailing",
        ]
    )
    with pytest.raises(AggregationRulesError) as caught:
        parse_aggregation_rules(text, source="/etc/carbon/aggregation-rules.conf")
    errors = caught.value.errors
    assert [int(error.split(":")[1]) for error in errors] == [2, 3, 4, 5, 6, 7, 8, 9]
    assert errors[0].startswith("/etc/carbon/aggregation-rules.conf:2: expected 'output_template (frequency)")
    assert "frequency should be a whole number of seconds like (60), got '(sixty)'" in errors[1]
    assert f"unknown method 'median'; expected one of {', '.join(CARBON_METHODS)}" in errors[2]
    assert "output field <b> does not appear in the input pattern" in errors[3]
    assert "invalid regular expression" in errors[4]
    assert "field name 'bad-name'" in errors[5]
    assert all("\n" not in error for error in errors)
