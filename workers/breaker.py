"""Per-deployment circuit breakers and latency averages, in one worker process.

A breaker opens after ``circuit.failures`` consecutive failed calls (errors worth
a retry, and rejected credentials) and refuses calls for ``circuit.open_s``;
then it half-opens: one probe call goes through, and its outcome closes the
circuit or opens it again. A job that meets an open circuit moves on to its
next deployment at once.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge

from llm_broker.shared.config import CircuitConfig

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
STATE_NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open"}


class Breaker:
    def __init__(self, cfg: CircuitConfig, state: Gauge, opened: Counter) -> None:
        self._cfg = cfg
        self._state_gauge = state
        self._opened = opened
        self.state = CLOSED
        self._failures = 0
        self._until = 0.0
        self._probing = False
        state.set(CLOSED)

    def _set(self, state: int) -> None:
        self.state = state
        self._state_gauge.set(state)

    def refusing(self) -> bool:
        """Is the circuit open (or its one probe already out) right now?"""
        if self.state == OPEN:
            return time.monotonic() < self._until
        return self.state == HALF_OPEN and self._probing

    def allow(self) -> bool:
        """May a call start now? In half-open state only one (the probe) may."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if time.monotonic() < self._until:
                return False
            self._set(HALF_OPEN)
        if self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self._failures = 0
        self._probing = False
        if self.state != CLOSED:
            self._set(CLOSED)

    def failure(self) -> None:
        self._failures += 1
        self._probing = False
        if self.state == HALF_OPEN or self._failures >= self._cfg.failures:
            if self.state != OPEN:
                self._opened.inc()
            self._set(OPEN)
            self._until = time.monotonic() + self._cfg.open_s

    def abandon(self) -> None:
        """A call ended with no verdict on the upstream (cancelled): free the probe."""
        self._probing = False


class LatencyAverage:
    """An exponentially weighted moving average of a deployment's call latency."""

    ALPHA = 0.2

    def __init__(self) -> None:
        self.value: float | None = None
        self.published = 0.0

    def observe(self, seconds: float) -> None:
        self.value = (
            seconds if self.value is None else self.value + self.ALPHA * (seconds - self.value)
        )
