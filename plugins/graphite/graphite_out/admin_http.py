"""The admin HTTP JSON API of `graphite-out` (default 127.0.0.1:8081).

HTTP/1.1 is parsed by h11 (sans-IO, the parser hypercorn uses): hand-written HTTP parsing is a classic
source of bugs, and h11 enforces framing, header limits and keep-alive rules for us; this module only
moves bytes between h11 and a trio stream and maps requests to `control.AdminActions`.

Endpoints (JSON in and out; errors are `{"error": "..."}` with a 4xx status):

    GET    /                                  this list
    GET    /config                            routes, blocklist, rewriters, aggregators in force
    GET    /stats                             output counters and per-destination counters
    GET    /destinations                      per destination: state, sent, dropped by reason, queue, spool
    GET    /badlines                          recent bad input lines recorded by graphite-in
    GET    /routes                            every route
    POST   /routes                            add a route (a route table as in the config file)
    GET    /routes/<key>                      one route
    PUT    /routes/<key>                      replace a route
    DELETE /routes/<key>                      delete a route
    POST   /routes/<key>/destinations         add a destination ("host:port[:id]" or a destination table)
    DELETE /routes/<key>/destinations/<addr>  remove a destination
    GET    /blocklist                         the blocklist entries
    PUT    /blocklist                         replace it (a list of "<kind> <expression>")
    POST   /blocklist                         add one entry (a string)
    GET    /rewriters, /aggregators           the lists
    PUT    /rewriters, /aggregators           replace a list
    POST   /rewriters, /aggregators           add one
    DELETE /rewriters/<n>, /aggregators/<n>   delete the n-th (from 0)

Every change is validated as a whole and applied between two batches, or refused with 400 and nothing
changed.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import unquote, urlsplit

import h11
import msgspec
import trio

from agent_plugins.graphite.protocol.aggregation import AggregatorConfig
from agent_plugins.graphite.protocol.routing import DestinationConfig, RewriterConfig, RouteConfig

from .control import AdminActions, AdminError, AdminPort, decode_json

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 * 1024
IDLE_TIMEOUT = 60.0
MAX_CONNECTIONS = 64

ENDPOINTS = [
    "GET /",
    "GET /config",
    "GET /stats",
    "GET /destinations",
    "GET /badlines",
    "GET /routes",
    "POST /routes",
    "GET /routes/<key>",
    "PUT /routes/<key>",
    "DELETE /routes/<key>",
    "POST /routes/<key>/destinations",
    "DELETE /routes/<key>/destinations/<address>",
    "GET /blocklist",
    "PUT /blocklist",
    "POST /blocklist",
    "GET /rewriters",
    "PUT /rewriters",
    "POST /rewriters",
    "DELETE /rewriters/<index>",
    "GET /aggregators",
    "PUT /aggregators",
    "POST /aggregators",
    "DELETE /aggregators/<index>",
]


class Reply(msgspec.Struct):
    status: int
    body: Any
    allow: str = ""


def _allowed(method: str, allowed: str) -> None:
    if method not in allowed.split(", "):
        raise _MethodNotAllowed(allowed)


class _MethodNotAllowed(Exception):
    def __init__(self, allow: str) -> None:
        super().__init__(allow)
        self.allow = allow


def handle_request(actions: AdminActions, method: str, target: str, body: bytes) -> Reply:
    """The reply to one request. Pure: no I/O. Never raises for bad input."""
    try:
        return _route(actions, method, target, body)
    except AdminError as error:
        return Reply(error.status, {"error": error.message})
    except _MethodNotAllowed as error:
        return Reply(405, {"error": f"{method} is not allowed here; allowed: {error.allow}"}, error.allow)
    except Exception as error:  # a bug: answer 500 and keep serving
        log.exception("graphite-out admin HTTP: %s %s failed", method, target)
        return Reply(500, {"error": f"internal error: {type(error).__name__}: {error}"})


def _route(actions: AdminActions, method: str, target: str, body: bytes) -> Reply:
    path = urlsplit(target).path
    parts = [unquote(part) for part in path.split("/") if part]
    if not parts:
        _allowed(method, "GET")
        return Reply(200, {"endpoints": ENDPOINTS})
    head, rest = parts[0], parts[1:]
    if head in ("config", "stats", "destinations", "badlines") and not rest:
        _allowed(method, "GET")
        if head == "config":
            return Reply(200, actions.config())
        if head == "stats":
            return Reply(200, actions.stats())
        if head == "destinations":
            return Reply(200, actions.destinations())
        return Reply(200, actions.bad_lines())
    if head == "routes":
        return _routes(actions, method, rest, body)
    if head == "blocklist" and not rest:
        _allowed(method, "GET, PUT, POST")
        if method == "GET":
            return Reply(200, actions.blocklist())
        if method == "PUT":
            return Reply(200, actions.set_blocklist(decode_json(body, list[str], "blocklist")))
        return Reply(200, actions.add_block(decode_json(body, str, "blocklist entry")))
    if head in ("rewriters", "aggregators"):
        return _list_endpoint(actions, method, head, rest, body)
    raise AdminError(404, f"no such endpoint: {path} (GET / lists them)")


def _routes(actions: AdminActions, method: str, rest: list[str], body: bytes) -> Reply:
    if not rest:
        _allowed(method, "GET, POST")
        if method == "GET":
            return Reply(200, actions.routes())
        return Reply(201, actions.add_route(decode_json(body, RouteConfig, "route")))
    key = rest[0]
    if len(rest) == 1:
        _allowed(method, "GET, PUT, DELETE")
        if method == "GET":
            return Reply(200, actions.route(key))
        if method == "PUT":
            return Reply(200, actions.replace_route(key, decode_json(body, RouteConfig, "route")))
        actions.delete_route(key)
        return Reply(200, {"deleted": key})
    if rest[1] == "destinations" and len(rest) == 2:
        _allowed(method, "POST")
        destination = decode_json(body, str | DestinationConfig, "destination")
        route_key, address = actions.add_destination(key, destination)
        return Reply(201, {"route": route_key, "added": address})
    if rest[1] == "destinations" and len(rest) == 3:
        _allowed(method, "DELETE")
        route_key, address = actions.delete_destination(key, rest[2])
        return Reply(200, {"route": route_key, "deleted": address})
    raise AdminError(404, f"no such endpoint: /routes/{'/'.join(rest)}")


def _list_endpoint(actions: AdminActions, method: str, head: str, rest: list[str], body: bytes) -> Reply:
    item_type: Any = RewriterConfig if head == "rewriters" else AggregatorConfig
    what = head[:-1]
    if not rest:
        _allowed(method, "GET, PUT, POST")
        if method == "GET":
            return Reply(200, actions.rewriters() if head == "rewriters" else actions.aggregators())
        if method == "PUT":
            items = decode_json(body, list[item_type], head)
            result = actions.set_rewriters(items) if head == "rewriters" else actions.set_aggregators(items)
            return Reply(200, result)
        item = decode_json(body, item_type, what)
        result = actions.add_rewriter(item) if head == "rewriters" else actions.add_aggregator(item)
        return Reply(201, result)
    if len(rest) == 1:
        _allowed(method, "DELETE")
        if not rest[0].isdigit():
            raise AdminError(400, f"{what} index: expected a number from 0, got {rest[0]!r}")
        index = int(rest[0])
        if head == "rewriters":
            actions.delete_rewriter(index)
        else:
            actions.delete_aggregator(index)
        return Reply(200, {"deleted": index})
    raise AdminError(404, f"no such endpoint: /{head}/{'/'.join(rest)}")


# -- the trio layer --


class AdminHttpPort(AdminPort):
    """The admin HTTP API as an agent service (see `control.AdminPort`)."""

    key = "admin_http"
    max_connections = MAX_CONNECTIONS
    description = "admin HTTP API"
    scheme = "http://"

    async def serve_connection(self, stream: trio.SocketStream, limit: trio.CapacityLimiter) -> None:
        async with stream:
            connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
            if limit.borrowed_tokens >= limit.total_tokens:
                await _send_reply(
                    stream, connection, Reply(503, {"error": "too many admin connections"}), close=True
                )
                return
            async with limit:
                try:
                    await _converse(stream, connection, self.actions)
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
                    pass
                except Exception:
                    log.exception("graphite-out admin HTTP: unexpected error; connection closed")


async def _converse(stream: trio.SocketStream, connection: h11.Connection, actions: AdminActions) -> None:
    while True:
        try:
            request = await _read_request(stream, connection)
        except h11.RemoteProtocolError as error:
            status = error.error_status_hint
            await _send_reply(
                stream, connection, Reply(status, {"error": f"bad request: {error}"}), close=True
            )
            return
        except _BodyTooLarge:
            reply = Reply(413, {"error": f"request body larger than {MAX_BODY_BYTES} bytes"})
            await _send_reply(stream, connection, reply, close=True)
            return
        if request is None:
            return
        event, body = request
        reply = handle_request(
            actions, event.method.decode("ascii", "replace"), event.target.decode("ascii", "replace"), body
        )
        await _send_reply(stream, connection, reply)
        if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
            return
        try:
            connection.start_next_cycle()
        except h11.LocalProtocolError:
            return


class _BodyTooLarge(Exception):
    pass


async def _read_request(
    stream: trio.SocketStream, connection: h11.Connection
) -> tuple[h11.Request, bytes] | None:
    """The next request and its body, or None when the client closed the connection."""
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            if connection.they_are_waiting_for_100_continue:
                await stream.send_all(connection.send(h11.InformationalResponse(status_code=100, headers=[])))
            with trio.fail_after(IDLE_TIMEOUT):
                data = await stream.receive_some(65536)
            connection.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
            for name, value in event.headers:
                if name == b"content-length" and value.isdigit() and int(value) > MAX_BODY_BYTES:
                    raise _BodyTooLarge()
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                raise _BodyTooLarge()
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None


async def _send_reply(
    stream: trio.SocketStream, connection: h11.Connection, reply: Reply, close: bool = False
) -> None:
    payload = msgspec.json.encode(reply.body) + b"\n"
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(payload))),
    ]
    if reply.allow:
        headers.append(("allow", reply.allow))
    if close:
        headers.append(("connection", "close"))
    try:
        data = connection.send(h11.Response(status_code=reply.status, headers=headers))
        data += connection.send(h11.Data(data=payload))
        data += connection.send(h11.EndOfMessage())
    except h11.LocalProtocolError:
        return  # the protocol state does not allow a response any more (e.g. the client broke framing)
    await stream.send_all(data)
