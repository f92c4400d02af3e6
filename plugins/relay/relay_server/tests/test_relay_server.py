"""The relay server over real loopback sockets and over in-memory streams (MockClock for timeouts).

A test client speaks the protocol by hand (relay.protocol messages, our own framing) so that it can
also say what a real client never would.
"""

from __future__ import annotations

import logging
import re

import msgspec
import pytest
import trio
import trio.testing

from agent import StartupError
from agent.config import ConfigError, convert_section
from agent.model import LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, BatchIdentity, MetricDef, MetricRegistry
from agent.pipeline import Pipeline
from agent.plugin import StartContext
from agent.testing import CollectingOutput, output_element, partial_run, source_element
from agent_plugins.relay.protocol import (
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
from agent_plugins.relay.relay_server.plugin import RelayServerConfig, RelayServerPlugin
from agent_plugins.relay.relay_server.server import RelayServer, ServerSettings

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
        await self.send(
            Hello(kwargs.pop("version", PROTOCOL_VERSION), name, stream_id, "test", kwargs.pop("token", None))
        )
        return await self.receive()


def wire_series(metric_id: int, values: list[float], attributes: dict | None = None) -> WireSeries:
    return WireSeries(
        metric_id,
        LOCAL_MACHINE,
        LOCAL_MACHINE_CONSUMER,
        dict(attributes or {}),
        [T0 + i for i in range(len(values))],
        list(values),
    )


CPU = MetricDef("cpu_percent", "%", "float", "CPU use")


async def start_server(
    nursery: trio.Nursery, settings: ServerSettings | None = None, output=None, registry=None
):
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
            # Outputs that deduplicate recognise a resent batch by (client name, stream id, seq).
            assert [b.identity for b in output.batches] == [
                BatchIdentity("node-1", "stream-1", 1),
                BatchIdentity("node-1", "stream-1", 2),
            ]
            await client.stream.aclose()
            pipeline.stop()


def leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for e in group.exceptions for leaf in leaves(e)]
    return [group]


async def acked_through(client: RawClient, seq: int) -> list:
    """Reads until an ack covers `seq`; returns the other messages seen."""
    others = []
    while True:
        message = await client.receive()
        assert message is not None, f"connection closed before the ack of {seq}; saw {others}"
        if isinstance(message, Ack) and message.seq >= seq:
            return others
        if not isinstance(message, Ack):
            others.append(message)


async def test_a_conflicting_definition_is_renamed_and_logged_once(caplog) -> None:
    registry = MetricRegistry()
    registry.register(MetricDef("power", "W", "float"))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server, output, pipeline = await start_server(nursery, registry=registry)
            client = await RawClient.connect(server.bound_addresses[0])
            await client.hello("node-9")
            kilowatts = MetricDef("power", "kW", "float", "measured in kW")
            await client.send(MetricDefs({3: kilowatts}), BatchMessage(1, [wire_series(3, [1.5])]))
            await acked_through(client, 1)
            await client.stream.aclose()
            # Same definition again from a new session: renamed the same way, not logged again.
            client = await RawClient.connect(server.bound_addresses[0])
            await client.hello("node-9", stream_id="stream-2")
            await client.send(MetricDefs({0: kilowatts}), BatchMessage(1, [wire_series(0, [2.5])]))
            await acked_through(client, 1)
            await client.stream.aclose()
            pipeline.stop()
    assert output.values("power_relay-client-node-9") == [1.5, 2.5]
    assert registry.get("power_relay-client-node-9") == MetricDef(
        "power_relay-client-node-9", "kW", "float", "measured in kW"
    )
    renames = [r.getMessage() for r in caplog.records if "conflicts with" in r.getMessage()]
    assert len(renames) == 1 and "'power'" in renames[0] and "node-9" in renames[0]


