"""Starts the enabled plugins and runs their pipeline until a signal, `--once`, or an `exec` command ends.

This is where the config, the plugins and the pipeline meet: `Agent.start_plugins` calls each plugin's
`start` (a failure is reported with the plugin's name), then `Agent.run` runs the pipeline on trio,
handling SIGINT and SIGTERM as "drain and exit 0" (a second signal exits at once), and SIGHUP as "reload
the config file" (`Agent.reload`: the plugins whose table changed restart, the others run on). Once the pipeline
is started it logs one machine-readable readiness line, `agent: ready: {"graphite-in": {"plaintext":
["127.0.0.1:40123"]}, ...}`, with what each element reported when it came up.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Sequence
from typing import Any

import msgspec
import pluggy
import trio

from agent import config as config_mod
from agent.config import AgentConfig, ConfigError, Overrides
from agent.errors import ReloadError, StartupError, describe_exception
from agent.events import EventBus
from agent.manager import PluginEntry, PluginLoadError, check_enabled
from agent.model import MetricDef, MetricRegistry
from agent.pipeline import SELF_METRICS, Pipeline
from agent.plugin import Element, Plugin, RunningPipeline, StartContext

log = logging.getLogger(__name__)


#: A second SIGINT/SIGTERM within this many seconds of the first is the same request delivered twice;
#: a later one means "exit now, without waiting for the outputs".
DUPLICATE_SIGNAL_WINDOW = 1.0


#: The start of the one line that the "agent" logger (as for "started plugins: ...") logs once the
#: pipeline is started (every output, service and autonomous source up); the rest of the line is
#: `ready_line`'s JSON. Tests and supervisors wait for it (`agent.testing.run_agent` reads the bound
#: ports from it).
READY_PREFIX = "ready: "


def ready_line(ready: dict[str, Any]) -> str:
    """What each element passed to `task_status.started` (bound addresses...), as one line of JSON
    keyed by element name; a value JSON cannot hold (an object) is shown with `str`."""
    return msgspec.json.encode(ready, enc_hook=str).decode()


class PluginStartError(Exception):
    """A plugin's `start` failed; the message names the plugin and says why."""


