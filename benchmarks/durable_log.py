"""Durable log benchmark: agent.durable_log against SQLite in WAL mode, the same workload in the same run.

    python benchmarks/durable_log.py [--quick] [--sizes 1024,65536] [--policies interval,always]
                                     [--mib 32] [--rounds 3] [--segment-mib 64] [--sqlite-page-size N]
                                     [--dir DIR]

Why: `agent/durable_log.py` is a storage engine of its own (segment files, checksums, a persisted
consumer position, recovery, a size cap). The obvious alternative is a table in SQLite. This measures
both through the calls the relay client and graphite-out make, so that keeping the log is a measured
choice (docs/benchmarks.md, "Durable log").

The workload, per record size and durability setting, the same for both stores:

1. connected: records (real relay batch frames, `FrameEncoder.encode(batch_to_wire(...))`, of about
   the given size) are appended one per call, as the relay client's appender does with one encoded
   batch; every `--ack-every` records the consumer acknowledges everything but the last
   `--in-flight` records (the relay client's in-flight window), as its commit loop does on an Ack;
2. outage: `--tail` more records are appended with no acknowledgement;
3. the store is closed and opened again (the agent restarts), which finds the unacknowledged tail;
4. replay: the tail is read in order, 64 records or 4 MiB per read (graphite-out's spool reads), each
   read committed at once, until nothing is left; the replayed records are checked byte for byte.

The durable log runs as the relay client opens it (`SEGMENT_BYTES` of relay.relay_client.store, a
1 GiB cap, the fsync policy under test); SQLite as a table (seq INTEGER PRIMARY KEY, payload BLOB) in WAL mode,
one transaction per append, an acknowledgement as `DELETE WHERE seq <= N` plus the position in a one-row
table in the same transaction (the log's state file: without it, numbering restarts once every row is
deleted), a replay as `SELECT ... WHERE seq > N ORDER BY seq LIMIT 64`. Durability pairs:

- log fsync="interval" <-> synchronous=NORMAL: each call's data is in the kernel when it returns
  (survives a crash of the process); a power loss can lose the newest writes (the log: up to 1 s of
  them; SQLite: what came since the last WAL checkpoint).
- log fsync="always"   <-> synchronous=FULL: each append and acknowledgement is on stable storage when
  the call returns (fdatasync of the segment / of the WAL).

Figures: appends/s and MB/s (time in append calls), ack cost (µs per acknowledgement), MB/s of the
whole writing side (appends, acks and the close, whose final sync the log's "interval" policy defers),
close and reopen times, replay records/s and MB/s (reads and commits), bytes on disk (allocated
blocks) at the end of the outage (store open) and once everything is replayed and acknowledged (store
closed). Each figure is the
median of `--rounds` runs, in which the stores take turns to go first; it is printed for both stores
with the ratio log/SQLite (above 1: the log is faster for rates, costs more for times and sizes).
Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from agent.durable_log import DurableLog
from agent.model import Batch, Consumer, Resource, Series
from agent_plugins.relay.protocol import FrameEncoder, batch_to_wire
from agent_plugins.relay.relay_client.store import SEGMENT_BYTES

#: The relay client's default disk_buffer_max_size: large enough that the cap never drops anything here.
MAX_BYTES = 1 << 30
#: graphite-out's spool reads (SPOOL_READ_RECORDS, SPOOL_READ_BYTES).
READ_RECORDS = 64
READ_BYTES = 4 << 20
#: Distinct payloads per size, cycled through by seq (so a replayed record can be checked).
DISTINCT_PAYLOADS = 16
SYNCHRONOUS = {"interval": "NORMAL", "always": "FULL"}
NS = 1_000_000_000


def relay_frames(target_size: int, count: int) -> list[bytes]:
    """`count` relay batch frames of about `target_size` bytes: one series of float points each, as
    the relay client stores them (its log record is the complete frame)."""
    encoder = FrameEncoder()
    rng = random.Random(target_size)

    def frame(points: int, seq: int) -> bytes:
        series = Series(
            "cpu_percent",
            Resource("cpu_core", str(seq % 8)),
            Consumer("local_machine"),
            {"relay_client": "web1"},
            [(1_700_000_000 + seq) * NS + i * 1_000_000 for i in range(points)],
            [round(rng.uniform(0, 100), 3) for _ in range(points)],
        )
        return bytes(encoder.encode(batch_to_wire(seq, Batch([series]), {"cpu_percent": 0})))

    # About 18 bytes per point (a timestamp and a float); find the point count that fits the target.
    points = max(1, target_size // 18)
    while points > 1 and len(frame(points, 0)) > target_size:
        points -= max(1, points // 50)
    return [frame(points, seq) for seq in range(count)]


class SqliteLog:
    """The log's calls (append_many, commit, read, close) on a SQLite table in WAL mode."""

    def __init__(self, path: Path, synchronous: str, page_size: int | None = None) -> None:
        self.connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        if page_size is not None:  # before the first table: it fixes the page size of a new database
            self.connection.execute(f"PRAGMA page_size={page_size}")
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute(f"PRAGMA synchronous={synchronous}")
        self.connection.execute(
            "CREATE TABLE IF NOT EXISTS log (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL)"
        )
        self.connection.execute(
            "CREATE TABLE IF NOT EXISTS position (id INTEGER PRIMARY KEY CHECK (id = 0), committed INTEGER NOT NULL)"
        )
        self.connection.execute("INSERT OR IGNORE INTO position VALUES (0, 0)")
        # What the relay client asks at start: the position, the numbering, and what is pending.
        (self.committed_seq,) = self.connection.execute("SELECT committed FROM position").fetchone()
        last, self.pending_records, self.pending_bytes = self.connection.execute(
            "SELECT max(seq), count(*), coalesce(sum(length(payload)), 0) FROM log"
        ).fetchone()
        self.last_seq = max(last or 0, self.committed_seq)

    def append_many(self, payloads: list[bytes]) -> int:
        first = self.last_seq + 1
        with self.connection:  # one transaction
            self.connection.execute("BEGIN")
            self.connection.executemany(
                "INSERT INTO log VALUES (?, ?)", ((first + i, p) for i, p in enumerate(payloads))
            )
        self.last_seq = first + len(payloads) - 1
        return self.last_seq

    def commit(self, through_seq: int) -> None:
        if through_seq <= self.committed_seq:
            return
        with self.connection:
            self.connection.execute("BEGIN")
            self.connection.execute("DELETE FROM log WHERE seq <= ?", (through_seq,))
            self.connection.execute("UPDATE position SET committed = ?", (through_seq,))
        self.committed_seq = through_seq

    def read(self, after_seq: int, max_records: int, max_bytes: int) -> list[tuple[int, bytes]]:
        rows = self.connection.execute(
            "SELECT seq, payload FROM log WHERE seq > ? ORDER BY seq LIMIT ?",
            (max(after_seq, self.committed_seq), max_records),
        ).fetchall()
        out, total = [], 0
        for seq, payload in rows:
            total += len(payload)
            if out and total > max_bytes:
                break
            out.append((seq, payload))
        return out

    def close(self) -> None:
        self.connection.close()


