"""The `postgres` output: points into PostgreSQL, partitioned by time, each batch stored exactly once.

    inbox ──take──> buffer (durable log on disk, or memory) ──read──> worker thread: one transaction
                    (acks batches without an identity          │       per write (store.Store.write)
                     once they are in the buffer)              └──> commit: buffer position moves,
                                                                    batches with an identity are acked

Why a worker thread: psycopg's async classes run on asyncio only (its waiting functions use the
asyncio loop), and trio is not supported. Its blocking API in `trio.to_thread.run_sync`, with a
limiter of one, keeps one connection on one thread at a time, needs no bridge between event loops, and
gives back-pressure for free: the next write starts only after the previous transaction ended.

Exactly once: every record written carries a `BatchIdentity`, the source's (the relay server's
(client name, stream id, seq)) or, for sources that cannot resend, the buffer's own (this buffer's
stream id and the record's sequence number, which survive restarts). The identity is inserted into the
`batches` table in the same transaction as the points; a retry of a batch already committed finds it
there and skips the points.

Acknowledgements: a batch that its source can resend (it has an identity) is acknowledged once
committed, so the relay upstream keeps it until then; a batch that nobody could send again is
acknowledged once it is in the buffer. While the database is down, the buffer grows up to
`buffer_max_size` (then the oldest records go, counted), and unacknowledged batches hold the output's
queue, which slows the relay server's acknowledgements instead of growing memory.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any, Literal

import msgspec
import psycopg
import trio

from agent import (
    Backoff,
    Batch,
    BatchIdentity,
    ChangeNotifier,
    Consumer,
    Duration,
    MetricDef,
    MetricRegistry,
    NonNegativeDuration,
    Output,
    OutputConfig,
    OutputInbox,
    Plugin,
    PositiveDuration,
    Resource,
    Size,
    StartContext,
    StartupError,
    describe_exception,
    hookimpl,
)
from agent.durable_log import DurableLog, MemoryLog, RecordLog

from .store import Store, StoreError, WriteResult, as_float, is_poison, one_line, redact

log = logging.getLogger(__name__)

#: The origin of identities given by the buffer itself, to batches from sources that set none.
BUFFER_ORIGIN = "agent-buffer"


class PostgresConfig(OutputConfig, kw_only=True):
    """The `[plugins.postgres]` table."""

    url: str = "postgresql://127.0.0.1:5432/test"
    schema: str = "agent"
    partition: PositiveDuration = PositiveDuration(86400.0)
    retention: NonNegativeDuration = NonNegativeDuration(0.0)
    flush_interval: Duration = Duration(1.0)
    buffer: Literal["disk", "memory"] = "disk"
    buffer_max_size: Size = Size(1024**3)
    connect_timeout: PositiveDuration = PositiveDuration(5.0)
    # The relay client holds what is not acknowledged: blocking slows its acknowledgements, where
    # dropping would make it resend.
    overflow: Literal["block", "drop_oldest"] = "block"

    def __post_init__(self) -> None:
        if not self.url:
            raise ValueError("url must not be empty")
        if not self.schema or len(self.schema.encode()) > 63 or "\x00" in self.schema:
            raise ValueError(f"schema must be 1 to 63 bytes without NUL, got {self.schema!r}")
        if self.partition < 60:
            raise ValueError(f"partition must be at least 1m, got {self.partition}")
        if self.flush_interval < 0:
            raise ValueError(f"flush_interval must not be negative, got {self.flush_interval}")
        if self.buffer_max_size < 1024 * 1024:
            raise ValueError(f"buffer_max_size must be at least 1MiB, got {self.buffer_max_size}")


_encode_batch = msgspec.msgpack.Encoder().encode
_decode_batch = msgspec.msgpack.Decoder(Batch).decode


def _utf8(text: str) -> str:
    """The text with what UTF-8 cannot encode (lone surrogates) replaced by U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


def metric_names(batches: list[Batch]) -> set[str]:
    names: set[str] = set()
    for batch in batches:
        for s in batch.series:
            if isinstance(s.metric, str):
                names.add(s.metric)
            else:
                names.update(s.metric)
    return names


