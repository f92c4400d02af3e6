"""The admin ports over real sockets: reading, live changes asserted at fake carbons, bad input, fuzzing."""

from __future__ import annotations

import random
from typing import Any

import h11
import msgspec
import trio

from agent.testing import wait_for_async
from agent_plugins.graphite.graphite_out.admin_line import handle_command
from agent_plugins.graphite.graphite_out.control import AdminActions
from agent_plugins.graphite.graphite_out.plugin import admin_ports
from agent_plugins.graphite.graphite_out.testing import (
    FakeCarbon,
    fast_destination,
    graphite_batch,
    new_output,
    running_output,
    send,
    wait_until,
)
from agent_plugins.graphite.protocol.badlines import RecentBadLines


async def http(
    port: int, method: str, path: str, body: Any = None, raw: bytes | None = None
) -> tuple[int, Any]:
    """One request on a fresh connection; returns (status, decoded JSON body)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        client = h11.Connection(h11.CLIENT)
        payload = raw if raw is not None else (b"" if body is None else msgspec.json.encode(body))
        headers = [("host", "admin"), ("content-length", str(len(payload)))]
        await stream.send_all(client.send(h11.Request(method=method, target=path, headers=headers)))
        await stream.send_all(client.send(h11.Data(data=payload)) + client.send(h11.EndOfMessage()))
        status = 0
        data = bytearray()
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                data += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, msgspec.json.decode(bytes(data))


class LineClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def ask(self, command: str, lines: int = 1) -> list[str]:
        await self.stream.send_all(command.encode() + b"\n")
        while self.buffer.count(b"\n") < lines:
            data = await self.stream.receive_some(65536)
            assert data, f"connection closed after {command!r}"
            self.buffer += data
        *answer, self.buffer = self.buffer.split(b"\n", lines)
        return [line.decode() for line in answer]


def admin_output(tmp_path, sink: FakeCarbon, output_options: dict[str, Any] | None = None, **table: Any):
    """An output with both admin ports on free ports, as the plugin's start() adds them (services that
    bind when the pipeline starts): (output, admin HTTP port, admin line port)."""
    output = new_output(
        tmp_path,
        {
            "admin_http": "127.0.0.1:0",
            "admin_line": "127.0.0.1:0",
            "routes": [
                {"key": "main", "type": "send_all_match", "destinations": [fast_destination(sink.address)]}
            ],
            **table,
        },
        **(output_options or {}),
    )
    http_port, line_port = admin_ports(output.config, AdminActions(output))
    return output, http_port, line_port


async def test_http_reads_routes_destinations_and_stats(tmp_path):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            sink = FakeCarbon()
            await sink.start(nursery)
            output, http_port, line_port = admin_output(tmp_path, sink)
            async with running_output(output, [http_port, line_port]) as pipeline:
                port = http_port.bound_address[1]
                await send(pipeline, graphite_batch(["a.b.c"] * 10))
                await sink.wait_for(10)
                status, routes = await http(port, "GET", "/routes")
                assert status == 200
                assert [(r["key"], r["type"], r["destinations"][0]["address"]) for r in routes] == [
                    ("main", "send_all_match", sink.address)
                ]
                assert routes[0]["destinations"][0]["reconnect_interval"] == "20ms"
                status, destinations = await http(port, "GET", "/destinations")
                assert status == 200
                (d,) = destinations
                assert (d["route"], d["address"], d["state"], d["sent"], d["dropped"]) == (
                    "main",
                    sink.address,
                    "up",
                    10,
                    {},
                )
                status, stats = await http(port, "GET", "/stats")
                assert status == 200 and stats["points_in"] == 10 and stats["destinations"][0]["sent"] == 10
                status, index = await http(port, "GET", "/")
                assert status == 200 and "POST /routes" in index["endpoints"]
            nursery.cancel_scope.cancel()


async def test_http_route_changes_take_effect_for_the_next_points(tmp_path):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            main, extra = FakeCarbon(), FakeCarbon()
            await main.start(nursery)
            await extra.start(nursery)
            output, http_port, line_port = admin_output(tmp_path, main)
            async with running_output(output, [http_port, line_port]) as pipeline:
                port = http_port.bound_address[1]
                new_route = {
                    "key": "extra",
                    "type": "send_all_match",
                    "prefix": "apps.",
                    "destinations": [fast_destination(extra.address)],
                }
                status, body = await http(port, "POST", "/routes", new_route)
                assert status == 201, body
                await send(pipeline, graphite_batch(["apps.x", "servers.y"]))
                await main.wait_for(2)
                await extra.wait_for(1)
                assert extra.paths == ["apps.x"]

                status, body = await http(port, "POST", "/routes", new_route)
                assert status == 409 and "exists" in body["error"]

                status, body = await http(port, "DELETE", "/routes/extra")
                assert status == 200, body
                await send(pipeline, graphite_batch(["apps.z"]))
                await main.wait_for(3)
                assert extra.paths == ["apps.x"]  # the deleted route took nothing more

                status, body = await http(port, "PUT", "/blocklist", ["prefix apps."])
                assert status == 200 and body == ["prefix apps."]
                await send(pipeline, graphite_batch(["apps.blocked", "servers.kept"]))
                await main.wait_for(4)
                assert main.paths == ["apps.x", "servers.y", "apps.z", "servers.kept"]
                assert output.counters.blocked == 1

                status, body = await http(port, "PUT", "/rewriters", [{"old": "servers.", "new": "hosts."}])
                assert status == 200, body
                await send(pipeline, graphite_batch(["servers.renamed"]))
                await main.wait_for(5)
                assert main.paths[-1] == "hosts.renamed"
            nursery.cancel_scope.cancel()


async def test_http_aggregators_are_added_and_removed_live(tmp_path):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            sink = FakeCarbon()
            await sink.start(nursery)
            # The aggregators' clock stays before the points' bucket until they are in: a tick in between
            # would close the bucket (wait = 0s) and make them late.
            wall_clock = [1_699_999_000.0]
            output, http_port, line_port = admin_output(
                tmp_path, sink, output_options={"aggregation_tick": 0.01, "wall_clock": lambda: wall_clock[0]}
            )
            async with running_output(output, [http_port, line_port]) as pipeline:
                port = http_port.bound_address[1]
                aggregator = {
                    "function": "sum",
                    "regex": "^web[0-9]\\.load$",
                    "format": "all.load",
                    "interval": "10s",
                    "wait": "0s",
                    "drop_raw": True,
                }
                status, body = await http(port, "POST", "/aggregators", aggregator)
                assert status == 201, body
                status, listed = await http(port, "GET", "/aggregators")
                assert status == 200 and [(a["function"], a["format"]) for a in listed] == [
                    ("sum", "all.load")
                ]
                # Values 0, 1, 2 at 1700000000, +1, +2: the two web loads are summed into one bucket.
                await send(pipeline, graphite_batch(["web1.load", "web2.load", "other"]))
                wall_clock[0] = 1_700_000_010.0  # the bucket is over: the next tick emits it
                await sink.wait_for(2)
                assert sorted(sink.points) == [
                    ("all.load", 1.0, 1_700_000_000),
                    ("other", 2.0, 1_700_000_002),
                ]

                status, body = await http(port, "DELETE", "/aggregators/0")
                assert status == 200, body
                await send(pipeline, graphite_batch(["web1.load"]))
                await sink.wait_for(3)
                assert sink.points[-1] == ("web1.load", 0.0, 1_700_000_000)  # routed raw again
                status, listed = await http(port, "GET", "/aggregators")
                assert status == 200 and listed == []
            nursery.cancel_scope.cancel()


async def test_live_changes_lose_no_points(tmp_path):
    # A sender keeps sending while routes, destinations, the blocklist and the rewriters change: the
    # destination that stays gets every point once, in order.
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            main, extra = FakeCarbon(), FakeCarbon()
            await main.start(nursery)
            await extra.start(nursery)
            output, http_port, line_port = admin_output(tmp_path, main)
            sent: list[str] = []
            done = trio.Event()

            async def sender(pipeline) -> None:
                for n in range(200):
                    paths = [f"live.b{n:03d}.p{i:02d}" for i in range(50)]
                    await send(pipeline, graphite_batch(paths))
                    sent.extend(paths)
                    await trio.sleep(0.005)
                done.set()

            async with running_output(output, [http_port, line_port]) as pipeline:
                port = http_port.bound_address[1]
                nursery.start_soon(sender, pipeline)
                changes = [
                    (
                        "POST",
                        "/routes",
                        {"key": "copy", "type": "broadcast", "destinations": [extra.address]},
                    ),
                    (
                        "PUT",
                        "/routes/main",
                        {
                            "key": "main",
                            "type": "send_all_match",
                            "destinations": [fast_destination(main.address, queue_max_points=50_000)],
                        },
                    ),
                    ("PUT", "/blocklist", ["prefix never."]),
                    ("PUT", "/rewriters", [{"old": "never.", "new": "nothing."}]),
                    ("POST", "/routes/main/destinations", fast_destination(extra.address)),
                    ("DELETE", f"/routes/main/destinations/{extra.address}", None),
                    ("DELETE", "/routes/copy", None),
                ]
                for method, path, body in changes:
                    await trio.sleep(0.05)
                    status, answer = await http(port, method, path, body)
                    assert status in (200, 201), (method, path, answer)
                assert not done.is_set()  # every change came while points were flowing
                await done.wait()
                await main.wait_for(len(sent))
            # The output stopped and closed its connections: once main has read them to their end, a
            # duplicate would show.
            await wait_for_async(lambda: main.closed == main.connections, 10, "main's connections to end")
            assert main.paths == sent
            assert output.counters.points_in == len(sent) and output.counters.unroutable == 0
            nursery.cancel_scope.cancel()


async def test_http_destinations_can_be_added_and_removed_live(tmp_path):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            main, extra = FakeCarbon(), FakeCarbon()
            await main.start(nursery)
            await extra.start(nursery)
            output, http_port, line_port = admin_output(tmp_path, main)
            async with running_output(output, [http_port, line_port]) as pipeline:
                port = http_port.bound_address[1]
                status, body = await http(
                    port, "POST", "/routes/main/destinations", fast_destination(extra.address)
                )
                assert status == 201 and body == {"route": "main", "added": extra.address}
                await send(pipeline, graphite_batch(["one"]))
                await extra.wait_for(1)
                await main.wait_for(1)
                status, body = await http(port, "DELETE", f"/routes/main/destinations/{extra.address}")
                assert status == 200, body
                await send(pipeline, graphite_batch(["two"]))
                await main.wait_for(2)
                await wait_until(lambda: len(output.destinations) == 1)  # the removed writer finished
                assert extra.paths == ["one"]
                status, body = await http(port, "DELETE", f"/routes/main/destinations/{main.address}")
                assert status == 400 and "last destination" in body["error"]
            nursery.cancel_scope.cancel()


async def test_http_bad_requests_get_clear_errors_and_change_nothing(tmp_path):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            sink = FakeCarbon()
            await sink.start(nursery)
            output, http_port, line_port = admin_output(tmp_path, sink)
            async with running_output(output, [http_port, line_port]) as pipeline:
                port = http_port.bound_address[1]
                before = AdminActions(output).config()
                cases = [
                    ("POST", "/routes", None, b"{not json", 400, "invalid JSON"),
                    ("POST", "/routes", None, b"", 400, "no JSON body"),
                    ("POST", "/routes", None, b'{"key": "\xff"}', 400, "not valid UTF-8"),
                    (
                        "POST",
                        "/routes",
                        {"key": "x", "type": "teleport", "destinations": ["h:1"]},
                        None,
                        400,
                        "route",
                    ),
                    (
                        "POST",
                        "/routes",
                        {"key": "x", "type": "broadcast", "destinations": ["nohost"]},
                        None,
                        400,
                        "host:port",
                    ),
                    (
                        "POST",
                        "/routes",
                        {"key": "x", "type": "broadcast", "regex": "(", "destinations": ["h:1"]},
                        None,
                        400,
                        "regular expression",
                    ),
                    ("PUT", "/blocklist", ["wildcard *"], None, 400, "blocklist"),
                    (
                        "PUT",
                        "/routes/main",
                        {"key": "other", "type": "broadcast", "destinations": ["h:1"]},
                        None,
                        400,
                        "differs",
                    ),
                    ("DELETE", "/routes/nope", None, None, 404, "no route 'nope'"),
                    ("DELETE", "/rewriters/3", None, None, 404, "no rewriter 3"),
                    ("DELETE", "/aggregators/x", None, None, 400, "index"),
                    ("GET", "/nothing/here", None, None, 404, "no such endpoint"),
                    ("DELETE", "/stats", None, None, 405, "allowed: GET"),
                ]
                for method, path, body, raw, want_status, want_text in cases:
                    status, answer = await http(port, method, path, body, raw)
                    assert status == want_status, (method, path, answer)
                    assert want_text in answer["error"], (method, path, answer)
                assert AdminActions(output).config() == before
                # Still routing as before.
                await send(pipeline, graphite_batch(["still.ok"]))
                await sink.wait_for(1)
            nursery.cancel_scope.cancel()


async def test_http_badlines_come_from_graphite_in_registries(tmp_path):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            sink = FakeCarbon()
            await sink.start(nursery)
            output, http_port, line_port = admin_output(tmp_path, sink)
            recent = RecentBadLines()
            recent.record("10.1.1.1:4000", "field_count", b"only two", when=5.0)
            output.bad_line_sources = [recent]
            async with running_output(output, [http_port, line_port]):
                status, body = await http(http_port.bound_address[1], "GET", "/badlines")
            assert status == 200
            assert body == [
                {"time": 5.0, "peer": "10.1.1.1:4000", "reason": "field_count", "line": "only two"}
            ]
            nursery.cancel_scope.cancel()


async def test_line_port_routes_and_destinations_live(tmp_path):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            main, extra, third = FakeCarbon(), FakeCarbon(), FakeCarbon()
            for sink in (main, extra, third):
                await sink.start(nursery)
            output, http_port, line_port = admin_output(tmp_path, main)
            async with running_output(output, [http_port, line_port]) as pipeline:
                stream = await trio.open_tcp_stream(*line_port.bound_address)
                client = LineClient(stream)
                assert (await client.ask("help", 11))[0] == "commands:"
                (listing,) = await client.ask("route list")
                assert listing.startswith("main send_all_match plaintext match=everything destinations=")

                assert await client.ask(f"route add apps ^apps\\. {extra.address}") == ["added route apps"]
                await send(pipeline, graphite_batch(["apps.one", "sys.one"]))
                await extra.wait_for(1)
                await main.wait_for(2)
                assert extra.paths == ["apps.one"]

                assert await client.ask("route patt apps ^sys\\.") == ["route apps pattern '^sys\\\\.'"]
                await send(pipeline, graphite_batch(["apps.two", "sys.two"]))
                await extra.wait_for(2)
                assert extra.paths == ["apps.one", "sys.two"]

                assert await client.ask("route del apps") == ["deleted route apps"]
                (answer,) = await client.ask(f"putdest {third.address}")
                assert answer == f"Registered destination: {third.address} (route main)"
                await send(pipeline, graphite_batch(["after.putdest"]))
                await third.wait_for(1)
                (getdest,) = await client.ask("getdest")
                parsed = msgspec.json.decode(getdest)
                assert set(parsed["registered"]) == {main.address, third.address}
                assert set(parsed["active"]) <= {main.address, third.address} and parsed["active"]

                assert await client.ask(f"deldest {third.address}") == [
                    f"Removed destination: {third.address} (route main)"
                ]
                await send(pipeline, graphite_batch(["after.deldest"]))
                await main.wait_for(5)
                assert third.paths == ["after.putdest"]
                assert extra.paths == ["apps.one", "sys.two"]

                # Errors answer one line starting with "error: " and the connection stays usable.
                for command in (
                    "route add",
                    "route del nope",
                    "frobnicate",
                    "putdest not-an-address",
                    "route add bad! ^a 127.0.0.1:9",
                    "route patt main (",
                    "deldest 1.2.3.4:5",
                ):
                    (answer,) = await client.ask(command)
                    assert answer.startswith("error: "), (command, answer)
                (stats,) = await client.ask("stats")
                assert stats.startswith(f"main {main.address} up sent=")
                assert await client.ask("quit") == ["bye"]
                await stream.aclose()
            nursery.cancel_scope.cancel()


def test_line_commands_without_sockets(tmp_path):
    output = new_output(
        tmp_path,
        {
            "routes": [
                {"key": "a", "type": "broadcast", "destinations": ["127.0.0.1:1"]},
                {"key": "b", "type": "broadcast", "destinations": ["127.0.0.1:2"]},
            ]
        },
    )
    actions = AdminActions(output)
    assert handle_command(actions, "   ") == ""
    assert handle_command(actions, "putdest 127.0.0.1:3").startswith("error: there are several routes (a, b)")
    assert handle_command(actions, "putdest 127.0.0.1:3 b") == "Registered destination: 127.0.0.1:3 (route b)"
    assert (
        handle_command(actions, "putdest 127.0.0.1:3 b")
        == "error: route 'b' has destination 127.0.0.1:3 already"
    )
    assert handle_command(actions, "deldest 127.0.0.1:3") == "Removed destination: 127.0.0.1:3 (route b)"
    assert handle_command(actions, "deldest 127.0.0.1:1") == (
        "error: 127.0.0.1:1 is the last destination of route 'a': delete the route instead"
    )
    assert handle_command(actions, "getdest extra").startswith("error: usage: getdest")


async def test_fuzzing_both_admin_ports_leaves_them_serving(tmp_path):
    rng = random.Random(20240611)
    valid_http = b"GET /stats HTTP/1.1\r\nhost: x\r\n\r\n"
    valid_post = b'POST /routes HTTP/1.1\r\nhost: x\r\ncontent-length: 40\r\n\r\n{"key": "k", "type": "broadcast", "dest'

    def mutate(seed: bytes) -> bytes:
        data = bytearray(seed)
        for _ in range(rng.randint(1, 8)):
            choice = rng.random()
            position = rng.randrange(len(data) + 1)
            if choice < 0.4 and data:
                data[min(position, len(data) - 1)] = rng.randrange(256)
            elif choice < 0.7:
                data[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))
            else:
                del data[position : position + rng.randint(1, 10)]
        return bytes(data)

    payloads = [bytes(rng.randrange(256) for _ in range(rng.randint(0, 300))) for _ in range(40)]
    payloads += [mutate(valid_http) for _ in range(40)] + [mutate(valid_post) for _ in range(20)]
    # No ":" in them: a random putdest must never name a real host (no DNS look-ups from a test).
    payloads += [
        b"putdest " + bytes(rng.randrange(32, 127) for _ in range(30)).replace(b":", b";") + b"\n"
        for _ in range(20)
    ]
    payloads += [b"x" * 10_000 + b"\nhelp\n", b"GET / HTTP/1.1\r\n" + b"a: b\r\n" * 5000 + b"\r\n"]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            sink = FakeCarbon()
            await sink.start(nursery)
            output, http_port, line_port = admin_output(tmp_path, sink)
            async with running_output(output, [http_port, line_port]) as pipeline:
                for address in (http_port.bound_address, line_port.bound_address):
                    for payload in payloads:
                        stream = await trio.open_tcp_stream(*address)
                        async with stream:
                            try:
                                await stream.send_all(payload)
                                await stream.send_eof()
                                with trio.move_on_after(0.5):
                                    while await stream.receive_some(65536):
                                        pass
                            except trio.BrokenResourceError:
                                pass
                status, _ = await http(http_port.bound_address[1], "GET", "/stats")
                assert status == 200
                stream = await trio.open_tcp_stream(*line_port.bound_address)
                async with stream:
                    assert (await LineClient(stream).ask("route list"))[0].startswith("main ")
                await send(pipeline, graphite_batch(["after.fuzz"]))
                await sink.wait_for(1)
                assert [r.key for r in output.settings.routes][0] == "main"
            nursery.cancel_scope.cancel()
