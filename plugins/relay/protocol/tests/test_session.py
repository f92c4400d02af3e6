"""Client session helpers and addresses: where to resume after accept, the in-flight window,
HOST:PORT parsing. Pure code."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_plugins.relay.protocol import Accept
from agent_plugins.relay.protocol.address import AddressError, format_address, parse_address
from agent_plugins.relay.protocol.session import SendWindow, plan_resume


def accept(acked: int, received: int) -> Accept:
    return Accept(1, "0.1.0", "s", acked, received, 1 << 24, 64, 5000)


def test_resume_commits_what_the_server_wrote() -> None:
    plan = plan_resume(accept(acked=6, received=7), log_last_seq=9)
    assert (plan.commit_through, plan.new_stream) == (6, False)


def test_resume_detects_numbering_that_went_backwards() -> None:
    # The server has seen batch 12; this log handed out numbers up to 9 only (it lost its tail).
    plan = plan_resume(accept(acked=10, received=12), log_last_seq=9)
    assert (plan.commit_through, plan.new_stream) == (9, True)


def test_window_counts_what_is_in_flight() -> None:
    window = SendWindow(limit=3, acked_seq=4)
    for seq in (5, 6, 8):
        window.sent(seq)
    assert window.room == 0
    assert window.acked(6, log_last_seq=8)
    assert (len(window), window.room, window.acked_seq) == (1, 2, 6)
    assert not window.acked(5, log_last_seq=8)  # an older ack changes nothing
    with pytest.raises(ValueError, match="sequence numbers must increase"):
        window.sent(8)


def test_window_takes_an_ack_for_batches_of_an_earlier_session() -> None:
    window = SendWindow(limit=8, acked_seq=4)
    window.sent(5)
    # The server wrote 6 and 7, sent before a cut: nothing to resend up to 7.
    assert window.acked(7, log_last_seq=10)
    assert window.last_sent == 7 and len(window) == 0
    with pytest.raises(ValueError, match="last batch this client numbered is 10"):
        window.acked(11, log_last_seq=10)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:50051", ("127.0.0.1", 50051)),
        ("[::]:50051", ("::", 50051)),
        ("[::1]:7", ("::1", 7)),
        ("collector.example", ("collector.example", 50051)),
        ("::1", ("::1", 50051)),
        (" node-7:0 ", ("node-7", 0)),
    ],
)
def test_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected an address"),
        ("host:", "missing port"),
        ("host:http", "port 'http' is not a number"),
        ("host:70000", "port '70000' is not a number"),
        ("[nothost]:1", "is not an IPv6 address"),
        ("fe80::1::2:5", "put an IPv6 address in brackets"),
        ("a b:1", "is not a host name"),
    ],
)
def test_bad_addresses_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(AddressError, match=message):
        parse_address(text)
    with pytest.raises(AddressError):
        parse_address("host", default_port=None)


@given(st.ip_addresses(), st.integers(0, 65535))
def test_format_and_parse_round_trip(ip, port: int) -> None:
    assert parse_address(format_address(str(ip), port)) == (str(ip), port)