async def test_two_live_connections_with_one_client_name_log_a_warning(caplog) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server, output, pipeline = await start_server(nursery)
            first = await RawClient.connect(server.bound_addresses[0])
            assert isinstance(await first.hello("twin", stream_id="a"), Accept)
            second = await RawClient.connect(server.bound_addresses[0])
            assert isinstance(await second.hello("twin", stream_id="b"), Accept)
            await first.stream.aclose()
            await second.stream.aclose()
            pipeline.stop()
    assert any("two live connections use the client name 'twin'" in r.getMessage() for r in caplog.records)


async def test_a_new_connection_of_the_same_stream_takes_over_and_resent_batches_are_not_written_twice() -> (
    None
):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server, output, pipeline = await start_server(nursery)
            old = await RawClient.connect(server.bound_addresses[0])
            await old.hello("node-1", stream_id="s")
            await old.send(
                MetricDefs({0: CPU}),
                BatchMessage(1, [wire_series(0, [1.0])]),
                BatchMessage(2, [wire_series(0, [2.0])]),
            )
            await acked_through(old, 2)
            # The same stream reconnects (the old connection is half-open): it is told what was written.
            new = await RawClient.connect(server.bound_addresses[0])
            accept = await new.hello("node-1", stream_id="s")
            assert (accept.acked_seq, accept.received_seq) == (2, 2)
            bye = await old.receive()
            assert isinstance(bye, Goodbye) and bye.code == "superseded"
            # A client that did not see the ack resends 2; only 3 is new.
            await new.send(
                MetricDefs({0: CPU}),
                BatchMessage(2, [wire_series(0, [2.0])]),
                BatchMessage(3, [wire_series(0, [3.0])]),
            )
            await acked_through(new, 3)
            await new.stream.aclose()
            pipeline.stop()
    assert output.values("cpu_percent") == [1.0, 2.0, 3.0]
    assert server.counters.duplicate_batches == 1


async def test_a_wrong_protocol_version_is_rejected_with_both_versions(caplog) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server, _, pipeline = await start_server(nursery)
            client = await RawClient.connect(server.bound_addresses[0])
            reject = await client.hello("old-node", version=99)
            assert isinstance(reject, Reject) and reject.code == "version"
            assert reject.protocol_version == PROTOCOL_VERSION
            assert "client speaks 99" in reject.reason
            assert await client.receive() is None  # then the server closes
            pipeline.stop()
    [line] = [r.getMessage() for r in caplog.records if "rejected (version)" in r.getMessage()]
    assert "127.0.0.1:" in line and "old-node" in line and "protocol version 99 is not supported" in line


@pytest.mark.parametrize("token", [None, "wrong"])
async def test_a_missing_or_wrong_token_is_rejected(caplog, token) -> None:
    settings = ServerSettings(address="127.0.0.1:0", token="s3cret", client_tokens=(("special", "other"),))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server, _, pipeline = await start_server(nursery, settings)
            client = await RawClient.connect(server.bound_addresses[0])
            reject = await client.hello("node-1", token=token)
            assert isinstance(reject, Reject) and (reject.code, reject.reason) == (
                "auth",
                "authentication failed",
            )
            good = await RawClient.connect(server.bound_addresses[0])
            assert isinstance(await good.hello("node-1", token="s3cret"), Accept)
            special = await RawClient.connect(server.bound_addresses[0])
            assert isinstance(await special.hello("special", token="s3cret"), Reject)  # its own token only
            for c in (client, good, special):
                await c.stream.aclose()
            pipeline.stop()
    expected = "missing token" if token is None else "wrong token"
    assert any(f"(node-1) rejected (auth): {expected}" in r.getMessage() for r in caplog.records)