class PostgresOutput(Output):
    """Buffers batches and writes them to PostgreSQL through `Store`, one transaction per write."""

    def __init__(
        self,
        store: Store,
        registry: MetricRegistry,
        *,
        buffer_dir: Path | None,
        buffer_max_size: int = 1024**3,
        flush_interval: float = 1.0,
        batch_max_points: int = 100_000,
    ) -> None:
        self.store = store
        self.registry = registry
        self.buffer_dir = buffer_dir
        self.buffer_max_size = buffer_max_size
        self.flush_interval = float(flush_interval)
        self.batch_max_points = batch_max_points
        self._limiter = trio.CapacityLimiter(1)
        self._log: RecordLog | None = None
        self._stream = ""
        # Envelopes acknowledged only once committed, by buffer seq.
        self._waiting: dict[int, Any] = {}
        self._appended = ChangeNotifier()
        self._taking_done = False
        self._registered = 0
        self.points_written = 0
        self.duplicate_batches = 0
        self.rejected_points = 0
        self.failed_writes = 0
        self.transactions = 0
        self.connected = False

    # -- the buffer --

    def _open_buffer(self) -> tuple[RecordLog, str]:
        if self.buffer_dir is None:
            return MemoryLog(max_bytes=self.buffer_max_size), uuid.uuid4().hex
        self.buffer_dir.mkdir(parents=True, exist_ok=True)
        # The buffer's own stream id: the seqs restart from 1 if the folder is wiped, and a new id then
        # keeps the new seqs apart from the identities already in the database.
        id_file = self.buffer_dir / "stream-id"
        try:
            stream = id_file.read_text(encoding="ascii").strip()
        except (FileNotFoundError, UnicodeDecodeError):
            stream = ""
        if not stream:
            stream = uuid.uuid4().hex
            tmp = id_file.with_suffix(".tmp")
            tmp.write_text(stream + "\n", encoding="ascii")
            tmp.replace(id_file)
        return DurableLog(self.buffer_dir / "log", max_bytes=self.buffer_max_size), stream

    # -- the output --

    async def run(self, inbox: OutputInbox, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        self._log, self._stream = await trio.to_thread.run_sync(self._open_buffer)
        if self._log.pending_records:
            log.info("postgres: %d batches from the last run wait in the buffer", self._log.pending_records)
        self._taking_done = False
        self._registered = self._log.last_seq
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._take, inbox)
                await self._write_loop(inbox)
        finally:
            # What was not committed is never acknowledged: the relay client resends it.
            for env in self._waiting.values():
                env.done(False)
            self._waiting.clear()
            with trio.CancelScope(shield=True):
                buffer, self._log = self._log, None
                await trio.to_thread.run_sync(buffer.close)
                await trio.to_thread.run_sync(self.store.disconnect, limiter=self._limiter)

    async def _take(self, inbox: OutputInbox) -> None:
        """Moves envelopes from the output's queue into the buffer."""
        assert self._log is not None
        buffer = self._log
        while True:
            envs = await inbox.receive_batch(self.batch_max_points, self.flush_interval)
            if not envs:
                break
            envs = [e for e in envs if not e.settled]
            if not envs:
                continue
            payloads = []
            kept = []
            for env in envs:
                try:
                    payloads.append(_encode_batch(env.batch))
                except (OverflowError, UnicodeError):
                    # Integers or timestamps beyond 64 bits, lone surrogates in names (a pickle can hold
                    # them): made storable, or refused, here rather than crashing at every retry.
                    try:
                        payloads.append(_encode_batch(self._encodable(env.batch)))
                    except (OverflowError, UnicodeError, ValueError) as exc:
                        self.rejected_points += env.points
                        log.error("postgres: batch %s refused, it cannot be stored: %s", env.batch.identity or "from a local source", exc)
                        env.done(True)  # resending it could never help
                        continue
                kept.append(env)
            envs = kept
            if not envs:
                continue
            last = await trio.to_thread.run_sync(buffer.append_many, payloads)
            first = last - len(envs) + 1
            for seq, env in enumerate(envs, first):
                if env.batch.identity is None:
                    env.done(True)  # nobody could resend it: it is safe once in the buffer
                else:
                    self._waiting[seq] = env
            self._registered = last
            self._appended.notify()
        self._taking_done = True
        self._appended.notify()

    async def _write_loop(self, inbox: OutputInbox) -> None:
        assert self._log is not None
        buffer = self._log
        backoff = Backoff(0.5, 30.0)
        position = buffer.committed_seq
        next_expiry = trio.current_time()
        outage_since: float | None = None
        one_by_one = False
        while True:
            records = await trio.to_thread.run_sync(buffer.read, position)
            # Only records whose envelopes _take has registered: one appended a moment ago may not be.
            records = [r for r in records if r[0] <= self._registered]
            self._settle_lost(position, buffer.committed_seq)
            if not records:
                if self._taking_done:
                    return
                with trio.move_on_after(1.0):
                    await self._appended.wait()
                if self._registered <= position:
                    await trio.to_thread.run_sync(buffer.sync)  # idle: what was appended goes to disk
                continue
            batches, last_seq = self._gather(records)
            try:
                if trio.current_time() >= next_expiry:
                    dropped = await trio.to_thread.run_sync(self.store.expire, limiter=self._limiter)
                    if dropped:
                        log.info("postgres: retention dropped partitions %s", ", ".join(dropped))
                    next_expiry = trio.current_time() + 60.0
                if one_by_one:
                    result = await self._write_one_by_one(batches)
                else:
                    result = await self._write(batches)
            except Exception as exc:
                # Anything but a psycopg, connection or start error comes from the batches' contents:
                # as poison, it sends the batches one by one, and the one that fails alone is refused.
                poison = is_poison(exc) or not isinstance(exc, psycopg.Error | StoreError | OSError)
                if poison and not one_by_one:
                    # Bad data, not a bad moment: write the records one by one, so that only the bad
                    # one is refused (those already committed are recognised by their identity).
                    log.warning(
                        "postgres: a write failed on its data (%s); writing its batches one by one",
                        one_line(exc) if isinstance(exc, psycopg.Error) else describe_exception(exc),
                    )
                    one_by_one = True
                    continue
                self.failed_writes += 1
                inbox.counters.failed_writes += 1
                delay = backoff.next_delay()
                if outage_since is None:
                    outage_since = trio.current_time()
                log.error(
                    "postgres: write of %d points to %s failed: %s; retrying in %.1fs (%d batches wait in the buffer)",
                    sum(len(b) for b in batches),
                    redact(self.store.url),
                    one_line(exc),
                    delay,
                    buffer.pending_records,
                )
                log.debug("postgres write failure", exc_info=True)
                await trio.sleep(delay)
                continue
            one_by_one = False
            if result.new_partitions:
                next_expiry = trio.current_time()  # a new partition may already be past the retention
            if outage_since is not None:
                log.warning(
                    "postgres: writing again after %.0fs; %d batches were retried",
                    trio.current_time() - outage_since,
                    self.failed_writes,
                )
                outage_since = None
            backoff.reset()
            await trio.to_thread.run_sync(buffer.commit, last_seq)
            self._record(result)
            for seq in range(position + 1, last_seq + 1):
                env = self._waiting.pop(seq, None)
                if env is not None:
                    env.done(True)
            position = last_seq

    def _encodable(self, batch: Batch) -> Batch:
        """The batch with values beyond 64 bits as floats (float8 is what they are stored as) and
        without series whose timestamps are beyond 64-bit nanoseconds (refused, logged)."""
        series = []
        for s in batch.series:
            if s.timestamps and (min(s.timestamps) < -(2**63) or max(s.timestamps) >= 2**63):
                self.rejected_points += len(s.timestamps)
                log.error(
                    "postgres: refused %d points of %r from %s: timestamp outside the 64-bit nanosecond range",
                    len(s.timestamps),
                    s.metric if isinstance(s.metric, str) else s.metric[0],
                    batch.identity or "a local source",
                )
                continue
            series.append(
                msgspec.structs.replace(
                    s,
                    metric=_utf8(s.metric) if isinstance(s.metric, str) else [_utf8(m) for m in s.metric],
                    resource=Resource(_utf8(s.resource.kind), _utf8(s.resource.id)),
                    consumer=Consumer(_utf8(s.consumer.kind), _utf8(s.consumer.id)),
                    attributes={
                        _utf8(k): _utf8(v) if isinstance(v, str) else v for k, v in s.attributes.items()
                    },
                    values=[as_float(v) for v in s.values],
                )
            )
        return Batch(series, batch.identity)

    def _settle_lost(self, position: int, committed: int) -> None:
        """Batches the buffer dropped to stay under its size will never be written: the buffer moved its
        position past them (only it does, beyond what this loop committed)."""
        if committed > position:
            for seq in [s for s in self._waiting if position < s <= committed]:
                self._waiting.pop(seq).done(False)

    def _gather(self, records: list[tuple[int, bytes]]) -> tuple[list[Batch], int]:
        """Decodes records up to `batch_max_points` (at least one), each with an identity."""
        batches: list[Batch] = []
        points = 0
        last_seq = records[0][0]
        for seq, payload in records:
            try:
                batch = _decode_batch(payload)
            except msgspec.DecodeError as exc:
                log.error("postgres: buffer record %d is unreadable, skipped: %s", seq, exc)
                last_seq = seq
                continue
            if batches and points + len(batch) > self.batch_max_points:
                break
            if batch.identity is None:
                batch.identity = BatchIdentity(BUFFER_ORIGIN, self._stream, seq)
            batches.append(batch)
            points += len(batch)
            last_seq = seq
        return batches, last_seq

    def _definitions(self, batches: list[Batch]) -> dict[str, MetricDef | None]:
        known = self.store.metric_ids
        return {name: self.registry.get(name) for name in metric_names(batches) if name not in known}

    async def _write(self, batches: list[Batch]) -> WriteResult:
        if not batches:
            return WriteResult()
        definitions = self._definitions(batches)
        result = await trio.to_thread.run_sync(self.store.write, batches, definitions, limiter=self._limiter)
        self.transactions += 1
        return result

    async def _write_one_by_one(self, batches: list[Batch]) -> WriteResult:
        total = WriteResult()
        for batch in batches:
            while True:
                try:
                    result = await self._write([batch])
                    break
                except Exception as exc:
                    if is_poison(exc) or not isinstance(exc, psycopg.Error | StoreError | OSError):
                        log.error(
                            "postgres: batch %s refused, dropped: %s",
                            batch.identity,
                            one_line(exc) if isinstance(exc, psycopg.Error) else describe_exception(exc),
                        )
                        result = WriteResult(rejected_points=len(batch))
                        break
                    raise
            total.points += result.points
            total.duplicate_batches += result.duplicate_batches
            total.rejected_points += result.rejected_points
        return total

    def _record(self, result: WriteResult) -> None:
        self.points_written += result.points
        self.duplicate_batches += result.duplicate_batches
        self.rejected_points += result.rejected_points
        if result.duplicate_batches:
            log.info(
                "postgres: %d batches (%d points) were already stored; not stored again",
                result.duplicate_batches,
                result.duplicate_points,
            )


