"""The server's memory of client streams: which batches it has written, which it has in its pipeline.

Sits between the relay-server's connections and its pipeline. Per `(client_name, stream_id)` the
server remembers `acked_seq` (every batch at or below it is done) and the batches above it that it
took into its pipeline and is waiting for (docs/relay-protocol.md, "Resending and duplicates"). That is
what lets a resent batch be recognised as a duplicate, even while its first copy is still in the
pipeline, and what makes acknowledgements cumulative while outputs finish batches in any order.

A batch that the pipeline could not write (an output dropped it) is marked failed: the acknowledgement
stops below it, and the server must make the client resend from `acked_seq` (it closes the session:
the protocol has no "resend this one" message). The resent copy of a failed batch is forwarded again;
resent copies of batches that were written or are still pending are not.

Pure code, no I/O and no clock of its own: the caller passes the time (`now`, in seconds).
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterator
from typing import Any


class Verdict(enum.Enum):
    """What to do with a received batch."""

    FORWARD = "forward"  # new (or a resent copy of a failed one): into the pipeline
    DUPLICATE_DONE = "duplicate_done"  # already acknowledged: drop it, and acknowledge again
    DUPLICATE_PENDING = "duplicate_pending"  # its first copy is in the pipeline or written: drop it


class _Status(enum.IntEnum):
    PENDING = 0
    WRITTEN = 1
    FAILED = 2


class StreamState:
    """One client stream. `connection` is whatever the server uses to reach the live session (it is
    only stored and handed back), None between sessions."""

    __slots__ = (
        "client_name",
        "stream_id",
        "acked_seq",
        "accepted_seq",
        "last_active",
        "connection",
        "_status",
        "_order",
        "duplicates",
        "failures",
    )

    def __init__(self, client_name: str, stream_id: str, now: float) -> None:
        self.client_name = client_name
        self.stream_id = stream_id
        self.acked_seq = 0
        #: The highest seq taken into the pipeline (written or not); what Accept.received_seq says.
        self.accepted_seq = 0
        self.last_active = now
        self.connection: Any = None
        self._status: dict[int, _Status] = {}
        self._order: list[int] = []  # the keys of _status, ascending
        self.duplicates = 0
        self.failures = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.client_name, self.stream_id)

    @property
    def pending(self) -> int:
        """Batches taken into the pipeline and not yet acknowledged."""
        return len(self._order)

    @property
    def needs_resend(self) -> bool:
        """A batch above acked_seq failed: the client must resend from acked_seq."""
        return any(status is _Status.FAILED for status in self._status.values())

    def receive(self, seq: int) -> Verdict:
        """Classifies a received batch; FORWARD records it as pending (the caller forwards it and
        reports the outcome with `done`, or `abandon`s it if it never entered the pipeline)."""
        if seq <= self.acked_seq:
            self.duplicates += 1
            return Verdict.DUPLICATE_DONE
        status = self._status.get(seq)
        if status is _Status.FAILED:
            self._status[seq] = _Status.PENDING
            return Verdict.FORWARD
        if status is not None:
            self.duplicates += 1
            return Verdict.DUPLICATE_PENDING
        self._status[seq] = _Status.PENDING
        if not self._order or seq > self._order[-1]:
            self._order.append(seq)
        else:
            bisect.insort(self._order, seq)
        self.accepted_seq = max(self.accepted_seq, seq)
        return Verdict.FORWARD

    def done(self, seq: int, ok: bool) -> bool:
        """The pipeline finished a forwarded batch (`ok`: written). Returns True if acked_seq moved."""
        if seq not in self._status:
            return False  # acknowledged meanwhile (a refused copy) or forgotten
        if ok:
            self._status[seq] = _Status.WRITTEN
        else:
            self._status[seq] = _Status.FAILED
            self.failures += 1
        return self._advance()

    def abandon(self, seq: int) -> None:
        """A batch marked FORWARD never entered the pipeline (its session was cancelled): forget it,
        so that its resent copy is forwarded."""
        if self._status.pop(seq, None) is not None:
            self._order.remove(seq)
        self.accepted_seq = max(self._order[-1] if self._order else 0, self.acked_seq)

    def _advance(self) -> bool:
        moved = False
        while self._order and self._status[self._order[0]] is _Status.WRITTEN:
            seq = self._order.pop(0)
            del self._status[seq]
            self.acked_seq = seq
            moved = True
        return moved


class StreamTable:
    """Every stream the server knows, bounded: idle streams are forgotten after `retention` seconds,
    and beyond `max_streams` the longest idle ones go first. A forgotten stream's resent batches are
    taken as new (duplicates are then possible, never loss)."""

    def __init__(self, *, retention: float, max_streams: int) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, got {max_streams}")
        self.retention = retention
        self.max_streams = max_streams
        self._streams: dict[tuple[str, str], StreamState] = {}
        self.forgotten = 0

    def __len__(self) -> int:
        return len(self._streams)

    def __iter__(self) -> Iterator[StreamState]:
        return iter(list(self._streams.values()))

    def get(self, client_name: str, stream_id: str) -> StreamState | None:
        return self._streams.get((client_name, stream_id))

    def attach(
        self, client_name: str, stream_id: str, connection: Any, now: float
    ) -> tuple[StreamState, Any]:
        """The stream of a new session (created if unknown), now owned by `connection`. Returns it and
        the connection it had before, if any (which the caller must close: one session per stream)."""
        self.prune(now)
        state = self._streams.get((client_name, stream_id))
        if state is None:
            state = StreamState(client_name, stream_id, now)
            self._streams[state.key] = state
            self._enforce_bound()
        previous = state.connection
        state.connection = connection
        state.last_active = now
        return state, previous

    def detach(self, state: StreamState, connection: Any, now: float) -> None:
        """A session ended; the stream is remembered (idle) unless another session took it over."""
        if state.connection is connection:
            state.connection = None
        state.last_active = now

    def live_streams_of(self, client_name: str) -> list[StreamState]:
        return [
            s for s in self._streams.values() if s.client_name == client_name and s.connection is not None
        ]

    def prune(self, now: float) -> None:
        """Forgets streams idle (no session) for longer than the retention."""
        expired = [
            key
            for key, state in self._streams.items()
            if state.connection is None and now - state.last_active > self.retention
        ]
        for key in expired:
            del self._streams[key]
        self.forgotten += len(expired)

    def _enforce_bound(self) -> None:
        excess = len(self._streams) - self.max_streams
        if excess <= 0:
            return
        idle = sorted(
            (s for s in self._streams.values() if s.connection is None), key=lambda s: s.last_active
        )
        for state in idle[:excess]:
            del self._streams[state.key]
            self.forgotten += 1


__all__ = ["StreamState", "StreamTable", "Verdict"]
