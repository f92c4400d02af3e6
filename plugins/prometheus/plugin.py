"""The `prometheus` output: an exporter that Prometheus scrapes at `GET /metrics` on `address`.

Two elements share one `SeriesStore`: an output that keeps the latest sample of every series (a write
is an update in memory, so points are acknowledged at once) and a service, the HTTP endpoint, which
renders the store in the text format or in OpenMetrics, as the scraper's Accept header asks.

HTTP/1.1 is parsed by h11 (sans-IO, already a dependency of the agent): it enforces framing, header
limits and keep-alive rules, and this module only moves bytes between it and a trio stream.
"""

from __future__ import annotations

import gzip
import logging
from http import HTTPStatus
from typing import Any

import h11
import trio

from agent import (
    Batch,
    MetricRegistry,
    NonNegativeDuration,
    Output,
    OutputConfig,
    Plugin,
    RateLimitedLog,
    Service,
    StartContext,
    StartupError,
    hookimpl,
)
from agent.net import format_address, open_tcp_listeners, parse_address

from .exposition import (
    OPENMETRICS_CONTENT_TYPE,
    TEXT_CONTENT_TYPE,
    RefusedSeries,
    SeriesStore,
    negotiate,
    render,
    series_labels,
)

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
MAX_CONNECTIONS = 64
IDLE_TIMEOUT = 30.0


class PrometheusConfig(OutputConfig, kw_only=True):
    """The `[plugins.prometheus]` table."""

    address: str = "127.0.0.1:9091"
    expire_after: NonNegativeDuration = NonNegativeDuration(300.0)
    timestamps: bool = False
    counters: list[str] = []

    def __post_init__(self) -> None:
        parse_address(self.address)  # an AddressError names the bad text


class PrometheusOutput(Output):
    """Keeps the latest sample of every series in the shared store."""

    def __init__(self, store: SeriesStore, registry: MetricRegistry, expire_after: float) -> None:
        self.store = store
        self.registry = registry
        self.expire_after = float(expire_after)
        self.refused_series = 0
        self._refused_log = RateLimitedLog(log)
        self._labels_cache: dict[int, Any] = {}

    async def write(self, batches: list[Batch]) -> None:
        now = trio.current_time()
        store = self.store
        registry = self.registry
        for batch in batches:
            for series in batch.series:
                if not series.timestamps:
                    continue
                try:
                    labels = series_labels(series)
                except RefusedSeries as exc:
                    self.refused_series += 1
                    name = series.metric if isinstance(series.metric, str) else series.metric[0]
                    self._refused_log.log(
                        "refused", 1, "prometheus: series of %r not exposed: %s", name, exc
                    )
                    continue
                if isinstance(series.metric, str):
                    # The latest point of the series is the one to expose.
                    index = max(range(len(series.timestamps)), key=series.timestamps.__getitem__)
                    store.update(
                        series.metric,
                        registry.get(series.metric),
                        labels,
                        series.values[index],
                        series.timestamps[index],
                        now,
                    )
                else:
                    for name, timestamp, value in zip(series.metric, series.timestamps, series.values, strict=True):
                        store.update(name, registry.get(name), labels, value, timestamp, now)
        store.expire(now, self.expire_after)


class MetricsEndpoint(Service):
    """Serves `GET /metrics` (and `/` with a link to it) on the configured address."""

    def __init__(self, address: str, store: SeriesStore, expire_after: float, timestamps: bool) -> None:
        self.address = address
        self.store = store
        self.expire_after = float(expire_after)
        self.timestamps = timestamps
        self.bound: list[str] = []
        self.scrapes = 0
        self._limit = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def run(self, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            listeners = await open_tcp_listeners(self.address, what="prometheus")
        except OSError as exc:
            raise StartupError(exc.strerror or str(exc)) from None
        self.bound = [format_address(*l.socket.getsockname()[:2]) for l in listeners]  # noqa: E741
        log.info("prometheus: serving /metrics on %s", ", ".join(self.bound))
        task_status.started(self.bound)
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            if self._limit.borrowed_tokens >= self._limit.total_tokens:
                return  # too many scrapers at once: closing is the cheapest answer
            async with self._limit:
                try:
                    await self._converse(stream)
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, h11.ProtocolError):
                    pass

    async def _converse(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        while True:
            request = await self._read_request(stream, connection)
            if request is None:
                return
            status, headers, body = self.respond(request)
            if not any(name == "Content-Length" for name, _ in headers):
                headers.append(("Content-Length", str(len(body))))
            if request.method == b"HEAD":
                body = b""
            await stream.send_all(connection.send(h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase.encode())))
            if body:
                await stream.send_all(connection.send(h11.Data(data=body)))
            await stream.send_all(connection.send(h11.EndOfMessage()))
            if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                return
            connection.start_next_cycle()

    @staticmethod
    async def _read_request(stream: trio.SocketStream, connection: h11.Connection) -> h11.Request | None:
        request = None
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                with trio.fail_after(IDLE_TIMEOUT):
                    data = await stream.receive_some(65536)
                connection.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.EndOfMessage):
                return request
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None

    def respond(self, request: h11.Request) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in request.headers}
        path = request.target.decode("latin-1").split("?", 1)[0]
        if request.method not in (b"GET", b"HEAD"):
            return 405, [("Allow", "GET, HEAD"), ("Content-Type", "text/plain")], b"only GET\n"
        if path == "/":
            page = b'<html><body><a href="/metrics">metrics</a></body></html>\n'
            return 200, [("Content-Type", "text/html; charset=utf-8")], page
        if path != "/metrics":
            return 404, [("Content-Type", "text/plain")], b"not found; try /metrics\n"
        self.store.expire(trio.current_time(), self.expire_after)
        fmt = negotiate(headers.get("accept", ""))
        body = render(self.store, fmt, timestamps=self.timestamps).encode("utf-8", "replace")
        self.scrapes += 1
        reply = [("Content-Type", OPENMETRICS_CONTENT_TYPE if fmt == "openmetrics" else TEXT_CONTENT_TYPE)]
        if "gzip" in headers.get("accept-encoding", "") and len(body) > 1024:
            body = gzip.compress(body, compresslevel=1)
            reply.append(("Content-Encoding", "gzip"))
        reply.append(("Content-Length", str(len(body))))
        return 200, reply, body


class PrometheusPlugin(Plugin):
    name = "prometheus"
    version = "0.1.0"
    description = "An exporter: the latest value of every series at GET /metrics, for Prometheus to scrape."
    Config = PrometheusConfig
    agent_api = ">=1,<2"
    provides = ("output", "service")

    def start(self, ctx: StartContext, config: PrometheusConfig) -> None:
        store = SeriesStore(config.counters)
        ctx.add_output(PrometheusOutput(store, ctx.registry, config.expire_after), config)
        ctx.add_service(MetricsEndpoint(config.address, store, config.expire_after, config.timestamps))


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [PrometheusPlugin]
