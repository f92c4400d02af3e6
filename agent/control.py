"""Runtime control and the operator's view: what `agent control`, `agent top`, `agent tap` and the status
page talk to.

One `Controller` answers requests (plain dicts, the same over both transports) against the running
pipeline: list the elements with their state and counters, pause/resume a source, change its period,
poll it now, enable/disable a transform or an output, flush, stop, run a plugin's command, stream points
(tap). Two transports carry them:

- a Unix socket `DATA_DIR/control.sock` (mode 0600), always on in a running agent: one JSON object per
  line in, one per line out (a tap streams lines until the client hangs up);
- HTTP when `[agent] http` is set (`agent.control_http`): `GET /` the status page, `GET /api/...`,
  `POST /api/elements/NAME/ACTION`.

Nothing here runs per point: the pipeline only reads a few flags, and a tap costs nothing until one is
open. Changes are not written back to the config file; the status says which values differ from it.

The protocol is versioned (`PROTOCOL_VERSION` in every status) so that a newer `agent` binary talking
to an older agent can say so instead of misreading it.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import re
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import trio

from agent.decoding import MalformedData, decode_untrusted
from agent.errors import ReloadError, StartupError, describe_exception
from agent.formatting import TimestampFormatter
from agent.pipeline import Pipeline, Tap
from agent.plugin import ControlSection, PolledSource
from agent.units import Duration, decode_config_value

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
SOCKET_NAME = "control.sock"
#: sun_path holds 108 bytes on Linux, the last one a NUL.
MAX_SOCKET_PATH = 107
#: Element actions, as `agent control ACTION ELEMENT` and `POST /api/elements/NAME/ACTION` name them.
ELEMENT_ACTIONS = ("pause", "resume", "set-period", "poll", "enable", "disable")
#: The longest request line accepted on the socket.
MAX_REQUEST = 64 * 1024
#: How often the rates (points/s) are computed.
RATE_INTERVAL = 1.0


class ControlError(Exception):
    """A request that cannot be done; `code` says why ("unknown-element", "bad-request", "unsupported"),
    `known` lists the element names for an unknown one."""

    def __init__(self, code: str, message: str, known: list[str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.known = known or []


def socket_path(data_dir: Path) -> Path:
    return data_dir / SOCKET_NAME


def _seconds(text: Any, what: str) -> float:
    try:
        value = float(decode_config_value(Duration, text)) if isinstance(text, str) else float(text)
    except (TypeError, ValueError) as exc:
        raise ControlError("bad-request", f"{what}: {exc}") from None
    if value <= 0:
        raise ControlError("bad-request", f"{what}: must be longer than 0, got {text!r}")
    return value


def _duration_text(seconds: float) -> str:
    return str(Duration(seconds))


class Controller:
    """Answers control requests against one running pipeline. `stop` is what SIGTERM does."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        stop: Callable[[], None],
        sections: list[ControlSection] | None = None,
        reload: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self._stop = stop
        self._reload = reload
        self.sections: dict[str, ControlSection] = {}
        self.started_at = time.time()
        # The polled sources' intervals as configured, to show what differs from the file.
        self._configured: dict[str, tuple[Any, float, float]] = {}
        self.elements_changed(sections or [])
        self._last_sample: tuple[float, dict[str, tuple[int, int]]] | None = None
        self.rates: dict[str, tuple[float, float]] = {}

    def elements_changed(self, sections: list[ControlSection]) -> None:
        """After a reload: the plugins' sections anew, and the configured intervals of new sources."""
        self.sections = {section.name: section for section in sections}
        self._configured = {
            name: self._configured[name]
            if name in self._configured and self._configured[name][0] is s.element.obj
            else (s.element.obj, float(s.element.obj.poll_interval), float(s.element.obj.flush_interval))
            for name, s in self.pipeline.sources.items()
            if isinstance(s.element.obj, PolledSource)
        }

    # -- elements --

    def names(self) -> list[str]:
        return [e.full_name for e in self.pipeline.elements]

    def _element(self, name: str) -> Any:
        for element in self.pipeline.elements:
            if element.full_name == name:
                return element
        raise ControlError(
            "unknown-element",
            f"unknown element {name!r}; known: {', '.join(self.names()) or 'none'}",
            self.names(),
        )

    def _counters(self, element: Any) -> dict[str, Any]:
        """in/out/dropped/queued/errors points of an element (what applies to its kind)."""
        p = self.pipeline
        name = element.full_name
        if element.kind == "source":
            s = p.sources[name]
            return {"in": s.points, "out": s.points, "polls": s.polls, "errors": s.errors}
        if element.kind == "output":
            c = p.inboxes[name].counters
            return {
                "in": c.received,
                "out": c.written,
                "dropped": c.dropped,
                "queued": p.inboxes[name].queued_points,
                "errors": c.failed_writes,
            }
        if element.kind == "transform":
            return {"errors": p.transform_states[name].errors}
        return {}

    def state(self, element: Any) -> str:
        """running, paused, disabled or stopped."""
        p = self.pipeline
        name = element.full_name
        if element.kind == "source":
            if p.stopping or p.sources[name].removing or p.sources[name].removed:
                return "stopped"
            return "paused" if p.sources[name].paused else "running"
        if element.kind == "output":
            if p.inboxes[name].exhausted:
                return "stopped"
            return "disabled" if name in p.disabled_outputs else "running"
        if element.kind == "transform":
            return "running" if p.transform_states[name].enabled else "disabled"
        return "running"

    def describe(self, element: Any) -> dict[str, Any]:
        name = element.full_name
        info: dict[str, Any] = {
            "name": name,
            "plugin": element.plugin,
            "kind": element.kind,
            "state": self.state(element),
            "counters": self._counters(element),
            "last_error": "",
            "changed": {},
        }
        rate_in, rate_out = self.rates.get(name, (0.0, 0.0))
        if element.kind in ("source", "output"):
            info["rates"] = {"in": round(rate_in, 2), "out": round(rate_out, 2)}
        if element.kind == "source":
            state = self.pipeline.sources[name]
            info["last_error"] = state.last_error
            if isinstance(element.obj, PolledSource):
                poll, flush = float(element.obj.poll_interval), float(element.obj.flush_interval)
                info["poll_interval"] = _duration_text(poll)
                info["flush_interval"] = _duration_text(flush)
                configured = self._configured.get(name)
                if configured is not None:
                    for key, now, then in (
                        ("poll_interval", poll, configured[1]),
                        ("flush_interval", flush, configured[2]),
                    ):
                        if now != then:
                            info["changed"][key] = {
                                "config": _duration_text(then),
                                "now": _duration_text(now),
                            }
            if state.paused:
                info["changed"]["state"] = {"config": "running", "now": "paused"}
        elif element.kind == "output":
            inbox = self.pipeline.inboxes[name]
            info["queue"] = {"points": inbox.queued_points, "max_points": inbox.max_points}
            if name in self.pipeline.disabled_outputs:
                info["changed"]["state"] = {"config": "running", "now": "disabled"}
        elif element.kind == "transform":
            ts = self.pipeline.transform_states[name]
            info["last_error"] = ts.last_error
            if not ts.enabled:
                info["changed"]["state"] = {"config": "running", "now": "disabled"}
        return info

    def elements(self) -> list[dict[str, Any]]:
        return [self.describe(e) for e in self.pipeline.elements]

    def status(self) -> dict[str, Any]:
        sections = []
        for section in self.sections.values():
            try:
                rows = section.status()
                error = ""
            except Exception as exc:
                rows, error = [], describe_exception(exc)
                log.debug("status section %s failed", section.name, exc_info=True)
            sections.append(
                {"name": section.name, "rows": rows, "commands": list(section.commands), "error": error}
            )
        return {
            "protocol": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started_at, 1),
            "stopping": self.pipeline.stopping,
            "elements": self.elements(),
            "sections": sections,
            "invalid_series": self.pipeline.invalid_series,
            "taps": [{"dropped": tap.dropped} for tap in self.pipeline.taps],
        }

    # -- requests --

    def act(self, name: str, action: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Does one element action; returns the element's new description."""
        args = args or {}
        if action not in ELEMENT_ACTIONS:
            raise ControlError(
                "bad-request", f"unknown action {action!r}; known: {', '.join(ELEMENT_ACTIONS)}"
            )
        element = self._element(name)
        p = self.pipeline
        kind = element.kind
        if action in ("pause", "resume") and kind == "source":
            p.set_paused(name, action == "pause")
        elif action in ("set-period", "poll") and kind == "source":
            if not isinstance(element.obj, PolledSource):
                raise ControlError("unsupported", f"{name}: {action} applies to polled sources only")
            if action == "poll":
                p.poll_now(name)
            else:
                if "poll_interval" not in args:
                    raise ControlError("bad-request", 'set-period needs "poll_interval", e.g. "500ms"')
                poll = _seconds(args["poll_interval"], "poll_interval")
                flush = args.get("flush_interval")
                p.set_intervals(name, poll, None if flush is None else _seconds(flush, "flush_interval"))
        elif action in ("enable", "disable") and kind == "output":
            p.set_output_enabled(name, action == "enable")
        elif action in ("enable", "disable") and kind == "transform":
            p.set_transform_enabled(name, action == "enable")
        else:
            raise ControlError("unsupported", f"{name} is a {kind}: {action} does not apply to it")
        log.info("control: %s %s%s", action, name, f" {args}" if args else "")
        return self.describe(element)

    async def flush(self) -> None:
        log.info("control: flush")
        await self.pipeline.flush()

    async def reload(self) -> dict[str, Any]:
        """Reloads the config file (as SIGHUP); an error in it is a ControlError with its one line."""
        if self._reload is None:
            raise ControlError("unsupported", "this agent cannot reload its config")
        log.info("control: reload requested")
        try:
            return await self._reload()
        except ReloadError as exc:
            raise ControlError("config-error", f"reload: {exc}; the running configuration is kept") from None

    def stop(self) -> None:
        log.info("control: stop requested: stopping sources and writing what is buffered")
        self._stop()

    def run_command(self, section: str, command: str, args: dict[str, Any]) -> Any:
        found = self.sections.get(section)
        if found is None:
            raise ControlError(
                "unknown-section", f"unknown section {section!r}; known: {', '.join(self.sections) or 'none'}"
            )
        function = found.commands.get(command)
        if function is None:
            raise ControlError(
                "bad-request",
                f"{section}: unknown command {command!r}; known: {', '.join(found.commands) or 'none'}",
            )
        try:
            return function(args)
        except ValueError as exc:
            raise ControlError("bad-request", f"{section} {command}: {exc}") from None

    async def handle(self, request: Any) -> dict[str, Any]:
        """One request (a decoded JSON object) to one answer: {"ok": true, ...} or {"ok": false,
        "error": "...", "code": "...", "known": [...]}."""
        try:
            if not isinstance(request, dict):
                raise ControlError("bad-request", "a request is a JSON object")
            action = request.get("action")
            if action == "list":
                result: dict[str, Any] = {"elements": self.elements()}
            elif action == "status":
                result = self.status()
            elif action in ELEMENT_ACTIONS:
                name = request.get("element")
                if not isinstance(name, str):
                    raise ControlError("bad-request", f'{action} needs "element"')
                args = request.get("args") or {}
                if not isinstance(args, dict):
                    raise ControlError("bad-request", '"args" is a JSON object')
                result = {"element": self.act(name, action, args)}
            elif action == "flush":
                await self.flush()
                result = {}
            elif action == "stop":
                self.stop()
                result = {}
            elif action == "reload":
                result = {"reload": await self.reload()}
            elif action == "run":
                args = request.get("args") or {}
                result = {
                    "result": self.run_command(str(request.get("section")), str(request.get("command")), args)
                }
            else:
                raise ControlError("bad-request", f"unknown request {action!r}")
        except ControlError as exc:
            return {"ok": False, "error": str(exc), "code": exc.code, "known": exc.known}
        return {"ok": True, **result}

    # -- rates --

    def sample_rates(self) -> None:
        """Points/s in and out of every source and output since the last sample."""
        now = trio.current_time()
        counts: dict[str, tuple[int, int]] = {}
        for name, s in self.pipeline.sources.items():
            counts[name] = (s.points, s.points)
        for name, inbox in self.pipeline.inboxes.items():
            counts[name] = (inbox.counters.received, inbox.counters.written)
        if self._last_sample is not None:
            then, before = self._last_sample
            elapsed = max(now - then, 1e-9)
            self.rates = {
                name: (
                    (count[0] - before.get(name, (0, 0))[0]) / elapsed,
                    (count[1] - before.get(name, (0, 0))[1]) / elapsed,
                )
                for name, count in counts.items()
            }
        self._last_sample = (now, counts)

    async def run_rates(self) -> None:
        while True:
            self.sample_rates()
            await trio.sleep(RATE_INTERVAL)

    # -- tap --

    def open_tap(self, metric_glob: str = "*", max_points: int = 10_000) -> Tap:
        pattern = metric_glob or "*"
        if pattern == "*":
            accept: Callable[[str], bool] = lambda _metric: True  # noqa: E731
        else:
            regex = fnmatch.translate(pattern)
            compiled = re.compile(regex)
            accept = lambda metric: compiled.match(metric) is not None  # noqa: E731
        tap = Tap(accept, max_points)
        self.pipeline.taps.append(tap)
        return tap

    def close_tap(self, tap: Tap) -> None:
        if tap in self.pipeline.taps:
            self.pipeline.taps.remove(tap)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


#: The tap's timestamps: RFC 3339, UTC, nanoseconds, as the CSV output writes them.
_timestamps = TimestampFormatter()


def tap_record(series: Any, index: int) -> dict[str, Any]:
    """One tapped point as the JSON object `agent tap --format json` prints."""
    metric = series.metric if isinstance(series.metric, str) else series.metric[index]
    record: dict[str, Any] = {
        "metric": metric,
        "timestamp": _timestamps.format(series.timestamps[index]),
        "value": series.values[index],
        "resource": str(getattr(series.resource, "kind", series.resource)),
    }
    resource_id = getattr(series.resource, "id", None)
    if resource_id not in (None, ""):
        record["resource_id"] = str(resource_id)
    consumer_kind = getattr(series.consumer, "kind", None)
    if consumer_kind is not None:
        record["consumer"] = str(consumer_kind)
        consumer_id = getattr(series.consumer, "id", None)
        if consumer_id not in (None, ""):
            record["consumer_id"] = str(consumer_id)
    if series.attributes:
        record["attributes"] = {str(k): v for k, v in series.attributes.items()}
    return record


# -- the Unix socket --


def check_socket_path(path: Path) -> None:
    """A path too long for a Unix socket is a start error naming it."""
    length = len(os.fsencode(path))
    if length > MAX_SOCKET_PATH:
        raise StartupError(
            f"control socket: {path} is too long for a Unix socket ({length} bytes, at most"
            f" {MAX_SOCKET_PATH}); choose a shorter [agent] data_dir"
        )


def bind_control_socket(path: Path) -> socket.socket:
    """Binds `path` with mode 0600. A socket that another agent still answers on is a start error
    (never unlinked from under it); a stale one (nobody answers) is replaced."""
    check_socket_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_socket():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(os.fspath(path))
        except OSError:
            path.unlink(missing_ok=True)  # stale: its agent is gone
        else:
            raise StartupError(f"control socket: another agent is running at {path} (same data_dir?)")
        finally:
            probe.close()
    elif path.exists():
        raise StartupError(f"control socket: {path} exists and is not a socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # created 0600: only this user may control the agent
    try:
        sock.bind(os.fspath(path))
    except OSError as exc:
        sock.close()
        raise StartupError(f"control socket: cannot bind {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(64)
    sock.setblocking(False)
    return sock


async def serve_control_socket(
    controller: Controller, path: Path, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serves the control requests on `path` until cancelled, then removes the socket file."""
    sock = bind_control_socket(path)
    inode = os.stat(path).st_ino
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(controller.run_rates)
            task_status.started(path)
            await trio.serve_listeners(partial_handler(controller), [listener])
    finally:
        try:
            # Only our own socket: a later agent may have replaced a file we no longer own.
            st = os.stat(path)
            if stat.S_ISSOCK(st.st_mode) and st.st_ino == inode:
                path.unlink()
        except OSError:
            pass


def partial_handler(controller: Controller) -> Callable[[trio.SocketStream], Any]:
    async def handler(stream: trio.SocketStream) -> None:
        try:
            await _serve_connection(controller, stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                raise
        finally:
            await trio.aclose_forcefully(stream)

    return handler


async def _serve_connection(controller: Controller, stream: trio.SocketStream) -> None:
    buffer = bytearray()
    while True:
        newline = buffer.find(b"\n")
        if newline < 0:
            if len(buffer) > MAX_REQUEST:
                await stream.send_all(
                    _line({"ok": False, "error": "request too long", "code": "bad-request"})
                )
                return
            data = await stream.receive_some(65536)
            if not data:
                return
            buffer += data
            continue
        line = bytes(buffer[:newline])
        del buffer[: newline + 1]
        if not line.strip():
            continue  # an empty line is nothing, not an error
        try:
            request = decode_untrusted(_decoder, line)
        except MalformedData as exc:
            await stream.send_all(_line({"ok": False, "error": f"not JSON: {exc}", "code": "bad-request"}))
            continue
        if isinstance(request, dict) and request.get("action") == "tap":
            await _stream_tap(controller, stream, request)
            return
        await stream.send_all(_line(await controller.handle(request)))


async def _stream_tap(controller: Controller, stream: trio.SocketStream, request: dict[str, Any]) -> None:
    """Sends {"point": {...}} lines as points flow, and {"dropped": N} whenever the count grew, until the
    client hangs up. Points wait in the tap's bounded queue, never in the pipeline."""
    tap = controller.open_tap(str(request.get("metric") or "*"))
    try:
        async with trio.open_nursery() as nursery:

            async def pump() -> None:
                try:
                    await _tap_points(tap, stream)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass  # the client went away
                nursery.cancel_scope.cancel()

            nursery.start_soon(pump)
            # The client hangs up when it has enough (`--limit`): stop at once, even if no point flows.
            try:
                while await stream.receive_some(4096):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            nursery.cancel_scope.cancel()
    finally:
        controller.close_tap(tap)


async def _tap_points(tap: Tap, stream: trio.SocketStream) -> None:
    reported = 0
    await stream.send_all(_line({"ok": True, "tap": True}))
    while True:
        lines = []
        series, index = await tap.receive.receive()
        lines.append(_line({"point": tap_record(series, index)}))
        while len(lines) < 1000:
            try:
                series, index = tap.receive.receive_nowait()
            except trio.WouldBlock:
                break
            lines.append(_line({"point": tap_record(series, index)}))
        if tap.dropped != reported:
            reported = tap.dropped
            lines.append(_line({"dropped": reported}))
        await stream.send_all(b"".join(lines))


def _line(message: Any) -> bytes:
    return _encoder.encode(message) + b"\n"
