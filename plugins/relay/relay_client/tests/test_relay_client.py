"""The relay client against a scripted server over in-memory streams (MockClock: timers and backoff)
and against the real relay server over loopback (TLS with trustme certificates)."""

from __future__ import annotations

import functools
import logging
import re
import socket
import ssl
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing
import trustme

from agent import StartupError
from agent.config import ConfigError, convert_section
from agent.model import MetricDef, MetricRegistry
from agent.pipeline import Pipeline
from agent.plugin import StartContext
from agent.testing import (
    CollectingOutput,
    make_batch,
    make_series,
    output_element,
    partial_run,
    source_element,
)
from agent_plugins.relay.protocol import (
    PROTOCOL_VERSION,
    Accept,
    Ack,
    BatchMessage,
    ClientMessage,
    FrameDecoder,
    FrameEncoder,
    Hello,
    MetricDefs,
    Reject,
    batch_from_wire,
)
from agent_plugins.relay.relay_client.client import ClientSettings, RelayClient
from agent_plugins.relay.relay_client.plugin import (
    RelayClientConfig,
    RelayClientPlugin,
    build_client_ssl_context,
)
from agent_plugins.relay.relay_client.records import encode_records
from agent_plugins.relay.relay_client.store import BatchStore, DiskBuffer, MemoryBuffer
from agent_plugins.relay.relay_server.security import build_server_ssl_context
from agent_plugins.relay.relay_server.server import RelayServer, ServerSettings


class ScriptedServer:
    """Accepts every connection the client makes (over memory streams), records what it receives with
    the (mock) time, and acknowledges batches when `auto_ack` is set."""

    def __init__(self, nursery: trio.Nursery, *, auto_ack: bool = True) -> None:
        self.nursery = nursery
        self.auto_ack = auto_ack
        self.received: list[tuple[float, object]] = []
        self.hellos: list[Hello] = []
        #: What the server has written of each stream; `preset_acked` for the first stream it sees.
        self.acked: dict[str, int] = {}
        self.preset_acked = 0
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
                        stream_id = message.stream_id
                        acked = self.acked.setdefault(stream_id, self.preset_acked)
                        self.preset_acked = 0  # for the first stream only
                        await stream.send_all(
                            encoder.encode(
                                Accept(PROTOCOL_VERSION, "test", "s", acked, acked, 1 << 24, 64, 3_600_000)
                            )
                        )
                    elif isinstance(message, BatchMessage) and self.auto_ack:
                        self.acked[stream_id] = message.seq
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


def guarded(seconds: float):
    """A `trio.fail_after` guard around a whole test (virtual seconds under the mock clock)."""

    def wrap(test):
        @functools.wraps(test)
        async def guarded_test(*args, **kwargs):
            with trio.fail_after(seconds):
                return await test(*args, **kwargs)

        return guarded_test

    return wrap


def settings(**overrides) -> ClientSettings:
    return ClientSettings(**{"client_name": "node-1", "relay_server": "relay.invalid:50051", **overrides})


