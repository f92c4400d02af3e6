"""Starts the enabled plugins and runs their pipeline until a signal, `--once`, or an `exec` command ends.

This is where the config, the plugins and the pipeline meet: `Agent.start_plugins` calls each plugin's
`start` (a failure is reported with the plugin's name), then `Agent.run` runs the pipeline on trio,
handling SIGINT and SIGTERM as "drain and exit 0" (a second signal exits at once). Once the pipeline
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

from agent.config import AgentConfig
from agent.errors import StartupError, describe_exception
from agent.events import EventBus
from agent.manager import PluginEntry
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
    ) -> None:
        """With `control`, `run` serves the control API (agent.control): the Unix socket
        `DATA_DIR/control.sock`, and HTTP when `[agent] http` is set. The CLI's agent does."""
        self.config = config
        self.control = control
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
        data_dir = self.config.data_dir
        for name, plugin_config in self.config.plugins.items():
            plugin = self.available[name].cls()
            ctx = StartContext(
                name,
                self.registry,
                data_dir,
                config_dir=self.config.path.parent if self.config.path is not None else None,
                grace_period=float(self.config.agent.grace_period),
                events=self.events,
                legacy_agent_config=self.config,
            )
            try:
                plugin.start(ctx, plugin_config)
            except Exception as exc:
                log.debug("plugin %s start failure", name, exc_info=True)
                self.stop_plugins()
                raise PluginStartError(f"plugin {name} failed to start: {describe_exception(exc)}") from exc
            self._handles.append(ctx.pipeline)
            self.started[name] = plugin
            self._started_names.append(name)
            self.elements += ctx.elements
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

    def stop_plugins(self) -> None:
        for name, plugin in reversed(list(self.started.items())):
            try:
                plugin.stop()
            except Exception as exc:
                log.error("plugin %s failed to stop cleanly: %s", name, describe_exception(exc))
        self.started.clear()

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
                    nursery.start_soon(
                        self._watch_signals, pipeline, nursery.cancel_scope, final_poll_on_signal
                    )
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

        self.controller = control.Controller(pipeline, stop=pipeline.stop, sections=sections)
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
        self, pipeline: Pipeline, scope: trio.CancelScope, final_poll: bool = False
    ) -> None:
        first_at: float | None = None
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
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

    def _hook(self, name: str, **kwargs: Any) -> None:
        if self.pm is None:
            return
        try:
            getattr(self.pm.hook, name)(**kwargs)
        except Exception as exc:
            log.error("hook %s failed: %s", name, describe_exception(exc))


__all__ = ["READY_PREFIX", "Agent", "PluginStartError", "StartupError", "ready_line"]
