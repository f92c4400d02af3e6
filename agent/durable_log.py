"""The durable log: an append-only, size-capped queue of byte records on disk, with a consumer position.

Where it sits: the relay client appends every encoded batch here and commits it only when the relay
server has acknowledged it (at-least-once delivery that survives SIGKILL of the agent); each Graphite
destination spools here while the destination is down and replays from here, in order. `MemoryLog` is
the same thing without the disk, for when the disk buffer is switched off.

Both classes are synchronous and do plain file I/O. Trio code calls them directly for small writes or
through `trio.to_thread.run_sync`; one lock per log makes one writer thread and one reader thread safe.

Semantics shared by `DurableLog` and `MemoryLog`
-------------------------------------------------
- `append`/`append_many` give each record the next sequence number (1, 2, 3...). Numbers are monotonic
  and survive restarts; a number handed out by a returned `append` call is never handed out again.
- `read(after_seq)` returns pending records with seq > after_seq, oldest first. Records at or below
  `committed_seq` are consumed and never returned again.
- `commit(through_seq)` marks everything up to through_seq consumed. The position is written to disk at
  once, so after a crash or restart the reader resumes from the last commit. Committing backwards is a
  no-op; committing past `last_seq` is a `ValueError` (acking something never appended is a bug).
- Size cap: `max_bytes` bounds the stored data, counting every record as `RECORD_OVERHEAD` + its
  payload (for `DurableLog` that is exactly the segment files' size on disk). When an append would exceed
  it, the OLDEST data goes: whole oldest segments for `DurableLog`, oldest records for `MemoryLog`; the
  consumer position moves past them; `dropped_records`/`dropped_bytes` count the pending records that
  were lost; a warning says how much (the first drop of a burst at once, then at most one summary per
  minute, and a last one at close). A batch bigger than `max_bytes` keeps its newest records. A single
  record bigger than `max_bytes` is refused with a `ValueError` and the log is left unchanged.
- `pending_records`/`pending_bytes`: what is still to be consumed (bytes include the record overhead).

On-disk format (version 1)
--------------------------
A log is a directory holding:

- Segment files ``<first seq, 20 decimal digits>.seg``, e.g. ``00000000000000000001.seg``: the seq of the
  first record written to the segment, zero-padded so that name order is seq order. A segment is a plain
  concatenation of records (no file header). Records are only ever appended to the newest segment; a
  new one starts when the next record would take it past `segment_bytes` (which is capped at
  max_bytes/4, so that reaching the cap drops at most about a quarter of the data). A record larger
  than a segment gets a segment of its own. `append_many` does one write per segment it touches.
  The newest segment is kept even when wholly consumed: appends go there, and it keeps the seq
  numbering on disk.
- Each record is a 20-byte little-endian header followed by the payload::

      offset size field
      0      4    magic   b"\\xffDL\\x01"  (0xFF never occurs in UTF-8 text; \\x01 is the format version)
      4      4    crc32   zlib.crc32 of bytes 8..20 of the header followed by the payload
      8      4    length  payload length in bytes (u32)
      12     8    seq     sequence number (u64)
      20     ...  payload

  The CRC covers the length and seq as well as the payload, so a damaged header is detected too.
- ``state``: the consumer position, 28 bytes, written at every commit and at close, replaced
  atomically (write ``state.tmp``, then `os.replace`)::

      0  4  magic b"DLST"    4  2  version (1)    6  2  reserved (0)
      8  8  committed_seq    16 8  last_seq when written    24 4  crc32 of bytes 0..24

- ``lock``: held with `fcntl.flock` while the log is open, so two processes cannot share a directory.

Recovery (every open): stale ``state.tmp`` is removed; segments wholly below the committed position are
deleted unread; the others are scanned and every record's CRC verified. The position is at least the
oldest segment's first seq - 1 (what came before was consumed or dropped by the cap), and last_seq is
the highest of the state file's, the newest record's and the newest segment name's. A damaged record is skipped
and counted in `corrupt_records` (the count is the gap in the seq numbers around it, since seqs in a
segment are consecutive); the scan resynchronises on the next magic whose record checks out, so later
records stay readable. Bytes at the end of a segment that do not form a valid record are cut off
(a torn write from a crash: counted in `truncated_bytes`, or a damaged final record: counted as corrupt).
A missing or damaged state file means "deliver everything still on disk again": duplicates, never loss.
Damaged records in the middle of a segment stay in the file (and are counted again at the next open)
until the segment is consumed and deleted.

Durability (`fsync`): "always" fdatasyncs after every append and commit (and the directory when files
come and go); "interval" syncs from inside append/commit calls when `fsync_interval_s` has passed since
the last sync, and whatever is still unsynced on `sync()`/`close()`: the owner should call `sync()` on a
timer while idle; "never" leaves it to the OS. All three survive a crash of the process (the data is in
the kernel after each call). A power loss can lose the last unsynced appends under "interval" and
"never", and move the consumer position back (duplicates); their seq numbers may then be handed out again.

Memory: the index costs 24 bytes per record on disk, so append batches, not single points.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import io
import logging
import os
import re
import struct
import threading
import time
import zlib
from array import array
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol

logger = logging.getLogger(__name__)

RECORD_MAGIC = b"\xffDL\x01"
_RECORD_HEADER = struct.Struct("<4sIIQ")
#: Bytes each record costs on top of its payload (the header); counted in sizes and in the cap.
RECORD_OVERHEAD = _RECORD_HEADER.size
_MAX_PAYLOAD = 0xFFFFFFFF

STATE_MAGIC = b"DLST"
_STATE_VERSION = 1
_STATE = struct.Struct("<4sHHQQ")
_STATE_SIZE = _STATE.size + 4
_STATE_NAME = "state"
_STATE_TMP_NAME = "state.tmp"
_LOCK_NAME = "lock"
_SEGMENT_SUFFIX = ".seg"
_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")

FsyncPolicy = Literal["always", "interval", "never"]
_FSYNC_POLICIES = ("always", "interval", "never")

DEFAULT_SEGMENT_BYTES = 8 * 1024 * 1024
DEFAULT_READ_MAX_RECORDS = 1000
DEFAULT_READ_MAX_BYTES = 4 * 1024 * 1024
#: At most one drop summary per this many seconds, so a long outage does not flood the log.
DROP_WARNING_INTERVAL_S = 60.0

_fdatasync = getattr(os, "fdatasync", os.fsync)


class RecordLog(Protocol):
    """What a consumer of a log (relay client, Graphite destination) relies on; both classes fit."""

    def append(self, payload: bytes) -> int: ...
    def append_many(self, payloads: Iterable[bytes]) -> int: ...
    def read(
        self, after_seq: int, max_records: int = ..., max_bytes: int = ...
    ) -> list[tuple[int, bytes]]: ...
    def commit(self, through_seq: int) -> None: ...
    def sync(self) -> None: ...
    def close(self) -> None: ...
    @property
    def committed_seq(self) -> int: ...
    @property
    def last_seq(self) -> int: ...
    @property
    def pending_records(self) -> int: ...
    @property
    def pending_bytes(self) -> int: ...
    @property
    def size_bytes(self) -> int: ...


_LENGTH_SEQ = struct.Struct("<IQ")
_CRC = struct.Struct("<I")


def encode_record_into(buffer: bytearray, seq: int, payload: bytes) -> None:
    """Append one record, as it is stored in a segment file (header + payload), to buffer."""
    length_seq = _LENGTH_SEQ.pack(len(payload), seq)
    buffer += RECORD_MAGIC
    buffer += _CRC.pack(zlib.crc32(payload, zlib.crc32(length_seq)))
    buffer += length_seq
    buffer += payload


def encode_record(seq: int, payload: bytes) -> bytes:
    """One record as it is stored in a segment file (header + payload)."""
    buffer = bytearray()
    encode_record_into(buffer, seq, payload)
    return bytes(buffer)


class _DropReporter:
    """Counts drops and logs them: the first drop of a burst at once, then one summary per interval."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dropped_records = 0
        self.dropped_bytes = 0
        self._unreported_records = 0
        self._unreported_bytes = 0
        self._last_warning: float | None = None

    def note(self, records: int, nbytes: int, max_bytes: int) -> None:
        if records == 0:
            return
        self.dropped_records += records
        self.dropped_bytes += nbytes
        self._unreported_records += records
        self._unreported_bytes += nbytes
        now = time.monotonic()
        if self._last_warning is None or now - self._last_warning >= DROP_WARNING_INTERVAL_S:
            self._warn(f"size cap max_bytes={max_bytes} reached")
            self._last_warning = now

    def flush(self) -> None:
        if self._unreported_records:
            self._warn("at close")

    def _warn(self, when: str) -> None:
        logger.warning(
            "%s: %s: dropped the oldest %d pending records (%d bytes); %d records (%d bytes) dropped in total",
            self.name,
            when,
            self._unreported_records,
            self._unreported_bytes,
            self.dropped_records,
            self.dropped_bytes,
        )
        self._unreported_records = 0
        self._unreported_bytes = 0


