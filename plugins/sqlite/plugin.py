"""The `sqlite` output: points and metric definitions in one SQLite file, queryable with the `sqlite3` shell.

For collectors that want a queryable store without running a server. Each `write` from the core (every
`flush_interval`) becomes one transaction: the definitions of metrics not yet in the file, then every
point with one `executemany`. The points are acknowledged once the transaction is committed.

One connection, used by one worker thread at a time (a `CapacityLimiter(1)`), so the event loop never
waits for the disk. The database uses WAL journaling, so readers (the `sqlite3` shell, a dashboard) can
query while the agent writes.
"""

from __future__ import annotations

import itertools
import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import msgspec
import trio

from agent import (
    Batch,
    Duration,
    MetricDef,
    MetricRegistry,
    Output,
    OutputConfig,
    Plugin,
    StartContext,
    hookimpl,
)

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS metrics (
    name TEXT PRIMARY KEY,
    unit TEXT NOT NULL,
    value_type TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT ''
);
-- `value` has no declared type on purpose: integers stay integers and floats stay floats.
CREATE TABLE IF NOT EXISTS points (
    metric TEXT NOT NULL,
    timestamp_ns INTEGER NOT NULL,
    value,
    resource_kind TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    consumer_kind TEXT NOT NULL,
    consumer_id TEXT NOT NULL,
    attributes TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS points_metric_timestamp ON points (metric, timestamp_ns);
-- The same points with a readable UTC time (millisecond precision) and the metric's unit.
CREATE VIEW IF NOT EXISTS points_readable AS
    SELECT strftime('%Y-%m-%dT%H:%M:%fZ', p.timestamp_ns / 1000000000.0, 'unixepoch') AS time,
           p.metric, p.value, m.unit, p.resource_kind, p.resource_id, p.consumer_kind, p.consumer_id,
           p.attributes
    FROM points AS p LEFT JOIN metrics AS m ON m.name = p.metric;
"""

INSERT_POINT = "INSERT INTO points VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
UPSERT_METRIC = """
INSERT INTO metrics (name, unit, value_type, description) VALUES (?, ?, ?, ?)
ON CONFLICT (name) DO UPDATE SET
    unit = excluded.unit, value_type = excluded.value_type, description = excluded.description
"""

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

Synchronous = Literal["off", "normal", "full"]


class SqliteConfig(OutputConfig, kw_only=True):
    """The `[plugins.sqlite]` table."""

    path: str = "agent.sqlite3"
    flush_interval: Duration = Duration(1.0)
    synchronous: Synchronous = "full"

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path must not be empty")
        if self.flush_interval < 0:
            raise ValueError(f"flush_interval must not be negative, got {self.flush_interval!r}")


def point_rows(batches: Iterable[Batch], *, clamp_ints: bool = False) -> Iterator[tuple[Any, ...]]:
    """One row per point, built from per-series constants with C-level iterators (no per-point Python
    unless `clamp_ints`, the slow path for integers beyond SQLite's 64 bits, stored as floats)."""
    encode = msgspec.json.encode
    repeat = itertools.repeat
    for batch in batches:
        for s in batch.series:
            n = len(s.timestamps)
            if not n:
                continue
            attributes = encode(s.attributes).decode() if s.attributes else "{}"
            names = repeat(s.metric, n) if isinstance(s.metric, str) else s.metric
            values: Iterable[Any] = s.values
            if clamp_ints:
                values = [_storable(v) for v in s.values]
            yield from zip(
                names,
                s.timestamps,
                values,
                repeat(s.resource.kind, n),
                repeat(s.resource.id, n),
                repeat(s.consumer.kind, n),
                repeat(s.consumer.id, n),
                repeat(attributes, n),
                strict=True,
            )


def _storable(value: Any) -> Any:
    if isinstance(value, int) and not _INT64_MIN <= value <= _INT64_MAX:
        return float(value)
    return value


def metric_names(batches: Iterable[Batch]) -> set[str]:
    names: set[str] = set()
    for batch in batches:
        for s in batch.series:
            if isinstance(s.metric, str):
                names.add(s.metric)
            else:
                names.update(s.metric)
    return names


class SqliteOutput(Output):
    """Writes batches into one SQLite database through one connection."""

    def __init__(
        self,
        path: Path,
        registry: MetricRegistry,
        flush_interval: float = 1.0,
        synchronous: Synchronous = "full",
    ) -> None:
        self.path = path
        self.registry = registry
        self.flush_interval = float(flush_interval)
        self.synchronous = synchronous
        self._limiter = trio.CapacityLimiter(1)
        self._conn: sqlite3.Connection | None = None
        # Metric names whose definition is in the file, and names seen without a definition (looked up
        # again only when the registry grows: relay clients register metrics while the agent runs).
        self._defined: set[str] = set()
        self._undefined: set[str] = set()
        self._registry_size = -1
        self.points_written = 0
        self.transactions = 0

    # -- the worker thread's side --

    def connect(self) -> sqlite3.Connection:
        """Opens the database and creates the schema; errors name the file."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise OSError(f"cannot open SQLite database {self.path}: {exc}") from None
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                log.warning("%s: WAL journaling is not available (journal_mode is %s)", self.path, mode)
            conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            conn.executescript(SCHEMA)
        except sqlite3.Error as exc:
            conn.close()
            raise OSError(f"cannot use SQLite database {self.path}: {exc}") from None
        return conn

    def _open_sync(self, definitions: list[MetricDef]) -> None:
        if self._conn is None:
            self._conn = self.connect()
        self._transaction(definitions, [])

    def _transaction(self, definitions: list[MetricDef], batches: list[Batch]) -> None:
        conn = self._conn
        if conn is None:
            conn = self._conn = self.connect()
        for clamp_ints in (False, True):
            conn.execute("BEGIN")
            try:
                if definitions:
                    conn.executemany(
                        UPSERT_METRIC, [(d.name, d.unit, d.value_type, d.description) for d in definitions]
                    )
                conn.executemany(INSERT_POINT, point_rows(batches, clamp_ints=clamp_ints))
                conn.execute("COMMIT")
                return
            except OverflowError:
                conn.execute("ROLLBACK")
                if clamp_ints:
                    raise
                log.debug("%s: integers beyond 64 bits in this write; storing them as floats", self.path)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _close_sync(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    # -- the trio side --

    def _new_definitions(self, names: Iterable[str] | None) -> list[MetricDef]:
        """Definitions to upsert: those of `names` (every registered metric if None) not yet written.
        Runs on the trio thread, where the registry is changed."""
        if len(self.registry) != self._registry_size:
            self._registry_size = len(self.registry)
            self._undefined.clear()
        if names is None:
            return [d for d in self.registry if d.name not in self._defined]
        found = []
        for name in set(names) - self._defined - self._undefined:
            definition = self.registry.get(name)
            if definition is None:
                self._undefined.add(name)
            else:
                found.append(definition)
        return found

    async def open(self) -> None:
        definitions = self._new_definitions(None)
        await trio.to_thread.run_sync(self._open_sync, definitions, limiter=self._limiter)
        self._defined.update(d.name for d in definitions)

    async def write(self, batches: list[Batch]) -> None:
        definitions = self._new_definitions(metric_names(batches))
        await trio.to_thread.run_sync(self._transaction, definitions, batches, limiter=self._limiter)
        self._defined.update(d.name for d in definitions)
        self.points_written += sum(len(b) for b in batches)
        self.transactions += 1

    async def close(self) -> None:
        await trio.to_thread.run_sync(self._close_sync, limiter=self._limiter)


class SqlitePlugin(Plugin):
    name = "sqlite"
    version = "0.1.0"
    agent_api = ">=1,<2"
    description = "Writes points and metric definitions to a SQLite file, one transaction per flush."
    Config = SqliteConfig
    enabled_by_default = False
    provides = ("output",)

    def start(self, ctx: StartContext, config: SqliteConfig) -> None:
        # Relative paths are relative to the working directory, as on the command line.
        path = Path(os.path.expanduser(config.path))
        output = SqliteOutput(path, ctx.registry, config.flush_interval, config.synchronous)
        output.connect().close()  # a bad path or a file that is not a database fails here, clearly
        ctx.add_output(output, config)
        ctx.logger.info("writing points to %s", path.resolve())


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [SqlitePlugin]
