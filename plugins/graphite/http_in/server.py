"""The http-in source: an HTTP ingest gateway on hypercorn (its trio worker), answering once written.

    sender ──POST /v1/batches | /v1/points | /v1/graphite──> auth ─> body (gzip, max_body) ─> decode
                                                                                              │
    204 (written) | 503 Retry-After (not written, pipeline full, stopping) <── on_done ── sink.send

For senders that cannot hold a TCP session (functions, batch jobs, browsers), in the role of Polymur's
HTTPS gateway and Lagermeister's http_receiver. The request waits until every output wrote its points:
a 204 means the data is safe. Status codes: 400 with a one-line reason for a body that cannot be taken,
401 without a valid key (`WWW-Authenticate: Bearer`), 404/405 for other paths and methods, 413 for a
body over `max_body` (counted after gzip decompression, so a gzip bomb is cut off at the limit), 415
for a content encoding other than gzip or identity, 503 with `Retry-After` while the pipeline does not
take the batch within `queue_timeout` (full), while the agent stops, or when an output could not write.

The HTTP server is hypercorn's: the ASGI application below only reads bodies and answers.
"""

from __future__ import annotations

import hmac
import logging
import ssl
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from agent import AutonomousSource, RateLimitedLog, SourceSink, now_ns
from agent.model import MetricConflictError, MetricDef, MetricRegistry

from .bodies import BadBody, Decoded, decode_batches_body, decode_graphite_body, decode_points_body

log = logging.getLogger(__name__)

#: The attribute a named API key adds to every point it sends.
HTTP_CLIENT_ATTRIBUTE = "http_client"
PATHS = ("/v1/batches", "/v1/points", "/v1/graphite")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class IngestSettings:
    address: str = "127.0.0.1:8095"
    max_body: int = 16 * 1024 * 1024
    #: (client name or "", key) pairs; empty: no authentication.
    api_keys: tuple[tuple[str, str], ...] = ()
    queue_timeout: float = 5.0
    write_timeout: float = 30.0
    retry_after: int = 5
    shutdown_timeout: float = 5.0
    validation: str = "medium"
    max_line_length: int = 16384


@dataclass
class IngestCounters:
    requests: int = 0
    points: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    #: Graphite bad lines by reason, as graphite-in counts them.
    bad_lines: dict[str, int] = field(default_factory=dict)


