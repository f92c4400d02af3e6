"""agent.ratelimit: a flood of identical events makes a few lines that count them."""

from __future__ import annotations

import logging

from agent import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_that_stops_is_counted_by_flush(caplog) -> None:
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("test.ratelimit"), interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, "test.ratelimit"):
        for peer in range(100):
            limited.warn("timeout", 1, "client %d timed out", peer)
        clock.now = 5.0
        limited.flush(due_only=True)  # within the interval of the first line: nothing yet
        assert [r.getMessage() for r in caplog.records] == ["client 0 timed out"]
        clock.now = 10.0
        limited.flush(due_only=True)
        limited.flush(due_only=True)  # nothing left out since
        limited.warn("timeout", 1, "client %d timed out", 100)  # within the interval of the count line
        limited.flush()  # at shutdown: whatever is left, interval or not
    assert [r.getMessage() for r in caplog.records] == [
        "client 0 timed out",
        "client 99 timed out (and 98 more since the last such line)",
        "client 100 timed out",
    ]


def test_keys_are_limited_apart() -> None:
    clock = Clock()
    logger = logging.getLogger("test.ratelimit.keys")
    limited = RateLimitedLog(logger, interval=10.0, clock=clock)
    assert limited.warn("a", 1, "a") and limited.warn("b", 1, "b")
    assert not limited.warn("a", 3, "a")
    clock.now = 10.0
    assert limited.warn("a", 1, "a")
