"""The relay server: an autonomous source that takes batches from relay clients into the pipeline.

    relay clients ──TCP/TLS──> listener ──> one task group per connection ──> SourceSink ──> outputs
                                              reader: frames -> batches ─┘        │
                                              writer: acks, heartbeats <── on_done┘

Per connection, a reader task decodes frames (relay.protocol.framing) and forwards batches into the
pipeline with an acknowledgement callback; a writer task is the only one that sends: cumulative acks
as the outputs finish batches, refusals, heartbeats, the goodbye. The stream table
(relay.protocol.streams) remembers per client stream what was written and what is in the pipeline, so
a batch resent after a cut is never written twice, and an ack only ever covers written batches.

One bad client never affects the others: every connection catches its own errors, logs one line naming
the peer's address and the reason, and closes. Connections that fail before their hello (no hello in
time, a failed TLS handshake) are logged through a rate limit: 10 000 idle connections timing out
together make a few lines that count them, not 10 000. The protocol is docs/relay-protocol.md.
"""

from __future__ import annotations

import functools
import logging
import ssl
import uuid
from dataclasses import dataclass
from typing import Any

import trio

from agent import RateLimitedLog, describe_exception
from agent import __version__ as AGENT_VERSION
from agent.model import BatchIdentity, MetricConflictError, MetricDef, MetricRegistry
from agent.net import socket_address
from agent.plugin import AutonomousSource, SourceSink
from agent_plugins.relay.protocol import (
    PROTOCOL_VERSION,
    SUPPORTED_PROTOCOL_VERSIONS,
    Accept,
    Ack,
    BatchMessage,
    ClientMessage,
    FrameDecoder,
    FrameEncoder,
    Goodbye,
    GoodbyeCode,
    Heartbeat,
    Hello,
    InvalidBatchError,
    Message,
    MetricDefs,
    ProtocolError,
    Refused,
    Reject,
    RejectCode,
    TruncatedStreamError,
    UndefinedMetricError,
    batch_from_wire,
)
from agent_plugins.relay.protocol.address import WILDCARD_HOSTS, parse_address
from agent_plugins.relay.protocol.streams import StreamState, StreamTable, Verdict

from .security import AuthError, certificate_names, check_token, resolve_client_name

log = logging.getLogger(__name__)

#: How much one receive call may return. Large enough that a 2 MB batch frame takes a few calls.
RECEIVE_SIZE = 1 << 20
#: The attribute every relayed point carries: the name of the client it came from.
RELAY_CLIENT_ATTRIBUTE = "relay_client"
#: Sending the last words (reject, bye) to a peer that does not read must not hold a task forever.
LAST_WORDS_TIMEOUT = 2.0
#: Warnings that can come by the thousand (handshakes failing, batches an output could not write): at
#: most one line per kind this often; the next one counts those left out.
LOG_INTERVAL = 10.0


@dataclass(frozen=True)
class ServerSettings:
    """What the server needs from its config, in plain numbers (seconds, bytes)."""

    address: str = "[::]:50051"
    max_frame_size: int = 16 * 1024 * 1024
    handshake_timeout: float = 10.0
    heartbeat_interval: float = 5.0
    max_in_flight: int = 64
    max_connections: int = 10_000
    stream_retention: float = 7 * 86400.0
    max_streams: int = 100_000
    shutdown_timeout: float = 5.0
    token: str = ""
    client_tokens: tuple[tuple[str, str], ...] = ()
    tls_client_name_must_match: bool = True


@dataclass
class ServerCounters:
    connections: int = 0
    rejected: int = 0
    disconnected_with_error: int = 0
    batches: int = 0
    points: int = 0
    duplicate_batches: int = 0
    refused_batches: int = 0
    failed_batches: int = 0


class _SessionEnd(Exception):
    """Why a streaming session ends; `code` is the Goodbye we send (None: send nothing)."""

    level = logging.INFO

    def __init__(self, reason: str, code: str | None = None) -> None:
        super().__init__(reason)
        self.code = code


class _PeerGone(_SessionEnd):
    pass


class _Misbehaved(_SessionEnd):
    level = logging.WARNING


