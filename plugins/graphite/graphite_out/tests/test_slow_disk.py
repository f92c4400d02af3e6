"""One slow disk does not hold back the other destinations: the spools' syncs, appends, reads and opens
run in worker threads, never on the trio thread. Real sockets on 127.0.0.1, a fake carbon that records
when each point arrives, and a spool whose every sync takes 200 ms."""

from __future__ import annotations

import time

import trio

from agent import durable_log
from agent_plugins.graphite.graphite_out import testing as graphite_testing
from agent_plugins.graphite.graphite_out.testing import FakeCarbon, fast_destination, graphite_batch

SLOW_SYNC_SECONDS = 0.2


async def test_a_slow_spool_sync_does_not_delay_another_destinations_points(tmp_path, monkeypatch):
    syncs: list[tuple[float, float]] = []  # (start, end) of every slow sync, in time.monotonic()
    real_fdatasync = durable_log._fdatasync

    def slow_fdatasync(fd: int) -> None:
        start = time.monotonic()
        time.sleep(SLOW_SYNC_SECONDS)  # a disk that takes its time, with the spool's lock held
        real_fdatasync(fd)
        syncs.append((start, time.monotonic()))

    monkeypatch.setattr(durable_log, "_fdatasync", slow_fdatasync)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            healthy, gone = FakeCarbon(), FakeCarbon()
            await healthy.start(nursery)
            await gone.start(nursery)
            await gone.stop()  # its port now refuses: that destination spools everything
            output = graphite_testing.new_output(
                tmp_path,
                {
                    "routes": [
                        {
                            "key": "up",
                            "type": "send_all_match",
                            "destinations": [fast_destination(healthy.address)],
                        },
                        {
                            "key": "down",
                            "type": "send_all_match",
                            "destinations": [fast_destination(gone.address)],
                        },
                    ]
                },
            )
            (down,) = output.state.route_destinations["down"]
            async with graphite_testing.running_output(output) as pipeline:
                await graphite_testing.wait_until(lambda: down.down)
                delays: list[float] = []
                sent = 0
                # Every point goes to both routes; the down one's spool takes each of them, and syncs
                # them (200 ms each time) once a second.
                while len(syncs) < 3:
                    sent_at = time.monotonic()
                    await graphite_testing.send(pipeline, graphite_batch([f"p.{sent}"]))
                    sent += 1
                    await healthy.wait_for(sent)
                    delays.append(healthy.arrivals[sent - 1] - sent_at)
                assert down.spooled == sent and down.sent == 0
                # No point of the healthy destination waited for a sync of the other one's spool ...
                assert max(delays) < SLOW_SYNC_SECONDS, sorted(delays)[-5:]
                # ... and points kept arriving while a sync was going on.
                for start, end in syncs:
                    assert any(start < arrival < end for arrival in healthy.arrivals), (start, end)
            nursery.cancel_scope.cancel()
