"""Writing a plugin as a stranger would: the README's example plugin, tested with `agent.testing`.

The plugin code is taken from README.md itself, so the example cannot drift from the API.
"""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from agent import Batch, Output, OutputConfig, StartupError, Transform
from agent.config import ConfigError
from agent.testing import (
    CollectingOutput,
    make_batch,
    make_series,
    poll_once,
    run_output,
    run_transform,
    running_pipeline,
    source_element,
    start_plugin,
    transform_element,
)

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(language: str, after: str) -> str:
    """The first ```language block after the heading `after`."""
    text = README.read_text()
    section = text[text.index(after) :]
    match = re.search(rf"```{language}\n(.*?)```", section, re.DOTALL)
    assert match, f"no {language} block after {after!r} in README.md"
    return match.group(1)


@pytest.fixture(scope="module")
def uptime() -> Iterator[types.ModuleType]:
    module = types.ModuleType("readme_uptime_plugin")
    # In sys.modules, as an imported plugin module is: msgspec resolves the Config's annotations there.
    sys.modules[module.__name__] = module
    try:
        exec(compile(readme_block("python", "## Writing a plugin"), "README.md", "exec"), module.__dict__)
        yield module
    finally:
        del sys.modules[module.__name__]


def test_the_readme_plugin_starts_from_its_table(uptime, tmp_path: Path) -> None:
    ctx = start_plugin(uptime.UptimePlugin, {"poll_interval": "2s"}, data_dir=tmp_path)
    [element] = ctx.elements
    assert element.kind == "source" and element.plugin == "uptime"
    assert element.obj.poll_interval == 2.0
    assert ctx.registry.get("uptime").unit == "s"
    assert uptime.agent_plugins() == [uptime.UptimePlugin]


def test_a_typo_in_the_table_is_a_config_error(uptime) -> None:
    with pytest.raises(ConfigError, match=r"^plugins\.uptime\.poll_intervall: unknown key"):
        start_plugin(uptime.UptimePlugin, {"poll_intervall": "2s"})
    with pytest.raises(ConfigError, match=r'^plugins\.uptime\.poll_interval: expected a duration like "30s"'):
        start_plugin(uptime.UptimePlugin, {"poll_interval": "often"})


async def test_the_readme_source_measures(uptime) -> None:
    source = start_plugin(uptime.UptimePlugin).elements[0].obj
    batch = await poll_once(source, timestamp_ns=42)
    [series] = batch.series
    assert series.metric == "uptime" and series.timestamps == [42]
    assert series.values[0] > 0


async def test_the_readme_source_in_a_running_pipeline(uptime, autojump_clock) -> None:
    source = start_plugin(uptime.UptimePlugin, {"poll_interval": "10s"}).elements[0].obj
    out = CollectingOutput()
    async with running_pipeline([source_element(source, "uptime")], [out]):
        with trio.fail_after(60):
            await out.wait_for_points(1)  # the first poll goes out at once
            await trio.sleep(25)
    # Polls at 0, 10, 20: the first one at once, the later ones each after its flush interval.
    assert len(out.values("uptime")) == 3


async def test_the_readme_service_tells_the_last_uptime(uptime) -> None:
    ctx = start_plugin(uptime.UptimePlugin, {"poll_interval": "10s", "status_address": "127.0.0.1:0"})
    assert [(e.kind, e.full_name) for e in ctx.elements] == [
        ("source", "uptime"),
        ("service", "uptime/status"),
    ]
    out = CollectingOutput()
    with trio.fail_after(10):
        async with running_pipeline(ctx.elements, [out]) as pipeline:
            # What the service passed to task_status.started: what the agent's readiness line shows.
            [address] = pipeline.ready["uptime/status"]
            await out.wait_for_points(1)  # the first poll goes out at once
            host, port = address.rsplit(":", 1)
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                answer = b""
                while data := await stream.receive_some():
                    answer += data
    word, seconds = answer.decode().split()
    assert word == "uptime" and float(seconds) == out.values("uptime")[0]


async def test_a_service_that_cannot_listen_stops_the_start_naming_itself(uptime) -> None:
    ctx = start_plugin(uptime.UptimePlugin, {"status_address": "127.0.0.1:99999"})
    with pytest.raises(ExceptionGroup) as failure:
        async with running_pipeline(ctx.elements):
            pass
    group = failure.value.subgroup(StartupError)
    while isinstance(group, BaseExceptionGroup):  # the nurseries between the test and the service
        [group] = group.exceptions
    assert str(group) == (
        "service uptime/status could not start:"
        " AddressError: '127.0.0.1:99999': port '99999' is not a number from 0 to 65535"
    )


class Celsius(Transform):
    """A transform a plugin author might write: Fahrenheit to Celsius for one metric."""

    def apply(self, batch: Batch) -> Batch | None:
        for s in batch.series:
            if s.metric == "temperature_f":
                s.metric = "temperature"
                s.values = [round((v - 32) * 5 / 9, 2) for v in s.values]
        return batch


class ListOutput(Output):
    """An output a plugin author might write: fails once, then keeps what it is given."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float]] = []
        self.failures_left = 1

    async def write(self, batches: list[Batch]) -> None:
        if self.failures_left:
            self.failures_left -= 1
            raise ConnectionError("database restarting")
        self.rows += [(name, value) for b in batches for name, _, value, _ in b.points()]


def test_run_transform() -> None:
    result = run_transform(Celsius(), make_batch(make_series("temperature_f", [212.0, 32.0])))
    assert result is not None and result.series[0].metric == "temperature"
    assert result.series[0].values == [100.0, 0.0]


async def test_run_output_retries_and_counts(autojump_clock) -> None:
    output = ListOutput()
    counters = await run_output(
        output, [make_batch(make_series("m", [1.0, 2.0]))], OutputConfig(overflow="block")
    )
    assert counters == {"received": 2, "written": 2, "dropped": 0, "queued": 0}
    assert output.rows == [("m", 1.0), ("m", 2.0)]


async def test_a_transform_between_a_sink_and_an_output() -> None:
    out = CollectingOutput()
    async with running_pipeline([transform_element(Celsius())], [out]) as pipeline:
        assert await pipeline.sink().send_and_wait(make_batch(make_series("temperature_f", [50.0])))
    assert out.values("temperature") == [10.0]
