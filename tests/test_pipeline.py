"""The pipeline under trio's MockClock: timing, isolation of outputs, overflow, acks, restarts, drain."""

from __future__ import annotations

from functools import partial

import msgspec
import trio
import trio.testing

from agent.model import LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, Batch, BatchIdentity
from agent.pipeline import Pipeline
from agent.plugin import (
    AutonomousSource,
    BatchBuilder,
    Output,
    OutputConfig,
    PolledSource,
    SourceSink,
    Transform,
)
from agent.testing import (
    CollectingOutput,
    make_batch,
    make_series,
    output_element,
    run_output,
    running_pipeline,
    source_element,
    transform_element,
)


class CountingSource(PolledSource):
    def __init__(self, poll_interval: float = 1.0, flush_interval: float = 1.0) -> None:
        self.poll_interval = poll_interval
        self.flush_interval = flush_interval
        self.polls: list[float] = []

    async def poll(self, points: BatchBuilder, timestamp_ns: int) -> None:
        self.polls.append(trio.current_time())
        points.add("polls", len(self.polls), timestamp_ns, LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER)


async def test_polls_on_schedule_and_flushes_every_n_polls(autojump_clock: trio.testing.MockClock) -> None:
    source = CountingSource(poll_interval=2.0, flush_interval=6.0)
    out = CollectingOutput()
    start = trio.current_time()
    async with running_pipeline([source_element(source)], [out]):
        await trio.sleep(11.0)
        # Polls at 0, 2, 4, ... 10. The first poll goes out at once (a new agent shows points at
        # once), then batches of three polls: after the polls at 2, 4 and 6.
        assert [t - start for t in source.polls] == [0, 2, 4, 6, 8, 10]
        assert [len(b) for b in out.batches] == [1, 3]
        assert [b.series[0].values for b in out.batches] == [[1], [2, 3, 4]]
    # At shutdown the polls at 8 and 10, still buffered in the source, are flushed, not lost.
    assert [len(b) for b in out.batches] == [1, 3, 2]
    assert out.values() == [1, 2, 3, 4, 5, 6]


async def test_final_poll_at_stop(autojump_clock: trio.testing.MockClock) -> None:
    source = CountingSource(poll_interval=10.0, flush_interval=10.0)
    out = CollectingOutput()
    async with running_pipeline([source_element(source)], [out], final_poll=True):
        await trio.sleep(1.0)
    assert out.values() == [1, 2]


async def test_a_slow_output_does_not_stall_sources_or_other_outputs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = CountingSource(poll_interval=1.0, flush_interval=1.0)
    fast = CollectingOutput()
    stuck = CollectingOutput(delay=10_000)  # a write never finishes within the test
    elements = [
        source_element(source),
        output_element(fast, "fast"),
        output_element(stuck, "stuck", OutputConfig(queue_max_points=5, overflow="drop_oldest")),
    ]
    async with running_pipeline(elements, grace_period=1.0) as pipeline:
        await trio.sleep(99.5)
        assert len(source.polls) == 100
        assert fast.points == 100
        counters = pipeline.counters()["stuck"]
        # One point is in the stuck write and four wait (the write counts against the queue's five),
        # the rest were dropped and counted.
        assert counters["dropped"] == 100 - 5
        assert counters["queued"] == 5
    # At shutdown the grace period runs out for the stuck output: its points are counted as dropped.
    counters = pipeline.counters()["stuck"]
    assert counters["written"] == 0 and counters["dropped"] == 100


