"""The recent bad lines registry graphite-in fills and graphite-out's admin API shows."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from agent_plugins.graphite.protocol.badlines import RecentBadLines, find_recent_bad_lines


def test_keeps_the_newest_lines_and_counts_every_reason():
    recent = RecentBadLines(max_entries=3)
    for i in range(5):
        recent.record(
            "10.0.0.1:5000", "field_count: expected 3 fields", f"bad line {i}".encode(), when=float(i)
        )
    recent.record("10.0.0.2:5001", "bad_value", "a.b x 1", when=9.0)
    kept = recent.snapshot()
    assert [r.line for r in kept] == ["bad line 3", "bad line 4", "a.b x 1"]
    assert kept[-1].peer == "10.0.0.2:5001" and kept[-1].time == 9.0
    assert recent.counts == {"field_count": 5, "bad_value": 1}


def test_lines_are_cut_and_invalid_utf8_is_escaped():
    recent = RecentBadLines(max_line_chars=10)
    recent.record("p", "bad_chars", b"\xff\xfeabc" + b"x" * 100)
    (record,) = recent.snapshot()
    assert record.line == "\\xff\\xfeab..."


def test_find_recent_bad_lines_in_pipeline_elements():
    @dataclass
    class Element:
        obj: object

    class Source:
        def __init__(self) -> None:
            self.recent_bad_lines = RecentBadLines()

    a, b = Source(), Source()
    found = find_recent_bad_lines([Element(a), Element(object()), Element(b), b])
    assert found == [a.recent_bad_lines, b.recent_bad_lines]


def test_max_entries_must_be_positive():
    with pytest.raises(ValueError, match="max_entries"):
        RecentBadLines(max_entries=0)
