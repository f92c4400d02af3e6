"""The relay client: an output that sends batches to a relay server and loses none of them.

    pipeline ─> OutputInbox ─> intake ─> BatchStore (disk log: write-ahead) ─> sender ─> TCP/TLS ─> server
                                 │ env.done(True) once stored                 receiver <─ acks ─┘
                                 └─────────────────────────── commit(acked seq) <─┘

- **Intake** takes envelopes from the output's queue, up to `buffer_max_length` points or until
  `buffer_timeout` has passed since the first of them (a timer: it flushes even if no other point
  comes), encodes them once into a record, appends it to the store, and acknowledges the envelopes to
  the core: with the disk buffer, a stored batch is safe. With the memory buffer, the envelopes are
  acknowledged only when the server has acknowledged the batch.
- **Connection loop**: connects (TCP, optionally TLS), says hello, resumes where the server says it
  is, and runs a sender and a receiver until the connection ends; then reconnects with exponential
  backoff and jitter. `max_times` failed attempts in a row are logged as an outage, after which it
  retries every `max_delay`, for ever. A rejection (wrong version, wrong token) is retried at
  `max_delay` too: the server may be upgraded or reconfigured.
- **Sender**: sends the stored records after the last acknowledged one, at most `max_in_flight` at a
  time, preceded by the metric definitions they use; heartbeats when idle.
- **Receiver**: applies cumulative acks (commit the log: the records leave the buffer), logs refusals,
  notices a silent server (3 heartbeat intervals) and ends the session.

At shutdown the intake takes what is left in the queue, then waits (within the agent's grace period)
until the server has acknowledged everything, says goodbye and closes. With the disk buffer it does not
wait for an unreachable server: the records stay on disk and go out after the next start.
"""

from __future__ import annotations

import itertools
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from agent import Envelope, OutputInbox, describe_exception
from agent import __version__ as AGENT_VERSION
from agent.backoff import Backoff
from agent.model import MetricDef, MetricRegistry
from agent.plugin import Output
from agent_plugins.relay.protocol import (
    PROTOCOL_VERSION,
    Accept,
    Ack,
    FrameDecoder,
    FrameEncoder,
    Goodbye,
    GoodbyeCode,
    Heartbeat,
    Hello,
    Message,
    MetricDefs,
    ProtocolError,
    Refused,
    Reject,
    RejectCode,
    ServerMessage,
    TruncatedStreamError,
)
from agent_plugins.relay.protocol.address import parse_address
from agent_plugins.relay.protocol.session import SendWindow, plan_resume

from .records import encode_records, frame_body_size
from .store import BatchStore, BufferSpec

log = logging.getLogger(__name__)

T = TypeVar("T")

RECEIVE_SIZE = 256 * 1024
#: Records recently appended are kept in memory too, so that the sender does not read back from disk
#: what it has just written. Bounded: a sender that falls behind reads from the log.
RECENT_CACHE_BYTES = 64 * 1024 * 1024
#: Frames are coalesced into one send call up to this size (many small batches, one system call).
SEND_CHUNK_BYTES = 1 << 20
#: Records encoded ahead of the disk write (the intake encodes while the appender writes).
APPEND_QUEUE_RECORDS = 4
#: Metric definitions per MetricDefs message, so that a huge table never makes an oversized frame.
DEFS_PER_MESSAGE = 5000
#: During a long outage, a reminder at most this often.
OUTAGE_REMINDER_INTERVAL = 600.0
LAST_WORDS_TIMEOUT = 2.0
#: How often the disk buffer is synced while idle (its own fsync policy decides during appends).
SYNC_INTERVAL = 1.0


@dataclass(frozen=True)
class ClientSettings:
    """What the client needs from its config, in plain numbers (seconds, bytes)."""

    client_name: str
    relay_server: str = "127.0.0.1:50051"
    buffer_max_length: int = 4096
    buffer_timeout: float = 30.0
    max_times: int = 8
    initial_delay: float = 0.5
    max_delay: float = 4.0
    max_in_flight: int = 64
    max_frame_size: int = 16 * 1024 * 1024
    handshake_timeout: float = 10.0
    token: str = ""
    tls_server_name: str = ""


