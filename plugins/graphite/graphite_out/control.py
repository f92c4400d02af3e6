"""What the admin ports can do: read and change the live routing setup of a `GraphiteOutput`.

Where it sits: `admin_http.py` (JSON over HTTP) and `admin_line.py` (carbon-relay-ng's telnet commands and
Polymur's getdest/putdest/deldest) parse requests and call `AdminActions`; every change goes through
`GraphiteOutput.apply`, which validates the whole new setup before swapping it in between two batches.
Errors are `AdminError`s with an HTTP status and a one-line message that says what was wrong.

Each port is an `AdminPort`, an agent `Service` that the plugin adds next to the output. Imports go one
way: the ports import this module, this module imports the output, and the output knows none of them.
"""

from __future__ import annotations

import abc
import datetime
import logging
from typing import Any

import msgspec
import trio

from agent import Service
from agent.decoding import MalformedData, decode_untrusted
from agent.net import format_address, open_tcp_listeners, socket_address
from agent.units import decode_config_value, encode_config_value
from agent_plugins.graphite.protocol.aggregation import AggregatorConfig
from agent_plugins.graphite.protocol.routing import DestinationConfig, RewriterConfig, RouteConfig

from .output import GraphiteOutput, LiveSettings

log = logging.getLogger(__name__)


