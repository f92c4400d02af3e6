"""graphite-in over real sockets on 127.0.0.1: what senders send is what the pipeline gets."""

from __future__ import annotations

import contextlib
import logging
import pickle
import socket
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from agent.model import Batch
from agent.testing import CollectingOutput, running_pipeline, source_element
from agent_plugins.graphite.graphite_in.listeners import GraphiteInput, ListenerSettings

NS = 1_000_000_000
T0 = 1_700_000_000


@contextlib.asynccontextmanager
async def running_input(**overrides: Any) -> AsyncIterator[tuple[GraphiteInput, CollectingOutput]]:
    """graphite-in on 127.0.0.1 (plaintext and pickle over TCP, UDP) in a real pipeline."""
    settings = ListenerSettings(
        **{"plaintext": "127.0.0.1:0", "udp": "127.0.0.1:0", "pickle": "127.0.0.1:0", **overrides}
    )
    source = GraphiteInput(settings)
    output = CollectingOutput()
    async with running_pipeline([source_element(source, "graphite-in")], outputs=[output]):
        yield source, output


def port(source: GraphiteInput, listener: str) -> int:
    return int(source.bound[listener][0].rsplit(":", 1)[1])


async def connect(source: GraphiteInput, listener: str = "plaintext") -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port(source, listener))


async def send_and_close(source: GraphiteInput, data: bytes, listener: str = "plaintext") -> None:
    stream = await connect(source, listener)
    async with stream:
        await stream.send_all(data)


def points(output: CollectingOutput) -> list[tuple[str, int, float, dict[str, Any]]]:
    return [
        (name, ts, value, series.attributes)
        for batch in output.batches
        for name, ts, value, series in batch.points()
    ]


def pickle_frame(points_: list[Any], protocol: int = 2) -> bytes:
    payload = pickle.dumps(points_, protocol=protocol)
    return struct.pack("!L", len(payload)) + payload


async def wait_closed_by_server(stream: trio.SocketStream) -> None:
    """Returns once the server closed the connection (EOF or reset), reading whatever comes first."""
    while True:
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return
        if not data:
            return


async def test_lines_arrive_as_points_with_paths_timestamps_and_tags() -> None:
    with trio.fail_after(10):
        async with running_input() as (source, output):
            before = time.time_ns()
            await send_and_close(
                source,
                b"servers.web1.load 0.5 1700000000\n"
                b"servers.web1.mem 1.5e3 1700000001.25\n"
                b"cpu.load;host=web1;dc=eu 7 1700000002\n"
                b"cpu.load;dc=eu;host=web2 8 1700000003\n"
                b"now.metric 3 -1\n",
            )
            await output.wait_for_points(5)
            after = time.time_ns()
    got = points(output)
    by_name = {name: (ts, value, attrs) for name, ts, value, attrs in got}
    assert by_name["servers.web1.load"] == (T0 * NS, 0.5, {})
    assert by_name["servers.web1.mem"] == ((T0 + 1) * NS + 250_000_000, 1500.0, {})
    # Tags: the normalised path is the metric, the tags are the attributes.
    assert by_name["cpu.load;dc=eu;host=web1"] == ((T0 + 2) * NS, 7.0, {"dc": "eu", "host": "web1"})
    assert by_name["cpu.load;dc=eu;host=web2"] == ((T0 + 3) * NS, 8.0, {"dc": "eu", "host": "web2"})
    ts_now = by_name["now.metric"][0]
    assert before <= ts_now <= after
    # Every series has one attribute set.
    for batch in output.batches:
        for series in batch.series:
            if series.attributes:
                assert all(name.startswith("cpu.load;") for name in series.metric)
    assert source.counters["plaintext"].points == 5
    assert source.counters["plaintext"].connections == 1


async def test_crlf_line_ends_and_a_line_split_across_segments() -> None:
    with trio.fail_after(10):
        async with running_input() as (source, output):
            stream = await connect(source)
            async with stream:
                await stream.send_all(b"a.crlf 1 1700000000\r\na.split")
                await trio.sleep(0.05)  # a separate TCP segment, and a separate read on the server
                await stream.send_all(b".path 2 17000")
                await trio.sleep(0.05)
                await stream.send_all(b"00001\r\n")
                await output.wait_for_points(2)
    assert [(n, ts, v) for n, ts, v, _ in points(output)] == [
        ("a.crlf", T0 * NS, 1.0),
        ("a.split.path", (T0 + 1) * NS, 2.0),
    ]
    assert source.counters["plaintext"].bad == {}


