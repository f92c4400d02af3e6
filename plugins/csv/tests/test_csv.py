"""The csv output: exact file contents, quoting, appending, and when rows reach the file."""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import TimestampFormatter
from agent.config import ConfigError, convert_section
from agent.model import Batch, Consumer, MetricRegistry, Resource, Series
from agent.pipeline import Pipeline
from agent.plugin import StartContext
from agent.testing import make_batch, make_series, output_element, run_output
from agent_plugins.csv.format import format_attributes, format_batches
from agent_plugins.csv.plugin import CsvConfig, CsvOutput, CsvPlugin

HEADER = "metric;timestamp;value;resource_kind;resource_id;consumer_kind;consumer_id;attributes\n"
# 2026-11-22T02:14:39.123456789Z
T0 = 1_795_313_679_123_456_789


def test_timestamps_are_rfc3339_utc_with_nanoseconds() -> None:
    fmt = TimestampFormatter()
    assert fmt.format(T0) == "2026-11-22T02:14:39.123456789Z"
    assert fmt.format_many([T0, T0 + 1, T0 + 876_543_211, 0]) == [
        "2026-11-22T02:14:39.123456789Z",
        "2026-11-22T02:14:39.123456790Z",
        "2026-11-22T02:14:40.000000000Z",
        "1970-01-01T00:00:00.000000000Z",
    ]


