"""Helpers for testing plugins: run one source, transform or output without a config or a CLI.

    from agent.testing import poll_once, run_output, running_pipeline, start_plugin, CollectingOutput

    def test_my_plugin_starts(tmp_path):
        ctx = start_plugin(MyPlugin, {"poll_interval": "2s"}, data_dir=tmp_path)
        [source] = [e.obj for e in ctx.elements if e.kind == "source"]

    async def test_my_source():
        batch = await poll_once(MySource())
        assert batch.series[0].metric == "my_metric"

    async def test_my_listener():
        out = CollectingOutput()
        async with running_pipeline([source_element(MyListener())], outputs=[out]) as pipeline:
            ...  # send it something
            await out.wait_for_points(10)

Everything runs on the real pipeline, so queues, acknowledgements and shutdown behave as in the agent.

`run_agent` (or `open_agent` in a trio test) runs the real `agent` command as a child process, with a
config written to a folder, and waits for its readiness line, which gives the ports it bound:

    CONFIG = '''
    [plugins.my-listener]
    address = "127.0.0.1:0"
    '''

    def test_my_listener_in_the_agent(tmp_path):
        with run_agent(CONFIG, directory=tmp_path) as agent:
            send_to(agent.port("my-listener"))  # from the readiness line
            agent.wait_for(lambda: "1 point" in agent.stderr, timeout=10, what="the point")
            assert agent.stop() == 0

The agent is killed (with its process group) on any way out of the block. `wait_for` and
`wait_for_async` wait for any condition with a timeout; `require_service` skips a test whose real
service (a database, a broker) is not running, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import codecs
import contextlib
import inspect
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio

# A bad table in start_plugin raises it: plugin tests import it from here, not from agent.config.
from agent.config import ConfigError
from agent.events import EventBus
from agent.model import (
    LOCAL_MACHINE,
    LOCAL_MACHINE_CONSUMER,
    Batch,
    Consumer,
    MetricRegistry,
    Resource,
    Series,
    now_ns,
)
from agent.pipeline import Pipeline
from agent.plugin import (
    AutonomousSource,
    BatchBuilder,
    Element,
    Output,
    OutputConfig,
    Plugin,
    PolledSource,
    Service,
    StartContext,
    Transform,
)
from agent.runtime import READY_PREFIX

T = TypeVar("T")


def load_config(plugin: type[Plugin], table: Mapping[str, Any] | None = None) -> Any:
    """The plugin's Config from `table` (its `[plugins.NAME]` keys, strings such as "30s" as in the
    file), checked as the agent checks it: a `ConfigError` names a bad key."""
    from agent.config import convert_section

    return convert_section(dict(table or {}), plugin.Config, f"plugins.{plugin.name}")


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 (a free port) to a real server, for outage tests: `cut()` closes every
    proxied connection and refuses new ones (accepted, then closed at once) until `restore()`.

        proxy = CuttingProxy(("127.0.0.1", 5432))
        port = await nursery.start(proxy.run)   # point the plugin at 127.0.0.1:port
        proxy.cut(); ...; proxy.restore()
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.refusing = False
        self.cuts = 0
        self.connections = 0
        self._scopes: set[trio.CancelScope] = set()

    async def run(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            if self.refusing:
                return
            self.connections += 1
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    upstream = await trio.open_tcp_stream(*self.target)
                    async with upstream, trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
                        nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)
                except OSError:
                    pass  # the server is away: the client sees its connection closed
                finally:
                    self._scopes.discard(scope)

    @staticmethod
    async def _pump(source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope) -> None:
        try:
            async for data in source:
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    def cut(self) -> None:
        self.refusing = True
        self.cuts += 1
        for scope in list(self._scopes):
            scope.cancel()

    def restore(self) -> None:
        self.refusing = False


def start_plugin(
    plugin: type[Plugin],
    table: Mapping[str, Any] | None = None,
    *,
    data_dir: Path | None = None,
    registry: MetricRegistry | None = None,
    events: EventBus | None = None,
) -> StartContext:
    """Starts one plugin as the agent does: `table` is checked against the plugin's Config
    (`load_config`), then `start` runs. Returns the start context: `.elements` holds what the plugin
    added (`.obj` is the source, transform, output or service), `.registry` the metrics it registered.
    Give `events` to share one event bus between several plugins (as the agent does)."""
    config = load_config(plugin, table)
    ctx = StartContext(
        plugin.name,
        registry if registry is not None else MetricRegistry(),
        data_dir if data_dir is not None else Path.cwd() / "agent-data",
        None,
        events=events if events is not None else EventBus(),
    )
    plugin().start(ctx, config)
    return ctx


def make_series(
    metric: str = "test_metric",
    values: Sequence[int | float] = (1.0,),
    *,
    timestamps: Sequence[int] | None = None,
    resource: Resource = LOCAL_MACHINE,
    consumer: Consumer = LOCAL_MACHINE_CONSUMER,
    attributes: dict[str, Any] | None = None,
) -> Series:
    """A series with the given values; timestamps default to now, 1 ms apart."""
    if timestamps is None:
        start = now_ns()
        timestamps = [start + i * 1_000_000 for i in range(len(values))]
    return Series(metric, resource, consumer, dict(attributes or {}), list(timestamps), list(values))


def make_batch(*series: Series) -> Batch:
    return Batch(list(series))


async def poll_once(source: PolledSource, timestamp_ns: int | None = None) -> Batch:
    """Polls a source once and returns what it measured."""
    builder = BatchBuilder()
    await source.poll(builder, timestamp_ns if timestamp_ns is not None else now_ns())
    return builder.take()


def run_transform(transform: Transform, batch: Batch) -> Batch | None:
    return transform.apply(batch)


class CollectingOutput(Output):
    """An output that keeps every batch it is given, for assertions."""

    def __init__(self, *, fail_times: int = 0, delay: float = 0.0) -> None:
        self.batches: list[Batch] = []
        self.fail_times = fail_times
        self.delay = delay
        self.writes = 0
        self._changed = trio.Event()

    async def write(self, batches: list[Batch]) -> None:
        self.writes += 1
        if self.delay:
            await trio.sleep(self.delay)
        if self.fail_times > 0:
            self.fail_times -= 1
            raise OSError("simulated write failure")
        self.batches.extend(batches)
        self._changed.set()
        self._changed = trio.Event()

    @property
    def points(self) -> int:
        return sum(len(b) for b in self.batches)

    def values(self, metric: str | None = None) -> list[int | float]:
        return [v for b in self.batches for name, _, v, _ in b.points() if metric is None or name == metric]

    async def wait_for_points(self, count: int) -> None:
        while self.points < count:
            await self._changed.wait()


def source_element(source: PolledSource | AutonomousSource, name: str = "test-source") -> Element:
    return Element(name, name, "source", source)


def transform_element(transform: Transform, name: str = "test-transform") -> Element:
    return Element(name, name, "transform", transform)


def output_element(output: Output, name: str = "test-output", config: OutputConfig | None = None) -> Element:
    return Element(name, name, "output", output, config or OutputConfig())


def service_element(service: Service, name: str = "test-service") -> Element:
    return Element(name, name, "service", service)


@contextlib.asynccontextmanager
async def running_pipeline(
    elements: Sequence[Element],
    outputs: Sequence[Output] = (),
    *,
    grace_period: float = 10.0,
    final_poll: bool = False,
) -> AsyncIterator[Pipeline]:
    """Runs a pipeline of `elements` (plus `outputs`, named output-0, output-1...) in the background;
    on exit stops it and waits until every output drained."""
    all_elements = list(elements) + [output_element(o, f"output-{i}") for i, o in enumerate(outputs)]
    pipeline = Pipeline(all_elements)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial_run(pipeline, grace_period))
        try:
            yield pipeline
        finally:
            pipeline.stop(final_poll=final_poll)


def partial_run(pipeline: Pipeline, grace_period: float) -> Any:
    async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        await pipeline.run(grace_period=grace_period, task_status=task_status)

    return run


async def run_output(
    output: Output, batches: Sequence[Batch], config: OutputConfig | None = None
) -> dict[str, int]:
    """Feeds batches through one output in a real pipeline, drains it, returns its counters
    (received, written, dropped, queued)."""
    element = output_element(output, "output", config)
    pipeline = Pipeline([element])
    async with trio.open_nursery() as nursery:
        await nursery.start(partial_run(pipeline, 30.0))
        sink = pipeline.sink()
        for batch in batches:
            await sink.send(batch)
        pipeline.stop()
    return pipeline.counters()["output"]


# -- real services --


def require_service(name: str, host: str, port: int) -> None:
    """Skips the calling test when a service is not reachable on host:port, except under CI=true,
    where a missing service is a failure (CI must provide it)."""
    import pytest  # here: agent.testing stays importable without the test dependencies

    try:
        with socket.create_connection((host, port), timeout=1.0):
            return
    except OSError as exc:
        message = f"{name} is not reachable on {host}:{port} ({exc.strerror or exc})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must provide it")
        pytest.skip(message)


def require_executable(name: str, install_hint: str) -> str:
    """The path of program `name`; skips the calling test when it is not installed, except under
    CI=true, where a missing program is a failure (CI must install it: `install_hint`)."""
    import shutil

    import pytest

    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed ({install_hint})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must provide it")
    pytest.skip(message)


# -- waiting for a condition --

#: How often `wait_for` and `wait_for_async` test their condition.
POLL_INTERVAL = 0.02


def _check_watched(watch: Sequence[AgentProcess], what: str) -> None:
    for agent in watch:
        if agent.returncode is not None:
            raise AssertionError(
                f"{agent.name} exited ({agent.returncode}) while waiting for {what}:\n{agent.stderr_tail()}"
            )


def _timed_out(timeout: float, what: str, watch: Sequence[AgentProcess]) -> AssertionError:
    logs = "".join(f"\n--- {agent.name}'s stderr:\n{agent.stderr_tail()}" for agent in watch)
    return AssertionError(f"timed out after {timeout}s waiting for {what}{logs}")


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    what: str = "the condition",
    *,
    watch: Sequence[AgentProcess] = (),
    every: float = POLL_INTERVAL,
) -> T:
    """Tests `predicate` until it returns something true, and returns that; raises AssertionError
    naming `what` after `timeout` seconds, or as soon as an agent of `watch` exits (with its stderr).
    `predicate` is called about `every` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        _check_watched(watch, what)
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, what, watch)
        time.sleep(every)