async def test_the_last_line_of_a_closed_connection_counts_without_its_newline() -> None:
    with trio.fail_after(10):
        async with running_input() as (source, output):
            await send_and_close(source, b"first 1 1700000000\nlast.without.newline 2 1700000001")
            await output.wait_for_points(2)
    assert [n for n, *_ in points(output)] == ["first", "last.without.newline"]


async def test_bad_lines_are_counted_by_reason_and_the_connection_stays_open(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    with trio.fail_after(10):
        async with running_input() as (source, output):
            stream = await connect(source)
            async with stream:
                await stream.send_all(
                    b"good.one 1 1700000000\n"
                    b"only two\n"
                    b"bad.value abc 1700000000\n"
                    b"bad.ts 1 yesterday\n"
                    b"bad.tags;=x 1 1700000000\n"
                    b"nan.value nan 1700000000\n"
                    b"bad\x01chars 1 1700000000\n"
                )
                await output.wait_for_points(1)
                # The same connection keeps working.
                await stream.send_all(b"good.two 2 1700000001\n")
                await output.wait_for_points(2)
            counters = source.counters["plaintext"]
            assert counters.bad == {
                "field_count": 1,
                "bad_value": 1,
                "bad_timestamp": 1,
                "bad_tags": 1,
                "nan_value": 1,
                "bad_chars": 1,
            }
            assert counters.closed == {}
    assert [n for n, *_ in points(output)] == ["good.one", "good.two"]
    records = source.recent_bad_lines.snapshot()
    assert sorted(r.reason.split(":")[0] for r in records) == [
        "bad_chars",
        "bad_tags",
        "bad_timestamp",
        "bad_value",
        "field_count",
        "nan_value",
    ]
    assert "bad.value abc 1700000000" in [r.line for r in records]
    assert all(r.peer.startswith("127.0.0.1:") for r in records)
    # One warning (rate-limited) names the sender and the reason.
    warnings = [r.getMessage() for r in caplog.records if "graphite-in plaintext: dropped" in r.getMessage()]
    assert len(warnings) == 1
    assert "127.0.0.1:" in warnings[0] and "field_count" in warnings[0]


async def test_a_line_over_max_line_length_closes_only_that_connection() -> None:
    with trio.fail_after(10):
        async with running_input(max_line_length=100) as (source, output):
            other = await connect(source)
            offender = await connect(source)
            await offender.send_all(b"before.long 1 1700000000\n" + b"x" * 150 + b" 1 1700000000\n")
            await wait_closed_by_server(offender)
            await other.send_all(b"other.still.works 2 1700000000\n")
            await output.wait_for_points(2)
            await other.aclose()
            await offender.aclose()
            counters = source.counters["plaintext"]
            assert counters.closed == {"line_too_long": 1}
            assert counters.bad == {"line_too_long": 1}
    assert sorted(n for n, *_ in points(output)) == ["before.long", "other.still.works"]


async def test_a_line_that_never_ends_closes_the_connection_before_it_grows() -> None:
    with trio.fail_after(10):
        async with running_input(max_line_length=1000) as (source, output):
            offender = await connect(source)
            with contextlib.suppress(trio.BrokenResourceError):
                for _ in range(10):
                    await offender.send_all(b"y" * 500)
            await wait_closed_by_server(offender)
            assert source.counters["plaintext"].closed == {"line_too_long": 1}
            await send_and_close(source, b"after 1 1700000000\n")
            await output.wait_for_points(1)


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
async def test_pickle_frames_of_every_protocol(protocol: int) -> None:
    frame_points = [(f"pickled.{protocol}.{i}", (T0 + i, float(i) / 2)) for i in range(500)]
    frame_points.append((f"pickled.{protocol}.int", (T0, 42)))
    frame_points.append((f"pickled.{protocol}.tagged;b=2;a=1", (T0, 1.0)))
    with trio.fail_after(10):
        async with running_input() as (source, output):
            await send_and_close(source, pickle_frame(frame_points, protocol) * 2, "pickle")
            await output.wait_for_points(2 * len(frame_points))
    got = points(output)
    assert got[0][:3] == (f"pickled.{protocol}.0", T0 * NS, 0.0)
    assert (f"pickled.{protocol}.499", (T0 + 499) * NS, 249.5, {}) in got
    assert (f"pickled.{protocol}.int", T0 * NS, 42.0, {}) in got
    assert (f"pickled.{protocol}.tagged;a=1;b=2", T0 * NS, 1.0, {"a": "1", "b": "2"}) in got
    assert source.counters["pickle"].frames == 2


async def test_a_malicious_pickle_is_refused_and_counted_and_the_connection_goes_on(tmp_path: Any) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            import os

            return (os.system, (f"touch {marker}",))

    evil = pickle.dumps([("evil", (T0, Exploit()))], protocol=2)
    with trio.fail_after(10):
        async with running_input() as (source, output):
            stream = await connect(source, "pickle")
            async with stream:
                await stream.send_all(struct.pack("!L", len(evil)) + evil)
                await stream.send_all(pickle_frame([("after.evil", (T0, 1.0))]))
                await output.wait_for_points(1)
            assert source.counters["pickle"].bad == {"bad_pickle": 1}
            assert source.counters["pickle"].closed == {}
            [record] = source.recent_bad_lines.snapshot()
            assert record.reason.startswith("bad_pickle: ") and "posix.system" in record.reason
    assert [n for n, *_ in points(output)] == ["after.evil"]
    assert not marker.exists()


async def test_an_oversized_pickle_frame_closes_that_connection_only() -> None:
    with trio.fail_after(10):
        async with running_input(max_pickle_frame_size=4096) as (source, output):
            good = await connect(source, "pickle")
            offender = await connect(source, "pickle")
            # Only the header: the connection closes before the payload is even sent.
            await offender.send_all(struct.pack("!L", 1 << 20))
            await wait_closed_by_server(offender)
            await offender.aclose()
            await good.send_all(pickle_frame([("still.fine", (T0, 1.0))]))
            await output.wait_for_points(1)
            await good.aclose()
            assert source.counters["pickle"].closed == {"frame_too_large": 1}


async def test_a_frame_split_across_reads_and_points_dropped_by_validation() -> None:
    frame = pickle_frame(
        [("ok.a", (T0, 1.0)), ("bad path", (T0, 2.0)), ("nan.value", (T0, float("nan"))), ("ok.b", (-1, 3))]
    )
    with trio.fail_after(10):
        async with running_input() as (source, output):
            stream = await connect(source, "pickle")
            async with stream:
                for i in range(0, len(frame), 7):
                    await stream.send_all(frame[i : i + 7])
                    await trio.sleep(0.001)
                await output.wait_for_points(2)
            assert source.counters["pickle"].bad == {"bad_chars": 1, "nan_value": 1}
    assert [n for n, *_ in points(output)] == ["ok.a", "ok.b"]


async def test_udp_datagrams_are_complete_chunks() -> None:
    with trio.fail_after(10):
        async with running_input() as (source, output):
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with sock:
                address = ("127.0.0.1", port(source, "udp"))
                await sock.sendto(b"udp.one 1 1700000000\nudp.two 2 1700000000", address)
                await sock.sendto(b"udp.three 3 1700000000\n", address)
                await sock.sendto(b"udp bad\n", address)
                await output.wait_for_points(3)
                while source.counters["udp"].bad != {"field_count": 1}:
                    await trio.sleep(0.01)
    assert sorted(n for n, *_ in points(output)) == ["udp.one", "udp.three", "udp.two"]
    [record] = source.recent_bad_lines.snapshot()
    assert record.peer.startswith("127.0.0.1:") and record.line == "udp bad"


def free_port_for_tcp_and_udp() -> int:
    """A port number free for both TCP and UDP on 127.0.0.1 (free when this returns)."""
    while True:
        with socket.socket() as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            try:
                udp.bind(("127.0.0.1", tcp.getsockname()[1]))
            except OSError:
                continue
            return tcp.getsockname()[1]


async def test_plaintext_over_tcp_and_udp_on_the_same_port_number() -> None:
    # The Contract: `udp` may use the same port as `plaintext` (2003 for both, as carbon does).
    number = free_port_for_tcp_and_udp()
    with trio.fail_after(10):
        async with running_input(plaintext=f"127.0.0.1:{number}", udp=f"127.0.0.1:{number}", pickle="") as (
            source,
            output,
        ):
            assert port(source, "plaintext") == port(source, "udp") == number
            await send_and_close(source, b"same.tcp 1 1700000000\n")
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with sock:
                await sock.sendto(b"same.udp 2 1700000000\n", ("127.0.0.1", number))
            await output.wait_for_points(2)
    assert sorted(n for n, *_ in points(output)) == ["same.tcp", "same.udp"]


async def test_max_connections_refuses_the_extra_ones() -> None:
    with trio.fail_after(10):
        async with running_input(max_connections=2) as (source, output):
            first = await connect(source)
            second = await connect(source)
            await first.send_all(b"c.one 1 1700000000\n")
            await second.send_all(b"c.two 1 1700000000\n")
            await output.wait_for_points(2)
            third = await connect(source)
            await wait_closed_by_server(third)
            assert source.counters["plaintext"].closed == {"too_many_connections": 1}
            for stream in (first, second, third):
                await stream.aclose()


async def test_idle_connections_are_closed_after_idle_timeout(autojump_clock: trio.testing.MockClock) -> None:
    source = GraphiteInput(ListenerSettings(idle_timeout=60.0))
    output = CollectingOutput()
    async with running_pipeline([], outputs=[output]) as pipeline:
        client, server = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source.serve_connection, "plaintext", server, "memory:1", pipeline.sink())
            await trio.sleep(59)
            await client.send_all(b"a 1 1700000000\n")
            await trio.sleep(59)  # activity restarted the timeout
            assert source.counters["plaintext"].closed == {}
            await trio.sleep(2)
            assert source.counters["plaintext"].closed == {"idle_timeout": 1}
            assert await client.receive_some(10) == b""
        await output.wait_for_points(1)


