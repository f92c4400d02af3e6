"""graphite-in under load and abuse: a thousand concurrent senders, and random bytes thrown at the TCP
listeners while a well-behaved client keeps delivering."""

from __future__ import annotations

import pickle
import random
import resource
import struct

import trio

from agent_plugins.graphite.graphite_in.tests.test_graphite_in import (
    connect,
    pickle_frame,
    points,
    port,
    running_input,
)

T0 = 1_700_000_000


def raise_open_files_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


async def test_a_thousand_concurrent_senders_all_get_through() -> None:
    senders, lines_each = 1000, 50
    # Both ends of each connection live in this process, plus the pipeline's own.
    raise_open_files_limit(2 * senders + 200)
    with trio.fail_after(60):
        async with running_input() as (source, output):
            all_connected = trio.Event()
            connected = 0

            async def sender(number: int) -> None:
                nonlocal connected
                stream = await connect(source)
                async with stream:
                    connected += 1
                    if connected == senders:
                        all_connected.set()
                    # Every sender is connected before anyone sends: they really are concurrent.
                    await all_connected.wait()
                    lines = b"".join(
                        f"sender.{number}.m{j} {j} {T0 + j}\n".encode() for j in range(lines_each)
                    )
                    await stream.send_all(lines)

            async with trio.open_nursery() as nursery:
                for number in range(senders):
                    nursery.start_soon(sender, number)
            await output.wait_for_points(senders * lines_each)
            counters = source.counters["plaintext"]
            assert counters.connections == senders
            assert counters.bad == {} and counters.errors == 0
    got = points(output)
    assert len(got) == senders * lines_each
    assert {name for name, *_ in got} == {
        f"sender.{i}.m{j}" for i in range(senders) for j in range(lines_each)
    }
    # Each sender's lines arrive in its order.
    for number in (0, 499, 999):
        mine = [value for name, _, value, _ in got if name.startswith(f"sender.{number}.")]
        assert mine == [float(j) for j in range(lines_each)]


