"""graphite-out end to end over real sockets: every route type delivers what it should to fake carbons."""

from __future__ import annotations

from collections import Counter

import trio

from agent.model import Batch, Consumer, Resource, Series
from agent_plugins.graphite.graphite_out.testing import (
    NS,
    FakeCarbon,
    fast_destination,
    graphite_batch,
    graphite_series,
    new_output,
    running_output,
    send,
    wait_until,
)
from agent_plugins.graphite.protocol.hashing import ConsistentHashRing
from agent_plugins.graphite.protocol.pickle_codec import decode_frame, split_frames

PATHS = [f"servers.web{i % 7}.cpu.core{i % 4}.load" for i in range(300)] + [
    f"apps.api.requests.{i}" for i in range(200)
]


async def start_sinks(nursery: trio.Nursery, count: int, pickle: bool = False) -> list[FakeCarbon]:
    sinks = [FakeCarbon(pickle=pickle) for _ in range(count)]
    for sink in sinks:
        await sink.start(nursery)
    return sinks


async def test_send_all_match_delivers_every_line_to_every_matching_destination(tmp_path):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            all_sink, apps_sink = await start_sinks(nursery, 2)
            output = new_output(
                tmp_path,
                {
                    "routes": [
                        {
                            "key": "main",
                            "type": "send_all_match",
                            "destinations": [
                                fast_destination(all_sink.address),
                                fast_destination(apps_sink.address, prefix="apps."),
                            ],
                        }
                    ]
                },
            )
            async with running_output(output) as pipeline:
                assert await send(pipeline, graphite_batch(PATHS))
                await all_sink.wait_for(500)
                await apps_sink.wait_for(200)
            # The exact lines, in order, with values and second timestamps.
            assert all_sink.points == [(p, float(i), 1_700_000_000 + i) for i, p in enumerate(PATHS)]
            assert apps_sink.paths == [p for p in PATHS if p.startswith("apps.")]
            # Healthy destinations never needed their spool: no files on disk.
            assert not (tmp_path / "spool").exists()
            nursery.cancel_scope.cancel()


async def test_send_first_match_sends_each_line_once(tmp_path):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            servers_sink, rest_sink = await start_sinks(nursery, 2)
            output = new_output(
                tmp_path,
                {
                    "routes": [
                        {
                            "key": "first",
                            "type": "send_first_match",
                            "destinations": [
                                fast_destination(servers_sink.address, prefix="servers."),
                                fast_destination(rest_sink.address),
                            ],
                        }
                    ]
                },
            )
            async with running_output(output) as pipeline:
                assert await send(pipeline, graphite_batch(PATHS))
                await servers_sink.wait_for(300)
                await rest_sink.wait_for(200)
            assert servers_sink.paths == PATHS[:300]
            assert rest_sink.paths == PATHS[300:]
            nursery.cancel_scope.cancel()


async def test_broadcast_copies_every_line_to_every_destination(tmp_path):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            sinks = await start_sinks(nursery, 3)
            output = new_output(
                tmp_path,
                {
                    "routes": [
                        {
                            "key": "mirror",
                            "type": "broadcast",
                            "destinations": [fast_destination(s.address) for s in sinks],
                        }
                    ]
                },
            )
            async with running_output(output) as pipeline:
                assert await send(pipeline, graphite_batch(PATHS))
                for sink in sinks:
                    await sink.wait_for(len(PATHS))
            for sink in sinks:
                assert sink.paths == PATHS
            nursery.cancel_scope.cancel()


