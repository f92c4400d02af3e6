"""The console output: the exact lines a user sees."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigError, convert_section
from agent.model import Batch, Consumer, MetricDef, MetricRegistry, Resource, Series
from agent.plugin import StartContext
from agent.testing import make_batch, make_series, run_output
from agent_plugins.console.plugin import ConsoleConfig, ConsoleOutput, ConsolePlugin

T0 = 1_795_313_679_123_456_789


async def test_lines_show_time_metric_value_unit_resource_consumer_attributes() -> None:
    registry = MetricRegistry()
    registry.register(MetricDef("cpu_percent", "%", "float", ""))
    registry.register(MetricDef("process_memory_rss", "By", "int", ""))
    registry.register(MetricDef("load_average", "1", "float", ""))
    stream = io.StringIO()
    batch = make_batch(
        make_series("cpu_percent", [12.5, 0.1], timestamps=[T0, T0 + 1], resource=Resource("cpu_core", "0")),
        make_series(
            "process_memory_rss",
            [48218112],
            timestamps=[T0],
            consumer=Consumer("process", "4242"),
            attributes={"name": "my app", "main": True},
        ),
        make_series("load_average", [0.5], timestamps=[T0], attributes={"window": "1m"}),
        make_series("unknown", [3], timestamps=[T0], resource=Resource("disk", "")),
    )
    counters = await run_output(ConsoleOutput(registry, stream, flush_interval=0), [batch])
    assert counters["written"] == 5
    assert stream.getvalue() == (
        "2026-11-22T02:14:39.123456789Z cpu_percent 12.5 % resource=cpu_core:0 consumer=local_machine\n"
        "2026-11-22T02:14:39.123456790Z cpu_percent 0.1 % resource=cpu_core:0 consumer=local_machine\n"
        "2026-11-22T02:14:39.123456789Z process_memory_rss 48218112 By resource=local_machine"
        ' consumer=process:4242 name="my app" main=true\n'
        "2026-11-22T02:14:39.123456789Z load_average 0.5 resource=local_machine consumer=local_machine window=1m\n"
        "2026-11-22T02:14:39.123456789Z unknown 3 resource=disk consumer=local_machine\n"
    )


async def test_one_name_per_point() -> None:
    stream = io.StringIO()
    series = Series(
        ["a.b", "c.d"], Resource("local_machine"), Consumer("local_machine"), {}, [T0, T0], [1, 2.5]
    )
    await run_output(ConsoleOutput(MetricRegistry(), stream), [Batch([series])])
    assert [line.split(" ")[1:3] for line in stream.getvalue().splitlines()] == [["a.b", "1"], ["c.d", "2.5"]]


def test_start_adds_an_output(tmp_path: Path) -> None:
    ctx = StartContext("console", MetricRegistry(), tmp_path, None)
    ConsolePlugin().start(ctx, convert_section({"flush_interval": "100ms"}, ConsoleConfig, "plugins.console"))
    [element] = ctx.elements
    assert element.kind == "output" and element.obj.flush_interval == 0.1


def test_bad_flush_interval() -> None:
    with pytest.raises(ConfigError, match="plugins.console.flush_interval: expected a duration"):
        convert_section({"flush_interval": "soon"}, ConsoleConfig, "plugins.console")


def test_prints_to_stdout_of_the_agent(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        '[agent]\nself_metrics_interval = "0s"\n'
        "[plugins.system]\nenable = true\nper_cpu = false\nexclude_interfaces = ['*']\nexclude_disks = ['*']\n"
        "[plugins.console]\nenable = true\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(config), "--once"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(
        " memory_size " in line and " By resource=local_machine consumer=local_machine" in line
        for line in lines
    )