async def test_a_port_in_use_is_a_startup_error_naming_the_address() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    address = f"127.0.0.1:{taken.getsockname()[1]}"
    try:
        source = GraphiteInput(ListenerSettings(plaintext="127.0.0.1:0", pickle=address))
        with (
            trio.fail_after(5),
            pytest.raises(OSError, match=f"graphite-in pickle: cannot listen on {address}"),
        ):
            await source.run(_NullSink())  # type: ignore[arg-type]
    finally:
        taken.close()


class _NullSink:
    async def send(self, batch: Batch, on_done: Any = None) -> None:
        pass


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"plaintext": "", "pickle": ""},
            'plaintext, udp and pickle are all "": graphite-in would listen on nothing',
        ),
        ({"plaintext": "localhost"}, "plaintext: 'localhost': missing port"),
        ({"udp": "0.0.0.0:99999"}, "udp: '0.0.0.0:99999': port '99999' is not a number from 0 to 65535"),
        ({"validation": "loose"}, "expected one of: none, medium, strict"),
        ({"max_pickle_frame_size": "10"}, "max_pickle_frame_size: must be at least 1KiB"),
        ({"plaintxt": ":2003"}, "plugins.graphite-in.plaintxt: unknown key"),
    ],
)
def test_config_mistakes_are_one_line_errors(table: dict[str, Any], message: str) -> None:
    from agent.config import ConfigError, convert_section
    from agent_plugins.graphite.graphite_in.plugin import GraphiteInConfig

    with pytest.raises(ConfigError) as error:
        convert_section(table, GraphiteInConfig, "plugins.graphite-in")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_the_plugin_adds_one_source_with_the_configured_settings(tmp_path: Any) -> None:
    from agent.config import convert_section
    from agent.model import MetricRegistry
    from agent.plugin import StartContext
    from agent_plugins.graphite.graphite_in.plugin import GraphiteInConfig, GraphiteInPlugin

    config = convert_section(
        {
            "udp": "127.0.0.1:2003",
            "validation": "strict",
            "idle_timeout": "5m",
            "max_pickle_frame_size": "64KiB",
        },
        GraphiteInConfig,
        "plugins.graphite-in",
    )
    ctx = StartContext("graphite-in", MetricRegistry(), tmp_path, None)
    GraphiteInPlugin().start(ctx, config)
    [element] = ctx.elements
    assert element.kind == "source" and element.full_name == "graphite-in"
    settings = element.obj.settings
    assert (settings.plaintext, settings.udp, settings.pickle) == (
        "0.0.0.0:2003",
        "127.0.0.1:2003",
        "0.0.0.0:2004",
    )
    assert (settings.validation, settings.idle_timeout, settings.max_pickle_frame_size) == (
        "strict",
        300.0,
        65536,
    )
    # graphite-out's admin API finds the recent bad lines on the element.
    from agent_plugins.graphite.protocol.badlines import find_recent_bad_lines

    assert find_recent_bad_lines(ctx.elements) == [element.obj.recent_bad_lines]


async def test_reuse_port_lets_two_inputs_share_the_ports() -> None:
    with trio.fail_after(20):
        async with running_input(reuse_port=True, pickle="") as (first, first_output):
            ports = {name: port(first, name) for name in ("plaintext", "udp")}
            async with running_input(
                reuse_port=True,
                plaintext=f"127.0.0.1:{ports['plaintext']}",
                udp=f"127.0.0.1:{ports['udp']}",
                pickle="",
            ) as (second, second_output):
                assert second.bound == first.bound
                # The kernel spreads connections over both (by a hash of the addresses): with 40, both
                # get some unless the odds of 2**-39 strike.
                for number in range(40):
                    await send_and_close(first, f"shared.{number} 1 1700000000\n".encode())
                while first_output.points + second_output.points < 40:
                    await trio.sleep(0.01)
                assert first_output.points > 0 and second_output.points > 0
    names = {n for n, *_ in points(first_output)} | {n for n, *_ in points(second_output)}
    assert names == {f"shared.{number}" for number in range(40)}
