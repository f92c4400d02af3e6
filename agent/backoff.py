"""Exponential backoff with jitter: the one implementation used for restarts, retries and reconnects."""

from __future__ import annotations

import random


class Backoff:
    """Delays that double (by `multiplier`) from `initial` up to `maximum`.

    With `jitter`, each delay is drawn uniformly from [delay/2, delay] ("equal jitter"): peers that
    failed together do not retry together, and the delay stays within a factor of two of the configured
    curve, which keeps it predictable for operators. `attempts` counts the delays handed out since the
    last `reset`.
    """

    def __init__(
        self,
        initial: float = 0.5,
        maximum: float = 30.0,
        multiplier: float = 2.0,
        jitter: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        if initial < 0 or maximum < initial:
            raise ValueError(f"backoff needs 0 <= initial ({initial}) <= maximum ({maximum})")
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._next = initial
        self.attempts = 0

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self.maximum, self._next * self.multiplier)
        self.attempts += 1
        if self.jitter and delay > 0:
            return self._rng.uniform(delay / 2, delay)
        return delay

    def reset(self) -> None:
        self._next = self.initial
        self.attempts = 0
