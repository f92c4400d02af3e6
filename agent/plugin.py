"""The plugin API: what a plugin is, the elements it adds to the pipeline, and its start context.

A plugin is a `Plugin` subclass: a name, a version, a config Struct with defaults (`Config`), and a
`start` step in which it registers metrics and adds elements through the `StartContext`:

- `PolledSource`: the core calls `poll` every `poll_interval`, and hands the points to the pipeline
  every `flush_interval` (several polls in one batch);
- `AutonomousSource`: a trio task (a listener, a subscriber) that pushes batches when it has them;
- `Transform`: rewrites or drops batches, in config order;
- `Output`: writes batches. Most outputs implement `write` (the core queues, batches, retries and
  acknowledges for them); outputs that pipeline their own work (network clients) implement `run` over
  the `OutputInbox` and acknowledge each envelope themselves.

Plugins are found through pluggy (see `agent.hookspecs` and `agent.manager`). Hooks only describe and
build: the running work is the `run`/`poll`/`write` coroutines, which the core starts in its nursery.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import msgspec
import trio

from agent.api import warn_deprecated
from agent.events import EventBus, EventKind, Listener
from agent.inbox import AckCallback, OutputInbox, run_write_loop
from agent.model import Batch, MetricDef, MetricRegistry, ValueType
from agent.units import Duration, NonNegativeDuration, PositiveDuration


class PluginConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of every plugin's config Struct: the `[plugins.NAME]` table.

    Subclasses add their own keys with defaults. Unknown keys are errors, so a typo never goes unnoticed.
    """

    enable: bool = False


OverflowPolicy = Literal["block", "drop_oldest"]


class OutputConfig(PluginConfig, kw_only=True):
    """Base for output plugins: the keys that control the output's own queue."""

    # How many points may wait for this output before the overflow policy applies.
    queue_max_points: int = msgspec.field(default=1_000_000)
    # What happens when the queue is full: "block" holds back the sources (and so every output),
    # "drop_oldest" drops the oldest queued points and counts them (the default: a slow or dead
    # output must not stall the others).
    overflow: OverflowPolicy = "drop_oldest"


class PolledSourceConfig(PluginConfig, kw_only=True):
    """Base for the config of a plugin that adds a polled source: how often it measures, and how often
    its points go to the outputs (several polls in one batch)."""

    poll_interval: PositiveDuration = PositiveDuration(1.0)
    flush_interval: NonNegativeDuration = NonNegativeDuration(1.0)

    def __post_init__(self) -> None:
        if self.flush_interval and self.flush_interval < self.poll_interval:
            raise ValueError(
                f"flush_interval: must not be shorter than poll_interval ({self.poll_interval}),"
                f" got {self.flush_interval}"
            )


class PolledSource(abc.ABC):
    """A source that the core polls. Set `poll_interval` and `flush_interval` (seconds) on the instance,
    usually from the plugin's config; `flush_interval` is rounded to a whole number of polls."""

    poll_interval: float = 1.0
    flush_interval: float = 1.0

    @abc.abstractmethod
    async def poll(self, points: BatchBuilder, timestamp_ns: int) -> None:
        """Measures once, adding points to `points`. `timestamp_ns` is the time of this poll."""

    async def close(self) -> None:  # noqa: B027 (optional: most sources hold nothing)
        """Releases what the source holds (files, connections). Called once at shutdown."""


class SourceSink:
    """What an autonomous source pushes into. `send` waits while the pipeline is full (backpressure).

    `on_done`, if given, is called once with True when every output that took the batch has written it
    (handed to the OS, committed, acknowledged by a peer), or with False if any of them could not
    (dropped by an overflow policy, given up at shutdown). `send_and_wait` returns that result.
    """

    def __init__(self, send: Callable[[Batch, AckCallback | None], Awaitable[None]]):
        self._send = send

    async def send(self, batch: Batch, on_done: AckCallback | None = None) -> None:
        await self._send(batch, on_done)

    async def send_and_wait(self, batch: Batch) -> bool:
        done = trio.Event()
        result = [False]

        def record(ok: bool) -> None:
            result[0] = ok
            done.set()

        await self._send(batch, record)
        await done.wait()
        return result[0]


