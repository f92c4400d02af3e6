"""The `graphite-out` plugin: adds the output and its admin ports, and connects the output to graphite-in's
recent bad lines.

The work is done by `output.GraphiteOutput` (routing and destinations) and the admin ports
(`admin_http.AdminHttpPort`, `admin_line.AdminLinePort`: agent services that bind when the agent starts,
so that a taken port is a startup error naming it); this module is what the agent loads: the plugin
class and its hooks.
"""

from __future__ import annotations

from typing import Any

from agent import Plugin, StartContext, hookimpl
from agent.plugin import ControlSection
from agent_plugins.graphite.protocol.badlines import find_recent_bad_lines

from .admin_http import AdminHttpPort
from .admin_line import AdminLinePort
from .config import GraphiteOutConfig, parse_listen_address
from .control import AdminActions, AdminPort
from .output import GraphiteOutput


class GraphiteOutPlugin(Plugin):
    name = "graphite-out"
    version = "0.1.0"
    agent_api = ">=1,<2"
    description = "Graphite relay output: routes, consistent hashing, disk spools, aggregators, admin API."
    Config = GraphiteOutConfig
    enabled_by_default = False
    provides = ("output",)

    def __init__(self) -> None:
        self.outputs: list[GraphiteOutput] = []

    def start(self, ctx: StartContext, config: GraphiteOutConfig) -> None:
        output = GraphiteOutput(
            config,
            spool_dir=ctx.plugin_data_dir() / "spool",
            config_dir=ctx.config_dir,
            grace_period=ctx.grace_period,
        )
        self.outputs.append(output)
        ctx.add_output(output, config)
        for port in admin_ports(config, AdminActions(output)):
            ctx.add_service(port, port.key.replace("_", "-"))


def admin_ports(config: GraphiteOutConfig, actions: AdminActions) -> list[AdminPort]:
    """The admin ports the config switches on, serving `actions`."""
    ports: list[AdminPort] = []
    for key, port_type in (("admin_http", AdminHttpPort), ("admin_line", AdminLinePort)):
        address = parse_listen_address(getattr(config, key), key)
        if address is not None:
            ports.append(port_type(address, actions))
    return ports


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [GraphiteOutPlugin]


@hookimpl
def agent_pipeline_started(plugin_names: list[str], elements: list[Any]) -> None:
    """Gives every graphite-out output the recent-bad-lines registries of the pipeline's sources."""
    outputs = [element.obj for element in elements if isinstance(element.obj, GraphiteOutput)]
    if outputs:
        registries = find_recent_bad_lines(elements)
        for output in outputs:
            output.bad_line_sources = registries


@hookimpl
def agent_control_sections(plugins: dict[str, Plugin]) -> list[ControlSection]:
    """The status page's and `agent top`'s view of each graphite-out output: its destinations (up or
    down, queue, spool) and the recent bad lines of the Graphite listeners; `agent control run` can list
    the routes."""
    plugin = plugins.get(GraphiteOutPlugin.name)
    if not isinstance(plugin, GraphiteOutPlugin):
        return []
    sections = []
    for output in plugin.outputs:
        actions = AdminActions(output)
        sections.append(
            ControlSection(
                "graphite-out destinations",
                lambda actions=actions: [_destination_row(d) for d in actions.destinations()],
                commands={"routes": lambda _args, actions=actions: actions.routes()},
            )
        )
        sections.append(
            ControlSection(
                "graphite recent bad lines",
                lambda actions=actions: [
                    {"peer": b["peer"], "reason": b["reason"], "line": b["line"]}
                    for b in actions.bad_lines()[-10:]
                ],
            )
        )
    return sections


def _destination_row(stats: dict[str, Any]) -> dict[str, Any]:
    return {
        "route": stats["route"],
        "address": stats["address"],
        "state": stats["state"],
        "queued": stats["queue_points"],
        "queue max": stats["queue_max_points"],
        "spool bytes": stats["spool_bytes"],
        "sent": stats["sent"],
        "dropped": stats["dropped_total"],
        "down for (s)": stats["down_for_seconds"],
        "last error": stats["last_error"] or "",
    }