@dataclass
class Workload:
    payloads: list[bytes]
    connected: int  # records appended while acknowledgements come
    tail: int  # records appended during the outage, replayed after the reopen
    ack_every: int
    in_flight: int

    def payload(self, seq: int) -> bytes:
        return self.payloads[seq % len(self.payloads)]


def disk_bytes(directory: Path) -> int:
    """Allocated bytes of every file under directory."""
    return sum(p.stat().st_blocks * 512 for p in directory.rglob("*") if p.is_file())


def run_store(
    kind: str, policy: str, work: Workload, root: Path, segment_bytes: int, page_size: int | None
) -> dict[str, float]:
    directory = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=root))

    def open_store() -> DurableLog | SqliteLog:
        if kind == "log":
            return DurableLog(
                directory / "log", max_bytes=MAX_BYTES, segment_bytes=segment_bytes, fsync=policy
            )
        return SqliteLog(directory / "buffer.sqlite", SYNCHRONOUS[policy], page_size)

    try:
        store = open_store()
        append_s = ack_s = 0.0
        acks = 0
        appended_bytes = 0
        seq = 0
        clock = time.perf_counter
        for i in range(work.connected + work.tail):
            payload = work.payload(seq + 1)
            started = clock()
            seq = store.append_many([payload])
            append_s += clock() - started
            appended_bytes += len(payload)
            if i < work.connected and (i + 1) % work.ack_every == 0 and seq > work.in_flight:
                started = clock()
                store.commit(seq - work.in_flight)
                ack_s += clock() - started
                acks += 1
        committed = store.committed_seq
        size_open = disk_bytes(directory)
        started = clock()
        store.close()
        close_s = clock() - started

        started = clock()
        store = open_store()
        reopen_s = clock() - started
        if store.pending_records != seq - committed:
            raise AssertionError(
                f"{kind}: {store.pending_records} pending after reopen, expected {seq - committed}"
            )
        replayed: list[tuple[int, bytes]] = []
        started = clock()
        while records := store.read(store.committed_seq, READ_RECORDS, READ_BYTES):
            store.commit(records[-1][0])
            replayed.extend(records)
        replay_s = clock() - started
        store.close()
        size_replayed = disk_bytes(directory)
        expected = list(range(committed + 1, seq + 1))
        if [s for s, _ in replayed] != expected or any(p != work.payload(s) for s, p in replayed):
            raise AssertionError(f"{kind}: the replay did not return the unacknowledged tail as appended")
        replay_bytes = sum(len(p) for _, p in replayed)
        records = work.connected + work.tail
        return {
            "appends_per_s": records / append_s,
            "append_mb_per_s": appended_bytes / append_s / 1e6,
            "write_mb_per_s": appended_bytes / (append_s + ack_s + close_s) / 1e6,
            "ack_us": ack_s / acks * 1e6 if acks else 0.0,
            "close_ms": close_s * 1e3,
            "reopen_ms": reopen_s * 1e3,
            "replay_per_s": len(replayed) / replay_s,
            "replay_mb_per_s": replay_bytes / replay_s / 1e6,
            "disk_mib_open": size_open / 2**20,
            "disk_mib_replayed": size_replayed / 2**20,
        }
    finally:
        shutil.rmtree(directory, ignore_errors=True)


