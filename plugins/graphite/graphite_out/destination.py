"""One Graphite destination of `graphite-out`: its bounded queue, its disk spool, and the task that writes to it.

Where it sits: the output routes each batch and calls `Destination.offer` with each destination's share
(a `Chunk`); `offer` never waits, so one slow or dead destination can never hold back the pipeline nor the
other destinations. Each destination's own writer task (`Destination.run`) connects with
`trio.open_tcp_stream`, reconnects as `agent.Reconnector` says (backoff, outage lines), and writes
plaintext lines or pickle frames.

Where points wait, in order:

1. `retry`: what a write that failed had taken; sent first once a connection is back.
2. the memory queue, bounded by `queue_max_points`.
3. the spool (`agent.durable_log.DurableLog` under `<spool dir>/<route>_<host>_<port>[_<instance>]`),
   bounded by `spool_max_size` (when full, its oldest points are dropped and counted as `spool_full`).

Disk I/O never runs on the trio thread (one slow disk must not stall every destination): points for the
spool wait in `to_spool` (memory) until the destination's spool task appends them in a worker thread; the
writer reads and commits spool records in worker threads too, and the spool task opens the spool and
syncs it to disk every `SPOOL_SYNC_INTERVAL` seconds the same way. `to_spool` only holds what arrived
while the spool task was busy (one append or sync): each append takes all of it.

Points go to the spool when the destination is down (a connection attempt failed or the connection
broke) or when its memory queue is full (it is slow, or a burst came in). The first point that goes to the
spool takes the memory queue with it, and from then on, as long as the spool is not empty, every new point
goes to the spool too: so the spool always holds the newest points, after everything in memory, and the
destination receives every point in the order it was routed. When the spool is empty, new points use the
memory queue again.

How fast the spool is replayed depends on why it filled:

- after an outage (the spool took points while the destination was down, or the destination went down
  while it was replaying), and for a spool left by an earlier run: at `replay_rate` points per second on
  top of the live traffic (the points that arrive while it replays are added to its allowance, so it
  always catches up), so that a carbon-cache that just came back is not flooded with its backlog;
- after a spill of a destination that stayed up (its memory queue filled during a burst): as fast as the
  destination takes it, like the memory queue; only the destination's own pace (TCP back-pressure) bounds
  it. Pacing it would hold a healthy carbon-cache to `replay_rate` for as long as the burst was big.

With `spool = false`, points queue in memory while the destination is slow or down, and what does not fit
is dropped and counted (`queue_full` while connected, `down_no_spool` while down).

Every drop is counted by reason (`agent.DropCounter`) and logged at once, then at most once per ten
seconds per reason. Reasons: queue_full, down_no_spool, spool_full, spool_error, bad_pickle,
shutdown, removed, unroutable (hash_route redistribution that found no destination).

Delivery: a point counts as sent once the kernel took it (Graphite's protocols have no acknowledgements).
When the peer closes the connection (carbon-cache restart), the writer notices at once through a reader
task and retries the write in progress on the next connection; points written in the last moment before
the peer closed can still be lost, as with carbon's own relay.
"""

from __future__ import annotations

import logging
import shutil
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import trio

from agent import Backoff, ChangeNotifier, DropCounter, Reconnector
from agent.decoding import MalformedData
from agent.durable_log import DurableLog
from agent_plugins.graphite.protocol.hashing import DestinationAddress
from agent_plugins.graphite.protocol.pickle_codec import PickleCodecError
from agent_plugins.graphite.protocol.routing import DestinationConfig, OutputFormat

from .render import Chunk, ChunkCodec, render_pickle, render_plaintext, take

log = logging.getLogger(__name__)

