"""The `console` output: one human-readable line per point on stdout, for trying things.

    2026-11-22T02:14:39.123456789Z cpu_percent 12.5 % resource=cpu_core:0 consumer=local_machine
    2026-11-22T02:14:39.123456789Z process_memory_rss 48218112 By resource=local_machine consumer=process:4242 name=python3

Lines are formatted on the trio thread (units come from the metric registry, which changes there) and
written in a worker thread: a terminal or a pipe that is slow to read must not stall the event loop.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import msgspec
import trio

from agent import (
    Batch,
    Duration,
    MetricRegistry,
    Output,
    OutputConfig,
    Plugin,
    StartContext,
    TimestampFormatter,
    attribute_text,
    hookimpl,
)

_NEEDS_QUOTES = re.compile(r'[\s="\\]|^$')


class ConsoleConfig(OutputConfig, kw_only=True):
    """The `[plugins.console]` table."""

    flush_interval: Duration = Duration(1.0)

    def __post_init__(self) -> None:
        if self.flush_interval < 0:
            raise ValueError(f"flush_interval must not be negative, got {self.flush_interval!r}")


def _show(text: str) -> str:
    """A value as typed at a shell: bare if it is one word, JSON-quoted otherwise."""
    return msgspec.json.encode(text).decode() if _NEEDS_QUOTES.search(text) else text


def _place(kind: str, ident: str) -> str:
    return f"{kind}:{_show(ident)}" if ident else kind


def format_lines(batches: Iterable[Batch], registry: MetricRegistry, timestamps: TimestampFormatter) -> str:
    """One line per point: time, metric, value and unit, resource, consumer, attributes."""
    units: dict[str, str] = {}

    def unit_of(metric: str) -> str:
        unit = units.get(metric)
        if unit is None:
            definition = registry.get(metric)
            unit = units[metric] = (
                "" if definition is None or definition.unit == "1" else f" {definition.unit}"
            )
        return unit

    lines: list[str] = []
    for batch in batches:
        for s in batch.series:
            tail = f" resource={_place(s.resource.kind, s.resource.id)} consumer={_place(s.consumer.kind, s.consumer.id)}"
            if s.attributes:
                tail += "".join(
                    f" {_show(str(k))}={_show(attribute_text(v))}" for k, v in s.attributes.items()
                )
            stamps = timestamps.format_many(s.timestamps)
            names: Iterable[str] = [s.metric] * len(s.timestamps) if isinstance(s.metric, str) else s.metric
            for name, stamp, value in zip(names, stamps, s.values, strict=True):
                lines.append(f"{stamp} {name} {value}{unit_of(name)}{tail}\n")
    return "".join(lines)


class ConsoleOutput(Output):
    def __init__(
        self, registry: MetricRegistry, stream: TextIO | None = None, flush_interval: float = 1.0
    ) -> None:
        self.registry = registry
        self.stream = stream
        self.flush_interval = float(flush_interval)
        self._timestamps = TimestampFormatter()

    def _write_sync(self, text: str) -> None:
        stream: Any = self.stream if self.stream is not None else sys.stdout
        stream.write(text)
        stream.flush()

    async def write(self, batches: list[Batch]) -> None:
        text = format_lines(batches, self.registry, self._timestamps)
        if text:
            await trio.to_thread.run_sync(self._write_sync, text)


class ConsolePlugin(Plugin):
    name = "console"
    version = "0.1.0"
    agent_api = ">=1,<2"
    description = "Prints every point as a human-readable line on stdout, for trying things."
    Config = ConsoleConfig
    enabled_by_default = False
    provides = ("output",)

    def start(self, ctx: StartContext, config: ConsoleConfig) -> None:
        ctx.add_output(ConsoleOutput(ctx.registry, flush_interval=config.flush_interval), config)


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [ConsolePlugin]
