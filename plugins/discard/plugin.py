"""The `discard` output: counts the points it is given and drops them.

For benchmarks (the cost of the sources, transforms and queues without any I/O) and for demos. The
points are acknowledged as written: a benchmark through the relay measures the whole path.
"""

from __future__ import annotations

import logging

from agent import Batch, Duration, Output, OutputConfig, Plugin, StartContext, hookimpl

log = logging.getLogger(__name__)


class DiscardConfig(OutputConfig, kw_only=True):
    """The `[plugins.discard]` table."""

    flush_interval: Duration = Duration(0.0)

    def __post_init__(self) -> None:
        if self.flush_interval < 0:
            raise ValueError(f"flush_interval must not be negative, got {self.flush_interval!r}")


class DiscardOutput(Output):
    """Keeps counters only."""

    def __init__(self, flush_interval: float = 0.0) -> None:
        self.flush_interval = float(flush_interval)
        self.points = 0
        self.series = 0
        self.batches = 0
        self.writes = 0

    async def write(self, batches: list[Batch]) -> None:
        self.writes += 1
        self.batches += len(batches)
        for batch in batches:
            self.series += len(batch.series)
            self.points += len(batch)

    async def close(self) -> None:
        log.info(
            "discard: dropped %d points (%d series, %d batches, %d writes)",
            self.points,
            self.series,
            self.batches,
            self.writes,
        )


class DiscardPlugin(Plugin):
    name = "discard"
    version = "0.1.0"
    agent_api = ">=1,<2"
    description = "Counts the points it receives and drops them (benchmarks, demos)."
    Config = DiscardConfig
    enabled_by_default = False
    provides = ("output",)

    def start(self, ctx: StartContext, config: DiscardConfig) -> None:
        ctx.add_output(DiscardOutput(config.flush_interval), config)


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [DiscardPlugin]
