"""energy-attribution: the alignment and sharing functions (hypothesis), and the transform fed the
series that procfs, cgroups and energy-estimation-tdp produce, polled at different moments."""

from __future__ import annotations

import logging

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from agent import LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, Batch, Consumer, Resource, Series
from agent.testing import start_plugin
from agent_plugins.measure.energy_attribution.align import Interval, amount_in_window, parent_path, share
from agent_plugins.measure.energy_attribution.plugin import AttributionPlugin, EnergyAttribution

S = 1_000_000_000
PACKAGE = Resource("cpu_package", "")

intervals = st.lists(
    st.tuples(st.integers(0, 100), st.integers(1, 50), st.floats(0, 1000)).map(
        lambda t: Interval(t[0] * S, (t[0] + t[1]) * S, t[2])
    ),
    max_size=20,
)


@given(intervals, st.integers(0, 200))
def test_windows_that_tile_the_time_add_up_to_the_whole(deltas: list[Interval], cut: int) -> None:
    whole = amount_in_window(deltas, 0, 200 * S)
    parts = amount_in_window(deltas, 0, cut * S) + amount_in_window(deltas, cut * S, 200 * S)
    assert parts == pytest.approx(whole)
    assert whole == pytest.approx(sum(d.value for d in deltas if d.start < 200 * S))


@given(st.floats(0, 1e6), st.floats(0, 1e4), st.dictionaries(st.text(max_size=3), st.floats(0, 1e4), max_size=10))
@example(1.5, 0.0, {"": 5e-324})  # found by hypothesis: energy * seconds / total rounded up to 2.0 J
def test_shares_never_exceed_the_energy(energy: float, busy: float, cpu: dict[str, float]) -> None:
    shares = share(energy, busy, cpu)
    assert set(shares) == set(cpu)
    assert sum(shares.values()) <= energy * (1 + 1e-9) + 1e-9
    assert all(v >= 0 for v in shares.values())


def test_parent_paths() -> None:
    assert [parent_path(p) for p in ("/a/b", "/a", "/", "")] == ["/a", "/", "", ""]


def energy(t: float, joules: float) -> Series:
    return Series("estimated_energy", PACKAGE, LOCAL_MACHINE_CONSUMER, {"estimated": True}, [int(t * S)], [joules])


def kernel(t: float, busy: float, idle: float = 0.0) -> list[Series]:
    return [
        Series("kernel_cpu_time", LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, {"state": "user"}, [int(t * S)], [busy]),
        Series("kernel_cpu_time", LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, {"state": "idle"}, [int(t * S)], [idle]),
    ]


def cpu(consumer: Consumer, t: float, user: float, system: float = 0.0, **attrs: object) -> list[Series]:
    return [
        Series("cpu_time_delta", LOCAL_MACHINE, consumer, {"kind": "user", **attrs}, [int(t * S)], [user]),
        Series("cpu_time_delta", LOCAL_MACHINE, consumer, {"kind": "system", **attrs}, [int(t * S)], [system]),
    ]


def attributed(batch: Batch | None) -> dict[str, tuple[int, float, dict]]:
    assert batch is not None
    return {
        s.consumer.id: (s.timestamps[0], s.values[0], s.attributes)
        for s in batch.series
        if s.metric == "attributed_energy"
    }


P1, P2 = Consumer("process", "100"), Consumer("process", "200")


def test_energy_is_shared_by_cpu_time_at_the_energy_timestamp() -> None:
    t = EnergyAttribution(max_delay=10)
    # First polls open the intervals (zero deltas).
    t.apply(Batch([energy(0, 0.0)]))
    t.apply(Batch(kernel(0, 0.0) + cpu(P1, 0, 0.0) + cpu(P2, 0, 0.0)))
    # The energy source polls at 1 s, procfs at 1.2 s: the energy interval (0, 1] waits for the CPU.
    assert attributed(t.apply(Batch([energy(1, 100.0)]))) == {}
    out = attributed(t.apply(Batch(kernel(1.2, 1.2, 1.2) + cpu(P1, 1.2, 0.6, 0.3) + cpu(P2, 1.2, 0.3))))
    assert set(out) == {"100", "200"}
    ts, j1, attrs = out["100"]
    assert ts == 1 * S and attrs == {"estimated": True}
    # P1 used 0.9 of the 1.2 busy seconds, P2 0.3: spread evenly, the same shares over (0, 1].
    assert j1 == pytest.approx(75.0) and out["200"][1] == pytest.approx(25.0)