async def test_consistent_hashing_sends_each_path_where_the_carbon_ring_says(tmp_path):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            sinks = await start_sinks(nursery, 3)
            addresses = [f"{s.address}:{name}" for s, name in zip(sinks, "abc", strict=True)]
            output = new_output(
                tmp_path,
                {
                    "routes": [
                        {
                            "key": "carbon",
                            "type": "consistent_hashing",
                            "hash": "carbon_ch",
                            "destinations": [fast_destination(a) for a in addresses],
                        }
                    ]
                },
            )
            async with running_output(output) as pipeline:
                assert await send(pipeline, graphite_batch(PATHS))
                await wait_until(lambda: sum(len(s.points) for s in sinks) >= len(PATHS))
            ring = ConsistentHashRing([("127.0.0.1", name) for name in "abc"])
            expected = [[p for p in PATHS if ring.node_for_path(p) == slot] for slot in range(3)]
            assert [sink.paths for sink in sinks] == expected
            assert all(expected)  # every node got some paths: the test can tell them apart
            nursery.cancel_scope.cancel()


async def test_hash_route_without_failures_routes_like_consistent_hashing(tmp_path):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            sinks = await start_sinks(nursery, 2)
            output = new_output(
                tmp_path,
                {
                    "routes": [
                        {
                            "key": "polymur",
                            "type": "hash_route",
                            "destinations": [
                                fast_destination(f"{s.address}:{n}") for s, n in zip(sinks, "ab", strict=True)
                            ],
                        }
                    ]
                },
            )
            async with running_output(output) as pipeline:
                assert await send(pipeline, graphite_batch(PATHS))
                await wait_until(lambda: sum(len(s.points) for s in sinks) >= len(PATHS))
            ring = ConsistentHashRing([("127.0.0.1", "a"), ("127.0.0.1", "b")])
            expected = [[p for p in PATHS if ring.node_for_path(p) == slot] for slot in range(2)]
            assert [sink.paths for sink in sinks] == expected
            assert all(expected)
            nursery.cancel_scope.cancel()


async def test_pickle_format_decodes_at_the_sink_to_the_same_points(tmp_path):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            (sink,) = await start_sinks(nursery, 1, pickle=True)
            output = new_output(
                tmp_path,
                {
                    "routes": [
                        {
                            "key": "pickled",
                            "type": "send_all_match",
                            "format": "pickle",
                            "destinations": [fast_destination(sink.address)],
                        }
                    ]
                },
            )
            paths = PATHS * 3  # 1500 points: at least three frames of 500
            async with running_output(output) as pipeline:
                assert await send(pipeline, graphite_batch(paths))
                await sink.wait_for(len(paths))
            assert sink.points == [(p, float(i), 1_700_000_000 + i) for i, p in enumerate(paths)]
            nursery.cancel_scope.cancel()


async def test_pickle_frames_hold_at_most_500_points():
    from agent_plugins.graphite.graphite_out.render import Chunk, render_pickle

    chunk = Chunk([f"a.b.{i}" for i in range(1201)], list(range(1201)), [float(i) for i in range(1201)])
    frames, rest = split_frames(render_pickle([chunk]))
    assert rest == b""
    sizes = [len(decode_frame(frame, now_ns=0)) for frame in frames]
    assert sizes == [500, 500, 201]


async def test_agent_series_get_their_path_from_the_template_and_graphite_points_keep_theirs(tmp_path):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            (sink,) = await start_sinks(nursery, 1)
            output = new_output(
                tmp_path,
                {
                    "prefix": "agents.prod",
                    "routes": [
                        {
                            "key": "all",
                            "type": "send_all_match",
                            "destinations": [fast_destination(sink.address)],
                        }
                    ],
                },
            )
            ts = 1_700_000_123 * NS + 999_999_999  # seconds are truncated, not rounded
            batch = Batch(
                [
                    Series(
                        "cpu_percent",
                        Resource("cpu_core", "3"),
                        Consumer("local_machine"),
                        {"relay_client": "web 1"},
                        [ts],
                        [12.5],
                    ),
                    Series(
                        "mem.used",
                        Resource("local_machine"),
                        Consumer("local_machine"),
                        {},
                        [ts, ts + NS],
                        [1, 2],
                    ),
                    # Graphite points in the same batch keep their own paths.
                    graphite_series(["graphite.born.a", "graphite.born.b"], start=1_700_000_200),
                ]
            )
            async with running_output(output) as pipeline:
                assert await send(pipeline, batch)
                await sink.wait_for(5)
            assert sink.points == [
                ("agents.prod.web_1.cpu_percent.cpu_core.3", 12.5, 1_700_000_123),
                ("agents.prod.mem_used.local_machine", 1.0, 1_700_000_123),
                ("agents.prod.mem_used.local_machine", 2.0, 1_700_000_124),
                ("graphite.born.a", 0.0, 1_700_000_200),
                ("graphite.born.b", 1.0, 1_700_000_201),
            ]
            nursery.cancel_scope.cancel()


