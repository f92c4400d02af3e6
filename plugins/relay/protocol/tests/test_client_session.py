"""The relay client's session without sockets: handshake answers, what goes out, what the server's
messages mean, how a connection's end decides the next attempt. Bytes in, bytes and decisions out."""

from __future__ import annotations

import logging
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import Backoff, Reconnector
from agent.model import LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, MetricDef
from agent_plugins.relay.protocol import (
    Accept,
    Ack,
    BatchMessage,
    ClientMessage,
    FrameDecoder,
    FrameEncoder,
    Goodbye,
    Heartbeat,
    Hello,
    MetricDefs,
    ProtocolError,
    Refused,
    Reject,
    WireSeries,
)
from agent_plugins.relay.protocol.session import (
    DEFS_PER_MESSAGE,
    ClientSession,
    Rejected,
    SessionEnded,
    retry_delay,
)

SERVER = FrameEncoder()
CPU = MetricDef("cpu_percent", "%", "float", "CPU use")


def new_session(max_in_flight: int = 4) -> ClientSession:
    hello = Hello(1, "node-1", "stream-1", "0.1.0", None)
    return ClientSession(hello, max_frame_size=1 << 20, max_in_flight=max_in_flight, agent_version="0.1.0")


def accept(acked: int = 0, *, max_frame_size: int = 1 << 20, max_in_flight: int = 64) -> Accept:
    return Accept(1, "0.1.0", "s", acked, acked, max_frame_size, max_in_flight, 5000)


def streaming(acked: int = 0, *, max_in_flight: int = 4, **accept_options) -> ClientSession:
    session = new_session(max_in_flight)
    assert session.answer(bytes(SERVER.encode(accept(acked, **accept_options)))) is not None
    session.start(acked, now=100.0)
    return session


def record(seq: int, values: int = 1) -> tuple[int, bytearray]:
    """A stored record: the frame of batch `seq`, as the client's intake encodes it."""
    series = WireSeries(0, LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, {}, list(range(values)), [1.0] * values)
    return seq, FrameEncoder().encode(BatchMessage(seq, [series]))


def sent_messages(chunks) -> list:
    decoder = FrameDecoder(ClientMessage)
    return [message for chunk in chunks for message in decoder.feed(bytes(chunk))]


# -- the handshake --


def test_the_hello_goes_first_and_the_accept_may_come_in_pieces() -> None:
    session = new_session()
    [hello] = FrameDecoder(ClientMessage).feed(bytes(session.hello_frame()))
    assert hello == Hello(1, "node-1", "stream-1", "0.1.0", None)
    answer = bytes(SERVER.encode(accept(3))) + bytes(SERVER.encode(Ack(5)))
    for i in range(len(answer) - len(SERVER.encode(Ack(5))) - 1):
        assert session.answer(answer[i : i + 1]) is None
    rest = answer[len(answer) - len(SERVER.encode(Ack(5))) - 1 :]
    assert session.answer(rest) == accept(3)
    session.start(3, now=0.0)
    # The ack that came in the same packet is not lost.
    assert session.buffered(log_last_seq=9) == [Ack(5)]


def test_a_version_reject_names_both_versions_and_is_a_refusal() -> None:
    with pytest.raises(Rejected) as caught:
        new_session().answer(bytes(SERVER.encode(Reject("version", "we only speak 7", 7, "9.0.0"))))
    assert str(caught.value).startswith(
        "rejected our protocol version: the server speaks protocol 7 (agent 9.0.0), we speak protocol 1"
    )
    assert caught.value.refused and not caught.value.accepted and caught.value.level == logging.ERROR


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "the server closed the connection without answering our hello"),
        (bytes(SERVER.encode(Ack(1))), "the server answered our hello with 'ack', not 'accept'"),
        (b"\x00\x00\x00\x02\xc1\xc1", "invalid answer to our hello"),
    ],
)
def test_anything_but_an_accept_is_a_failed_attempt(data: bytes, reason: str) -> None:
    with pytest.raises(SessionEnded, match=reason) as caught:
        new_session().answer(data)
    assert not caught.value.accepted and not caught.value.refused