FIGURES = [
    ("appends_per_s", "appends/s", "{:,.0f}"),
    ("append_mb_per_s", "append MB/s", "{:.1f}"),
    ("ack_us", "ack µs", "{:.1f}"),
    ("write_mb_per_s", "MB/s with acks + close", "{:.1f}"),
    ("close_ms", "close ms", "{:.1f}"),
    ("reopen_ms", "reopen ms", "{:.1f}"),
    ("replay_per_s", "replay records/s", "{:,.0f}"),
    ("replay_mb_per_s", "replay MB/s", "{:.1f}"),
    ("disk_mib_open", "disk MiB at the outage", "{:.1f}"),
    ("disk_mib_replayed", "disk MiB, all replayed", "{:.1f}"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024,65536", help="record sizes in bytes, comma-separated")
    parser.add_argument("--policies", default="interval,always", help="log fsync policies: interval, always")
    parser.add_argument("--mib", type=float, default=32, help="MiB appended per store and scenario")
    parser.add_argument(
        "--max-records",
        type=int,
        default=12_000,
        help='at most this many records per store and scenario (a quarter of it under "always")',
    )
    parser.add_argument("--rounds", type=int, default=3, help="runs per scenario; figures are medians")
    parser.add_argument(
        "--tail", type=float, default=0.25, help="share of the records appended during the outage"
    )
    parser.add_argument("--ack-every", type=int, default=8, help="records between acknowledgements")
    parser.add_argument("--in-flight", type=int, default=64, help="records not yet acknowledged (in flight)")
    parser.add_argument(
        "--segment-mib", type=float, default=SEGMENT_BYTES / 2**20, help="log segment size (relay client: 64)"
    )
    parser.add_argument(
        "--sqlite-page-size", type=int, default=None, help="PRAGMA page_size (default: SQLite's, 4096)"
    )
    parser.add_argument(
        "--dir", default=None, help="where the stores go (default: the temp dir; not a tmpfs)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a quarter of the data and one round: a smoke run"
    )
    args = parser.parse_args()
    if args.quick:
        args.mib /= 4
        args.max_records //= 4
        args.rounds = 1
    sizes = [int(s) for s in args.sizes.split(",")]
    policies = [p.strip() for p in args.policies.split(",")]
    for policy in policies:
        if policy not in SYNCHRONOUS:
            parser.error(f"--policies: {policy!r} is not one of {', '.join(SYNCHRONOUS)}")

    root = Path(tempfile.mkdtemp(prefix="durable-log-bench-", dir=args.dir))
    print(
        f"stores under {root}; SQLite {sqlite3.sqlite_version} in WAL mode, page size"
        f" {args.sqlite_page_size or 'default'}; log segments {args.segment_mib:g} MiB;"
        f" medians of {args.rounds} rounds"
    )
    results: dict[str, dict[str, dict[str, float]]] = {}
    order = ["log", "sqlite"]
    try:
        for policy in policies:
            for size in sizes:
                payloads = relay_frames(size, DISTINCT_PAYLOADS)
                mean = sum(map(len, payloads)) / len(payloads)
                # "always" is one fdatasync per call: its rate settles with fewer records.
                cap = args.max_records // 4 if policy == "always" else args.max_records
                records = max(2 * args.in_flight, min(cap, int(args.mib * 2**20 / mean)))
                tail = int(records * args.tail)
                work = Workload(payloads, records - tail, tail, args.ack_every, args.in_flight)
                runs: dict[str, list[dict[str, float]]] = {"log": [], "sqlite": []}
                for _ in range(args.rounds):
                    for kind in order:
                        runs[kind].append(
                            run_store(
                                kind, policy, work, root, int(args.segment_mib * 2**20), args.sqlite_page_size
                            )
                        )
                    order.reverse()  # the next round starts with the other store
                figures = {
                    kind: {key: statistics.median(run[key] for run in kind_runs) for key in kind_runs[0]}
                    for kind, kind_runs in runs.items()
                }
                figures["ratio"] = {
                    key: figures["log"][key] / figures["sqlite"][key]
                    if figures["sqlite"][key]
                    else float("inf")
                    for key in figures["log"]
                }
                name = f"{policy}/{SYNCHRONOUS[policy]} {size // 1024} KiB"
                results[name] = figures
                print(
                    f"\n{name}: {records} records of {mean:,.0f} bytes ({records * mean / 2**20:.1f} MiB), an ack "
                    f"every {args.ack_every} ({args.in_flight} in flight), {tail} unacknowledged at the reopen"
                )
                print(f"  {'':24s} {'log':>12s} {'SQLite':>12s} {'log/SQLite':>11s}")
                for key, label, fmt in FIGURES:
                    log_figure, sqlite_figure = figures["log"][key], figures["sqlite"][key]
                    print(
                        f"  {label:24s} {fmt.format(log_figure):>12s} {fmt.format(sqlite_figure):>12s}"
                        f" {figures['ratio'][key]:>11.2f}"
                    )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        json.dumps(
            {
                name: {
                    kind: {key: round(value, 3) for key, value in figs.items()}
                    for kind, figs in by_kind.items()
                }
                for name, by_kind in results.items()
            }
        )
    )


if __name__ == "__main__":
    main()
