"""Builds the plugin manager: the built-in plugins from one explicit list, then third-party plugins from
the `agent.plugins` entry-point group. Built in a function and passed around, never at import time, so
that tests can build one with exactly the plugins they want.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType

import pluggy

from agent import __version__, hookspecs
from agent.api import API_VERSION, InvalidApiRange, api_accepts
from agent.hookspecs import PROJECT_NAME
from agent.plugin import CommandLineFlag, Plugin

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "agent.plugins"

#: The built-in plugins, by module. Each module implements `agent_plugins`.
BUILTIN_PLUGIN_MODULES: tuple[str, ...] = (
    "agent_plugins.system.plugin",
    "agent_plugins.csv.plugin",
    "agent_plugins.sqlite.plugin",
    "agent_plugins.console.plugin",
    "agent_plugins.synthetic.plugin",
    "agent_plugins.discard.plugin",
    "agent_plugins.filter.plugin",
    "agent_plugins.aggregation.plugin",
    "agent_plugins.measure.procfs.plugin",
    "agent_plugins.measure.cgroups.plugin",
    "agent_plugins.measure.energy_estimation_tdp.plugin",
    "agent_plugins.measure.energy_attribution.plugin",
    "agent_plugins.measure.energy_to_carbon.plugin",
    "agent_plugins.relay.relay_client.plugin",
    "agent_plugins.relay.relay_server.plugin",
    "agent_plugins.relay.nats_out.plugin",
    "agent_plugins.relay.nats_in.plugin",
    "agent_plugins.graphite.graphite_in.plugin",
    "agent_plugins.graphite.graphite_out.plugin",
    "agent_plugins.graphite.amqp_in.plugin",
    "agent_plugins.graphite.http_in.plugin",
    "agent_plugins.postgres.plugin",
    "agent_plugins.prometheus.plugin",
    "agent_plugins.influxdb.plugin",
)


class PluginLoadError(Exception):
    """A plugin could not be loaded or declared something invalid."""


@dataclass(frozen=True)
class PluginEntry:
    """A plugin class and where it came from ("built-in" or "DIST VERSION").

    `distribution` and `distribution_version` name the installed distribution (the agent's own for a
    built-in). `refusal` says why the plugin cannot run on this agent (its `agent_api` range excludes
    `API_VERSION`), None when it can: a refused plugin is listed, and enabling it is an error.
    """

    cls: type[Plugin]
    origin: str
    distribution: str = "measurement-agent"
    distribution_version: str = __version__
    refusal: str | None = None

    @property
    def builtin(self) -> bool:
        return self.origin == "built-in"

    def describe(self) -> str:
        """`plugin 'NAME' (from DIST VERSION)`, as load errors name a plugin."""
        where = "" if self.builtin else f" (from {self.origin})"
        return f"plugin {self.cls.name!r}{where}"


def build_plugin_manager(
    builtins: tuple[str, ...] | list[ModuleType | object] = BUILTIN_PLUGIN_MODULES,
    load_entry_points: bool = True,
) -> pluggy.PluginManager:
    """Registers the hook specs, the built-ins and (unless disabled) the entry-point plugins, then
    checks that every hook implementation matches a spec (a misspelled hook is an error)."""
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for item in builtins:
        module = importlib.import_module(item) if isinstance(item, str) else item
        name = item if isinstance(item, str) else getattr(item, "__name__", repr(item))
        if pm.get_plugin(name) is None:
            try:
                pm.register(module, name=name)
            except pluggy.PluginValidationError as exc:
                raise PluginLoadError(_invalid_plugin(pm, exc)) from exc
    if load_entry_points:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except pluggy.PluginValidationError as exc:  # a hook with parameters its spec does not have
            raise PluginLoadError(_invalid_plugin(pm, exc)) from exc
        except Exception as exc:  # a broken third-party package must say which one it is
            raise PluginLoadError(_entry_point_failure(pm, exc)) from exc
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:  # a misspelled hook name
        raise PluginLoadError(_invalid_plugin(pm, exc)) from exc
    return pm


def _invalid_plugin(pm: pluggy.PluginManager, exc: pluggy.PluginValidationError) -> str:
    name = pm.get_name(exc.plugin) or getattr(exc.plugin, "__name__", repr(exc.plugin))
    dist = next((d for p, d in pm.list_plugin_distinfo() if p is exc.plugin), None)
    origin = f" (from {dist.project_name} {dist.version})" if dist is not None else ""
    known = ", ".join(sorted(n for n in dir(hookspecs) if n.startswith("agent_")))
    problem = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"plugin {name!r}{origin}: {problem} (the hooks are: {known})"


def _entry_point_failure(pm: pluggy.PluginManager, exc: Exception) -> str:
    """Names the distribution whose entry point failed to load (pluggy's error does not)."""
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            ep.load()
        except Exception as ep_exc:
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "an unknown distribution"
            return (
                f"the entry point {ep.name} = {ep.value!r} of {dist} cannot be loaded:"
                f" {type(ep_exc).__name__}: {ep_exc}"
            )
    return f"loading plugins from entry points {ENTRY_POINT_GROUP!r} failed: {type(exc).__name__}: {exc}"


def collect_command_line_flags(
    pm: pluggy.PluginManager, plugins: dict[str, PluginEntry]
) -> list[CommandLineFlag]:
    """Calls `agent_command_line_flags` on every registered module; checks each flag names an installed
    plugin and is declared once."""
    found: dict[str, CommandLineFlag] = {}
    for impl in pm.hook.agent_command_line_flags.get_hookimpls():
        try:
            flags = impl.function()
        except Exception as exc:
            raise PluginLoadError(
                f"plugin module {impl.plugin_name!r} failed to list its command-line flags: {exc}"
            ) from exc
        for flag in flags or ():
            if not isinstance(flag, CommandLineFlag) or not flag.flag.startswith("--"):
                raise PluginLoadError(
                    f"plugin module {impl.plugin_name!r} returned {flag!r}, not a CommandLineFlag('--name', ...)"
                )
            if flag.plugin not in plugins:
                raise PluginLoadError(
                    f"plugin module {impl.plugin_name!r} declares {flag.flag} for {flag.plugin!r},"
                    " which is not an installed plugin"
                )
            if flag.flag in found:
                raise PluginLoadError(
                    f"two plugins declare {flag.flag}: {found[flag.flag].plugin!r} and {flag.plugin!r}"
                )
            found[flag.flag] = flag
    return list(found.values())


def collect_plugins(pm: pluggy.PluginManager) -> dict[str, PluginEntry]:
    """Calls `agent_plugins` on every registered module; returns plugin classes by name, in order."""
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    found: dict[str, PluginEntry] = {}
    for impl in pm.hook.agent_plugins.get_hookimpls():  # in registration order: built-ins first
        dist = dists.get(id(impl.plugin))
        origin = f"{dist.project_name} {dist.version}" if dist is not None else "built-in"
        distribution = (
            (dist.project_name, dist.version) if dist is not None else ("measurement-agent", __version__)
        )
        try:
            classes = impl.function()
        except Exception as exc:
            raise PluginLoadError(
                f"plugin module {impl.plugin_name!r} failed to list its plugins: {exc}"
            ) from exc
        for cls in classes or ():
            if not (isinstance(cls, type) and issubclass(cls, Plugin)) or not getattr(cls, "name", ""):
                raise PluginLoadError(
                    f"plugin module {impl.plugin_name!r} returned {cls!r}, not a named Plugin class"
                )
            if cls.name in found:
                raise PluginLoadError(
                    f"two plugins are named {cls.name!r}: from {found[cls.name].origin} and from {origin}"
                )
            entry = PluginEntry(cls, origin, *distribution)
            try:
                accepted = api_accepts(cls.agent_api)
            except InvalidApiRange as exc:
                raise PluginLoadError(f"{entry.describe()}: {exc}") from None
            if not accepted:
                entry = PluginEntry(
                    cls,
                    origin,
                    *distribution,
                    refusal=f"it wants agent API {cls.agent_api} and this agent has API {API_VERSION}",
                )
            found[cls.name] = entry
    return found


def check_enabled(plugins: dict[str, PluginEntry], enabled: Iterable[str]) -> None:
    """Before the enabled plugins start: a refused one is an error (PluginLoadError, one line naming
    the plugin, its distribution, the range it wants and the agent's API version); one that declares
    no `agent_api` is assumed to work, with a warning."""
    for name in enabled:
        entry = plugins[name]
        if entry.refusal is not None:
            raise PluginLoadError(f"{entry.describe()} is refused: {entry.refusal}")
        if entry.cls.agent_api is None:
            log.warning(
                "%s declares no agent_api; assuming it works with API %s"
                ' (declare the range it was written for, such as agent_api = ">=1,<2")',
                entry.describe(),
                API_VERSION,
            )
