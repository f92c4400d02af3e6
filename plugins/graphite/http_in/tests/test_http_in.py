"""http-in over real HTTP (hypercorn on loopback, a plain http.client sender): the three paths, the
answer after the write, the status codes, gzip and its bombs, API keys; and a fuzz pass over the
bodies with hypothesis (a 400 with a one-line reason, never a crash)."""

from __future__ import annotations

import gzip
import http.client
import json
import logging

import msgspec
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import Output
from agent.batch_codec import encode_batch
from agent.config import ConfigError
from agent.model import BatchIdentity, MetricDef, MetricRegistry
from agent.testing import (
    CollectingOutput,
    make_batch,
    make_series,
    running_pipeline,
    source_element,
    start_plugin,
)
from agent_plugins.graphite.http_in.bodies import (
    BadBody,
    decode_batches_body,
    decode_graphite_body,
    decode_points_body,
)
from agent_plugins.graphite.http_in.plugin import HttpInPlugin
from agent_plugins.graphite.http_in.server import HttpIngest


def ingest(registry: MetricRegistry | None = None, **table) -> HttpIngest:
    ctx = start_plugin(
        HttpInPlugin,
        {"address": "127.0.0.1:0", **table},
        registry=registry if registry is not None else MetricRegistry(),
    )
    [element] = ctx.elements
    return element.obj


async def post(
    source: HttpIngest, path: str, body: bytes, headers: dict[str, str] | None = None, method: str = "POST"
) -> tuple[int, dict[str, str], str]:
    """One request with the standard library's client, in a thread."""
    host, port = source.bound[0].rsplit(":", 1)

    def request() -> tuple[int, dict[str, str], str]:
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read().decode()
        finally:
            connection.close()

    return await trio.to_thread.run_sync(request)


async def test_points_json_is_answered_204_once_written() -> None:
    source = ingest()
    output = CollectingOutput(delay=0.2)
    points = [
        {
            "metric": "temp",
            "value": 21.5,
            "timestamp": 1764547200.25,
            "resource": {"kind": "cpu_core", "id": "3"},
        },
        {"metric": "temp", "value": 22, "attributes": {"room": "b"}},
    ]
    async with running_pipeline([source_element(source)], [output]):
        status, _, text = await post(source, "/v1/points", json.dumps(points).encode())
        # The answer came after the (slow) output wrote: the points are there already.
        assert (status, text) == (204, "")
        assert sorted(output.values("temp")) == [21.5, 22]
    first = next(s for b in output.batches for s in b.series if s.resource.kind == "cpu_core")
    assert first.timestamps == [1764547200_250_000_000]
    assert source.registry.get("temp") is not None


async def test_a_relay_batch_keeps_its_definitions_and_identity_and_gzip_is_accepted() -> None:
    registry = MetricRegistry()
    source = ingest(registry)
    output = CollectingOutput()
    batch = make_batch(make_series("power", [1.0, 2.0]))
    body = encode_batch(batch, {"power": MetricDef("power", "W")}, BatchIdentity("node-1", "s", 9))
    async with running_pipeline([source_element(source)], [output]):
        status, _, _ = await post(
            source,
            "/v1/batches",
            gzip.compress(body),
            {"Content-Encoding": "gzip", "Content-Type": "application/msgpack"},
        )
        assert status == 204
    assert output.values("power") == [1.0, 2.0]
    assert output.batches[0].identity == BatchIdentity("node-1", "s", 9)
    assert registry.get("power") == MetricDef("power", "W")


async def test_graphite_lines_and_bad_lines_get_400_with_the_reason(caplog) -> None:
    source = ingest()
    output = CollectingOutput()
    with caplog.at_level(logging.WARNING):
        async with running_pipeline([source_element(source)], [output]):
            assert (await post(source, "/v1/graphite", b"a.b 1 1700000000\na.c 2 1700000000"))[0] == 204
            status, _, text = await post(source, "/v1/graphite", b"ok 1 1700000000\nbroken line\n")
    assert status == 400
    assert "1 bad line" in text and "field_count" in text and "\n" not in text.strip()
    assert output.values() == [1.0, 2.0]  # the refused body wrote nothing, not even its good line
    assert source.counters.bad_lines == {"field_count": 1}
    assert "refused" in caplog.text


async def test_status_codes_for_paths_methods_sizes_and_encodings() -> None:
    source = ingest(max_body="2KiB")
    async with running_pipeline([source_element(source)], [CollectingOutput()]):
        assert (await post(source, "/v2/other", b""))[0] == 404
        status, headers, _ = await post(source, "/v1/points", b"", method="GET")
        assert status == 405 and headers["allow"] == "POST"
        assert (await post(source, "/v1/points", b"[" + b" " * 4000 + b"]"))[0] == 413
        bomb = gzip.compress(b"[" + b" " * 1_000_000 + b"]")
        assert len(bomb) < 2048  # small on the wire: only decompression shows its size
        status, _, text = await post(source, "/v1/points", bomb, {"Content-Encoding": "gzip"})
        assert status == 413 and "decompressed" in text
        assert (await post(source, "/v1/points", b"[]", {"Content-Encoding": "br"}))[0] == 415
        assert (await post(source, "/v1/points", b"\x1f\x8b broken", {"Content-Encoding": "gzip"}))[0] == 400
        status, _, text = await post(source, "/v1/points", b'[{"metric": "x"}]')
        assert status == 400 and "value" in text


