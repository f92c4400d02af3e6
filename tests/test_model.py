"""The data model: the metric registry's rules, columnar batches and the batch builder."""

from __future__ import annotations

import msgspec
import pytest

from agent.model import (
    LOCAL_MACHINE,
    LOCAL_MACHINE_CONSUMER,
    Batch,
    Consumer,
    MetricConflictError,
    MetricDef,
    MetricRegistry,
    Resource,
    Series,
)
from agent.plugin import BatchBuilder


def test_registering_the_same_definition_twice_returns_the_same_id() -> None:
    registry = MetricRegistry()
    power = registry.register(MetricDef("rapl_power", "W", "float", "power"))
    energy = registry.register(MetricDef("rapl_consumed_energy", "J", "float", "energy"))
    assert (power, energy) == (0, 1)
    assert registry.register(MetricDef("rapl_power", "W", "float", "power")) == power
    # The description is documentation: another wording is the same metric.
    assert registry.register(MetricDef("rapl_power", "W", "float", "mean power")) == power
    assert len(registry) == 2 and registry.get("rapl_power").description == "power"
    assert registry.id_of("rapl_consumed_energy") == energy and registry.by_id(energy).unit == "J"
    assert "rapl_power" in registry and "nope" not in registry and registry.get("nope") is None
    assert [d.name for d in registry] == ["rapl_power", "rapl_consumed_energy"]


@pytest.mark.parametrize(
    ("conflicting", "message"),
    [
        (
            MetricDef("rapl_power", "J", "float"),
            "metric 'rapl_power' is already registered as (unit='W', type=float), not (unit='J', type=float)",
        ),
        (
            MetricDef("rapl_power", "W", "int"),
            "metric 'rapl_power' is already registered as (unit='W', type=float), not (unit='W', type=int)",
        ),
    ],
)
def test_a_conflicting_definition_is_a_clear_error(conflicting: MetricDef, message: str) -> None:
    registry = MetricRegistry()
    registry.register(MetricDef("rapl_power", "W", "float"))
    with pytest.raises(MetricConflictError) as info:
        registry.register(conflicting)
    assert str(info.value) == message
    assert len(registry) == 1 and registry.get("rapl_power").unit == "W"


def test_register_or_rename_keeps_both_definitions() -> None:
    registry = MetricRegistry()
    registry.register(MetricDef("temperature", "Cel", "float"))
    assert registry.register_or_rename(MetricDef("temperature", "[degF]", "float"), "node2") == (
        1,
        "temperature_node2",
    )
    assert registry.register_or_rename(MetricDef("temperature", "Cel", "float"), "node3") == (
        0,
        "temperature",
    )


def test_batch_length_counts_points_and_points_yields_each() -> None:
    per_point_names = Series(["a.b", "c.d"], LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, {}, [1, 2], [1.5, 2.5])
    one_name = Series(
        "m", Resource("cpu_core", "3"), Consumer("process", "42"), {"k": True}, [5, 6, 7], [1, 2, 3]
    )
    batch = Batch([per_point_names, one_name])
    assert len(batch) == 5
    assert [(name, ts, value) for name, ts, value, _ in batch.points()] == [
        ("a.b", 1, 1.5),
        ("c.d", 2, 2.5),
        ("m", 5, 1),
        ("m", 6, 2),
        ("m", 7, 3),
    ]


def test_batches_travel_as_columns_through_msgspec() -> None:
    batch = Batch(
        [
            Series(
                "cpu_percent",
                Resource("cpu_core", "0"),
                LOCAL_MACHINE_CONSUMER,
                {"a": 1, "b": "x", "c": 0.5, "d": False},
                [1, 2],
                [3.5, 4],
            ),
            Series(["x.y", "z"], LOCAL_MACHINE, Consumer("cgroup", "/sys"), {}, [1, 2], [0, -1]),
        ]
    )
    encoded = msgspec.msgpack.encode(batch)
    assert msgspec.msgpack.decode(encoded, type=Batch) == batch
    # Per series, the metric, resource, consumer and attributes once, then two parallel arrays.
    assert msgspec.to_builtins(batch.series[0]) == [
        "cpu_percent",
        ["cpu_core", "0"],
        ["local_machine", ""],
        {"a": 1, "b": "x", "c": 0.5, "d": False},
        [1, 2],
        [3.5, 4],
    ]


def test_batch_builder_groups_points_into_series() -> None:
    builder = BatchBuilder()
    core0 = Resource("cpu_core", "0")
    builder.add("cpu_percent", 10.0, 1, core0, LOCAL_MACHINE_CONSUMER)
    builder.add("load_average", 0.5, 1, LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, {"window": "1m", "x": 1})
    builder.add("cpu_percent", 20.0, 2, core0, LOCAL_MACHINE_CONSUMER)
    builder.add("load_average", 0.7, 2, LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, {"x": 1, "window": "1m"})
    builder.add("cpu_percent", 30.0, 2, Resource("cpu_core", "1"), LOCAL_MACHINE_CONSUMER)
    assert len(builder) == 5
    batch = builder.take()
    assert [(s.metric, s.resource.id, s.timestamps, s.values) for s in batch.series] == [
        ("cpu_percent", "0", [1, 2], [10.0, 20.0]),
        ("load_average", "", [1, 2], [0.5, 0.7]),
        ("cpu_percent", "1", [2], [30.0]),
    ]
    assert len(builder) == 0 and builder.take().series == []