def test_shares_stay_within_the_energy_when_consumers_report_more_than_the_machine() -> None:
    t = EnergyAttribution(max_delay=10)
    t.apply(Batch([energy(0, 0.0)] + kernel(0, 0.0) + cpu(P1, 0, 0.0) + cpu(P2, 0, 0.0)))
    out = attributed(t.apply(Batch([energy(1, 10.0)] + kernel(1, 1.0) + cpu(P1, 1, 1.0) + cpu(P2, 1, 0.5))))
    assert sum(v for _, v, _ in out.values()) == pytest.approx(10.0)


def test_cgroups_are_shared_among_siblings() -> None:
    t = EnergyAttribution(max_delay=10)
    a, b, ab = Consumer("cgroup", "/a"), Consumer("cgroup", "/b"), Consumer("cgroup", "/a/x")
    zero = cpu(a, 0, 0.0) + cpu(b, 0, 0.0) + cpu(ab, 0, 0.0)
    t.apply(Batch([energy(0, 0.0)] + kernel(0, 0.0) + zero))
    out = attributed(
        t.apply(Batch([energy(1, 40.0)] + kernel(1, 2.0) + cpu(a, 1, 1.0) + cpu(b, 1, 1.0) + cpu(ab, 1, 1.0, job_id="7")))
    )
    assert out["/a"][1] + out["/b"][1] <= 40.0 + 1e-9
    assert out["/a/x"][1] == pytest.approx(20.0) and out["/a/x"][2] == {"job_id": "7", "estimated": True}


def test_a_short_process_first_seen_with_all_its_cpu_is_counted() -> None:
    t = EnergyAttribution(max_delay=10)
    t.apply(Batch([energy(0, 0.0)] + kernel(0, 0.0)))
    # A process that started after the first poll: its first delta is all of its CPU time.
    out = attributed(t.apply(Batch([energy(0.5, 5.0)] + kernel(0.5, 0.4, 0.6) + cpu(P1, 0.5, 0.4))))
    assert out["100"][1] == pytest.approx(5.0)


def test_a_missing_input_is_named_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    t = EnergyAttribution(max_delay=10)
    for second in range(6):
        t.apply(Batch([energy(second, 1.0)] + cpu(P1, second, 0.5)))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "kernel_cpu_time" in messages[0] and "procfs" in messages[0]


def test_no_energy_source_is_named(caplog: pytest.LogCaptureFixture) -> None:
    t = EnergyAttribution(max_delay=10)
    for second in range(4):
        t.apply(Batch(kernel(second, 0.5) + cpu(P1, second, 0.5)))
    assert "energy-estimation-tdp" in caplog.text and "rapl" in caplog.text


def test_rapl_takes_precedence_over_the_estimate() -> None:
    t = EnergyAttribution(max_delay=10)
    rapl = lambda ts, j: Series(  # noqa: E731
        "rapl_consumed_energy", Resource("cpu_package", "0"), LOCAL_MACHINE_CONSUMER, {"domain": "package"}, [int(ts * S)], [j]
    )
    t.apply(Batch([energy(0, 0.0), rapl(0, 0.0)] + kernel(0, 0.0) + cpu(P1, 0, 0.0)))
    out = attributed(t.apply(Batch([energy(1, 100.0), rapl(1, 8.0)] + kernel(1, 1.0) + cpu(P1, 1, 1.0))))
    assert out["100"][1] == pytest.approx(8.0) and out["100"][2] == {}


def test_the_plugin_registers_its_metric() -> None:
    ctx = start_plugin(AttributionPlugin, {"max_delay": "5s"})
    assert ctx.registry.get("attributed_energy").unit == "J"
    assert [e.kind for e in ctx.elements] == ["transform"]
