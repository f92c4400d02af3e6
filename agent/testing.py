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
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

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
    StartContext,
    Transform,
)


def require_service(name: str, host: str, port: int) -> None:
    """Skips the calling test when a service is not reachable on host:port, except under CI=true,
    where a missing service is a failure (CI must provide it)."""
    import os
    import socket

    import pytest

    try:
        with socket.create_connection((host, port), timeout=1.0):
            return
    except OSError as exc:
        message = f"{name} is not reachable on {host}:{port} ({exc})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must provide it")
        pytest.skip(message)


def start_plugin(
    plugin: type[Plugin],
    table: Mapping[str, Any] | None = None,
    *,
    data_dir: Path | None = None,
    registry: MetricRegistry | None = None,
) -> StartContext:
    """Starts one plugin as the agent does: `table` (its `[plugins.NAME]` keys, strings such as "30s"
    as in the file) is checked against the plugin's Config (a `ConfigError` names a bad key), then
    `start` runs. Returns the start context: `.elements` holds what the plugin added (`.obj` is the
    source, transform or output), `.registry` the metrics it registered."""
    from agent.config import convert_section

    config = convert_section(dict(table or {}), plugin.Config, f"plugins.{plugin.name}")
    ctx = StartContext(
        plugin.name,
        registry if registry is not None else MetricRegistry(),
        data_dir if data_dir is not None else Path.cwd() / "agent-data",
        None,
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


__all__ = [
    "CollectingOutput",
    "make_batch",
    "make_series",
    "output_element",
    "poll_once",
    "require_service",
    "run_output",
    "run_transform",
    "running_pipeline",
    "source_element",
    "start_plugin",
    "transform_element",
]
