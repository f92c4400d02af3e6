"""The client's side of a session, without I/O: where to resume after `accept`, and the in-flight window.

The relay-client plugin keeps its batches in a log (agent.durable_log) whose record numbers are the
batch sequence numbers. After `accept` it asks `plan_resume` what to commit and whether its stream is
still usable; while streaming, `SendWindow` counts what is sent and not yet acknowledged.
docs/relay-protocol.md ("Resending and duplicates", "Batches, acknowledgements and flow control") is
the specification.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .messages import Accept


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


__all__ = ["ResumePlan", "SendWindow", "plan_resume"]