async def test_no_routes_counts_everything_as_unroutable(tmp_path, caplog):
    output = new_output(tmp_path, {})
    assert "no routes configured" in caplog.text
    with trio.fail_after(5):
        async with running_output(output) as pipeline:
            assert await send(pipeline, graphite_batch(PATHS))
    assert output.counters.unroutable == len(PATHS)


async def test_blocklist_and_rewriters_apply_before_routing(tmp_path):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            (sink,) = await start_sinks(nursery, 1)
            output = new_output(
                tmp_path,
                {
                    "blocklist": ["prefix apps."],
                    "rewriters": [{"old": "/^servers\\.(web\\d)\\./", "new": "hosts.$1."}],
                    "routes": [
                        {
                            "key": "all",
                            "type": "send_all_match",
                            "destinations": [fast_destination(sink.address)],
                        }
                    ],
                },
            )
            async with running_output(output) as pipeline:
                assert await send(pipeline, graphite_batch(PATHS))
                await sink.wait_for(300)
            assert sink.paths == [p.replace("servers.", "hosts.", 1) for p in PATHS[:300]]
            assert output.counters.blocked == 200
            nursery.cancel_scope.cancel()


async def test_aggregator_output_is_routed_and_late_points_counted(tmp_path):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            (sink,) = await start_sinks(nursery, 1)
            # The aggregators' clock stays before the points' buckets until they are in: a tick in between
            # would close the buckets (wait = 0s) and make every point late.
            wall_clock = [1_699_999_000.0]
            output = new_output(
                tmp_path,
                {
                    "aggregators": [
                        {
                            "function": "sum",
                            "regex": "^servers\\.web\\d\\.cpu\\.core\\d\\.load$",
                            "format": "servers.all.cpu.load",
                            "interval": "10s",
                            "wait": "0s",
                            "drop_raw": True,
                        }
                    ],
                    "routes": [
                        {
                            "key": "all",
                            "type": "send_all_match",
                            "destinations": [fast_destination(sink.address)],
                        }
                    ],
                },
                aggregation_tick=0.01,
                wall_clock=lambda: wall_clock[0],
            )
            paths = ["servers.web1.cpu.core0.load"] * 20 + ["other.metric"]
            async with running_output(output) as pipeline:
                # Timestamps 1_700_000_000 .. +20 s: buckets ...000 and ...010 (10 points each) and ...020.
                assert await send(pipeline, graphite_batch(paths))
                wall_clock[0] = 1_700_000_030.0  # every bucket is over: the next tick emits them
                await sink.wait_for(3)
                # The buckets were flushed (their time is long past): a point for one of them is late.
                assert await send(pipeline, graphite_batch(["servers.web2.cpu.core1.load"]))
                await wait_until(lambda: output.state.aggregators[0].late_points == 1)
            got = Counter((p, v, t) for p, v, t in sink.points)
            assert got == Counter(
                {
                    ("other.metric", 20.0, 1_700_000_020): 1,
                    ("servers.all.cpu.load", float(sum(range(10))), 1_700_000_000): 1,
                    ("servers.all.cpu.load", float(sum(range(10, 20))), 1_700_000_010): 1,
                }
            )
            nursery.cancel_scope.cancel()
