"""amqp-in against the real RabbitMQ (127.0.0.1:5672, guest/guest): lines in, bad lines counted as
graphite-in counts them, acknowledgement after the write, requeue of what an output could not write,
and a declaration mismatch as a start error. Every test uses its own exchange and queue, deleted after."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
import trio

from agent import Output, StartupError
from agent.asyncio_bridge import AsyncioLoop, open_asyncio_loop
from agent.config import ConfigError
from agent.testing import CollectingOutput, require_service, running_pipeline, source_element, start_plugin
from agent_plugins.graphite.amqp_in.plugin import AmqpInPlugin
from agent_plugins.graphite.amqp_in.source import AmqpInput, redact

URL = "amqp://guest:guest@127.0.0.1:5672/"


class Broker:
    """The test's own connection, to publish and to clean up."""

    def __init__(self, aio: AsyncioLoop, connection, channel) -> None:
        self.aio = aio
        self.connection = connection
        self.channel = channel
        self.exchange = f"t_ex_{uuid.uuid4().hex[:10]}"
        self.queue = f"t_q_{uuid.uuid4().hex[:10]}"

    async def publish(self, *bodies: bytes, routing_key: str = "carbon.x") -> None:
        async def send() -> None:
            exchange = await self.channel.get_exchange(self.exchange)
            for body in bodies:
                await exchange.publish(aio_pika.Message(body), routing_key=routing_key)

        await self.aio.run(send)

    async def queue_depth(self) -> int:
        async def depth() -> int:
            queue = await self.channel.declare_queue(self.queue, passive=True)
            return queue.declaration_result.message_count

        return await self.aio.run(depth)


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    async with open_asyncio_loop("test") as aio:
        connection = await aio.run(aio_pika.connect, URL)
        channel = await aio.run(connection.channel)
        b = Broker(aio, connection, channel)
        try:
            yield b
        finally:
            with trio.CancelScope(shield=True):

                async def cleanup() -> None:
                    ch = await connection.channel()
                    for coro in (ch.queue_delete(b.queue), ch.exchange_delete(b.exchange)):
                        try:
                            await coro
                        except Exception:
                            pass
                    await connection.close()

                await aio.run(cleanup)


def source_for(broker: Broker, **table) -> AmqpInput:
    ctx = start_plugin(
        AmqpInPlugin, {"url": URL, "exchange": broker.exchange, "queue": broker.queue, **table}
    )
    [element] = ctx.elements
    return element.obj


def leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]


async def wait_until(condition, timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.02)


async def test_lines_arrive_and_messages_are_acknowledged_after_the_write(broker: Broker) -> None:
    source = source_for(broker)
    output = CollectingOutput()
    async with running_pipeline([source_element(source)], [output]):
        await wait_until(source.consuming.is_set)
        await broker.publish(b"a.b 1 1700000000\na.c 2 1700000000", b"x.y;dc=eu 3 1700000001\n")
        await output.wait_for_points(3)
        await wait_until(lambda: source.counters.acked == 2)
    assert sorted(output.values()) == [1.0, 2.0, 3.0]
    names = sorted(n for b in output.batches for n, _, _, _ in b.points())
    assert names == ["a.b", "a.c", "x.y;dc=eu"]
    assert await broker.queue_depth() == 0


async def test_bad_lines_are_counted_by_reason_and_logged_and_the_good_ones_kept(
    broker: Broker, caplog
) -> None:
    source = source_for(broker)
    output = CollectingOutput()
    with caplog.at_level(logging.WARNING):
        async with running_pipeline([source_element(source)], [output]):
            await wait_until(source.consuming.is_set)
            await broker.publish(b"good 1 1700000000\nbad line\nworse x 1700000000\n", b"only garbage\n")
            await output.wait_for_points(1)
            await wait_until(lambda: source.counters.acked == 2)
    assert output.values() == [1.0]
    assert source.counters.bad == {"field_count": 2, "bad_value": 1}
    assert [r.reason.split(":")[0] for r in source.recent_bad_lines.snapshot()][:2] == [
        "field_count",
        "bad_value",
    ]
    assert "dropped 2 bad lines" in caplog.text and broker.queue in caplog.text


class RefusingOutput(Output):
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


async def test_a_message_an_output_could_not_write_is_requeued_and_delivered_again(broker: Broker) -> None:
    source = source_for(broker)
    output = RefusingOutput(refuse=1)
    async with running_pipeline([source_element(source)], [output]):
        await wait_until(source.consuming.is_set)
        await broker.publish(b"a 5 1700000000\n")
        await wait_until(lambda: source.counters.acked == 1)
    assert output.values == [5.0]
    assert source.counters.requeued == 1


async def test_an_exchange_with_other_settings_is_a_start_error_naming_the_difference(broker: Broker) -> None:
    await broker.aio.run(broker.channel.declare_exchange, broker.exchange, aio_pika.ExchangeType.DIRECT)
    source = source_for(broker)
    errors: list[BaseException] = []
    try:
        async with running_pipeline([source_element(source)], [CollectingOutput()]):
            pass
    except* StartupError as group:
        errors += leaves(group)
    [error] = errors
    text = str(error)
    assert f"exchange {broker.exchange!r}" in text and "type" in text and "topic" in text


async def test_declaring_what_exists_with_the_same_settings_is_harmless(broker: Broker) -> None:
    first = source_for(broker)
    second = source_for(broker)
    out = CollectingOutput()
    async with running_pipeline([source_element(first, "a"), source_element(second, "b")], [out]):
        await wait_until(lambda: first.consuming.is_set() and second.consuming.is_set())
        await broker.publish(*(f"m {i} 1700000000\n".encode() for i in range(20)))
        await out.wait_for_points(20)
    # One queue shared: each message went to one of the two.
    assert sorted(out.values()) == [float(i) for i in range(20)]


def test_config_errors_and_redaction() -> None:
    with pytest.raises(ConfigError, match="url"):
        start_plugin(AmqpInPlugin, {"url": "http://x"})
    with pytest.raises(ConfigError, match="prefetch_count"):
        start_plugin(AmqpInPlugin, {"prefetch_count": 0})
    assert redact("amqp://guest:secret@h:5672/") == "amqp://guest:***@h:5672/"
