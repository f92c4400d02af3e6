"""Sources that start paused and sources added while the agent runs (Alumet PR #233 and its
create_one/add_source), driven from a plugin's event listener as a plugin would."""

from __future__ import annotations

import trio

from agent import LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, BatchBuilder, Consumer, EventBus, PolledSource
from agent.model import MetricRegistry
from agent.pipeline import Pipeline
from agent.plugin import StartContext
from agent.testing import CollectingOutput, output_element, partial_run


class Counter(PolledSource):
    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.poll_interval = 0.05
        self.flush_interval = 0.05
        self.polls = 0
        self.closed = False

    async def poll(self, points: BatchBuilder, timestamp_ns: int) -> None:
        self.polls += 1
        points.add(self.metric, self.polls, timestamp_ns, LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER)

    async def close(self) -> None:
        self.closed = True


async def wait_until(predicate) -> None:
    with trio.fail_after(10):
        while not predicate():
            await trio.sleep(0.01)


async def test_a_paused_source_waits_for_an_event_and_new_sources_come_and_go(tmp_path) -> None:
    events = EventBus()
    ctx = StartContext("per-consumer", MetricRegistry(), tmp_path, events=events)
    machine = Counter("machine_polls")
    ctx.add_source(machine, "machine", paused=True)
    per_consumer: dict[str, Counter] = {}

    def on_event(event) -> None:
        # What a plugin does: the machine source runs once there is a consumer; one source per consumer.
        name = f"process-{event.consumer.id}"
        if event.kind == "consumer_started":
            ctx.pipeline.resume("machine")
            per_consumer[name] = Counter(f"polls_of_{event.consumer.id}")
            ctx.pipeline.add_source(per_consumer[name], name)
        else:
            ctx.pipeline.remove_source(name)

    ctx.subscribe(on_event)
    out = CollectingOutput()
    pipeline = Pipeline(ctx.elements + [output_element(out)])
    ctx.pipeline.bind(pipeline)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial_run(pipeline, 5.0))
        # A paused source is not waited for: the pipeline counts as having polled.
        await pipeline.first_polls_done.wait()
        await trio.sleep(0.2)
        assert machine.polls == 0 and out.points == 0
        events.consumer_started(Consumer("process", "42"))
        await wait_until(lambda: len(out.values("polls_of_42")) >= 2 and out.values("machine_polls"))
        assert pipeline.sources["per-consumer/process-42"].element.obj is per_consumer["process-42"]
        events.consumer_ended(Consumer("process", "42"))
        await wait_until(lambda: per_consumer["process-42"].closed)
        stopped_at = per_consumer["process-42"].polls
        await trio.sleep(0.2)
        assert per_consumer["process-42"].polls == stopped_at
        assert len(out.values("polls_of_42")) == stopped_at  # what it held was handed over
        pipeline.stop()
    assert machine.closed


async def test_calls_before_the_pipeline_exists_apply_when_it_is_bound(tmp_path) -> None:
    ctx = StartContext("early", MetricRegistry(), tmp_path)
    early = Counter("early_polls")
    ctx.pipeline.add_source(early, "early")  # before the pipeline is built: kept, then started with it
    out = CollectingOutput()
    pipeline = Pipeline(ctx.elements + [output_element(out)])
    ctx.pipeline.bind(pipeline)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial_run(pipeline, 5.0))
        await pipeline.first_polls_done.wait()
        await wait_until(lambda: out.values("early_polls"))
        pipeline.stop()
