"""The hooks that plugins implement, grouped by lifecycle phase.

Every hook is called with keyword arguments, so a hook can gain a parameter later without breaking
plugins that do not take it. Hooks are synchronous: they describe, build and configure. The running work
is the `poll`/`run`/`write` coroutines of the elements a plugin adds in `Plugin.start`.

A plugin distribution implements these hooks in a module (or object) that it declares under the
entry-point group `agent.plugins`:

    [project.entry-points."agent.plugins"]
    rapl = "agent_rapl.plugin"

and marks the implementations with `agent.hookimpl`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from agent.plugin import CommandLineFlag, ControlSection, Plugin

PROJECT_NAME = "agent"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)


# -- discovery --


@hookspec
def agent_plugins() -> list[type[Plugin]]:
    """Returns the plugin classes this module provides (usually one).

    Called once, when the agent builds its plugin list, before the config is read. Every result is
    collected: each implementation adds its classes. A class is a `agent.plugin.Plugin` subclass with a
    unique `name`; two plugins with the same name are an error naming both origins.
    """


@hookspec
def agent_command_line_flags() -> list[CommandLineFlag]:
    """Returns command-line flags that enable one of this module's plugins and set one of its keys.

    Called once when the `agent` command is built, before its arguments are parsed; the flags appear in
    `agent --help`. A flag given on the command line enables its plugin (even when `--plugins` or the
    config file leaves it out) and sets `key` in its table to the flag's value; a bad value is reported
    under the flag's name (`config error: --relay-out: ...`). Every result is collected; two modules
    declaring the same flag is an error naming both plugins. Example: the relay client declares
    `--relay-out HOST:PORT`, which sets `[plugins.relay-client] relay_server`.
    """


# -- lifecycle --


@hookspec
def agent_pipeline_started(plugin_names: list[str], elements: list[Any]) -> None:
    """Called once every plugin started and the pipeline runs (listeners are bound).

    `plugin_names` are the enabled plugins, `elements` the `agent.plugin.Element`s they added. Use it
    to announce readiness (a log line, a systemd notification). Every implementation is called; results
    are ignored.
    """


@hookspec
def agent_pipeline_stopped(counters: dict[str, dict[str, int]]) -> None:
    """Called once after the pipeline drained at shutdown, before the plugins' `stop`.

    `counters` maps each output's name to its `received`, `written`, `dropped` and `queued` points.
    Every implementation is called; results are ignored.
    """


# -- operator's view --


@hookspec
def agent_control_sections(plugins: dict[str, Plugin]) -> list[ControlSection]:
    """Called once when the agent runs, after every plugin started and before the pipeline starts.

    `plugins` maps each enabled plugin's name to its started `agent.plugin.Plugin` instance: find yours
    by its name (the hook is called for every implementation, not only the one of a plugin in use).
    Return the `agent.plugin.ControlSection`s it contributes (status rows and commands shown by
    `agent control status`, the status page and `agent top`, and run with `agent control run`), or an
    empty list. Every result is collected, in registration order.
    """
