"""The relay client's buffer: batches waiting for the server's acknowledgement, with what gives them meaning.

A stored batch is its encoded wire series (relay.protocol.WireSeries, MessagePack), appended to a log
(agent.durable_log) whose record number is the batch's sequence number. Two more things must live as
long as those records, and are kept beside them:

- the **stream id**: sequence numbers count within a stream; a log that starts its numbering again
  (new, deleted, memory-only) gets a new stream id, so that the server never takes its batches for
  duplicates;
- the **metric id table**: stored batches name their metrics by client id, so the table that maps ids
  to definitions must survive as long as they do. It is only ever added to while batches refer to it,
  and written (atomically, synced) before the first batch that uses a new id is appended. When
  nothing is pending at start, it starts empty again, so it does not grow for ever.

On disk, under the buffer directory: `log/` (the DurableLog) and `stream.msgpack` (stream id and metric
table). With the disk buffer off, a MemoryLog and a fresh stream id per start.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import msgspec

from agent.decoding import MalformedData, decode_untrusted
from agent.durable_log import DurableLog, FsyncPolicy, MemoryLog, RecordLog
from agent.model import MetricDef, MetricRegistry, Series

log = logging.getLogger(__name__)

STREAM_FILE = "stream.msgpack"
#: Segments of the disk buffer. Larger than the durable log's default: a segment roll syncs the old
#: segment, and at millions of points per second 8 MiB segments roll several times a second. (The
#: log caps them at a quarter of max_bytes, so a small buffer still drops a quarter at most.)
SEGMENT_BYTES = 64 * 1024 * 1024
LOG_DIRECTORY = "log"
_FORMAT_VERSION = 1


class StreamFile(msgspec.Struct, array_like=True):
    """The content of stream.msgpack."""

    version: int
    stream_id: str
    metrics: list[MetricDef]


_STREAM_FILE_DECODER = msgspec.msgpack.Decoder(StreamFile)


def new_stream_id() -> str:
    return uuid.uuid4().hex


class BatchStore:
    """The log of encoded batches, its stream id and its metric id table (see the module docstring).

    Synchronous: the disk variant is called from a worker thread by the relay client.
    """

    def __init__(
        self, log_: RecordLog, directory: Path | None, stream_id: str, metrics: list[MetricDef]
    ) -> None:
        self.log = log_
        self.directory = directory
        self.stream_id = stream_id
        self.metrics: list[MetricDef] = metrics
        self.metric_ids: dict[str, int] = {d.name: i for i, d in enumerate(metrics)}
        self._fsync = not isinstance(log_, DurableLog) or log_.fsync != "never"

    @property
    def durable(self) -> bool:
        return self.directory is not None

    # -- opening --

    @classmethod
    def open_disk(
        cls,
        directory: Path,
        *,
        max_bytes: int,
        fsync: FsyncPolicy = "interval",
        segment_bytes: int = SEGMENT_BYTES,
    ) -> BatchStore:
        directory.mkdir(parents=True, exist_ok=True)
        durable_log = DurableLog(
            directory / LOG_DIRECTORY, max_bytes=max_bytes, fsync=fsync, segment_bytes=segment_bytes
        )
        try:
            saved = _read_stream_file(directory / STREAM_FILE)
            pending = durable_log.pending_records
            if durable_log.last_seq == 0 or saved is None:
                if saved is None and pending:
                    # Stored batches name metrics by ids that nobody can resolve any more.
                    log.error(
                        "relay-client: %s is missing or damaged: the %d batches in the disk buffer cannot be"
                        " sent (their metric ids are unknown) and are dropped",
                        directory / STREAM_FILE,
                        pending,
                    )
                    durable_log.commit(durable_log.last_seq)
                store = cls(durable_log, directory, new_stream_id(), [])
            elif pending == 0:
                store = cls(durable_log, directory, saved.stream_id, [])
            else:
                store = cls(durable_log, directory, saved.stream_id, list(saved.metrics))
            store.save()
            return store
        except BaseException:
            durable_log.close()
            raise

    @classmethod
    def open_memory(cls, *, max_bytes: int) -> BatchStore:
        return cls(MemoryLog(max_bytes=max_bytes), None, new_stream_id(), [])

    # -- the stream id and the metric table --

    def start_new_stream(self) -> None:
        """Moves the stored batches to a new stream (their numbering went backwards)."""
        self.stream_id = new_stream_id()
        self.save()

    def assign_ids(self, series: Iterable[Series], registry: MetricRegistry | None) -> bool:
        """Gives every metric name of `series` a client id; returns True if the table grew (then
        `save` must run before a batch using the new ids is appended)."""
        ids = self.metric_ids
        grew = False
        for s in series:
            name = s.metric
            if isinstance(name, str) and name not in ids:
                definition = registry.get(name) if registry is not None else None
                if definition is None:
                    # Not registered (a source that skipped create_metric): describe it from its values.
                    first = s.values[0] if s.values else 0.0
                    value_type = "int" if isinstance(first, int) and not isinstance(first, bool) else "float"
                    definition = MetricDef(name, "1", value_type, "")
                ids[name] = len(self.metrics)
                self.metrics.append(definition)
                grew = True
        return grew

    def save(self) -> None:
        """Writes stream.msgpack atomically (and durably, unless the log's fsync policy is "never")."""
        if self.directory is None:
            return
        data = msgspec.msgpack.encode(StreamFile(_FORMAT_VERSION, self.stream_id, self.metrics))
        path = self.directory / STREAM_FILE
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            if self._fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        if self._fsync:
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def close(self) -> None:
        self.log.close()


@dataclass(frozen=True)
class DiskBuffer:
    """Where and how to open the disk buffer (opened by the client's output task, in a thread)."""

    directory: Path
    max_bytes: int
    fsync: FsyncPolicy = "interval"
    segment_bytes: int = SEGMENT_BYTES
    durable: ClassVar[bool] = True

    def open(self) -> BatchStore:
        return BatchStore.open_disk(
            self.directory, max_bytes=self.max_bytes, fsync=self.fsync, segment_bytes=self.segment_bytes
        )


@dataclass(frozen=True)
class MemoryBuffer:
    """The memory buffer: no file, nothing survives a restart."""

    max_bytes: int
    durable: ClassVar[bool] = False

    def open(self) -> BatchStore:
        return BatchStore.open_memory(max_bytes=self.max_bytes)


BufferSpec = DiskBuffer | MemoryBuffer


def _read_stream_file(path: Path) -> StreamFile | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        saved = decode_untrusted(_STREAM_FILE_DECODER, data)
    except MalformedData as exc:
        log.warning("relay-client: %s is damaged (%s); starting a new stream", path, exc)
        return None
    if saved.version != _FORMAT_VERSION or not saved.stream_id:
        log.warning(
            "relay-client: %s has an unknown format (version %s); starting a new stream", path, saved.version
        )
        return None
    return saved


__all__ = ["BatchStore", "BufferSpec", "DiskBuffer", "MemoryBuffer", "StreamFile", "new_stream_id"]