async def test_api_keys_are_required_and_a_named_key_names_the_client() -> None:
    source = ingest(api_keys=["sensor-7:s3cret", "anonymous-key"])
    output = CollectingOutput()
    body = json.dumps([{"metric": "m", "value": 1}]).encode()
    async with running_pipeline([source_element(source)], [output]):
        status, headers, _ = await post(source, "/v1/points", body)
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert (await post(source, "/v1/points", body, {"Authorization": "Bearer wrong"}))[0] == 401
        assert (await post(source, "/v1/points", body, {"Authorization": "Bearer s3cret"}))[0] == 204
        assert (await post(source, "/v1/points", body, {"Authorization": "Bearer anonymous-key"}))[0] == 204
    attributes = [s.attributes for b in output.batches for s in b.series]
    assert attributes == [{"http_client": "sensor-7"}, {}]


class RefusingOutput(Output):
    async def run(self, inbox, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while envs := await inbox.receive_batch():
            for env in envs:
                env.done(False)


class StuckOutput(Output):
    async def run(self, inbox, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()


async def test_503_with_retry_after_when_not_written_or_the_pipeline_is_full() -> None:
    source = ingest(write_timeout="0.3s", queue_timeout="0.3s")
    body = json.dumps([{"metric": "m", "value": 1}]).encode()
    async with running_pipeline([source_element(source)], [RefusingOutput()]):
        status, headers, text = await post(source, "/v1/points", body)
    assert status == 503 and headers["retry-after"] == "5" and "could not write" in text

    from agent import OutputConfig
    from agent.pipeline import Pipeline
    from agent.testing import output_element, partial_run

    source = ingest(write_timeout="0.3s", queue_timeout="0.3s")
    # A stuck output with a queue of one point that blocks, and room for one batch between the sources
    # and the outputs: after a few requests, the pipeline takes no more.
    stuck = output_element(StuckOutput(), "stuck", OutputConfig(queue_max_points=1, overflow="block"))
    pipeline = Pipeline([source_element(source), stuck], source_channel_size=1)
    statuses = []
    async with trio.open_nursery() as nursery:
        await nursery.start(partial_run(pipeline, 0.1))
        for _ in range(5):
            status, headers, text = await post(source, "/v1/points", body)
            statuses.append((status, text.split(" (")[0].split(";")[0]))
        pipeline.stop()
    assert statuses[0] == (503, "not written within 0.3s")
    assert (503, "the pipeline is full") in statuses


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="api_keys"):
        start_plugin(HttpInPlugin, {"api_keys": ["name:"]})
    with pytest.raises(ConfigError, match="address"):
        start_plugin(HttpInPlugin, {"address": "nowhere:port"})
    with pytest.raises(ConfigError, match="tls_client_ca"):
        start_plugin(HttpInPlugin, {"tls_client_ca": "/x"})


# -- fuzz: every body either decodes or is refused with a one-line reason ------------------------------


def _refused_cleanly(decode, body: bytes) -> None:
    try:
        decoded = decode(body)
    except BadBody as exc:
        text = str(exc)
        assert text and "\n" not in text
        return
    for series in decoded.batch.series:
        assert len(series.timestamps) == len(series.values)
        if not isinstance(series.metric, str):
            assert len(series.metric) == len(series.values)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
point_like = st.fixed_dictionaries(
    {"metric": st.text(max_size=8), "value": st.one_of(st.integers(), st.floats(), st.text(max_size=3))},
    optional={
        "timestamp": st.one_of(st.floats(), st.integers(), st.none()),
        "resource": st.one_of(st.fixed_dictionaries({"kind": st.text(max_size=4)}), json_values),
        "attributes": st.dictionaries(st.text(max_size=4), json_values, max_size=3),
    },
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.one_of(st.binary(max_size=200), st.lists(point_like, max_size=5).map(lambda v: json.dumps(v).encode()))
)
def test_fuzz_points_bodies(body: bytes) -> None:
    _refused_cleanly(lambda b: decode_points_body(b, 1_700_000_000_000_000_000), body)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.lists(json_values, max_size=8).map(msgspec.msgpack.encode),
        st.builds(
            lambda values, mutate: _mutated(
                encode_batch(make_batch(make_series("m", values, timestamps=list(range(len(values))))), {}),
                mutate,
            ),
            st.lists(st.floats(allow_nan=False), min_size=1, max_size=4),
            st.integers(min_value=0, max_value=60),
        ),
    )
)
def test_fuzz_batch_bodies(body: bytes) -> None:
    _refused_cleanly(decode_batches_body, body)


def _mutated(body: bytes, position: int) -> bytes:
    if not body:
        return body
    index = position % len(body)
    return body[:index] + bytes([body[index] ^ 0x55]) + body[index + 1 :]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=30),
            st.builds(
                lambda p, v, t: f"{p} {v} {t}".encode(),
                st.text(max_size=10),
                st.floats(),
                st.integers(min_value=-2, max_value=2**33),
            ),
        ),
        max_size=6,
    ).map(b"\n".join)
)
def test_fuzz_graphite_bodies(body: bytes) -> None:
    _refused_cleanly(lambda b: decode_graphite_body(b, 1_700_000_000_000_000_000), body)


def test_a_points_body_with_an_out_of_range_value_or_timestamp_is_refused_naming_it() -> None:
    with pytest.raises(BadBody, match=r"\$\[0\]\.value"):
        decode_points_body(b'[{"metric": "m", "value": 1e999}]', 0)
    with pytest.raises(BadBody, match="point 1: timestamp"):
        decode_points_body(b'[{"metric": "m", "value": 1}, {"metric": "m", "value": 1, "timestamp": -5}]', 0)