def mutated(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        action = rng.random()
        position = rng.randrange(len(out) + 1)
        if action < 0.4 and out:
            out[min(position, len(out) - 1)] = rng.randrange(256)
        elif action < 0.7:
            out[position:position] = rng.randbytes(rng.randint(1, 20))
        else:
            del out[position : position + rng.randint(1, 20)]
    return bytes(out)


async def test_random_bytes_against_the_tcp_listeners_while_a_good_client_delivers() -> None:
    rng = random.Random(20261122)
    good_lines = 3000
    valid_pickle = pickle.dumps([("fuzz.p", (T0, 1.0)), ("fuzz.q;a=b", (T0, 2.0))], protocol=2)
    with trio.fail_after(60):
        async with running_input(max_line_length=2000, max_pickle_frame_size=1 << 16) as (source, output):
            done = trio.Event()

            async def good_client() -> None:
                stream = await connect(source)
                async with stream:
                    for start in range(0, good_lines, 50):
                        await stream.send_all(
                            b"".join(f"good.client {i} {T0 + i}\n".encode() for i in range(start, start + 50))
                        )
                        await trio.sleep(0.01)
                done.set()

            async def fuzzer(listener: str, attempt: int) -> None:
                if listener == "plaintext":
                    samples = [
                        rng.randbytes(rng.randint(1, 3000)),
                        mutated(b"a.b.c 1 1700000000\nd;e=f 2 -1\n", rng),
                        rng.choice([b"\n", b" ", b"\r\n", b"\x00", b";", b"="]) * rng.randint(1, 500),
                        b"x" * rng.randint(1000, 5000),  # no newline: too long once past 2000
                    ]
                else:
                    body = mutated(valid_pickle, rng)
                    samples = [
                        struct.pack("!L", len(body)) + body,  # framed, garbage inside: refused, stays in step
                        rng.randbytes(rng.randint(1, 300)),  # random header: mostly "too large"
                        pickle_frame(rng.choice([[1, 2], {"a": 1}, "x", [("p", (1, 2, 3))], [("p",)]])),
                    ]
                try:
                    stream = await connect(source, listener)
                    async with stream:
                        for _ in range(rng.randint(1, 5)):
                            await stream.send_all(rng.choice(samples))
                except (trio.BrokenResourceError, OSError):
                    pass  # the server closed this connection: fine

            async with trio.open_nursery() as nursery:
                nursery.start_soon(good_client)
                attempt = 0
                # Until the good client is through and at least 200 fuzzers ran (under load, fewer
                # would fit in the good client's time).
                while not done.is_set() or attempt <= 200:
                    attempt += 1
                    nursery.start_soon(fuzzer, rng.choice(["plaintext", "pickle"]), attempt)
                    await trio.sleep(0.001)

            good = [value for name, _, value, _ in points(output) if name == "good.client"]
            while len(good) < good_lines:
                await output.wait_for_points(len(points(output)) + 1)
                good = [value for name, _, value, _ in points(output) if name == "good.client"]
            assert good == [float(i) for i in range(good_lines)]
            # The fuzzers were noticed, and the listeners still serve new connections.
            assert sum(source.counters["plaintext"].bad.values()) > 0
            assert source.counters["pickle"].bad.get("bad_pickle", 0) > 0
            before = len(points(output))
            stream = await connect(source, "pickle")
            async with stream:
                await stream.send_all(pickle_frame([("after.fuzz", (T0, 9.0))]))
            stream = await connect(source)
            async with stream:
                await stream.send_all(b"after.fuzz.plain 1 1700000000\n")
            await output.wait_for_points(before + 2)
            assert attempt > 200
            assert source.counters["plaintext"].closed.get("line_too_long", 0) > 0
            assert source.counters["pickle"].closed.get("frame_too_large", 0) > 0
    names = {name for name, *_ in points(output)}
    assert {"after.fuzz", "after.fuzz.plain"} <= names


async def test_random_datagrams_against_the_udp_listener_while_a_good_sender_delivers() -> None:
    rng = random.Random(20261123)
    good_lines = 500
    with trio.fail_after(30):
        async with running_input(pickle="", max_line_length=2000) as (source, output):
            address = ("127.0.0.1", port(source, "udp"))
            fuzz = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
            good = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
            with fuzz, good:
                for i in range(good_lines):
                    for _ in range(3):
                        sample = rng.choice(
                            [
                                rng.randbytes(rng.randint(0, 3000)),
                                mutated(b"a.b.c 1 1700000000\nd;e=f 2 -1\n", rng),
                                rng.choice([b"\n", b" ", b"\r\n", b"\x00", b";", b"="]) * rng.randint(1, 500),
                                b"x" * rng.randint(1000, 5000),  # one datagram, one line too long
                            ]
                        )
                        await fuzz.sendto(sample, address)
                    await good.sendto(f"good.udp {i} {T0 + i}".encode(), address)
                    if i % 10 == 0:
                        # Let the listener drain the socket buffer (at most ~80 KB in between: well
                        # below Linux's default 208 KiB when net.core.rmem_max caps our 4 MiB request).
                        await trio.sleep(0.005)
                deadline = trio.current_time() + 10
                while len([1 for name, *_ in points(output) if name == "good.udp"]) < good_lines:
                    if trio.current_time() > deadline:
                        break
                    await trio.sleep(0.05)
                got = [value for name, _, value, _ in points(output) if name == "good.udp"]
                # UDP may lose datagrams under load (the kernel drops them when the buffer is full), but
                # whatever the fuzzer sent, every good datagram that arrived was taken, in order.
                assert len(got) > good_lines * 0.9 and got == sorted(got)
                counters = source.counters["udp"]
                assert sum(counters.bad.values()) > 0 and counters.errors == 0
                before = len(points(output))
                await good.sendto(b"after.fuzz.udp 1 1700000000\n", address)
                await output.wait_for_points(before + 1)