def _check_max_bytes(max_bytes: int) -> None:
    if max_bytes <= RECORD_OVERHEAD:
        raise ValueError(
            f"max_bytes must be more than the {RECORD_OVERHEAD}-byte record overhead, got {max_bytes}"
        )


def _record_sizes(name: str, payloads: list[bytes], max_bytes: int) -> list[int]:
    """Stored size of each record; refuses a record that could never fit."""
    sizes = []
    for payload in payloads:
        size = RECORD_OVERHEAD + len(payload)
        if size > max_bytes or len(payload) > _MAX_PAYLOAD:
            raise ValueError(
                f"{name}: record of {len(payload)} bytes (+{RECORD_OVERHEAD} bytes overhead) "
                f"is larger than max_bytes={max_bytes}"
            )
        sizes.append(size)
    return sizes


def _oversized_prefix(sizes: list[int], max_bytes: int) -> int:
    """How many of a batch's oldest records must go so that the rest fits in max_bytes."""
    total = sum(sizes)
    drop = 0
    while total > max_bytes:
        total -= sizes[drop]
        drop += 1
    return drop


def _check_read_limits(max_records: int, max_bytes: int) -> None:
    if max_records < 1:
        raise ValueError(f"read: max_records must be at least 1, got {max_records}")
    if max_bytes < 1:
        raise ValueError(f"read: max_bytes must be at least 1, got {max_bytes}")


