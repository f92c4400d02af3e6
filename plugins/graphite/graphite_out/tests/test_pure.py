"""The pure parts of graphite-out: path templates, rendering, spool records, replay pacing, drop counting,
config checks. No sockets."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import DropCounter
from agent.config import ConfigError
from agent.decoding import MalformedData
from agent.model import Consumer, Resource, Series
from agent_plugins.graphite.graphite_out.config import parse_listen_address
from agent_plugins.graphite.graphite_out.destination import (
    Destination,
    ReplayPacer,
    spool_directory_name,
)
from agent_plugins.graphite.graphite_out.render import Chunk, ChunkCodec, PathTemplate, render_plaintext, take
from agent_plugins.graphite.graphite_out.testing import make_config
from agent_plugins.graphite.protocol.hashing import parse_destination
from agent_plugins.graphite.protocol.routing import DestinationConfig


def series(metric="cpu_percent", kind="cpu_core", rid="0", attributes=None, consumer=("local_machine", "")):
    return Series(metric, Resource(kind, rid), Consumer(*consumer), attributes or {}, [0], [1.0])


def test_default_template_drops_empty_fields_and_their_dots():
    template = PathTemplate()
    assert template.render(series()) == "cpu_percent.cpu_core.0"
    assert PathTemplate(prefix="agents").render(series(attributes={"relay_client": "web1"})) == (
        "agents.web1.cpu_percent.cpu_core.0"
    )
    assert template.render(series(kind="local_machine", rid="")) == "cpu_percent.local_machine"


def test_fields_are_cleaned_so_they_never_add_levels_spaces_or_newlines():
    template = PathTemplate("{prefix}.{host}.{metric}.{consumer_kind}-{consumer_id}", prefix="a b..c")
    path = template.render(
        series(metric="disk.read bytes", attributes={"host": "web 1\n"}, consumer=("process", "/usr/bin/x y"))
    )
    assert path == "a_b.c.web_1_.disk_read_bytes.process-_usr_bin_x_y"


def test_literal_text_and_non_string_attributes():
    template = PathTemplate("stats.{metric}.core_{core}.{enabled}")
    assert template.render(series(attributes={"core": 3, "enabled": True})) == "stats.cpu_percent.core_3.True"
    # A part with literal text is kept even when its field is empty.
    assert template.render(series()) == "stats.cpu_percent.core_"


def test_what_the_template_does_not_use_still_reaches_the_path():
    cpu = series(metric="cpu_time_total", attributes={"state": "user", "relay_client": "web1"})
    process = series(metric="process_cpu", kind="local_machine", rid="", consumer=("process", "4242"))
    appended, tagged, dropped = (PathTemplate(extra_fields=mode) for mode in ("append", "tags", "drop"))
    assert appended.render(cpu) == "web1.cpu_time_total.cpu_core.0.user"
    assert tagged.render(cpu) == "web1.cpu_time_total.cpu_core.0;state=user"
    assert dropped.render(cpu) == "web1.cpu_time_total.cpu_core.0"
    assert appended.render(process) == "process_cpu.local_machine.process.4242"
    assert tagged.render(process) == "process_cpu.local_machine;consumer_kind=process;consumer_id=4242"
    # Sorted by attribute name, so the path does not depend on the order attributes were set in.
    two = series(attributes={"z": "last", "a": "first"})
    assert appended.render(two) == "cpu_percent.cpu_core.0.first.last"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{metric", "unbalanced brace"),
        ("{metric}.}", "unbalanced brace"),
        ("a.b", "no field"),
        ("{me tric}", "field"),
    ],
)
def test_bad_templates_are_refused(template, message):
    with pytest.raises(ValueError, match=message):
        PathTemplate(template)


def test_bad_template_in_config_names_the_key():
    with pytest.raises(ConfigError, match="plugins.graphite-out: .*template"):
        make_config({"template": "{metric"})


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"admin_http": "8081"}, "admin_http"),
        ({"admin_line": "localhost:99999"}, "admin_line"),
        ({"routes": [{"key": "a", "type": "broadcast", "destinations": []}]}, "at least one destination"),
        ({"routes": [{"key": "a", "type": "broadcast", "destinations": ["h:1"], "spool": True}]}, "spool"),
        ({"routes": [{"key": "a", "type": "fanout", "destinations": ["h:1"]}]}, "routes"),
        (
            {"routes": [{"key": "a", "type": "broadcast", "destinations": ["h:1"]}] * 2},
            "two routes have the key 'a'",
        ),
        (
            {
                "aggregators": [
                    {"function": "sum", "regex": "(", "format": "x", "interval": "10s", "wait": "1s"}
                ]
            },
            "regular",
        ),
        ({"flush_interval": "-1s"}, "flush_interval"),
        ({"extra_fields": "keep"}, "extra_fields"),
    ],
)
def test_config_errors_name_what_is_wrong(table, message):
    with pytest.raises(ConfigError, match=message):
        make_config(table)


def test_a_minimal_route_uses_every_default():
    config = make_config(
        {"routes": [{"key": "carbon", "type": "consistent_hashing", "destinations": ["10.0.0.1:2003:a"]}]}
    )
    (destination,) = config.routes[0].destination_configs
    assert (
        destination.spool and config.routes[0].format == "plaintext" and config.routes[0].hash == "carbon_ch"
    )


def test_listen_addresses():
    assert parse_listen_address("", "x") is None
    assert str(parse_listen_address("127.0.0.1:8081", "x")) == "127.0.0.1:8081"
    assert str(parse_listen_address("[::1]:0", "x")) == "[::1]:0"


def test_plaintext_lines_are_exact_and_tagged_paths_verbatim():
    chunk = Chunk(["a.b;dc=eu;host=x", "c.d"], [1_700_000_000, 1_700_000_001], [1.5, 7])
    assert (
        render_plaintext([chunk, Chunk([], [], [])]) == b"a.b;dc=eu;host=x 1.5 1700000000\nc.d 7 1700000001\n"
    )
    assert render_plaintext([]) == b""


@given(
    st.lists(
        st.tuples(
            st.text(
                alphabet=st.characters(blacklist_characters=" \n", blacklist_categories=("Cs",)), min_size=1
            ),
            st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.floats()),
            st.integers(min_value=0, max_value=2**32 - 1),
        ),
        max_size=30,
    )
)
def test_plaintext_numbers_parse_back_to_the_same_values(points):
    chunk = Chunk([p for p, _, _ in points], [t for _, _, t in points], [v for _, v, _ in points])
    text = render_plaintext([chunk]).decode()
    lines = text.split("\n")
    assert lines[-1] == "" and len(lines) == len(points) + 1
    for line, (path, value, timestamp) in zip(lines, points, strict=False):
        got_path, got_value, got_timestamp = line.split(" ")
        assert got_path == path and int(got_timestamp) == timestamp
        # carbon reads the value with float(): it must give the same number (NaN as NaN).
        assert float(got_value) == float(value) or (value != value and float(got_value) != float(got_value))


def test_take_keeps_order_and_shares_a_full_selection():
    chunk = Chunk(["a", "b", "c"], [1, 2, 3], [1.0, 2.0, 3.0])
    assert take(chunk, [2, 0]) == Chunk(["c", "a"], [3, 1], [3.0, 1.0])
    assert take(chunk, [0, 1, 2]) is chunk


@given(
    st.lists(
        st.tuples(
            st.text(min_size=1),
            st.integers(min_value=0, max_value=2**32 - 1),
            st.one_of(st.integers(min_value=-(2**62), max_value=2**62), st.floats(allow_nan=False)),
        ),
        max_size=50,
    )
)
def test_spool_records_round_trip(points):
    codec = ChunkCodec()
    chunk = Chunk([p for p, _, _ in points], [t for _, t, _ in points], [v for _, _, v in points])
    assert codec.decode(codec.encode(chunk)) == chunk


def test_spool_record_that_is_not_a_chunk_is_an_error():
    with pytest.raises(MalformedData):
        ChunkCodec().decode(b"\xc1garbage")
    # [["\x80"], [1], [1.0]]: a path that is not UTF-8.
    with pytest.raises(MalformedData, match="^a string is not valid UTF-8$"):
        ChunkCodec().decode(b"\x93\x91\xa1\x80\x91\x01\x91\xcb" + bytes(8))


def test_an_unreadable_spool_record_is_skipped_and_the_others_replayed(tmp_path):
    destination = Destination(
        "r", DestinationConfig(address="10.0.0.1:2003"), "plaintext", tmp_path, owner=None
    )
    assert destination._decode(b"\x93\x91\xa1\x80\x91\x01\x91\xcb" + bytes(8)) is None
    assert destination._decode(b"\xc1garbage") is None
    good = Chunk(["a.b"], [1], [2.0])
    assert destination._decode(destination.codec.encode(good)) == good


def test_spool_directory_names():
    assert spool_directory_name("carbon", parse_destination("10.0.0.1:2003:a")) == "carbon_10.0.0.1_2003_a"
    assert spool_directory_name("r", parse_destination("[::1]:2003")) == "r___1_2003"
    assert spool_directory_name("r", parse_destination("h:1:../../x")) == "r_h_1_.._.._x"


def test_replay_pacer_holds_the_rate_and_adds_live_traffic():
    pacer = ReplayPacer(rate=1000.0, now=0.0, burst=1.0)
    assert pacer.reserve(1000, 0.0) == 0.0  # the saved-up second
    assert pacer.reserve(500, 0.0) == pytest.approx(0.5)  # then 1000 points/s
    assert pacer.reserve(500, 0.5) == pytest.approx(0.5)
    pacer.credit(2000)  # live points went to the spool meanwhile: they may go on top of the rate
    assert pacer.reserve(2000, 1.0) == 0.0
    assert pacer.reserve(1000, 1.0) == pytest.approx(1.0)
    # An idle spell saves up at most `burst` seconds of rate.
    assert pacer.reserve(1000, 100.0) == 0.0
    assert pacer.reserve(1000, 100.0) == pytest.approx(1.0)


def test_drop_counter_logs_the_first_drop_then_summaries(caplog):
    counter = DropCounter("dest x", logging.getLogger("test"))
    with caplog.at_level(logging.WARNING):
        counter.add("queue_full", 10)
        counter.add("queue_full", 5)
        counter.add("spool_full", 3)
        counter.add("queue_full", 0)
    assert counter.by_reason == {"queue_full": 15, "spool_full": 3} and counter.total == 18
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "dropped 10 points (queue_full)" in messages[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        counter.flush()
    assert [r.getMessage() for r in caplog.records] == [
        "dest x: dropped 5 points (queue_full); 15 dropped for this reason so far"
    ]


def test_aggregation_rules_file_relative_to_the_config_folder(tmp_path):
    from agent_plugins.graphite.graphite_out.output import GraphiteOutput

    (tmp_path / "aggregation-rules.conf").write_text(
        "# carbon's format\n<env>.applications.<app>.all.requests (60) = sum <env>.applications.<app>.*.requests\n"
    )
    config = make_config({"aggregation_rules": "aggregation-rules.conf"})
    output = GraphiteOutput(config, spool_dir=tmp_path / "spool", config_dir=tmp_path)
    (aggregator,) = output.state.aggregators
    assert (aggregator.config.function, aggregator.config.format) == (
        "sum",
        "${env}.applications.${app}.all.requests",
    )
    assert aggregator.config.interval == 60 and aggregator.config.wait == 120


def test_a_bad_aggregation_rules_file_names_the_file_and_line(tmp_path):
    from agent_plugins.graphite.graphite_out.output import GraphiteOutput

    (tmp_path / "rules.conf").write_text("\nfoo.bar (10) = median foo.*\n")
    with pytest.raises(ValueError, match=r"rules.conf:2: unknown method 'median'"):
        GraphiteOutput(
            make_config({"aggregation_rules": "rules.conf"}), spool_dir=tmp_path, config_dir=tmp_path
        )
    with pytest.raises(ValueError, match="aggregation_rules: cannot read"):
        GraphiteOutput(
            make_config({"aggregation_rules": "missing.conf"}), spool_dir=tmp_path, config_dir=tmp_path
        )


async def test_records_the_writer_read_before_their_append_returned_are_not_counted_as_spool_full(tmp_path):
    """The race seen in CI: the writer read and committed spooled records while the worker thread that
    appended them had not yet returned; they then entered the index behind the committed position and
    1100 replayed points were reported as dropped (spool_full)."""
    destination: Destination

    async def append_then_writer_reads(fn):
        result = fn()
        spool = destination.spool
        if spool is not None and spool.last_seq:
            # What the writer does meanwhile: reads everything and commits it.
            spool.commit(spool.last_seq)
            destination._drop_index_through(spool.last_seq)
        return result

    destination = Destination(
        "r",
        DestinationConfig(address="10.0.0.1:2003"),
        "plaintext",
        tmp_path,
        owner=None,
        run_blocking=append_then_writer_reads,
    )
    destination._to_spool([Chunk(["a.b"] * 3, [1, 2, 3], [1.0, 2.0, 3.0])])
    await destination._append_to_spool()
    assert destination.drops.by_reason.get("spool_full", 0) == 0
