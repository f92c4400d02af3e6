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

Every protocol decision of a session (what to send next, what a message from the server means, what
the end of a connection means) is made by `relay.protocol.session.ClientSession` and `retry_delay`,
without I/O; the outage bookkeeping is `agent.Reconnector`'s. This module moves bytes, reads and
commits the store, and sleeps.

At shutdown the intake takes what is left in the queue, then waits (within the agent's grace period)
until the server has acknowledged everything, says goodbye and closes. With the disk buffer it does not
wait for an unreachable server: the records stay on disk and go out after the next start.
"""

from __future__ import annotations

import itertools
import logging
import random
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from agent import Backoff, ChangeNotifier, Envelope, OutputInbox, Reconnector, describe_exception
from agent import __version__ as AGENT_VERSION
from agent.model import MetricRegistry
from agent.plugin import Output
from agent_plugins.relay.protocol import PROTOCOL_VERSION, Ack, FrameEncoder, Hello, ProtocolError, Refused
from agent_plugins.relay.protocol.address import parse_address
from agent_plugins.relay.protocol.session import (
    ClientSession,
    Rejected,
    SessionEnded,
    plan_resume,
    retry_delay,
)

from .records import encode_records
from .store import BatchStore, BufferSpec

log = logging.getLogger(__name__)

T = TypeVar("T")

RECEIVE_SIZE = 256 * 1024
#: Records recently appended are kept in memory too, so that the sender does not read back from disk
#: what it has just written. Bounded: a sender that falls behind reads from the log.
RECENT_CACHE_BYTES = 64 * 1024 * 1024
#: Records encoded ahead of the disk write (the intake encodes while the appender writes).
APPEND_QUEUE_RECORDS = 4
#: During a long outage (or while the server refuses us), a reminder at most this often.
OUTAGE_REMINDER_INTERVAL = 600.0
LAST_WORDS_TIMEOUT = 2.0
#: How often the disk buffer is synced while idle (its own fsync policy decides during appends).
SYNC_INTERVAL = 1.0
#: What ends a connection from below: the OS, the TLS layer, trio's stream wrappers.
CONNECTION_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError)


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
        # The highest seq the sender may read: the log numbers a record (in the appender's thread)
        # before the appender has put it in the recent cache; the sender waits for the appender.
        self._readable_seq = 0
        #: Records appended, acks, commits, connection state, stopping: waiters re-check their condition.
        self._changes = ChangeNotifier()
        self._stopping = False

    @property
    def server(self) -> str:
        return self.settings.relay_server

    # -- plumbing --

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
        self._readable_seq = store.log.last_seq
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
                self._readable_seq = max(self._readable_seq, last_seq)
                self._changes.notify()

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
        if start > self._readable_seq:
            return []
        max_records = min(max_records, self._readable_seq - start + 1)
        recent = self._recent
        if recent and recent[0][0] <= start <= recent[-1][0]:
            index = start - recent[0][0]
            return list(itertools.islice(recent, index, index + max_records))
        return await self._io(store.log.read, start - 1, max_records)

    async def _drain_before_exit(self, connection_done: trio.Event) -> None:
        """Shutdown: wait until the server has acknowledged everything (or, with the disk buffer, until
        it is unreachable), then let the sender say goodbye."""
        store = self.store
        assert store is not None
        self._stopping = True
        self._changes.notify()
        await self._changes.wait_for(
            lambda: (
                self._acked_seq >= store.log.last_seq
                or store.log.committed_seq >= store.log.last_seq
                or (store.durable and not self.connected)
            )
        )
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
                self._changes.notify()
                continue
            if trio.current_time() - last_sync >= SYNC_INTERVAL:
                await trio.to_thread.run_sync(store.log.sync)
                last_sync = trio.current_time()
            with trio.move_on_after(SYNC_INTERVAL):
                await self._changes.wait_for(
                    lambda: min(self._acked_seq, store.log.last_seq) > store.log.committed_seq
                )

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

    def _slow_delay(self) -> float:
        # Jittered like every other delay, so that a fleet does not reconnect in lockstep.
        return self._rng.uniform(self.settings.max_delay / 2, self.settings.max_delay)

    async def _connection_loop(self) -> None:
        settings = self.settings
        reconnector = Reconnector(
            "relay-client",
            log,
            Backoff(settings.initial_delay, settings.max_delay, jitter=True, rng=self._rng),
            warn_attempts=settings.max_times,
            reminder_interval=OUTAGE_REMINDER_INTERVAL,
            summary=self._buffer_summary,
            peer=self.server,
        )
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
            except CONNECTION_ERRORS as exc:
                ended = SessionEnded(_connect_failure(exc), accepted=False)
            else:
                try:
                    await self._session(stream, reconnector)
                    return  # we said goodbye at shutdown
                except SessionEnded as exc:
                    ended = exc
                finally:
                    self.connected = False
                    self._changes.notify()
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
            if not ended.accepted:
                self.counters.failed_attempts += 1
            delay = retry_delay(
                reconnector, ended, max_times=settings.max_times, slow_delay=self._slow_delay()
            )
            if self.on_retry_delay is not None:
                self.on_retry_delay(delay)
            await trio.sleep(delay)

    def _buffer_summary(self) -> str:
        store = self.store
        if store is None:
            return "nothing buffered"
        where = "on disk" if store.durable else "in memory (the oldest are dropped when it is full)"
        return f"{store.log.pending_records} batches ({store.log.pending_bytes} bytes) buffered {where}"

    async def _session(self, stream: trio.abc.Stream, reconnector: Reconnector) -> None:
        """One connection from hello to its end. Returns only after our goodbye at shutdown; raises
        SessionEnded otherwise. The decisions are `ClientSession`'s; this moves the bytes."""
        store = self.store
        assert store is not None
        settings = self.settings
        session = ClientSession(
            Hello(
                PROTOCOL_VERSION, settings.client_name, store.stream_id, AGENT_VERSION, settings.token or None
            ),
            max_frame_size=settings.max_frame_size,
            max_in_flight=settings.max_in_flight,
            agent_version=AGENT_VERSION,
        )
        try:
            await stream.send_all(session.hello_frame())
            with trio.fail_after(settings.handshake_timeout):
                accept = None
                while accept is None:
                    accept = session.answer(await stream.receive_some(RECEIVE_SIZE))
        except trio.TooSlowError:
            raise SessionEnded(
                f"no answer to our hello within the handshake timeout of {settings.handshake_timeout:g}s",
                accepted=False,
            ) from None
        except CONNECTION_ERRORS as exc:
            raise SessionEnded(
                f"connection failed during the handshake: {_connect_failure(exc)}", accepted=False
            ) from None
        reconnector.connected()
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
        session.start(max(self._acked_seq, store.log.committed_seq), trio.current_time())
        log.info(
            "relay-client: connected to %s as %r (stream %s, server agent %s); %d batches to send",
            self.server,
            settings.client_name or "(certificate name)",
            store.stream_id,
            accept.server_version,
            store.log.pending_records,
        )
        self._changes.notify()
        errors: list[Exception] = []
        async with trio.open_nursery() as nursery:

            async def half(fn: Callable[[trio.abc.Stream, ClientSession], Awaitable[None]]) -> None:
                # The first half to end ends the session; its reason is the session's.
                try:
                    await fn(stream, session)
                except (SessionEnded, ProtocolError, *CONNECTION_ERRORS) as exc:
                    errors.append(exc)
                nursery.cancel_scope.cancel()

            nursery.start_soon(half, self._sender)
            nursery.start_soon(half, self._receiver)
        if session.said_goodbye and not errors:
            return
        if not errors:
            raise SessionEnded("the session ended")
        if isinstance(errors[0], CONNECTION_ERRORS):
            raise SessionEnded(f"connection lost: {_connect_failure(errors[0])}")
        ended, last_words = session.ending(errors[0])
        if last_words is not None:
            # Only now that the sender has stopped may another frame go out.
            with trio.move_on_after(LAST_WORDS_TIMEOUT):
                try:
                    await stream.send_all(last_words)
                except CONNECTION_ERRORS:
                    pass
        raise ended

    async def _sender(self, stream: trio.abc.Stream, session: ClientSession) -> None:
        store = self.store
        assert store is not None

        def finished() -> bool:
            return self._stopping and self._acked_seq >= store.log.last_seq

        def ready() -> bool:
            return session.ready(self._readable_seq, store.log.committed_seq, finished=finished())

        while True:
            after, room = session.next_records(store.log.committed_seq)
            records = await self._read_after(after, room) if room else []
            if records:
                out = session.send_records(records, store.metrics)
                for seq, size in out.too_large:
                    self.counters.points_dropped += 1
                    log.error(
                        "relay-client: batch %d (%d bytes) exceeds the maximum frame size of %s (%d bytes) and is"
                        " skipped; set max_frame_size to at most the server's",
                        seq,
                        size,
                        self.server,
                        session.encoder.max_frame_size,
                    )
                self.counters.batches_sent += out.batches
                for chunk in out.chunks:
                    await stream.send_all(chunk)
                session.sent(trio.current_time())
                continue
            action = session.idle(trio.current_time(), finished=finished())
            if isinstance(action, float):
                with trio.move_on_at(action):
                    await self._changes.wait_for(ready)
                continue
            await stream.send_all(action)
            session.sent(trio.current_time())
            if session.said_goodbye:
                return

    async def _receiver(self, stream: trio.abc.Stream, session: ClientSession) -> None:
        store = self.store
        assert store is not None
        self._on_server_actions(session.buffered(store.log.last_seq))
        while True:
            with trio.move_on_after(session.silence_limit) as timer:
                data = await stream.receive_some(RECEIVE_SIZE)
            if timer.cancelled_caught:
                raise session.silent()
            self._on_server_actions(session.receive(data, store.log.last_seq))

    def _on_server_actions(self, actions: list[Ack | Refused]) -> None:
        store = self.store
        assert store is not None
        for action in actions:
            if isinstance(action, Ack):
                self.counters.acked_seq = action.seq
                self._acked_seq = max(self._acked_seq, action.seq)
                if not store.durable:
                    self._settle_acked(action.seq)
                    store.log.commit(min(action.seq, store.log.last_seq))
                self._changes.notify()
            else:
                self.counters.batches_refused += 1
                log.error(
                    "relay-client: %s refused batch %d: %s (dropped: resending cannot help)",
                    self.server,
                    action.seq,
                    action.reason,
                )

    def _settle_acked(self, seq: int) -> None:
        """Memory buffer: the envelopes of acknowledged batches are done."""
        unacked = self._unacked
        while unacked and unacked[0][0] <= seq:
            _, envelopes = unacked.popleft()
            for env in envelopes:
                env.done(True)


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