def test_a_close_in_the_middle_of_the_answer_is_an_invalid_answer() -> None:
    session = new_session()
    assert session.answer(bytes(SERVER.encode(accept()))[:5]) is None
    with pytest.raises(SessionEnded, match="invalid answer to our hello"):
        session.answer(b"")


# -- what goes out --


def test_definitions_go_before_the_batches_and_frames_are_joined() -> None:
    session = streaming(acked=2)
    assert session.next_records(log_committed_seq=2) == (2, 4)
    out = session.send_records([record(3), record(4)], [CPU])
    messages = sent_messages(out.chunks)
    assert [type(m) for m in messages] == [MetricDefs, BatchMessage, BatchMessage]
    assert messages[0].definitions == {0: CPU}
    assert len(out.chunks) == 2 and out.batches == 2  # the definitions, then both frames in one send
    # Definitions go once per session; the window now starts after batch 4.
    out = session.send_records([record(5)], [CPU])
    assert [type(m) for m in sent_messages(out.chunks)] == [BatchMessage]
    assert session.next_records(log_committed_seq=2) == (5, 1)


def test_a_huge_metric_table_is_sent_in_several_messages() -> None:
    metrics = [MetricDef(f"m{i}", "1", "int", "") for i in range(DEFS_PER_MESSAGE + 1)]
    out = streaming().send_records([], metrics)
    assert [len(m.definitions) for m in sent_messages(out.chunks)] == [DEFS_PER_MESSAGE, 1]


def test_a_batch_above_the_servers_frame_limit_is_skipped_and_reported() -> None:
    session = streaming(max_frame_size=1024)
    out = session.send_records([record(1), record(2, values=500), record(3)], [])
    assert [m.seq for m in sent_messages(out.chunks)] == [1, 3]
    [(seq, size)] = out.too_large
    assert seq == 2 and size > 1024


def test_records_an_ack_already_covered_are_not_sent() -> None:
    session = streaming()
    session.send_records([record(1)], [])
    # The server wrote 2 and 3 before a cut: its ack covers them.
    assert session.receive(bytes(SERVER.encode(Ack(3))), log_last_seq=5) == [Ack(3)]
    out = session.send_records([record(3), record(4)], [])
    assert [m.seq for m in sent_messages(out.chunks)] == [4]


def test_heartbeats_when_idle_and_goodbye_once_everything_is_acknowledged() -> None:
    session = streaming()  # heartbeat interval 5 s, started at 100
    assert session.idle(102.0, finished=False) == 105.0
    assert sent_messages([session.idle(105.0, finished=False)]) == [Heartbeat()]
    session.sent(105.0)
    assert session.idle(106.0, finished=False) == 110.0
    session.send_records([record(1)], [])
    # Stopping: no goodbye while batch 1 is in flight.
    assert session.idle(107.0, finished=True) == 110.0 and not session.said_goodbye
    session.receive(bytes(SERVER.encode(Ack(1))), log_last_seq=1)
    [goodbye] = sent_messages([session.idle(107.0, finished=True)])
    assert isinstance(goodbye, Goodbye) and goodbye.code == "shutdown" and session.said_goodbye


def test_ready_says_when_the_sender_has_work() -> None:
    session = streaming(max_in_flight=1)
    assert not session.ready(log_last_seq=0, log_committed_seq=0, finished=False)
    assert session.ready(log_last_seq=1, log_committed_seq=0, finished=False)
    session.send_records([record(1)], [])
    assert not session.ready(log_last_seq=2, log_committed_seq=0, finished=False)  # the window is full
    session.receive(bytes(SERVER.encode(Ack(1))), log_last_seq=2)
    assert session.ready(log_last_seq=2, log_committed_seq=1, finished=False)
    # A full memory buffer dropped batch 2 (committed without an ack): nothing left to ask for.
    assert not session.ready(log_last_seq=2, log_committed_seq=2, finished=False)
    assert session.ready(log_last_seq=2, log_committed_seq=2, finished=True)