async def test_bad_clients_are_disconnected_with_a_reason_and_others_go_on(caplog) -> None:
    settings = ServerSettings(address="127.0.0.1:0", max_frame_size=4096)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server, output, pipeline = await start_server(nursery, settings)
            address = server.bound_addresses[0]
            good = await RawClient.connect(address)
            await good.hello("good")
            await good.send(MetricDefs({0: CPU}))

            async def bad(name: str, payload: bytes, hello: bool = True) -> object:
                client = await RawClient.connect(address)
                if hello:
                    assert isinstance(await client.hello(name, stream_id=name), Accept)
                await client.stream.send_all(payload)
                answers = []
                while (message := await client.receive()) is not None:
                    answers.append(message)
                return answers

            garbage = await bad("garbage", b"\x00\x00\x00\x05hello")
            assert [type(m) for m in garbage] == [Goodbye] and garbage[0].code == "protocol_error"
            huge = await bad("huge", (10**6).to_bytes(4, "big"))
            assert "exceeds the maximum frame size of 4096 bytes" in huge[0].reason
            unknown_tag = msgspec.msgpack.encode(["launch", 1])
            unknown = await bad("unknown", len(unknown_tag).to_bytes(4, "big") + unknown_tag)
            assert "unexpected message type 'launch'" in unknown[0].reason
            undefined = await bad(
                "undefined", bytes(FrameEncoder().encode(BatchMessage(1, [wire_series(7, [1.0])])))
            )
            assert "metric id 7 was not defined in this session" in undefined[0].reason
            first_not_hello = await bad("nohello", bytes(FrameEncoder().encode(MetricDefs({}))), hello=False)
            assert isinstance(first_not_hello[0], Reject) and first_not_hello[0].code == "invalid"

            # A batch with columns of different lengths is refused, and the stream goes on.
            broken = wire_series(0, [1.0, 2.0])
            broken.values.pop()
            await good.send(BatchMessage(1, [broken]), BatchMessage(2, [wire_series(0, [5.0])]))
            others = await acked_through(good, 2)
            assert [type(m) for m in others] == [Refused] and "1 values for 2 timestamps" in others[0].reason
            await good.stream.aclose()
            pipeline.stop()
    assert output.values("cpu_percent") == [5.0]
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    for name, reason in [
        ("garbage", "protocol error"),
        ("huge", "exceeds the maximum frame size"),
        ("unknown", "unexpected message type"),
        ("undefined", "was not defined"),
    ]:
        assert any(
            f"({name}) disconnected: " in line and reason in line and "127.0.0.1:" in line for line in lines
        ), name
    assert any("rejected (invalid): the first message must be 'hello', got 'defs'" in line for line in lines)


async def test_a_stalled_handshake_is_closed_after_the_timeout(autojump_clock, caplog) -> None:
    server = RelayServer(ServerSettings(handshake_timeout=10.0), MetricRegistry())
    client_end, server_end = trio.testing.memory_stream_pair()
    pipeline = Pipeline([output_element(CollectingOutput(), "out")])
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial_run(pipeline, 5.0))
            start = trio.current_time()
            await client_end.send_all(b"\x00\x00")  # half a frame header, then nothing
            await server.handle_connection(server_end, "10.0.0.7:4242", pipeline.sink())
            assert trio.current_time() - start == pytest.approx(10.0)
            assert await client_end.receive_some() == b""  # closed
            pipeline.stop()
    assert any(
        "10.0.0.7:4242 disconnected: no hello within the handshake timeout of 10s (2 bytes of a frame received)"
        in r.getMessage()
        for r in caplog.records
    )


async def test_many_connections_that_never_say_hello_make_a_few_lines_that_count_them(caplog) -> None:
    settings = ServerSettings(address="127.0.0.1:0", handshake_timeout=0.2)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server, _, pipeline = await start_server(nursery, settings)
            host, port = server.bound_addresses[0].rsplit(":", 1)
            idle = [await trio.open_tcp_stream(host, int(port)) for _ in range(200)]
            while server.counters.rejected < 200:
                await trio.sleep(0.01)
            pipeline.stop()
    for stream in idle:
        await stream.aclose()
    lines = [
        r.getMessage() for r in caplog.records if "no hello within the handshake timeout" in r.getMessage()
    ]
    assert 2 <= len(lines) <= 3, lines
    # The first at once, naming its peer; the others counted (the last at shutdown at the latest).
    assert re.match(r"relay-server: client 127\.0\.0\.1:\d+ disconnected: no hello within", lines[0])
    counted = [int(m.group(1)) for line in lines if (m := re.search(r"\(and (\d+) more since", line))]
    assert len(lines) + sum(counted) == 200