class RelayServer(AutonomousSource):
    """Listens on `settings.address` and serves relay clients (see the module docstring)."""

    def __init__(
        self,
        settings: ServerSettings,
        registry: MetricRegistry,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.ssl_context = ssl_context
        self.streams = StreamTable(retention=settings.stream_retention, max_streams=settings.max_streams)
        self.connections: set[_Connection] = set()
        self.counters = ServerCounters()
        #: The addresses actually bound (the port filled in when the config says 0), once running.
        self.bound_addresses: list[str] = []
        self._client_tokens = dict(settings.client_tokens)
        #: Set when the agent stops: sessions acknowledge what they forwarded, say bye and end.
        self.stopping = False
        self._renames_logged: set[tuple[str, str]] = set()
        #: Connections that fail before their hello, batches not written: one line per kind and interval.
        self.warnings = RateLimitedLog(log, LOG_INTERVAL, clock=trio.current_time)
        self._sink: SourceSink | None = None

    def client_rows(self) -> list[dict[str, Any]]:
        """One row per live session, for the agent's status: client, address, last acknowledged batch,
        lag (batches taken into the pipeline and not yet acknowledged), seconds since it last sent."""
        now = trio.current_time()
        rows = []
        for connection in sorted(self.connections, key=lambda c: (c.client_name, c.peer)):
            state = getattr(connection, "state", None)
            rows.append(
                {
                    "client": connection.client_name or "(handshake)",
                    "address": connection.peer,
                    "last ack": state.acked_seq if state is not None else 0,
                    "lag (batches)": state.accepted_seq - state.acked_seq if state is not None else 0,
                    "session (s)": round(now - state.last_active, 1) if state is not None else 0.0,
                }
            )
        return rows

    # -- listening --

    async def open_listeners(self) -> list[trio.SocketListener]:
        """Binds the configured address; an error names it (the agent reports it as a startup error)."""
        host, port = parse_address(self.settings.address)
        try:
            # "[::]" and "0.0.0.0"-like wildcards listen on every address, IPv4 and IPv6 alike (trio
            # opens one socket per family; an IPv6 socket alone would not take IPv4 clients).
            listeners = await trio.open_tcp_listeners(port, host=None if host in WILDCARD_HOSTS else host)
        except OSError as exc:
            raise OSError(f"cannot listen on {self.settings.address}: {exc.strerror or exc}") from None
        self.bound_addresses = [socket_address(listener.socket.getsockname()) for listener in listeners]
        return listeners

    async def run(
        self, sink: SourceSink, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._sink = sink
        listeners = await self.open_listeners()
        log.info(
            "relay-server: listening on %s (%s)",
            ", ".join(self.bound_addresses),
            "TLS, client certificates required"
            if self.ssl_context is not None and self.ssl_context.verify_mode == ssl.CERT_REQUIRED
            else "TLS"
            if self.ssl_context is not None
            else "plain TCP",
        )
        task_status.started(list(self.bound_addresses))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_sessions_when_cancelled)
                nursery.start_soon(self._count_warnings)
                await trio.serve_listeners(self._handle_tcp, listeners)
        finally:
            self.warnings.flush()
            c = self.counters
            log.info(
                "relay-server: stopped; %d connections, %d batches (%d points) taken, %d duplicates dropped,"
                " %d refused, %d not written by an output",
                c.connections,
                c.batches,
                c.points,
                c.duplicate_batches,
                c.refused_batches,
                c.failed_batches,
            )

    async def _stop_sessions_when_cancelled(self) -> None:
        """Streaming sessions are shielded from the source's cancellation (cancelling a TLS read
        breaks the stream): when the agent stops, this tells each of them to finish in good order."""
        try:
            await trio.sleep_forever()
        finally:
            self.stopping = True
            deadline = trio.current_time() + self.settings.shutdown_timeout
            for connection in list(self.connections):
                connection.stop(deadline)

    async def _count_warnings(self) -> None:
        """Logs the count of a burst of warnings once it stopped (the rate limit logs the first of a
        burst at once, and the count only with a later one)."""
        while True:
            await trio.sleep(LOG_INTERVAL)
            self.warnings.flush(due_only=True)

    async def _handle_tcp(self, stream: trio.SocketStream) -> None:
        try:
            peer = socket_address(stream.socket.getpeername())
        except OSError:
            peer = "unknown peer"
        await self.handle_connection(stream, peer)

    async def handle_connection(
        self, stream: trio.abc.Stream, peer: str, sink: SourceSink | None = None
    ) -> None:
        """Serves one client connection until it ends; never raises (except trio.Cancelled).

        Public so that tests can drive it over an in-memory stream; `sink` defaults to the one `run`
        was given.
        """
        if sink is not None:
            self._sink = sink
        if self.ssl_context is not None:
            stream = trio.SSLStream(stream, self.ssl_context, server_side=True)
        connection = _Connection(self, stream, peer)
        await connection.serve()

    # -- shared by the connections --

    def register_metric(self, definition: MetricDef, client_name: str) -> str:
        """The server-side name of a client's metric: the same name if the definition agrees with what
        the registry has, else NAME_relay-client-CLIENT (logged once per client and metric)."""
        suffix = f"relay-client-{client_name}"
        try:
            _, name = self.registry.register_or_rename(definition, suffix)
        except MetricConflictError as exc:
            # Even the renamed metric exists with another unit: keep the points under that name
            # rather than lose them, and say so.
            name = f"{definition.name}_{suffix}"
            if (client_name, definition.name) not in self._renames_logged:
                self._renames_logged.add((client_name, definition.name))
                log.error("relay-server: client %r: metric %s (kept unregistered)", client_name, exc)
            return name
        if name != definition.name and (client_name, definition.name) not in self._renames_logged:
            self._renames_logged.add((client_name, definition.name))
            known = self.registry.get(definition.name)
            log.warning(
                "relay-server: client %r defines metric %r as (unit=%r, type=%s), which conflicts with"
                " (unit=%r, type=%s): its points are renamed %r",
                client_name,
                definition.name,
                definition.unit,
                definition.value_type,
                known.unit if known else "?",
                known.value_type if known else "?",
                name,
            )
        return name

    def batch_done(self, state: StreamState, seq: int, ok: bool) -> None:
        """The pipeline's verdict on a forwarded batch (the SourceSink callback)."""
        moved = state.done(seq, ok)
        connection: _Connection | None = state.connection
        if not ok:
            self.counters.failed_batches += 1
            self.warnings.warn(
                "not written",
                1,
                "relay-server: an output could not write batch %d of client %r (%d such batches so far);"
                " the client will resend it",
                seq,
                state.client_name,
                self.counters.failed_batches,
            )
            if connection is not None:
                connection.request_resend(seq)
        elif moved and connection is not None:
            connection.wake()


class _Connection:
    """One client connection: handshake, then a reader and a writer task (see the module docstring)."""

    def __init__(self, server: RelayServer, stream: trio.abc.Stream, peer: str) -> None:
        self.server = server
        self.settings = server.settings
        self.stream = stream
        self.peer = peer
        self.client_name = ""
        self.state: StreamState | None = None
        self.decoder: FrameDecoder[Any] = FrameDecoder(ClientMessage, self.settings.max_frame_size)
        self.encoder = FrameEncoder()
        self.metric_names: dict[int, str] = {}
        self.metric_defs: dict[int, MetricDef] = {}
        self.sent_ack = 0
        self.highest_forwarded = 0
        self._ack_again = False
        self._refusals: list[Refused] = []
        self._resend_seq: int | None = None
        self._changed = trio.Event()
        self._last_send = 0.0
        # Shielded: the session ends through `stop` (in good order) or `supersede`, never by the
        # cancellation of the source, which would break a TLS stream before its last words.
        self._session_scope = trio.CancelScope(shield=True)
        self._superseded = False
        self._stopping = False
        self._end: _SessionEnd | None = None

    def __repr__(self) -> str:
        return f"<relay connection {self.describe()}>"

    def describe(self) -> str:
        return f"{self.peer} ({self.client_name})" if self.client_name else self.peer

    # -- signals from elsewhere (callbacks, other connections) --

    def wake(self) -> None:
        self._changed.set()

    def request_resend(self, seq: int) -> None:
        if self._resend_seq is None:
            self._resend_seq = seq
        self.wake()

    def supersede(self) -> None:
        """A new connection of the same stream took over: stop this one."""
        self._superseded = True
        self._session_scope.cancel()

    def stop(self, deadline: float) -> None:
        """The agent stops: forward nothing more, acknowledge what was forwarded once it is written, say
        bye, all before `deadline` (then the session is cut short)."""
        self._stopping = True
        self._session_scope.deadline = min(self._session_scope.deadline, deadline + LAST_WORDS_TIMEOUT)
        self.wake()

    async def _wait_change(self, timeout: float) -> None:
        """Returns after a `wake` (also one that came while the writer was busy: the event stays set
        until seen here) or after `timeout`."""
        with trio.move_on_after(timeout):
            await self._changed.wait()
        if self._changed.is_set():
            self._changed = trio.Event()

    # -- the whole life of the connection --

    async def serve(self) -> None:
        server = self.server
        server.counters.connections += 1
        if len(server.connections) >= self.settings.max_connections:
            server.counters.rejected += 1
            log.warning(
                "relay-server: client %s rejected (busy): %d connections, the maximum",
                self.peer,
                self.settings.max_connections,
            )
            await self._last_words(
                Reject(
                    RejectCode.BUSY,
                    "the server is at its connection limit; retry later",
                    PROTOCOL_VERSION,
                    AGENT_VERSION,
                )
            )
            return
        server.connections.add(self)
        try:
            hello = await self._handshake()
            if hello is None or not await self._admit(hello):
                return
            self._open_session(hello)
            await self._streaming()
        except Exception as exc:
            # One connection's bug must not stop the server.
            server.counters.disconnected_with_error += 1
            log.error(
                "relay-server: client %s disconnected: internal error: %s",
                self.describe(),
                describe_exception(exc),
            )
            log.debug("relay connection failure", exc_info=True)
        finally:
            server.connections.discard(self)
            if self.state is not None:
                server.streams.detach(self.state, self, trio.current_time())
            with trio.CancelScope(shield=True), trio.move_on_after(LAST_WORDS_TIMEOUT):
                try:
                    await self.stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError):
                    pass

    async def _handshake(self) -> Hello | None:
        """Reads the Hello within the handshake timeout (TLS handshake included). None: the connection
        ended, with a logged reason."""
        first: Any = None
        problem: str | None = None
        with trio.move_on_after(self.settings.handshake_timeout) as timer:
            if isinstance(self.stream, trio.SSLStream):
                try:
                    await self.stream.do_handshake()
                except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
                    self._log_handshake_failure("tls", f"TLS handshake failed: {_tls_reason(exc)}")
                    return None
            try:
                while first is None:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        if self.decoder.pending_bytes:
                            self._log_handshake_failure(
                                "partial hello",
                                f"closed the connection in the middle of its first frame ({self.decoder.pending_bytes} bytes)",
                            )
                        else:
                            log.debug("relay-server: %s closed the connection without a word", self.peer)
                        return None
                    for message in self.decoder.feed(data):
                        first = message
                        break
            except ProtocolError as exc:
                problem = str(exc)
            except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
                self._log_handshake_failure(
                    "connection failed", f"connection failed during the handshake: {_tls_reason(exc)}"
                )
                return None
        if timer.cancelled_caught:
            detail = (
                f" ({self.decoder.pending_bytes} bytes of a frame received)"
                if self.decoder.pending_bytes
                else ""
            )
            self._log_handshake_failure(
                "timeout",
                f"no hello within the handshake timeout of {self.settings.handshake_timeout:g}s{detail}",
            )
            return None
        if problem is None and not isinstance(first, Hello):
            problem = f"the first message must be 'hello', got {type(first).__struct_config__.tag!r}"
        if problem is not None:
            await self._reject(RejectCode.INVALID, problem, problem)
            return None
        return first

    async def _admit(self, hello: Hello) -> bool:
        server = self.server
        if hello.protocol_version not in SUPPORTED_PROTOCOL_VERSIONS:
            text = (
                f"protocol version {hello.protocol_version} is not supported: the server speaks protocol"
                f" {PROTOCOL_VERSION}, the client speaks {hello.protocol_version}"
            )
            self.client_name = hello.client_name
            await self._reject(RejectCode.VERSION, text, text)
            return False
        try:
            peercert = self.stream.getpeercert() if isinstance(self.stream, trio.SSLStream) else None
            self.client_name = resolve_client_name(
                hello.client_name,
                certificate_names(peercert),
                name_must_match=self.settings.tls_client_name_must_match,
            )
            check_token(self.client_name, hello.token, self.settings.token, server._client_tokens)
        except AuthError as exc:
            self.client_name = self.client_name or hello.client_name
            await self._reject(RejectCode.AUTH, "authentication failed", str(exc))
            return False
        except ValueError as exc:
            await self._reject(RejectCode.INVALID, str(exc), str(exc))
            return False
        if not hello.stream_id:
            await self._reject(RejectCode.INVALID, "empty stream id", "empty stream id")
            return False
        return True

    def _open_session(self, hello: Hello) -> None:
        server = self.server
        state, previous = server.streams.attach(self.client_name, hello.stream_id, self, trio.current_time())
        self.state = state
        if previous is not None and previous is not self:
            log.info(
                "relay-server: client %s: a new connection from %s takes over stream %s",
                previous.describe(),
                self.peer,
                hello.stream_id,
            )
            previous.supersede()
        others = [s for s in server.streams.live_streams_of(self.client_name) if s is not state]
        if others:
            log.warning(
                "relay-server: two live connections use the client name %r (from %s and %s, streams %s):"
                " their points and renamed metrics cannot be told apart; give each client its own client_name",
                self.client_name,
                self.peer,
                ", ".join(o.connection.peer for o in others),
                ", ".join([hello.stream_id] + [o.stream_id for o in others]),
            )
        log.info(
            "relay-server: client %s connected (agent %s, stream %s, resuming after batch %d)",
            self.describe(),
            hello.agent_version,
            hello.stream_id,
            state.acked_seq,
        )

    async def _streaming(self) -> None:
        state = self.state
        assert state is not None
        self.sent_ack = state.acked_seq
        await self._send(
            Accept(
                PROTOCOL_VERSION,
                AGENT_VERSION,
                uuid.uuid4().hex[:16],
                state.acked_seq,
                state.accepted_seq,
                self.settings.max_frame_size,
                self.settings.max_in_flight,
                max(1, round(self.settings.heartbeat_interval * 1000)),
            )
        )
        end: _SessionEnd | None = None
        if self.server.stopping:
            self.stop(trio.current_time() + self.settings.shutdown_timeout)
        with self._session_scope:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._run_half, self._reader, nursery.cancel_scope)
                    nursery.start_soon(self._run_half, self._writer, nursery.cancel_scope)
            finally:
                end = self._end
        if self._superseded:
            end = _SessionEnd("a new connection of the same stream took over", GoodbyeCode.SUPERSEDED)
        elif self._session_scope.cancelled_caught:
            end = _Misbehaved("the agent stopped before the session could end in good order")
        if end is None:
            return
        if end.code is not None:
            await self._last_words(Goodbye(end.code, str(end)))
        if end.level >= logging.WARNING:
            self.server.counters.disconnected_with_error += 1
        log.log(end.level, "relay-server: client %s disconnected: %s", self.describe(), end)

    async def _run_half(self, half: Any, scope: trio.CancelScope) -> None:
        """Runs the reader or the writer; the first to end (with its reason) ends the session."""
        try:
            await half()
        except _SessionEnd as end:
            self._end = self._end or end
        except TruncatedStreamError as exc:
            self._end = self._end or _Misbehaved(str(exc))
        except ProtocolError as exc:
            self._end = self._end or _Misbehaved(f"protocol error: {exc}", GoodbyeCode.PROTOCOL_ERROR)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError) as exc:
            self._end = self._end or _PeerGone(f"connection lost: {_tls_reason(exc)}")
        scope.cancel()

    async def _reader(self) -> None:
        dead_after = 3 * self.settings.heartbeat_interval
        # Messages that came in the same packets as the Hello.
        for message in self.decoder.feed(b""):
            await self._on_message(message)
        while True:
            with trio.move_on_after(dead_after) as timer:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            if timer.cancelled_caught:
                raise _Misbehaved(
                    f"nothing received for {dead_after:g}s (3 heartbeat intervals)", GoodbyeCode.TIMEOUT
                )
            if not data:
                self.decoder.eof()
                raise _PeerGone("the client closed the connection")
            for message in self.decoder.feed(data):
                await self._on_message(message)

    async def _on_message(self, message: Message) -> None:
        if isinstance(message, BatchMessage):
            await self._on_batch(message)
        elif isinstance(message, MetricDefs):
            self._on_defs(message)
        elif isinstance(message, Heartbeat):
            pass
        elif isinstance(message, Goodbye):
            level = logging.INFO if message.code == GoodbyeCode.SHUTDOWN else logging.WARNING
            end = _PeerGone(f"the client said goodbye ({message.code}: {message.reason})")
            end.level = level
            raise end
        else:
            raise ProtocolError(
                f"unexpected {type(message).__struct_config__.tag!r} message in a streaming session"
            )

    def _on_defs(self, message: MetricDefs) -> None:
        for client_id, definition in message.definitions.items():
            known = self.metric_defs.get(client_id)
            if known is not None:
                if known != definition:
                    raise ProtocolError(
                        f"metric id {client_id} redefined in the same session: was {known.name!r}, now {definition.name!r}"
                    )
                continue
            self.metric_defs[client_id] = definition
            self.metric_names[client_id] = self.server.register_metric(definition, self.client_name)

    async def _on_batch(self, message: BatchMessage) -> None:
        server = self.server
        state = self.state
        assert state is not None and server._sink is not None
        if self._stopping:
            return  # not taken: the client keeps it and resends it to the next server
        seq = message.seq
        verdict = state.receive(seq)
        if verdict is not Verdict.FORWARD:
            server.counters.duplicate_batches += 1
            if verdict is Verdict.DUPLICATE_DONE:
                self._ack_again = True
                self.wake()
            return
        try:
            batch = batch_from_wire(message, self.metric_names)
        except UndefinedMetricError:
            state.abandon(seq)
            raise
        except InvalidBatchError as exc:
            # Resending could never help: refuse it, count it as done so the stream goes on.
            server.counters.refused_batches += 1
            log.warning("relay-server: client %s: refused batch %d: %s", self.describe(), seq, exc)
            self._refusals.append(Refused(seq, str(exc)))
            state.done(seq, True)
            self.wake()
            return
        name = self.client_name
        # Outputs that deduplicate (postgres) recognise a batch resent after a lost ack or a restart by it.
        batch.identity = BatchIdentity(name, state.stream_id, seq)
        points = 0
        for series in batch.series:
            # The first relay hop's name is kept: through a tier (nodes -> rack -> central) the
            # attribute still names the node the points came from.
            series.attributes.setdefault(RELAY_CLIENT_ATTRIBUTE, name)
            points += len(series.timestamps)
        try:
            await server._sink.send(batch, functools.partial(server.batch_done, state, seq))
        except BaseException:
            state.abandon(seq)
            raise
        self.highest_forwarded = max(self.highest_forwarded, seq)
        server.counters.batches += 1
        server.counters.points += points

    async def _writer(self) -> None:
        interval = self.settings.heartbeat_interval
        state = self.state
        assert state is not None

        while True:
            await self._wait_change(max(0.0, self._last_send + interval - trio.current_time()))
            if self._resend_seq is not None:
                raise _Misbehaved(
                    f"an output could not write batch {self._resend_seq}; asked the client to resend from batch"
                    f" {state.acked_seq + 1}",
                    GoodbyeCode.RESEND,
                )
            while self._refusals:
                await self._send(self._refusals.pop(0))
            if state.acked_seq > self.sent_ack or self._ack_again:
                self._ack_again = False
                self.sent_ack = state.acked_seq
                await self._send(Ack(state.acked_seq))
            elif trio.current_time() - self._last_send >= interval:
                await self._send(Heartbeat())
            if self._stopping and (state.acked_seq >= self.highest_forwarded or state.needs_resend):
                end = _PeerGone("the server is stopping", GoodbyeCode.SHUTDOWN)
                end.level = logging.DEBUG
                raise end

    # -- sending --

    async def _send(self, message: Message) -> None:
        await self.stream.send_all(self.encoder.encode(message))
        self._last_send = trio.current_time()

    async def _last_words(self, message: Message) -> None:
        """A reject or bye before closing; a peer that does not read does not hold us. Shielded: these
        are sent while the agent stops too."""
        with trio.CancelScope(shield=True), trio.move_on_after(LAST_WORDS_TIMEOUT):
            try:
                await self._send(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError):
                pass

    async def _reject(self, code: str, reason_for_client: str, reason_for_log: str) -> None:
        self._log_rejection(f"rejected ({code}): {reason_for_log}")
        await self._last_words(Reject(code, reason_for_client, PROTOCOL_VERSION, AGENT_VERSION))

    def _log_rejection(self, text: str) -> None:
        self.server.counters.rejected += 1
        log.warning("relay-server: client %s %s", self.describe(), text)

    def _log_handshake_failure(self, kind: str, text: str) -> None:
        """A connection that ended before its hello: rate-limited by `kind`, as many may fail at once."""
        self.server.counters.rejected += 1
        self.server.warnings.warn(kind, 1, "relay-server: client %s disconnected: %s", self.peer, text)


def _tls_reason(exc: BaseException) -> str:
    """The useful part of a TLS or socket failure (trio wraps ssl errors in BrokenResourceError)."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, trio.BrokenResourceError) and cause is not None:
        exc = cause
    if isinstance(exc, ssl.SSLError):
        return (
            exc.reason or str(exc)
            if not getattr(exc, "verify_message", None)
            else f"{exc.reason}: {exc.verify_message}"
        )
    return describe_exception(exc)


__all__ = ["RELAY_CLIENT_ATTRIBUTE", "RelayServer", "ServerCounters", "ServerSettings"]
