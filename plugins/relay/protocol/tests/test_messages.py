"""Relay messages: conversion to and from agent.model.Batch, schema evolution, value constraints."""

import msgspec
import pytest

from agent.model import LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, Batch, Consumer, Resource, Series
from agent_plugins.relay.protocol import (
    Ack,
    BatchMessage,
    ClientMessage,
    FrameDecoder,
    FrameEncoder,
    Hello,
    InvalidBatchError,
    MalformedMessageError,
    ServerMessage,
    UndefinedMetricError,
    WireSeries,
    batch_from_wire,
    batch_to_wire,
)

T0 = 1_700_000_000_000_000_000


def frame_of(body: list) -> bytes:
    """A frame around a hand-built body, to send what our own encoder never would."""
    encoded = msgspec.msgpack.encode(body)
    return len(encoded).to_bytes(4, "big") + encoded


def model_batch() -> Batch:
    return Batch(
        [
            Series(
                "rapl_energy",
                Resource("cpu_package", "0"),
                LOCAL_MACHINE_CONSUMER,
                {"domain": "pkg"},
                [T0, T0 + 1],
                [1.5, 2.5],
            ),
            Series("cpu_time", LOCAL_MACHINE, Consumer("process", "42"), {}, [T0], [7]),
            Series(
                ["carbon.a.cpu", "carbon.a.mem"],
                LOCAL_MACHINE,
                LOCAL_MACHINE_CONSUMER,
                {"relay": "graphite"},
                [T0, T0],
                [0.1, 3],
            ),
        ]
    )


IDS = {"rapl_energy": 0, "cpu_time": 5}
NAMES_ON_SERVER = {0: "rapl_energy", 5: "cpu_time_relay-client-node7"}


def test_batch_crosses_the_wire_with_names_mapped_by_id():
    batch = model_batch()
    frame = FrameEncoder().encode(batch_to_wire(3, batch, IDS))
    [message] = FrameDecoder(ClientMessage).feed(frame)
    received = batch_from_wire(message, NAMES_ON_SERVER)
    assert message.seq == 3
    assert [s.metric for s in message.series] == [0, 5, ["carbon.a.cpu", "carbon.a.mem"]]
    assert [s.metric for s in received.series] == [
        "rapl_energy",
        "cpu_time_relay-client-node7",
        ["carbon.a.cpu", "carbon.a.mem"],
    ]
    for sent, got in zip(batch.series, received.series, strict=True):
        assert (got.resource, got.consumer, got.attributes) == (sent.resource, sent.consumer, sent.attributes)
        assert (got.timestamps, got.values) == (sent.timestamps, sent.values)
    assert [type(v) for v in received.series[2].values] == [float, int]


def test_conversion_shares_the_point_columns_instead_of_copying_them():
    batch = model_batch()
    wire = batch_to_wire(1, batch, IDS)
    back = batch_from_wire(wire, NAMES_ON_SERVER)
    for model_series, wire_series, back_series in zip(batch.series, wire.series, back.series, strict=True):
        assert wire_series.timestamps is model_series.timestamps is back_series.timestamps
        assert wire_series.values is model_series.values is back_series.values
    assert back.series[2].metric is batch.series[2].metric


def test_a_metric_without_client_id_cannot_be_sent():
    with pytest.raises(
        UndefinedMetricError,
        match=r"^batch 9: metric 'cpu_time' has no client id; send its MetricDefs first$",
    ):
        batch_to_wire(9, model_batch(), {"rapl_energy": 0})


def test_a_metric_id_not_defined_in_the_session_is_named():
    wire = batch_to_wire(9, model_batch(), IDS)
    with pytest.raises(
        UndefinedMetricError, match=r"^batch 9 series 1: metric id 5 was not defined in this session$"
    ):
        batch_from_wire(wire, {0: "rapl_energy"})