class PostgresPlugin(Plugin):
    name = "postgres"
    version = "0.1.0"
    description = "Writes points to PostgreSQL (COPY, time partitions, retention), each batch exactly once."
    Config = PostgresConfig
    agent_api = ">=1,<2"
    provides = ("output",)

    def start(self, ctx: StartContext, config: PostgresConfig) -> None:
        store = Store(
            config.url,
            config.schema,
            partition_s=config.partition,
            retention_s=config.retention,
            connect_timeout_s=config.connect_timeout,
        )
        where = f"{redact(config.url)} schema {config.schema!r}"
        try:
            store.connect()
        except StoreError as exc:
            raise StartupError(f"postgres: {where}: {exc}") from None
        except psycopg.OperationalError as exc:
            # Not reachable yet: points wait in the buffer until it is.
            ctx.logger.warning("%s is not reachable (%s); points wait in the buffer", where, one_line(exc))
        except (psycopg.Error, OSError) as exc:
            raise StartupError(f"postgres: {where}: {describe_exception(exc)}") from None
        finally:
            store.disconnect()
        buffer_dir = ctx.plugin_data_dir() / "buffer" if config.buffer == "disk" else None
        output = PostgresOutput(
            store,
            ctx.registry,
            buffer_dir=buffer_dir,
            buffer_max_size=config.buffer_max_size,
            flush_interval=config.flush_interval,
        )
        ctx.add_output(output, config)
        ctx.logger.info("writing points to %s", where)


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [PostgresPlugin]