#: Points taken from the memory queue for one write.
WRITE_MAX_POINTS = 50_000
#: Below this many queued points, a write that follows another within `flush_interval` waits for more.
FULL_WRITE_POINTS = 1_000
#: Spool records read (and written to the destination) at a time.
SPOOL_READ_RECORDS = 64
SPOOL_READ_BYTES = 4 << 20
#: How long the replay allowance may be saved up while the spool is idle (burst size, in seconds of rate).
REPLAY_BURST_SECONDS = 1.0
#: Replay is written in slices of at most this many seconds of `replay_rate`.
REPLAY_SLICE_SECONDS = 0.1
#: How long a removed destination keeps trying to write what it holds in memory before spooling it.
REMOVED_DRAIN_SECONDS = 30.0
#: How often the spool's recent writes are synced to disk.
SPOOL_SYNC_INTERVAL = 1.0

DROP_REASONS = (
    "queue_full",
    "down_no_spool",
    "spool_full",
    "spool_error",
    "bad_pickle",
    "shutdown",
    "removed",
    "unroutable",
)


class ReplayPacer:
    """How fast the spool is replayed: `rate` points per second, plus every point that was added to the spool
    while replaying (the live traffic), so that the replay always gains on the spool by `rate`.

    Pure: the caller passes the time. `reserve(points, now)` books a write and returns how long to wait
    before it; the unused allowance saves up to `burst` seconds of rate.
    """

    def __init__(self, rate: float, now: float, burst: float = REPLAY_BURST_SECONDS) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = rate * burst
        self._live = 0
        self._last = now

    def credit(self, points: int) -> None:
        """Points of live traffic went to the spool: they may be replayed on top of the rate."""
        self._live += points

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._tokens = min(self.rate * self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now

    def reserve(self, points: int, now: float) -> float:
        self._refill(now)
        from_live = min(self._live, points)
        self._live -= from_live
        self._tokens -= points - from_live
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class DestinationOwner(Protocol):
    """What a destination asks of the output that owns it (hash_route failover)."""

    def destination_failed(self, destination: Destination) -> bool:
        """The destination stayed down for its route's failover_after: take it out of its hash ring if
        the route fails over and another destination is left. Returns whether it left the ring."""
        ...

    def destination_back(self, destination: Destination) -> None:
        """A destination that had left its ring is reachable again."""
        ...

    def redistribute(self, destination: Destination, chunks: Sequence[Chunk]) -> None:
        """Routes points that were waiting for a destination that left its ring to the others."""
        ...


Connector = Callable[[str, int], Awaitable[trio.abc.Stream]]
#: Runs a blocking call (fn, *args) and returns its result: `trio.to_thread.run_sync`.
BlockingRunner = Callable[..., Awaitable[Any]]


def spool_directory_name(route_key: str, address: DestinationAddress) -> str:
    """`<route>_<host>_<port>[_<instance>]`, with characters unsafe in file names replaced by "_"."""
    parts = [route_key, address.host, str(address.port)]
    if address.instance is not None:
        parts.append(address.instance)
    return "_".join("".join(c if c.isalnum() or c in "-." else "_" for c in part) for part in parts)


class Destination:
    """A destination of one route: queue, spool, connection, counters. See the module docstring."""

    def __init__(
        self,
        route_key: str,
        config: DestinationConfig,
        output_format: OutputFormat,
        spool_root: Path,
        owner: DestinationOwner,
        failover_after: float | None = None,
        connect: Connector | None = None,
        run_blocking: BlockingRunner | None = None,
    ) -> None:
        self.route_key = route_key
        self.address = config.parsed_address
        self.name = f"graphite-out route {route_key!r} destination {self.address}"
        self.config = config
        self.output_format: OutputFormat = output_format
        self.failover_after = failover_after
        self.owner = owner
        #: How to open a connection (host, port) -> stream; tests pass memory streams.
        self.connect: Connector = connect or trio.open_tcp_stream
        #: How the spool's disk work runs: in a worker thread (tests under a MockClock run it inline).
        self.run_blocking: BlockingRunner = run_blocking or trio.to_thread.run_sync
        self.spool_path = spool_root / spool_directory_name(route_key, self.address)
        self.codec = ChunkCodec()
        self.drops = DropCounter(self.name, log)
        self.queue: deque[Chunk] = deque()
        self.queued_points = 0
        self.retry: list[Chunk] = []
        self.spool: DurableLog | None = None
        #: Points for the spool that its task has not appended yet (oldest first), and their count.
        self.to_spool: list[Chunk] = []
        self.to_spool_points = 0
        # Whether the spool task is appending (a worker thread holds chunks that left `to_spool`).
        self._appending = False
        # What the spool held after the last call (read by `stats` without touching the disk).
        self._spool_records = 0
        self._spool_bytes = 0
        self._spool_changed = ChangeNotifier()
        # (seq, points) of spool records appended by this process and not yet read, to count spool_full
        # drops in points.
        self._spool_index: deque[tuple[int, int]] = deque()
        # The last spool record the writer read and committed itself. The writer may read records while
        # the worker thread that appended them has not yet returned: those must not enter the index,
        # where they would look like records the size cap dropped.
        self._read_through = 0
        self.spooling = False
        #: Whether the spool is replayed at replay_rate: it holds points that waited out an outage (or an
        #: earlier run). A spill of a destination that stayed up is replayed at full speed.
        self.paced_replay = False
        self.connected = False
        self.down = False
        self.down_since: float | None = None
        self.failed_over = False
        self.retired = False
        self.draining = False
        self.finished = False
        self.sent = 0
        self.spooled = 0
        self.replayed = 0
        self.redistributed = 0
        self.connects = 0
        self.write_errors = 0
        self.last_error = ""
        self._pacer: ReplayPacer | None = None
        self._last_write = -float("inf")
        self._wakeup = trio.Event()
        self._exited = trio.Event()
        self._reconnect = Reconnector(self.name, log, Backoff(0.1, 1.0))

    @property
    def key(self) -> tuple[str, str]:
        return (self.route_key, str(self.address))

    # -- configuration --

    def reconfigure(
        self, config: DestinationConfig, output_format: OutputFormat, failover_after: float | None
    ) -> None:
        """Takes new options (queue size, spool, rates, format) for the same route and address."""
        self.config = config
        self.output_format = output_format
        self.failover_after = failover_after
        if self._pacer is not None:
            self._pacer.rate = float(config.replay_rate)
        if self.retired:
            log.info("%s: configured again; it stays", self.name)
            self.retired = False
        self._wake()

    async def open_spool(self, only_existing: bool = False) -> None:
        """Opens the spool (in a worker thread: it reads the segment files) when spooling is on, or when
        an earlier run left points in it (they are replayed). With `only_existing`, only a spool already
        on disk is opened (at start: a healthy destination creates no files until it first needs its
        spool). Raises OSError."""
        if self.spool is not None:
            return
        exists = self.spool_path.exists()
        if not exists and (only_existing or not self.config.spool):
            return
        spool = await self.run_blocking(self._open_log)
        self.spool = spool
        self._spool_records, self._spool_bytes = spool.pending_records, spool.pending_bytes
        if self._spool_records:
            log.info(
                "%s: %d spooled records (%d bytes) from an earlier run will be replayed",
                self.name,
                self._spool_records,
                self._spool_bytes,
            )
            self.spooling = True
            # We cannot know whether the destination is healthy: treat it as one that comes back.
            self.paced_replay = True
            self._wake()

    def _open_log(self) -> DurableLog:
        return DurableLog(self.spool_path, max_bytes=int(self.config.spool_max_size), fsync="interval")

    async def close_spool(self) -> None:
        spool = self.spool
        if spool is not None:
            self.spool = None
            try:
                await self.run_blocking(spool.close)
            except OSError as error:
                log.error("%s: closing the spool failed: %s", self.name, error)

    # -- the producer side: called by the output, never waits --

    def offer(self, chunk: Chunk) -> None:
        """Takes this destination's share of a batch: memory queue, spool, or counted drop."""
        points = len(chunk)
        if not points:
            return
        if self.spooling:
            self._to_spool([chunk])
            if self.paced_replay and self.connected and self._pacer is not None:
                self._pacer.credit(points)
            return
        full = self.queued_points + points > self.config.queue_max_points
        if (self.down or full) and self.config.spool:
            self._start_spooling("down" if self.down else "queue full")
            self._to_spool([chunk])
            return
        if full:
            self.drops.add(
                "down_no_spool" if self.down else "queue_full",
                points,
                f"queue holds {self.queued_points} points",
            )
            return
        self.queue.append(chunk)
        self.queued_points += points
        self._wake()

    def _start_spooling(self, why: str) -> None:
        """Moves the memory queue to the spool (it is older than anything that comes next)."""
        if not self.spooling:
            log.info("%s: %s; spooling to %s", self.name, why, self.spool_path)
            # A spill while connected (queue full) is replayed at full speed, a backlog of an outage paced.
            self.paced_replay = self.down
        self.spooling = True
        if self.queue:
            chunks = list(self.queue)
            self.queue.clear()
            self.queued_points = 0
            self._to_spool(chunks)
        self._wake()

    def _to_spool(self, chunks: list[Chunk]) -> None:
        """Hands chunks to the spool task (it appends them in a worker thread)."""
        points = sum(len(chunk) for chunk in chunks)
        self.to_spool.extend(chunks)
        self.to_spool_points += points
        self.spooled += points
        self._spool_changed.notify()

    @property
    def spool_settled(self) -> bool:
        """Whether every point handed to the spool is on disk (or was dropped and counted)."""
        return not self.to_spool and not self._appending

    async def wait_spool_settled(self) -> None:
        await self._spool_changed.wait_for(lambda: self.spool_settled)

    async def _append_to_spool(self) -> None:
        """Appends what waits in `to_spool`, opening the spool first if needed; failures drop and count.
        The chunks leave `to_spool` only once appended (or dropped): cancelled before, they stay there
        for `finish`."""
        chunks = list(self.to_spool)
        points = sum(len(chunk) for chunk in chunks)

        def settle() -> None:
            del self.to_spool[: len(chunks)]
            self.to_spool_points -= points

        self._appending = True
        try:
            try:
                await self.open_spool()
            except (OSError, RuntimeError) as error:
                settle()
                self._spool_failed(points, f"cannot open the spool: {error}")
                return
            if self.spool is None:  # the spool was switched off meanwhile
                settle()
                self._spool_failed(points, "the spool is off")
                return
            spool = self.spool
            payloads = [self.codec.encode(chunk) for chunk in chunks]

            def append() -> tuple[int, int, int]:
                last = spool.append_many(payloads)
                return last, spool.pending_records, spool.pending_bytes

            try:
                last, self._spool_records, self._spool_bytes = await self.run_blocking(append)
            except (OSError, ValueError) as error:
                settle()
                self._spool_failed(points, str(error))
                return
            settle()
            first = last - len(chunks) + 1
            self._spool_index.extend(
                (first + i, len(chunk)) for i, chunk in enumerate(chunks) if first + i > self._read_through
            )
            self._count_capped_records()
        finally:
            self._appending = False
            self._spool_changed.notify()
            self._wake()

    def _spool_failed(self, points: int, why: str) -> None:
        self.spooled -= points
        self.drops.add("spool_error", points, why)
        if self.spool is None and not self.to_spool:
            # Nothing will reach the disk: new points use the memory queue again.
            self.spooling = False
            self.paced_replay = False

    async def _spool_loop(self) -> None:
        """The spool task: opens a spool left by an earlier run, appends what `offer` hands it, and syncs
        the spool every SPOOL_SYNC_INTERVAL; all of the disk work in worker threads."""
        try:
            await self.open_spool(only_existing=True)
        except (OSError, RuntimeError) as error:
            log.error("%s: cannot open the spool: %s", self.name, error)
        next_sync = trio.current_time() + SPOOL_SYNC_INTERVAL
        while True:
            with trio.move_on_at(next_sync):
                await self._spool_changed.wait_for(lambda: bool(self.to_spool))
            if self.to_spool:
                await self._append_to_spool()
            if trio.current_time() >= next_sync:
                await self.sync_spool()
                next_sync = trio.current_time() + SPOOL_SYNC_INTERVAL

    async def sync_spool(self) -> None:
        """Flushes the spool's recent writes to disk, in a worker thread."""
        spool = self.spool
        if spool is not None:
            try:
                await self.run_blocking(spool.sync)
            except (OSError, ValueError) as error:
                log.error("%s: spool sync failed: %s", self.name, error)

    def _count_capped_records(self) -> None:
        """Records the size cap dropped (the log moved its position past them) were never read: count them."""
        assert self.spool is not None
        position = self.spool.committed_seq
        lost = 0
        index = self._spool_index
        while index and index[0][0] <= position:
            lost += index.popleft()[1]
        if lost:
            self.drops.add(
                "spool_full", lost, f"spool_max_size {int(self.config.spool_max_size)} bytes reached"
            )

    # -- lifecycle requests from the output --

    def _wake(self) -> None:
        self._wakeup.set()

    def retire(self) -> None:
        """Removed from the routing table: write what memory holds (for a while), keep the spool on disk."""
        self.retired = True
        self._wake()

    def request_drain(self) -> None:
        """Shutdown: write what memory holds, no more spool replay, then stop."""
        self.draining = True
        self._wake()

    @property
    def memory_points(self) -> int:
        return self.queued_points + sum(len(chunk) for chunk in self.retry)

    @property
    def stopping(self) -> bool:
        return self.draining or self.retired

    async def finish(self, reason: str) -> None:
        """Last step: what is still in memory goes to the spool (or is dropped and counted), the spool
        closes. Disk work in worker threads."""
        chunks = self.retry + list(self.queue) + self.to_spool
        pending_for_spool = self.to_spool_points
        self.retry = []
        self.queue.clear()
        self.queued_points = 0
        self.to_spool, self.to_spool_points = [], 0
        self.spooled -= pending_for_spool  # counted again below, once on disk
        if chunks:
            points = sum(len(chunk) for chunk in chunks)
            if self.config.spool:
                try:
                    await self.open_spool()
                except (OSError, RuntimeError) as error:
                    log.error("%s: cannot open the spool: %s", self.name, error)
            if self.spool is not None and self.config.spool:
                self._to_spool(chunks)
                await self._append_to_spool()
                log.info("%s: %d points not written yet were spooled (%s)", self.name, points, reason)
            else:
                self.drops.add(reason, points, "not written and the spool is off")
        empty = self.spool is not None and self._spool_records == 0
        await self.close_spool()
        if reason == "removed" and empty:
            # Nothing left for a destination that is gone: do not leave its spool directory behind.
            await self.run_blocking(partial(shutil.rmtree, self.spool_path, ignore_errors=True))
        self.drops.flush()
        self.finished = True

    def discard(self) -> None:
        """Finishes a destination whose writer never ran (removed while the output is not running): it
        holds no points and has no spool open."""
        self.drops.flush()
        self.finished = True

    async def wait_exited(self) -> None:
        await self._exited.wait()

    # -- the writer task --

    async def run(self) -> None:
        """Runs the writer and the spool task; returns once drained (shutdown) or retired, or when
        cancelled."""
        self._exited = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._spool_loop)
                await self._write_until_done()
                nursery.cancel_scope.cancel()
        finally:
            self.connected = False
            self._exited.set()

    async def _write_until_done(self) -> None:
        """Connects, writes, reconnects (the waits and outage logs of `agent.Reconnector`)."""
        interval = float(self.config.reconnect_interval)
        self._reconnect = Reconnector(
            self.name, log, Backoff(min(0.1, interval), interval), summary=self._outage_summary
        )
        retire_deadline: float | None = None
        while True:
            if self.retired and retire_deadline is None:
                retire_deadline = trio.current_time() + REMOVED_DRAIN_SECONDS
            if not self.retired:
                retire_deadline = None
            if self.stopping and self.memory_points == 0:
                return
            if retire_deadline is not None and trio.current_time() >= retire_deadline:
                return
            if self.failed_over:
                await self._redistribute_everything()
            stream = await self._connect()
            if stream is None:
                delay = self._reconnect.failed(self.last_error)
                await self._mark_down()
                if self.draining:
                    return
                with trio.move_on_after(delay):
                    while not self.stopping:
                        await self._wait_for_wakeup()
                continue
            try:
                await self._session(stream)
            finally:
                self.connected = False
                with trio.CancelScope(shield=True):
                    await stream.aclose()
            if self.stopping and self.memory_points == 0:
                return
            await self._mark_down()

    def _outage_summary(self) -> str:
        return f"{self.memory_points} points in memory, {self._spool_records} records in the spool"

    async def _wait_for_wakeup(self) -> None:
        await self._wakeup.wait()
        self._wakeup = trio.Event()

    async def _connect(self) -> trio.abc.Stream | None:
        try:
            with trio.fail_after(float(self.config.connect_timeout)):
                stream = await self.connect(self.address.host, self.address.port)
        except (OSError, trio.TooSlowError) as error:
            self.last_error = (
                "connection timed out"
                if isinstance(error, trio.TooSlowError)
                else f"cannot connect: {str(error) or type(error).__name__}"
            )
            return None
        self.connects += 1
        self.connected = True
        self.last_error = ""
        self.down = False
        self.down_since = None
        self._pacer = ReplayPacer(float(self.config.replay_rate), trio.current_time())
        self._reconnect.connected()
        if self.failed_over:
            self.failed_over = False
            self.owner.destination_back(self)
        return stream

    async def _mark_down(self) -> None:
        now = trio.current_time()
        if not self.down:
            self.down = True
            self.down_since = now
            if self.spooling:
                # A spill being replayed at full speed is now the backlog of an outage.
                self.paced_replay = True
            if self.config.spool and self.queue:
                self._start_spooling("down")
        if (
            not self.failed_over
            and self.failover_after is not None
            and self.down_since is not None
            and now - self.down_since >= self.failover_after
            and not self.stopping
            and self.owner.destination_failed(self)
        ):
            self.failed_over = True
            await self._redistribute_everything()

    async def _redistribute_everything(self) -> None:
        """Hands every waiting point to the other destinations of the ring (this one left it)."""
        chunks = self.retry + list(self.queue)
        self.retry = []
        self.queue.clear()
        self.queued_points = 0
        if self.spooling:
            # What the spool task holds goes to disk first: then the disk has all of it, oldest first.
            await self.wait_spool_settled()
        spool = self.spool
        if spool is not None:

            def read_everything() -> tuple[list[tuple[int, bytes]], int, int]:
                records: list[tuple[int, bytes]] = []
                while some := spool.read(max(spool.committed_seq, records[-1][0] if records else 0)):
                    records.extend(some)
                if records:
                    spool.commit(records[-1][0])
                return records, spool.pending_records, spool.pending_bytes

            records, self._spool_records, self._spool_bytes = await self.run_blocking(read_everything)
            if records:
                self._drop_index_through(records[-1][0])
            for _, payload in records:
                chunk = self._decode(payload)
                if chunk is not None:
                    chunks.append(chunk)
        if self.spool_settled:
            self.spooling = False
            self.paced_replay = False
        if chunks:
            points = sum(len(chunk) for chunk in chunks)
            self.redistributed += points
            log.info("%s: %d waiting points go to the other destinations of the ring", self.name, points)
            self.owner.redistribute(self, chunks)

    def _drop_index_through(self, seq: int) -> None:
        self._read_through = max(self._read_through, seq)
        index = self._spool_index
        while index and index[0][0] <= seq:
            index.popleft()

    def _decode(self, payload: bytes) -> Chunk | None:
        try:
            return self.codec.decode(payload)
        except MalformedData as error:
            # Skipped rather than raised: the writer would restart on the same record for ever.
            log.error("%s: a spool record is not readable, skipped: %s", self.name, error)
            return None

    async def _session(self, stream: trio.abc.Stream) -> None:
        """Writes until the connection breaks or there is nothing left to do."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_peer, stream, nursery.cancel_scope)
            try:
                await self._write_loop(stream)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as error:
                self.write_errors += 1
                text = (
                    "write timed out"
                    if isinstance(error, trio.TooSlowError)
                    else str(error) or type(error).__name__
                )
                self.last_error = text
                log.warning("%s: write failed: %s", self.name, text)
            nursery.cancel_scope.cancel()

    async def _watch_peer(self, stream: trio.abc.Stream, scope: trio.CancelScope) -> None:
        """carbon never writes back: reading tells at once when it closed the connection."""
        try:
            while await stream.receive_some(4096):
                pass
            self.last_error = "connection closed by the destination"
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            self.last_error = str(error) or type(error).__name__
        log.warning("%s: %s", self.name, self.last_error)
        scope.cancel()

    async def _write_loop(self, stream: trio.abc.Stream) -> None:
        while True:
            if self.retry:
                chunks = self.retry
                self.retry = []
                await self._write(stream, chunks, retry_on_failure=chunks)
                continue
            if self.queue:
                # Nagle-like: a small write right after another waits (up to flush_interval after the
                # previous write) for more points; the first points after an idle spell go at once.
                gather_until = self._last_write + float(self.config.flush_interval)
                if (
                    self.queued_points < FULL_WRITE_POINTS
                    and not self.stopping
                    and trio.current_time() < gather_until
                ):
                    with trio.move_on_at(gather_until):
                        while self.queued_points < FULL_WRITE_POINTS and not self.stopping:
                            await self._wait_for_wakeup()
                chunks = self._take_from_queue()
                await self._write(stream, chunks, retry_on_failure=chunks)
                continue
            if self.stopping:
                return
            if self.spooling:
                if self.spool is not None and await self._replay_some(stream):
                    continue
                if not self.spool_settled:
                    await self._wait_for_wakeup()  # the spool task wakes the writer once it appended
                    continue
                self.spooling = False
                self.paced_replay = False
                log.info("%s: spool replayed; back to the memory queue", self.name)
                continue
            await self._wait_for_wakeup()

    def _take_from_queue(self) -> list[Chunk]:
        chunks: list[Chunk] = []
        points = 0
        while self.queue and (not chunks or points + len(self.queue[0]) <= WRITE_MAX_POINTS):
            chunk = self.queue.popleft()
            points += len(chunk)
            chunks.append(chunk)
        self.queued_points -= points
        return chunks

    async def _replay_some(self, stream: trio.abc.Stream) -> bool:
        """Writes the next spool records; False when the spool is empty.

        Unpaced (a spill of a destination that stayed up), the records go out in one write. Paced (after
        an outage, see the module docstring), they are cut into slices of at most REPLAY_SLICE_SECONDS of
        rate, each booked with the pacer, so that a big record does not go out as one burst after a long
        wait; slices that need no wait are written together. A record is committed once all of it is
        written; if the connection breaks in the middle of one, all of it is sent again on the next
        connection (duplicates, which Graphite ignores, rather than a gap).
        """
        spool = self.spool
        assert spool is not None
        records = await self.run_blocking(
            spool.read, spool.committed_seq, SPOOL_READ_RECORDS, SPOOL_READ_BYTES
        )
        if not records:
            return False
        slice_points = max(1, int(float(self.config.replay_rate) * REPLAY_SLICE_SECONDS))
        pending: list[Chunk] = []
        complete_seq: int | None = None  # the newest record all of whose slices are in `pending`

        async def flush() -> None:
            nonlocal pending, complete_seq
            if pending:
                await self._write(stream, pending, retry_on_failure=None)
                self.replayed += sum(len(part) for part in pending)
                pending = []
            if complete_seq is not None:
                seq, complete_seq = complete_seq, None

                def commit() -> tuple[int, int]:
                    spool.commit(seq)
                    return spool.pending_records, spool.pending_bytes

                self._spool_records, self._spool_bytes = await self.run_blocking(commit)
                self._drop_index_through(seq)

        pacer = self._pacer if self.paced_replay else None
        for seq, payload in records:
            chunk = self._decode(payload)
            if chunk is not None and pacer is None:
                pending.append(chunk)
            elif chunk is not None:
                for start in range(0, len(chunk), slice_points):
                    part = take(chunk, range(start, min(start + slice_points, len(chunk))))
                    delay = pacer.reserve(len(part), trio.current_time())
                    if delay > 0:
                        await flush()
                        await trio.sleep(delay)
                    pending.append(part)
            complete_seq = seq
        await flush()
        return True

    async def _write(
        self, stream: trio.abc.Stream, chunks: list[Chunk], retry_on_failure: list[Chunk] | None
    ) -> None:
        """Renders and writes chunks. If the write does not complete, memory chunks go back to `retry`
        (spool records are simply not committed, so they are read again)."""
        try:
            data = self._render(chunks)
        except PickleCodecError as error:
            # A point too big for any pickle frame: render the others one chunk at a time.
            data = self._render_skipping_bad_points(chunks, error)
        done = False
        try:
            with trio.fail_after(float(self.config.write_timeout)):
                await stream.send_all(data)
            done = True
            self._last_write = trio.current_time()
        finally:
            if done:
                self.sent += sum(len(chunk) for chunk in chunks)
            elif retry_on_failure is not None:
                self.retry = retry_on_failure + self.retry

    def _render(self, chunks: list[Chunk]) -> bytes:
        if self.output_format == "pickle":
            return render_pickle(chunks, self.config.pickle_points_per_frame)
        return render_plaintext(chunks)

    def _render_skipping_bad_points(self, chunks: list[Chunk], error: Exception) -> bytes:
        parts = []
        for chunk in chunks:
            for i in range(len(chunk)):
                single = Chunk([chunk.paths[i]], [chunk.timestamps[i]], [chunk.values[i]])
                try:
                    parts.append(render_pickle([single], 1))
                except PickleCodecError as point_error:
                    self.drops.add("bad_pickle", 1, str(point_error))
        return b"".join(parts)

    # -- what the admin API shows --

    @property
    def state(self) -> str:
        if self.finished:
            return "closed"
        if self.retired:
            return "removed"
        if self.failed_over:
            return "failed_over"
        if self.connected:
            return "replaying" if self.spooling else "up"
        if self.down:
            return "down"
        return "connecting"

    def stats(self) -> dict[str, Any]:
        spool = self.spool
        return {
            "route": self.route_key,
            "address": str(self.address),
            "state": self.state,
            "format": self.output_format,
            "sent": self.sent,
            "spooled": self.spooled,
            "replayed": self.replayed,
            "redistributed": self.redistributed,
            "dropped": dict(self.drops.by_reason),
            "dropped_total": self.drops.total,
            "queue_points": self.memory_points,
            "queue_max_points": self.config.queue_max_points,
            "spool": self.config.spool,
            "replay_paced": self.paced_replay,
            "spool_records": self._spool_records if spool is not None else 0,
            "spool_bytes": self._spool_bytes if spool is not None else 0,
            "spool_max_bytes": int(self.config.spool_max_size),
            "connects": self.connects,
            "write_errors": self.write_errors,
            "last_error": self.last_error,
            "down_for_seconds": self._down_for(),
        }

    def _down_for(self) -> float:
        if self.down_since is None:
            return 0.0
        try:
            return round(trio.current_time() - self.down_since, 3)
        except RuntimeError:  # outside trio (a test inspecting a stopped output)
            return 0.0