# -- what the server says --


def test_acks_refusals_and_heartbeats() -> None:
    session = streaming()
    session.send_records([record(1), record(2), record(3)], [])
    data = b"".join(bytes(SERVER.encode(m)) for m in (Ack(1), Heartbeat(), Refused(2, "bad"), Ack(1), Ack(3)))
    assert session.receive(data, log_last_seq=3) == [Ack(1), Refused(2, "bad"), Ack(3)]
    assert len(session.window) == 0


@pytest.mark.parametrize(
    ("message", "level", "reason"),
    [
        (Goodbye("shutdown", "bye"), logging.INFO, "the server said goodbye (shutdown): bye"),
        (
            Goodbye("resend", "output failed"),
            logging.WARNING,
            "the server said goodbye (resend): output failed",
        ),
    ],
)
def test_a_goodbye_ends_an_accepted_session(message, level, reason) -> None:
    with pytest.raises(SessionEnded, match=reason.replace("(", r"\(").replace(")", r"\)")) as caught:
        streaming().receive(bytes(SERVER.encode(message)), log_last_seq=0)
    assert caught.value.accepted and caught.value.level == level


def test_protocol_errors_end_the_session_with_our_goodbye() -> None:
    session = streaming()
    with pytest.raises(ProtocolError, match="last batch this client numbered is 2") as caught:
        session.receive(bytes(SERVER.encode(Ack(7))), log_last_seq=2)
    ended, last_words = session.ending(caught.value)
    assert str(ended).startswith("protocol error: ack for batch 7") and ended.accepted
    [goodbye] = sent_messages([last_words])
    assert goodbye.code == "protocol_error"
    with pytest.raises(ProtocolError, match="unexpected 'accept' message"):
        streaming().receive(bytes(SERVER.encode(accept())), log_last_seq=0)


def test_a_close_or_a_silence_ends_the_session() -> None:
    session = streaming()
    with pytest.raises(SessionEnded, match="the server closed the connection"):
        session.receive(b"", log_last_seq=0)
    assert str(session.silent()) == "nothing received from the server for 15s (3 heartbeat intervals)"
    session = streaming()
    session.receive(bytes(SERVER.encode(Ack(0)))[:3], log_last_seq=0)
    with pytest.raises(ProtocolError) as caught:
        session.receive(b"", log_last_seq=0)
    ended, last_words = session.ending(caught.value)
    assert str(ended) == "connection closed in the middle of a frame (3 bytes pending)" and last_words is None


# -- properties --


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 8),
    st.lists(st.tuples(st.integers(1, 5), st.integers(0, 6)), min_size=1, max_size=30),
    st.randoms(use_true_random=False),
)
def test_every_record_goes_out_once_in_order_within_the_window(limit, steps, rng: random.Random) -> None:
    """Records appended and acks received in any interleaving: the session sends each record once, in
    increasing order, never more than `limit` unacknowledged, and stops asking once all are acked."""
    session = streaming(max_in_flight=limit)
    decoder = FrameDecoder(ClientMessage)
    log_last = 0
    committed = 0
    sent: list[int] = []
    for appended, ack_back in steps:
        log_last += appended
        after, room = session.next_records(committed)
        records = [record(seq) for seq in range(after + 1, min(log_last, after + room) + 1)]
        for chunk in session.send_records(records, [CPU]).chunks:
            sent += [m.seq for m in decoder.feed(bytes(chunk)) if isinstance(m, BatchMessage)]
        assert len(session.window) <= limit
        # The server acknowledges some of what it got, in a packet cut anywhere.
        if sent and ack_back:
            acked = sent[max(0, len(sent) - ack_back)] if ack_back <= len(sent) else sent[-1]
            data = bytes(SERVER.encode(Ack(acked)))
            cut = rng.randrange(1, len(data))
            actions = session.receive(data[:cut], log_last) + session.receive(data[cut:], log_last)
            if actions:
                committed = max(committed, actions[-1].seq)
    assert sent == sorted(set(sent)) == list(range(1, len(sent) + 1))
    # Once the server has acknowledged everything, nothing is left to send.
    if log_last:
        session.receive(bytes(SERVER.encode(Ack(log_last))), log_last)
    assert not session.ready(log_last, log_last, finished=False)