class AdminError(Exception):
    """A request the admin API refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def to_json_value(value: Any) -> Any:
    """Structs to plain JSON values, durations and sizes as the config writes them ("30s", "1GiB")."""
    return msgspec.to_builtins(value, enc_hook=encode_config_value)


def convert(value: Any, target: type, what: str) -> Any:
    """A JSON value to a config Struct; a bad value is a 400 naming what and where."""
    try:
        return msgspec.convert(value, target, dec_hook=decode_config_value, str_keys=True)
    except msgspec.ValidationError as error:
        raise AdminError(400, f"{what}: {error}") from None


def decode_json(body: bytes, target: Any, what: str) -> Any:
    if not body.strip():
        raise AdminError(400, f"{what}: the request has no JSON body")
    try:
        return decode_untrusted(msgspec.json.Decoder(target, dec_hook=decode_config_value), body)
    except MalformedData as error:
        raise AdminError(400, f"{what}: {'' if error.validation else 'invalid JSON: '}{error}") from None


class AdminActions:
    """The operations both admin ports offer, on one output."""

    def __init__(self, output: GraphiteOutput) -> None:
        self.output = output

    # -- reading --

    def config(self) -> dict[str, Any]:
        return to_json_value(self.output.settings)

    def routes(self) -> list[dict[str, Any]]:
        return to_json_value(self.output.settings.routes)

    def route(self, key: str) -> dict[str, Any]:
        return to_json_value(self._route(key))

    def destinations(self) -> list[dict[str, Any]]:
        return [destination.stats() for destination in self.output.destinations.values()]

    def stats(self) -> dict[str, Any]:
        return self.output.stats()

    def blocklist(self) -> list[str]:
        return list(self.output.settings.blocklist)

    def rewriters(self) -> list[dict[str, Any]]:
        return to_json_value(self.output.settings.rewriters)

    def aggregators(self) -> list[dict[str, Any]]:
        return to_json_value(self.output.settings.aggregators)

    def bad_lines(self) -> list[dict[str, Any]]:
        lines = [record for source in self.output.bad_line_sources for record in source.snapshot()]
        lines.sort(key=lambda record: record.time)
        return to_json_value(lines)

    def getdest(self) -> dict[str, Any]:
        """Polymur's answer: the addresses connected now, and every registered one with its registration time."""
        destinations = [d for d in self.output.destinations.values() if not d.retired]
        active = sorted({str(d.address) for d in destinations if d.connected})
        registered = {
            address: _iso(self.output.registered.get(address))
            for address in sorted({str(d.address) for d in destinations})
        }
        return {"active": active, "registered": registered}

    def _route(self, key: str) -> RouteConfig:
        for route in self.output.settings.routes:
            if route.key == key:
                return route
        raise AdminError(404, f"no route {key!r} (routes: {', '.join(self.route_keys()) or 'none'})")

    def route_keys(self) -> list[str]:
        return [route.key for route in self.output.settings.routes]

    # -- changing --

    def _apply(self, **changes: Any) -> None:
        settings = self.output.settings
        fields = {
            "routes": settings.routes,
            "blocklist": settings.blocklist,
            "rewriters": settings.rewriters,
            "aggregators": settings.aggregators,
        }
        fields.update(changes)
        try:
            self.output.apply(LiveSettings(**fields))
        except ValueError as error:
            raise AdminError(400, str(error).replace("\n", "; ")) from None

    def add_route(self, route: RouteConfig) -> dict[str, Any]:
        if route.key in self.route_keys():
            raise AdminError(409, f"route {route.key!r} exists already (PUT /routes/{route.key} replaces it)")
        self._apply(routes=[*self.output.settings.routes, route])
        return to_json_value(route)

    def replace_route(self, key: str, route: RouteConfig) -> dict[str, Any]:
        if route.key != key:
            raise AdminError(400, f"the route's key {route.key!r} differs from {key!r} in the path")
        self._route(key)
        self._apply(routes=[route if r.key == key else r for r in self.output.settings.routes])
        return to_json_value(route)

    def delete_route(self, key: str) -> None:
        self._route(key)
        self._apply(routes=[r for r in self.output.settings.routes if r.key != key])

    def _changed_route(self, key: str, **fields: Any) -> RouteConfig:
        """The route `key` with some fields changed, checked as if it came from the config file."""
        table = to_json_value(self._route(key))
        table.update(fields)
        return convert(table, RouteConfig, f"route {key!r}")

    def set_route_pattern(self, key: str, pattern: str) -> None:
        """carbon-relay-ng's `route patt`: the route's regex ("" takes everything)."""
        route = self._changed_route(key, regex=pattern)
        self._apply(routes=[route if r.key == key else r for r in self.output.settings.routes])

    def add_destination(self, key: str | None, destination: str | DestinationConfig) -> tuple[str, str]:
        """Adds a destination to route `key` (the only route when None). Returns (route key, address)."""
        route_key = self._single_route(key, "putdest")
        config = (
            destination
            if isinstance(destination, DestinationConfig)
            else DestinationConfig(address=destination)
        )
        try:
            address = str(config.parsed_address)
        except ValueError as error:
            raise AdminError(400, str(error)) from None
        route = self._route(route_key)
        if any(str(d.parsed_address) == address for d in route.destination_configs):
            raise AdminError(409, f"route {route_key!r} has destination {address} already")
        destinations = [*to_json_value(route.destination_configs), to_json_value(config)]
        changed = self._changed_route(route_key, destinations=destinations)
        self._apply(routes=[changed if r.key == route_key else r for r in self.output.settings.routes])
        return route_key, address

    def delete_destination(self, key: str | None, address_text: str) -> tuple[str, str]:
        """Removes a destination from route `key` (or from the one route that has it). Returns (route, address)."""
        from agent_plugins.graphite.protocol.hashing import parse_destination

        try:
            address = str(parse_destination(address_text))
        except ValueError as error:
            raise AdminError(400, str(error)) from None
        if key is None:
            having = [
                r.key
                for r in self.output.settings.routes
                if any(str(d.parsed_address) == address for d in r.destination_configs)
            ]
            if not having:
                raise AdminError(404, f"no route has destination {address}")
            if len(having) > 1:
                raise AdminError(400, f"routes {', '.join(having)} all have {address}: say which route")
            key = having[0]
        route = self._route(key)
        kept = [d for d in route.destination_configs if str(d.parsed_address) != address]
        if len(kept) == len(route.destination_configs):
            raise AdminError(404, f"route {key!r} has no destination {address}")
        if not kept:
            raise AdminError(
                400, f"{address} is the last destination of route {key!r}: delete the route instead"
            )
        changed = self._changed_route(key, destinations=to_json_value(kept))
        self._apply(routes=[changed if r.key == key else r for r in self.output.settings.routes])
        return key, address

    def _single_route(self, key: str | None, command: str) -> str:
        if key is not None:
            self._route(key)
            return key
        keys = self.route_keys()
        if len(keys) == 1:
            return keys[0]
        if not keys:
            raise AdminError(400, "there is no route to add it to: add a route first")
        raise AdminError(
            400, f"there are several routes ({', '.join(keys)}): say which, e.g. {command} ADDR {keys[0]}"
        )

    def set_blocklist(self, entries: list[str]) -> list[str]:
        self._apply(blocklist=list(entries))
        return list(entries)

    def add_block(self, entry: str) -> list[str]:
        return self.set_blocklist([*self.output.settings.blocklist, entry])

    def set_rewriters(self, rewriters: list[RewriterConfig]) -> list[dict[str, Any]]:
        self._apply(rewriters=list(rewriters))
        return self.rewriters()

    def add_rewriter(self, rewriter: RewriterConfig) -> list[dict[str, Any]]:
        return self.set_rewriters([*self.output.settings.rewriters, rewriter])

    def delete_rewriter(self, index: int) -> None:
        rewriters = list(self.output.settings.rewriters)
        self._check_index(index, rewriters, "rewriter")
        del rewriters[index]
        self._apply(rewriters=rewriters)

    def set_aggregators(self, aggregators: list[AggregatorConfig]) -> list[dict[str, Any]]:
        self._apply(aggregators=list(aggregators))
        return self.aggregators()

    def add_aggregator(self, aggregator: AggregatorConfig) -> list[dict[str, Any]]:
        return self.set_aggregators([*self.output.settings.aggregators, aggregator])

    def delete_aggregator(self, index: int) -> None:
        aggregators = list(self.output.settings.aggregators)
        self._check_index(index, aggregators, "aggregator")
        del aggregators[index]
        self._apply(aggregators=aggregators)

    @staticmethod
    def _check_index(index: int, items: list[Any], what: str) -> None:
        if not 0 <= index < len(items):
            raise AdminError(404, f"no {what} {index} (there are {len(items)}, numbered from 0)")