async def test_rows_exact(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    batch = make_batch(
        make_series(
            "cpu_percent",
            [12.5, 0.1],
            timestamps=[T0, T0 + 1_000_000_000],
            resource=Resource("cpu_core", "0"),
        ),
        make_series(
            "process_memory_rss",
            [123456789012],
            timestamps=[T0],
            consumer=Consumer("process", "4242"),
            attributes={"name": "python3", "busy": True},
        ),
    )
    counters = await run_output(CsvOutput(path), [batch])
    assert counters["written"] == 3
    assert path.read_text() == HEADER + (
        "cpu_percent;2026-11-22T02:14:39.123456789Z;12.5;cpu_core;0;local_machine;;\n"
        "cpu_percent;2026-11-22T02:14:40.123456789Z;0.1;cpu_core;0;local_machine;;\n"
        "process_memory_rss;2026-11-22T02:14:39.123456789Z;123456789012;local_machine;;process;4242;"
        "name=python3,busy=true\n"
    )


async def test_fields_with_separator_quotes_and_newlines_are_quoted(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    batch = make_batch(
        make_series(
            "odd;name",
            [1],
            timestamps=[T0],
            resource=Resource("custom", 'say "hi"'),
            attributes={"note": "two\nlines", "k,=": "a\\b"},
        )
    )
    await run_output(CsvOutput(path), [batch])
    assert path.read_text() == HEADER + (
        '"odd;name";2026-11-22T02:14:39.123456789Z;1;custom;"say ""hi""";local_machine;;'
        '"note=two\nlines,k\\,\\==a\\\\b"\n'
    )
    rows = list(csv.reader(io.StringIO(path.read_text(), newline=""), delimiter=";"))
    assert rows[1] == [
        "odd;name",
        "2026-11-22T02:14:39.123456789Z",
        "1",
        "custom",
        'say "hi"',
        "local_machine",
        "",
        "note=two\nlines,k\\,\\==a\\\\b",
    ]


async def test_one_name_per_point_series(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    series = Series(
        ["a.b", "c;d"], Resource("local_machine"), Consumer("local_machine"), {}, [T0, T0], [1.5, 2]
    )
    await run_output(CsvOutput(path, separator=","), [Batch([series])])
    assert path.read_text() == HEADER.replace(";", ",") + (
        "a.b,2026-11-22T02:14:39.123456789Z,1.5,local_machine,,local_machine,,\n"
        "c;d,2026-11-22T02:14:39.123456789Z,2,local_machine,,local_machine,,\n"
    )


async def test_existing_file_is_appended_to_without_a_second_header(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    await run_output(CsvOutput(path), [make_batch(make_series("m", [1], timestamps=[T0]))])
    await run_output(CsvOutput(path), [make_batch(make_series("m", [2], timestamps=[T0 + 1]))])
    lines = path.read_text().splitlines()
    assert lines == [
        HEADER.strip(),
        "m;2026-11-22T02:14:39.123456789Z;1;local_machine;;local_machine;;",
        "m;2026-11-22T02:14:39.123456790Z;2;local_machine;;local_machine;;",
    ]


async def test_a_cut_last_line_is_ended_before_appending(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "out.csv"
    path.write_text(HEADER + "m;2026-11-22T02:14")
    await run_output(CsvOutput(path), [make_batch(make_series("m", [2], timestamps=[T0]))])
    assert (
        path.read_text()
        == HEADER + "m;2026-11-22T02:14\nm;2026-11-22T02:14:39.123456789Z;2;local_machine;;local_machine;;\n"
    )
    assert "incomplete" in caplog.text


async def test_points_are_written_after_flush_interval_and_at_shutdown(
    tmp_path: Path, autojump_clock
) -> None:
    path = tmp_path / "out.csv"
    write_times: list[float] = []

    class TimedCsv(CsvOutput):
        async def write(self, batches: list[Batch]) -> None:
            write_times.append(trio.current_time())
            await super().write(batches)

    output = TimedCsv(path, flush_interval=5.0)
    pipeline = Pipeline([output_element(output, "csv")])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        start = trio.current_time()
        sink = pipeline.sink()
        assert await sink.send_and_wait(make_batch(make_series("m", [1], timestamps=[T0])))
        assert write_times == [start + 5.0]
        assert path.read_text().count("\n") == 2
        await trio.sleep(100)
        await sink.send(make_batch(make_series("m", [2], timestamps=[T0])))
        pipeline.stop()
    # The second batch did not wait for the timer: shutdown wrote it at once.
    assert write_times == [start + 5.0, start + 105.0]
    assert path.read_text().count("\n") == 3


def test_start_fails_clearly_on_an_unwritable_path(tmp_path: Path) -> None:
    ctx = StartContext("csv", MetricRegistry(), tmp_path / "data", None)
    config = convert_section({"path": str(tmp_path)}, CsvConfig, "plugins.csv")  # a directory
    with pytest.raises(OSError, match=rf"cannot open {re.escape(str(tmp_path))} for appending"):
        CsvPlugin().start(ctx, config)
    assert ctx.elements == []


def test_start_adds_an_output_with_the_queue_config(tmp_path: Path) -> None:
    ctx = StartContext("csv", MetricRegistry(), tmp_path / "data", None)
    config = convert_section(
        {"path": str(tmp_path / "sub" / "x.csv"), "flush_interval": "250ms", "overflow": "block"},
        CsvConfig,
        "plugins.csv",
    )
    CsvPlugin().start(ctx, config)
    [element] = ctx.elements
    assert element.kind == "output" and element.config.overflow == "block"
    assert element.obj.flush_interval == 0.25
    assert (tmp_path / "sub" / "x.csv").exists()


@pytest.mark.parametrize("separator", ["", ";;", '"', "\n"])
def test_bad_separator_is_a_config_error(separator: str) -> None:
    with pytest.raises(ConfigError, match="plugins.csv: separator must be one character"):
        convert_section({"separator": separator}, CsvConfig, "plugins.csv")


def _parse_attributes(text: str) -> dict[str, str]:
    """The inverse of format_attributes, written independently for the round-trip property."""
    pairs: dict[str, str] = {}
    key: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "=" and not key:
            key, current = current, []
            key = key or [""]
        elif ch == ",":
            pairs["".join(key)] = "".join(current)
            key, current = [], []
        else:
            current.append(ch)
    if text:
        pairs["".join(key)] = "".join(current)
    return pairs


fields = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)


@settings(max_examples=200, deadline=None)
@given(
    metric=fields.filter(bool),
    kind=fields,
    rid=fields,
    attributes=st.dictionaries(fields.filter(bool), fields, max_size=4),
    value=st.one_of(st.integers(-(2**63), 2**64), st.floats(allow_nan=False)),
    ts=st.integers(0, 2**63 - 1),
    separator=st.sampled_from([";", ",", "\t", "|"]),
)
def test_rows_read_back_with_the_csv_module(metric, kind, rid, attributes, value, ts, separator) -> None:
    series = Series(metric, Resource(kind, rid), Consumer("process", "1"), attributes, [ts], [value])
    text = format_batches([Batch([series])], separator, TimestampFormatter())
    [row] = list(csv.reader(io.StringIO(text, newline=""), delimiter=separator))
    assert row[0] == metric
    assert row[1] == TimestampFormatter().format(ts)
    assert type(value)(row[2]) == value
    assert row[3:7] == [kind, rid, "process", "1"]
    assert _parse_attributes(row[7]) == attributes
    assert row[7] == format_attributes(attributes)


def test_agent_with_no_config_writes_agent_output_csv(tmp_path: Path) -> None:
    """The embedded default: `agent --once` in an empty folder generates a config and writes the CSV."""
    env = dict(os.environ)
    env.pop("AGENT_CONFIG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--once"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "agent-output.csv").read_text().splitlines()
    assert lines[0] == HEADER.strip()
    assert len(lines) > 10
    assert any(line.startswith("memory_used;") for line in lines)


async def test_a_file_with_another_header_is_appended_to_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "out.csv"
    path.write_text("time,name,value\n2026-01-01,x,1\n")
    await run_output(CsvOutput(path), [make_batch(make_series("m", [2], timestamps=[T0]))])
    # Nothing is truncated or rewritten: the old rows stay, the new ones follow.
    assert path.read_text() == (
        "time,name,value\n2026-01-01,x,1\nm;2026-11-22T02:14:39.123456789Z;2;local_machine;;local_machine;;\n"
    )
    assert "the existing first line is not this output's header" in caplog.text
