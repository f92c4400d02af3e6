"""Test helpers for graphite-out (its tests, benchmarks, and plugins that test against it): a fake carbon
receiver on 127.0.0.1 that keeps what it gets, and a GraphiteOutput running in a real pipeline."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from agent import Service
from agent.model import Batch, Consumer, Resource, Series
from agent.testing import load_config, output_element, running_pipeline, service_element
from agent_plugins.graphite.graphite_out.config import GraphiteOutConfig
from agent_plugins.graphite.graphite_out.output import GraphiteOutput
from agent_plugins.graphite.graphite_out.plugin import GraphiteOutPlugin
from agent_plugins.graphite.protocol.pickle_codec import decode_frame, split_frames

NS = 1_000_000_000


class FakeCarbon:
    """A carbon receiver: plaintext lines or pickle frames, kept in arrival order as (path, value, ts)."""

    def __init__(self, pickle: bool = False) -> None:
        self.pickle = pickle
        self.points: list[tuple[str, float, int]] = []
        #: When each point arrived (time.monotonic()), parallel to `points`.
        self.arrivals: list[float] = []
        self.connections = 0
        #: Connections that ended (the sender closed or broke them, or `stop`).
        self.closed = 0
        self.port = 0
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()
        self._changed = trio.Event()
        self._reading = trio.Event()
        self._reading.set()

    def pause(self) -> None:
        """Stops reading (a carbon-cache too slow to keep up): the kernel's buffers fill, then the writer waits."""
        self._reading = trio.Event()

    def resume(self) -> None:
        self._reading.set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def paths(self) -> list[str]:
        return [path for path, _, _ in self.points]

    async def start(self, nursery: trio.Nursery, port: int | None = None) -> None:
        listeners = await trio.open_tcp_listeners(self.port if port is None else port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()
        nursery.start_soon(self._serve, listeners, self._scope, self._stopped)

    async def _serve(self, listeners: list[Any], scope: trio.CancelScope, stopped: trio.Event) -> None:
        try:
            with scope:
                async with trio.open_nursery() as handlers:
                    await trio.serve_listeners(self._handle, listeners, handler_nursery=handlers)
        finally:
            stopped.set()

    async def stop(self) -> None:
        """Closes the listener and every connection (a carbon-cache that went away)."""
        assert self._scope is not None
        self._scope.cancel()
        await self._stopped.wait()

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            await self._receive(stream)
        finally:
            self.closed += 1

    async def _receive(self, stream: trio.SocketStream) -> None:
        buffer = b""
        async with stream:
            while True:
                await self._reading.wait()
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not data:
                    return
                buffer += data
                received = len(self.points)
                if self.pickle:
                    frames, buffer = split_frames(buffer)
                    for frame in frames:
                        batch = decode_frame(frame, now_ns=0)
                        self.points.extend(
                            (p, v, t // NS)
                            for p, v, t in zip(batch.paths, batch.values, batch.timestamps, strict=True)
                        )
                else:
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        path, value, timestamp = line.decode().split(" ")
                        self.points.append((path, float(value), int(timestamp)))
                self.arrivals.extend([time.monotonic()] * (len(self.points) - received))
                self._changed.set()
                self._changed = trio.Event()

    async def wait_for(self, count: int) -> None:
        while len(self.points) < count:
            await self._changed.wait()


def make_config(table: dict[str, Any]) -> GraphiteOutConfig:
    """A config from a TOML-like table, converted as the agent converts it (admin ports off by default)."""
    return load_config(GraphiteOutPlugin, {"admin_http": "", "admin_line": "", **table})


def graphite_series(
    paths: list[str], start: int = 1_700_000_000, values: list[float] | None = None
) -> Series:
    """A Series as graphite-in makes it: one path per point; timestamps 1 s apart from `start` (seconds)."""
    count = len(paths)
    return Series(
        list(paths),
        Resource("local_machine"),
        Consumer("local_machine"),
        {},
        [(start + i) * NS for i in range(count)],
        list(values) if values is not None else [float(i) for i in range(count)],
    )


def graphite_batch(paths: list[str], start: int = 1_700_000_000) -> Batch:
    return Batch([graphite_series(paths, start)])


@contextlib.asynccontextmanager
async def running_output(
    output: GraphiteOutput, services: Sequence[Service | None] = (), grace_period: float = 5.0
) -> AsyncIterator[Any]:
    """The output (and `services`, such as its admin ports) in a real pipeline, which it yields; on exit
    the pipeline stops and the output drains."""
    elements = [output_element(output, "graphite-out")]
    elements += [service_element(service, f"service-{i}") for i, service in enumerate(services) if service]
    async with running_pipeline(elements, grace_period=grace_period) as pipeline:
        yield pipeline


async def send(pipeline: Any, batch: Batch) -> bool:
    """Sends a batch and waits until the output took it (routed to queues and spools)."""
    return await pipeline.sink().send_and_wait(batch)


def new_output(tmp_path: Path, table: dict[str, Any], **kwargs: Any) -> GraphiteOutput:
    return GraphiteOutput(make_config(table), spool_dir=tmp_path / "spool", **kwargs)


async def wait_until(predicate: Callable[[], bool], interval: float = 0.005) -> None:
    while not predicate():
        await trio.sleep(interval)


def fast_destination(address: str, **options: Any) -> dict[str, Any]:
    """A destination table with test-friendly timings."""
    return {
        "address": address,
        "reconnect_interval": "20ms",
        "flush_interval": "1ms",
        "connect_timeout": "1s",
        **options,
    }


__all__ = [
    "FakeCarbon",
    "graphite_batch",
    "graphite_series",
    "make_config",
    "new_output",
    "running_output",
    "send",
    "wait_until",
]
