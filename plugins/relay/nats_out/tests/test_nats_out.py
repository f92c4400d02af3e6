"""nats-out against the real NATS server (JetStream): stream creation, publish acks completing the
batches, message ids that let JetStream drop duplicates, and the disk buffer across a restart and an
outage. Each test uses its own stream, deleted afterwards."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import nats
import pytest
import trio

from agent.asyncio_bridge import AsyncioLoop, open_asyncio_loop
from agent.batch_codec import decode_batch
from agent.config import ConfigError
from agent.model import BatchIdentity, MetricDef, MetricRegistry
from agent.pipeline import Pipeline
from agent.testing import make_batch, make_series, output_element, partial_run, require_service, start_plugin
from agent_plugins.relay.nats_out.output import NatsOut
from agent_plugins.relay.nats_out.plugin import NatsOutPlugin

NATS_URL = "nats://127.0.0.1:4222"


@pytest.fixture
def nats_server() -> None:
    require_service("NATS", "127.0.0.1", 4222)


@pytest.fixture
async def js_admin(nats_server) -> AsyncIterator[tuple[AsyncioLoop, object, list[str]]]:
    """A nats-py JetStream context for the test's own checks; streams listed in the third item are
    deleted at the end."""
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


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


async def read_stream(aio: AsyncioLoop, js, stream: str, count: int) -> list:
    """Every message of the stream, through an ephemeral pull consumer."""
    from nats.js.api import ConsumerConfig

    sub = await aio.run(js.pull_subscribe, "", stream=stream, config=ConsumerConfig(inactive_threshold=30))
    out = []
    with trio.fail_after(10):
        while len(out) < count:
            try:
                msgs = await aio.run(sub.fetch, count - len(out), 1.0)
            except nats.errors.TimeoutError:
                continue
            out.extend(msgs)
    return out


def start_output(
    tmp_path: Path, stream: str, registry: MetricRegistry | None = None, **table
) -> tuple[NatsOutPlugin, NatsOut]:
    plugin = NatsOutPlugin()
    from agent.config import convert_section
    from agent.plugin import StartContext

    config = convert_section(
        {
            "url": NATS_URL,
            "stream": stream,
            "subject": f"{stream.lower()}.{{client}}",
            "agent_name": "node-a",
            **table,
        },
        NatsOutPlugin.Config,
        "plugins.nats-out",
    )
    ctx = StartContext("nats-out", registry if registry is not None else MetricRegistry(), tmp_path)
    plugin.start(ctx, config)
    [element] = ctx.elements
    return plugin, element.obj


async def test_batches_complete_on_the_publish_ack_with_their_identity_as_message_id(
    tmp_path, js_admin
) -> None:
    aio, js, streams = js_admin
    stream = unique("T_OUT")
    streams.append(stream)
    registry = MetricRegistry()
    registry.register(MetricDef("power", "W", "float", "socket power"))
    plugin, output = start_output(tmp_path, stream, registry)
    relayed = make_batch(make_series("power", [1.0, 2.0], attributes={"relay_client": "node-7"}))
    relayed.identity = BatchIdentity("node-7", "s1", 3)
    local = make_batch(make_series("power", [3.0]))
    pipeline = Pipeline([output_element(output, "nats-out")])
    acks: list[bool] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(partial_run(pipeline, 10.0))
        sink = pipeline.sink()
        assert await sink.send_and_wait(relayed)
        await sink.send(local, acks.append)
        await sink.send(relayed)  # the same batch again (a relay client resending): dropped by JetStream
        with trio.fail_after(10):
            while output.published < 3:
                await trio.sleep(0.01)
        pipeline.stop()
    plugin.stop()
    assert acks == [True]
    assert output.duplicates == 1

    info = await aio.run(js.stream_info, stream)
    assert info.config.subjects == [f"{stream.lower()}.>"]
    assert info.state.messages == 2
    messages = await read_stream(aio, js, stream, 2)
    assert [m.subject for m in messages] == [f"{stream.lower()}.node-7", f"{stream.lower()}.node-a"]
    assert messages[0].headers["Nats-Msg-Id"] == "node-7/s1/3"
    assert messages[1].headers["Nats-Msg-Id"] == f"node-a/{output.start_id}/1"
    published, batch = decode_batch(messages[0].data)
    assert published.metrics == [MetricDef("power", "W", "float", "socket power")]
    assert (published.origin, published.stream, published.seq) == ("node-7", "s1", 3)
    assert [list(s.values) for s in batch.series] == [[1.0, 2.0]]


async def test_batches_wait_in_the_disk_buffer_while_nats_is_unreachable_and_survive_a_restart(
    tmp_path, js_admin
) -> None:
    aio, js, streams = js_admin
    stream = unique("T_OUTAGE")
    streams.append(stream)
    # First run: NATS "unreachable" (a closed port): the batches stay in the disk buffer.
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    plugin, output = start_output(tmp_path, stream, url=f"nats://127.0.0.1:{dead_port}")
    pipeline = Pipeline([output_element(output, "nats-out")])
    with trio.move_on_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial_run(pipeline, 0.5))
            sink = pipeline.sink()
            for i in range(5):
                await sink.send(make_batch(make_series("m", [float(i)])))
            with trio.fail_after(10):
                while output.buffer.last_seq < 5:
                    await trio.sleep(0.01)
            pipeline.stop()
    assert output.published == 0
    plugin.stop()

    # Second run, NATS reachable: what the first run buffered goes out, in order.
    plugin, output = start_output(tmp_path, stream)
    assert output.buffer.pending_records == 5
    pipeline = Pipeline([output_element(output, "nats-out")])
    async with trio.open_nursery() as nursery:
        await nursery.start(partial_run(pipeline, 10.0))
        with trio.fail_after(10):
            while output.published < 5:
                await trio.sleep(0.01)
        pipeline.stop()
    plugin.stop()
    messages = await read_stream(aio, js, stream, 5)
    values = [decode_batch(m.data)[1].series[0].values[0] for m in messages]
    assert values == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_config_errors_name_the_key(tmp_path) -> None:
    with pytest.raises(ConfigError, match="subject"):
        start_plugin(NatsOutPlugin, {"subject": "agent.{node}"}, data_dir=tmp_path)
    with pytest.raises(ConfigError, match="stream"):
        start_plugin(NatsOutPlugin, {"stream": "a.b"}, data_dir=tmp_path)
    with pytest.raises(ConfigError, match="url"):
        start_plugin(NatsOutPlugin, {"url": "http://x"}, data_dir=tmp_path)


def test_an_unreadable_credentials_file_is_a_startup_error_naming_it(tmp_path) -> None:
    from agent import StartupError

    with pytest.raises(StartupError, match="credentials .*missing.creds"):
        start_plugin(NatsOutPlugin, {"credentials": str(tmp_path / "missing.creds")}, data_dir=tmp_path)


def test_the_record_format_is_msgpack() -> None:
    from agent_plugins.relay.nats_out.output import OutRecord

    assert msgspec.msgpack.decode(msgspec.msgpack.encode(OutRecord("s", "id", b"x"))) == ["s", "id", b"x"]
