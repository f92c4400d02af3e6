"""The line-based admin port of `graphite-out` (default 127.0.0.1:2030), for `nc` and `telnet` users.

Commands are carbon-relay-ng's telnet ones and Polymur's API, one per line; each answer is one line or a
few, and errors start with "error: ". The connection stays open for more commands (`quit` closes it), so
both `echo getdest | nc localhost 2030` and an interactive telnet session work.

    help                              this list
    route list                        one line per route: key, type, format, matchers, destinations
    route add <key> [pattern] <addr>  adds a send_all_match route (pattern: a regex; none takes everything)
    route del <key>                   deletes a route
    route patt <key> [pattern]        sets a route's regex (none takes everything)
    getdest                           Polymur's JSON: {"active": [...], "registered": {addr: time}}
    putdest <host:port[:id]> [route]  adds a destination (to the only route, or to the one named)
    deldest <host:port[:id]> [route]  removes a destination
    stats                             one line per destination: state, sent, queued, spooled, dropped
    quit                              closes the connection

`handle_command` is the pure part (text in, text out); `AdminLinePort` serves it (an agent service).
"""

from __future__ import annotations

import logging

import msgspec
import trio

from agent_plugins.graphite.protocol.routing import Matcher, RouteConfig

from .control import AdminActions, AdminError, AdminPort

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 4096
IDLE_TIMEOUT = 300.0
MAX_CONNECTIONS = 64

HELP = """\
commands:
  help                              show this list
  route list                        list routes
  route add <key> [pattern] <addr>  add a send_all_match route (empty pattern allows all)
  route del <key>                   delete the matching route
  route patt <key> [pattern]        update the pattern of a route (empty pattern allows all)
  getdest                           destinations, as JSON {"active": [...], "registered": {...}}
  putdest <host:port[:id]> [route]  add a destination
  deldest <host:port[:id]> [route]  remove a destination
  stats                             counters per destination
  quit                              close this connection"""

QUIT = object()


def handle_command(actions: AdminActions, line: str) -> str | object:
    """The answer to one command line (without its newline), or QUIT. Never raises for bad input."""
    words = line.split()
    if not words:
        return ""
    try:
        return _dispatch(actions, words)
    except AdminError as error:
        return f"error: {error.message}"
    except Exception as error:  # a bug: say so, keep serving
        log.exception("graphite-out admin line port: command %r failed", line)
        return f"error: internal error: {type(error).__name__}: {error}"


def _dispatch(actions: AdminActions, words: list[str]) -> str | object:
    command = words[0].lower()
    if command == "help":
        return HELP
    if command in ("quit", "exit"):
        return QUIT
    if command == "getdest":
        _arguments(words, 0, 0, "getdest")
        return msgspec.json.encode(actions.getdest()).decode()
    if command == "putdest":
        address, route = _address_and_route(words, "putdest <host:port[:id]> [route]")
        key, added = actions.add_destination(route, address)
        return f"Registered destination: {added} (route {key})"
    if command == "deldest":
        address, route = _address_and_route(words, "deldest <host:port[:id]> [route]")
        key, removed = actions.delete_destination(route, address)
        return f"Removed destination: {removed} (route {key})"
    if command == "stats":
        _arguments(words, 0, 0, "stats")
        return _stats_lines(actions)
    if command == "route":
        return _route_command(actions, words)
    raise AdminError(400, f"unknown command {words[0]!r}; try help")


def _arguments(words: list[str], least: int, most: int, usage: str) -> list[str]:
    arguments = words[1:]
    if not least <= len(arguments) <= most:
        raise AdminError(400, f"usage: {usage}")
    return arguments


def _address_and_route(words: list[str], usage: str) -> tuple[str, str | None]:
    arguments = _arguments(words, 1, 2, usage)
    return arguments[0], arguments[1] if len(arguments) == 2 else None