class MemoryLog:
    """The `DurableLog` API and semantics in memory, bounded by max_bytes; nothing survives a restart."""

    def __init__(self, *, max_bytes: int) -> None:
        _check_max_bytes(max_bytes)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        # Pending records are exactly seqs committed+1 .. last, so index = seq - committed - 1 + head.
        self._payloads: list[bytes] = []
        self._head = 0
        self._committed_seq = 0
        self._last_seq = 0
        self._pending_bytes = 0
        self._drops = _DropReporter("memory log")
        self._closed = False

    def __repr__(self) -> str:
        return f"MemoryLog(max_bytes={self.max_bytes}, committed_seq={self._committed_seq}, last_seq={self._last_seq})"

    def __enter__(self) -> MemoryLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    committed_seq = property(lambda self: self._committed_seq, doc="Everything <= this is consumed.")
    last_seq = property(lambda self: self._last_seq, doc="Seq of the newest record appended (0 if none).")
    pending_records = property(lambda self: self._last_seq - self._committed_seq)
    pending_bytes = property(lambda self: self._pending_bytes)
    size_bytes = property(lambda self: self._pending_bytes)
    dropped_records = property(lambda self: self._drops.dropped_records)
    dropped_bytes = property(lambda self: self._drops.dropped_bytes)
    corrupt_records = property(lambda self: 0, doc="Always 0: memory is not scanned at recovery.")
    truncated_bytes = property(lambda self: 0, doc="Always 0: memory is not scanned at recovery.")

    def append(self, payload: bytes) -> int:
        return self.append_many((payload,))

    def append_many(self, payloads: Iterable[bytes]) -> int:
        with self._lock:
            self._check_open()
            batch = [bytes(p) for p in payloads]
            sizes = _record_sizes("memory log", batch, self.max_bytes)
            if not batch:
                return self._last_seq
            # The batch's own oldest records go first if the batch alone is over the cap.
            skip = _oversized_prefix(sizes, self.max_bytes)
            incoming = sum(sizes[skip:])
            dropped_records = 0
            dropped_bytes = 0
            while self._pending_bytes + incoming > self.max_bytes:
                size = RECORD_OVERHEAD + len(self._payloads[self._head])
                self._head += 1
                self._committed_seq += 1
                self._pending_bytes -= size
                dropped_records += 1
                dropped_bytes += size
            self._compact()
            first = self._last_seq + 1
            self._last_seq += len(batch)
            if skip:
                dropped_records += skip
                dropped_bytes += sum(sizes[:skip])
                self._committed_seq = first + skip - 1
            self._payloads.extend(batch[skip:])
            self._pending_bytes += incoming
            self._drops.note(dropped_records, dropped_bytes, self.max_bytes)
            return self._last_seq

    def read(
        self,
        after_seq: int,
        max_records: int = DEFAULT_READ_MAX_RECORDS,
        max_bytes: int = DEFAULT_READ_MAX_BYTES,
    ) -> list[tuple[int, bytes]]:
        """Pending records with seq > after_seq, oldest first; at most max_records, and at most max_bytes
        of payload unless the first record alone is larger (so a reader never gets stuck)."""
        _check_read_limits(max_records, max_bytes)
        with self._lock:
            self._check_open()
            start = max(after_seq, self._committed_seq)
            index = self._head + start - self._committed_seq
            out: list[tuple[int, bytes]] = []
            total = 0
            seq = start
            for payload in self._payloads[index : index + max_records]:
                total += len(payload)
                if out and total > max_bytes:
                    break
                seq += 1
                out.append((seq, payload))
            return out

    def commit(self, through_seq: int) -> None:
        with self._lock:
            self._check_open()
            if through_seq <= self._committed_seq:
                return
            if through_seq > self._last_seq:
                raise ValueError(f"memory log: commit({through_seq}) is past the last seq {self._last_seq}")
            count = through_seq - self._committed_seq
            consumed = self._payloads[self._head : self._head + count]
            self._pending_bytes -= sum(map(len, consumed)) + RECORD_OVERHEAD * count
            self._head += count
            self._committed_seq = through_seq
            self._compact()

    def sync(self) -> None:
        """Nothing to do: memory has no durability to offer."""

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._drops.flush()

    def _compact(self) -> None:
        # Drop consumed references once they are half the list: amortised O(1) per record.
        if self._head > 1024 and self._head * 2 > len(self._payloads):
            del self._payloads[: self._head]
            self._head = 0

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("memory log is closed")


