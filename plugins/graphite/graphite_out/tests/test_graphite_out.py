"""The graphite-out plugin as the agent starts it: config table -> start() -> pipeline, spool under data_dir;
and a whole agent built from configs/collector-to-carbon.toml, fed by a relay client."""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path

import pytest
import trio

from agent import StartupError
from agent import config as config_module
from agent.config import Overrides, convert_section
from agent.manager import build_plugin_manager, collect_plugins
from agent.model import MetricRegistry, Resource
from agent.pipeline import Pipeline
from agent.plugin import Element, StartContext
from agent.runtime import Agent
from agent.testing import make_batch, make_series, output_element, partial_run, running_pipeline
from agent_plugins.graphite.graphite_out.output import GraphiteOutput
from agent_plugins.graphite.graphite_out.plugin import GraphiteOutPlugin, agent_pipeline_started
from agent_plugins.graphite.graphite_out.testing import FakeCarbon, graphite_batch, wait_until
from agent_plugins.graphite.protocol.badlines import RecentBadLines
from agent_plugins.relay.relay_client.client import ClientSettings, RelayClient
from agent_plugins.relay.relay_client.store import DiskBuffer
from agent_plugins.relay.relay_server.plugin import RELAY_IN_FLAG

SAMPLE = Path(__file__).resolve().parent.parent / "sample.toml"
COLLECTOR_TO_CARBON = Path(__file__).resolve().parents[4] / "configs" / "collector-to-carbon.toml"
NS = 1_000_000_000


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
    output, *services = ctx.elements
    assert output.kind == "output" and isinstance(output.obj, GraphiteOutput)
    # The admin ports are services of their own, named after their keys.
    assert [(e.kind, e.full_name) for e in services] == [
        ("service", "graphite-out/admin-http"),
        ("service", "graphite-out/admin-line"),
    ]
    assert "dropped and counted as unroutable" in caplog.text


async def test_an_admin_port_in_use_is_a_startup_error_naming_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _, ctx = start_plugin(tmp_path, {"admin_http": "", "admin_line": f"127.0.0.1:{port}"})
        with trio.fail_after(10), pytest.raises(BaseExceptionGroup) as raised:
            async with running_pipeline(ctx.elements):
                pass
        assert raised.group_contains(
            StartupError,
            match=f"graphite-out/admin-line could not start: .*admin_line: cannot listen on 127.0.0.1:{port}",
        )


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


async def test_a_collector_started_with_relay_in_feeds_carbon(tmp_path):
    """configs/collector-to-carbon.toml run as `agent --config FILE --relay-in ADDRESS`: what a node's relay
    client sends reaches carbon as plaintext, its path rendered from the template with the node's name."""
    document = tomllib.loads(COLLECTOR_TO_CARBON.read_text())
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            carbon = FakeCarbon()
            await carbon.start(nursery)
            # Only what a test must change: free ports, the fake carbon, a data_dir of its own.
            document["plugins"]["graphite-out"].update(admin_http="", admin_line="")
            document["plugins"]["graphite-out"]["routes"][0]["destinations"] = [carbon.address]
            document["agent"] = {"data_dir": str(tmp_path / "collector"), "self_metrics_interval": "0s"}
            manager = build_plugin_manager()
            plugins = collect_plugins(manager)
            config = config_module.resolve(
                document,
                plugins,
                path=COLLECTOR_TO_CARBON,
                overrides=Overrides(plugin_flags=[(RELAY_IN_FLAG, "127.0.0.1:0")]),
            )
            collector = Agent(config, plugins, manager)
            collector.start_plugins()
            assert sorted(collector.started) == ["graphite-out", "relay-server"]
            await nursery.start(
                lambda task_status: collector.run(handle_signals=False, task_status=task_status)
            )
            server = next(e.obj for e in collector.elements if e.plugin == "relay-server")

            client = RelayClient(
                ClientSettings("node-1", server.bound_addresses[0], buffer_timeout=0.01, initial_delay=0.01),
                DiskBuffer(tmp_path / "node", 1 << 26),
            )
            node = Pipeline([output_element(client, "relay-client")])
            await nursery.start(partial_run(node, 5.0))
            t0 = 1_700_000_000
            series = make_series(
                "cpu_percent",
                [12.5, 13.0],
                timestamps=[t0 * NS, (t0 + 1) * NS],
                resource=Resource("cpu_core", "0"),
            )
            await node.sink().send(make_batch(series))
            await carbon.wait_for(2)
            node.stop()
            collector.stop()
            nursery.cancel_scope.cancel()
    assert carbon.points == [
        ("agent.node-1.cpu_percent.cpu_core.0", 12.5, t0),
        ("agent.node-1.cpu_percent.cpu_core.0", 13.0, t0 + 1),
    ]


# The Contract of issue 5, verbatim: scripts outside the test suite rely on these names.
CONTRACT = """
[plugins.graphite-in]
plaintext = "0.0.0.0:2003"     # TCP; "" switches it off
udp = ""                       # same port numbers are fine for UDP
pickle = "0.0.0.0:2004"
validation = "medium"          # none | medium | strict

[plugins.graphite-out]
admin_http = "127.0.0.1:8081"
admin_line = "127.0.0.1:2030"
[[plugins.graphite-out.routes]]
key = "carbon"
type = "consistent_hashing"    # send_all_match | send_first_match | consistent_hashing | broadcast | hash_route
hash = "carbon_ch"             # or fnv1a_ch
replication_factor = 1
prefix = ""                    # and not_prefix, substr, not_substr, regex, not_regex
format = "plaintext"           # or pickle
destinations = ["10.0.0.1:2003:a", "10.0.0.2:2003:b"]   # or tables with address, matchers and options
"""


def test_the_contract_enables_both_plugins_and_its_values_are_the_defaults():
    manager = build_plugin_manager()
    plugins = collect_plugins(manager)
    config = config_module.resolve(tomllib.loads(CONTRACT), plugins, path=None)
    graphite_in, graphite_out = config.plugins["graphite-in"], config.plugins["graphite-out"]
    assert (graphite_in.plaintext, graphite_in.udp, graphite_in.pickle, graphite_in.validation) == (
        "0.0.0.0:2003",
        "",
        "0.0.0.0:2004",
        "medium",
    )
    assert (graphite_out.admin_http, graphite_out.admin_line) == ("127.0.0.1:8081", "127.0.0.1:2030")
    (route,) = graphite_out.routes
    assert (route.key, route.type, route.hash, route.replication_factor, route.format) == (
        "carbon",
        "consistent_hashing",
        "carbon_ch",
        1,
        "plaintext",
    )
    assert [d.address for d in route.destination_configs] == ["10.0.0.1:2003:a", "10.0.0.2:2003:b"]
    assert all(d.spool for d in route.destination_configs)  # spooling is on by default
    # The same values are the defaults: empty tables mean the same thing.
    bare = config_module.resolve(
        {"plugins": {"graphite-in": {}, "graphite-out": {}}}, plugins, path=None
    ).plugins
    for name in ("plaintext", "udp", "pickle", "validation"):
        assert getattr(bare["graphite-in"], name) == getattr(graphite_in, name)
    for name in ("admin_http", "admin_line"):
        assert getattr(bare["graphite-out"], name) == getattr(graphite_out, name)
