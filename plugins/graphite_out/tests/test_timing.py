"""Destination timing under trio's MockClock (no real sockets): reconnect backoff, hash_route failover
after failover_after, replay pacing, gathering of small writes. Connections are memory streams."""

from __future__ import annotations

import trio
import trio.testing

from agent_plugins.graphite_out.destination import Destination
from agent_plugins.graphite_out.render import Chunk
from agent_plugins.graphite_protocol.routing import DestinationConfig


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
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            self.lines.extend((trio.current_time(), line) for line in lines)


def chunk(start: int, count: int) -> Chunk:
    return Chunk([f"p.{i}" for i in range(start, start + count)], [1_700_000_000] * count, [1.0] * count)


def destination(
    tmp_path, owner: Owner, network: Network, failover_after: float | None = None, **options
) -> Destination:
    config = DestinationConfig(address="10.0.0.1:2003", reconnect_interval=10.0, **options)
    return Destination("r", config, "plaintext", tmp_path, owner, failover_after, connect=network.connect)


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