@dataclass
class ClientCounters:
    points_buffered: int = 0
    records_appended: int = 0
    batches_sent: int = 0
    acked_seq: int = 0
    batches_refused: int = 0
    points_dropped: int = 0
    connections: int = 0
    failed_attempts: int = 0


@dataclass
class _Encoded:
    """Frames on their way from the intake to the log, numbered from `first_seq`."""

    first_seq: int
    frames: list[bytearray]
    envelopes: list[Envelope]


class SessionEnded(Exception):
    """A session ended. `accepted`: the server had accepted it (the backoff starts again);
    `level`: how loudly to log it."""

    def __init__(self, reason: str, *, accepted: bool = True, level: int = logging.WARNING) -> None:
        super().__init__(reason)
        self.accepted = accepted
        self.level = level


class Rejected(SessionEnded):
    """The server answered `reject`."""

    def __init__(self, reject: Reject) -> None:
        self.reject = reject
        if reject.code == RejectCode.VERSION:
            text = (
                f"rejected our protocol version: the server speaks protocol {reject.protocol_version}"
                f" (agent {reject.server_version}), we speak protocol {PROTOCOL_VERSION} (agent {AGENT_VERSION})"
                f": {reject.reason}"
            )
        else:
            text = f"rejected us ({reject.code}): {reject.reason}"
        super().__init__(text, accepted=False, level=logging.ERROR)


class _SaidGoodbye(Exception):
    """We said goodbye at shutdown, with nothing left to send."""


