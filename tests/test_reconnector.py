"""agent.Reconnector: delays and outage logging of a client that keeps reconnecting, without sockets."""

from __future__ import annotations

import logging

from agent import Backoff, Reconnector


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, **options) -> Reconnector:
    return Reconnector(
        "client",
        logging.getLogger("test.reconnector"),
        Backoff(1.0, 8.0, jitter=False),
        warn_attempts=3,
        reminder_interval=60.0,
        clock=clock,
        **options,
    )


def messages(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def test_each_first_failure_warns_then_one_outage_error_per_reminder_interval(caplog) -> None:
    clock = Clock()
    retry = make(clock, summary=lambda: "3 batches buffered")
    with caplog.at_level(logging.DEBUG, "test.reconnector"):
        delays = []
        for _ in range(12):
            delays.append(retry.failed("refused"))
            clock.now += delays[-1]
    assert delays == [1.0, 2.0, 4.0] + [8.0] * 9
    assert messages(caplog, logging.WARNING) == [
        "client: refused; retrying in 1s (attempt 1)",
        "client: refused; retrying in 2s (attempt 2)",
    ]
    # At the third attempt (3 s in), then at the first attempt 60 s later (63 s in).
    assert messages(caplog, logging.ERROR) == [
        "client: outage: unreachable for 3.0s (3 attempts; last: refused); 3 batches buffered; retrying every 8s",
        "client: outage: unreachable for 63.0s (11 attempts; last: refused); 3 batches buffered; retrying every 8s",
    ]
    assert retry.down and retry.failures == 12 and retry.last_error == "refused"


def test_a_new_outage_is_reported_like_the_first(caplog) -> None:
    clock = Clock()
    retry = make(clock)
    with caplog.at_level(logging.INFO, "test.reconnector"):
        for _ in range(3):
            retry.failed("refused")
        clock.now = 10.0
        retry.connected()
        assert not retry.down and retry.failures == 0
        for _ in range(3):
            retry.failed("timed out")
    assert messages(caplog, logging.INFO) == ["client: connected again after 10.0s (3 failed attempts)"]
    errors = messages(caplog, logging.ERROR)
    assert len(errors) == 2 and "last: timed out" in errors[1]  # not held back by the first outage's


def test_a_refusal_is_an_error_once_per_reason_and_names_the_peer(caplog) -> None:
    clock = Clock()
    retry = make(clock, peer="db:5432")
    with caplog.at_level(logging.DEBUG, "test.reconnector"):
        for reason in ("said no (auth)", "said no (auth)", "said no (version)"):
            assert retry.failed(reason, delay=7.0, refused=True) == 7.0
        assert retry.ended("reset") == 1.0
    assert messages(caplog, logging.ERROR) == [
        "client: db:5432 said no (auth); retrying every 8s",
        "client: db:5432 said no (version); retrying every 8s",
    ]
    assert messages(caplog, logging.WARNING) == ["client: connection to db:5432 ended: reset; reconnecting"]