def _iso(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat()


class AdminPort(Service):
    """One admin port as an agent service: binds its address when the agent starts (a taken port is a
    startup error that names the key and the port), reports ready once listening, then serves
    connections until cancelled. `admin_http.AdminHttpPort` and `admin_line.AdminLinePort` say how a
    connection is served."""

    #: The config key ("admin_http"), in logs and errors.
    key: str = ""
    #: Connections served at once; more are answered with an error and closed.
    max_connections: int = 64
    #: What the log line at start calls it ("admin HTTP API"), and what comes before each address.
    description: str = ""
    scheme: str = ""

    def __init__(self, address: str, actions: AdminActions) -> None:
        self.address = address
        self.actions = actions
        #: The first address it listens on, once listening (port 0 resolved): (host, port).
        self.bound_address: tuple[str, int] | None = None

    async def run(self, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        # After a restart, the port it had (a config's port 0 must not move while the agent runs).
        address = self.address if self.bound_address is None else format_address(*self.bound_address)
        listeners = await open_tcp_listeners(address, what=self.key)
        host, port = listeners[0].socket.getsockname()[:2]
        self.bound_address = (host, port)
        shown = ", ".join(
            self.scheme + socket_address(listener.socket.getsockname()) for listener in listeners
        )
        log.info("graphite-out: %s on %s", self.description, shown)
        task_status.started(self.bound_address)
        limit = trio.CapacityLimiter(self.max_connections)
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, limit)

    async def _accept_loop(self, listener: trio.SocketListener, limit: trio.CapacityLimiter) -> None:
        """One task per connection; accept errors (out of file descriptors) are logged and retried,
        never fatal."""
        async with listener, trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as error:
                    log.warning("graphite-out %s: accept failed: %s", self.key, error)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(self.serve_connection, stream, limit)

    @abc.abstractmethod
    async def serve_connection(self, stream: trio.SocketStream, limit: trio.CapacityLimiter) -> None:
        """Serves one connection until it ends; refuses it when `limit` has no token left."""