class RelayClient(Output):
    """The relay-client output (see the module docstring)."""

    def __init__(
        self,
        settings: ClientSettings,
        buffer: BufferSpec,
        *,
        registry: MetricRegistry | None = None,
        ssl_context: ssl.SSLContext | None = None,
        connect: Callable[[], Awaitable[trio.abc.Stream]] | None = None,
        rng: random.Random | None = None,
        store: BatchStore | None = None,
    ) -> None:
        """`store`: the buffer already opened from `buffer` (the plugin opens the disk buffer at start,
        to report a directory it cannot use as a startup error); the first run uses it."""
        self.settings = settings
        self.host, self.port = parse_address(settings.relay_server)
        self.registry = registry
        self.ssl_context = ssl_context
        self.buffer = buffer
        self._connect = connect
        self._rng = rng or random.Random()
        self.counters = ClientCounters()
        self.store: BatchStore | None = None
        self._opened_store = store
        self.connected = False
        #: Called with the delay before each reconnection attempt (tests record the schedule).
        self.on_retry_delay: Callable[[float], None] | None = None
        self._encoder = FrameEncoder(settings.max_frame_size)
        self._recent: deque[tuple[int, bytes]] = deque()
        self._recent_bytes = 0
        self._unacked: deque[tuple[int, list[Envelope]]] = deque()  # memory buffer: envelopes by last seq
        self._acked_seq = 0  # the highest seq the server acknowledged (and the log may commit)
        self._changed = trio.Event()
        self._stopping = False

    @property
    def server(self) -> str:
        return self.settings.relay_server

    # -- plumbing --

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_change(self, timeout: float = float("inf")) -> None:
        event = self._changed
        with trio.move_on_after(max(0.0, timeout)):
            await event.wait()

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        """Calls the store: in a worker thread for the disk buffer (file I/O, fsync), inline for memory."""
        assert self.store is not None
        if self.store.durable:
            return await trio.to_thread.run_sync(fn, *args)
        return fn(*args)

    # -- the output task --

    async def run(
        self, inbox: OutputInbox, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._stopping = False
        if self._opened_store is not None:
            self.store, self._opened_store = self._opened_store, None
        else:
            self.store = (
                await trio.to_thread.run_sync(self.buffer.open) if self.buffer.durable else self.buffer.open()
            )
        store = self.store
        self._acked_seq = store.log.committed_seq
        self._recent.clear()
        self._recent_bytes = 0
        if store.log.pending_records:
            log.info(
                "relay-client: %d batches (%d bytes) from before are waiting in the buffer for %s",
                store.log.pending_records,
                store.log.pending_bytes,
                self.server,
            )
        try:
            task_status.started()
            async with trio.open_nursery() as nursery:
                connection_done = trio.Event()

                async def connection_task() -> None:
                    try:
                        await self._connection_loop()
                    finally:
                        connection_done.set()

                nursery.start_soon(connection_task)
                if store.durable:
                    nursery.start_soon(self._commit_and_sync_loop)
                await self._intake(inbox)
                await self._drain_before_exit(connection_done)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._close_store()

    def close_unused_store(self) -> None:
        """Closes the store given at construction if no run took it (the agent did not start)."""
        if self._opened_store is not None:
            self._opened_store.close()
            self._opened_store = None

    async def _close_store(self) -> None:
        store = self.store
        if store is None:
            return
        self.store = None
        for _, envelopes in self._unacked:
            for env in envelopes:
                env.done(False)
        if self._unacked:
            lost = store.log.pending_records
            log.error(
                "relay-client: stopping with %d batches not acknowledged by %s: lost (memory buffer)",
                lost,
                self.server,
            )
        self._unacked.clear()

        def close() -> None:
            if self._acked_seq > store.log.committed_seq:
                store.log.commit(min(self._acked_seq, store.log.last_seq))
            store.close()

        if store.durable:
            await trio.to_thread.run_sync(close)
            if store.log.pending_records:
                log.info(
                    "relay-client: %d batches stay in the disk buffer and go to %s after the next start",
                    store.log.pending_records,
                    self.server,
                )
        else:
            close()

    async def _intake(self, inbox: OutputInbox) -> None:
        """Takes envelopes, encodes them into frames and hands them to the appender, in order. The
        encoding of the next batch overlaps the disk write of the previous one."""
        settings = self.settings
        store = self.store
        assert store is not None
        send_channel, receive_channel = trio.open_memory_channel[_Encoded](APPEND_QUEUE_RECORDS)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._appender, receive_channel)
            async with send_channel:
                # Only the appender appends, in this order: the next record numbers are known here, and
                # the frames carry them.
                next_seq = store.log.last_seq + 1
                while True:
                    envelopes = await inbox.receive_batch(settings.buffer_max_length, settings.buffer_timeout)
                    if not envelopes:
                        return
                    live = [env for env in envelopes if not env.settled]
                    if not live:
                        continue
                    series = [s for env in live for s in env.batch.series]
                    if store.assign_ids(series, self.registry):
                        # Before any frame using the new ids reaches the log.
                        await self._io(store.save)
                    encoded = encode_records(self._encoder, series, store.metric_ids, next_seq)
                    self.counters.points_dropped += encoded.dropped_points
                    await send_channel.send(_Encoded(next_seq, encoded.frames, live))
                    next_seq += len(encoded.frames)

    async def _appender(self, receive_channel: trio.MemoryReceiveChannel[_Encoded]) -> None:
        store = self.store
        assert store is not None
        async with receive_channel:
            async for item in receive_channel:
                frames, live, first_seq = item.frames, item.envelopes, item.first_seq
                points = sum(env.points for env in live)
                last_seq = first_seq - 1
                if frames:
                    last_seq = await self._io(store.log.append_many, frames)
                    if last_seq != first_seq + len(frames) - 1:
                        raise RuntimeError(
                            f"the buffer numbered batches {first_seq}..{first_seq + len(frames) - 1} as ..{last_seq}"
                        )
                    self.counters.records_appended += len(frames)
                self.counters.points_buffered += points
                if store.durable:
                    for env in live:
                        env.done(True)
                    self._remember_recent(first_seq, frames)
                elif frames:
                    self._unacked.append((last_seq, live))
                    self._settle_dropped_by_cap()
                else:
                    for env in live:
                        env.done(False)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "relay-client: buffered batches %d-%d (%d points); %d points buffered since start,"
                        " %d batches pending",
                        first_seq,
                        last_seq,
                        points,
                        self.counters.points_buffered,
                        last_seq - self._acked_seq,
                    )
                self._notify()

    def _remember_recent(self, first_seq: int, frames: list[bytearray]) -> None:
        recent = self._recent
        for seq, payload in zip(itertools.count(first_seq), frames):
            recent.append((seq, payload))
            self._recent_bytes += len(payload)
        while recent and self._recent_bytes > RECENT_CACHE_BYTES:
            self._recent_bytes -= len(recent.popleft()[1])

    def _forget_recent_through(self, seq: int) -> None:
        recent = self._recent
        while recent and recent[0][0] <= seq:
            self._recent_bytes -= len(recent.popleft()[1])

    def _settle_dropped_by_cap(self) -> None:
        """Memory buffer: batches the full buffer dropped (oldest first) will never be sent."""
        assert self.store is not None
        committed = self.store.log.committed_seq
        while self._unacked and self._unacked[0][0] <= committed and self._unacked[0][0] > self._acked_seq:
            _, envelopes = self._unacked.popleft()
            for env in envelopes:
                env.done(False)

    async def _read_after(self, after: int, max_records: int) -> list[tuple[int, bytes]]:
        """The next stored records to send, from memory when they are recent, else from the log."""
        store = self.store
        assert store is not None
        start = max(after, store.log.committed_seq) + 1
        if start > store.log.last_seq:
            return []
        recent = self._recent
        if recent and recent[0][0] <= start:
            index = start - recent[0][0]
            return list(itertools.islice(recent, index, index + max_records))
        return await self._io(store.log.read, start - 1, max_records)

    async def _drain_before_exit(self, connection_done: trio.Event) -> None:
        """Shutdown: wait until the server has acknowledged everything (or, with the disk buffer, until
        it is unreachable), then let the sender say goodbye."""
        store = self.store
        assert store is not None
        self._stopping = True
        self._notify()
        while self._acked_seq < store.log.last_seq and store.log.committed_seq < store.log.last_seq:
            if store.durable and not self.connected:
                break
            await self._wait_change()
        if self.connected:
            with trio.move_on_after(LAST_WORDS_TIMEOUT):
                await connection_done.wait()

    async def _commit_and_sync_loop(self) -> None:
        """Disk buffer: commits acknowledged records (in a worker thread) and syncs while idle."""
        store = self.store
        assert store is not None
        last_sync = trio.current_time()
        while True:
            target = min(self._acked_seq, store.log.last_seq)
            if target > store.log.committed_seq:
                await trio.to_thread.run_sync(store.log.commit, target)
                self._forget_recent_through(target)
                self._notify()
                continue
            if trio.current_time() - last_sync >= SYNC_INTERVAL:
                await trio.to_thread.run_sync(store.log.sync)
                last_sync = trio.current_time()
            await self._wait_change(SYNC_INTERVAL)

    # -- connections --

    async def _open_stream(self) -> trio.abc.Stream:
        if self._connect is not None:
            return await self._connect()
        tcp = await trio.open_tcp_stream(self.host, self.port)
        if self.ssl_context is None:
            return tcp
        stream = trio.SSLStream(
            tcp, self.ssl_context, server_hostname=self.settings.tls_server_name or self.host
        )
        try:
            await stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        return stream

    def _retry_delay(self, failures: int) -> float:
        if failures <= self.settings.max_times:
            return self._backoff.next_delay()
        return self._max_delay()

    def _max_delay(self) -> float:
        # Jittered like every other delay, so that a fleet does not reconnect in lockstep.
        return self._rng.uniform(self.settings.max_delay / 2, self.settings.max_delay)

    async def _connection_loop(self) -> None:
        settings = self.settings
        self._backoff = Backoff(settings.initial_delay, settings.max_delay, jitter=True, rng=self._rng)
        failures = 0
        outage_started: float | None = None
        last_reminder = 0.0
        last_reject: str | None = None
        while True:
            ended: SessionEnded
            try:
                with trio.fail_after(settings.handshake_timeout):
                    stream = await self._open_stream()
            except trio.TooSlowError:
                ended = SessionEnded(
                    f"no connection within the handshake timeout of {settings.handshake_timeout:g}s",
                    accepted=False,
                )
            except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
                ended = SessionEnded(_connect_failure(exc), accepted=False)
            else:
                try:
                    await self._session(stream)
                    return  # we said goodbye at shutdown
                except SessionEnded as exc:
                    ended = exc
                finally:
                    self.connected = False
                    self._notify()
                    with trio.CancelScope(shield=True), trio.move_on_after(LAST_WORDS_TIMEOUT):
                        await trio.aclose_forcefully(stream)
            if self._stopping and (
                self.store is None or self.store.durable or self._acked_seq >= self.store.log.last_seq
            ):
                # Stopping: nothing left to deliver, or it stays on disk for the next start.
                log.log(
                    min(ended.level, logging.INFO),
                    "relay-client: connection to %s ended: %s",
                    self.server,
                    ended,
                )
                return
            if ended.accepted:
                failures = 0
                self._backoff.reset()
                outage_started = None
                last_reject = None
                log.log(
                    ended.level, "relay-client: connection to %s ended: %s; reconnecting", self.server, ended
                )
                delay = self._backoff.next_delay()
            else:
                failures += 1
                self.counters.failed_attempts += 1
                now = time.monotonic()
                if outage_started is None:
                    outage_started = now
                if isinstance(ended, Rejected):
                    delay = self._max_delay()
                    text = str(ended)
                    if text != last_reject or now - last_reminder >= OUTAGE_REMINDER_INTERVAL:
                        last_reject = text
                        last_reminder = now
                        log.error(
                            "relay-client: %s %s; retrying every %gs", self.server, text, settings.max_delay
                        )
                    else:
                        log.debug("relay-client: %s %s", self.server, text)
                else:
                    delay = self._retry_delay(failures)
                    if failures < settings.max_times:
                        log.warning(
                            "relay-client: cannot reach %s: %s; retrying in %.2gs (attempt %d of %d)",
                            self.server,
                            ended,
                            delay,
                            failures,
                            settings.max_times,
                        )
                    elif failures == settings.max_times or now - last_reminder >= OUTAGE_REMINDER_INTERVAL:
                        last_reminder = now
                        log.error(
                            "relay-client: outage: %s unreachable for %.1fs (%d attempts; last: %s); %s;"
                            " retrying every %gs",
                            self.server,
                            now - outage_started,
                            failures,
                            ended,
                            self._buffer_summary(),
                            settings.max_delay,
                        )
                    else:
                        log.debug("relay-client: still cannot reach %s: %s", self.server, ended)
            if self.on_retry_delay is not None:
                self.on_retry_delay(delay)
            await trio.sleep(delay)

    def _buffer_summary(self) -> str:
        store = self.store
        if store is None:
            return "nothing buffered"
        where = "on disk" if store.durable else "in memory (the oldest are dropped when it is full)"
        return f"{store.log.pending_records} batches ({store.log.pending_bytes} bytes) buffered {where}"

    async def _session(self, stream: trio.abc.Stream) -> None:
        """One connection from hello to its end. Returns only after our goodbye at shutdown; raises
        SessionEnded otherwise."""
        store = self.store
        assert store is not None
        settings = self.settings
        decoder: FrameDecoder[Any] = FrameDecoder(ServerMessage, settings.max_frame_size)
        hello_encoder = FrameEncoder()
        name = settings.client_name
        try:
            await stream.send_all(
                hello_encoder.encode(
                    Hello(PROTOCOL_VERSION, name, store.stream_id, AGENT_VERSION, settings.token or None)
                )
            )
            with trio.fail_after(settings.handshake_timeout):
                first = await self._receive_one(stream, decoder)
        except trio.TooSlowError:
            raise SessionEnded(
                f"no answer to our hello within the handshake timeout of {settings.handshake_timeout:g}s",
                accepted=False,
            ) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError) as exc:
            raise SessionEnded(
                f"connection failed during the handshake: {_connect_failure(exc)}", accepted=False
            ) from None
        except ProtocolError as exc:
            raise SessionEnded(f"invalid answer to our hello: {exc}", accepted=False) from None
        if isinstance(first, Reject):
            raise Rejected(first)
        if not isinstance(first, Accept):
            raise SessionEnded(
                f"the server answered our hello with {type(first).__struct_config__.tag!r}, not 'accept'",
                accepted=False,
            )
        accept = first
        plan = plan_resume(accept, store.log.last_seq)
        if plan.commit_through > store.log.committed_seq:
            self._acked_seq = max(self._acked_seq, plan.commit_through)
            await self._io(store.log.commit, plan.commit_through)
            self._forget_recent_through(plan.commit_through)
            self._settle_acked(plan.commit_through)
        if plan.new_stream:
            old = store.stream_id
            await self._io(store.start_new_stream)
            raise SessionEnded(
                f"the server has seen batch {accept.received_seq} of stream {old}, but this client numbered only"
                f" {store.log.last_seq} (its buffer lost its tail): moving the {store.log.pending_records} buffered"
                f" batches to the new stream {store.stream_id}",
            )
        self.counters.connections += 1
        self.connected = True
        # Resume after what the server acknowledged: in this session's accept, or in an ack of the last
        # session whose commit may still be on its way to the log.
        window = SendWindow(
            min(settings.max_in_flight, accept.max_in_flight), max(self._acked_seq, store.log.committed_seq)
        )
        encoder = FrameEncoder(accept.max_frame_size)
        heartbeat = accept.heartbeat_interval_ms / 1000
        log.info(
            "relay-client: connected to %s as %r (stream %s, server agent %s); %d batches to send",
            self.server,
            name or "(certificate name)",
            store.stream_id,
            accept.server_version,
            store.log.pending_records,
        )
        self._notify()
        outcome: list[BaseException] = []
        protocol_error: list[ProtocolError] = []
        async with trio.open_nursery() as nursery:

            async def half(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
                # The first half to end ends the session; its reason is the session's.
                try:
                    await fn(*args)
                except (SessionEnded, _SaidGoodbye) as exc:
                    outcome.append(exc)
                except TruncatedStreamError as exc:
                    outcome.append(SessionEnded(str(exc)))
                except ProtocolError as exc:
                    outcome.append(SessionEnded(f"protocol error: {exc}"))
                    protocol_error.append(exc)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError) as exc:
                    outcome.append(SessionEnded(f"connection lost: {_connect_failure(exc)}"))
                nursery.cancel_scope.cancel()

            nursery.start_soon(half, self._sender, stream, encoder, window, heartbeat)
            nursery.start_soon(half, self._receiver, stream, decoder, window, heartbeat)
        if outcome and isinstance(outcome[0], _SaidGoodbye):
            return
        if protocol_error and outcome[0] is not None:
            # Only now that the sender has stopped may another frame go out.
            with trio.move_on_after(LAST_WORDS_TIMEOUT):
                try:
                    await stream.send_all(
                        encoder.encode(Goodbye(GoodbyeCode.PROTOCOL_ERROR, str(protocol_error[0])))
                    )
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError):
                    pass
        raise outcome[0] if outcome else SessionEnded("the session ended")

    async def _receive_one(self, stream: trio.abc.Stream, decoder: FrameDecoder[Any]) -> Message:
        while True:
            for message in decoder.feed(b""):
                return message
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                decoder.eof()
                raise SessionEnded(
                    "the server closed the connection without answering our hello", accepted=False
                )
            for message in decoder.feed(data):
                return message

    async def _sender(
        self, stream: trio.abc.Stream, encoder: FrameEncoder, window: SendWindow, heartbeat: float
    ) -> None:
        store = self.store
        assert store is not None
        defs_sent = 0
        max_body = encoder.max_frame_size
        last_send = trio.current_time()
        while True:
            records = await self._read_after(window.last_sent, window.room) if window.room else []
            if not records:
                if self._stopping and not len(window) and self._acked_seq >= store.log.last_seq:
                    await stream.send_all(
                        encoder.encode(Goodbye(GoodbyeCode.SHUTDOWN, "the client is stopping"))
                    )
                    raise _SaidGoodbye()
                idle_for = trio.current_time() - last_send
                if idle_for >= heartbeat:
                    await stream.send_all(encoder.encode(Heartbeat()))
                    last_send = trio.current_time()
                    continue
                await self._wait_change(heartbeat - idle_for)
                continue
            metrics = store.metrics
            while defs_sent < len(metrics):
                upto = min(len(metrics), defs_sent + DEFS_PER_MESSAGE)
                await stream.send_all(encoder.encode(MetricDefs(_definitions(metrics, defs_sent, upto))))
                defs_sent = upto
            # Small frames go out together (one system call); large ones as they are stored (no copy).
            pending: list[bytes | bytearray] = []
            pending_bytes = 0
            for seq, frame in records:
                if seq <= window.last_sent:
                    continue  # an ack covered it meanwhile (the server had it from an earlier session)
                window.sent(seq)
                if frame_body_size(frame) > max_body:
                    # The server's limit is below ours: this batch can never be delivered to it.
                    self.counters.points_dropped += 1
                    log.error(
                        "relay-client: batch %d (%d bytes) exceeds the maximum frame size of %s (%d bytes) and is"
                        " skipped; set max_frame_size to at most the server's",
                        seq,
                        frame_body_size(frame),
                        self.server,
                        max_body,
                    )
                    continue
                self.counters.batches_sent += 1
                pending.append(frame)
                pending_bytes += len(frame)
                if pending_bytes >= SEND_CHUNK_BYTES:
                    await stream.send_all(pending[0] if len(pending) == 1 else b"".join(pending))
                    pending.clear()
                    pending_bytes = 0
            if pending:
                await stream.send_all(pending[0] if len(pending) == 1 else b"".join(pending))
            last_send = trio.current_time()

    async def _receiver(
        self, stream: trio.abc.Stream, decoder: FrameDecoder[Any], window: SendWindow, heartbeat: float
    ) -> None:
        dead_after = 3 * heartbeat
        for message in decoder.feed(b""):
            self._on_server_message(message, window)
        while True:
            with trio.move_on_after(dead_after) as timer:
                data = await stream.receive_some(RECEIVE_SIZE)
            if timer.cancelled_caught:
                raise SessionEnded(
                    f"nothing received from the server for {dead_after:g}s (3 heartbeat intervals)"
                )
            if not data:
                decoder.eof()
                raise SessionEnded("the server closed the connection")
            for message in decoder.feed(data):
                self._on_server_message(message, window)

    def _on_server_message(self, message: Message, window: SendWindow) -> None:
        store = self.store
        assert store is not None
        if isinstance(message, Ack):
            try:
                advanced = window.acked(message.seq, store.log.last_seq)
            except ValueError as exc:
                raise ProtocolError(str(exc)) from None
            if advanced:
                self.counters.acked_seq = message.seq
                self._acked_seq = max(self._acked_seq, message.seq)
                if not store.durable:
                    self._settle_acked(message.seq)
                    store.log.commit(min(message.seq, store.log.last_seq))
                self._notify()
        elif isinstance(message, Refused):
            self.counters.batches_refused += 1
            log.error(
                "relay-client: %s refused batch %d: %s (dropped: resending cannot help)",
                self.server,
                message.seq,
                message.reason,
            )
        elif isinstance(message, Heartbeat):
            pass
        elif isinstance(message, Goodbye):
            if message.code == GoodbyeCode.SHUTDOWN:
                raise SessionEnded(
                    f"the server said goodbye (shutdown): {message.reason}", level=logging.INFO
                )
            raise SessionEnded(f"the server said goodbye ({message.code}): {message.reason}")
        else:
            raise ProtocolError(
                f"unexpected {type(message).__struct_config__.tag!r} message in a streaming session"
            )

    def _settle_acked(self, seq: int) -> None:
        """Memory buffer: the envelopes of acknowledged batches are done."""
        unacked = self._unacked
        while unacked and unacked[0][0] <= seq:
            _, envelopes = unacked.popleft()
            for env in envelopes:
                env.done(True)


def _definitions(metrics: list[MetricDef], start: int, stop: int) -> dict[int, MetricDef]:
    return {i: metrics[i] for i in range(start, stop)}


def _connect_failure(exc: BaseException) -> str:
    """One line for a failed connection: the OS error, or the TLS reason (trio wraps ssl errors)."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, trio.BrokenResourceError) and cause is not None:
        exc = cause
    if isinstance(exc, OSError) and isinstance(exc.__cause__, ExceptionGroup):
        # trio.open_tcp_stream: "all attempts to connect ... failed", the reasons in a group.
        reasons = dict.fromkeys(
            e.strerror or str(e) for e in exc.__cause__.exceptions if isinstance(e, OSError)
        )
        if reasons:
            return "; ".join(reasons)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: the server's certificate is not trusted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return describe_exception(exc)


__all__ = ["ClientCounters", "ClientSettings", "RelayClient", "Rejected", "SessionEnded"]
