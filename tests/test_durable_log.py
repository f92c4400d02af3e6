"""Tests for agent.durable_log: one behavioural suite over DurableLog and MemoryLog, the disk-only
recovery cases (restart, torn tail, corruption, lost state, SIGKILL), and a stateful model test."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import warnings
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent import durable_log as durable_log_module
from agent.durable_log import RECORD_OVERHEAD, DurableLog, MemoryLog, encode_record

# --- helpers -------------------------------------------------------------------------------------------


def read_all(log) -> list[tuple[int, bytes]]:
    return log.read(0, max_records=10**9, max_bytes=10**12)


def segment_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.seg"))


def disk_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.seg"))


def payload(i: int, size: int = 100) -> bytes:
    return (b"%06d|" % i).ljust(size, b"x")


@pytest.fixture(params=["durable", "memory"])
def make_log(request, tmp_path):
    """Factory for the log under test; the same behavioural tests run against both kinds."""
    opened = []

    def make(*, max_bytes: int = 10**7, segment_bytes: int = 4096):
        if request.param == "durable":
            log = DurableLog(
                tmp_path / "log", max_bytes=max_bytes, segment_bytes=segment_bytes, fsync="never"
            )
        else:
            log = MemoryLog(max_bytes=max_bytes)
        opened.append(log)
        return log

    make.kind = request.param
    yield make
    for log in opened:
        log.close()


# --- behaviour shared by DurableLog and MemoryLog ------------------------------------------------------


def test_round_trip_keeps_order_and_numbers_records_from_one(make_log):
    log = make_log()
    assert log.append(b"first") == 1
    assert log.append_many([b"second", b"", b"fourth"]) == 4
    assert log.append_many([]) == 4
    assert read_all(log) == [(1, b"first"), (2, b"second"), (3, b""), (4, b"fourth")]
    assert log.last_seq == 4
    assert log.committed_seq == 0
    assert log.pending_records == 4
    assert log.pending_bytes == 4 * RECORD_OVERHEAD + len(b"firstsecondfourth")


def test_read_after_seq_and_limits(make_log):
    log = make_log(segment_bytes=350)  # several segments for the durable log
    log.append_many(payload(i) for i in range(1, 21))
    assert [seq for seq, _ in log.read(5, max_records=3)] == [6, 7, 8]
    assert [seq for seq, _ in log.read(18)] == [19, 20]
    assert log.read(20) == []
    # max_bytes counts payload bytes: 250 bytes hold two 100-byte payloads.
    assert [seq for seq, _ in log.read(0, max_bytes=250)] == [1, 2]
    # A record larger than max_bytes still comes back alone, so a reader never gets stuck.
    assert log.read(3, max_bytes=10) == [(4, payload(4))]
    # Across segment boundaries the data stays intact.
    assert log.read(0, max_records=100) == [(i, payload(i)) for i in range(1, 21)]
    with pytest.raises(ValueError, match="max_records"):
        log.read(0, max_records=0)


def test_commit_consumes_records(make_log):
    log = make_log(segment_bytes=350)
    log.append_many(payload(i) for i in range(1, 11))
    log.commit(4)
    assert log.committed_seq == 4
    assert log.pending_records == 6
    assert log.pending_bytes == 6 * (RECORD_OVERHEAD + 100)
    # Consumed records are never handed out again, whatever after_seq says.
    assert [seq for seq, _ in read_all(log)] == [5, 6, 7, 8, 9, 10]
    assert [seq for seq, _ in log.read(2, max_records=2)] == [5, 6]
    log.commit(2)  # backwards: nothing happens
    assert log.committed_seq == 4
    with pytest.raises(ValueError, match=r"commit\(11\) is past the last seq 10"):
        log.commit(11)
    log.commit(10)
    assert log.pending_records == 0
    assert log.pending_bytes == 0
    assert read_all(log) == []
    assert log.append(b"more") == 11


def test_size_cap_drops_oldest_counts_and_warns(make_log, caplog):
    caplog.set_level(logging.WARNING, logger="agent.durable_log")
    stored = RECORD_OVERHEAD + 80
    log = make_log(max_bytes=12 * stored, segment_bytes=3 * stored)
    for i in range(1, 31):
        log.append(payload(i, 80))
    records = read_all(log)
    seqs = [seq for seq, _ in records]
    # The newest records survive, contiguous, and the oldest went.
    assert seqs == list(range(seqs[0], 31))
    assert records[-1] == (30, payload(30, 80))
    assert log.size_bytes <= 12 * stored
    # Space comes back a segment (3 records) at a time on disk, a record at a time in memory.
    assert len(records) == 12 if make_log.kind == "memory" else 9 <= len(records) <= 12
    assert log.committed_seq == seqs[0] - 1
    assert log.dropped_records == seqs[0] - 1
    assert log.dropped_bytes == log.dropped_records * stored
    # One warning for the burst, at the first drop, saying how much.
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "max_bytes=1200" in warnings[0]
    first = int(re.search(r"dropped the oldest (\d+) pending records \((\d+) bytes\)", warnings[0]).group(1))
    assert first == (1 if make_log.kind == "memory" else 3)
    # Closing reports the rest, so the warnings add up to the counter.
    log.close()
    counts = [
        int(m.group(1)) for r in caplog.records if (m := re.search(r"oldest (\d+) pending", r.getMessage()))
    ]
    assert len(counts) == 2
    assert sum(counts) == log.dropped_records


def test_drop_skips_records_already_consumed(make_log):
    stored = RECORD_OVERHEAD + 80
    log = make_log(max_bytes=4 * stored, segment_bytes=stored)
    log.append_many(payload(i, 80) for i in range(1, 5))
    log.commit(4)
    log.append_many(payload(i, 80) for i in range(5, 9))
    assert log.dropped_records == 0
    assert [seq for seq, _ in read_all(log)] == [5, 6, 7, 8]


def test_record_larger_than_cap_is_refused_and_log_unchanged(make_log):
    log = make_log(max_bytes=1000)
    log.append(b"keep")
    with pytest.raises(
        ValueError, match=r"record of 981 bytes \(\+20 bytes overhead\) is larger than max_bytes=1000"
    ):
        log.append_many([b"ok", b"y" * 981])
    assert read_all(log) == [(1, b"keep")]
    assert log.last_seq == 1
    assert log.append(b"z" * (1000 - RECORD_OVERHEAD)) == 2  # exactly at the cap is fine


def test_batch_larger_than_cap_keeps_its_newest_records(make_log):
    stored = RECORD_OVERHEAD + 80
    log = make_log(max_bytes=5 * stored, segment_bytes=2 * stored)
    log.append(b"old")
    assert log.append_many(payload(i, 80) for i in range(2, 10)) == 9
    assert read_all(log) == [(i, payload(i, 80)) for i in range(5, 10)]
    assert log.dropped_records == 4
    assert log.committed_seq == 4
    assert log.append(b"next") == 10


def test_closed_log_refuses_use(make_log):
    with make_log() as log:
        log.append(b"a")
    with pytest.raises(ValueError, match="closed"):
        log.append(b"b")
    with pytest.raises(ValueError, match="closed"):
        log.read(0)
    log.close()  # idempotent


def test_writer_and_reader_threads(make_log):
    log = make_log(max_bytes=10**8, segment_bytes=2000)
    expected = [payload(i, 50 + i % 70) for i in range(3000)]
    received: list[bytes] = []
    errors: list[BaseException] = []

    def writer():
        try:
            i = 0
            while i < len(expected):
                n = 1 + i % 7
                log.append_many(expected[i : i + n])
                i += n
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def reader():
        try:
            after = 0
            while len(received) < len(expected) and not errors:
                batch = log.read(after, max_records=50)
                for seq, data in batch:
                    assert seq == after + 1
                    after = seq
                    received.append(data)
                if batch:
                    log.commit(after)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert received == expected
    assert log.pending_records == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_bytes": 20}, "max_bytes must be more than"),
        ({"max_bytes": 1000, "fsync": "sometimes"}, "fsync must be one of"),
        ({"max_bytes": 1000, "segment_bytes": 0}, "segment_bytes must be positive"),
        ({"max_bytes": 1000, "fsync_interval_s": -1}, "fsync_interval_s must not be negative"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        DurableLog(tmp_path / "log", **kwargs)


# --- DurableLog: on disk ---------------------------------------------------------------------------------


def open_log(directory: Path, **kwargs) -> DurableLog:
    kwargs.setdefault("max_bytes", 10**7)
    kwargs.setdefault("fsync", "never")
    return DurableLog(directory, **kwargs)


def test_on_disk_format(tmp_path):
    with open_log(tmp_path) as log:
        log.append(b"hi")
        log.commit(1)
    # Header: magic, crc32 over length+seq+payload, length u32, seq u64, then the payload.
    golden = bytes.fromhex("ff444c0107ee5d46020000000100000000000000") + b"hi"
    assert encode_record(1, b"hi") == golden
    assert (tmp_path / "00000000000000000001.seg").read_bytes() == golden
    state = (tmp_path / "state").read_bytes()
    assert len(state) == 28
    assert struct.unpack("<4sHHQQI", state) == (b"DLST", 1, 0, 1, 1, zlib.crc32(state[:24]))


def test_restart_preserves_unconsumed_records_and_numbering(tmp_path):
    with open_log(tmp_path, segment_bytes=500) as log:
        log.append_many(payload(i) for i in range(1, 11))
        log.commit(3)
    with open_log(tmp_path, segment_bytes=500) as log:
        assert log.committed_seq == 3
        assert log.last_seq == 10
        assert read_all(log) == [(i, payload(i)) for i in range(4, 11)]
        assert log.append(b"after restart") == 11
        log.commit(11)
    with open_log(tmp_path, segment_bytes=500) as log:
        assert read_all(log) == []
        # Numbers are never reused, even when everything was consumed.
        assert log.append(b"again") == 12


def test_commit_deletes_wholly_consumed_segments(tmp_path):
    with open_log(tmp_path, segment_bytes=1000) as log:
        log.append_many(payload(i) for i in range(1, 9))  # one write: one segment, even over 1000
        for i in range(9, 41):
            log.append(payload(i))
        files = segment_files(tmp_path)
        assert files[:3] == [
            "00000000000000000001.seg",
            "00000000000000000009.seg",
            "00000000000000000017.seg",
        ]
        assert log.size_bytes == disk_size(tmp_path) == 40 * 120
        log.commit(7)
        assert segment_files(tmp_path) == files
        log.commit(8)  # exactly the end of the first segment
        assert segment_files(tmp_path) == files[1:]
        log.commit(15)  # 9..16 is only partly consumed
        assert segment_files(tmp_path) == files[1:]
        assert log.size_bytes == disk_size(tmp_path)
        log.commit(40)
        # The newest segment stays: appends go there and it keeps the numbering on disk.
        assert segment_files(tmp_path) == files[-1:]
        assert log.pending_bytes == 0
    with open_log(tmp_path, segment_bytes=1000) as log:
        assert log.pending_records == 0
        assert log.append(b"x") == 41


def test_dropped_position_survives_restart(tmp_path):
    with open_log(tmp_path, max_bytes=1200, segment_bytes=300) as log:
        log.append_many(payload(i, 80) for i in range(1, 13))
        log.append(payload(13, 80))  # drops the oldest segment (records 1..3)
        assert log.committed_seq == 3
    with open_log(tmp_path, max_bytes=1200, segment_bytes=300) as log:
        assert log.committed_seq == 3
        assert [seq for seq, _ in read_all(log)] == list(range(4, 14))
        assert log.size_bytes <= 1200


def test_torn_tail_keeps_every_complete_record(tmp_path):
    with open_log(tmp_path) as log:
        log.append_many(payload(i) for i in range(1, 11))
    (segment,) = tmp_path.glob("*.seg")
    os.truncate(segment, segment.stat().st_size - 3)
    with open_log(tmp_path) as log:
        assert read_all(log) == [(i, payload(i)) for i in range(1, 10)]
        assert log.truncated_bytes == 117
        assert log.corrupt_records == 0
        assert segment.stat().st_size == 9 * 120
        assert log.append(b"new") == 11  # seq 10 was handed out before: not reused
    with open_log(tmp_path) as log:
        assert [seq for seq, _ in read_all(log)] == [*range(1, 10), 11]
        assert log.truncated_bytes == 0 and log.corrupt_records == 0


def test_torn_header_is_cut(tmp_path):
    with open_log(tmp_path) as log:
        log.append_many([b"a" * 50, b"b" * 50])
    (segment,) = tmp_path.glob("*.seg")
    os.truncate(segment, 70 + 10)  # 10 bytes of the second header
    with open_log(tmp_path) as log:
        assert read_all(log) == [(1, b"a" * 50)]
        assert log.truncated_bytes == 10


class DiskFillsUp:
    """Stands in for a segment file: writes part of the first chunk, then fails like a full disk."""

    def __init__(self, real, switch):
        self.real = real
        self.switch = switch

    def write(self, data):
        if not self.switch.on:
            return self.real.write(data)
        if len(data) > 10:
            return self.real.write(data[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.fixture
def full_disk(monkeypatch):
    """While `full_disk.on` is true, writes to segment files fail (after a partial first write)."""

    def fake_open(path, mode="r", *args, **kwargs):
        real = open(path, mode, *args, **kwargs)
        return DiskFillsUp(real, full_disk) if str(path).endswith(".seg") and "a" in mode else real

    full_disk.on = False
    monkeypatch.setattr(durable_log_module, "open", fake_open, raising=False)
    return full_disk


def test_failed_write_leaves_log_consistent(tmp_path, full_disk):
    with open_log(tmp_path, segment_bytes=100) as log:
        log.append(b"before")
        full_disk.on = True
        with pytest.raises(OSError, match=r"cannot write .*00000000000000000002\.seg: No space left"):
            log.append_many([b"lost-1" * 20, b"lost-2"])  # starts a new segment
        full_disk.on = False
        assert read_all(log) == [(1, b"before")]
        assert log.size_bytes == disk_size(tmp_path)
        assert log.append(b"after") == 2
    with open_log(tmp_path, segment_bytes=100) as log:
        assert read_all(log) == [(1, b"before"), (2, b"after")]
        assert log.corrupt_records == 0 and log.truncated_bytes == 0


def test_failed_write_of_batch_over_the_cap_keeps_numbering(tmp_path, full_disk):
    with open_log(tmp_path, max_bytes=500, segment_bytes=100) as log:
        log.append(b"old")
        full_disk.on = True
        with pytest.raises(OSError, match="No space left"):
            log.append_many(payload(i, 80) for i in range(2, 10))  # 2..4 dropped, 5.. fail to write
        full_disk.on = False
        # The dropped records' numbers are spent; the next record is pending, not hidden behind them.
        assert log.committed_seq == 4
        assert log.append(b"next") == 5
        assert read_all(log) == [(5, b"next")]


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("where", "offset_in_record"),
    [("payload", RECORD_OVERHEAD + 50), ("crc", 5), ("length", 9), ("seq", 12), ("magic", 0)],
)
def test_corrupted_byte_skips_that_record_only(tmp_path, caplog, where, offset_in_record):
    with open_log(tmp_path) as log:
        log.append_many(payload(i) for i in range(1, 11))
    (segment,) = tmp_path.glob("*.seg")
    flip_byte(segment, 4 * 120 + offset_in_record)  # inside record 5
    with open_log(tmp_path) as log:
        assert read_all(log) == [(i, payload(i)) for i in range(1, 11) if i != 5]
        assert log.corrupt_records == 1
        assert log.pending_records == 9
        assert log.append(b"next") == 11
    assert any("damaged bytes at offset 480" in r.getMessage() for r in caplog.records)


def test_damage_spanning_records_counts_each_lost_record(tmp_path):
    with open_log(tmp_path) as log:
        log.append_many(payload(i) for i in range(1, 11))
    (segment,) = tmp_path.glob("*.seg")
    data = bytearray(segment.read_bytes())
    data[4 * 120 + 60 : 7 * 120 + 10] = b"\0" * (3 * 120 - 50)  # from inside record 5 into record 8
    segment.write_bytes(bytes(data))
    with open_log(tmp_path) as log:
        assert [seq for seq, _ in read_all(log)] == [1, 2, 3, 4, 9, 10]
        assert log.corrupt_records == 4


def test_corrupted_last_record_is_cut_and_counted(tmp_path):
    with open_log(tmp_path) as log:
        log.append_many(payload(i) for i in range(1, 6))
    (segment,) = tmp_path.glob("*.seg")
    flip_byte(segment, 4 * 120 + 60)
    with open_log(tmp_path) as log:
        assert [seq for seq, _ in read_all(log)] == [1, 2, 3, 4]
        assert log.corrupt_records == 1
        assert log.append(b"next") == 6
    with open_log(tmp_path) as log:
        assert log.corrupt_records == 0
        assert [seq for seq, _ in read_all(log)] == [1, 2, 3, 4, 6]


def test_damaged_record_counted_across_segments(tmp_path):
    with open_log(tmp_path, segment_bytes=360) as log:
        for i in range(1, 10):
            log.append(payload(i))
    first = tmp_path / "00000000000000000001.seg"
    flip_byte(first, 2 * 120 + 30)  # the last record of the first segment
    with open_log(tmp_path, segment_bytes=360) as log:
        assert [seq for seq, _ in read_all(log)] == [1, 2, 4, 5, 6, 7, 8, 9]
        assert log.corrupt_records == 1


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated", "bad crc"])
def test_lost_state_redelivers_rather_than_loses(tmp_path, caplog, damage):
    with open_log(tmp_path, segment_bytes=500) as log:
        log.append_many(payload(i) for i in range(1, 5))
        log.append_many(payload(i) for i in range(5, 9))
        log.commit(6)  # deletes segment 1..4; 5 and 6 are consumed but still on disk
    state = tmp_path / "state"
    if damage == "missing":
        state.unlink()
    elif damage == "garbage":
        state.write_bytes(b"committed=9999\n")
    elif damage == "truncated":
        state.write_bytes(state.read_bytes()[:20])
    else:
        flip_byte(state, 9)
    with open_log(tmp_path, segment_bytes=500) as log:
        # At-least-once: 5 and 6 come again; nothing still on disk is lost.
        assert [seq for seq, _ in read_all(log)] == [5, 6, 7, 8]
        assert log.committed_seq == 4
        assert log.append(b"x") == 9
    assert any("delivering all 4 records still on disk again" in r.getMessage() for r in caplog.records)


def test_stale_tmp_removed_and_foreign_files_left_alone(tmp_path):
    with open_log(tmp_path) as log:
        log.append(b"a")
    (tmp_path / "state.tmp").write_bytes(b"half written")
    (tmp_path / "README").write_text("not a segment")
    (tmp_path / "123.seg").write_bytes(b"wrong name length")
    with open_log(tmp_path) as log:
        assert read_all(log) == [(1, b"a")]
    assert not (tmp_path / "state.tmp").exists()
    assert (tmp_path / "README").exists() and (tmp_path / "123.seg").exists()


def test_directory_can_be_open_only_once(tmp_path):
    with open_log(tmp_path):
        with pytest.raises(RuntimeError, match="already open"):
            open_log(tmp_path)
    with open_log(tmp_path) as log:  # released by close
        log.append(b"ok")


@pytest.mark.parametrize("policy", ["always", "interval", "never"])
def test_every_fsync_policy_round_trips(tmp_path, policy):
    with open_log(tmp_path, fsync=policy, fsync_interval_s=0.0, segment_bytes=300) as log:
        log.append_many(payload(i) for i in range(1, 6))
        log.commit(2)
        log.sync()
    with open_log(tmp_path, fsync=policy) as log:
        assert [seq for seq, _ in read_all(log)] == [3, 4, 5]


def test_sigkill_loses_nothing_that_was_appended(tmp_path):
    """The agent is killed between appends: after restart every uncommitted record is delivered."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from agent.durable_log import DurableLog
        log = DurableLog({str(tmp_path)!r}, max_bytes=10**7, segment_bytes=20000)
        for i in range(1, 201):
            log.append_many([b"%d-%d" % (i, j) * 20 for j in range(5)])
        log.commit(300)
        sys.stdout.write(str(log.last_seq))
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert proc.stdout == b"1000"
    with open_log(tmp_path, segment_bytes=20000) as log:
        records = read_all(log)
        assert [seq for seq, _ in records] == list(range(301, 1001))
        assert records[0][1] == b"61-0" * 20 and records[-1][1] == b"200-4" * 20
        assert log.corrupt_records == 0
        assert log.append(b"x") == 1001


