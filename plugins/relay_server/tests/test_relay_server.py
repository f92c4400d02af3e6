"""The relay server over real loopback sockets and over in-memory streams (MockClock for timeouts).

A test client speaks the protocol by hand (relay_protocol messages, our own framing) so that it can
also say what a real client never would.
"""

from __future__ import annotations

import logging

import msgspec
import pytest
import trio
import trio.testing

from agent.model import MetricDef, MetricRegistry
from agent.pipeline import Pipeline
from agent.testing import CollectingOutput, output_element, partial_run, source_element
from agent_plugins.relay_protocol import (
    PROTOCOL_VERSION,
    Accept,
    Ack,
    BatchMessage,
    FrameDecoder,
    FrameEncoder,
    Goodbye,
    Hello,
    MetricDefs,
    Refused,
    Reject,
    ServerMessage,
    WireSeries,
)
from agent.model import LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER
from agent_plugins.relay_server.server import RelayServer, ServerSettings

T0 = 1_700_000_000_000_000_000


class RawClient:
    """A hand-driven relay client over any trio stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.encoder = FrameEncoder()
        self.decoder = FrameDecoder(ServerMessage)

    @classmethod
    async def connect(cls, address: str) -> RawClient:
        host, port = address.rsplit(":", 1)
        return cls(await trio.open_tcp_stream(host.strip("[]"), int(port)))

    async def send(self, *messages) -> None:
        await self.stream.send_all(b"".join(bytes(self.encoder.encode(m)) for m in messages))

    async def receive(self):
        while True:
            for message in self.decoder.feed(b""):
                return message
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            for message in self.decoder.feed(data):
                return message

    async def hello(self, name: str = "node-1", stream_id: str = "stream-1", **kwargs) -> Accept | Reject:
        await self.send(Hello(kwargs.pop("version", PROTOCOL_VERSION), name, stream_id, "test", kwargs.pop("token", None)))
        return await self.receive()


def wire_series(metric_id: int, values: list[float], attributes: dict | None = None) -> WireSeries:
    return WireSeries(
        metric_id, LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, dict(attributes or {}),
        [T0 + i for i in range(len(values))], list(values),
    )


CPU = MetricDef("cpu_percent", "%", "float", "CPU use")


async def start_server(nursery: trio.Nursery, settings: ServerSettings | None = None, output=None, registry=None):
    server = RelayServer(settings or ServerSettings(address="127.0.0.1:0"), registry or MetricRegistry())
    output = output or CollectingOutput()
    pipeline = Pipeline([source_element(server, "relay-server"), output_element(output, "out")])
    await nursery.start(partial_run(pipeline, 5.0))
    return server, output, pipeline


async def test_points_arrive_with_the_client_name_and_are_acknowledged() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server, output, pipeline = await start_server(nursery)
            client = await RawClient.connect(server.bound_addresses[0])
            accept = await client.hello("node-1")
            assert isinstance(accept, Accept) and accept.acked_seq == 0 and accept.received_seq == 0
            await client.send(
                MetricDefs({0: CPU}),
                BatchMessage(1, [wire_series(0, [1.0, 2.0], {"core": 0})]),
                BatchMessage(2, [wire_series(0, [3.0])]),
            )
            acked = 0
            while acked < 2:
                message = await client.receive()
                if isinstance(message, Ack):
                    acked = message.seq
            assert output.values("cpu_percent") == [1.0, 2.0, 3.0]
            assert [s.attributes for b in output.batches for s in b.series] == [
                {"core": 0, "relay_client": "node-1"},
                {"relay_client": "node-1"},
            ]
            assert server.registry.get("cpu_percent") == CPU
            await client.stream.aclose()
            pipeline.stop()