class Agent:
    """One agent: its config, its started plugins and its pipeline."""

    def __init__(
        self,
        config: AgentConfig,
        plugins: dict[str, PluginEntry],
        pm: pluggy.PluginManager | None = None,
        *,
        control: bool = False,
        overrides: Overrides | None = None,
    ) -> None:
        """With `control`, `run` serves the control API (agent.control): the Unix socket
        `DATA_DIR/control.sock`, and HTTP when `[agent] http` is set. The CLI's agent does.
        `overrides` (the command line's) apply again when the config file is reloaded."""
        self.config = config
        self.control = control
        self.overrides = overrides
        self._reload_lock = trio.Lock()
        #: Each started plugin's elements and start context, by plugin name (for a reload).
        self._contexts: dict[str, StartContext] = {}
        #: The running Controller (with `control`), and the HTTP address it is bound to.
        self.controller: Any = None
        self.http_address: str | None = None
        self.available = plugins
        self.pm = pm
        self.registry = MetricRegistry()
        #: Consumers and resources that come and go: `agent exec` and sources publish, plugins listen.
        self.events = EventBus()
        self.started: dict[str, Plugin] = {}
        self._started_names: list[str] = []
        self._handles: list[RunningPipeline] = []
        self.elements: list[Element] = []
        self.pipeline: Pipeline | None = None
        #: Set when a second signal ended the agent without draining; 0 otherwise.
        self.forced_exit_code = 0

    @property
    def started_names(self) -> list[str]:
        """The plugins started (kept after `stop_plugins`, unlike `started`)."""
        return self._started_names

    def start_plugins(self, extra_elements: Sequence[Element] = ()) -> Pipeline:
        """Calls `start` on every enabled plugin, in config order, and builds the pipeline.
        `extra_elements` come after the plugins' elements (`agent exec`'s summary observer, a transform
        that must see what the plugins' transforms added)."""
        for name, plugin_config in self.config.plugins.items():
            try:
                self.elements += self._start_plugin(name, plugin_config)
            except PluginStartError:
                self.stop_plugins()
                raise
        self.elements += extra_elements
        # Transforms run in the order their elements were added: the plugins start in config order
        # (the order of the [plugins.*] tables, kept by agent.config.resolve).
        if self.config.agent.self_metrics_interval > 0:
            for metric, unit, description in SELF_METRICS:
                self.registry.register(MetricDef(metric, unit, "int", description))
        self.pipeline = Pipeline(
            self.elements,
            source_channel_size=self.config.agent.source_channel_size,
            self_metrics_interval=float(self.config.agent.self_metrics_interval),
        )
        for handle in self._handles:
            handle.bind(self.pipeline)
        return self.pipeline

    def _start_plugin(self, name: str, plugin_config: Any) -> list[Element]:
        """Calls one plugin's `start`; returns the elements it added. PluginStartError names it."""
        plugin = self.available[name].cls()
        ctx = StartContext(
            name,
            self.registry,
            self.config.data_dir,
            config_dir=self.config.path.parent if self.config.path is not None else None,
            grace_period=float(self.config.agent.grace_period),
            events=self.events,
            legacy_agent_config=self.config,
        )
        try:
            plugin.start(ctx, plugin_config)
        except Exception as exc:
            log.debug("plugin %s start failure", name, exc_info=True)
            for unsubscribe in ctx.subscriptions:
                unsubscribe()
            raise PluginStartError(f"plugin {name} failed to start: {describe_exception(exc)}") from exc
        self.started[name] = plugin
        self._contexts[name] = ctx
        self._handles.append(ctx.pipeline)
        if self.pipeline is not None:  # started by a reload: the pipeline runs already
            ctx.pipeline.bind(self.pipeline)
        if name not in self._started_names:
            self._started_names.append(name)
        return ctx.elements

    def _stop_plugin(self, name: str) -> None:
        plugin = self.started.pop(name)
        ctx = self._contexts.pop(name, None)
        if ctx is not None:
            for unsubscribe in ctx.subscriptions:
                unsubscribe()
            if ctx.pipeline in self._handles:
                self._handles.remove(ctx.pipeline)
        try:
            plugin.stop()
        except Exception as exc:
            log.error("plugin %s failed to stop cleanly: %s", name, describe_exception(exc))

    def stop_plugins(self) -> None:
        for name in reversed(list(self.started)):
            self._stop_plugin(name)

    async def run(
        self,
        *,
        once: bool = False,
        handle_signals: bool = True,
        final_poll_on_signal: bool = False,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Runs the pipeline until stopped (signal, `stop()`, or after one poll with `once`).

        With `final_poll_on_signal`, SIGINT and SIGTERM make every polled source poll once more before
        it stops (`agent exec`: the measurement covers the command up to its end)."""
        pipeline = self.pipeline or self.start_plugins()
        try:
            async with trio.open_nursery() as nursery:
                if handle_signals:
                    nursery.start_soon(self._watch_signals, pipeline, nursery, final_poll_on_signal)
                finished = trio.Event()

                async def run_pipeline(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
                    await pipeline.run(
                        once=once, grace_period=float(self.config.agent.grace_period), task_status=task_status
                    )
                    finished.set()

                sections = self._collect_sections()
                if self.control:
                    await self._start_control(nursery, pipeline, sections)
                await nursery.start(run_pipeline)
                logging.getLogger("agent").info("%s%s", READY_PREFIX, ready_line(pipeline.ready))
                self._hook(
                    "agent_pipeline_started", plugin_names=list(self.started), elements=list(self.elements)
                )
                task_status.started()
                await finished.wait()
                self._hook("agent_pipeline_stopped", counters=pipeline.counters())
                nursery.cancel_scope.cancel()
        finally:
            self.stop_plugins()

    def _collect_sections(self) -> list[Any]:
        """The plugins' status sections and commands (hook `agent_control_sections`)."""
        if self.pm is None:
            return []
        try:
            results = self.pm.hook.agent_control_sections(plugins=dict(self.started))
        except Exception as exc:
            log.error("hook agent_control_sections failed: %s", describe_exception(exc))
            return []
        return [section for result in results for section in result or []]

    async def _start_control(self, nursery: trio.Nursery, pipeline: Pipeline, sections: list[Any]) -> None:
        """The control API's servers, as core tasks: bound before the pipeline starts, so that a path
        that is too long or a port in use is a start error (exit 1) naming it."""
        from agent import control
        from agent.control_http import serve_http

        self.controller = control.Controller(
            pipeline, stop=pipeline.stop, sections=sections, reload=self.reload
        )
        await nursery.start(
            control.serve_control_socket, self.controller, control.socket_path(self.config.data_dir)
        )
        agent_section = self.config.agent
        if agent_section.http:
            try:
                self.http_address = await nursery.start(
                    serve_http, self.controller, agent_section.http, agent_section.http_token
                )
            except OSError as exc:
                raise StartupError(f"[agent] http: {exc.strerror or exc}") from None

    def stop(self, final_poll: bool = False) -> None:
        if self.pipeline is not None:
            self.pipeline.stop(final_poll=final_poll)

    async def _watch_signals(
        self, pipeline: Pipeline, nursery: trio.Nursery, final_poll: bool = False
    ) -> None:
        """SIGINT and SIGTERM stop the agent (a second one, later, at once); SIGHUP reloads the config."""
        scope = nursery.cancel_scope
        first_at: float | None = None
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    log.info("SIGHUP received: reloading %s", self.config.path)
                    # In its own task: a reload waits for outputs to drain, and SIGTERM must still work.
                    nursery.start_soon(self._reload_logged)
                    continue
                if first_at is None:
                    first_at = trio.current_time()
                    log.info(
                        "%s received: stopping sources and writing what is buffered (grace period %s)",
                        name,
                        self.config.agent.grace_period,
                    )
                    pipeline.stop(final_poll=final_poll)
                elif trio.current_time() - first_at < DUPLICATE_SIGNAL_WINDOW:
                    # The same stop delivered twice (`timeout` signals the child and its process
                    # group; a supervisor may signal the whole group): not a request to hurry.
                    log.info(
                        "%s again within %ss: the same stop request (another one later exits at once)",
                        name,
                        DUPLICATE_SIGNAL_WINDOW,
                    )
                    continue
                else:
                    log.warning("second %s: exiting without waiting for the outputs", name)
                    # Buffered points are given up: the exit code says so (128 + the signal, as a shell does).
                    self.forced_exit_code = 128 + signum
                    scope.cancel()
                    return

    # -- reloading the config file (SIGHUP, `agent control reload`) --

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except ReloadError:
            pass  # logged by reload
        except Exception as exc:
            # A reload must never take the running agent down with it.
            log.error("reload failed: %s", describe_exception(exc))
            log.debug("reload failure", exc_info=True)

    async def reload(self) -> dict[str, Any]:
        """Reads the config file again and applies it to the running pipeline: the plugins whose table
        changed are stopped (their outputs drained) and started again with the new table, removed or
        disabled ones are stopped, new ones started; the others keep running untouched. A file with an
        error changes nothing: one log line, and ReloadError. `[agent]` changes need a restart (logged).
        Returns what changed: {"restarted": [...], "started": [...], "stopped": [...], "failed": [...],
        "restart_needed": [...]}."""
        async with self._reload_lock:
            pipeline = self.pipeline
            if pipeline is None or pipeline.stopping:
                raise ReloadError("the agent is not running (stopping, or not started yet)")
            old = self.config
            try:
                if old.path is None:
                    raise ConfigError("", "the agent runs without a config file")
                new = config_mod.load(old.path, self.available, self.overrides)
                # Only the plugins that start now: the others were checked (and warned about) at start.
                check_enabled(self.available, [n for n in new.plugins if n not in old.plugins])
            except (ConfigError, PluginLoadError) as exc:
                log.error("reload: %s; keeping the running configuration", exc)
                raise ReloadError(str(exc)) from None
            result: dict[str, list[str]] = {
                "restarted": [],
                "started": [],
                "stopped": [],
                "failed": [],
                "restart_needed": [],
            }
            before, after = msgspec.structs.asdict(old.agent), msgspec.structs.asdict(new.agent)
            result["restart_needed"] = [key for key in before if before[key] != after[key]]
            if result["restart_needed"]:
                log.warning(
                    "reload: [agent] %s changed: applies only after a restart (the running values are kept)",
                    ", ".join(result["restart_needed"]),
                )
            changed = [n for n in old.plugins if n in new.plugins and old.plugins[n] != new.plugins[n]]
            removed = [n for n in old.plugins if n not in new.plugins]
            added = [n for n in new.plugins if n not in old.plugins]
            reordered = [n for n in new.plugins if n in old.plugins] != [
                n for n in old.plugins if n in new.plugins
            ]
            if not (changed or removed or added or reordered):
                if not result["restart_needed"]:
                    log.info("reload: config unchanged")
                return result

            # Stop what changed or went away (their outputs drain), then start the new tables.
            running = {n: c for n, c in old.plugins.items() if n not in removed}
            leaving = [n for n in old.plugins if n in changed or n in removed]
            # Every element of theirs, with the sources they added while running.
            names = {e.full_name for e in pipeline.elements if e.plugin in leaving}
            names |= {n for n, state in pipeline.sources.items() if state.element.plugin in leaving}
            await pipeline.remove_elements(names, float(old.agent.grace_period))
            self.elements = [e for e in self.elements if e.full_name not in names]
            for name in reversed(leaving):
                if name in self.started:
                    self._stop_plugin(name)
            for name in removed:
                log.info("reload: plugin %s stopped (its table is gone or disabled)", name)
                result["stopped"].append(name)
            order = list(new.plugins)
            for name, table in new.plugins.items():
                if name not in changed and name not in added:
                    continue
                try:
                    await self._start_in_pipeline(name, table, order)
                except (PluginStartError, StartupError) as exc:
                    result["failed"].append(name)
                    if name in added:
                        log.error("reload: %s; the plugin stays off", exc)
                        continue
                    try:
                        await self._start_in_pipeline(name, old.plugins[name], order)
                    except (PluginStartError, StartupError) as again:
                        log.error(
                            "reload: %s; with its previous table too: %s; the plugin is off", exc, again
                        )
                        running.pop(name)
                    else:
                        log.error("reload: %s; running again with its previous table", exc)
                    continue
                running[name] = table
                if name in changed:
                    log.info("reload: plugin %s restarted with its new table", name)
                    result["restarted"].append(name)
                else:
                    log.info("reload: plugin %s started", name)
                    result["started"].append(name)
            if reordered and not pipeline.stopping:
                await pipeline.add_elements([], order)
                log.info("reload: transforms now run in the order of the tables: %s", ", ".join(order))
            self.config = AgentConfig(
                agent=old.agent,
                path=old.path,
                plugins={n: running[n] for n in [*new.plugins, *old.plugins] if n in running},
                disabled=new.disabled,
            )
            if self.controller is not None:
                self.controller.elements_changed(self._collect_sections())
            return result

    async def _start_in_pipeline(self, name: str, table: Any, order: list[str]) -> None:
        elements = self._start_plugin(name, table)
        try:
            await self.pipeline.add_elements(elements, order)  # type: ignore[union-attr]
        except BaseException:
            self._stop_plugin(name)
            raise
        self.elements += elements

    def _hook(self, name: str, **kwargs: Any) -> None:
        if self.pm is None:
            return
        try:
            getattr(self.pm.hook, name)(**kwargs)
        except Exception as exc:
            log.error("hook %s failed: %s", name, describe_exception(exc))


__all__ = ["READY_PREFIX", "Agent", "PluginStartError", "ReloadError", "StartupError", "ready_line"]