class _Reply(Exception):
    """Ends a request with this status and one-line reason."""

    def __init__(self, status: int, reason: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or []


class HttpIngest(AutonomousSource):
    """The source: the ASGI application (`__call__`) and the hypercorn server that runs it (`run`)."""

    def __init__(
        self,
        settings: IngestSettings,
        registry: MetricRegistry,
        ssl_files: tuple[str, str, str] = ("", "", ""),
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.ssl_files = ssl_files
        self.counters = IngestCounters()
        self.bound: list[str] = []
        self.stopping = False
        self._sink: SourceSink | None = None
        self._shutdown = trio.Event()
        self._bad_log = RateLimitedLog(log)
        self._names: dict[MetricDef, str] = {}

    # -- the server --

    def hypercorn_config(self) -> Any:
        from hypercorn.config import Config

        config = Config()
        config.bind = [self.settings.address]
        config.accesslog = None
        config.errorlog = logging.getLogger(f"{__name__}.hypercorn")
        config.graceful_timeout = self.settings.shutdown_timeout
        # Bodies are bounded here (max_body, after decompression); hypercorn's own limit is for the
        # wire bytes of one request.
        config.h11_max_incomplete_size = 64 * 1024
        cert, key, client_ca = self.ssl_files
        if cert:
            config.certfile = cert
            config.keyfile = key
            if client_ca:
                config.ca_certs = client_ca
                config.verify_mode = ssl.CERT_REQUIRED
        return config

    async def run(
        self, sink: SourceSink, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._sink = sink
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(self._serve)
            self.bound = [b.split("://", 1)[1] for b in binds]
            log.info("http-in: listening on %s", ", ".join(binds))
            task_status.started(list(self.bound))
            try:
                await trio.sleep_forever()
            finally:
                # New requests get 503; those waiting for their write get their answer, within the
                # graceful timeout (the outputs still run while the sources stop).
                self.stopping = True
                self._shutdown.set()

    async def _serve(self, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        import hypercorn.trio

        # Shielded: the server stops through its shutdown trigger, which lets requests in progress end.
        with trio.CancelScope(shield=True):
            try:
                await hypercorn.trio.serve(
                    self,
                    self.hypercorn_config(),
                    shutdown_trigger=self._shutdown.wait,
                    task_status=task_status,
                )
            except OSError as exc:
                raise OSError(
                    f"http-in: cannot listen on {self.settings.address}: {exc.strerror or exc}"
                ) from None

    # -- the ASGI application --

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        self.counters.requests += 1
        try:
            status = await self._handle(scope, receive)
            await self._respond(send, status, "")
        except _Reply as reply:
            await self._respond(send, reply.status, reply.reason, reply.headers)

    async def _respond(
        self, send: Send, status: int, reason: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        self.counters.by_status[status] = self.counters.by_status.get(status, 0) + 1
        body = (reason + "\n").encode() if reason else b""
        all_headers = list(headers or [])
        if body:
            all_headers += [(b"content-type", b"text/plain; charset=utf-8")]
        all_headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": all_headers})
        await send({"type": "http.response.body", "body": body})

    def _busy(self, reason: str) -> _Reply:
        return _Reply(503, reason, [(b"retry-after", str(self.settings.retry_after).encode())])

    async def _handle(self, scope: Scope, receive: Receive) -> int:
        path = scope["path"]
        if path not in PATHS:
            raise _Reply(404, f"unknown path {path}; POST to {', '.join(PATHS)}")
        if scope["method"] != "POST":
            raise _Reply(405, f"{path} takes POST", [(b"allow", b"POST")])
        headers = {name.lower(): value for name, value in scope["headers"]}
        client = self._authenticate(headers.get(b"authorization", b""))
        if self.stopping:
            raise self._busy("the agent is stopping")
        body = await self._read_body(receive, headers)
        now = now_ns()
        try:
            if path == "/v1/batches":
                decoded = decode_batches_body(body)
            elif path == "/v1/points":
                decoded = decode_points_body(body, now)
            else:
                decoded = decode_graphite_body(
                    body,
                    now,
                    self.settings.validation,
                    self.settings.max_line_length,  # type: ignore[arg-type]
                )
        except BadBody as exc:
            counts = getattr(exc, "bad_counts", None)
            if counts:
                for reason, count in counts.items():
                    self.counters.bad_lines[reason] = self.counters.bad_lines.get(reason, 0) + count
            self._bad_log.warn("bad", 1, "http-in: %s from %s: refused: %s", path, _peer(scope), exc)
            raise _Reply(400, str(exc)) from None
        return await self._deliver(decoded, client)

    def _authenticate(self, authorization: bytes) -> str:
        """The client name of the key ("" for a key without a name); raises 401 without a valid key."""
        keys = self.settings.api_keys
        if not keys:
            return ""
        scheme, _, token = authorization.decode("latin-1").partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            found = None
            for name, key in keys:
                # Compare with every key, in constant time per key, so timing tells nothing.
                if hmac.compare_digest(key.encode(), token.encode()):
                    found = name
            if found is not None:
                return found
        raise _Reply(
            401, "a valid API key is required (Authorization: Bearer KEY)", [(b"www-authenticate", b"Bearer")]
        )

    async def _read_body(self, receive: Receive, headers: dict[bytes, bytes]) -> bytes:
        limit = self.settings.max_body
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding not in (b"identity", b"gzip", b"x-gzip", b""):
            raise _Reply(
                415, f"content encoding {encoding.decode('latin-1')!r} is not supported (gzip or none)"
            )
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise _Reply(413, f"the body is larger than max_body ({limit} bytes)")
        gzip = encoding in (b"gzip", b"x-gzip")
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzip else None
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Reply(400, "the client went away before the end of the body")
            chunk = message.get("body", b"")
            if chunk:
                if inflater is not None:
                    try:
                        # At most one byte past the limit: enough to know it is over, never more memory.
                        chunk = inflater.decompress(chunk, limit - size + 1)
                    except zlib.error as exc:
                        raise _Reply(400, f"the gzip body is damaged: {exc}") from None
                    if inflater.unconsumed_tail:
                        raise _Reply(
                            413, f"the body is larger than max_body ({limit} bytes) once decompressed"
                        )
                size += len(chunk)
                if size > limit:
                    raise _Reply(
                        413,
                        f"the body is larger than max_body ({limit} bytes)"
                        + (" once decompressed" if gzip else ""),
                    )
                parts.append(chunk)
            if not message.get("more_body", False):
                break
        if inflater is not None and not inflater.eof:
            raise _Reply(400, "the gzip body is truncated")
        return b"".join(parts)

    def _register(self, definition: MetricDef) -> str:
        name = self._names.get(definition)
        if name is None:
            try:
                _, name = self.registry.register_or_rename(definition, "http")
            except MetricConflictError as exc:
                log.error("http-in: metric %s (kept unregistered)", exc)
                name = f"{definition.name}_http"
            self._names[definition] = name
        return name

    async def _deliver(self, decoded: Decoded, client: str) -> int:
        batch = decoded.batch
        points = len(batch)
        if points == 0:
            return 204
        renames = {d.name: n for d in decoded.metrics if (n := self._register(d)) != d.name}
        for series in batch.series:
            if isinstance(series.metric, str):
                if series.metric in renames:
                    series.metric = renames[series.metric]
                elif series.metric not in self.registry:
                    self._register(MetricDef(series.metric))
            if client:
                series.attributes.setdefault(HTTP_CLIENT_ATTRIBUTE, client)
        batch.identity = decoded.identity
        assert self._sink is not None
        done = trio.Event()
        result = [False]

        def record(ok: bool) -> None:
            result[0] = ok
            done.set()

        with trio.move_on_after(self.settings.queue_timeout) as queued:
            await self._sink.send(batch, record)
        if queued.cancelled_caught:
            raise self._busy(f"the pipeline is full (not taken within {self.settings.queue_timeout:g}s)")
        with trio.move_on_after(self.settings.write_timeout):
            await done.wait()
        if not done.is_set():
            raise self._busy(f"not written within {self.settings.write_timeout:g}s; send it again later")
        if not result[0]:
            raise self._busy("an output could not write the points; send them again later")
        self.counters.points += points
        return 204


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    if client:
        host, port = client[0], client[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "unknown peer"


__all__ = ["HTTP_CLIENT_ATTRIBUTE", "HttpIngest", "IngestCounters", "IngestSettings"]
