"""The client's side of a session, without I/O: what to send next and what the server's messages mean.

The relay-client plugin keeps its batches in a log (agent.durable_log) whose record numbers are the
batch sequence numbers. Its trio code only moves bytes and sleeps; every protocol decision is here:

- `ClientSession`: one connection from hello to its end. It builds the hello, reads the answer
  (accept, reject or nonsense), then, while streaming, says what to send (metric definitions before
  the batches that use them, batches within the in-flight window, heartbeats when idle, the goodbye
  at shutdown) and what each message from the server means (acks, refusals, goodbyes).
- `plan_resume`: after `accept`, what to commit and whether the stream is still usable.
- `SendWindow`: what is sent and not yet acknowledged.
- `SessionEnded` and `retry_delay`: why a connection ended, and what that means for the next attempt
  (through `agent.Reconnector`, which keeps the outage bookkeeping).

docs/relay-protocol.md ("Resending and duplicates", "Batches, acknowledgements and flow control") is
the specification.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from agent import Reconnector
from agent.model import MetricDef

from .framing import HEADER_SIZE, FrameDecoder, FrameEncoder, TruncatedStreamError
from .messages import (
    PROTOCOL_VERSION,
    Accept,
    Ack,
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
)

#: Metric definitions per MetricDefs message, so that a huge table never makes an oversized frame.
DEFS_PER_MESSAGE = 5000
#: Frames are joined into one send up to this size (many small batches, one system call).
SEND_CHUNK_BYTES = 1 << 20
#: The server is taken for gone after this many heartbeat intervals without a byte from it.
SILENT_HEARTBEATS = 3


class SessionEnded(Exception):
    """Why a session ended. `accepted`: the server had accepted it (the backoff starts again; otherwise
    it counts as a failed attempt); `refused`: the server answered and said no (retried slowly, logged
    as an error); `level`: how loudly to log it."""

    def __init__(
        self, reason: str, *, accepted: bool = True, level: int = logging.WARNING, refused: bool = False
    ) -> None:
        super().__init__(reason)
        self.accepted = accepted
        self.level = level
        self.refused = refused


class Rejected(SessionEnded):
    """The server answered `reject`."""

    def __init__(self, reject: Reject, agent_version: str) -> None:
        self.reject = reject
        if reject.code == RejectCode.VERSION:
            text = (
                f"rejected our protocol version: the server speaks protocol {reject.protocol_version}"
                f" (agent {reject.server_version}), we speak protocol {PROTOCOL_VERSION} (agent {agent_version})"
                f": {reject.reason}"
            )
        else:
            text = f"rejected us ({reject.code}): {reject.reason}"
        super().__init__(text, accepted=False, level=logging.ERROR, refused=True)


@dataclass(frozen=True)
class ResumePlan:
    """What the client does after `accept`.

    `commit_through`: the log position to commit (the server wrote everything up to it).
    `new_stream`: the server has seen numbers this log never handed out (the log lost its tail, for
    instance in a power loss): keep what is left, move to a new stream id, reconnect.
    """

    commit_through: int
    new_stream: bool


def plan_resume(accept: Accept, log_last_seq: int) -> ResumePlan:
    """Decides how to continue a stream whose log has handed out numbers up to `log_last_seq`."""
    # Committing past the log's last record is impossible (and means the numbering went backwards).
    commit_through = min(accept.acked_seq, log_last_seq)
    return ResumePlan(commit_through, accept.received_seq > log_last_seq)


class SendWindow:
    """Sequence numbers sent in this session and not yet covered by an `ack`, oldest first."""

    __slots__ = ("limit", "_in_flight", "acked_seq", "last_sent")

    def __init__(self, limit: int, acked_seq: int = 0) -> None:
        if limit < 1:
            raise ValueError(f"the in-flight window must be at least 1, got {limit}")
        self.limit = limit
        self._in_flight: deque[int] = deque()
        self.acked_seq = acked_seq
        self.last_sent = acked_seq

    def __len__(self) -> int:
        return len(self._in_flight)

    @property
    def room(self) -> int:
        return max(0, self.limit - len(self._in_flight))

    def sent(self, seq: int) -> None:
        if seq <= self.last_sent:
            raise ValueError(f"batch {seq} sent after batch {self.last_sent}: sequence numbers must increase")
        self._in_flight.append(seq)
        self.last_sent = seq

    def acked(self, seq: int, log_last_seq: int) -> bool:
        """Applies a cumulative ack; returns True if it acknowledged something new.

        An ack may go beyond what this session sent: batches sent in an earlier session (before a
        cut) that the server wrote meanwhile. They need not be resent, so `last_sent` moves up to it.
        An ack beyond the last number the log ever handed out (`log_last_seq`) is a protocol error
        (ValueError).
        """
        if seq <= self.acked_seq:
            return False
        if seq > log_last_seq:
            raise ValueError(
                f"ack for batch {seq}, but the last batch this client numbered is {log_last_seq}"
            )
        self.acked_seq = seq
        self.last_sent = max(self.last_sent, seq)
        in_flight = self._in_flight
        while in_flight and in_flight[0] <= seq:
            in_flight.popleft()
        return True


@dataclass
class Outgoing:
    """What `ClientSession.send_records` decided: `chunks` to send in order, `batches` sent among them,
    and `too_large`: (seq, body bytes) of stored batches above the server's frame limit, skipped (they
    can never be delivered to this server)."""

    chunks: list[bytes | bytearray] = field(default_factory=list)
    batches: int = 0
    too_large: list[tuple[int, int]] = field(default_factory=list)


class ClientSession:
    """One connection of the relay client, from hello to its end, without I/O.

    The caller sends `hello_frame()`, feeds what the server sends to `answer` until it returns the
    server's `accept` (it raises `SessionEnded` for a reject, a close or nonsense), resumes its log as
    `plan_resume` says, and calls `start`. Then two loops share the session: one sends what
    `send_records` and `idle` return (records read from the log after `next_records()`), the other feeds
    received bytes to `receive`, which returns the acks and refusals to act on and raises
    `SessionEnded` when the server ends the session. `ending` says what an error that ended streaming
    means and what last words to send.
    """

    def __init__(self, hello: Hello, *, max_frame_size: int, max_in_flight: int, agent_version: str) -> None:
        self.hello = hello
        self.agent_version = agent_version
        self.max_in_flight = max_in_flight
        self.decoder: FrameDecoder[Message] = FrameDecoder(ServerMessage, max_frame_size)
        # Until `accept` the server's frame limit is unknown; the hello is small.
        self.encoder = FrameEncoder()
        self.accept: Accept | None = None
        self.window = SendWindow(max_in_flight)
        self.heartbeat = float("inf")
        #: When the last bytes went out (`sent`): a heartbeat is due one interval later.
        self.last_send = 0.0
        #: How many of the store's metric definitions this session has sent (ids are list positions).
        self.defs_sent = 0
        self.said_goodbye = False

    # -- the handshake --

    def hello_frame(self) -> bytearray:
        return self.encoder.encode(self.hello)

    def answer(self, data: bytes) -> Accept | None:
        """Takes bytes received after the hello (b"": the server closed the connection). Returns the
        server's `accept` once it is complete, None while more bytes are needed. Bytes after it stay in
        the decoder for `receive`."""
        try:
            if not data:
                self.decoder.eof()
                raise SessionEnded(
                    "the server closed the connection without answering our hello", accepted=False
                )
            first = next(iter(self.decoder.feed(data)), None)
        except ProtocolError as exc:
            raise SessionEnded(f"invalid answer to our hello: {exc}", accepted=False) from None
        if first is None:
            return None
        if isinstance(first, Reject):
            raise Rejected(first, self.agent_version)
        if not isinstance(first, Accept):
            raise SessionEnded(
                f"the server answered our hello with {type(first).__struct_config__.tag!r}, not 'accept'",
                accepted=False,
            )
        self.accept = first
        return first

    def start(self, acked_seq: int, now: float) -> None:
        """Streaming begins after `acked_seq` (what the server acknowledged, in this accept or in an ack
        of an earlier session), under the limits of the server's accept."""
        accept = self.accept
        if accept is None:
            raise RuntimeError("start() before the server's accept")
        self.window = SendWindow(min(self.max_in_flight, accept.max_in_flight), acked_seq)
        self.encoder = FrameEncoder(accept.max_frame_size)
        self.heartbeat = accept.heartbeat_interval_ms / 1000
        self.last_send = now

    @property
    def silence_limit(self) -> float:
        """Seconds without a byte from the server after which it is taken for gone."""
        return SILENT_HEARTBEATS * self.heartbeat

    # -- what to send --

    def next_records(self, log_committed_seq: int) -> tuple[int, int]:
        """(after, count): the caller reads up to `count` stored records numbered above `after`; count
        0 when the window is full. Records the log committed meanwhile (acked, or dropped by a full
        memory buffer) are not asked for."""
        return max(self.window.last_sent, log_committed_seq), self.window.room

    def ready(self, log_last_seq: int, log_committed_seq: int, *, finished: bool) -> bool:
        """Whether the sending loop has something to do besides a heartbeat: records to send within the
        window, or the goodbye (`finished`: the client stops and the server acknowledged everything)."""
        after, room = self.next_records(log_committed_seq)
        return (room > 0 and log_last_seq > after) or (finished and not len(self.window))

    def send_records(
        self, records: Iterable[tuple[int, bytes | bytearray]], metrics: Sequence[MetricDef]
    ) -> Outgoing:
        """The bytes that send `records` ((seq, stored frame), read as `next_records` said): first the
        metric definitions this session has not sent yet, then the frames, small ones joined (one send
        for many small batches), large ones alone (no copy)."""
        out = Outgoing()
        window = self.window
        max_body = self.encoder.max_frame_size
        while self.defs_sent < len(metrics):
            upto = min(len(metrics), self.defs_sent + DEFS_PER_MESSAGE)
            definitions = {i: metrics[i] for i in range(self.defs_sent, upto)}
            out.chunks.append(self.encoder.encode(MetricDefs(definitions)))
            self.defs_sent = upto
        pending: list[bytes | bytearray] = []
        pending_bytes = 0
        for seq, frame in records:
            if seq <= window.last_sent:
                continue  # an ack covered it meanwhile (the server had it from an earlier session)
            window.sent(seq)
            body = len(frame) - HEADER_SIZE
            if body > max_body:
                # The server's limit is below ours: this batch can never be delivered to it.
                out.too_large.append((seq, body))
                continue
            out.batches += 1
            pending.append(frame)
            pending_bytes += len(frame)
            if pending_bytes >= SEND_CHUNK_BYTES:
                out.chunks.append(_joined(pending))
                pending = []
                pending_bytes = 0
        if pending:
            out.chunks.append(_joined(pending))
        return out

    def idle(self, now: float, *, finished: bool) -> bytearray | float:
        """Nothing to send: the goodbye if `finished` (the client stops, the server acknowledged
        everything) and nothing is in flight, a heartbeat if one is due, else the time it will be due."""
        if finished and not len(self.window):
            self.said_goodbye = True
            return self.encoder.encode(Goodbye(GoodbyeCode.SHUTDOWN, "the client is stopping"))
        if now - self.last_send >= self.heartbeat:
            return self.encoder.encode(Heartbeat())
        return self.last_send + self.heartbeat

    def sent(self, now: float) -> None:
        """Bytes went out at `now` (the heartbeat schedule counts from there)."""
        self.last_send = now

    # -- what the server says --

    def buffered(self, log_last_seq: int) -> list[Ack | Refused]:
        """The messages that came with the accept, in the same packets (see `receive`)."""
        return self._messages(self.decoder.feed(b""), log_last_seq)

    def receive(self, data: bytes, log_last_seq: int) -> list[Ack | Refused]:
        """Takes bytes from the server (b"": it closed the connection). Returns what the caller acts on:
        the acks that acknowledge something new (cumulative: the log may commit through `seq`) and the
        refusals (a batch the server will never take). Raises SessionEnded when the server ends the
        session, ProtocolError when it breaks the protocol."""
        if not data:
            self.decoder.eof()
            raise SessionEnded("the server closed the connection")
        return self._messages(self.decoder.feed(data), log_last_seq)

    def silent(self) -> SessionEnded:
        """The server said nothing for `silence_limit` seconds."""
        return SessionEnded(
            f"nothing received from the server for {self.silence_limit:g}s ({SILENT_HEARTBEATS} heartbeat intervals)"
        )

    def _messages(self, messages: Iterable[Message], log_last_seq: int) -> list[Ack | Refused]:
        actions: list[Ack | Refused] = []
        for message in messages:
            if isinstance(message, Ack):
                try:
                    if self.window.acked(message.seq, log_last_seq):
                        actions.append(message)
                except ValueError as exc:
                    raise ProtocolError(str(exc)) from None
            elif isinstance(message, Refused):
                actions.append(message)
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
        return actions

    # -- the end --

    def ending(self, error: Exception) -> tuple[SessionEnded, bytearray | None]:
        """What an error that ended streaming means, and the last words to send once nothing else is
        being sent: after a protocol error of the server, a goodbye that says what was wrong."""
        if isinstance(error, SessionEnded):
            return error, None
        if isinstance(error, TruncatedStreamError):
            return SessionEnded(str(error)), None
        if isinstance(error, ProtocolError):
            goodbye = self.encoder.encode(Goodbye(GoodbyeCode.PROTOCOL_ERROR, str(error)))
            return SessionEnded(f"protocol error: {error}"), goodbye
        raise error


def retry_delay(reconnector: Reconnector, ended: SessionEnded, *, max_times: int, slow_delay: float) -> float:
    """What a connection's end means for the next attempt; returns the delay before it.

    An accepted session that ended reconnects after the first backoff delay. A failed attempt follows
    the backoff for `max_times` attempts, then retries every `slow_delay` (the configured maximum,
    jittered) for as long as the outage lasts; a refusal is retried every `slow_delay` at once (the
    server will not change its mind soon: it needs an upgrade or a new configuration). `reconnector`
    logs it.
    """
    if ended.accepted:
        return reconnector.ended(str(ended), ended.level)
    slow = ended.refused or reconnector.failures >= max_times
    return reconnector.failed(str(ended), delay=slow_delay if slow else None, refused=ended.refused)


def _joined(frames: list[bytes | bytearray]) -> bytes | bytearray:
    return frames[0] if len(frames) == 1 else b"".join(frames)


__all__ = [
    "ClientSession",
    "Outgoing",
    "Rejected",
    "ResumePlan",
    "SendWindow",
    "SessionEnded",
    "plan_resume",
    "retry_delay",
]