async def test_block_policy_holds_back_the_source(autojump_clock: trio.testing.MockClock) -> None:
    sent = []

    class Pusher(AutonomousSource):
        async def run(self, sink: SourceSink, task_status=trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            for i in range(1000):
                await sink.send(make_batch(make_series(values=[i])))
                sent.append(i)

    slow = CollectingOutput(delay=1.0)
    elements = [
        source_element(Pusher()),
        output_element(slow, "slow", OutputConfig(queue_max_points=10, overflow="block")),
    ]
    pipeline = Pipeline(elements, source_channel_size=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        await trio.sleep(5.5)
        # Each 1 s write takes at most the queue's 10 points: in 5.5 s at most 6 writes' worth plus a
        # full queue and the batch the dispatcher holds went out; the source waits instead of pushing 1000.
        assert 10 <= len(sent) <= 6 * 10 + 10 + 1
        # Nothing is lost: written + queued + the one batch the dispatcher waits to queue.
        assert len(sent) - pipeline.counters()["slow"]["queued"] - slow.points in (0, 1)
        nursery.cancel_scope.cancel()
    assert pipeline.counters()["slow"]["dropped"] == 0


async def test_acks_fire_once_every_output_wrote(autojump_clock: trio.testing.MockClock) -> None:
    a = CollectingOutput()
    b = CollectingOutput(delay=5.0)
    results: list[tuple[float, bool]] = []
    async with running_pipeline([], [a, b]) as pipeline:
        sink = pipeline.sink()
        start = trio.current_time()
        await sink.send(
            make_batch(make_series(values=[1, 2])),
            lambda ok: results.append((trio.current_time() - start, ok)),
        )
        await trio.sleep(1.0)
        assert results == []  # b has not written yet
        await trio.sleep(5.0)
        assert results == [(5.0, True)]


async def test_ack_reports_failure_when_a_point_is_dropped(autojump_clock: trio.testing.MockClock) -> None:
    stuck = CollectingOutput(delay=10_000)
    results: list[bool] = []
    elements = [output_element(stuck, "stuck", OutputConfig(queue_max_points=1))]
    async with running_pipeline(elements, grace_period=0.5) as pipeline:
        sink = pipeline.sink()
        for i in range(3):
            await sink.send(make_batch(make_series(values=[i])), results.append)
        await trio.sleep(1.0)
        # The first batch is in the stuck write, the second was pushed out by the third.
        assert results == [False]
    assert results == [False, False, False]


async def test_send_and_wait_returns_the_outcome(autojump_clock: trio.testing.MockClock) -> None:
    out = CollectingOutput(fail_times=2)
    async with running_pipeline([], [out]) as pipeline:
        assert await pipeline.sink().send_and_wait(make_batch(make_series(values=[1.5])))
        assert out.writes == 3  # two failures retried with backoff, then written
        assert out.values() == [1.5]


async def test_transforms_run_in_order_and_can_drop(autojump_clock: trio.testing.MockClock) -> None:
    class Scale(Transform):
        def apply(self, batch: Batch) -> Batch | None:
            for s in batch.series:
                s.values = [v * 10 for v in s.values]
            return batch

    class AddOne(Transform):
        def apply(self, batch: Batch) -> Batch | None:
            for s in batch.series:
                s.values = [v + 1 for v in s.values]
            return batch

    class DropNegative(Transform):
        def apply(self, batch: Batch) -> Batch | None:
            batch.series = [s for s in batch.series if s.values[0] >= 0]
            return batch if batch.series else None

    class Broken(Transform):
        def apply(self, batch: Batch) -> Batch | None:
            raise ValueError("boom")

    out = CollectingOutput()
    acks: list[bool] = []
    elements = [
        transform_element(t, n)
        for n, t in [("scale", Scale()), ("broken", Broken()), ("add", AddOne()), ("drop", DropNegative())]
    ]
    async with running_pipeline(elements, [out]) as pipeline:
        sink = pipeline.sink()
        await sink.send(make_batch(make_series(values=[1, 2])))
        await sink.send(make_batch(make_series(values=[-5])), acks.append)
    assert out.values() == [11, 21]
    assert acks == [True]  # dropped on purpose by a transform: nothing left to write, so it is done
    assert pipeline.transform_errors == 2


async def test_a_batch_identity_survives_transforms_that_return_a_new_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Rebuild(Transform):
        def apply(self, batch: Batch) -> Batch | None:
            return Batch(list(batch.series))

    out = CollectingOutput()
    identity = BatchIdentity("node-1", "stream-a", 7)
    async with running_pipeline([transform_element(Rebuild(), "rebuild")], [out]) as pipeline:
        batch = make_batch(make_series(values=[1.0]))
        batch.identity = identity
        await pipeline.sink().send(batch)
        await pipeline.sink().send(make_batch(make_series(values=[2.0])))
        await out.wait_for_points(2)
    assert [b.identity for b in out.batches] == [identity, None]


def test_a_batch_encoded_before_identities_existed_still_decodes() -> None:
    old = msgspec.msgpack.encode({"series": []})
    assert msgspec.msgpack.decode(old, type=Batch) == Batch([], None)
    with_identity = Batch([], BatchIdentity("node-1", "s", 3))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(with_identity), type=Batch) == with_identity


async def test_a_crashing_output_restarts_and_loses_nothing(autojump_clock: trio.testing.MockClock) -> None:
    class Flaky(Output):
        def __init__(self) -> None:
            self.runs = 0
            self.received: list[float] = []

        async def run(self, inbox, task_status=trio.TASK_STATUS_IGNORED) -> None:
            self.runs += 1
            task_status.started()
            while True:
                envs = await inbox.receive_batch()
                if not envs:
                    return
                if self.runs == 1:
                    raise RuntimeError("crashed while holding a batch")
                for env in envs:
                    self.received += [v for _, _, v, _ in env.batch.points()]
                    env.done(True)

    flaky = Flaky()
    async with running_pipeline([], [flaky]) as pipeline:
        await pipeline.sink().send(make_batch(make_series(values=[1, 2, 3])))
        await trio.sleep(5)
    assert flaky.runs == 2
    assert flaky.received == [1, 2, 3]


async def test_a_crashing_autonomous_source_restarts(autojump_clock: trio.testing.MockClock) -> None:
    class Crashy(AutonomousSource):
        def __init__(self) -> None:
            self.starts = 0

        async def run(self, sink: SourceSink, task_status=trio.TASK_STATUS_IGNORED) -> None:
            self.starts += 1
            task_status.started()
            await sink.send(make_batch(make_series(values=[self.starts])))
            if self.starts < 3:
                raise RuntimeError("lost my socket")
            await trio.sleep_forever()

    source = Crashy()
    out = CollectingOutput()
    async with running_pipeline([source_element(source)], [out]) as pipeline:
        await trio.sleep(30)
        assert pipeline.sources["test-source"].errors == 2
    assert out.values() == [1, 2, 3]


async def test_run_output_helper_counts() -> None:
    counters = await run_output(CollectingOutput(), [make_batch(make_series(values=[1, 2, 3]))])
    assert counters == {"received": 3, "written": 3, "dropped": 0, "queued": 0}


async def test_self_metrics_are_ordinary_points(autojump_clock: trio.testing.MockClock) -> None:
    out = CollectingOutput()
    elements = [source_element(CountingSource()), output_element(out, "out")]
    pipeline = Pipeline(elements, self_metrics_interval=10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        await trio.sleep(10.5)
        pipeline.stop()
    written = [
        (s.attributes, s.values[0])
        for b in out.batches
        for s in b.series
        if s.metric == "agent_output_points_received_total"
    ]
    assert written and written[0][0] == {"output": "out"} and written[0][1] >= 10


async def test_malformed_series_are_dropped_not_retried_forever(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out = CollectingOutput()
    bad = make_series("bad", values=[1, 2])
    bad.timestamps.pop()
    async with running_pipeline([], [out]) as pipeline:
        await pipeline.sink().send(make_batch(bad, make_series("good", values=[3])))
    assert out.values() == [3]
    assert pipeline.invalid_series == 1


async def test_first_polls_done_once_every_polled_source_polled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class SlowSource(CountingSource):
        async def poll(self, points: BatchBuilder, timestamp_ns: int) -> None:
            await trio.sleep(3.0)
            await super().poll(points, timestamp_ns)

    fast, slow = CountingSource(poll_interval=10.0), SlowSource(poll_interval=10.0)
    elements = [source_element(fast, "fast"), source_element(slow, "slow")]
    async with running_pipeline(elements) as pipeline:
        start = trio.current_time()
        await pipeline.first_polls_done.wait()
        # `agent exec` starts its command here: after the slow source's first poll, not before.
        assert trio.current_time() - start == 3.0
        assert (len(fast.polls), len(slow.polls)) == (1, 1)


async def test_a_failing_poll_is_logged_by_name_counted_and_polling_goes_on(
    autojump_clock: trio.testing.MockClock, caplog
) -> None:
    class Flaky(CountingSource):
        async def poll(self, points: BatchBuilder, timestamp_ns: int) -> None:
            await super().poll(points, timestamp_ns)
            if len(self.polls) in (2, 3):
                raise OSError("sensor unplugged")

    source = Flaky(poll_interval=1.0, flush_interval=1.0)
    out = CollectingOutput()
    async with running_pipeline([source_element(source, "sensors")], [out]) as pipeline:
        await trio.sleep(4.5)
    assert len(source.polls) == 5
    assert pipeline.sources["sensors"].errors == 2
    messages = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert messages == [
        "source sensors: poll failed (1 so far): sensor unplugged",
        "source sensors: poll failed (2 so far): sensor unplugged",
    ]
    # A poll that raised after adding its point keeps the point: it was measured.
    assert out.values() == [1, 2, 3, 4, 5]


async def test_a_crashing_output_is_logged_by_name_and_restarted_with_growing_delays(
    autojump_clock: trio.testing.MockClock, caplog
) -> None:
    class Crashy(Output):
        def __init__(self) -> None:
            self.starts: list[float] = []

        async def run(self, inbox, task_status=trio.TASK_STATUS_IGNORED) -> None:
            self.starts.append(trio.current_time())
            task_status.started()
            if len(self.starts) <= 4:
                raise ConnectionResetError("peer went away")
            while envs := await inbox.receive_batch():
                for env in envs:
                    env.done(True)

    crashy, healthy = Crashy(), CollectingOutput()
    elements = [output_element(crashy, "crashy"), output_element(healthy, "healthy")]
    pipeline = Pipeline(elements, restart_backoff=(1.0, 60.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        acks: list[bool] = []
        await pipeline.sink().send(make_batch(make_series(values=[1.0])), acks.append)
        await trio.sleep(0.1)
        # The other output is not held back while crashy crashes.
        assert healthy.values() == [1.0]
        await trio.sleep(30)
        pipeline.stop()
    assert acks == [True]  # crashy wrote the batch after its restarts
    gaps = [b - a for a, b in zip(crashy.starts, crashy.starts[1:], strict=False)]
    # Backoff 1 s doubling, with "equal jitter" (each delay in [d/2, d]).
    for gap, nominal in zip(gaps, [1, 2, 4, 8], strict=True):
        assert nominal / 2 <= gap <= nominal
    crashes = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(crashes) == 4
    assert all(m.startswith("output crashy failed: peer went away; restarting in") for m in crashes)


async def test_self_metrics_count_received_written_dropped_queued_per_output(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out = CollectingOutput()
    stuck = CollectingOutput(delay=10_000)
    elements = [
        output_element(out, "out"),
        output_element(stuck, "stuck", OutputConfig(queue_max_points=3)),
    ]
    pipeline = Pipeline(elements, self_metrics_interval=10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        for _ in range(5):
            await pipeline.sink().send(make_batch(make_series("m", [1.0, 2.0])))
        await trio.sleep(10.5)
        nursery.cancel_scope.cancel()
    reported = {
        (s.metric, s.attributes["output"]): s.values[0]
        for b in out.batches
        for s in b.series
        if s.metric.startswith("agent_output_")
    }
    assert reported == {
        ("agent_output_points_received_total", "out"): 10,
        ("agent_output_points_written_total", "out"): 10,
        ("agent_output_points_dropped_total", "out"): 0,
        ("agent_output_points_queued", "out"): 0,
        ("agent_output_write_failures_total", "out"): 0,
        # stuck holds one 2-point batch in its write; each new batch pushes the queued one out.
        ("agent_output_points_received_total", "stuck"): 10,
        ("agent_output_points_written_total", "stuck"): 0,
        ("agent_output_points_dropped_total", "stuck"): 6,
        ("agent_output_points_queued", "stuck"): 4,
        ("agent_output_write_failures_total", "stuck"): 0,
    }


async def test_stop_with_a_stuck_blocking_output_ends_within_the_grace_period(
    autojump_clock: trio.testing.MockClock, caplog
) -> None:
    # overflow = "block" and an output that never finishes: the dispatcher waits, the source channel
    # fills up, and the polled source waits to hand over its points. Stopping must still end.
    source = CountingSource(poll_interval=1.0, flush_interval=1.0)
    stuck = CollectingOutput(delay=10_000)
    elements = [
        source_element(source, "ticks"),
        output_element(stuck, "stuck", OutputConfig(queue_max_points=1, overflow="block")),
    ]
    pipeline = Pipeline(elements, source_channel_size=1)
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(pipeline.run, grace_period=2.0))
            await trio.sleep(10.5)
            assert len(source.polls) < 10  # held back by the full queue
            stopped_at = trio.current_time()
            pipeline.stop()
    assert trio.current_time() - stopped_at <= 2.0
    counters = pipeline.counters()["stuck"]
    assert counters["written"] == 0 and counters["queued"] == 0
    # What could not be written is said, for the source and for the output.
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "source ticks: 1 points not written: the grace period ran out at shutdown" in errors
    assert any(m.startswith("output stuck: ") and "the grace period ran out" in m for m in errors), errors
