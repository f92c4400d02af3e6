"""The influxdb output: line protocol encoding, and writes to Debian's real `influxd` (started by the
test on free ports with a temporary data folder), read back with InfluxQL, through an outage too."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from agent import Batch, Consumer, MetricDef, MetricRegistry, Resource
from agent.testing import CuttingProxy, make_series, running_pipeline, start_plugin
from agent_plugins.influxdb.line_protocol import encode
from agent_plugins.influxdb.plugin import InfluxdbPlugin

T0 = 1_780_000_000_000_000_000


def registry() -> MetricRegistry:
    reg = MetricRegistry()
    reg.register(MetricDef("cpu_percent", "%", "float", "CPU use"))
    reg.register(MetricDef("memory_used", "By", "int", ""))
    return reg


def value_type(name: str):
    definition = registry().get(name)
    return definition.value_type if definition else None


def test_line_protocol_puts_strings_in_tags_numbers_in_fields_and_escapes() -> None:
    batch = Batch(
        [
            make_series(
                "cpu percent,x",
                [12.5],
                timestamps=[T0],
                resource=Resource("cpu_core", "3"),
                attributes={"node name": "a=b,c", "pid": 42, "busy": True, "empty": "", "value": 1.5},
            ),
            make_series("memory_used", [2**40, float("nan")], timestamps=[T0, T0 + 1], consumer=Consumer("process", "7")),
        ]
    )
    encoded = encode([batch], value_type)
    assert encoded.body.decode().splitlines() == [
        "cpu\\ percent\\,x,consumer_kind=local_machine,node\\ name=a\\=b\\,c,resource_id=3,resource_kind=cpu_core"
        " value=12.5,pid=42i,busy=true,attr_value=1.5 1780000000000000000",
        "memory_used,consumer_id=7,consumer_kind=process,resource_kind=local_machine value=1099511627776i"
        " 1780000000000000000",
    ]
    assert (encoded.points, encoded.skipped) == (2, 1)


@given(
    st.text(min_size=1),
    st.dictionaries(st.text(min_size=1), st.one_of(st.text(), st.integers(), st.floats(), st.booleans()), max_size=5),
    st.one_of(st.integers(), st.floats()),
)
def test_every_point_is_one_line_whatever_its_names(name, attributes, value) -> None:
    encoded = encode([Batch([make_series(name, [value], timestamps=[T0], attributes=attributes)])], lambda _: None)
    # Line protocol ends a point at "\n" only (not at the other characters str.splitlines() knows).
    lines = encoded.body.decode().split("\n")[:-1]
    assert len(lines) == encoded.points == 1 - encoded.skipped
    for line in lines:
        assert line.endswith(f" {T0}") and " value=" in line


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http(method: str, url: str, **params: str) -> dict:
    data = urllib.parse.urlencode(params).encode() if method == "POST" else None
    if method == "GET":
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=5) as response:
        body = response.read()
        return json.loads(body) if body else {}


@pytest.fixture
def influxd(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("influxd")
    if binary is None:
        message = "influxd is not installed (apt-get install influxdb)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must install it")
        pytest.skip(message)
    port, rpc_port = free_port(), free_port()
    config = tmp_path / "influxdb.conf"
    config.write_text(
        f'reporting-disabled = true\nbind-address = "127.0.0.1:{rpc_port}"\n'
        f'[meta]\n  dir = "{tmp_path}/meta"\n'
        f'[data]\n  dir = "{tmp_path}/data"\n  wal-dir = "{tmp_path}/wal"\n  query-log-enabled = false\n'
        f'[http]\n  bind-address = "127.0.0.1:{port}"\n  log-enabled = false\n'
        "[monitor]\n  store-enabled = false\n"
    )
    log_file = (tmp_path / "influxd.log").open("wb")
    process = subprocess.Popen([binary, "-config", str(config)], stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=1).close()
                break
            except OSError:
                assert process.poll() is None, (tmp_path / "influxd.log").read_text()
                subprocess.run(["sleep", "0.1"], check=True)
        http("POST", f"{url}/query", q="CREATE DATABASE agent")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log_file.close()


def influxql(url: str, query: str) -> list[list]:
    result = http("GET", f"{url}/query", db="agent", q=query, epoch="ns")["results"][0]
    series = result.get("series", [])
    return [row for s in series for row in s["values"]]


async def test_points_are_written_and_read_back_with_influxql(influxd: str, tmp_path) -> None:
    ctx = start_plugin(InfluxdbPlugin, {"enable": True, "url": influxd, "flush_interval": "0s"}, data_dir=tmp_path, registry=registry())
    async with running_pipeline(ctx.elements) as pipeline:
        batch = Batch(
            [
                make_series("cpu_percent", [12.5, 13.0], timestamps=[T0, T0 + 10**9], resource=Resource("cpu_core", "3"), attributes={"relay_client": "node-1"}),
                make_series("memory_used", [2**33], timestamps=[T0], consumer=Consumer("process", "42")),
            ]
        )
        assert await pipeline.sink().send_and_wait(batch)
    rows = await trio.to_thread.run_sync(influxql, influxd, "SELECT value, relay_client, resource_id FROM cpu_percent")
    assert rows == [[T0, 12.5, "node-1", "3"], [T0 + 10**9, 13.0, "node-1", "3"]]
    rows = await trio.to_thread.run_sync(influxql, influxd, 'SELECT value FROM memory_used WHERE consumer_id = \'42\'')
    assert rows == [[T0, 2**33]]


async def test_bad_data_is_rejected_with_influxdbs_reason_and_the_output_goes_on(influxd: str, tmp_path, caplog) -> None:
    ctx = start_plugin(InfluxdbPlugin, {"enable": True, "url": influxd, "flush_interval": "0s"}, data_dir=tmp_path, registry=MetricRegistry())
    [output] = [e.obj for e in ctx.elements if e.kind == "output"]
    async with running_pipeline(ctx.elements) as pipeline:
        sink = pipeline.sink()
        assert await sink.send_and_wait(Batch([make_series("typed", [1.5], timestamps=[T0])]))
        # Now defined as an integer metric, its next value goes out as 1i: InfluxDB refuses the field
        # type conflict with a 400.
        ctx.registry.register(MetricDef("typed", "1", "int", ""))
        assert await sink.send_and_wait(Batch([make_series("typed", [1], timestamps=[T0 + 2])]))
        assert await sink.send_and_wait(Batch([make_series("after", [7.0], timestamps=[T0])]))
    assert output.rejected_points == 1
    assert "field type conflict" in caplog.text and "not retried" in caplog.text
    assert await trio.to_thread.run_sync(influxql, influxd, "SELECT value FROM after") == [[T0, 7.0]]


async def test_an_outage_mid_stream_ends_with_every_point_stored(influxd: str, tmp_path) -> None:
    parts = urllib.parse.urlsplit(influxd)
    proxy = CuttingProxy((parts.hostname, parts.port))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.run)
        ctx = start_plugin(
            InfluxdbPlugin,
            {"enable": True, "url": f"http://127.0.0.1:{port}", "flush_interval": "0s", "timeout": "2s"},
            data_dir=tmp_path,
            registry=registry(),
        )
        [output] = [e.obj for e in ctx.elements if e.kind == "output"]
        acked: list[bool] = []
        async with running_pipeline(ctx.elements) as pipeline:
            with trio.fail_after(90):
                for i in range(100):
                    await pipeline.sink().send(Batch([make_series("cpu_percent", [float(i)] * 10, timestamps=[T0 + i * 10**10 + j for j in range(10)])]), acked.append)
                    if i == 30:
                        proxy.cut()
                    if i == 60:
                        proxy.restore()
                    await trio.sleep(0.01)
                while len(acked) < 100:
                    await trio.sleep(0.05)
            counters = pipeline.self_metrics_batch()
        nursery.cancel_scope.cancel()
    assert acked == [True] * 100
    assert output.retried_writes > 0
    failures = [s.values[0] for s in counters.series if s.metric == "agent_output_write_failures_total"]
    assert failures and failures[0] > 0  # the agent's self-metrics count the retried writes
    [[_, count]] = await trio.to_thread.run_sync(influxql, influxd, "SELECT count(value) FROM cpu_percent")
    assert count == 1000  # at least once; a resent point overwrites itself (same series and time)
