"""The `csv` output: every point as one row of a `;`-separated file, appended to, never truncated.

This is the agent's default output (`agent` with no config writes `agent-output.csv`). The core
gathers points for `flush_interval`, then `CsvOutput.write` formats them (`format.py`), writes them and
flushes the file to the OS; the points are acknowledged once `write` returns. At shutdown the core
drains the queue through `write`, so what was measured is in the file when the agent exits.

Formatting and file I/O run in a worker thread: a large write must not stall the event loop.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import BinaryIO

import trio

from agent import Batch, Duration, Output, OutputConfig, Plugin, StartContext, TimestampFormatter, hookimpl
from agent_plugins.csv.format import format_batches, header

log = logging.getLogger(__name__)


class CsvConfig(OutputConfig, kw_only=True):
    """The `[plugins.csv]` table."""

    path: str = "agent-output.csv"
    flush_interval: Duration = Duration(1.0)
    separator: str = ";"

    def __post_init__(self) -> None:
        if len(self.separator) != 1 or self.separator in '"\r\n':
            raise ValueError(
                f"separator must be one character other than a quote or a line break, got {self.separator!r}"
            )
        if not self.path:
            raise ValueError("path must not be empty")
        if self.flush_interval < 0:
            raise ValueError(f"flush_interval must not be negative, got {self.flush_interval!r}")


class CsvOutput(Output):
    """Appends rows to one file; the file stays open between writes."""

    def __init__(self, path: Path, separator: str = ";", flush_interval: float = 1.0) -> None:
        self.path = path
        self.separator = separator
        self.flush_interval = float(flush_interval)
        self._file: BinaryIO | None = None
        self._timestamps = TimestampFormatter()
        self.points_written = 0

    def check_writable(self) -> None:
        """Opens the file for appending once, so that a bad path fails at start with a clear message."""
        self._open_file().close()

    def _open_file(self) -> BinaryIO:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return self.path.open("ab")
        except OSError as exc:
            raise OSError(f"cannot open {self.path} for appending: {exc.strerror or exc}") from None

    def _open_sync(self) -> None:
        f = self._open_file()
        try:
            size = os.fstat(f.fileno()).st_size
            expected = header(self.separator).encode()
            if size == 0:
                f.write(expected)
            else:
                self._check_existing(size, expected, f)
            f.flush()
        except BaseException:
            f.close()
            raise
        self._file = f

    def _check_existing(self, size: int, expected: bytes, appender: BinaryIO) -> None:
        """Appending to a file with another layout would mix two formats: say so. A last line cut short
        (a crash mid-write) gets its newline, so that the next row starts on a line of its own."""
        with self.path.open("rb") as reader:
            first = reader.readline(len(expected) + 1)
            reader.seek(size - 1)
            last = reader.read(1)
        if first != expected:
            log.warning(
                "%s: the existing first line is not this output's header (%r); appending rows anyway",
                self.path,
                first[:200].decode("utf-8", "replace"),
            )
        if last != b"\n":
            log.warning("%s: the last line was incomplete; it is ended before appending", self.path)
            appender.write(b"\n")

    async def open(self) -> None:
        await trio.to_thread.run_sync(self._open_sync)

    def _write_sync(self, batches: list[Batch]) -> int:
        if self._file is None:
            self._open_sync()
        assert self._file is not None
        text = format_batches(batches, self.separator, self._timestamps)
        self._file.write(text.encode("utf-8"))
        self._file.flush()
        return sum(len(b) for b in batches)

    async def write(self, batches: list[Batch]) -> None:
        self.points_written += await trio.to_thread.run_sync(self._write_sync, batches)

    def _close_sync(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None

    async def close(self) -> None:
        await trio.to_thread.run_sync(self._close_sync)


class CsvPlugin(Plugin):
    name = "csv"
    version = "0.1.0"
    agent_api = ">=1,<2"
    description = "Appends points to a ;-separated CSV file (the default output)."
    Config = CsvConfig
    enabled_by_default = True
    provides = ("output",)

    def start(self, ctx: StartContext, config: CsvConfig) -> None:
        # Relative paths are relative to the working directory, as on the command line.
        output = CsvOutput(Path(os.path.expanduser(config.path)), config.separator, config.flush_interval)
        output.check_writable()
        ctx.add_output(output, config)
        ctx.logger.info("writing points to %s", output.path.resolve())


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [CsvPlugin]