async def wait_for_async(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,
    what: str = "the condition",
    *,
    watch: Sequence[AgentProcess] = (),
    every: float = POLL_INTERVAL,
) -> T:
    """`wait_for` for trio tests: other tasks run while it waits. `predicate` may be async (poll a
    source until it shows something, ask a server)."""
    deadline = trio.current_time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        _check_watched(watch, what)
        if trio.current_time() >= deadline:
            raise _timed_out(timeout, what, watch)
        await trio.sleep(every)


# -- the agent as a child process --

READY_LINE = re.compile(r"^.* agent: " + re.escape(READY_PREFIX) + r"(\{.*\})$", re.MULTILINE)


class _Collector(threading.Thread):
    """Reads one pipe of the child to its end, keeping the text (a thread: works in sync and trio tests,
    and the child never blocks on a full pipe)."""

    def __init__(self, pipe: Any, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._pipe = pipe
        self._chunks: list[str] = []
        self._lock = threading.Lock()

    def run(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with self._pipe:
            while data := self._pipe.read1(65536):
                text = decoder.decode(data)
                with self._lock:
                    self._chunks.append(text)
        with self._lock:
            self._chunks.append(decoder.decode(b"", final=True))

    @property
    def text(self) -> str:
        with self._lock:
            if len(self._chunks) > 1:
                self._chunks[:] = ["".join(self._chunks)]
            return self._chunks[0] if self._chunks else ""


class AgentProcess:
    """A running `agent` command (see `run_agent`): its output so far, its readiness line, its ports."""

    def __init__(self, process: subprocess.Popen[bytes], directory: Path, name: str) -> None:
        self.process = process
        self.directory = directory
        self.name = name
        #: What each element reported when it came up (its bound addresses), from the readiness line:
        #: {"graphite-in": {"plaintext": ["127.0.0.1:40123"]}, "relay-server": ["127.0.0.1:40125"]}.
        self.ready: dict[str, Any] = {}
        assert process.stdout is not None and process.stderr is not None
        self._stdout = _Collector(process.stdout, f"{name} stdout")
        self._stderr = _Collector(process.stderr, f"{name} stderr")
        self._stdout.start()
        self._stderr.start()

    @property
    def stdout(self) -> str:
        return self._stdout.text

    @property
    def stderr(self) -> str:
        """Its log so far."""
        return self._stderr.text

    def stderr_tail(self, chars: int = 3000) -> str:
        return self.stderr[-chars:]

    @property
    def returncode(self) -> int | None:
        """None while it runs."""
        return self.process.poll()

    # -- readiness and ports --

    def _read_ready(self) -> bool:
        match = READY_LINE.search(self.stderr)
        if match is None:
            if self.returncode is not None:
                raise AssertionError(
                    f"{self.name} exited ({self.returncode}) before it was ready:\n{self.stderr_tail()}"
                )
            return False
        self.ready = json.loads(match.group(1))
        return True

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        """Waits for the readiness line (logged at INFO) and returns `ready`."""
        wait_for(self._read_ready, timeout, f"{self.name}'s readiness line")
        return self.ready

    async def wait_ready_async(self, timeout: float = 30.0) -> dict[str, Any]:
        await wait_for_async(self._read_ready, timeout, f"{self.name}'s readiness line")
        return self.ready

    def addresses(self, element: str, key: str | None = None) -> list[str]:
        """The addresses `element` reported in the readiness line ("HOST:PORT" strings); `key` picks one
        kind when it reported several (graphite-in: "plaintext", "pickle", "udp")."""
        value = self.ready.get(element)
        if key is not None:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            where = element if key is None else f"{element}, {key!r}"
            raise AssertionError(f"no address for {where} in {self.name}'s readiness line: {self.ready}")
        return [str(address) for address in value]

    def port(self, element: str, key: str | None = None) -> int:
        """The port of the first address `element` reported (see `addresses`)."""
        return int(self.addresses(element, key)[0].rsplit(":", 1)[1])

    # -- waiting, signals, stopping --

    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout: float = 10.0,
        what: str = "the condition",
        *,
        every: float = POLL_INTERVAL,
    ) -> T:
        """`wait_for` that fails at once, with the agent's log, if the agent exits meanwhile."""
        return wait_for(predicate, timeout, what, watch=[self], every=every)

    async def wait_for_async(
        self,
        predicate: Callable[[], T | Awaitable[T]],
        timeout: float = 10.0,
        what: str = "the condition",
        *,
        every: float = POLL_INTERVAL,
    ) -> T:
        return await wait_for_async(predicate, timeout, what, watch=[self], every=every)

    def send_signal(self, signum: int) -> None:
        """Signals the agent alone (a service manager's stop)."""
        if self.returncode is None:
            self.process.send_signal(signum)

    def signal_group(self, signum: int) -> None:
        """Signals the agent and its children (`agent exec`'s command): Ctrl-C in a terminal."""
        if self.returncode is None:
            os.killpg(self.process.pid, signum)

    def _exited(self, timeout: float) -> int:
        self._stdout.join(timeout)
        self._stderr.join(timeout)
        return self.process.returncode

    def _not_exited(self, timeout: float) -> AssertionError:
        self.kill()
        return AssertionError(f"{self.name} did not exit within {timeout}s; its log:\n{self.stderr_tail()}")

    def wait(self, timeout: float = 30.0) -> int:
        """Waits for the agent to exit and returns its exit code (killed, and AssertionError, after
        `timeout`); its output is complete afterwards."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self._not_exited(timeout) from None
        return self._exited(timeout)

    async def wait_async(self, timeout: float = 30.0) -> int:
        with trio.move_on_after(timeout):
            while self.process.poll() is None:
                await trio.sleep(POLL_INTERVAL)
        if self.process.poll() is None:
            raise self._not_exited(timeout)
        return self._exited(timeout)

    def stop(self, timeout: float = 30.0, signum: int = signal.SIGTERM) -> int:
        """Stops the agent as a service manager does (SIGTERM: it drains and exits) and returns its exit
        code; killed, and AssertionError, if it has not exited within `timeout`."""
        self.send_signal(signum)
        return self.wait(timeout)

    async def stop_async(self, timeout: float = 30.0, signum: int = signal.SIGTERM) -> int:
        self.send_signal(signum)
        return await self.wait_async(timeout)

    def kill(self) -> None:
        """SIGKILL to the agent and its children (its process group); waits for it."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _spawn(
    config: str | None,
    args: Sequence[str],
    directory: Path,
    env: Mapping[str, str] | None,
    name: str,
) -> AgentProcess:
    command = [sys.executable, "-m", "agent.cli"]
    if config is not None:
        path = directory / f"{name}.toml"
        path.write_text(config)
        command += ["--config", str(path)]
    process = subprocess.Popen(
        [*command, *args],
        cwd=directory,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        # Its own process group: `kill` takes `agent exec`'s command with it.
        start_new_session=True,
    )
    return AgentProcess(process, directory, name)