@given(st.lists(st.integers(1, 40), max_size=20))
def test_the_server_bytes_mean_the_same_however_they_are_cut(cuts: list[int]) -> None:
    messages = [Ack(1), Heartbeat(), Refused(2, "no"), Ack(3), Ack(2), Ack(5)]
    data = b"".join(bytes(SERVER.encode(m)) for m in messages)
    whole = streaming().receive(data, log_last_seq=5)
    session = streaming()
    pieces, position = [], 0
    for size in cuts:
        pieces.append(data[position : position + size])
        position += size
    pieces.append(data[position:])
    actions = [a for piece in pieces if piece for a in session.receive(piece, log_last_seq=5)]
    assert actions == whole == [Ack(1), Refused(2, "no"), Ack(3), Ack(5)]


# -- what the end of a connection means --


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def reconnector(clock: Clock, max_times: int = 3) -> Reconnector:
    backoff = Backoff(0.1, 10.0, jitter=False)
    return Reconnector(
        "relay-client",
        logging.getLogger("test.relay.reconnect"),
        backoff,
        warn_attempts=max_times,
        reminder_interval=600.0,
        summary=lambda: "2 batches buffered in memory",
        clock=clock,
        peer="collector:50051",
    )


def test_failed_attempts_back_off_then_retry_slowly_and_an_outage_is_logged(caplog) -> None:
    clock = Clock()
    retry = reconnector(clock)
    refused = SessionEnded("Connection refused", accepted=False)
    delays = []
    with caplog.at_level(logging.DEBUG, "test.relay.reconnect"):
        for _ in range(5):
            delays.append(retry_delay(retry, refused, max_times=3, slow_delay=9.0))
            clock.now += delays[-1]
        # Connected again: the next end of a session reconnects after the first delay.
        retry.connected()
        ended = SessionEnded("the server closed the connection")
        assert retry_delay(retry, ended, max_times=3, slow_delay=9.0) == 0.1
    assert delays == [0.1, 0.2, 0.4, 9.0, 9.0]
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [text for level, text in lines if level == logging.WARNING and "attempt" in text] == [
        "relay-client: cannot reach collector:50051: Connection refused; retrying in 0.1s (attempt 1)",
        "relay-client: cannot reach collector:50051: Connection refused; retrying in 0.2s (attempt 2)",
    ]
    [outage] = [text for level, text in lines if level == logging.ERROR]
    assert outage == (
        "relay-client: outage: collector:50051 unreachable for 0.3s (3 attempts; last: Connection refused);"
        " 2 batches buffered in memory; retrying every 10s"
    )
    assert "relay-client: connected again to collector:50051 after 18.7s (5 failed attempts)" in caplog.text


def test_a_refusal_is_retried_slowly_and_logged_once_as_an_error(caplog) -> None:
    clock = Clock()
    retry = reconnector(clock)
    rejected = Rejected(Reject("auth", "authentication failed", 1, "0.1.0"), "0.1.0")
    with caplog.at_level(logging.DEBUG, "test.relay.reconnect"):
        delays = [retry_delay(retry, rejected, max_times=3, slow_delay=7.5) for _ in range(10)]
    assert delays == [7.5] * 10
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert line == (
        "relay-client: collector:50051 rejected us (auth): authentication failed; retrying every 10s"
    )
