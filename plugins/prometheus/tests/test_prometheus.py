"""The prometheus exporter: its formats, names and expiry, its HTTP endpoint, `promtool check metrics`
on its output, and the real Prometheus server scraping it and answering queries about it."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import h11
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from agent import Batch, Consumer, MetricDef, MetricRegistry, Resource, StartupError
from agent.testing import make_series, running_pipeline, start_plugin
from agent_plugins.prometheus.exposition import (
    SeriesStore,
    negotiate,
    sanitize_label_name,
    sanitize_metric_name,
)
from agent_plugins.prometheus.plugin import MetricsEndpoint, PrometheusOutput, PrometheusPlugin

T0 = 1_780_000_000_000_000_000


def registry() -> MetricRegistry:
    reg = MetricRegistry()
    reg.register(MetricDef("cpu_percent", "%", "float", "CPU use of the core"))
    reg.register(MetricDef("energy_joules_total", "J", "float", ""))
    reg.register(MetricDef("memory_used", "By", "int", ""))
    return reg


def sample_batch() -> Batch:
    return Batch(
        [
            make_series(
                "cpu_percent",
                [10.0, 12.5],
                timestamps=[T0, T0 + 10**9],
                resource=Resource("cpu_core", "3"),
                attributes={"relay_client": "node-1", "bad-name.x": 'quote " and \\ and \n', "__secret": 1},
            ),
            make_series("energy_joules_total", [1234.5], timestamps=[T0], resource=Resource("cpu_package", "0")),
            make_series("memory_used", [2**33], timestamps=[T0], consumer=Consumer("process", "42")),
            make_series("weird metric-name.1", [float("nan")], timestamps=[T0]),
        ]
    )


async def exposed(fmt_accept: str = "", timestamps: bool = False) -> str:
    store = SeriesStore()
    output = PrometheusOutput(store, registry(), 300)
    await output.write([sample_batch()])
    endpoint = MetricsEndpoint("127.0.0.1:0", store, 300, timestamps)
    request = h11.Request(method="GET", target="/metrics", headers=[("Host", "x"), ("Accept", fmt_accept)])
    status, headers, body = endpoint.respond(request)
    assert status == 200
    return body.decode()


async def test_text_format_has_help_type_sanitised_names_and_escaped_labels() -> None:
    text = await exposed("text/plain")
    assert text.splitlines() == [
        "# HELP cpu_percent CPU use of the core (from relay clients node-1)",
        "# TYPE cpu_percent gauge",
        'cpu_percent{_secret="1",bad_name_x="quote \\" and \\\\ and \\n",consumer_kind="local_machine",'
        'relay_client="node-1",resource_id="3",resource_kind="cpu_core"} 12.5',
        "# HELP energy_joules_total energy_joules_total in J (measured by this agent)",
        "# TYPE energy_joules_total counter",
        'energy_joules_total{consumer_kind="local_machine",resource_id="0",resource_kind="cpu_package"} 1234.5',
        "# HELP memory_used memory_used in By (measured by this agent)",
        "# TYPE memory_used gauge",
        'memory_used{consumer_id="42",consumer_kind="process",resource_kind="local_machine"} 8589934592',
        "# HELP weird_metric_name_1 weird metric-name.1 (measured by this agent)",
        "# TYPE weird_metric_name_1 gauge",
        'weird_metric_name_1{consumer_kind="local_machine",resource_kind="local_machine"} NaN',
    ]


async def test_openmetrics_when_asked_names_counter_families_without_total_and_ends_with_eof() -> None:
    accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    text = await exposed(accept, timestamps=True)
    lines = text.splitlines()
    assert lines[-1] == "# EOF"
    assert "# TYPE energy_joules counter" in lines
    assert 'energy_joules_total{consumer_kind="local_machine",resource_id="0",resource_kind="cpu_package"} 1234.5 1780000000.000' in lines
    assert any(line.startswith("cpu_percent{") and line.endswith(" 12.5 1780000001.000") for line in lines)


async def test_timestamps_in_the_text_format_are_milliseconds() -> None:
    text = await exposed("text/plain", timestamps=True)
    assert 'memory_used{consumer_id="42",consumer_kind="process",resource_kind="local_machine"} 8589934592 1780000000000' in text


def test_negotiation_follows_the_scrapers_preference() -> None:
    assert negotiate("") == "text"
    assert negotiate("text/plain;version=0.0.4") == "text"
    assert negotiate("application/openmetrics-text;version=1.0.0;q=0.9,text/plain;q=0.5") == "openmetrics"
    assert negotiate("application/openmetrics-text;q=0.2,text/plain;q=0.5") == "text"
    assert negotiate("application/openmetrics-text;version=2.0.0") == "text"


@given(st.text())
def test_any_name_becomes_a_valid_metric_and_label_name(name: str) -> None:
    assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", sanitize_metric_name(name))
    label = sanitize_label_name(name)
    assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", label) and not label.startswith("__")


async def test_series_not_updated_for_expire_after_leave_the_exposition(autojump_clock: trio.testing.MockClock) -> None:
    store = SeriesStore()
    output = PrometheusOutput(store, registry(), 60)
    endpoint = MetricsEndpoint("127.0.0.1:0", store, 60, False)
    request = h11.Request(method="GET", target="/metrics", headers=[("Host", "x")])
    await output.write([Batch([make_series("old_gauge", [1.0]), make_series("kept_gauge", [1.0])])])
    await trio.sleep(45)
    await output.write([Batch([make_series("kept_gauge", [2.0])])])
    await trio.sleep(30)
    body = endpoint.respond(request)[2].decode()
    assert "kept_gauge" in body and "old_gauge" not in body


async def test_huge_attribute_maps_are_refused_with_a_log_line_and_the_rest_goes_on(caplog) -> None:
    store = SeriesStore()
    output = PrometheusOutput(store, registry(), 300)
    huge = make_series("huge_gauge", [1.0], attributes={f"a{i}": i for i in range(1000)})
    await output.write([Batch([huge, make_series("fine_gauge", [1.0])])])
    assert "huge_gauge" in caplog.text and "1002 labels (at most 64)" in caplog.text
    assert set(store.families) == {"fine_gauge"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must install it")
        pytest.skip(message)
    return path


@pytest.mark.parametrize("timestamps", [False, True])
async def test_promtool_finds_nothing_to_complain_about(timestamps: bool) -> None:
    # promtool reads the text format only; the real Prometheus below reads OpenMetrics (it prefers it).
    promtool = tool("promtool")
    text = await exposed("text/plain", timestamps=timestamps)
    result = await trio.run_process([promtool, "check", "metrics"], stdin=text.encode(), capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


async def http_get(address: str, path: str, accept: str = "") -> tuple[str, dict[str, str], bytes]:
    host, port = address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
    async with stream:
        request = f"GET {path} HTTP/1.1\r\nHost: {address}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
        await stream.send_all(request.encode())
        data = b""
        async for chunk in stream:
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
    return status, headers, body


async def test_the_endpoint_serves_what_the_pipeline_wrote(tmp_path) -> None:
    ctx = start_plugin(PrometheusPlugin, {"enable": True, "address": "127.0.0.1:0"}, data_dir=tmp_path, registry=registry())
    [endpoint] = [e.obj for e in ctx.elements if e.kind == "service"]
    async with running_pipeline(ctx.elements) as pipeline:
        assert await pipeline.sink().send_and_wait(sample_batch())
        status, headers, body = await http_get(endpoint.bound[0], "/metrics")
        assert status == "HTTP/1.1 200 OK"
        assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert b"# TYPE energy_joules_total counter" in body
        status, headers, body = await http_get(endpoint.bound[0], "/metrics", "application/openmetrics-text")
        assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
        assert body.endswith(b"# EOF\n")
        status, _, _ = await http_get(endpoint.bound[0], "/nope")
        assert status.startswith("HTTP/1.1 404")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def query_prometheus(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)["data"]["result"]
    except OSError:
        return []


async def test_the_real_prometheus_scrapes_the_exporter_and_answers_queries(tmp_path: Path) -> None:
    prometheus = tool("prometheus")
    ctx = start_plugin(PrometheusPlugin, {"enable": True, "address": "127.0.0.1:0"}, data_dir=tmp_path, registry=registry())
    [endpoint] = [e.obj for e in ctx.elements if e.kind == "service"]
    async with running_pipeline(ctx.elements) as pipeline:
        await pipeline.sink().send_and_wait(sample_batch())
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            f"scrape_configs:\n  - job_name: agent\n    static_configs:\n      - targets: ['{endpoint.bound[0]}']\n"
        )
        port = free_port()
        log_file = (tmp_path / "prometheus.log").open("wb")
        process = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            with trio.fail_after(60):
                while True:
                    # Keep the series fresh while Prometheus starts and scrapes.
                    await pipeline.sink().send_and_wait(Batch([make_series("cpu_percent", [42.0], resource=Resource("cpu_core", "7"))]))
                    found = await trio.to_thread.run_sync(query_prometheus, port, 'cpu_percent{resource_id="7"}')
                    if found:
                        break
                    assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
                    await trio.sleep(0.5)
            assert found[0]["value"][1] == "42"
            assert found[0]["metric"]["job"] == "agent" and found[0]["metric"]["resource_kind"] == "cpu_core"
            counters = await trio.to_thread.run_sync(query_prometheus, port, "energy_joules_total")
            assert counters and counters[0]["value"][1] == "1234.5"
            up = await trio.to_thread.run_sync(query_prometheus, port, 'up{job="agent"}')
            assert up and up[0]["value"][1] == "1"
            # What Prometheus itself thought of the scrape: no rejected samples.
            metadata_url = f"http://127.0.0.1:{port}/api/v1/targets"
            targets = await trio.to_thread.run_sync(lambda: json.load(urllib.request.urlopen(metadata_url, timeout=5)))
            [target] = targets["data"]["activeTargets"]
            assert target["health"] == "up" and target["lastError"] == ""
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log_file.close()


async def test_declared_counters_are_exposed_as_counters_with_total() -> None:
    store = SeriesStore(counters=["energy_joules"])
    output = PrometheusOutput(store, registry(), 300)
    await output.write([Batch([make_series("energy_joules", [5.0]), make_series("power_watts", [2.0])])])
    endpoint = MetricsEndpoint("127.0.0.1:0", store, 300, False)
    body = endpoint.respond(h11.Request(method="GET", target="/metrics", headers=[("Host", "x")]))[2].decode()
    assert "# TYPE energy_joules_total counter" in body and "\nenergy_joules_total{" in body
    assert "# TYPE power_watts gauge" in body


async def test_a_busy_address_is_a_startup_error_naming_it() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        endpoint = MetricsEndpoint(address, SeriesStore(), 300, False)
        with pytest.raises(StartupError, match=f"^prometheus: cannot listen on {address}: Address already in use$"):
            await endpoint.run()
