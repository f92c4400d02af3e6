"""Destination timing under trio's MockClock (no real sockets): reconnect backoff, hash_route failover
after failover_after, replay pacing, gathering of small writes. Connections are memory streams."""

from __future__ import annotations

import trio
import trio.testing

from agent.units import Size
from agent_plugins.graphite.graphite_out.destination import Destination
from agent_plugins.graphite.graphite_out.render import Chunk
from agent_plugins.graphite.protocol.routing import DestinationConfig


class Owner:
    """Records what a destination asks of its output."""

    def __init__(self, allow_failover: bool = True) -> None:
        self.allow_failover = allow_failover
        self.failed_at: list[float] = []
        self.back_at: list[float] = []
        self.redistributed: list[Chunk] = []

    def destination_failed(self, destination: Destination) -> bool:
        self.failed_at.append(trio.current_time())
        return self.allow_failover

    def destination_back(self, destination: Destination) -> None:
        self.back_at.append(trio.current_time())

    def redistribute(self, destination: Destination, chunks) -> None:
        self.redistributed.extend(chunks)


class Network:
    """A connect function that refuses until `up`, then hands out memory streams; the far ends are read
    by a task that records each line with the (virtual) time it arrived."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.up = False
        self.attempts: list[float] = []
        self.lines: list[tuple[float, bytes]] = []
        self.writes = 0
        #: Close the next connection after its first write and refuse connections until `up` again (a
        #: carbon-cache that dies while it is being written to).
        self.die_after_first_write = False

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        self.attempts.append(trio.current_time())
        if not self.up:
            raise OSError(f"connection to {host}:{port} refused")
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self._read, server)
        return client

    async def _read(self, stream: trio.abc.Stream) -> None:
        buffer = b""
        while data := await stream.receive_some(1 << 20):
            self.writes += 1
            if self.die_after_first_write:
                # What the dead carbon-cache had received is lost with it.
                self.die_after_first_write = False
                self.up = False
                await stream.aclose()
                return
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            self.lines.extend((trio.current_time(), line) for line in lines)


async def inline(fn, *args):
    """Runs the spool's disk work on the trio thread: under the MockClock, a wait for a worker thread
    would let the clock jump ahead meanwhile."""
    return fn(*args)


def chunk(start: int, count: int) -> Chunk:
    return Chunk([f"p.{i}" for i in range(start, start + count)], [1_700_000_000] * count, [1.0] * count)


def destination(
    tmp_path, owner: Owner, network: Network, failover_after: float | None = None, **options
) -> Destination:
    config = DestinationConfig(address="10.0.0.1:2003", reconnect_interval=10.0, **options)
    return Destination(
        "r",
        config,
        "plaintext",
        tmp_path,
        owner,
        failover_after,
        connect=network.connect,
        run_blocking=inline,
    )


async def test_reconnect_backs_off_to_reconnect_interval_and_fails_over_after_failover_after(
    tmp_path, autojump_clock
):
    async with trio.open_nursery() as nursery:
        network = Network(nursery)
        owner = Owner()
        dest = destination(tmp_path, owner, network, failover_after=30.0)
        dest.offer(chunk(0, 10))  # waiting in memory when the destination turns out to be down
        nursery.start_soon(dest.run)
        await trio.sleep(100)
        gaps = [b - a for a, b in zip(network.attempts, network.attempts[1:], strict=False)]
        # Equal jitter: each delay is within [d/2, d] of a curve that doubles from 0.1 s up to 10 s.
        assert gaps[0] <= 0.1 and max(gaps) <= 10.0 and gaps[-1] >= 5.0
        # Down since the first attempt; the first attempt at least 30 s later asks to fail over.
        (failed_at,) = owner.failed_at
        assert 30.0 <= failed_at - network.attempts[0] <= 40.0
        assert dest.failed_over and [len(c) for c in owner.redistributed] == [10]
        assert dest.spooled == 10 and dest.stats()["spool_records"] == 0  # spooled when down, then handed on

        network.up = True
        await trio.sleep(11)
        assert dest.connected and not dest.failed_over and len(owner.back_at) == 1
        nursery.cancel_scope.cancel()


async def test_the_last_destination_of_a_ring_keeps_its_points(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        network = Network(nursery)
        owner = Owner(allow_failover=False)
        dest = destination(tmp_path, owner, network, failover_after=1.0)
        nursery.start_soon(dest.run)
        await trio.sleep(5)
        dest.offer(chunk(0, 10))
        await trio.sleep(5)
        assert owner.failed_at and not dest.failed_over and dest.spooled == 10
        network.up = True
        await trio.sleep(11)
        assert [line for _, line in network.lines] == [f"p.{i} 1.0 1700000000".encode() for i in range(10)]
        nursery.cancel_scope.cancel()


async def test_replay_runs_at_replay_rate_plus_live_traffic(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        network = Network(nursery)
        dest = destination(tmp_path, Owner(), network, replay_rate=1000.0)
        nursery.start_soon(dest.run)
        await trio.sleep(1)
        assert dest.down
        for n in range(10):
            dest.offer(chunk(n * 1000, 1000))  # 10000 points spooled while down
        network.up = True
        while not dest.connected:  # the next attempt connects
            await trio.sleep(0.001)
        started = trio.current_time()
        # Live traffic during the replay: 500 points a second for 5 s, all behind the spool.
        for n in range(5):
            dest.offer(chunk(10_000 + n * 500, 500))
            await trio.sleep(1)
        while len(network.lines) < 12_500:
            await trio.sleep(0.5)
        elapsed = network.lines[-1][0] - started
        # 10000 spooled points at 1000/s after a one-second allowance (~9 s); the live points ride on top.
        assert 8.0 <= elapsed <= 11.0, elapsed
        # Smooth, not one burst after a wait: in the first second, the allowance (1000) plus one second of
        # rate (1000) plus the live points of that second (500), in slices of 0.1 s of rate.
        first_second = sum(1 for at, _ in network.lines if at - started < 1.0)
        assert 1000 <= first_second <= 2500, first_second
        assert [line.split(b" ")[0] for _, line in network.lines] == [
            f"p.{i}".encode() for i in range(12_500)
        ]
        assert dest.replayed == 12_500 and not dest.spooling
        nursery.cancel_scope.cancel()


async def test_small_writes_right_after_another_are_gathered_for_flush_interval(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        network = Network(nursery)
        network.up = True
        dest = destination(tmp_path, Owner(), network, flush_interval=1.0)
        nursery.start_soon(dest.run)
        await trio.sleep(0.01)
        dest.offer(chunk(0, 1))  # after an idle spell: written at once
        await trio.sleep(0.01)
        assert len(network.lines) == 1
        for i in range(1, 11):  # ten small batches 10 ms apart: gathered into one write
            dest.offer(chunk(i, 1))
            await trio.sleep(0.01)
        assert len(network.lines) == 1
        await trio.sleep(1)
        assert len(network.lines) == 11 and network.writes == 2
        nursery.cancel_scope.cancel()


async def test_a_destination_that_stays_up_replays_a_spill_at_full_speed(tmp_path, autojump_clock):
    # A burst overflows the memory queue of a healthy destination: the spool must drain as fast as the
    # destination takes it, not at replay_rate (which would take 15 s here).
    async with trio.open_nursery() as nursery:
        network = Network(nursery)
        network.up = True
        dest = destination(tmp_path, Owner(), network, queue_max_points=5000, replay_rate=1000.0)
        nursery.start_soon(dest.run)
        while not dest.connected:
            await trio.sleep(0.001)
        started = trio.current_time()
        for n in range(20):  # 20000 points at once
            dest.offer(chunk(n * 1000, 1000))
        # The 5000 queued points went to the spool first, then everything after them.
        assert dest.spooling and dest.spooled == 20_000 and not dest.paced_replay
        while len(network.lines) < 20_000:
            await trio.sleep(0.01)
        assert network.lines[-1][0] - started < 0.5
        assert [line.split(b" ")[0] for _, line in network.lines] == [
            f"p.{i}".encode() for i in range(20_000)
        ]
        await trio.sleep(0.1)
        assert not dest.spooling and dest.replayed == 20_000
        nursery.cancel_scope.cancel()


async def test_a_spill_becomes_paced_when_the_destination_goes_down(tmp_path, autojump_clock):
    # A burst spills, and the carbon-cache dies at its first replay write: the rest of the spool is now
    # the backlog of an outage, replayed at replay_rate once it is back.
    async with trio.open_nursery() as nursery:
        network = Network(nursery)
        network.up = True
        network.die_after_first_write = True
        dest = destination(tmp_path, Owner(), network, queue_max_points=500, replay_rate=1000.0)
        nursery.start_soon(dest.run)
        while not dest.connected:
            await trio.sleep(0.001)
        for n in range(200):  # 20000 points in 200 records
            dest.offer(chunk(n * 100, 100))
        assert dest.spooling and not dest.paced_replay
        while dest.connected or not dest.down:
            await trio.sleep(0.001)
        # What was written before the close was noticed (whole reads of 64 records) is lost with it.
        lost = dest.replayed
        assert dest.paced_replay and lost % 6400 == 0 and 0 < lost <= 12_800
        await trio.sleep(5)
        network.up = True
        while not dest.connected:
            await trio.sleep(0.001)
        started = trio.current_time()
        while len(network.lines) < 20_000 - lost:
            await trio.sleep(0.01)
        # The rest at 1000 points/s after a one-second allowance (at full speed it would take no time).
        expected_seconds = (20_000 - lost - 1000) / 1000
        assert expected_seconds - 0.5 <= network.lines[-1][0] - started <= expected_seconds + 1.5
        assert [line.split(b" ")[0] for _, line in network.lines] == [
            f"p.{i}".encode() for i in range(lost, 20_000)
        ]
        await trio.sleep(0.5)
        assert not dest.spooling and not dest.paced_replay
        nursery.cancel_scope.cancel()


async def test_a_spool_left_by_an_earlier_run_is_replayed_paced(tmp_path, autojump_clock):
    # The agent stopped while the destination was down: at the next start nobody knows whether that
    # carbon-cache is just back, so its backlog goes at replay_rate.
    async with trio.open_nursery() as nursery:
        network = Network(nursery)
        before = destination(tmp_path, Owner(), network, replay_rate=1000.0)
        async with trio.open_nursery() as first_run:
            first_run.start_soon(before.run)
            while not before.down:
                await trio.sleep(0.001)
            for n in range(5):
                before.offer(chunk(n * 1000, 1000))
            first_run.cancel_scope.cancel()
        await before.finish("shutdown")
        network.up = True
        after = destination(tmp_path, Owner(), network, replay_rate=1000.0)
        await after.open_spool(only_existing=True)
        assert after.spooling and after.paced_replay
        started = trio.current_time()
        nursery.start_soon(after.run)
        while len(network.lines) < 5000:
            await trio.sleep(0.01)
        assert 3.5 <= network.lines[-1][0] - started <= 5.0  # 5000 points: 1000 at once, then 1000/s
        assert [line.split(b" ")[0] for _, line in network.lines] == [f"p.{i}".encode() for i in range(5000)]
        nursery.cancel_scope.cancel()


async def test_a_full_spool_drops_its_oldest_points_and_counts_them(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        network = Network(nursery)
        dest = destination(tmp_path, Owner(), network, spool_max_size=Size(64 * 1024), replay_rate=100_000.0)
        nursery.start_soon(dest.run)
        while not dest.down:
            await trio.sleep(0.001)
        for n in range(20):  # about 400 KB of spool records while down
            dest.offer(chunk(n * 1000, 1000))
        await dest.wait_spool_settled()  # on disk (the spool task appends in a worker thread)
        assert dest.stats()["spool_bytes"] <= 64 * 1024
        dropped = dest.drops.by_reason["spool_full"]
        assert dropped > 0 and dropped % 1000 == 0 and dest.drops.total == dropped
        network.up = True
        while len(network.lines) < 20_000 - dropped:
            await trio.sleep(0.01)
        await trio.sleep(1)
        # Nothing lost silently: what arrived is the newest points, in order, and the rest was counted.
        assert [line.split(b" ")[0] for _, line in network.lines] == [
            f"p.{i}".encode() for i in range(dropped, 20_000)
        ]
        nursery.cancel_scope.cancel()
