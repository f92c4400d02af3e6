"""Pure parts of graphite-in: points to series, and chunk boundaries that never change what arrives."""

from __future__ import annotations

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.model import LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, Batch
from agent_plugins.graphite.graphite_in.listeners import GraphiteInput, ListenerSettings
from agent_plugins.graphite.graphite_in.series import graphite_series
from agent_plugins.graphite.protocol.plaintext import parse_chunk

NS = 1_000_000_000


def test_untagged_points_are_one_series_with_the_columns_as_they_are() -> None:
    paths, timestamps, values = ["a.b", "c.d"], [1 * NS, 2 * NS], [1.0, 2.0]
    [series] = graphite_series(paths, timestamps, values, {})
    assert series.metric is paths and series.timestamps is timestamps and series.values is values
    assert (series.resource, series.consumer, series.attributes) == (
        LOCAL_MACHINE,
        LOCAL_MACHINE_CONSUMER,
        {},
    )


def test_tagged_points_are_grouped_by_tag_set_with_the_tags_as_attributes() -> None:
    chunk = parse_chunk(
        b"plain.one 1 1\n"
        b"cpu;host=a 2 2\n"
        b"mem;host=a 3 3\n"
        b"cpu;host=b;dc=eu 4 4\n"
        b"plain.two 5 5\n"
        b"disk;dc=eu;host=b 6 6\n",
        now_ns=0,
    )
    series = graphite_series(chunk.paths, chunk.timestamps, chunk.values, chunk.tagged)
    assert [(s.metric, s.attributes, s.values) for s in series] == [
        (["plain.one", "plain.two"], {}, [1.0, 5.0]),
        (["cpu;host=a", "mem;host=a"], {"host": "a"}, [2.0, 3.0]),
        (["cpu;dc=eu;host=b", "disk;dc=eu;host=b"], {"dc": "eu", "host": "b"}, [4.0, 6.0]),
    ]
    assert [s.timestamps for s in series] == [[1 * NS, 5 * NS], [2 * NS, 3 * NS], [4 * NS, 6 * NS]]


def test_one_tag_set_for_the_whole_chunk_is_one_series_and_attributes_are_copies() -> None:
    chunk = parse_chunk(b"cpu;host=a 1 1\nmem;host=a 2 2\n", now_ns=0)
    [series] = graphite_series(chunk.paths, chunk.timestamps, chunk.values, chunk.tagged)
    assert series.metric == ["cpu;host=a", "mem;host=a"] and series.attributes == {"host": "a"}
    series.attributes["host"] = "changed"
    assert chunk.tagged["cpu;host=a"].tags == {"host": "a"}


def test_no_points_no_series() -> None:
    assert graphite_series([], [], [], {}) == []


LINE = st.one_of(
    st.builds(
        lambda name, value, ts: f"{name} {value} {ts}",
        st.from_regex(r"[a-z]{1,5}(\.[a-z0-9]{1,5}){0,3}(;[a-z]{1,3}=[a-z0-9]{1,3}){0,2}", fullmatch=True),
        st.one_of(st.integers(-1000, 1000), st.floats(allow_nan=False, allow_infinity=False, width=32)),
        st.one_of(st.integers(0, 2**32 - 1), st.just(-1)),
    ),
    st.text(st.characters(codec="ascii"), max_size=30),  # mostly bad lines
)


class _ListSink:
    def __init__(self) -> None:
        self.batches: list[Batch] = []

    async def send(self, batch: Batch, on_done: object = None) -> None:
        self.batches.append(batch)


@settings(max_examples=150)
@given(
    lines=st.lists(LINE, max_size=40),
    crlf=st.booleans(),
    cuts=st.lists(st.integers(0, 2000), max_size=10),
)
def test_where_tcp_cuts_the_stream_never_changes_the_points(
    lines: list[str], crlf: bool, cuts: list[int]
) -> None:
    data = ("\r\n" if crlf else "\n").join(lines).encode() + b"\n"
    expected = parse_chunk(data, now_ns=123)
    pieces = []
    previous = 0
    for cut in sorted({min(c, len(data)) for c in cuts}) + [len(data)]:
        pieces.append(data[previous:cut])
        previous = cut

    async def main() -> _ListSink:
        source = GraphiteInput(ListenerSettings(read_size=64))
        sink = _ListSink()
        client, server = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source.serve_connection, "plaintext", server, "memory:1", sink)
            for piece in pieces:
                if piece:
                    await client.send_all(piece)
                    await trio.testing.wait_all_tasks_blocked()
            await client.aclose()
        assert source.counters["plaintext"].bad == expected.bad_counts
        return sink

    sink = trio.run(main)
    got = [(name, value) for batch in sink.batches for name, _, value, _ in batch.points()]
    # Series group points by tag set, so only the order among points of one path is kept.
    assert sorted(got, key=lambda p: p[0]) == sorted(
        zip(expected.paths, expected.values, strict=True), key=lambda p: p[0]
    )
