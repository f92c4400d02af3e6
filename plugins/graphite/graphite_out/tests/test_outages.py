"""Destinations that go away: spooling, replay in order, restarts, drops without a spool, hash_route failover."""

from __future__ import annotations

import msgspec
import trio

from agent_plugins.graphite.graphite_out.testing import (
    FakeCarbon,
    fast_destination,
    graphite_batch,
    new_output,
    running_output,
    send,
    wait_until,
)
from agent_plugins.graphite.protocol.hashing import ConsistentHashRing


def numbered(batch_number: int, size: int = 100) -> list[str]:
    return [f"batch{batch_number:03d}.point{i:03d}" for i in range(size)]


def sent_points(batch_numbers: range, size: int = 100) -> list[str]:
    return [p for n in batch_numbers for p in numbered(n, size)]


async def test_a_stopped_destination_gets_every_point_in_order_while_the_other_keeps_receiving(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            flaky, steady = FakeCarbon(), FakeCarbon()
            await flaky.start(nursery)
            await steady.start(nursery)
            output = new_output(
                tmp_path,
                {
                    "routes": [
                        {
                            "key": "mirror",
                            "type": "broadcast",
                            "destinations": [
                                # Slow replay: live batches arrive while the spool is replayed.
                                fast_destination(flaky.address, replay_rate=3000),
                                fast_destination(steady.address),
                            ],
                        }
                    ]
                },
            )
            flaky_destination, _ = output.state.route_destinations["mirror"]
            async with running_output(output) as pipeline:
                await send(pipeline, graphite_batch(numbered(0)))
                await flaky.wait_for(100)
                await steady.wait_for(100)

                await flaky.stop()
                await wait_until(lambda: flaky_destination.down)
                # While the flaky one is down the steady one gets each batch before the next is sent.
                for n in range(1, 11):
                    await send(pipeline, graphite_batch(numbered(n)))
                    await steady.wait_for(100 * (n + 1))
                assert len(flaky.points) == 100
                assert flaky_destination.spooled == 1000
                assert flaky_destination.stats()["spool_records"] > 0

                await flaky.start(nursery)  # same port
                # More live points while it replays: they queue behind the spool.
                for n in range(11, 16):
                    await send(pipeline, graphite_batch(numbered(n)))
                    await trio.sleep(0.02)
                await flaky.wait_for(1600)
                await steady.wait_for(1600)
            assert flaky.paths == sent_points(range(16))
            assert steady.paths == sent_points(range(16))
            stats = flaky_destination.stats()
            assert stats["replayed"] >= 1000 and stats["dropped_total"] == 0
            nursery.cancel_scope.cancel()


async def test_a_slow_destination_never_slows_the_others(tmp_path):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            slow, steady = FakeCarbon(), FakeCarbon()
            await slow.start(nursery)
            await steady.start(nursery)
            output = new_output(
                tmp_path,
                {
                    "routes": [
                        {
                            "key": "mirror",
                            "type": "broadcast",
                            "destinations": [
                                fast_destination(slow.address, queue_max_points=10_000),
                                fast_destination(steady.address),
                            ],
                        }
                    ]
                },
            )
            slow_destination, _ = output.state.route_destinations["mirror"]
            size, batches = 5000, 60  # about 10 MB: more than the kernel buffers towards the slow one
            async with running_output(output) as pipeline:
                await send(pipeline, graphite_batch(numbered(0, size)))
                await slow.wait_for(size)
                slow.pause()
                for n in range(1, batches):
                    await send(pipeline, graphite_batch(numbered(n, size)))
                    # The steady one gets each batch at once, whatever the slow one does.
                    with trio.fail_after(2):
                        await steady.wait_for(size * (n + 1))
                # The slow one was held back meanwhile (it read one more chunk after pause(); the rest
                # waits in the kernel's buffers, its queue and, once that is full, its spool).
                assert len(slow.points) < 2 * size
                slow.resume()
                await slow.wait_for(size * batches)
            assert steady.paths == sent_points(range(batches), size)
            assert slow.paths == sent_points(range(batches), size)
            assert slow_destination.drops.total == 0
            nursery.cancel_scope.cancel()


async def test_replay_is_paced_at_replay_rate(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            sink = FakeCarbon()
            await sink.start(nursery)
            await sink.stop()  # the port is known and nobody listens
            output = new_output(
                tmp_path,
                {
                    "routes": [
                        {
                            "key": "r",
                            "type": "send_all_match",
                            "destinations": [fast_destination(sink.address, replay_rate=2000)],
                        }
                    ]
                },
            )
            (destination,) = output.state.route_destinations["r"]
            async with running_output(output) as pipeline:
                await wait_until(lambda: destination.down)
                for n in range(10):
                    await send(pipeline, graphite_batch(numbered(n, 300)))
                await sink.start(nursery)
                started = trio.current_time()
                await sink.wait_for(3000)
                elapsed = trio.current_time() - started
            # 3000 points at 2000/s with a one-second allowance: at least 0.5 s (and not the whole spool at once).
            assert elapsed >= 0.45, elapsed
            assert sink.paths == sent_points(range(10), 300)
            nursery.cancel_scope.cancel()


async def test_the_spool_survives_a_restart_of_the_output(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            sink = FakeCarbon()
            await sink.start(nursery)
            await sink.stop()
            table = {
                "routes": [
                    {"key": "r", "type": "send_all_match", "destinations": [fast_destination(sink.address)]}
                ]
            }

            first = new_output(tmp_path, table, grace_period=0.2)
            async with running_output(first) as pipeline:
                for n in range(5):
                    await send(pipeline, graphite_batch(numbered(n)))
            (destination,) = first.state.route_destinations["r"]
            assert destination.finished and destination.sent == 0 and destination.drops.total == 0
            spool_dirs = list((tmp_path / "spool").iterdir())
            assert [d.name for d in spool_dirs] == [f"r_127.0.0.1_{sink.port}"]

            await sink.start(nursery)
            second = new_output(tmp_path, table)
            async with running_output(second):
                await sink.wait_for(500)
            assert sink.paths == sent_points(range(5))
            (destination,) = second.state.route_destinations["r"]
            assert destination.replayed == 500
            nursery.cancel_scope.cancel()


async def test_without_spool_the_overflow_is_dropped_and_counted(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            sink = FakeCarbon()
            await sink.start(nursery)
            await sink.stop()
            output = new_output(
                tmp_path,
                {
                    "routes": [
                        {
                            "key": "r",
                            "type": "send_all_match",
                            "destinations": [
                                fast_destination(sink.address, spool=False, queue_max_points=150)
                            ],
                        }
                    ]
                },
            )
            (destination,) = output.state.route_destinations["r"]
            async with running_output(output) as pipeline:
                await wait_until(lambda: destination.down)
                for n in range(10):
                    await send(pipeline, graphite_batch(numbered(n)))
                assert destination.drops.by_reason == {"down_no_spool": 900}
                assert destination.stats()["queue_points"] == 100
                await sink.start(nursery)
                await sink.wait_for(100)
            # What fitted in memory arrives once the destination is back; nothing was spooled.
            assert sink.paths == numbered(0)
            assert not (tmp_path / "spool").exists()
            stats = output.stats()["destinations"][0]
            assert stats["dropped"] == {"down_no_spool": 900} and stats["sent"] == 100
            nursery.cancel_scope.cancel()


async def test_a_slow_destination_spills_to_its_spool_and_keeps_order(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            sink = FakeCarbon()
            await sink.start(nursery)
            output = new_output(
                tmp_path,
                {
                    "routes": [
                        {
                            "key": "r",
                            "type": "send_all_match",
                            "destinations": [fast_destination(sink.address, queue_max_points=250)],
                        }
                    ]
                },
            )
            (destination,) = output.state.route_destinations["r"]
            async with running_output(output) as pipeline:
                # Ten batches in one go: the writer cannot keep up with a 250-point queue.
                for n in range(10):
                    await pipeline.sink().send(graphite_batch(numbered(n)))
                await sink.wait_for(1000)
            assert sink.paths == sent_points(range(10))
            assert destination.spooled > 0 and destination.replayed == destination.spooled
            assert destination.drops.total == 0
            nursery.cancel_scope.cancel()


async def test_hash_route_failover_redistributes_and_rejoin_restores_the_ring(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a, b = FakeCarbon(), FakeCarbon()
            await a.start(nursery)
            await b.start(nursery)
            output = new_output(
                tmp_path,
                {
                    "routes": [
                        {
                            "key": "ring",
                            "type": "hash_route",
                            "failover_after": "300ms",
                            "destinations": [
                                fast_destination(f"{a.address}:a"),
                                fast_destination(f"{b.address}:b"),
                            ],
                        }
                    ]
                },
            )
            ring = ConsistentHashRing([("127.0.0.1", "a"), ("127.0.0.1", "b")])
            _, b_destination = output.state.route_destinations["ring"]

            def share(paths: list[str], slot: int) -> list[str]:
                return [p for p in paths if ring.node_for_path(p) == slot]

            async with running_output(output) as pipeline:
                first = numbered(0)
                await send(pipeline, graphite_batch(first))
                await wait_until(lambda: len(a.points) + len(b.points) == 100)
                assert a.paths == share(first, 0) and b.paths == share(first, 1)

                await b.stop()
                await wait_until(lambda: b_destination.down)
                # Down but not yet failed over: b's share waits in b's spool...
                second = numbered(1)
                await send(pipeline, graphite_batch(second))
                assert b_destination.spooled == len(share(second, 1))
                # ...until b has been down for failover_after: then it goes to a.
                await wait_until(lambda: b_destination.failed_over)
                assert b_destination.stats()["state"] == "failed_over"
                third = numbered(2)
                await send(pipeline, graphite_batch(third))
                await a.wait_for(len(share(first, 0)) + 200)
                assert sorted(a.paths) == sorted(share(first, 0) + second + third)
                assert b_destination.redistributed == len(share(second, 1))

                await b.start(nursery)
                await wait_until(lambda: not b_destination.failed_over and b_destination.connected)
                fourth = numbered(3)
                await send(pipeline, graphite_batch(fourth))
                await b.wait_for(len(share(first, 1)) + len(share(fourth, 1)))
                await a.wait_for(len(share(first, 0)) + 200 + len(share(fourth, 0)))
            assert b.paths == share(first, 1) + share(fourth, 1)
            assert a.paths[-len(share(fourth, 0)) :] == share(fourth, 0)
            nursery.cancel_scope.cancel()


async def test_a_removed_destination_keeps_its_spool_until_it_comes_back(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            gone, other = FakeCarbon(), FakeCarbon()
            await gone.start(nursery)
            await gone.stop()
            await other.start(nursery)
            table = {
                "routes": [
                    {
                        "key": "r",
                        "type": "send_all_match",
                        "destinations": [fast_destination(gone.address), fast_destination(other.address)],
                    }
                ]
            }
            output = new_output(tmp_path, table)
            spool_dir = tmp_path / "spool" / f"r_127.0.0.1_{gone.port}"
            async with running_output(output) as pipeline:
                gone_destination, other_destination = output.state.route_destinations["r"]
                await wait_until(lambda: gone_destination.down)
                await send(pipeline, graphite_batch(numbered(0)))
                assert gone_destination.spooled == 100

                without = msgspec.structs.replace(output.settings)
                route = output.settings.routes[0]
                without.routes = [msgspec.structs.replace(route, destinations=[route.destination_configs[1]])]
                output.apply(without)
                await wait_until(lambda: gone_destination.finished)
                assert spool_dir.is_dir()  # its points wait on disk
                await send(pipeline, graphite_batch(numbered(1)))
                await other.wait_for(200)

                await gone.start(nursery)
                output.apply(msgspec.structs.replace(output.settings, routes=[route]))
                await gone.wait_for(100)
            assert gone.paths == numbered(0)  # only what was routed to it while it was in the table
            assert other.paths == numbered(0) + numbered(1)
            nursery.cancel_scope.cancel()
