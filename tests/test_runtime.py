"""The Agent: starting the enabled plugins (failures named), running their pipeline, calling the
lifecycle hooks, stopping the plugins. In-process, with small plugins written for the test."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from agent import config as config_mod
from agent import hookimpl
from agent.config import AgentConfig, AgentSection
from agent.manager import BUILTIN_PLUGIN_MODULES, PluginEntry, build_plugin_manager, collect_plugins
from agent.model import LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER
from agent.plugin import (
    BatchBuilder,
    CommandLineFlag,
    OutputConfig,
    Plugin,
    PluginConfig,
    PolledSource,
    StartContext,
    Transform,
)
from agent.runtime import Agent, PluginStartError
from agent.testing import CollectingOutput
from agent.units import Duration

EVENTS: list[str] = []


class Ticks(PolledSource):
    poll_interval = flush_interval = 1.0

    async def poll(self, points: BatchBuilder, timestamp_ns: int) -> None:
        points.add("ticks", 1, timestamp_ns, LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER)


class TicksPlugin(Plugin):
    name = "ticks"
    provides = ("source",)

    def start(self, ctx: StartContext, config: PluginConfig) -> None:
        ctx.create_metric("ticks", "1", "int", "one per poll")
        ctx.add_source(Ticks())
        EVENTS.append("ticks started")

    def stop(self) -> None:
        EVENTS.append("ticks stopped")


class EnergyInWatts(Plugin):
    """Registers `ticks` again with another unit: a conflict."""

    name = "conflicting"
    provides = ("source",)

    def start(self, ctx: StartContext, config: PluginConfig) -> None:
        ctx.create_metric("ticks", "W", "int")


class Broken(Plugin):
    name = "broken"
    provides = ("source",)

    def start(self, ctx: StartContext, config: PluginConfig) -> None:
        raise ValueError("no sensor at /dev/sensor0")


class Collect(Plugin):
    name = "collect"
    Config = OutputConfig
    provides = ("output",)
    output: CollectingOutput | None = None

    def start(self, ctx: StartContext, config: OutputConfig) -> None:
        Collect.output = CollectingOutput()
        ctx.add_output(Collect.output, config)


class Double(Transform):
    def apply(self, batch):
        for s in batch.series:
            s.values = [v * 2 for v in s.values]
        return batch


class PlusOne(Transform):
    def apply(self, batch):
        for s in batch.series:
            s.values = [v + 1 for v in s.values]
        return batch


class DoublePlugin(Plugin):
    name = "double"
    provides = ("transform",)

    def start(self, ctx: StartContext, config: PluginConfig) -> None:
        ctx.add_transform(Double())


class PlusOnePlugin(Plugin):
    name = "plus-one"
    provides = ("transform",)

    def start(self, ctx: StartContext, config: PluginConfig) -> None:
        ctx.add_transform(PlusOne())


@pytest.mark.parametrize(("tables", "value"), [(["plus-one", "double"], 4), (["double", "plus-one"], 3)])
async def test_transforms_run_in_the_order_of_the_config_tables(tables: list[str], value: int) -> None:
    available = {
        cls.name: PluginEntry(cls, "built-in") for cls in (TicksPlugin, DoublePlugin, PlusOnePlugin, Collect)
    }
    document = {
        "agent": {"self_metrics_interval": "0s"},
        "plugins": {name: {} for name in ["ticks", *tables, "collect"]},
    }
    cfg = config_mod.resolve(document, available, path=Path("/tmp/agent.toml"), env={})
    await Agent(cfg, available).run(once=True, handle_signals=False)
    assert Collect.output is not None and Collect.output.values("ticks") == [value]


def make_agent(names: list[str], pm=None, **agent: Any) -> Agent:
    available = {
        cls.name: PluginEntry(cls, "built-in") for cls in (TicksPlugin, EnergyInWatts, Broken, Collect)
    }
    configs = {name: available[name].cls.Config(enable=True) for name in names}
    section = AgentSection(self_metrics_interval=Duration(0), **agent)
    return Agent(AgentConfig(section, Path("/tmp/agent.toml"), configs), available, pm)


@pytest.fixture(autouse=True)
def clear_events() -> None:
    EVENTS.clear()


def test_a_failing_start_names_the_plugin_and_stops_those_already_started() -> None:
    agent = make_agent(["ticks", "broken", "collect"])
    with pytest.raises(PluginStartError) as info:
        agent.start_plugins()
    assert str(info.value) == "plugin broken failed to start: ValueError: no sensor at /dev/sensor0"
    assert EVENTS == ["ticks started", "ticks stopped"]


def test_a_metric_conflict_between_plugins_fails_the_second_one() -> None:
    agent = make_agent(["ticks", "conflicting"])
    with pytest.raises(PluginStartError) as info:
        agent.start_plugins()
    assert str(info.value) == (
        "plugin conflicting failed to start: MetricConflictError: metric 'ticks' is already registered"
        " as (unit='1', type=int), not (unit='W', type=int)"
    )


async def test_once_runs_one_poll_then_stops_the_plugins() -> None:
    agent = make_agent(["ticks", "collect"])
    await agent.run(once=True, handle_signals=False)
    assert Collect.output is not None and Collect.output.values("ticks") == [1]
    assert EVENTS == ["ticks started", "ticks stopped"]
    assert agent.started == {}


async def test_sigterm_drains_and_returns(autojump_clock) -> None:
    agent = make_agent(["ticks", "collect"], grace_period=Duration(5))
    # Should the agent not take SIGTERM, this handler keeps the test process alive (and the test fails).
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(agent.run)
                await trio.sleep(4.5)  # polls at 0..4; the source flushes every poll
                os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert Collect.output is not None and Collect.output.values("ticks") == [1] * 5
    assert EVENTS[-1] == "ticks stopped"


class LifecycleRecorder:
    """Implements every hook of agent.hookspecs and records its calls (see test_hookspecs.py)."""

    def __init__(self) -> None:
        self.calls: dict[str, dict[str, Any]] = {}

    @hookimpl
    def agent_plugins(self) -> list[type[Plugin]]:
        self.calls["agent_plugins"] = {}
        return []

    @hookimpl
    def agent_command_line_flags(self) -> list[CommandLineFlag]:
        self.calls["agent_command_line_flags"] = {}
        return []

    @hookimpl
    def agent_pipeline_started(self, plugin_names: list[str], elements: list[Any]) -> None:
        self.calls["agent_pipeline_started"] = {"plugin_names": plugin_names, "elements": elements}

    @hookimpl
    def agent_pipeline_stopped(self, counters: dict[str, dict[str, int]]) -> None:
        self.calls["agent_pipeline_stopped"] = {"counters": counters}

    @hookimpl
    def agent_control_sections(self, plugins: dict[str, Plugin]) -> list[Any]:
        self.calls["agent_control_sections"] = {"plugins": plugins}
        return []


async def test_lifecycle_hooks_are_called_with_their_arguments() -> None:
    recorder = LifecycleRecorder()
    pm = build_plugin_manager([recorder], load_entry_points=False)
    assert collect_plugins(pm) == {}
    agent = make_agent(["ticks", "collect"], pm)
    await agent.run(once=True, handle_signals=False)
    started = recorder.calls["agent_pipeline_started"]
    assert started["plugin_names"] == ["ticks", "collect"]
    assert [(e.plugin, e.kind) for e in started["elements"]] == [("ticks", "source"), ("collect", "output")]
    assert list(recorder.calls["agent_control_sections"]["plugins"]) == ["ticks", "collect"]
    assert recorder.calls["agent_pipeline_stopped"] == {
        "counters": {"collect": {"received": 1, "written": 1, "dropped": 0, "queued": 0}}
    }


class FlagDeclarer:
    """A plugin module that declares command-line flags, for the tests below."""

    def __init__(self, *flags: CommandLineFlag) -> None:
        self.flags = list(flags)

    @hookimpl
    def agent_command_line_flags(self) -> list[CommandLineFlag]:
        return self.flags


def test_a_plugin_flag_enables_its_plugin_and_sets_its_key() -> None:
    from agent.config import Overrides, resolve
    from agent.manager import collect_command_line_flags

    flag = CommandLineFlag("--sink-path", plugin="csv", key="path", metavar="FILE")
    pm = build_plugin_manager(list(BUILTIN_PLUGIN_MODULES) + [FlagDeclarer(flag)], load_entry_points=False)
    plugins = collect_plugins(pm)
    flags = collect_command_line_flags(pm, plugins)
    assert flag in flags and {f.flag for f in flags} >= {"--relay-out", "--relay-in"}
    cfg = resolve({"plugins": {"system": {}}}, plugins, path=None, overrides=Overrides(plugin_flags=[(flag, "x.csv")]))
    assert list(cfg.plugins) == ["system", "csv"]
    assert cfg.plugins["csv"].path == "x.csv"


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (CommandLineFlag("--relay-out", plugin="csv", key="path"), "two plugins declare --relay-out"),
        (CommandLineFlag("--to-nowhere", plugin="nowhere", key="x"), "'nowhere', which is not an installed plugin"),
    ],
)
def test_a_bad_plugin_flag_is_a_load_error_naming_it(flag: CommandLineFlag, message: str) -> None:
    from agent.manager import PluginLoadError, collect_command_line_flags

    pm = build_plugin_manager(list(BUILTIN_PLUGIN_MODULES) + [FlagDeclarer(flag)], load_entry_points=False)
    with pytest.raises(PluginLoadError, match=message):
        collect_command_line_flags(pm, collect_plugins(pm))