def _route_command(actions: AdminActions, words: list[str]) -> str:
    if len(words) < 2:
        raise AdminError(
            400,
            "usage: route list | route add <key> [pattern] <addr> | route del <key> | route patt <key> [pattern]",
        )
    sub = words[1].lower()
    arguments = words[2:]
    if sub == "list":
        if arguments:
            raise AdminError(400, "usage: route list")
        lines = []
        for route in actions.output.settings.routes:
            destinations = ",".join(d.address for d in route.destination_configs)
            matcher = Matcher.from_fields(route, route.key).description
            lines.append(
                f"{route.key} {route.type} {route.format} match={matcher} destinations={destinations}"
            )
        return "\n".join(lines) if lines else "no routes"
    if sub == "add":
        if len(arguments) not in (2, 3):
            raise AdminError(400, "usage: route add <key> [pattern] <addr>")
        key, address = arguments[0], arguments[-1]
        pattern = arguments[1] if len(arguments) == 3 else ""
        try:
            route = RouteConfig(key=key, type="send_all_match", destinations=[address], regex=pattern)
        except ValueError as error:
            raise AdminError(400, str(error)) from None
        actions.add_route(route)
        return f"added route {key}"
    if sub == "del":
        if len(arguments) != 1:
            raise AdminError(400, "usage: route del <key>")
        actions.delete_route(arguments[0])
        return f"deleted route {arguments[0]}"
    if sub == "patt":
        if len(arguments) not in (1, 2):
            raise AdminError(400, "usage: route patt <key> [pattern]")
        pattern = arguments[1] if len(arguments) == 2 else ""
        actions.set_route_pattern(arguments[0], pattern)
        return (
            f"route {arguments[0]} pattern {pattern!r}"
            if pattern
            else f"route {arguments[0]} takes everything"
        )
    raise AdminError(400, f"unknown route command {words[1]!r}; expected list, add, del or patt")


def _stats_lines(actions: AdminActions) -> str:
    lines = []
    for d in actions.destinations():
        dropped = ",".join(f"{reason}={count}" for reason, count in sorted(d["dropped"].items())) or "none"
        lines.append(
            f"{d['route']} {d['address']} {d['state']} sent={d['sent']} queued={d['queue_points']} "
            f"spooled={d['spooled']} replayed={d['replayed']} spool_bytes={d['spool_bytes']} dropped={dropped}"
        )
    return "\n".join(lines) if lines else "no destinations"


class AdminLinePort(AdminPort):
    """The line admin port as an agent service (see `control.AdminPort`)."""

    key = "admin_line"
    max_connections = MAX_CONNECTIONS
    description = "admin line port"

    async def serve_connection(self, stream: trio.SocketStream, limit: trio.CapacityLimiter) -> None:
        async with stream:
            if limit.borrowed_tokens >= limit.total_tokens:
                try:
                    await stream.send_all(b"error: too many admin connections\n")
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                return
            async with limit:
                try:
                    await _converse(stream, self.actions)
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
                    pass
                except Exception:
                    log.exception("graphite-out admin line port: unexpected error; connection closed")


async def _converse(stream: trio.SocketStream, actions: AdminActions) -> None:
    buffer = b""
    skipping = False  # inside a line that was too long: drop bytes until its end
    while True:
        with trio.fail_after(IDLE_TIMEOUT):
            data = await stream.receive_some(MAX_LINE_BYTES)
        if not data:
            return
        buffer += data
        while True:
            newline = buffer.find(b"\n")
            if newline < 0:
                if len(buffer) > MAX_LINE_BYTES:
                    if not skipping:
                        await stream.send_all(f"error: line longer than {MAX_LINE_BYTES} bytes\n".encode())
                    skipping = True
                    buffer = b""
                break
            raw, buffer = buffer[:newline], buffer[newline + 1 :]
            if skipping:
                skipping = False
                continue
            text = raw.decode("utf-8", "replace").strip()
            answer = handle_command(actions, text)
            if answer is QUIT:
                await stream.send_all(b"bye\n")
                return
            if answer:
                await stream.send_all(f"{answer}\n".encode())