async def test_a_silent_client_is_dropped_after_three_heartbeat_intervals(autojump_clock, caplog) -> None:
    server = RelayServer(ServerSettings(heartbeat_interval=5.0), MetricRegistry())
    client_end, server_end = trio.testing.memory_stream_pair()
    client = RawClient(client_end)
    pipeline = Pipeline([output_element(CollectingOutput(), "out")])
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial_run(pipeline, 5.0))
            nursery.start_soon(server.handle_connection, server_end, "10.0.0.8:1", pipeline.sink())
            assert isinstance(await client.hello("quiet"), Accept)
            start = trio.current_time()
            seen = []
            while (message := await client.receive()) is not None:
                seen.append((trio.current_time() - start, type(message).__name__))
            # Heartbeats every 5 s while it says nothing, then a timeout goodbye after 15 s.
            assert seen == [(5.0, "Heartbeat"), (10.0, "Heartbeat"), (15.0, "Goodbye")]
            pipeline.stop()
    assert any("(quiet) disconnected: nothing received for 15s" in r.getMessage() for r in caplog.records)


async def test_a_batch_an_output_dropped_is_not_acknowledged_and_the_client_is_asked_to_resend(
    caplog,
) -> None:
    from agent.plugin import Output

    class DropsTheFirst(Output):
        def __init__(self) -> None:
            self.values: list[float] = []
            self.dropped = 0

        async def run(self, inbox, task_status=trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            while envelopes := await inbox.receive_batch():
                for env in envelopes:
                    if self.dropped == 0:
                        self.dropped += 1
                        env.done(False)
                    else:
                        self.values += [v for s in env.batch.series for v in s.values]
                        env.done(True)

    output = DropsTheFirst()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server, _, pipeline = await start_server(nursery, output=output)
            client = await RawClient.connect(server.bound_addresses[0])
            await client.hello("node-1", stream_id="s")
            await client.send(
                MetricDefs({0: CPU}),
                BatchMessage(1, [wire_series(0, [1.0])]),
                BatchMessage(2, [wire_series(0, [2.0])]),
            )
            messages = []
            while (message := await client.receive()) is not None:
                messages.append(message)
            assert isinstance(messages[-1], Goodbye) and messages[-1].code == "resend"
            assert all(not isinstance(m, Ack) or m.seq == 0 for m in messages)
            # The client resends from what the accept says; batch 2 was written already.
            client = await RawClient.connect(server.bound_addresses[0])
            accept = await client.hello("node-1", stream_id="s")
            assert accept.acked_seq == 0
            await client.send(
                MetricDefs({0: CPU}),
                BatchMessage(1, [wire_series(0, [1.0])]),
                BatchMessage(2, [wire_series(0, [2.0])]),
            )
            await acked_through(client, 2)
            await client.stream.aclose()
            pipeline.stop()
    assert sorted(output.values) == [1.0, 2.0]
    assert any(
        "an output could not write batch 1 of client 'node-1'" in r.getMessage() for r in caplog.records
    )


async def test_at_shutdown_the_server_acknowledges_what_it_took_and_says_goodbye() -> None:
    slow = CollectingOutput(delay=0.3)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server, _, pipeline = await start_server(nursery, output=slow)
            client = await RawClient.connect(server.bound_addresses[0])
            await client.hello("node-1")
            await client.send(MetricDefs({0: CPU}), BatchMessage(1, [wire_series(0, [1.0])]))
            while server.counters.batches < 1:
                await trio.sleep(0.01)
            pipeline.stop()  # while the output is still writing batch 1
            messages = []
            while (message := await client.receive()) is not None:
                messages.append(message)
    assert [type(m) for m in messages][-2:] == [Ack, Goodbye]
    assert messages[-2].seq == 1 and messages[-1].code == "shutdown"
    assert slow.values() == [1.0]


async def test_a_busy_address_is_a_startup_error_naming_it() -> None:

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server, _, pipeline = await start_server(nursery)
            taken = server.bound_addresses[0]
            other = RelayServer(ServerSettings(address=taken), MetricRegistry())
            with pytest.raises(BaseExceptionGroup) as raised:
                await Pipeline([source_element(other, "relay-server")]).run()
            [error] = leaves(raised.value)
            assert (
                str(error)
                == f"source relay-server could not start: cannot listen on {taken}: Address already in use"
            )
            pipeline.stop()


async def test_a_thousand_clients_at_once() -> None:
    count = 1000
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server, output, pipeline = await start_server(nursery)
            address = server.bound_addresses[0]
            all_acked = trio.Event()
            acked = 0
            most_connections = 0

            async def one_client(i: int) -> None:
                nonlocal acked, most_connections
                client = await RawClient.connect(address)
                assert isinstance(await client.hello(f"node-{i}", stream_id="s"), Accept)
                await client.send(MetricDefs({0: CPU}), BatchMessage(1, [wire_series(0, [float(i)])]))
                await acked_through(client, 1)
                acked += 1
                most_connections = max(most_connections, len(server.connections))
                if acked == count:
                    all_acked.set()
                await all_acked.wait()  # every connection stays open until all are served
                await client.stream.aclose()

            async with trio.open_nursery() as clients:
                for i in range(count):
                    clients.start_soon(one_client, i)
            assert most_connections == count
            pipeline.stop()
    names = {s.attributes["relay_client"] for b in output.batches for s in b.series}
    assert len(names) == count and sorted(output.values()) == [float(i) for i in range(count)]


async def test_fuzzed_frames_never_disturb_a_good_client() -> None:
    """Random bytes and mutated valid frames, each on its own connection, while a good client keeps
    delivering: the server answers or closes each bad connection, and every good point arrives once."""
    import random

    rng = random.Random(20240611)
    encoder = FrameEncoder()
    valid = [
        bytes(encoder.encode(Hello(1, "fuzz", "fz", "test", None))),
        bytes(encoder.encode(MetricDefs({0: CPU, 1: MetricDef("x", "J", "int", "")}))),
        bytes(encoder.encode(BatchMessage(1, [wire_series(0, [1.0, 2.0], {"a": 1}), wire_series(1, [3])]))),
        bytes(encoder.encode(Goodbye("shutdown", "bye"))),
    ]

    def mutated() -> bytes:
        stream = bytearray(b"".join(valid[: rng.randint(1, len(valid))]))
        kind = rng.randrange(5)
        if kind == 0:
            return rng.randbytes(rng.randint(1, 300))
        if kind == 1:
            for _ in range(rng.randint(1, 8)):
                stream[rng.randrange(len(stream))] = rng.randrange(256)
        elif kind == 2:
            del stream[rng.randrange(len(stream)) :]
        elif kind == 3:
            position = rng.randrange(len(stream))
            stream[position:position] = rng.randbytes(rng.randint(1, 20))
        else:
            stream[0:4] = rng.randrange(2**32).to_bytes(4, "big")
        return bytes(stream)

    settings = ServerSettings(
        address="127.0.0.1:0", handshake_timeout=1.0, heartbeat_interval=0.5, max_frame_size=65536
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server, output, pipeline = await start_server(nursery, settings)
            address = server.bound_addresses[0]

            async def fuzz_one(payload: bytes) -> None:
                client = await RawClient.connect(address)
                try:
                    await client.stream.send_all(payload)
                    await client.stream.send_eof()
                    while await client.stream.receive_some(65536):
                        pass
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                await client.stream.aclose()

            async def good_client() -> None:
                client = await RawClient.connect(address)
                await client.hello("good", stream_id="good")
                await client.send(MetricDefs({0: CPU}))
                for seq in range(1, 51):
                    await client.send(BatchMessage(seq, [wire_series(0, [float(seq)])]))
                    await acked_through(client, seq)
                await client.stream.aclose()

            limiter = trio.CapacityLimiter(20)

            async def limited(payload: bytes) -> None:
                async with limiter:
                    await fuzz_one(payload)

            async with trio.open_nursery() as clients:
                clients.start_soon(good_client)
                for _ in range(300):
                    clients.start_soon(limited, mutated())
            with trio.fail_after(5):
                while server.connections:
                    await trio.sleep(0.05)
            pipeline.stop()
    good = [
        v
        for b in output.batches
        for s in b.series
        if s.attributes["relay_client"] == "good"
        for v in s.values
    ]
    assert good == [float(seq) for seq in range(1, 51)]


# A bad value of each key: the one-line error names the key (see BAD_CLIENT_VALUES in the client's
# tests for the two accepted forms).
BAD_SERVER_VALUES = [
    ({"address": "[nope]:1"}, "address", "'[nope]:1': 'nope' in brackets is not an IPv6 address"),
    ({"address": "host:port"}, "address", "port 'port' is not a number"),
    ({"max_frame_size": "100"}, "max_frame_size", "must be between 1KiB and 4GiB, got 100 bytes"),
    ({"handshake_timeout": "soon"}, "handshake_timeout", 'expected a duration like "30s"'),
    ({"heartbeat_interval": "0s"}, "heartbeat_interval", "must be positive, got 0s"),
    ({"max_connections": 0}, "max_connections", "expected int >= 1"),
    ({"max_in_flight": -1}, "max_in_flight", "expected int >= 1"),
    ({"client_tokens": "abc"}, "client_tokens", "expected object, got str"),
    ({"tls_cert": "/x.pem"}, "tls_key", "tls_cert and tls_key go together"),
    ({"tls_client_ca": "/ca.pem"}, "tls_client_ca", "client certificates need TLS"),
    ({"adress": "[::]:1"}, "adress", "unknown key"),
]


@pytest.mark.parametrize(("table", "key", "problem"), BAD_SERVER_VALUES)
def test_a_bad_value_is_a_config_error_naming_its_key(table, key, problem) -> None:
    with pytest.raises(ConfigError) as caught:
        convert_section(table, RelayServerConfig, "plugins.relay-server")
    message = str(caught.value)
    assert "\n" not in message
    assert re.match(rf"plugins\.relay-server(\.|: ){key}: ", message), message
    assert problem in message


def test_tls_files_the_server_cannot_use_are_startup_errors_naming_them(tmp_path, caplog) -> None:
    not_a_certificate = tmp_path / "bad.pem"
    not_a_certificate.write_text("not a certificate")
    ctx = StartContext("relay-server", MetricRegistry(), tmp_path, None)
    for config, expected in [
        (
            RelayServerConfig(tls_cert="/missing.pem", tls_key="/missing.pem"),
            "tls_cert '/missing.pem': No such file",
        ),
        (
            RelayServerConfig(tls_cert=str(tmp_path), tls_key="/k.pem"),
            f"tls_cert '{tmp_path}': Is a directory",
        ),
        (
            RelayServerConfig(tls_cert=str(not_a_certificate), tls_key=str(not_a_certificate)),
            "cannot load the certificate and key",
        ),
    ]:
        with pytest.raises(StartupError, match=re.escape(expected)):
            RelayServerPlugin().start(ctx, config)
    assert ctx.elements == []
    RelayServerPlugin().start(ctx, RelayServerConfig(token="t"))
    assert any("token authentication without TLS" in r.getMessage() for r in caplog.records)
    [element] = ctx.elements
    assert element.obj.settings.address == "[::]:50051" and element.obj.settings.shutdown_timeout == 5.0