class AutonomousSource(abc.ABC):
    """A source that runs on its own: a listener, a subscriber, a load generator."""

    @abc.abstractmethod
    async def run(
        self, sink: SourceSink, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Runs until cancelled (or until it has nothing more to send), pushing batches into `sink`.
        Call `task_status.started(value)` once ready (listening), so that the core, the CLI and tests
        know it is up; `value` is typically the bound address."""


class Service(abc.ABC):
    """A long-running task that is neither a source nor an output: an admin listener, a control server,
    a subscription. Added with `StartContext.add_service`; the core starts it after the outputs and
    before the sources, and cancels it once the outputs have drained at shutdown."""

    @abc.abstractmethod
    async def run(self, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Runs until cancelled. Call `task_status.started(value)` once ready (listening): the agent
        reports "started" only when every service is. Failing before that is a startup error (the agent
        exits 1 with one line naming the service); failing later is logged and restarted with backoff."""


class Transform(abc.ABC):
    """Rewrites a batch. Return the batch (changed in place or new), or None to drop all of it."""

    @abc.abstractmethod
    def apply(self, batch: Batch) -> Batch | None:
        """Called by the dispatcher for every batch, in config order; an exception is logged and the
        batch goes on unchanged."""

    def finish(self) -> Batch | None:
        """Called once at shutdown, after the last batch: returns the points the transform still holds
        (an aggregation's open windows), which go through the transforms after it to the outputs."""
        return None


class Output:
    """Writes batches. Implement `write` (simple outputs) or `run` (outputs that manage their own flow).

    With `write`, the core takes envelopes from the output's queue, waits up to `flush_interval` to
    gather up to `batch_max_points`, calls `write` with the batches, acknowledges them when it returns,
    and retries with backoff (keeping the batches, in order) when it raises.
    """

    #: How long to gather points before a write (0: write as soon as points are there).
    flush_interval: float = 0.0
    #: Upper bound of points per write call.
    batch_max_points: int = 100_000

    async def open(self) -> None:
        """Called once before the first write (open files, connect)."""

    async def write(self, batches: list[Batch]) -> None:
        """Writes the batches, returning once they are safe (handed to the OS, committed...)."""
        raise TypeError(f"{type(self).__name__} must implement write() or run()")

    async def close(self) -> None:
        """Called once after the last write, at shutdown."""

    async def run(
        self, inbox: OutputInbox, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The default loop over `write`. Override for full control: take envelopes with
        `inbox.receive_batch`, call `env.done(ok)` on each once written; return when the inbox is
        exhausted (shutdown)."""
        await run_write_loop(self, inbox, task_status)


class BatchBuilder:
    """Collects points for one batch, grouping them into series. Sources use `add` per point or
    `add_series` for columns they already have."""

    __slots__ = ("_series", "_index")

    def __init__(self) -> None:
        from agent.model import Series

        self._series: list[Series] = []
        self._index: dict[tuple[Any, ...], Series] = {}

    def add(
        self,
        metric: str,
        value: int | float,
        timestamp_ns: int,
        resource: Any,
        consumer: Any,
        attributes: dict[str, Any] | None = None,
    ) -> None:
        from agent.model import Series

        attrs = attributes or {}
        key = (metric, resource, consumer, tuple(sorted(attrs.items())) if attrs else ())
        series = self._index.get(key)
        if series is None:
            series = Series(metric, resource, consumer, dict(attrs), [], [])
            self._index[key] = series
            self._series.append(series)
        series.timestamps.append(timestamp_ns)
        series.values.append(value)

    def add_series(self, series: Any) -> None:
        self._series.append(series)

    def __len__(self) -> int:
        return sum(len(s.timestamps) for s in self._series)

    def take(self) -> Batch:
        """Returns the batch built so far and starts a new one."""
        batch = Batch(self._series)
        self._series = []
        self._index = {}
        return batch


@dataclass(frozen=True)
class CommandLineFlag:
    """A command-line flag that enables a plugin and sets one key of its table (see the hook
    `agent_command_line_flags`)."""

    #: The flag as typed, with its dashes: "--relay-out".
    flag: str
    #: The plugin it enables: "relay-client".
    plugin: str
    #: The key of `[plugins.PLUGIN]` that the flag's value sets: "relay_server".
    key: str
    #: What `agent --help` shows as the value: "HOST:PORT".
    metavar: str = "VALUE"
    help: str = ""


@dataclass
class Element:
    """An element added by a plugin, with the names used in logs, counters and `plugins list`."""

    plugin: str
    name: str
    kind: Literal["source", "transform", "output", "service"]
    obj: Any
    config: Any = None
    #: A source that starts paused: it does nothing until resumed (`RunningPipeline.resume`).
    start_paused: bool = False

    @property
    def full_name(self) -> str:
        return self.name if self.name == self.plugin else f"{self.plugin}/{self.name}"


class RunningPipeline:
    """What a plugin may do to the pipeline once it runs, through `StartContext.pipeline`: add sources
    (one per new consumer, where that is the plugin's design) and pause, resume or poll its own sources
    (a source started paused until an event says there is something to measure).

    Calls made before the pipeline is built are kept and applied when it is (the agent binds every
    plugin's handle right after building the pipeline). Names are the plugin's own element names.
    """

    def __init__(self, plugin_name: str) -> None:
        self.plugin_name = plugin_name
        self._pipeline: Any = None
        self._pending: list[tuple[str, Any]] = []

    def bind(self, pipeline: Any) -> None:
        """Called by the core (and by tests) with the `agent.pipeline.Pipeline` the plugin runs in."""
        self._pipeline = pipeline
        pending, self._pending = self._pending, []
        for action, argument in pending:
            getattr(self, action)(*argument)

    def _full_name(self, name: str | None) -> str:
        name = name or self.plugin_name
        return name if name == self.plugin_name else f"{self.plugin_name}/{name}"

    def add_source(self, source: PolledSource | AutonomousSource, name: str, paused: bool = False) -> None:
        """Adds and starts a source while the agent runs; `name` must be new among the plugin's sources."""
        if not isinstance(source, PolledSource | AutonomousSource):
            raise TypeError(f"{source!r} is neither a PolledSource nor an AutonomousSource")
        if self._pipeline is None:
            self._pending.append(("add_source", (source, name, paused)))
            return
        self._pipeline.add_source(Element(self.plugin_name, name, "source", source, start_paused=paused))

    def pause(self, name: str | None = None) -> None:
        self._set_paused(name, True)

    def resume(self, name: str | None = None) -> None:
        self._set_paused(name, False)

    def _set_paused(self, name: str | None, paused: bool) -> None:
        if self._pipeline is None:
            self._pending.append(("_set_paused", (name, paused)))
            return
        self._pipeline.set_paused(self._full_name(name), paused)

    def poll_now(self, name: str | None = None) -> None:
        if self._pipeline is None:
            self._pending.append(("poll_now", (name,)))
            return
        self._pipeline.poll_now(self._full_name(name))

    def remove_source(self, name: str) -> None:
        """Stops a source added while running (its consumer ended): it flushes what it holds and ends."""
        if self._pipeline is None:
            self._pending = [p for p in self._pending if not (p[0] == "add_source" and p[1][1] == name)]
            return
        self._pipeline.remove_source(self._full_name(name))


@dataclass
class StartContext:
    """Given to `Plugin.start`: register metrics and add elements here.

    `data_dir` is `[agent] data_dir` (see `plugin_data_dir`); `config_dir` the folder of the config
    file, against which relative paths in a plugin's table are resolved (None without a file);
    `grace_period` the seconds a shutdown may take, from the stop request to the last write;
    `events` the agent's event bus (see `agent.events`), shared by every plugin.
    """

    plugin_name: str
    registry: MetricRegistry
    data_dir: Path
    config_dir: Path | None = None
    grace_period: float = 10.0
    elements: list[Element] = field(default_factory=list)
    events: EventBus = field(default_factory=EventBus)
    #: The running pipeline, for sources added, paused and resumed while the agent runs.
    pipeline: RunningPipeline = field(default=None)  # type: ignore[assignment]
    #: What `agent_config` returns (the agent's whole loaded config), for plugins written before the
    #: typed fields existed.
    legacy_agent_config: Any = field(default=None, repr=False)
    #: The plugin's event subscriptions, ended when the plugin is stopped by a reload.
    subscriptions: list[Callable[[], None]] = field(default_factory=list)

    @property
    def agent_config(self) -> Any:
        """Deprecated: the agent's whole config, untyped. Use `grace_period`, `config_dir` and
        `data_dir`; this goes in agent API 1.1."""
        warn_deprecated(
            "StartContext.agent_config", "ctx.grace_period, ctx.config_dir and ctx.data_dir", removed_in="1.1"
        )
        return self.legacy_agent_config

    def __post_init__(self) -> None:
        if self.pipeline is None:
            self.pipeline = RunningPipeline(self.plugin_name)

    @property
    def logger(self) -> logging.Logger:
        return logging.getLogger(f"agent.plugin.{self.plugin_name}")

    def create_metric(
        self, name: str, unit: str = "1", value_type: ValueType = "float", description: str = ""
    ) -> int:
        """Registers a metric (or finds the identical one) and returns its id."""
        return self.registry.register(MetricDef(name, unit, value_type, description))

    def plugin_data_dir(self) -> Path:
        """A directory for this plugin's durable state, under `[agent] data_dir`; created on demand."""
        path = self.data_dir / self.plugin_name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def add_source(
        self, source: PolledSource | AutonomousSource, name: str | None = None, *, paused: bool = False
    ) -> None:
        """Adds a source; with `paused`, it starts paused until `self.pipeline.resume(name)`."""
        if not isinstance(source, PolledSource | AutonomousSource):
            raise TypeError(f"{source!r} is neither a PolledSource nor an AutonomousSource")
        self.elements.append(
            Element(self.plugin_name, name or self.plugin_name, "source", source, start_paused=paused)
        )

    def add_transform(self, transform: Transform, name: str | None = None) -> None:
        self.elements.append(Element(self.plugin_name, name or self.plugin_name, "transform", transform))

    def add_output(self, output: Output, config: OutputConfig | None = None, name: str | None = None) -> None:
        """Adds an output; `config` gives its queue size and overflow policy (defaults if None)."""
        self.elements.append(
            Element(self.plugin_name, name or self.plugin_name, "output", output, config or OutputConfig())
        )

    def add_service(self, service: Service, name: str | None = None) -> None:
        """Adds a long-running task (see `Service`)."""
        if not isinstance(service, Service):
            raise TypeError(f"{service!r} is not a Service")
        self.elements.append(Element(self.plugin_name, name or self.plugin_name, "service", service))

    def subscribe(
        self, listener: Listener, kinds: set[EventKind] | None = None, *, replay: bool = True
    ) -> Callable[[], None]:
        """Calls `listener` for consumer and resource events (see `agent.events.EventBus.subscribe`)."""
        unsubscribe = self.events.subscribe(listener, kinds, replay=replay)
        self.subscriptions.append(unsubscribe)
        return unsubscribe

    def resolve_path(self, path: str | Path) -> Path:
        """`path` from the plugin's table: `~` expanded, relative to the config file's folder."""
        expanded = Path(path).expanduser()
        if expanded.is_absolute() or self.config_dir is None:
            return expanded
        return self.config_dir / expanded


@dataclass
class ControlSection:
    """What a plugin shows in the agent's status (`agent control status`, the status page, `agent top`)
    and the commands it adds to the control API; returned by the `agent_control_sections` hook.

    `status` returns the section's rows now (one dict per row, the same keys in every row, values that
    JSON can carry: strings, numbers, booleans). `commands` maps a command name to a function that takes
    the request's arguments (a dict) and returns a JSON-able result; it runs in the agent's trio thread
    and must not block. A command that raises ValueError answers with its message as the error.
    """

    name: str
    status: Callable[[], list[dict[str, Any]]]
    commands: dict[str, Callable[[dict[str, Any]], Any]] = field(default_factory=dict)


class Plugin(abc.ABC):
    """Base class of every plugin. Subclasses set the class attributes and implement `start`."""

    #: The name used in `[plugins.NAME]`, `--plugins` and logs. Lower case, words joined by "-".
    name: ClassVar[str]
    version: ClassVar[str] = "0.1.0"
    #: The plugin API versions this plugin was written for: a PEP 440 specifier such as ">=1,<2",
    #: checked against `agent.API_VERSION` (see agent.api). None accepts any version, with a warning.
    agent_api: ClassVar[str | None] = None
    #: One line for `agent plugins list`.
    description: ClassVar[str] = ""
    #: The config Struct; its defaults are what a generated config contains.
    Config: ClassVar[type[PluginConfig]] = PluginConfig
    #: Enabled in a generated config? Only for plugins that make sense on their own (no server to set up).
    enabled_by_default: ClassVar[bool] = False
    #: The kinds of elements it adds, for `agent plugins list`.
    provides: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def start(self, ctx: StartContext, config: Any) -> None:
        """Registers metrics and adds elements. Raise an exception with a clear message if the plugin
        cannot start (missing device, bad permissions): the agent reports it with the plugin's name."""

    def stop(self) -> None:  # noqa: B027 (optional: most plugins have nothing to release)
        """Called once after the pipeline stopped."""

    @classmethod
    def sample_config(cls) -> str | None:
        """The commented sample table (`sample.toml` beside the plugin's module), if there is one."""
        import importlib.resources
        import sys

        module = sys.modules.get(cls.__module__)
        package = module.__package__ if module else None
        if not package:
            return None
        try:
            return importlib.resources.files(package).joinpath("sample.toml").read_text(encoding="utf-8")
        except (FileNotFoundError, ModuleNotFoundError, NotADirectoryError):
            return None


__all__ = [
    "AckCallback",
    "CommandLineFlag",
    "AutonomousSource",
    "BatchBuilder",
    "ControlSection",
    "Duration",
    "Element",
    "Output",
    "OutputConfig",
    "OverflowPolicy",
    "Plugin",
    "PluginConfig",
    "PolledSource",
    "PolledSourceConfig",
    "RunningPipeline",
    "Service",
    "SourceSink",
    "StartContext",
    "Transform",
]
