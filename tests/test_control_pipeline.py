"""The pipeline side of runtime control, in-process: what a disabled output means for acknowledgements,
a paused autonomous source, a disabled transform, and the tap's bounded queue."""

from __future__ import annotations

import trio

from agent.control import Controller
from agent.plugin import Transform
from agent.testing import CollectingOutput, make_batch, make_series, running_pipeline, transform_element


def batch(value: float = 1.0, metric: str = "m"):
    return make_batch(make_series(metric, [value]))


async def test_a_disabled_output_drops_and_counts_without_failing_the_acknowledgement() -> None:
    kept, disabled = CollectingOutput(), CollectingOutput()
    async with running_pipeline([], outputs=[kept, disabled]) as pipeline:
        controller = Controller(pipeline, stop=pipeline.stop)
        assert controller.act("output-1", "disable")["state"] == "disabled"
        assert await pipeline.sink().send_and_wait(batch()) is True
        assert kept.values("m") == [1.0] and disabled.values("m") == []
        assert pipeline.counters()["output-1"] == {"received": 1, "written": 0, "dropped": 1, "queued": 0}
        controller.act("output-1", "enable")
        assert await pipeline.sink().send_and_wait(batch(2.0)) is True
        assert disabled.values("m") == [2.0]


class Double(Transform):
    def apply(self, b):
        for s in b.series:
            s.values = [v * 2 for v in s.values]
        return b


async def test_a_disabled_transform_is_skipped() -> None:
    out = CollectingOutput()
    async with running_pipeline([transform_element(Double(), "double")], outputs=[out]) as pipeline:
        controller = Controller(pipeline, stop=pipeline.stop)
        await pipeline.sink().send_and_wait(batch(1.0))
        controller.act("double", "disable")
        await pipeline.sink().send_and_wait(batch(1.0))
        assert out.values("m") == [2.0, 1.0]
        assert [e["state"] for e in controller.elements()] == ["disabled", "running"]


async def test_the_tap_drops_what_does_not_fit_and_filters_by_glob() -> None:
    out = CollectingOutput()
    async with running_pipeline([], outputs=[out]) as pipeline:
        controller = Controller(pipeline, stop=pipeline.stop)
        tap = controller.open_tap("cpu_*", max_points=3)
        for i in range(5):
            await pipeline.sink().send_and_wait(batch(float(i), "cpu_user"))
        await pipeline.sink().send_and_wait(batch(9.0, "memory"))
        taken = []
        while True:
            try:
                taken.append(tap.receive.receive_nowait())
            except trio.WouldBlock:
                break
        assert [series.values[i] for series, i in taken] == [0.0, 1.0, 2.0]
        assert tap.dropped == 2
        assert len(out.values("cpu_user")) == 5  # the outputs got everything
        controller.close_tap(tap)
        assert pipeline.taps == []


async def test_flush_hands_what_the_outputs_gather_to_them_at_once() -> None:
    """An output that gathers for an hour writes at once on `flush`."""
    out = CollectingOutput()
    out.flush_interval = 3600.0
    async with running_pipeline([], outputs=[out]) as pipeline:
        controller = Controller(pipeline, stop=pipeline.stop)
        await pipeline.sink().send(batch(5.0))
        with trio.move_on_after(0.2):
            await out.wait_for_points(1)
        assert out.values("m") == []  # still gathering
        assert (await controller.handle({"action": "flush"}))["ok"]
        with trio.fail_after(5):
            await out.wait_for_points(1)
        assert out.values("m") == [5.0]


async def test_unknown_elements_and_wrong_kinds_are_refused_with_the_known_names() -> None:
    async with running_pipeline([], outputs=[CollectingOutput()]) as pipeline:
        controller = Controller(pipeline, stop=pipeline.stop)
        answer = await controller.handle({"action": "pause", "element": "nope"})
        assert (
            answer["ok"] is False and answer["code"] == "unknown-element" and answer["known"] == ["output-0"]
        )
        answer = await controller.handle({"action": "pause", "element": "output-0"})
        assert answer["ok"] is False and answer["code"] == "unsupported"
        assert (await controller.handle({"action": "what"}))["code"] == "bad-request"
        assert (await controller.handle([1, 2]))["code"] == "bad-request"