class _Segment:
    """One segment file and the index of its valid records."""

    __slots__ = ("first_seq", "path", "seqs", "offsets", "cum", "size", "file")

    def __init__(self, first_seq: int, path: Path) -> None:
        self.first_seq = first_seq
        self.path = path
        self.seqs = array("Q")
        self.offsets = array("Q")
        # cum[i] = stored bytes of records 0..i-1 (damaged regions excluded); len(cum) == len(seqs) + 1.
        self.cum = array("Q", [0])
        self.size = 0  # bytes in the file, damaged regions included
        self.file: io.FileIO | None = None  # open for appending while this is the newest segment

    def add(self, seq: int, offset: int, stored: int) -> None:
        self.seqs.append(seq)
        self.offsets.append(offset)
        self.cum.append(self.cum[-1] + stored)

    def first_after(self, seq: int) -> int:
        """Index of the first record with a seq greater than `seq`."""
        if not self.seqs or self.seqs[0] > seq:
            return 0
        return bisect.bisect_right(self.seqs, seq)

    def stored_from(self, index: int) -> int:
        return self.cum[-1] - self.cum[index]


def _segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{_SEGMENT_SUFFIX}"


class DurableLog:
    """An append-only log of byte records in segment files, with a persisted consumer position.

    See the module docstring for the semantics and the on-disk format.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        fsync: FsyncPolicy = "interval",
        fsync_interval_s: float = 1.0,
    ) -> None:
        _check_max_bytes(max_bytes)
        if segment_bytes < 1:
            raise ValueError(f"segment_bytes must be positive, got {segment_bytes}")
        if fsync not in _FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(_FSYNC_POLICIES)}, got {fsync!r}")
        if fsync_interval_s < 0:
            raise ValueError(f"fsync_interval_s must not be negative, got {fsync_interval_s}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        # Space comes back a segment at a time, so cap the segment size at a quarter of the budget:
        # reaching the cap then drops at most about a quarter of the buffered data.
        self.segment_bytes = min(segment_bytes, max(max_bytes // 4, 1))
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self._name = f"durable log {self.directory}"
        self._lock = threading.RLock()
        self._segments: list[_Segment] = []
        self._first_seqs: list[int] = []  # parallel to _segments, for bisect
        self._size_bytes = 0
        self._committed_seq = 0
        self._last_seq = 0
        self._corrupt_records = 0
        self._truncated_bytes = 0
        self._drops = _DropReporter(self._name)
        self._reader: tuple[_Segment, io.FileIO] | None = None  # cached read handle of an older segment
        self._unsynced_data = False
        self._unsynced_dir = False
        self._unsynced_state = False
        self._last_sync = time.monotonic()
        self._closed = False
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._take_lock()
        try:
            self._recover()
        except BaseException:
            self._lock_file.close()
            raise

    def __repr__(self) -> str:
        return (
            f"DurableLog({str(self.directory)!r}, committed_seq={self._committed_seq}, "
            f"last_seq={self._last_seq}, segments={len(self._segments)})"
        )

    def __enter__(self) -> DurableLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- public state -------------------------------------------------------------------------------

    @property
    def committed_seq(self) -> int:
        """Everything <= this is consumed (acknowledged, or dropped by the size cap)."""
        return self._committed_seq

    @property
    def last_seq(self) -> int:
        """Seq of the newest record appended (0 if none ever was)."""
        return self._last_seq

    @property
    def pending_records(self) -> int:
        with self._lock:
            return sum(len(seg.seqs) - seg.first_after(self._committed_seq) for seg in self._segments)

    @property
    def pending_bytes(self) -> int:
        """Stored bytes (payload + `RECORD_OVERHEAD`) of the records still to be consumed."""
        with self._lock:
            return sum(seg.stored_from(seg.first_after(self._committed_seq)) for seg in self._segments)

    @property
    def size_bytes(self) -> int:
        """Bytes of segment files on disk (the state and lock files aside)."""
        return self._size_bytes

    @property
    def dropped_records(self) -> int:
        return self._drops.dropped_records

    @property
    def dropped_bytes(self) -> int:
        return self._drops.dropped_bytes

    @property
    def corrupt_records(self) -> int:
        """Records found damaged (and skipped) when this log was opened, or later while reading."""
        return self._corrupt_records

    @property
    def truncated_bytes(self) -> int:
        """Bytes of torn writes cut off the end of segments when this log was opened."""
        return self._truncated_bytes

    # --- writing ------------------------------------------------------------------------------------

    def append(self, payload: bytes) -> int:
        """Append one record; returns its seq."""
        return self.append_many((payload,))

    def append_many(self, payloads: Iterable[bytes]) -> int:
        """Append records and return the seq of the last one.

        One write per segment touched, so one write for any batch smaller than a segment; under
        fsync="always" one fdatasync per segment touched."""
        with self._lock:
            self._check_open()
            batch = list(payloads)
            sizes = _record_sizes(self._name, batch, self.max_bytes)
            if not batch:
                return self._last_seq
            first = self._last_seq + 1
            skip = _oversized_prefix(sizes, self.max_bytes)
            incoming = sum(sizes[skip:])
            dropped_records = 0
            dropped_bytes = 0
            while self._segments and self._size_bytes + incoming > self.max_bytes:
                records, nbytes = self._drop_oldest_segment()
                dropped_records += records
                dropped_bytes += nbytes
            if skip:
                dropped_records += skip
                dropped_bytes += sum(sizes[:skip])
                # Those seq numbers are spent: last_seq moves with the position, even if the write fails.
                self._committed_seq = self._last_seq = first + skip - 1
            # No state write here: recovery puts the position at or past the oldest segment anyway.
            self._drops.note(dropped_records, dropped_bytes, self.max_bytes)
            index = skip
            while index < len(batch):
                index = self._write_chunk(batch, sizes, index, first)
            self._sync_per_policy()
            return self._last_seq

    def _write_chunk(self, batch: list[bytes], sizes: list[int], index: int, first_seq: int) -> int:
        """Write the records from batch[index] on that fit the newest segment (starting a new one
        when it is full) with one write; returns the index of the first record not written."""
        segment = self._segments[-1] if self._segments else None
        if segment is None or (segment.size and segment.size + sizes[index] > self.segment_bytes):
            segment = self._start_segment(first_seq + index)
        room = self.segment_bytes - segment.size
        buffer = bytearray()
        end = index
        while end < len(batch) and (end == index or len(buffer) + sizes[end] <= room):
            encode_record_into(buffer, first_seq + end, batch[end])
            end += 1
        view = memoryview(buffer)
        written = 0
        try:
            while written < len(view):
                written += segment.file.write(view[written:])
        except OSError as exc:
            # Disk full or similar: take back any partial write so that the file, the index and
            # the seq numbering stay in step, and tell the caller which file it was.
            if written:
                os.truncate(segment.path, segment.size)
            raise OSError(exc.errno, f"{self._name}: cannot write {segment.path}: {exc.strerror}") from exc
        offset = segment.size
        for i in range(index, end):
            segment.add(first_seq + i, offset, sizes[i])
            offset += sizes[i]
        self._size_bytes += offset - segment.size
        segment.size = offset
        self._last_seq = first_seq + end - 1
        self._unsynced_data = True
        return end

    def commit(self, through_seq: int) -> None:
        """Mark everything <= through_seq consumed; persist that; delete wholly consumed segments."""
        with self._lock:
            self._check_open()
            if through_seq <= self._committed_seq:
                return
            if through_seq > self._last_seq:
                raise ValueError(f"{self._name}: commit({through_seq}) is past the last seq {self._last_seq}")
            self._committed_seq = through_seq
            self._write_state()
            # The newest segment stays even when consumed: it is where appends go, and it keeps the
            # seq numbering on disk should the state file be lost.
            while len(self._segments) > 1 and self._first_seqs[1] - 1 <= through_seq:
                self._remove_segment(self._segments[0])
            self._sync_per_policy()

    # --- reading ------------------------------------------------------------------------------------

    def read(
        self,
        after_seq: int,
        max_records: int = DEFAULT_READ_MAX_RECORDS,
        max_bytes: int = DEFAULT_READ_MAX_BYTES,
    ) -> list[tuple[int, bytes]]:
        """Pending records with seq > after_seq, oldest first; at most max_records, and at most max_bytes
        of payload unless the first record alone is larger (so a reader never gets stuck)."""
        _check_read_limits(max_records, max_bytes)
        with self._lock:
            self._check_open()
            start = max(after_seq, self._committed_seq)
            out: list[tuple[int, bytes]] = []
            payload_bytes = 0
            index = max(bisect.bisect_right(self._first_seqs, start) - 1, 0)
            for segment in self._segments[index:]:
                lo = segment.first_after(start)
                hi = lo
                count = len(segment.seqs)
                while hi < count and len(out) + (hi - lo) < max_records:
                    length = segment.cum[hi + 1] - segment.cum[hi] - RECORD_OVERHEAD
                    if (out or hi > lo) and payload_bytes + length > max_bytes:
                        break
                    payload_bytes += length
                    hi += 1
                if hi > lo:
                    out.extend(self._read_range(segment, lo, hi))
                if hi < count or len(out) >= max_records:
                    break
            return out

    def _read_range(self, segment: _Segment, lo: int, hi: int) -> list[tuple[int, bytes]]:
        start = segment.offsets[lo]
        end = segment.offsets[hi - 1] + (segment.cum[hi] - segment.cum[hi - 1])
        data = os.pread(self._read_handle(segment).fileno(), end - start, start)
        view = memoryview(data)
        out = []
        for i in range(lo, hi):
            pos = segment.offsets[i] - start
            stored = segment.cum[i + 1] - segment.cum[i]
            seq = segment.seqs[i]
            if not self._record_ok(view, pos, stored, seq):
                # The file changed under us since it was indexed: skip the record rather than
                # hand out damaged data, and say so.
                self._corrupt_records += 1
                logger.error(
                    "%s: record %d in %s failed its checksum on read; skipped", self._name, seq, segment.path
                )
                continue
            out.append((seq, bytes(view[pos + RECORD_OVERHEAD : pos + stored])))
        return out

    @staticmethod
    def _record_ok(view: memoryview, pos: int, stored: int, seq: int) -> bool:
        if pos + stored > len(view):
            return False
        magic, crc, length, record_seq = _RECORD_HEADER.unpack_from(view, pos)
        if magic != RECORD_MAGIC or length != stored - RECORD_OVERHEAD or record_seq != seq:
            return False
        return zlib.crc32(view[pos + 8 : pos + stored]) == crc

    def _read_handle(self, segment: _Segment) -> io.FileIO:
        if segment.file is not None:
            return segment.file
        if self._reader is not None and self._reader[0] is segment:
            return self._reader[1]
        self._close_reader()
        handle = open(segment.path, "rb", buffering=0)  # noqa: SIM115 - cached, closed in _close_reader
        self._reader = (segment, handle)
        return handle

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader[1].close()
            self._reader = None

    # --- durability ---------------------------------------------------------------------------------

    def sync(self) -> None:
        """Flush everything written so far to stable storage (cheap when nothing is unsynced)."""
        with self._lock:
            self._check_open()
            self._sync()

    def close(self) -> None:
        """Write the state, sync (unless fsync="never"), close the files, release the directory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                # The state file then also carries last_seq, so even a damaged final record cannot
                # cause its seq number to be handed out again after the restart.
                self._write_state(durable=self.fsync != "never")
                if self.fsync != "never":
                    self._sync()
            finally:
                self._closed = True
                self._close_reader()
                for segment in self._segments:
                    if segment.file is not None:
                        segment.file.close()
                        segment.file = None
                self._lock_file.close()
                self._drops.flush()

    def _sync_per_policy(self) -> None:
        if self.fsync == "always":
            self._sync()
        elif self.fsync == "interval" and time.monotonic() - self._last_sync >= self.fsync_interval_s:
            self._sync()

    def _sync(self) -> None:
        if self._unsynced_data and self._segments and self._segments[-1].file is not None:
            _fdatasync(self._segments[-1].file.fileno())
        self._unsynced_data = False
        if self._unsynced_state:
            self._write_state(durable=True)
        if self._unsynced_dir:
            self._sync_directory()
        self._last_sync = time.monotonic()

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._unsynced_dir = False

    def _write_state(self, *, durable: bool | None = None) -> None:
        if durable is None:
            durable = self.fsync == "always"
        body = _STATE.pack(STATE_MAGIC, _STATE_VERSION, 0, self._committed_seq, self._last_seq)
        data = body + struct.pack("<I", zlib.crc32(body))
        tmp = self.directory / _STATE_TMP_NAME
        with open(tmp, "wb", buffering=0) as handle:
            handle.write(data)
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, self.directory / _STATE_NAME)
        if durable:
            self._sync_directory()
            self._unsynced_state = False
        else:
            self._unsynced_state = True
            self._unsynced_dir = True

    def _read_state(self) -> tuple[int, int] | None:
        path = self.directory / _STATE_NAME
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if len(data) == _STATE_SIZE:
            magic, version, _, committed, last = _STATE.unpack_from(data)
            (crc,) = struct.unpack_from("<I", data, _STATE.size)
            if magic == STATE_MAGIC and version == _STATE_VERSION and crc == zlib.crc32(data[: _STATE.size]):
                return committed, last
        logger.warning(
            "%s: state file %s is damaged (%d bytes); everything still on disk will be delivered again",
            self._name,
            path,
            len(data),
        )
        return None

    # --- segments -----------------------------------------------------------------------------------

    def _start_segment(self, first_seq: int) -> _Segment:
        if self._segments and self._segments[-1].file is not None:
            old = self._segments[-1]
            if self._unsynced_data and self.fsync != "never":
                _fdatasync(old.file.fileno())
            self._unsynced_data = False
            old.file.close()
            old.file = None
        segment = _Segment(first_seq, self.directory / _segment_name(first_seq))
        segment.file = open(segment.path, "ab+", buffering=0)  # noqa: SIM115 - owned by the segment
        self._segments.append(segment)
        self._first_seqs.append(first_seq)
        self._unsynced_dir = True
        return segment

    def _drop_oldest_segment(self) -> tuple[int, int]:
        """Delete the oldest segment for room; returns the pending records and bytes it held."""
        segment = self._segments[0]
        index = segment.first_after(self._committed_seq)
        records = len(segment.seqs) - index
        nbytes = segment.stored_from(index)
        last_in_segment = self._first_seqs[1] - 1 if len(self._segments) > 1 else self._last_seq
        self._committed_seq = max(self._committed_seq, last_in_segment)
        self._remove_segment(segment)
        return records, nbytes

    def _remove_segment(self, segment: _Segment) -> None:
        if self._reader is not None and self._reader[0] is segment:
            self._close_reader()
        if segment.file is not None:
            segment.file.close()
            segment.file = None
            self._unsynced_data = False
        try:
            segment.path.unlink()
        except FileNotFoundError:
            pass
        self._segments.remove(segment)
        self._first_seqs = [s.first_seq for s in self._segments]
        self._size_bytes -= segment.size
        self._unsynced_dir = True
        if self.fsync == "always":
            self._sync_directory()

    # --- recovery -----------------------------------------------------------------------------------

    def _take_lock(self) -> io.FileIO:
        path = self.directory / _LOCK_NAME
        handle = open(path, "ab", buffering=0)  # noqa: SIM115 - held for the life of the log
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RuntimeError(
                    f"{self._name} is already open (by this or another process; lock file {path})"
                ) from None
            raise
        return handle

    def _recover(self) -> None:
        try:
            (self.directory / _STATE_TMP_NAME).unlink()
        except FileNotFoundError:
            pass
        state = self._read_state()
        firsts = sorted(
            int(match.group(1))
            for entry in os.listdir(self.directory)
            if (match := _SEGMENT_NAME.match(entry))
        )
        committed = state[0] if state else None
        floor = state[1] if state else 0  # seq numbers at or below this were handed out
        # Segments whose successor starts at or below the position are wholly consumed.
        while len(firsts) > 1 and committed is not None and firsts[1] - 1 <= committed:
            (self.directory / _segment_name(firsts.pop(0))).unlink()
        previous_seq = 0
        for i, first in enumerate(firsts):
            next_first = firsts[i + 1] if i + 1 < len(firsts) else None
            segment = _Segment(first, self.directory / _segment_name(first))
            previous_seq = self._scan_segment(segment, max(previous_seq, first - 1), next_first)
            if not segment.seqs and next_first is not None:
                # Nothing usable in an older segment: drop the file.
                segment.path.unlink()
                continue
            self._segments.append(segment)
            self._size_bytes += segment.size
        self._first_seqs = [s.first_seq for s in self._segments]
        on_disk_last = 0
        if self._segments:
            newest = self._segments[-1]
            on_disk_last = newest.seqs[-1] if newest.seqs else newest.first_seq - 1
        self._last_seq = max(floor, on_disk_last, committed or 0)
        # Everything before the oldest segment was consumed or dropped, whatever the state file says.
        oldest_floor = self._segments[0].first_seq - 1 if self._segments else self._last_seq
        self._committed_seq = max(committed if committed is not None else 0, oldest_floor)
        self._committed_seq = min(self._committed_seq, self._last_seq)
        if self._segments:
            last = self._segments[-1]
            last.file = open(last.path, "ab+", buffering=0)  # noqa: SIM115 - owned by the segment
        if state is None and self._segments:
            logger.warning(
                "%s: no valid state file; delivering all %d records still on disk again",
                self._name,
                self.pending_records,
            )
        if state is None or self._committed_seq != state[0] or self._last_seq != state[1]:
            self._write_state()
        if self._segments or self._corrupt_records or self._truncated_bytes:
            logger.info(
                "%s: opened with %d pending records (%d bytes) in %d segments, committed_seq=%d, last_seq=%d%s",
                self._name,
                self.pending_records,
                self.pending_bytes,
                len(self._segments),
                self._committed_seq,
                self._last_seq,
                f", {self._corrupt_records} corrupt records skipped, {self._truncated_bytes} bytes of torn tail cut"
                if self._corrupt_records or self._truncated_bytes
                else "",
            )

    def _scan_segment(self, segment: _Segment, previous_seq: int, next_first: int | None) -> int:
        """Index the valid records of one segment file; cut off an invalid tail. Returns the last seq."""
        data = segment.path.read_bytes()
        view = memoryview(data)
        size = len(data)
        pos = 0
        valid_end = 0
        while pos < size:
            header_seq = self._valid_record_at(view, pos, previous_seq, next_first)
            if header_seq is not None:
                seq, stored = header_seq
                segment.add(seq, pos, stored)
                previous_seq = seq
                pos += stored
                valid_end = pos
                continue
            resync = self._resync(data, view, pos + 1, previous_seq, next_first)
            if resync is None:
                break
            seq = _RECORD_HEADER.unpack_from(view, resync)[3]
            lost = max(seq - previous_seq - 1, 1)
            self._corrupt_records += lost
            logger.warning(
                "%s: %d damaged bytes at offset %d of %s (about %d records between seq %d and %d); skipped",
                self._name,
                resync - pos,
                pos,
                segment.path,
                lost,
                previous_seq,
                seq,
            )
            pos = resync
        if valid_end < size:
            self._cut_tail(segment, view, valid_end, previous_seq, next_first)
            size = valid_end
        segment.size = size
        return previous_seq

    def _cut_tail(
        self, segment: _Segment, view: memoryview, valid_end: int, previous_seq: int, next_first: int | None
    ) -> None:
        tail = len(view) - valid_end
        torn = tail < RECORD_OVERHEAD
        if not torn:
            magic, _, length, _ = _RECORD_HEADER.unpack_from(view, valid_end)
            torn = magic == RECORD_MAGIC and valid_end + RECORD_OVERHEAD + length > len(view)
        if torn:
            self._truncated_bytes += tail
            logger.warning(
                "%s: cut %d bytes of an incomplete record (torn write) off the end of %s",
                self._name,
                tail,
                segment.path,
            )
        else:
            lost = max(next_first - 1 - previous_seq, 1) if next_first is not None else 1
            self._corrupt_records += lost
            logger.warning(
                "%s: cut %d damaged bytes (about %d records after seq %d) off the end of %s",
                self._name,
                tail,
                lost,
                previous_seq,
                segment.path,
            )
        os.truncate(segment.path, valid_end)

    @staticmethod
    def _valid_record_at(
        view: memoryview, pos: int, previous_seq: int, next_first: int | None
    ) -> tuple[int, int] | None:
        """(seq, stored size) if a whole, undamaged, in-order record starts at pos."""
        if pos + RECORD_OVERHEAD > len(view):
            return None
        magic, crc, length, seq = _RECORD_HEADER.unpack_from(view, pos)
        end = pos + RECORD_OVERHEAD + length
        if magic != RECORD_MAGIC or end > len(view) or seq <= previous_seq:
            return None
        if next_first is not None and seq >= next_first:
            return None
        if zlib.crc32(view[pos + 8 : end]) != crc:
            return None
        return seq, RECORD_OVERHEAD + length

    def _resync(
        self, data: bytes, view: memoryview, start: int, previous_seq: int, next_first: int | None
    ) -> int | None:
        """Offset of the next valid record after damage, or None if there is none."""
        pos = data.find(RECORD_MAGIC, start)
        while pos != -1:
            if self._valid_record_at(view, pos, previous_seq, next_first) is not None:
                return pos
            pos = data.find(RECORD_MAGIC, pos + 1)
        return None

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self._name} is closed")
