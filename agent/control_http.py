"""The control API over HTTP (`[agent] http`), and the status page.

    GET  /                                the status page (self-contained: no CDN, works offline)
    GET  /api/status                      everything the page shows (elements, rates, plugin sections)
    GET  /api/elements                    the elements: name, plugin, kind, state, counters...
    POST /api/elements/NAME/ACTION        pause, resume, set-period ({"poll_interval": "250ms"}), poll,
                                          enable, disable
    POST /api/flush, POST /api/stop, POST /api/reload
    POST /api/sections/SECTION/COMMAND    a plugin's command (JSON body: its arguments)

With `[agent] http_token`, every request needs `Authorization: Bearer TOKEN` (a browser may pass
`?token=TOKEN` instead: the page forwards it as the header on its own requests). HTTP/1.1 with
keep-alive, on h11; requests are small JSON bodies (64 KiB at most).
"""

from __future__ import annotations

import hmac
import importlib.resources
import logging
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import msgspec
import trio

from agent.control import Controller
from agent.decoding import MalformedData, decode_untrusted
from agent.net import open_tcp_listeners, socket_address

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
#: A connection that sends nothing for this long is closed (browsers keep idle ones open).
IDLE_TIMEOUT = 60.0
STATUS_BY_CODE = {"unknown-element": 404, "unknown-section": 404, "bad-request": 400, "unsupported": 409}

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def status_page() -> bytes:
    return importlib.resources.files("agent").joinpath("status_page.html").read_bytes()


class HttpControl:
    """Routes HTTP requests to a `Controller`."""

    def __init__(self, controller: Controller, token: str = "") -> None:
        self.controller = controller
        self.token = token
        self._page = status_page()

    def authorized(self, headers: dict[bytes, bytes], query: dict[str, list[str]]) -> bool:
        if not self.token:
            return True
        expected = f"Bearer {self.token}".encode()
        given = headers.get(b"authorization", b"")
        if hmac.compare_digest(given, expected):
            return True
        return hmac.compare_digest(query.get("token", [""])[0].encode(), self.token.encode())

    async def respond(
        self, method: str, target: str, headers: dict[bytes, bytes], body: bytes
    ) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request."""
        url = urlsplit(target)
        query = parse_qs(url.query)
        path = url.path
        if not self.authorized(headers, query):
            return _json(401, {"ok": False, "error": "missing or wrong Authorization: Bearer token"})
        c = self.controller
        if method in ("GET", "HEAD"):
            if path in ("/", "/index.html"):
                return 200, "text/html; charset=utf-8", self._page
            if path == "/api/status":
                return _json(200, c.status())
            if path == "/api/elements":
                return _json(200, c.elements())
            if path.startswith("/api/"):
                return _json(404, {"ok": False, "error": f"no such resource: {path}"})
            return 404, "text/plain; charset=utf-8", b"not found\n"
        if method != "POST":
            return _json(405, {"ok": False, "error": f"method {method} not allowed"})
        try:
            args = decode_untrusted(_decoder, body) if body.strip() else {}
        except MalformedData as exc:
            return _json(400, {"ok": False, "error": f"body is not JSON: {exc}"})
        if not isinstance(args, dict):
            return _json(400, {"ok": False, "error": "the body is a JSON object"})
        if path == "/api/flush":
            request: dict[str, Any] = {"action": "flush"}
        elif path == "/api/stop":
            request = {"action": "stop"}
        elif path == "/api/reload":
            request = {"action": "reload"}
        elif path.startswith("/api/elements/") and path.count("/") >= 4:
            # Element names may hold a "/" (PLUGIN/ELEMENT): the action is the last part.
            name, _, action = path[len("/api/elements/") :].rpartition("/")
            request = {"action": unquote(action), "element": unquote(name), "args": args}
            if request["action"] not in ("pause", "resume", "set-period", "poll", "enable", "disable"):
                return _json(404, {"ok": False, "error": f"unknown action {action!r}"})
        elif path.startswith("/api/sections/") and path.count("/") >= 4:
            section, _, command = path[len("/api/sections/") :].rpartition("/")
            request = {
                "action": "run",
                "section": unquote(section),
                "command": unquote(command),
                "args": args,
            }
        else:
            return _json(404, {"ok": False, "error": f"no such resource: {path}"})
        answer = await c.handle(request)
        if answer["ok"]:
            return _json(200, answer)
        return _json(STATUS_BY_CODE.get(answer.get("code", ""), 400), answer)

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request: h11.Request | None = None
                body = bytearray()
                too_large = False
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        with trio.move_on_after(IDLE_TIMEOUT) as idle:
                            data = await stream.receive_some(65536)
                        if idle.cancelled_caught:
                            return
                        conn.receive_data(data)
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                        too_large = too_large or len(body) > MAX_BODY
                        if too_large:
                            body.clear()
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                        return
                assert request is not None
                method = request.method.decode("ascii", "replace")
                headers = {name.lower(): value for name, value in request.headers}
                if too_large:
                    status, ctype, payload = _json(413, {"ok": False, "error": "body too large"})
                else:
                    status, ctype, payload = await self.respond(
                        method, request.target.decode("ascii", "replace"), headers, bytes(body)
                    )
                response_headers = [
                    ("content-type", ctype),
                    ("content-length", str(len(payload))),
                    ("cache-control", "no-store"),
                ]
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=response_headers)))
                if method != "HEAD":
                    await stream.send_all(conn.send(h11.Data(data=payload)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            # A malformed request: answer 400 if we still can, then close.
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                try:
                    status, ctype, payload = _json(400, {"ok": False, "error": f"bad request: {exc}"})
                    await stream.send_all(
                        conn.send(
                            h11.Response(
                                status_code=status,
                                headers=[("content-type", ctype), ("content-length", str(len(payload)))],
                            )
                        )
                        + conn.send(h11.Data(data=payload))
                        + conn.send(h11.EndOfMessage())
                    )
                except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


def _json(status: int, value: Any) -> tuple[int, str, bytes]:
    return status, "application/json", _encoder.encode(value)


async def serve_http(
    controller: Controller,
    address: str,
    token: str = "",
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serves the HTTP control API and status page on `address` until cancelled; reports the bound
    "host:port" (port 0 picks one)."""
    listeners = await open_tcp_listeners(address, what="control http")
    bound = socket_address(listeners[0].socket.getsockname())
    log.info("status page and control API on http://%s/", bound)
    http = HttpControl(controller, token)
    task_status.started(bound)
    await trio.serve_listeners(http.serve_connection, listeners)
