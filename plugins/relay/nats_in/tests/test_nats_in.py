"""nats-in against the real NATS server (JetStream): a consumer group sharing the work, acks only after
the outputs wrote, naks and redelivery, a missing stream waited for, malformed messages dropped with
one log line. Each test uses its own stream, deleted afterwards."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

import nats
import pytest
import trio

from agent import Output
from agent.asyncio_bridge import AsyncioLoop, open_asyncio_loop
from agent.batch_codec import encode_batch
from agent.config import ConfigError, convert_section
from agent.model import BatchIdentity, MetricDef, MetricRegistry
from agent.plugin import StartContext
from agent.testing import (
    CollectingOutput,
    make_batch,
    make_series,
    require_service,
    running_pipeline,
    source_element,
    start_plugin,
)
from agent_plugins.relay.nats_in.plugin import NatsInPlugin
from agent_plugins.relay.nats_in.source import NatsIn

NATS_URL = "nats://127.0.0.1:4222"
POWER = MetricDef("power", "W", "float", "socket power")


@pytest.fixture
async def js_admin() -> AsyncIterator[tuple[AsyncioLoop, object, list[str]]]:
    require_service("NATS", "127.0.0.1", 4222)
    async with open_asyncio_loop("test") as aio:
        nc = await aio.run(nats.connect, NATS_URL)
        js = nc.jetstream()
        streams: list[str] = []
        try:
            yield aio, js, streams
        finally:
            with trio.CancelScope(shield=True):
                for name in streams:
                    try:
                        await aio.run(js.delete_stream, name)
                    except Exception:
                        pass
                await aio.run(nc.close)


async def make_stream(aio: AsyncioLoop, js, streams: list[str]) -> str:
    stream = f"T_IN_{uuid.uuid4().hex[:10]}"
    streams.append(stream)
    await aio.run(js.add_stream, name=stream, subjects=[f"{stream.lower()}.>"])
    return stream


async def publish_values(aio: AsyncioLoop, js, stream: str, values: list[float]) -> None:
    for i, value in enumerate(values):
        body = encode_batch(
            make_batch(make_series("power", [value])), {"power": POWER}, BatchIdentity("n", "s", i + 1)
        )
        await aio.run(js.publish, f"{stream.lower()}.n", body)


def nats_in(stream: str, registry: MetricRegistry | None = None, **table) -> NatsIn:
    config = convert_section(
        {"url": NATS_URL, "stream": stream, "consumer": "group", **table},
        NatsInPlugin.Config,
        "plugins.nats-in",
    )
    ctx = StartContext("nats-in", registry if registry is not None else MetricRegistry(), None)  # type: ignore[arg-type]
    NatsInPlugin().start(ctx, config)
    [element] = ctx.elements
    return element.obj


async def wait_until(condition, timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.02)


async def test_batches_arrive_with_their_stream_sequence_as_identity_and_are_acked_once_written(
    js_admin,
) -> None:
    aio, js, streams = js_admin
    stream = await make_stream(aio, js, streams)
    await publish_values(aio, js, stream, [1.0, 2.0, 3.0])
    registry = MetricRegistry()
    source = nats_in(stream, registry)
    output = CollectingOutput()
    async with running_pipeline([source_element(source)], [output]):
        await output.wait_for_points(3)
        await wait_until(lambda: source.counters.acked == 3)
    assert output.values("power") == [1.0, 2.0, 3.0]
    assert [b.identity for b in output.batches] == [BatchIdentity("nats", stream, i) for i in (1, 2, 3)]
    assert registry.get("power") == POWER
    info = await aio.run(js.consumer_info, stream, "group")
    assert info.num_ack_pending == 0 and info.num_pending == 0


class RefusingOutput(Output):
    """Settles the first `refuse` batches as not written (as an output that gave up on them), keeps the
    others."""

    def __init__(self, refuse: int) -> None:
        self.refuse = refuse
        self.values: list[float] = []

    async def run(self, inbox, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while envs := await inbox.receive_batch():
            for env in envs:
                if self.refuse > 0:
                    self.refuse -= 1
                    env.done(False)
                else:
                    self.values += [v for _, _, v, _ in env.batch.points()]
                    env.done(True)


async def test_a_batch_an_output_could_not_write_is_nakked_and_comes_again(js_admin) -> None:
    aio, js, streams = js_admin
    stream = await make_stream(aio, js, streams)
    await publish_values(aio, js, stream, [7.0])
    source = nats_in(stream, nak_delay="0.2s")
    output = RefusingOutput(refuse=1)
    async with running_pipeline([source_element(source)], [output]):
        await wait_until(lambda: source.counters.acked == 1)
    assert output.values == [7.0]
    assert source.counters.naked == 1 and source.counters.redelivered == 1


async def test_two_agents_of_one_consumer_share_the_work_and_a_killed_one_is_redelivered(js_admin) -> None:
    aio, js, streams = js_admin
    stream = await make_stream(aio, js, streams)
    values = [float(i) for i in range(40)]
    await publish_values(aio, js, stream, values)
    # The first agent takes batches but its output never finishes them (stuck), then it is killed.
    stuck_source = nats_in(stream, ack_wait="1s", max_ack_pending=1000, fetch_batch=5)
    stuck = CollectingOutput(delay=3600)
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def run_stuck() -> None:
            with scope:
                async with running_pipeline([source_element(stuck_source)], [stuck], grace_period=0.1):
                    await trio.sleep_forever()

        nursery.start_soon(run_stuck)
        await wait_until(lambda: stuck_source.counters.messages >= 5)
        scope.cancel()
    assert stuck.points == 0
    # The second agent of the same consumer gets everything, the first agent's batches redelivered.
    source = nats_in(stream, ack_wait="1s", fetch_batch=5)
    output = CollectingOutput()
    async with running_pipeline([source_element(source)], [output]):
        await wait_until(lambda: source.counters.acked >= 40)
    assert sorted(output.values()) == values
    assert source.counters.redelivered >= 1


async def test_a_missing_stream_is_waited_for_and_logged_once(js_admin, caplog) -> None:
    aio, js, streams = js_admin
    stream = f"T_LATE_{uuid.uuid4().hex[:10]}"
    streams.append(stream)
    source = nats_in(stream)
    output = CollectingOutput()
    with caplog.at_level(logging.WARNING):
        async with running_pipeline([source_element(source)], [output]):
            await wait_until(lambda: "does not exist" in caplog.text)
            await aio.run(js.add_stream, name=stream, subjects=[f"{stream.lower()}.>"])
            await publish_values(aio, js, stream, [5.0])
            await output.wait_for_points(1)
    assert caplog.text.count("does not exist") == 1


async def test_a_malformed_message_is_logged_with_where_it_was_and_dropped(js_admin, caplog) -> None:
    aio, js, streams = js_admin
    stream = await make_stream(aio, js, streams)
    await aio.run(js.publish, f"{stream.lower()}.x", b"\xc1 not msgpack")
    await publish_values(aio, js, stream, [9.0])
    source = nats_in(stream)
    output = CollectingOutput()
    with caplog.at_level(logging.WARNING):
        async with running_pipeline([source_element(source)], [output]):
            await output.wait_for_points(1)
            await wait_until(lambda: source.counters.malformed == 1)
    assert output.values() == [9.0]
    [line] = [r.getMessage() for r in caplog.records if "not a relay batch" in r.getMessage()]
    assert f"message 1 of stream {stream}" in line


def test_deliver_takes_all_new_a_sequence_or_a_time() -> None:
    for good in ("all", "new", 5, "2026-12-01T00:00:00Z"):
        start_plugin(NatsInPlugin, {"deliver": good})
    with pytest.raises(ConfigError, match="deliver"):
        start_plugin(NatsInPlugin, {"deliver": "yesterday"})
    with pytest.raises(ConfigError, match="consumer"):
        start_plugin(NatsInPlugin, {"consumer": "a.b"})
