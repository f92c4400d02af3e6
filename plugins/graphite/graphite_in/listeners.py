"""The `graphite-in` source: carbon's plaintext (TCP and UDP) and pickle (TCP) listeners.

Where it sits: the plugin (`plugin.py`) adds one `GraphiteInput` to the pipeline; it binds every enabled
listener, reports ready once all of them listen, and pushes one batch per chunk received. The parsing is
pure code in `graphite.protocol` (`plaintext.parse_chunk`, `pickle_codec`), and `series.py` turns the
columns into series: this module only moves bytes, counts and logs.

- TCP plaintext: one task per connection reads what the socket holds, up to `read_size` (256 KiB by
  default), and parses the whole chunk at once (no per-line work in this layer); the partial last line
  waits for the next read. Reads of 256 KiB rather than 64 KiB cost about a fifth less CPU per line
  end to end (fewer, larger batches through the pipeline and graphite-out; benchmarks/graphite.py). A line longer
  than `max_line_length` closes that connection only (the stream is out of step). A connection closed
  cleanly (FIN) in the middle of a line: the last line is taken as complete, as carbon-relay-ng does
  and as `echo -n "a.b 1 -1" | nc host 2003` expects (carbon's LineReceiver drops it); a connection
  reset (RST) drops it and counts it as `truncated`.
- UDP plaintext: each datagram is a complete chunk (a missing final newline is added); the datagrams
  waiting in the socket are parsed together, up to `read_size` bytes, in one batch.
- TCP pickle: 4-byte big-endian length, then a pickle of `[(path, (timestamp, value)), ...]`. A frame
  declared larger than `max_pickle_frame_size` closes the connection before anything is buffered. A
  frame that is refused (not a pickle, names a class or function, not a list of points) is counted as
  `bad_pickle` and the connection stays open: the length prefix keeps the stream in step.

Every connection task catches its own errors: one bad client never affects another. Sends to the
pipeline are awaited per chunk, so a full pipeline stops the reads (TCP then pushes back on the
senders; UDP datagrams queue in the socket buffer, then the kernel drops them, as carbon's would).
Graphite senders expect no acknowledgement.

Bad input is dropped and counted by listener and reason (the parser's reasons, plus `bad_pickle` and
`truncated`), the last few bad lines go to `recent_bad_lines` (served by graphite-out's admin API at
`GET /badlines`), and a warning naming the peer and the reason is logged at most once per
`LOG_INTERVAL` seconds per listener, with the number of bad lines in between.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from agent.model import Batch
from agent.net import bind_sockets, open_tcp_listeners, socket_address
from agent.plugin import AutonomousSource, SourceSink
from agent.ratelimit import RateLimitedLog
from agent_plugins.graphite.protocol.badlines import RecentBadLines
from agent_plugins.graphite.protocol.pickle_codec import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_POINTS_PER_FRAME,
    FrameTooLargeError,
    PickleFrameError,
    decode_frame,
    split_frames,
)
from agent_plugins.graphite.protocol.plaintext import (
    DEFAULT_MAX_LINE_LENGTH,
    NS_PER_SECOND,
    BadLine,
    PlaintextChunk,
    TagCacheEntry,
    ValidationLevel,
    check_paths,
    parse_chunk,
)

from .series import graphite_series

log = logging.getLogger(__name__)

#: How much one read takes from a TCP connection (and at most how many datagram bytes go in one batch).
READ_SIZE = 1 << 18
#: The largest UDP payload.
MAX_DATAGRAM = 65535
#: Datagrams parsed together at most (many tiny datagrams would otherwise make one huge batch of tasks).
MAX_DATAGRAMS_PER_BATCH = 1024
#: Connections waiting to be accepted (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 4096
#: A bigger UDP receive buffer than Linux's default 208 KiB rides out bursts while a batch is sent (the
#: kernel caps it at net.core.rmem_max; failing to set it is not an error).
UDP_RECEIVE_BUFFER = 4 << 20
#: At most one warning per listener and kind (bad input, closed connections) per this many seconds.
LOG_INTERVAL = 10.0

PLAINTEXT = "plaintext"
UDP = "udp"
PICKLE = "pickle"
LISTENERS = (PLAINTEXT, UDP, PICKLE)

# Reasons of our own, beside the parser's (plaintext.BAD_LINE_REASONS).
BAD_PICKLE = "bad_pickle"
TRUNCATED = "truncated"

# Why we closed a connection.
CLOSED_LINE_TOO_LONG = "line_too_long"
CLOSED_FRAME_TOO_LARGE = "frame_too_large"
CLOSED_IDLE = "idle_timeout"
CLOSED_TOO_MANY = "too_many_connections"


@dataclass(frozen=True)
class ListenerSettings:
    """What the listeners need, in plain numbers (bytes, seconds). An empty address switches a listener off."""

    plaintext: str = "0.0.0.0:2003"
    udp: str = ""
    pickle: str = "0.0.0.0:2004"
    validation: ValidationLevel = "medium"
    max_line_length: int = DEFAULT_MAX_LINE_LENGTH
    max_pickle_frame_size: int = DEFAULT_MAX_FRAME_BYTES
    max_pickle_points: int = DEFAULT_MAX_POINTS_PER_FRAME
    max_connections: int = 10_000
    #: 0: connections may stay idle forever (TCP keepalive still finds dead peers).
    idle_timeout: float = 0.0
    recent_bad_lines: int = 100
    read_size: int = READ_SIZE
    reuse_port: bool = False

    def address(self, listener: str) -> str:
        return getattr(self, listener)


@dataclass
class ListenerCounters:
    """What one listener did since the start."""

    #: Points accepted and sent on (plaintext lines, pickle points).
    points: int = 0
    #: Dropped lines (pickle: points, or whole frames for `bad_pickle`) by reason.
    bad: dict[str, int] = field(default_factory=dict)
    #: TCP connections accepted, and open now.
    connections: int = 0
    open_connections: int = 0
    #: Connections we closed, by reason (line_too_long, frame_too_large, idle_timeout, too_many_connections).
    closed: dict[str, int] = field(default_factory=dict)
    #: Connections that ended with an error (reset by the peer, or a bug, logged).
    errors: int = 0
    #: Pickle frames decoded, UDP datagrams received.
    frames: int = 0
    datagrams: int = 0

    def add_bad(self, counts: dict[str, int]) -> None:
        bad = self.bad
        for reason, count in counts.items():
            bad[reason] = bad.get(reason, 0) + count

    def add_closed(self, reason: str) -> None:
        self.closed[reason] = self.closed.get(reason, 0) + 1


class _IdleTimeout(Exception):
    pass


class GraphiteInput(AutonomousSource):
    """Listens for carbon plaintext (TCP, UDP) and pickle (TCP) and pushes what arrives into the pipeline.

    `bound` gives the addresses each listener actually bound (the port filled in when the config says
    0), once running; `counters` what each listener did; `recent_bad_lines` the last refused lines.
    """

    def __init__(self, settings: ListenerSettings) -> None:
        self.settings = settings
        self.counters: dict[str, ListenerCounters] = {name: ListenerCounters() for name in LISTENERS}
        #: Found by graphite-out (badlines.find_recent_bad_lines) and served at GET /badlines.
        self.recent_bad_lines = RecentBadLines("graphite-in", max_entries=settings.recent_bad_lines)
        self.bound: dict[str, list[str]] = {}
        self.warnings = RateLimitedLog(log, LOG_INTERVAL)
        self._sink: SourceSink | None = None

    # -- running --

    async def run(
        self, sink: SourceSink, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._sink = sink
        settings = self.settings
        tcp: dict[str, list[trio.SocketListener]] = {}
        udp_sockets: list[socket.socket] = []
        try:
            # Everything is bound before anything is served: a taken port is a startup error naming it.
            for name in (PLAINTEXT, PICKLE):
                if settings.address(name):
                    tcp[name] = await self._open_tcp(name, settings.address(name))
            if settings.udp:
                udp_sockets = await self._open_udp(settings.udp)
        except BaseException:
            for listeners in tcp.values():
                for listener in listeners:
                    await listener.aclose()
            for sock in udp_sockets:
                sock.close()
            raise
        log.info(
            "graphite-in: listening: %s (validation %s)",
            "; ".join(f"{name} on {', '.join(addresses)}" for name, addresses in self.bound.items()),
            settings.validation,
        )
        try:
            async with trio.open_nursery() as nursery:
                if PLAINTEXT in tcp:
                    nursery.start_soon(self._serve_tcp, tcp[PLAINTEXT], PLAINTEXT)
                if PICKLE in tcp:
                    nursery.start_soon(self._serve_tcp, tcp[PICKLE], PICKLE)
                for sock in udp_sockets:
                    nursery.start_soon(self._serve_udp, sock)
                task_status.started(dict(self.bound))
        finally:
            for sock in udp_sockets:
                sock.close()
            log.info("graphite-in: stopped; %s", self.summary())

    def summary(self) -> str:
        """One line of what every enabled listener did."""
        parts = []
        for name in LISTENERS:
            if name not in self.bound:
                continue
            c = self.counters[name]
            bad = sum(c.bad.values())
            text = f"{name}: {c.points} points, {bad} bad"
            if bad:
                text += " (" + ", ".join(f"{reason} {count}" for reason, count in sorted(c.bad.items())) + ")"
            if name != UDP:
                text += f", {c.connections} connections"
                if c.closed:
                    text += " (closed: " + ", ".join(f"{r} {n}" for r, n in sorted(c.closed.items())) + ")"
            parts.append(text)
        return "; ".join(parts)

    async def _open_tcp(self, name: str, address: str) -> list[trio.SocketListener]:
        listeners = await open_tcp_listeners(
            address, reuse_port=self.settings.reuse_port, what=f"graphite-in {name}", backlog=LISTEN_BACKLOG
        )
        self.bound[name] = [socket_address(listener.socket.getsockname()) for listener in listeners]
        return listeners

    async def _open_udp(self, address: str) -> list[socket.socket]:
        sockets = await bind_sockets(
            address, socket.SOCK_DGRAM, reuse_port=self.settings.reuse_port, what=f"graphite-in {UDP}"
        )
        self.bound[UDP] = [socket_address(sock.getsockname()) for sock in sockets]
        for sock in sockets:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
            except OSError:
                pass
        return sockets

    async def _serve_tcp(self, listeners: list[trio.SocketListener], name: str) -> None:
        counters = self.counters[name]

        async def accepted(stream: trio.SocketStream) -> None:
            peer = _peer(stream)
            if counters.open_connections >= self.settings.max_connections:
                counters.add_closed(CLOSED_TOO_MANY)
                self.warnings.warn(
                    f"{name} refused",
                    1,
                    "graphite-in %s: refused a connection from %s: %d connections are open (max_connections)",
                    name,
                    peer,
                    counters.open_connections,
                )
                with trio.CancelScope(shield=True):
                    await stream.aclose()
                return
            try:
                # Senders often keep one connection for days: keepalive finds the peers that vanished.
                stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:
                pass
            await self.serve_connection(name, stream, peer)

        await trio.serve_listeners(accepted, listeners)

    async def serve_connection(
        self, listener: str, stream: trio.abc.Stream, peer: str, sink: SourceSink | None = None
    ) -> None:
        """Serves one plaintext or pickle connection until it ends, then closes it. Never raises (but
        trio.Cancelled): errors end this connection only. Public so that tests can drive it over an
        in-memory stream; `sink` defaults to the one `run` was given."""
        if sink is not None:
            self._sink = sink
        handler = self._serve_pickle_connection if listener == PICKLE else self._serve_plaintext_connection
        counters = self.counters[listener]
        counters.connections += 1
        counters.open_connections += 1
        try:
            await handler(stream, peer)
        except _IdleTimeout:
            counters.add_closed(CLOSED_IDLE)
            log.debug("graphite-in %s: closed %s: idle for %.0fs", listener, peer, self.settings.idle_timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            counters.errors += 1
            log.debug("graphite-in %s: connection from %s ended: %s", listener, peer, error)
        except Exception:
            # A bug must not take the listener down: this connection ends, the others go on.
            counters.errors += 1
            log.exception("graphite-in %s: connection from %s failed", listener, peer)
        finally:
            counters.open_connections -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _receive(self, stream: trio.abc.ReceiveStream) -> bytes:
        """The next bytes from the peer (b"" at its end); raises _IdleTimeout after idle_timeout."""
        idle = self.settings.idle_timeout
        if idle <= 0:
            return await stream.receive_some(self.settings.read_size)
        with trio.move_on_after(idle):
            return await stream.receive_some(self.settings.read_size)
        raise _IdleTimeout

    async def _send(
        self,
        counters: ListenerCounters,
        paths: list[str],
        timestamps: list[int],
        values: list[float],
        tagged: dict[str, Any],
    ) -> None:
        if not paths:
            return
        counters.points += len(paths)
        assert self._sink is not None
        await self._sink.send(Batch(graphite_series(paths, timestamps, values, tagged)))

    # -- plaintext over TCP --

    async def _serve_plaintext_connection(self, stream: trio.abc.ReceiveStream, peer: str) -> None:
        settings = self.settings
        counters = self.counters[PLAINTEXT]
        leftover = b""
        tag_cache: dict[str, TagCacheEntry] = {}
        while True:
            try:
                data = await self._receive(stream)
            except trio.BrokenResourceError:
                if leftover.strip():
                    # A reset connection: the last line may have been cut anywhere.
                    self._report_bad(
                        PLAINTEXT,
                        peer,
                        {TRUNCATED: 1},
                        [
                            BadLine(
                                TRUNCATED,
                                "the connection was reset in the middle of this line",
                                _text(leftover),
                            )
                        ],
                    )
                raise
            if not data:
                if leftover.strip():
                    # Closed cleanly in the middle of a line: the sender is done, the line is complete.
                    chunk = self._parse(b"\n", leftover, tag_cache)
                    await self._take_chunk(chunk, PLAINTEXT, peer)
                return
            chunk = self._parse(data, leftover, tag_cache)
            leftover = chunk.leftover
            await self._take_chunk(chunk, PLAINTEXT, peer)
            if chunk.line_too_long:
                counters.add_closed(CLOSED_LINE_TOO_LONG)
                self.warnings.warn(
                    "plaintext closed",
                    1,
                    "graphite-in plaintext: closed the connection from %s: a line is longer than %d bytes"
                    " (max_line_length)",
                    peer,
                    settings.max_line_length,
                )
                return

    def _parse(self, data: bytes, leftover: bytes, tag_cache: dict[str, TagCacheEntry]) -> PlaintextChunk:
        settings = self.settings
        return parse_chunk(
            data,
            leftover,
            now_ns=time.time_ns(),
            validation=settings.validation,
            max_line_length=settings.max_line_length,
            tag_cache=tag_cache,
        )

    async def _take_chunk(self, chunk: PlaintextChunk, listener: str, peer: str) -> None:
        if chunk.bad_counts:
            self._report_bad(listener, peer, chunk.bad_counts, chunk.bad_samples)
        await self._send(self.counters[listener], chunk.paths, chunk.timestamps, chunk.values, chunk.tagged)

    def _report_bad(
        self, listener: str, peer: str, counts: dict[str, int], samples: Iterable[BadLine]
    ) -> None:
        self.counters[listener].add_bad(counts)
        samples = list(samples)
        self.recent_bad_lines.record_many(peer, ((f"{s.reason}: {s.message}", s.line) for s in samples))
        if samples:
            first = samples[0]
            total = sum(counts.values())
            self.warnings.warn(
                f"{listener} bad",
                total,
                "graphite-in %s: dropped %d bad %s from %s: %s: %s: %r",
                listener,
                total,
                "points" if listener == PICKLE else "lines",
                peer,
                first.reason,
                first.message,
                first.line,
            )

    # -- plaintext over UDP --

    async def _serve_udp(self, sock: socket.socket) -> None:
        counters = self.counters[UDP]
        tag_cache: dict[str, TagCacheEntry] = {}
        limit = self.settings.read_size
        while True:
            await trio.lowlevel.wait_readable(sock)
            datagrams: list[tuple[bytes, Any]] = []
            size = 0
            # Take what is waiting, without waiting for more.
            while size < limit and len(datagrams) < MAX_DATAGRAMS_PER_BATCH:
                try:
                    data, sender = sock.recvfrom(MAX_DATAGRAM)
                except BlockingIOError:
                    break
                except OSError as error:
                    # An ICMP error for an earlier datagram can surface here; the socket stays usable.
                    if error.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                        log.warning("graphite-in udp: receive failed: %s", error)
                    break
                datagrams.append((data, sender))
                size += len(data)
            if datagrams:
                counters.datagrams += len(datagrams)
                try:
                    await self._take_datagrams(datagrams, counters, tag_cache)
                except Exception:
                    # As for a TCP connection: a bug costs these datagrams, not the listener.
                    counters.errors += 1
                    log.exception("graphite-in udp: %d datagrams failed", len(datagrams))

    async def _take_datagrams(
        self,
        datagrams: list[tuple[bytes, Any]],
        counters: ListenerCounters,
        tag_cache: dict[str, TagCacheEntry],
    ) -> None:
        # Each datagram is complete: its last line ends with it.
        joined = b"".join(data if data.endswith(b"\n") else data + b"\n" for data, _ in datagrams)
        chunk = self._parse(joined, b"", tag_cache)
        if chunk.bad_counts:
            counters.add_bad(chunk.bad_counts)
            # Rare: parse the datagrams one by one again to know who sent the bad lines.
            for data, sender in datagrams:
                alone = self._parse(data + b"\n", b"", tag_cache)
                if alone.bad_samples:
                    self._report_bad_samples(UDP, socket_address(sender), alone.bad_counts, alone.bad_samples)
        await self._send(counters, chunk.paths, chunk.timestamps, chunk.values, chunk.tagged)

    def _report_bad_samples(
        self, listener: str, peer: str, counts: dict[str, int], samples: list[BadLine]
    ) -> None:
        """Like _report_bad, for bad lines already counted."""
        self.recent_bad_lines.record_many(peer, ((f"{s.reason}: {s.message}", s.line) for s in samples))
        first = samples[0]
        total = sum(counts.values())
        self.warnings.warn(
            f"{listener} bad",
            total,
            "graphite-in %s: dropped %d bad lines from %s: %s: %s: %r",
            listener,
            total,
            peer,
            first.reason,
            first.message,
            first.line,
        )

    # -- pickle over TCP --

    async def _serve_pickle_connection(self, stream: trio.abc.ReceiveStream, peer: str) -> None:
        settings = self.settings
        counters = self.counters[PICKLE]
        tag_cache: dict[str, TagCacheEntry] = {}
        buffer = b""
        needed = 4  # bytes that must be there before a frame can be cut: header, or header and payload
        while True:
            data = await self._receive(stream)
            if not data:
                if buffer:
                    self._report_bad(
                        PICKLE,
                        peer,
                        {TRUNCATED: 1},
                        [
                            BadLine(
                                TRUNCATED,
                                f"the connection closed {len(buffer)} bytes into a frame",
                                _text(buffer[:80]),
                            )
                        ],
                    )
                return
            buffer += data
            if len(buffer) < needed:
                continue
            try:
                frames, buffer = split_frames(buffer, max_frame_bytes=settings.max_pickle_frame_size)
            except FrameTooLargeError as error:
                counters.add_closed(CLOSED_FRAME_TOO_LARGE)
                self.warnings.warn(
                    "pickle closed",
                    1,
                    "graphite-in pickle: closed the connection from %s: %s (max_pickle_frame_size)",
                    peer,
                    error,
                )
                return
            needed = 4 + int.from_bytes(buffer[:4], "big") if len(buffer) >= 4 else 4
            if frames:
                await self._take_frames(frames, counters, peer, tag_cache)

    async def _take_frames(
        self, frames: list[bytes], counters: ListenerCounters, peer: str, tag_cache: dict[str, TagCacheEntry]
    ) -> None:
        settings = self.settings
        now = time.time_ns()
        paths: list[str] = []
        timestamps: list[int] = []
        values: list[float] = []
        for frame in frames:
            counters.frames += 1
            try:
                points = decode_frame(
                    frame,
                    now_ns=now,
                    max_points=settings.max_pickle_points,
                    keep_nan=settings.validation == "none",
                )
            except PickleFrameError as error:
                # The frame is refused as a whole; the length prefix keeps the stream in step.
                self._report_bad(
                    PICKLE, peer, {BAD_PICKLE: 1}, [BadLine(BAD_PICKLE, str(error), _text(frame[:80]))]
                )
                continue
            if points.dropped:
                self._report_bad(PICKLE, peer, points.dropped, points.bad_samples)
            paths += points.paths
            timestamps += points.timestamps
            values += points.values
        if not paths:
            return
        checked = check_paths(paths, validation=settings.validation, tag_cache=tag_cache)
        paths = checked.paths
        if checked.refused:
            refused = checked.refused
            counts: dict[str, int] = {}
            samples = []
            for index, (reason, message) in sorted(refused.items()):
                counts[reason] = counts.get(reason, 0) + 1
                if len(samples) < 10:
                    line = f"{paths[index]} {values[index]!r} {timestamps[index] // NS_PER_SECOND}"
                    samples.append(BadLine(reason, message, line[:200]))
            self._report_bad(PICKLE, peer, counts, samples)
            kept = [index for index in range(len(paths)) if index not in refused]
            paths = [paths[index] for index in kept]
            timestamps = [timestamps[index] for index in kept]
            values = [values[index] for index in kept]
        await self._send(counters, paths, timestamps, values, checked.tagged)


def _peer(stream: trio.SocketStream) -> str:
    try:
        return socket_address(stream.socket.getpeername())
    except OSError:
        return "unknown peer"


def _text(data: bytes) -> str:
    return data[:200].decode("utf-8", "backslashreplace")