# --- Stateful model test --------------------------------------------------------------------------------


class LogModelMachine(RuleBasedStateMachine):
    """Drives a log and a plain list model with the same operations and compares them after each step.

    Drops by the size cap are allowed (the durable log drops whole segments), but only of the oldest
    pending records, and each one must be counted."""

    persistent = True
    MAX_BYTES = 600
    SEGMENT_BYTES = 150

    def __init__(self):
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="durable-log-model-"))
        self.log = self.open()
        self.pending: list[tuple[int, bytes]] = []
        self.committed = 0
        self.last = 0

    def open(self):
        if self.persistent:
            return DurableLog(
                self.directory, max_bytes=self.MAX_BYTES, segment_bytes=self.SEGMENT_BYTES, fsync="never"
            )
        return MemoryLog(max_bytes=self.MAX_BYTES)

    def teardown(self):
        self.log.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def absorb_drops(self, dropped_before: int) -> None:
        kept = read_all(self.log)
        lost = len(self.pending) - len(kept)
        assert lost >= 0
        assert kept == self.pending[lost:]
        assert self.log.dropped_records - dropped_before == lost
        if lost:
            self.committed = max(self.committed, self.pending[lost - 1][0])
            del self.pending[:lost]

    @rule(data=st.binary(max_size=60))
    def append(self, data):
        dropped_before = self.log.dropped_records
        seq = self.log.append(data)
        self.last += 1
        assert seq == self.last
        self.pending.append((seq, data))
        self.absorb_drops(dropped_before)

    @rule(batch=st.lists(st.binary(max_size=60), max_size=12))
    def append_many(self, batch):
        dropped_before = self.log.dropped_records
        assert self.log.append_many(batch) == self.last + len(batch)
        self.pending.extend((self.last + 1 + i, data) for i, data in enumerate(batch))
        self.last += len(batch)
        self.absorb_drops(dropped_before)

    @rule(data=st.data(), max_records=st.integers(1, 6), max_bytes=st.integers(1, 150))
    def read(self, data, max_records, max_bytes):
        after = data.draw(st.integers(max(self.committed - 2, 0), self.last + 1), label="after")
        expected = []
        total = 0
        for seq, payload_ in self.pending:
            if seq <= after or len(expected) == max_records:
                continue
            total += len(payload_)
            if expected and total > max_bytes:
                break
            expected.append((seq, payload_))
        assert self.log.read(after, max_records=max_records, max_bytes=max_bytes) == expected

    @rule(data=st.data())
    def commit(self, data):
        through = data.draw(st.integers(0, self.last + 1), label="through")
        if through > self.last:
            with pytest.raises(ValueError):
                self.log.commit(through)
            return
        self.log.commit(through)
        if through > self.committed:
            self.committed = through
            self.pending = [(seq, p) for seq, p in self.pending if seq > through]

    @precondition(lambda self: self.persistent)
    @rule()
    def reopen(self):
        self.log.close()
        self.log = self.open()

    @precondition(lambda self: self.persistent)
    @rule()
    def crash(self):
        # Drop the object without close(): only what the kernel already has survives, and the
        # file handles (and the directory lock) go with the object, as they would with the process.
        # The log holds no reference cycles, so that happens at once, without the garbage collector.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            self.log = None
        self.log = self.open()

    @invariant()
    def matches_model(self):
        assert self.log.last_seq == self.last
        assert self.log.committed_seq == self.committed
        assert self.log.pending_records == len(self.pending)
        assert self.log.pending_bytes == sum(RECORD_OVERHEAD + len(p) for _, p in self.pending)
        assert self.log.size_bytes <= self.MAX_BYTES
        if self.persistent:
            assert self.log.size_bytes == disk_size(self.directory)
            assert self.log.corrupt_records == 0


class MemoryLogModelMachine(LogModelMachine):
    persistent = False


_MODEL_SETTINGS = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestDurableLogModel = LogModelMachine.TestCase
TestDurableLogModel.settings = _MODEL_SETTINGS
TestMemoryLogModel = MemoryLogModelMachine.TestCase
TestMemoryLogModel.settings = _MODEL_SETTINGS
