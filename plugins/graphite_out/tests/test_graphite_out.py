"""The graphite-out plugin as the agent starts it: config table -> start() -> pipeline, spool under data_dir."""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path

import pytest
import trio

from agent.config import convert_section
from agent.model import MetricRegistry
from agent.pipeline import Pipeline
from agent.plugin import Element, StartContext
from agent.testing import partial_run
from agent_plugins.graphite_out.output import GraphiteOutput
from agent_plugins.graphite_out.plugin import GraphiteOutPlugin, agent_pipeline_started
from agent_plugins.graphite_out.testing import FakeCarbon, graphite_batch, wait_until
from agent_plugins.graphite_protocol.badlines import RecentBadLines

SAMPLE = Path(__file__).resolve().parent.parent / "sample.toml"


def start_plugin(tmp_path: Path, table: dict) -> tuple[GraphiteOutPlugin, StartContext]:
    config = convert_section(table, GraphiteOutPlugin.Config, "plugins.graphite-out")
    plugin = GraphiteOutPlugin()
    ctx = StartContext("graphite-out", MetricRegistry(), tmp_path / "data", None)
    plugin.start(ctx, config)
    return plugin, ctx


def test_the_sample_table_is_a_working_config_with_no_routes(tmp_path, caplog):
    table = tomllib.loads(SAMPLE.read_text())["plugins"]["graphite-out"]
    table.update(admin_http="127.0.0.1:0", admin_line="127.0.0.1:0")
    plugin, ctx = start_plugin(tmp_path, table)
    try:
        (element,) = ctx.elements
        assert element.kind == "output" and isinstance(element.obj, GraphiteOutput)
        assert "dropped and counted as unroutable" in caplog.text
    finally:
        plugin.stop()


def test_an_admin_port_in_use_is_a_startup_error_naming_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"admin_line 127.0.0.1:{port}: cannot listen"):
            start_plugin(tmp_path, {"admin_http": "", "admin_line": f"127.0.0.1:{port}"})


async def test_the_plugin_relays_and_spools_under_the_agent_data_dir(tmp_path):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            sink = FakeCarbon()
            await sink.start(nursery)
            await sink.stop()
            plugin, ctx = start_plugin(
                tmp_path,
                {
                    "admin_http": "127.0.0.1:0",
                    "admin_line": "",
                    "routes": [
                        {
                            "key": "carbon",
                            "type": "consistent_hashing",
                            "destinations": [{"address": sink.address, "reconnect_interval": "20ms"}],
                        }
                    ],
                },
            )
            output: GraphiteOutput = ctx.elements[0].obj
            (destination,) = output.state.route_destinations["carbon"]
            pipeline = Pipeline(ctx.elements)
            async with trio.open_nursery() as inner:
                await inner.start(partial_run(pipeline, 5.0))
                await wait_until(lambda: destination.down)
                assert await pipeline.sink().send_and_wait(graphite_batch(["a.b.c", "d.e.f"]))
                assert destination.spooled == 2
                await sink.start(nursery)
                await sink.wait_for(2)
                pipeline.stop()
            plugin.stop()
            assert sink.paths == ["a.b.c", "d.e.f"]
            assert (tmp_path / "data" / "graphite-out" / "spool" / f"carbon_127.0.0.1_{sink.port}").is_dir()
            nursery.cancel_scope.cancel()


def test_pipeline_started_hook_gives_the_output_graphite_in_bad_lines(tmp_path):
    plugin, ctx = start_plugin(tmp_path, {"admin_http": "", "admin_line": ""})

    class GraphiteInSource:
        def __init__(self) -> None:
            self.recent_bad_lines = RecentBadLines()

    source = GraphiteInSource()
    elements = [Element("graphite-in", "graphite-in", "source", source), *ctx.elements]
    agent_pipeline_started(plugin_names=["graphite-in", "graphite-out"], elements=elements)
    assert ctx.elements[0].obj.bad_line_sources == [source.recent_bad_lines]
