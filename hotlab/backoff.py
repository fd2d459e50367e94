"""The one retry policy: exponential growth to a cap, with optional full jitter.

Why one: devices, the broker, InfluxDB, the archive and the outbox all retry after failures, and
a lab with several controllers must not have them reconnect in step. Full jitter spreads retries
best (AWS Architecture Blog, "Exponential Backoff And Jitter", 2015). A caller that must wait at
least a known time (a server's Retry-After) draws `delay` as usual and waits at least that
floor, itself capped at `max_s`: `max(delay, min(floor, max_s))` (controller/sinks/influx.py),
so a server asking for an hour cannot stall the lab's backlog for an hour.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

#: Past this many doublings the cap has long been reached; it keeps 2**attempt a small float.
_MAX_DOUBLINGS = 30


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays of `min(max_s, initial_s * 2**attempt)`; `delay` draws uniformly below that ceiling."""

    initial_s: float = 0.5
    max_s: float = 30.0

    def ceiling(self, attempt: int) -> float:
        """The longest wait after `attempt` earlier failures (0 for the first retry)."""
        return min(self.max_s, self.initial_s * 2.0 ** min(max(attempt, 0), _MAX_DOUBLINGS))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """A full-jitter wait: uniform(0, ceiling(attempt))."""
        return (rng or random).uniform(0.0, self.ceiling(attempt))
