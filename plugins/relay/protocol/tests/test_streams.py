"""The server's stream table: duplicates, cumulative acks over out-of-order completions, failures,
forgetting. Pure code: no sockets, no clock."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_plugins.relay.protocol.streams import StreamState, StreamTable, Verdict


def test_new_batches_are_forwarded_and_resent_ones_are_not() -> None:
    state = StreamState("node-1", "s1", now=0.0)
    assert [state.receive(seq) for seq in (1, 2, 3)] == [Verdict.FORWARD] * 3
    assert state.accepted_seq == 3 and state.acked_seq == 0
    # Resent while its first copy is still in the pipeline: not forwarded again.
    assert state.receive(2) is Verdict.DUPLICATE_PENDING
    assert state.done(1, True) and state.acked_seq == 1
    assert state.receive(1) is Verdict.DUPLICATE_DONE
    assert state.duplicates == 2


def test_acks_are_cumulative_over_completions_in_any_order() -> None:
    state = StreamState("node-1", "s1", now=0.0)
    for seq in (1, 2, 3, 4):
        state.receive(seq)
    assert not state.done(3, True) and state.acked_seq == 0
    assert not state.done(2, True)
    assert state.done(1, True) and state.acked_seq == 3
    assert state.done(4, True) and state.acked_seq == 4
    assert state.pending == 0


def test_gaps_in_the_numbering_are_covered() -> None:
    state = StreamState("node-1", "s1", now=0.0)
    state.receive(5)
    state.receive(9)  # 6..8 were dropped by the client's full buffer: never sent
    state.done(5, True)
    state.done(9, True)
    assert state.acked_seq == 9


def test_a_failed_batch_holds_the_ack_and_its_resent_copy_is_forwarded_again() -> None:
    state = StreamState("node-1", "s1", now=0.0)
    for seq in (1, 2, 3):
        state.receive(seq)
    state.done(1, True)
    state.done(2, False)  # an output dropped it
    state.done(3, True)
    assert state.acked_seq == 1 and state.needs_resend and state.failures == 1
    # The client resends from 2: batch 2 goes to the pipeline again, batch 3 (written) does not.
    assert state.receive(2) is Verdict.FORWARD
    assert state.receive(3) is Verdict.DUPLICATE_PENDING
    assert state.done(2, True) and state.acked_seq == 3
    assert not state.needs_resend


def test_an_abandoned_batch_is_forgotten_so_its_copy_is_forwarded() -> None:
    state = StreamState("node-1", "s1", now=0.0)
    state.receive(1)
    state.receive(2)
    state.abandon(2)  # its session was cancelled before the pipeline took it
    assert state.accepted_seq == 1
    assert state.receive(2) is Verdict.FORWARD


def test_table_attach_hands_back_the_previous_connection() -> None:
    table = StreamTable(retention=100.0, max_streams=10)
    state, previous = table.attach("node-1", "s1", "conn-a", now=0.0)
    assert previous is None
    again, previous = table.attach("node-1", "s1", "conn-b", now=1.0)
    assert again is state and previous == "conn-a" and state.connection == "conn-b"
    table.detach(state, "conn-a", now=2.0)  # the old connection ends late: the new one keeps it
    assert state.connection == "conn-b"
    assert table.live_streams_of("node-1") == [state]


def test_idle_streams_are_forgotten_after_the_retention_and_beyond_the_bound() -> None:
    table = StreamTable(retention=100.0, max_streams=2)
    a, _ = table.attach("a", "s", "ca", now=0.0)
    table.detach(a, "ca", now=0.0)
    b, _ = table.attach("b", "s", "cb", now=10.0)
    table.detach(b, "cb", now=10.0)
    table.attach("c", "s", "cc", now=20.0)  # over the bound: the longest idle (a) goes
    assert table.get("a", "s") is None and table.get("b", "s") is b and table.forgotten == 1
    table.prune(now=111.0)  # b idle for 101 s > retention; c is live and stays
    assert table.get("b", "s") is None and table.get("c", "s") is not None
    with pytest.raises(ValueError):
        StreamTable(retention=1.0, max_streams=0)


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    failure_rate=st.sampled_from([0.0, 0.1, 0.3]),
)
def test_model_every_batch_is_forwarded_until_written_and_acks_never_pass_an_unwritten_batch(
    count: int, seed: int, failure_rate: float
) -> None:
    """Sessions send the batches after acked_seq, outputs finish them in random order and drop some;
    after each drop the client resends from acked_seq. Every batch ends up written, the ack never
    covers a batch that was not written, and a written batch is never forwarded again."""
    rng = random.Random(seed)
    state = StreamState("c", "s", now=0.0)
    written: set[int] = set()
    forwarded_while_written: list[int] = []
    for _ in range(1000):
        if state.acked_seq == count:
            break
        in_pipeline = []
        for seq in range(state.acked_seq + 1, count + 1):
            if state.receive(seq) is Verdict.FORWARD:
                if seq in written:
                    forwarded_while_written.append(seq)
                in_pipeline.append(seq)
        rng.shuffle(in_pipeline)
        for seq in in_pipeline:
            ok = rng.random() >= failure_rate
            if ok:
                written.add(seq)
            state.done(seq, ok)
            assert all(s in written for s in range(1, state.acked_seq + 1))
    assert state.acked_seq == count
    assert written == set(range(1, count + 1))
    assert forwarded_while_written == []