@pytest.mark.parametrize(
    ("series", "error"),
    [
        (
            WireSeries(0, LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, {}, [T0, T0], [1.0]),
            "batch 4 series 0: 1 values for 2 timestamps",
        ),
        (
            WireSeries(["a", "b", "c"], LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, {}, [T0, T0], [1, 2]),
            "batch 4 series 0: 3 metric names for 2 timestamps",
        ),
    ],
)
def test_columns_of_different_lengths_are_an_invalid_batch(series, error):
    with pytest.raises(InvalidBatchError) as caught:
        batch_from_wire(BatchMessage(4, [series]), {0: "x"})
    assert str(caught.value) == error


def test_an_empty_batch_is_valid():
    assert batch_from_wire(BatchMessage(1, []), {}) == Batch([])


# --- schema evolution: new fields go at the end, with defaults ----------------------------------------


def test_a_message_from_a_newer_peer_with_extra_trailing_fields_decodes():
    newer_hello = ["hello", 1, "node-7", "stream", "0.2.0", "token", {"compression": "zstd"}, 99]
    newer_series = [0, ["cpu_core", "1"], ["local_machine", ""], {}, [T0], [1.0], "a future field"]
    decoder = FrameDecoder(ClientMessage)
    messages = list(decoder.feed(frame_of(newer_hello) + frame_of(["batch", 8, [newer_series], "future"])))
    assert messages[0] == Hello(1, "node-7", "stream", "0.2.0", "token")
    assert messages[1] == BatchMessage(
        8, [WireSeries(0, Resource("cpu_core", "1"), LOCAL_MACHINE_CONSUMER, {}, [T0], [1.0])]
    )


def test_a_message_without_trailing_default_fields_decodes_with_the_defaults():
    """Old bytes keep decoding when a field with a default is appended (token is the example)."""
    [hello] = FrameDecoder(ClientMessage).feed(frame_of(["hello", 1, "node-7", "stream", "0.1.0"]))
    assert hello.token is None
    [series_message] = FrameDecoder(ClientMessage).feed(
        frame_of(["batch", 1, [[0, ["dram"], ["local_machine"], {}, [], []]]])
    )
    assert series_message.series[0].resource == Resource("dram", "")


# --- constraints checked by the decoder ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message_type", "error"),
    [
        (
            ["batch", 0, []],
            ClientMessage,
            r"^invalid 'batch' message: Expected `int` >= 1 - at `\$\[1\]` \(field 'seq'\)$",
        ),
        (
            ["batch", 1, [[-1, ["dram", ""], ["local_machine", ""], {}, [], []]]],
            ClientMessage,
            r"Expected `int` >= 0 - at `\$\[2\]\[0\]\[0\]`",
        ),
        (
            ["defs", {-3: ["m", "W", "float", ""]}],
            ClientMessage,
            r"Expected `int` >= 0 - at `key` in `\$\[1\]`",
        ),
        (
            ["defs", {0: ["m", "W", "double", ""]}],
            ClientMessage,
            r"Invalid enum value 'double' - at `\$\[1\]\[\.\.\.\]\[2\]`",
        ),
        (
            ["ack", -1],
            ServerMessage,
            r"^invalid 'ack' message: Expected `int` >= 0 - at `\$\[1\]` \(field 'seq'\)$",
        ),
        (
            ["accept", 1, "v", "s", 0, 0, 100, 64, 5000],
            ServerMessage,
            r"Expected `int` >= 1024 - at `\$\[6\]` \(field 'max_frame_size'\)$",
        ),
        (
            ["accept", 1, "v", "s", 0, 0, 2**32, 64, 5000],
            ServerMessage,
            r"Expected `int` <= 4294967295 - at `\$\[6\]`",
        ),
        (
            ["accept", 1, "v", "s", 0, 0, 2**20, 0, 5000],
            ServerMessage,
            r"Expected `int` >= 1 - at `\$\[7\]` \(field 'max_in_flight'\)$",
        ),
    ],
)
def test_out_of_range_values_are_refused_with_their_place(body, message_type, error):
    with pytest.raises(MalformedMessageError, match=error):
        list(FrameDecoder(message_type).feed(frame_of(body)))


def test_ack_zero_means_nothing_acknowledged_yet():
    assert list(FrameDecoder(ServerMessage).feed(frame_of(["ack", 0]))) == [Ack(0)]
