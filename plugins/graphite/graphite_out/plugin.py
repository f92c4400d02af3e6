"""The `graphite-out` plugin: registers the output and connects it to graphite-in's recent bad lines.

The work is done by `output.GraphiteOutput` (routing and destinations) and the admin ports; this module
is what the agent loads: the plugin class and its two hooks.
"""

from __future__ import annotations

import logging
from typing import Any

from agent import Plugin, StartContext, hookimpl
from agent.plugin import ControlSection
from agent_plugins.graphite.protocol.badlines import find_recent_bad_lines

from .config import GraphiteOutConfig
from .control import AdminActions
from .output import GraphiteOutput

log = logging.getLogger(__name__)


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
        # Bound now, so that a port in use is a startup error naming the port, not a crash loop later.
        output.bind_admin_ports()
        self.outputs.append(output)
        ctx.add_output(output, config)

    def stop(self) -> None:
        for output in self.outputs:
            output.close_admin_ports()


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
