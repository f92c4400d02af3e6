"""The relay client against a scripted server over in-memory streams (MockClock: timers and backoff)
and against the real relay server over loopback."""

from __future__ import annotations

import trio
import trio.testing

from agent.pipeline import Pipeline
from agent.testing import make_batch, make_series, output_element, partial_run
from agent_plugins.relay_client.client import ClientSettings, RelayClient
from agent_plugins.relay_client.store import BatchStore
from agent_plugins.relay_protocol import (
    PROTOCOL_VERSION,
    Accept,
    Ack,
    BatchMessage,
    ClientMessage,
    FrameDecoder,
    FrameEncoder,
    Hello,
    MetricDefs,
)


class ScriptedServer:
    """Accepts every connection the client makes (over memory streams), records what it receives with
    the (mock) time, and acknowledges batches when `auto_ack` is set."""

    def __init__(self, nursery: trio.Nursery, *, auto_ack: bool = True) -> None:
        self.nursery = nursery
        self.auto_ack = auto_ack
        self.received: list[tuple[float, object]] = []
        self.hellos: list[Hello] = []
        self.acked = 0
        self.changed = trio.Event()

    async def connect(self) -> trio.abc.Stream:
        client_end, server_end = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.serve, server_end)
        return client_end

    async def serve(self, stream: trio.abc.Stream) -> None:
        decoder = FrameDecoder(ClientMessage)
        encoder = FrameEncoder()
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                for message in decoder.feed(data):
                    self.received.append((trio.current_time(), message))
                    if isinstance(message, Hello):
                        self.hellos.append(message)
                        await stream.send_all(
                            encoder.encode(Accept(PROTOCOL_VERSION, "test", "s", self.acked, self.acked, 1 << 24, 64, 3_600_000))
                        )
                    elif isinstance(message, BatchMessage) and self.auto_ack:
                        self.acked = message.seq
                        await stream.send_all(encoder.encode(Ack(message.seq)))
                    self.changed.set()
                    self.changed = trio.Event()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    def batches(self) -> list[BatchMessage]:
        return [m for _, m in self.received if isinstance(m, BatchMessage)]

    async def wait_for(self, predicate) -> None:
        while not predicate():
            await self.changed.wait()


def settings(**overrides) -> ClientSettings:
    return ClientSettings(**{"client_name": "node-1", "relay_server": "relay.invalid:50051", **overrides})


async def test_buffer_timeout_flushes_by_timer_without_new_points(autojump_clock) -> None:
    async with trio.open_nursery() as nursery:
        server = ScriptedServer(nursery)
        client = RelayClient(
            settings(buffer_timeout=30.0, buffer_max_length=4096),
            lambda: BatchStore.open_memory(max_bytes=1 << 24),
            connect=server.connect,
        )
        pipeline = Pipeline([output_element(client, "relay-client")])
        await nursery.start(partial_run(pipeline, 5.0))
        start = trio.current_time()
        await pipeline.sink().send(make_batch(make_series("m", [1.0])))
        await server.wait_for(lambda: server.batches())
        [(at, batch)] = [(t, m) for t, m in server.received if isinstance(m, BatchMessage)]
        # Sent by the timer, 30 s after the point came, though no other point arrived.
        assert at - start == 30.0
        assert batch.series[0].values == [1.0]
        defs = [m for _, m in server.received if isinstance(m, MetricDefs)]
        assert defs and defs[0].definitions[0].name == "m"
        pipeline.stop()