@guarded(3600)
async def test_buffer_timeout_flushes_by_timer_without_new_points(autojump_clock) -> None:
    async with trio.open_nursery() as nursery:
        server = ScriptedServer(nursery)
        client = RelayClient(
            settings(buffer_timeout=30.0, buffer_max_length=4096),
            MemoryBuffer(1 << 24),
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


# -- helpers for tests against the real server --


async def start_server(nursery, settings: ServerSettings | None = None, ssl_context=None, output=None):
    server = RelayServer(settings or ServerSettings(address="127.0.0.1:0"), MetricRegistry(), ssl_context)
    output = output or CollectingOutput()
    pipeline = Pipeline([source_element(server, "relay-server"), output_element(output, "out")])
    await nursery.start(partial_run(pipeline, 5.0))
    return server, output, pipeline


async def start_client(nursery, client: RelayClient) -> Pipeline:
    pipeline = Pipeline([output_element(client, "relay-client")])
    await nursery.start(partial_run(pipeline, 5.0))
    return pipeline


def disk_store(path: Path) -> DiskBuffer:
    return DiskBuffer(path, 1 << 26)


def memory_store() -> MemoryBuffer:
    return MemoryBuffer(1 << 24)


# -- batching and backoff under the mock clock --


@guarded(3600)
async def test_a_full_buffer_is_sent_at_once(autojump_clock) -> None:
    async with trio.open_nursery() as nursery:
        server = ScriptedServer(nursery)
        client = RelayClient(
            settings(buffer_timeout=30.0, buffer_max_length=3), memory_store(), connect=server.connect
        )
        pipeline = await start_client(nursery, client)
        start = trio.current_time()
        await pipeline.sink().send(make_batch(make_series("m", [1.0, 2.0, 3.0])))
        await server.wait_for(lambda: server.batches())
        assert [t - start for t, m in server.received if isinstance(m, BatchMessage)] == [0.0]
        pipeline.stop()


@guarded(3600)
async def test_reconnection_delays_follow_the_config_and_an_outage_is_logged(autojump_clock, caplog) -> None:
    attempts: list[float] = []

    async def refuse() -> trio.abc.Stream:
        attempts.append(trio.current_time())
        raise ConnectionRefusedError(111, "Connection refused")

    client = RelayClient(
        settings(initial_delay=0.1, max_delay=10.0, max_times=3), memory_store(), connect=refuse
    )
    delays: list[float] = []
    client.on_retry_delay = delays.append
    async with trio.open_nursery() as nursery:
        await start_client(nursery, client)
        while len(attempts) < 7:
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    # Doubling from initial_delay, each drawn in [d/2, d]; after max_times failures, max_delay (jittered).
    for delay, (low, high) in zip(
        delays, [(0.05, 0.1), (0.1, 0.2), (0.2, 0.4), (5, 10), (5, 10), (5, 10)], strict=False
    ):
        assert low <= delay <= high
    # The clock agrees: each attempt came after the announced delay.
    assert [round(b - a, 6) for a, b in zip(attempts, attempts[1:], strict=False)] == [
        round(d, 6) for d in delays[:6]
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert [w for w in warnings if "cannot reach relay.invalid:50051: Connection refused" in w] == [
        w for w in warnings if "attempt" in w
    ] and len([w for w in warnings if "attempt" in w]) == 2
    [outage] = errors
    assert "outage: relay.invalid:50051 unreachable" in outage and "3 attempts" in outage
    assert "retrying every 10s" in outage and "buffered in memory" in outage


@guarded(3600)
async def test_a_version_reject_is_logged_with_both_versions_and_retried_at_max_delay(
    autojump_clock, caplog
) -> None:
    attempts: list[float] = []

    async def rejecting_server() -> trio.abc.Stream:
        attempts.append(trio.current_time())
        client_end, server_end = trio.testing.memory_stream_pair()

        async def answer() -> None:
            await server_end.receive_some()
            await server_end.send_all(FrameEncoder().encode(Reject("version", "we only speak 7", 7, "9.0.0")))
            await server_end.aclose()

        nursery.start_soon(answer)
        return client_end

    client = RelayClient(settings(initial_delay=0.5, max_delay=4.0), memory_store(), connect=rejecting_server)
    async with trio.open_nursery() as nursery:
        await start_client(nursery, client)
        while len(attempts) < 4:
            await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert all(2.0 <= b - a <= 4.0 for a, b in zip(attempts, attempts[1:], strict=False))
    [line] = [
        r.getMessage() for r in caplog.records if r.levelno == logging.ERROR
    ]  # logged once, not per retry
    assert (
        "rejected our protocol version: the server speaks protocol 7 (agent 9.0.0), we speak protocol 1"
        in line
    )
    assert "retrying every 4s" in line


@guarded(3600)
async def test_a_server_that_never_answers_the_hello_is_left_after_the_handshake_timeout(
    autojump_clock, caplog
) -> None:
    attempts: list[float] = []

    async def silent_server() -> trio.abc.Stream:
        attempts.append(trio.current_time())
        client_end, server_end = trio.testing.memory_stream_pair()

        async def swallow() -> None:
            while await server_end.receive_some():
                pass

        nursery.start_soon(swallow)
        return client_end

    client = RelayClient(
        settings(handshake_timeout=10.0, initial_delay=1.0, max_delay=1.0),
        memory_store(),
        connect=silent_server,
    )
    async with trio.open_nursery() as nursery:
        await start_client(nursery, client)
        while len(attempts) < 3:
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    # Each attempt waits 10 s for the server's answer, then the retry delay, in [0.5, 1] s: no hang.
    assert all(10.5 <= b - a <= 11.0 for a, b in zip(attempts, attempts[1:], strict=False))
    assert any(
        "cannot reach relay.invalid:50051: no answer to our hello within the handshake timeout of 10s"
        in r.getMessage()
        for r in caplog.records
    )


@guarded(3600)
async def test_resumes_after_what_the_server_acknowledged(autojump_clock) -> None:
    online = False

    async with trio.open_nursery() as nursery:
        server = ScriptedServer(nursery)
        server.preset_acked = 2  # the server wrote batches 1 and 2; their acks were lost

        async def connect() -> trio.abc.Stream:
            if not online:
                raise OSError("network is down")
            return await server.connect()

        client = RelayClient(
            settings(buffer_timeout=0.1, buffer_max_length=1), memory_store(), connect=connect
        )
        pipeline = await start_client(nursery, client)
        for value in (1.0, 2.0, 3.0):
            await pipeline.sink().send(make_batch(make_series("m", [value])))
        while client.counters.records_appended < 3:
            await trio.sleep(0.1)
        online = True
        await server.wait_for(lambda: server.batches())
        assert [(b.seq, b.series[0].values) for b in server.batches()] == [(3, [3.0])]
        pipeline.stop()


@guarded(3600)
async def test_numbering_that_went_backwards_moves_the_buffer_to_a_new_stream(autojump_clock, caplog) -> None:
    await numbering_went_backwards()
    assert any(
        "moving the" in r.getMessage() and "to the new stream" in r.getMessage() for r in caplog.records
    )


async def numbering_went_backwards() -> None:
    async with trio.open_nursery() as nursery:
        server = ScriptedServer(nursery)
        server.preset_acked = (
            40  # the server has seen batch 40 of this stream: more than the client ever numbered
        )
        client = RelayClient(settings(buffer_timeout=0.1), memory_store(), connect=server.connect)
        pipeline = await start_client(nursery, client)
        await pipeline.sink().send(make_batch(make_series("m", [1.0])))
        await server.wait_for(lambda: len(server.hellos) >= 2 and server.batches())
        assert server.hellos[0].stream_id != server.hellos[1].stream_id
        assert server.batches()[0].seq == 1
        pipeline.stop()


@guarded(3600)
async def test_with_the_memory_buffer_points_are_acknowledged_only_when_the_server_acknowledges(
    autojump_clock,
) -> None:
    async with trio.open_nursery() as nursery:
        server = ScriptedServer(nursery, auto_ack=False)
        client = RelayClient(settings(buffer_timeout=0.1), memory_store(), connect=server.connect)
        pipeline = await start_client(nursery, client)
        outcome: list[bool] = []
        await pipeline.sink().send(make_batch(make_series("m", [1.0])), outcome.append)
        await server.wait_for(lambda: server.batches())
        await trio.sleep(10)
        assert outcome == []  # sent, not yet acknowledged by the server
        server.auto_ack = True
        await pipeline.sink().send(make_batch(make_series("m", [2.0])), outcome.append)
        while len(outcome) < 2:
            await trio.sleep(0.1)
        assert outcome == [True, True]  # the ack of batch 2 covers batch 1 too
        pipeline.stop()


# -- against the real server over loopback --


async def test_the_disk_buffer_outlives_the_client_and_delivers_after_a_restart(tmp_path) -> None:
    registry = MetricRegistry()
    registry.register(MetricDef("energy", "J", "int", "energy counter"))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            # First life: the server is not there; points go to the disk buffer, then the agent stops.
            client = RelayClient(
                settings(relay_server="127.0.0.1:1", buffer_timeout=0.05, initial_delay=0.05, max_delay=0.1),
                disk_store(tmp_path),
                registry=registry,
            )
            pipeline = await start_client(nursery, client)
            await pipeline.sink().send(make_batch(make_series("energy", [1, 2, 3])))
            await pipeline.sink().send(make_batch(make_series("energy", [4])))
            while client.counters.points_buffered < 4:
                await trio.sleep(0.01)
            pipeline.stop()  # does not wait for an unreachable server
        async with trio.open_nursery() as nursery:
            server, output, server_pipeline = await start_server(nursery)
            # Second life, another registry: the metric definitions come from the buffer's own table.
            client = RelayClient(settings(relay_server=server.bound_addresses[0]), disk_store(tmp_path))
            pipeline = await start_client(nursery, client)
            await output.wait_for_points(4)
            pipeline.stop()
            server_pipeline.stop()
    assert output.values("energy") == [1, 2, 3, 4]
    assert server.registry.get("energy") == MetricDef("energy", "J", "int", "energy counter")


async def test_a_wrong_token_is_refused_with_clear_messages_on_both_sides(caplog) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server, output, server_pipeline = await start_server(
                nursery, ServerSettings(address="127.0.0.1:0", token="right")
            )
            client = RelayClient(
                settings(relay_server=server.bound_addresses[0], token="wrong"), memory_store()
            )
            await start_client(nursery, client)
            while server.counters.rejected < 1:
                await trio.sleep(0.01)
            good = RelayClient(
                settings(
                    client_name="good",
                    relay_server=server.bound_addresses[0],
                    token="right",
                    buffer_timeout=0.01,
                ),
                memory_store(),
            )
            good_pipeline = await start_client(nursery, good)
            await good_pipeline.sink().send(make_batch(make_series("m", [1.0])))
            await output.wait_for_points(1)
            nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        "relay-client: 127.0.0.1:" in line and "rejected us (auth): authentication failed" in line
        for line in lines
    )
    assert any("(node-1) rejected (auth): wrong token" in line for line in lines)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA with a server certificate for 127.0.0.1, a client certificate for node-7, and a second CA
    whose client certificate the server must refuse."""
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    other_ca = trustme.CA()
    files = {}
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    files["ca"] = directory / "ca.pem"
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(directory / "server.pem"))
    files["server"] = directory / "server.pem"
    for name, issuer in (("client", ca), ("stranger", other_ca)):
        cert = issuer.issue_cert("node-7", common_name="node-7")
        cert.cert_chain_pems[0].write_to_path(str(directory / f"{name}.crt"))
        cert.private_key_pem.write_to_path(str(directory / f"{name}.key"))
        files[name] = (directory / f"{name}.crt", directory / f"{name}.key")
    other_ca.cert_pem.write_to_path(str(directory / "other-ca.pem"))
    files["other_ca"] = directory / "other-ca.pem"
    return files


def client_tls(pki, *, cert: str | None = "client", ca: str = "ca") -> ssl.SSLContext:
    config = RelayClientConfig(
        tls=True,
        tls_ca=str(pki[ca]),
        tls_cert=str(pki[cert][0]) if cert else "",
        tls_key=str(pki[cert][1]) if cert else "",
    )
    return build_client_ssl_context(config)


async def test_mutual_tls_delivers_and_the_certificate_names_the_client(pki) -> None:
    server_tls = build_server_ssl_context(str(pki["server"]), str(pki["server"]), str(pki["ca"]))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server, output, server_pipeline = await start_server(nursery, ssl_context=server_tls)
            # client_name "" with a certificate: the server takes the certificate's common name.
            client = RelayClient(
                settings(client_name="", relay_server=server.bound_addresses[0], buffer_timeout=0.01),
                memory_store(),
                ssl_context=client_tls(pki),
            )
            pipeline = await start_client(nursery, client)
            await pipeline.sink().send(make_batch(make_series("m", [1.0])))
            await output.wait_for_points(1)
            pipeline.stop()
            server_pipeline.stop()
    assert output.batches[0].series[0].attributes == {"relay_client": "node-7"}


async def test_a_certificate_from_another_ca_is_refused(pki, caplog) -> None:
    server_tls = build_server_ssl_context(str(pki["server"]), str(pki["server"]), str(pki["ca"]))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server, output, server_pipeline = await start_server(nursery, ssl_context=server_tls)
            stranger = RelayClient(
                settings(relay_server=server.bound_addresses[0], initial_delay=5, max_delay=5),
                memory_store(),
                ssl_context=client_tls(pki, cert="stranger"),
            )
            await start_client(nursery, stranger)
            while not any("TLS handshake failed" in r.getMessage() for r in caplog.records):
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    [line] = [r.getMessage() for r in caplog.records if "TLS handshake failed" in r.getMessage()]
    assert line.startswith("relay-server: client 127.0.0.1:") and "CERTIFICATE_VERIFY_FAILED" in line
    assert output.points == 0


async def test_a_name_the_certificate_does_not_carry_is_refused(pki, caplog) -> None:
    server_tls = build_server_ssl_context(str(pki["server"]), str(pki["server"]), str(pki["ca"]))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server, _, _ = await start_server(nursery, ssl_context=server_tls)
            impostor = RelayClient(
                settings(
                    client_name="node-8", relay_server=server.bound_addresses[0], initial_delay=5, max_delay=5
                ),
                memory_store(),
                ssl_context=client_tls(pki),
            )
            await start_client(nursery, impostor)
            while server.counters.rejected < 1:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert any(
        "(node-8) rejected (auth): client name 'node-8' is not in its certificate (names: node-7)"
        in r.getMessage()
        for r in caplog.records
    )


async def test_a_server_certificate_the_client_does_not_trust_is_refused(pki, caplog) -> None:
    server_tls = build_server_ssl_context(str(pki["server"]), str(pki["server"]), "")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server, _, _ = await start_server(nursery, ssl_context=server_tls)
            client = RelayClient(
                settings(relay_server=server.bound_addresses[0], initial_delay=5, max_delay=5),
                memory_store(),
                ssl_context=client_tls(pki, cert=None, ca="other_ca"),
            )
            await start_client(nursery, client)
            while not any("not trusted" in r.getMessage() for r in caplog.records):
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert any(
        "cannot reach 127.0.0.1:" in r.getMessage()
        and "TLS: the server's certificate is not trusted" in r.getMessage()
        for r in caplog.records
    )


# -- the store, the records, the plugin --


def test_the_store_keeps_its_stream_and_metric_table_while_batches_are_pending(tmp_path) -> None:
    registry = MetricRegistry()
    registry.register(MetricDef("a", "W", "float", "power"))
    store = BatchStore.open_disk(tmp_path, max_bytes=1 << 20)
    stream_id = store.stream_id
    assert store.assign_ids([make_series("a"), make_series("b", [1])], registry)
    assert not store.assign_ids([make_series("a")], registry)
    store.save()
    store.log.append(b"frame")
    store.close()
    again = BatchStore.open_disk(tmp_path, max_bytes=1 << 20)
    assert again.stream_id == stream_id
    assert again.metrics == [MetricDef("a", "W", "float", "power"), MetricDef("b", "1", "int", "")]
    again.log.commit(again.log.last_seq)
    again.close()
    # Nothing pending: same stream (the numbering goes on), the table starts afresh.
    third = BatchStore.open_disk(tmp_path, max_bytes=1 << 20)
    assert third.stream_id == stream_id and third.metrics == []
    third.close()


def test_a_lost_metric_table_drops_the_batches_that_need_it(tmp_path, caplog) -> None:
    store = BatchStore.open_disk(tmp_path, max_bytes=1 << 20)
    store.log.append(b"frame")
    old = store.stream_id
    store.close()
    (tmp_path / "stream.msgpack").unlink()
    again = BatchStore.open_disk(tmp_path, max_bytes=1 << 20)
    assert again.log.pending_records == 0 and again.stream_id != old
    again.close()
    assert any("the 1 batches in the disk buffer cannot be sent" in r.getMessage() for r in caplog.records)


def test_large_batches_are_split_into_frames_that_fit() -> None:
    series = [
        make_series(f"m{i % 3}", [float(j) for j in range(500)], attributes={"i": i}) for i in range(20)
    ]
    ids = {"m0": 0, "m1": 1, "m2": 2}
    encoder = FrameEncoder(max_frame_size=4096)
    encoded = encode_records(encoder, series, ids, first_seq=7)
    assert len(encoded.frames) > 5 and encoded.dropped_points == 0
    decoder = FrameDecoder(ClientMessage, max_frame_size=4096)
    messages = [m for frame in encoded.frames for m in decoder.feed(frame)]
    assert [m.seq for m in messages] == list(range(7, 7 + len(encoded.frames)))
    names = {0: "m0", 1: "m1", 2: "m2"}
    points = [
        (s.metric, s.attributes["i"], t, v)
        for m in messages
        for s in batch_from_wire(m, names).series
        for t, v in zip(s.timestamps, s.values, strict=True)
    ]
    assert points == [
        (s.metric, s.attributes["i"], t, v)
        for s in series
        for t, v in zip(s.timestamps, s.values, strict=True)
    ]


# A bad value of each key: the one-line error names the key. Type errors come from msgspec with the key's
# path (`plugins.relay-client.retry.max_times: ...`); range checks of durations and sizes say "KEY: ..."
# after the table's path, which the config loader may fold into the path: both forms are accepted.
BAD_CLIENT_VALUES = [
    ({"client_name": 5}, "client_name", "expected str, got int"),
    ({"relay_server": "host:x"}, "relay_server", "'host:x': port 'x' is not a number"),
    ({"relay_server": "::1:50051"}, "relay_server", "put an IPv6 address in brackets"),
    ({"relay_server": ""}, "relay_server", 'expected an address like "127.0.0.1:50051"'),
    ({"buffer_max_length": 0}, "buffer_max_length", "expected int >= 1"),
    ({"buffer_max_length": "many"}, "buffer_max_length", "expected int, got str"),
    ({"buffer_timeout": "soon"}, "buffer_timeout", 'expected a duration like "30s"'),
    ({"buffer_timeout": -1}, "buffer_timeout", "must not be negative, got -1s"),
    ({"retry": {"max_times": -1}}, "retry.max_times", "expected int >= 1"),
    ({"retry": {"max_times": "x"}}, "retry.max_times", "expected int, got str"),
    ({"retry": {"initial_delay": "fast"}}, "retry.initial_delay", 'expected a duration like "30s"'),
    ({"retry": {"initial_delay": -2}}, "retry.initial_delay", "must not be negative, got -2s"),
    ({"retry": {"initial_delay": "5s", "max_delay": "1s"}}, "retry.max_delay", "at least initial_delay (5s)"),
    ({"retry": {"initial_delay": "0s", "max_delay": "0s"}}, "retry.max_delay", "must be positive, got 0s"),
    ({"retry": {"max_tims": 3}}, "retry.max_tims", "unknown key"),
    ({"disk_buffer_max_size": "big"}, "disk_buffer_max_size", 'expected a size like "64MiB"'),
    ({"disk_buffer_max_size": "1KiB"}, "disk_buffer_max_size", "must be at least max_frame_size"),
    ({"disk_buffer_fsync": "sometimes"}, "disk_buffer_fsync", "expected one of: always, interval, never"),
    ({"max_in_flight": 0}, "max_in_flight", "expected int >= 1"),
    ({"max_frame_size": "10"}, "max_frame_size", "must be between 1KiB and 4GiB, got 10 bytes"),
    ({"handshake_timeout": "0s"}, "handshake_timeout", "must be positive, got 0s"),
    ({"tls": True, "tls_cert": "c.pem"}, "tls_key", "tls_cert and tls_key go together"),
    ({"tls_ca": "ca.pem"}, "tls_ca", "needs tls = true"),
]


@pytest.mark.parametrize(("table", "key", "problem"), BAD_CLIENT_VALUES)
def test_a_bad_value_is_a_config_error_naming_its_key(table, key, problem) -> None:
    with pytest.raises(ConfigError) as caught:
        convert_section(table, RelayClientConfig, "plugins.relay-client")
    message = str(caught.value)
    assert "\n" not in message
    *table_path, name = ["plugins", "relay-client", *key.split(".")]
    assert re.match(rf"{re.escape('.'.join(table_path))}(\.|: ){name}: ", message), message
    assert problem in message


def test_files_the_plugin_cannot_use_are_startup_errors_naming_them(tmp_path) -> None:
    not_a_certificate = tmp_path / "bad.pem"
    not_a_certificate.write_text("not a certificate")
    for config, expected in [
        (RelayClientConfig(tls=True, tls_ca="/nonexistent.pem"), "tls_ca '/nonexistent.pem': No such file"),
        (RelayClientConfig(tls=True, tls_ca=str(tmp_path)), f"tls_ca '{tmp_path}': Is a directory"),
        (RelayClientConfig(tls=True, tls_ca=str(not_a_certificate)), "cannot load the CA certificates"),
        (
            RelayClientConfig(tls=True, tls_cert="/nope/c.pem", tls_key="/nope/k.pem"),
            "tls_cert '/nope/c.pem': No such file",
        ),
        (
            RelayClientConfig(disk_buffer_path=str(not_a_certificate / "sub")),
            f"disk buffer {not_a_certificate / 'sub'}: Not a directory",
        ),
    ]:
        ctx = StartContext("relay-client", MetricRegistry(), tmp_path, None)
        with pytest.raises(StartupError, match=re.escape(expected)):
            RelayClientPlugin().start(ctx, config)
        assert ctx.elements == []


def test_a_disk_buffer_another_agent_holds_is_a_startup_error(tmp_path) -> None:
    first = RelayClientPlugin()
    ctx = StartContext("relay-client", MetricRegistry(), tmp_path, None)
    first.start(ctx, RelayClientConfig())
    with pytest.raises(
        StartupError, match=r"disk buffer .*relay-client: .*already open.*its own \[agent\] data_dir"
    ):
        RelayClientPlugin().start(
            StartContext("relay-client", MetricRegistry(), tmp_path, None), RelayClientConfig()
        )
    first.stop()  # releases the buffer the output never ran with
    second = RelayClientPlugin()
    second.start(StartContext("relay-client", MetricRegistry(), tmp_path, None), RelayClientConfig())
    second.stop()


def test_the_plugin_defaults(tmp_path) -> None:
    plugin = RelayClientPlugin()
    ctx = StartContext("relay-client", MetricRegistry(), tmp_path, None)
    plugin.start(ctx, RelayClientConfig(client_name=""))
    plugin.stop()
    [element] = ctx.elements
    assert element.obj.settings.client_name == socket.gethostname()
    assert element.obj.buffer == DiskBuffer(tmp_path / "relay-client", 1 << 30, "interval")  # on by default
    assert msgspec.structs.asdict(RelayClientConfig().retry) == {
        "max_times": 8,
        "initial_delay": 0.5,
        "max_delay": 4.0,
    }


def test_an_unset_node_name_means_the_hostname(tmp_path) -> None:
    from agent import config as config_mod
    from agent.manager import build_plugin_manager, collect_plugins

    plugins = collect_plugins(build_plugin_manager(load_entry_points=False))
    document = {"plugins": {"relay-client": {"client_name": "${NODE_NAME}"}}}
    for env, expected in (({}, socket.gethostname()), ({"NODE_NAME": "node-42"}, "node-42")):
        config = config_mod.resolve(document, plugins, path=None, env=env)
        ctx = StartContext("relay-client", MetricRegistry(), tmp_path, config)
        plugin = RelayClientPlugin()
        plugin.start(ctx, config.plugins["relay-client"])
        plugin.stop()
        assert ctx.elements[0].obj.settings.client_name == expected