@contextlib.contextmanager
def _directory(directory: Path | None) -> Iterator[Path]:
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        yield directory
        return
    temporary = Path(tempfile.mkdtemp(prefix="agent-test-"))
    try:
        yield temporary
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


@contextlib.contextmanager
def run_agent(
    config: str | None,
    *args: str,
    directory: Path | None = None,
    env: Mapping[str, str] | None = None,
    ready: bool = True,
    timeout: float = 30.0,
    name: str = "agent",
) -> Iterator[AgentProcess]:
    """Runs `agent --config DIRECTORY/NAME.toml ARGS...` (`config` is the file's text; None: no
    --config) in `directory` (a new temporary folder if None, removed afterwards) and, with `ready`,
    waits up to `timeout` seconds for its readiness line. The agent, and anything it started, is killed
    on any way out of the block: a failed assertion, a timeout, a cancellation."""
    with _directory(directory) as folder:
        agent = _spawn(config, args, folder, env, name)
        try:
            if ready:
                agent.wait_ready(timeout)
            yield agent
        finally:
            agent.kill()
            agent._exited(5.0)


@contextlib.asynccontextmanager
async def open_agent(
    config: str | None,
    *args: str,
    directory: Path | None = None,
    env: Mapping[str, str] | None = None,
    ready: bool = True,
    timeout: float = 30.0,
    name: str = "agent",
) -> AsyncIterator[AgentProcess]:
    """`run_agent` for trio tests: waiting for readiness lets other tasks run."""
    with _directory(directory) as folder:
        agent = _spawn(config, args, folder, env, name)
        try:
            if ready:
                await agent.wait_ready_async(timeout)
            yield agent
        finally:
            # Synchronous, so that a cancelled test (a timeout) still kills it.
            agent.kill()
            agent._exited(5.0)


__all__ = [
    "ConfigError",
    "AgentProcess",
    "CollectingOutput",
    "load_config",
    "CuttingProxy",
    "make_batch",
    "make_series",
    "open_agent",
    "output_element",
    "poll_once",
    "require_executable",
    "run_agent",
    "require_service",
    "run_output",
    "run_transform",
    "running_pipeline",
    "service_element",
    "source_element",
    "start_plugin",
    "transform_element",
    "wait_for",
    "wait_for_async",
]
