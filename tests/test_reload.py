"""Reloading the config file while the agent runs (SIGHUP, `agent control reload`): the plugins whose
table changed restart with the new table, the others keep running untouched, a file with an error
changes nothing. In-process with MockClock and small plugins written for the test, then against a real
agent process."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from agent import config as config_mod
from agent import testing
from agent.errors import ReloadError
from agent.manager import PluginEntry
from agent.model import LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER
from agent.plugin import (
    BatchBuilder,
    OutputConfig,
    Plugin,
    PluginConfig,
    PolledSource,
    StartContext,
    Transform,
)
from agent.runtime import Agent
from agent.testing import CollectingOutput


class TicksConfig(PluginConfig, kw_only=True):
    value: int = 1


class Ticks(PolledSource):
    poll_interval = flush_interval = 1.0

    def __init__(self, value: int) -> None:
        self.value = value
        self.polled_at: list[float] = []

    async def poll(self, points: BatchBuilder, timestamp_ns: int) -> None:
        self.polled_at.append(trio.current_time())
        points.add("ticks", self.value, timestamp_ns, LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER)


class TicksPlugin(Plugin):
    name = "ticks"
    Config = TicksConfig
    provides = ("source",)
    sources: list[Ticks] = []

    def start(self, ctx: StartContext, config: TicksConfig) -> None:
        ctx.create_metric("ticks", "1", "int")
        source = Ticks(config.value)
        TicksPlugin.sources.append(source)
        ctx.add_source(source)


class AddConfig(PluginConfig, kw_only=True):
    amount: int = 0


class Add(Transform):
    def __init__(self, amount: int) -> None:
        self.amount = amount

    def apply(self, batch):
        for s in batch.series:
            s.values = [v + self.amount for v in s.values]
        return batch


class AddPlugin(Plugin):
    name = "add"
    Config = AddConfig
    provides = ("transform",)

    def start(self, ctx: StartContext, config: AddConfig) -> None:
        ctx.add_transform(Add(config.amount))


class CollectConfig(OutputConfig, kw_only=True):
    label: str = "a"


class Collect(Plugin):
    name = "collect"
    Config = CollectConfig
    provides = ("output",)
    outputs: list[tuple[str, CollectingOutput]] = []

    def start(self, ctx: StartContext, config: CollectConfig) -> None:
        output = CollectingOutput()
        Collect.outputs.append((config.label, output))
        ctx.add_output(output, config)


AVAILABLE = {cls.name: PluginEntry(cls, "built-in") for cls in (TicksPlugin, AddPlugin, Collect)}

CONFIG = """
[agent]
self_metrics_interval = "0s"
grace_period = "5s"
[plugins.ticks]
value = {value}
[plugins.add]
amount = {amount}
[plugins.collect]
label = "{label}"
"""


@pytest.fixture(autouse=True)
def fresh_plugins() -> None:
    TicksPlugin.sources = []
    Collect.outputs = []


def write_config(path: Path, value: int = 1, amount: int = 0, label: str = "a") -> None:
    path.write_text(CONFIG.format(value=value, amount=amount, label=label))


async def start_agent(nursery: trio.Nursery, path: Path) -> Agent:
    agent = Agent(config_mod.load(path, AVAILABLE, env={}), AVAILABLE)
    await nursery.start(agent.run)
    return agent


async def test_a_changed_source_restarts_with_its_new_table_and_the_output_keeps_running(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "agent.toml"
    write_config(path, value=1)
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            agent = await start_agent(nursery, path)
            await trio.sleep(3.5)
            write_config(path, value=2)
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="agent.runtime"):
                result = await agent.reload()
            assert result["restarted"] == ["ticks"]
            assert [r.getMessage() for r in caplog.records if r.name == "agent.runtime"] == [
                "reload: plugin ticks restarted with its new table"
            ]
            await trio.sleep(3.25)  # the new source polls at once, then every second
            agent.stop()
    # One output all along: the old source's points, then the new source's.
    assert len(Collect.outputs) == 1
    values = Collect.outputs[0][1].values("ticks")
    assert values == [1] * 4 + [2] * 4, values
    assert len(TicksPlugin.sources) == 2


async def test_a_changed_output_is_drained_and_restarted_and_the_source_polls_on_uninterrupted(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "agent.toml"
    write_config(path, label="first")
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            agent = await start_agent(nursery, path)
            await trio.sleep(3.5)
            write_config(path, label="second")
            assert (await agent.reload())["restarted"] == ["collect"]
            await trio.sleep(3.25)
            agent.stop()
    (source,) = TicksPlugin.sources  # never restarted
    assert source.polled_at == [float(t) for t in range(round(source.polled_at[0]), len(source.polled_at))]
    (first_label, first), (second_label, second) = Collect.outputs
    assert (first_label, second_label) == ("first", "second")
    # The old output wrote everything it was given before the new one took over: nothing lost.
    assert first.points == 4 and first.points + second.points == len(source.polled_at)


async def test_a_transform_change_applies_between_batches_in_config_order(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "agent.toml"
    write_config(path, amount=10)
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            agent = await start_agent(nursery, path)
            await trio.sleep(1.5)
            write_config(path, amount=100)
            assert (await agent.reload())["restarted"] == ["add"]
            await trio.sleep(1.0)
            agent.stop()
    assert Collect.outputs[0][1].values("ticks") == [11, 11, 101]


async def test_an_unchanged_file_and_a_broken_file_change_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "agent.toml"
    write_config(path)
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            agent = await start_agent(nursery, path)
            await trio.sleep(1.5)
            with caplog.at_level(logging.INFO, logger="agent.runtime"):
                caplog.clear()
                assert not any((await agent.reload()).values())
                assert [r.getMessage() for r in caplog.records] == ["reload: config unchanged"]
                caplog.clear()
                path.write_text(CONFIG.format(value="'two'", amount=0, label="a"))
                with pytest.raises(ReloadError):
                    await agent.reload()
            assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
                (
                    "ERROR",
                    "reload: plugins.ticks.value: expected int, got str; keeping the running configuration",
                )
            ]
            await trio.sleep(2.0)
            agent.stop()
    assert len(TicksPlugin.sources) == 1 and len(Collect.outputs) == 1
    assert Collect.outputs[0][1].values("ticks") == [1] * 4


async def test_agent_section_changes_are_logged_as_needing_a_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "agent.toml"
    write_config(path)
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            agent = await start_agent(nursery, path)
            path.write_text(path.read_text().replace('grace_period = "5s"', 'grace_period = "7s"'))
            with caplog.at_level(logging.INFO, logger="agent.runtime"):
                caplog.clear()
                result = await agent.reload()
            assert result["restart_needed"] == ["grace_period"]
            assert [r.getMessage() for r in caplog.records] == [
                "reload: [agent] grace_period changed: applies only after a restart"
                " (the running values are kept)"
            ]
            assert float(agent.config.agent.grace_period) == 5.0
            agent.stop()


# -- a real agent process --

PROCESS_CONFIG = """
[agent]
data_dir = "data"
self_metrics_interval = "0s"
grace_period = "5s"
[plugins.system]
poll_interval = "100ms"
flush_interval = "100ms"
per_cpu = false
[plugins.csv]
path = "{path}"
flush_interval = "0s"
"""


def rows(path: Path) -> int:
    return len(path.read_text().splitlines()) - 1 if path.exists() else 0


def test_sighup_and_control_reload_apply_a_new_csv_path(tmp_path: Path) -> None:
    with testing.run_agent(PROCESS_CONFIG.format(path="one.csv"), directory=tmp_path) as agent:
        config = tmp_path / "agent.toml"
        control = [sys.executable, "-m", "agent.cli", "control", "--config", str(config)]
        agent.wait_for(lambda: rows(tmp_path / "one.csv") > 0, 30, "rows in one.csv")

        config.write_text(PROCESS_CONFIG.format(path="two.csv"))
        agent.send_signal(signal.SIGHUP)
        agent.wait_for(lambda: rows(tmp_path / "two.csv") > 0, 30, "rows in two.csv after SIGHUP")
        assert "reload: plugin csv restarted with its new table" in agent.stderr
        settled = rows(tmp_path / "one.csv")
        agent.wait_for(lambda: rows(tmp_path / "two.csv") > 5, 30, "more rows in two.csv")
        assert rows(tmp_path / "one.csv") == settled  # the old file gets nothing more

        config.write_text(PROCESS_CONFIG.format(path="three.csv"))
        done = subprocess.run([*control, "reload"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert (done.returncode, done.stdout) == (0, "restarted csv\n"), done.stderr
        agent.wait_for(lambda: rows(tmp_path / "three.csv") > 0, 30, "rows in three.csv after control reload")

        unchanged = subprocess.run(
            [*control, "reload"], capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        assert (unchanged.returncode, unchanged.stdout) == (0, "config unchanged\n")

        config.write_text(PROCESS_CONFIG.format(path="four.csv") + "[plugins.nonsense]\n")
        broken = subprocess.run(
            [*control, "reload"], capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        assert broken.returncode == 2
        assert len(broken.stderr.splitlines()) == 1 and "plugins.nonsense" in broken.stderr
        assert "keeping the running configuration" in agent.stderr
        before = rows(tmp_path / "three.csv")
        agent.wait_for(lambda: rows(tmp_path / "three.csv") > before, 30, "rows still in three.csv")
        assert not (tmp_path / "four.csv").exists()
        assert agent.stop() == 0
