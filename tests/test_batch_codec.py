"""agent.batch_codec: a batch survives the standalone encoding with its definitions and identity, and
bytes that are not one are refused with MalformedData or InvalidBatch, never another error."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.batch_codec import InvalidBatch, StandaloneBatch, WireSeries, decode_batch, encode_batch
from agent.decoding import MalformedData
from agent.model import LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, Batch, BatchIdentity, MetricDef, Series


def test_round_trip_with_definitions_identity_and_per_point_names() -> None:
    batch = Batch(
        [
            Series("power", LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, {"a": 1}, [1, 2], [1.5, 2.5]),
            Series(["g.a", "g.b"], LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, {}, [3, 4], [5, 6]),
            Series("power", LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, {}, [5], [7.0]),
        ]
    )
    body = encode_batch(batch, {"power": MetricDef("power", "W", "float", "d")}, BatchIdentity("n", "s", 4))
    message, decoded = decode_batch(body)
    assert message.metrics == [MetricDef("power", "W", "float", "d")]  # once, though used twice
    assert message.identity == BatchIdentity("n", "s", 4)
    assert decoded == batch
    # A metric without a known definition travels with the defaults; no identity reads back as None.
    message, _ = decode_batch(encode_batch(Batch([batch.series[0]]), {}))
    assert message.metrics == [MetricDef("power")] and message.identity is None


def test_the_series_encoding_is_the_relays() -> None:
    from agent_plugins.relay.protocol import messages

    assert messages.WireSeries is WireSeries


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (StandaloneBatch(2, [], []), "version 2"),
        (
            StandaloneBatch(1, [], [WireSeries(0, LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, {}, [1], [1.0])]),
            "metric id 0",
        ),
        (
            StandaloneBatch(
                1, [MetricDef("m")], [WireSeries(0, LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, {}, [1], [])]
            ),
            "0 values",
        ),
        (
            StandaloneBatch(
                1, [], [WireSeries(["a"], LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, {}, [1, 2], [1, 2])]
            ),
            "1 metric names",
        ),
    ],
)
def test_inconsistent_batches_are_refused_naming_the_problem(message: StandaloneBatch, reason: str) -> None:
    with pytest.raises(InvalidBatch, match=reason):
        decode_batch(msgspec.msgpack.encode(message))


@given(st.binary(max_size=300))
def test_random_bytes_are_refused_cleanly(data: bytes) -> None:
    try:
        decode_batch(data)
    except (MalformedData, InvalidBatch) as exc:
        assert "\n" not in str(exc)
