"""The history fill's simulated time: one clock the fill moves forward, read by every simulator it drives.

The simulators take their clock as an object (`IonChamber(clock=...)`, `StationModel(clock, ...)`) and only
ever ask it `now_ns()`. Their own clocks run with the wall clock (times an acceleration); months of lab life
in seconds need a clock that stands still until the fill sets it, so the adapters below are those clocks'
types answering from one `SteppedClock`. No simulator changes: the seam was already there.
"""

from __future__ import annotations

from hotlab.simulators.elution_station import StationClock
from hotlab.simulators.source import SimClock


class SteppedClock:
    """Simulated UTC time (epoch ns), moved only by the fill and only forward."""

    def __init__(self, start_ns: int) -> None:
        self._now_ns = int(start_ns)

    def now_ns(self) -> int:
        return self._now_ns

    def set(self, at_ns: int) -> None:
        """Move to `at_ns`; an instant already passed leaves the clock where it is (events never go back)."""
        self._now_ns = max(self._now_ns, int(at_ns))

    def advance(self, seconds: float) -> None:
        self._now_ns += round(seconds * 1e9)


class ChamberClock(SimClock):
    """A dose calibrator simulator's clock (`IonChamber`) reading the fill's time."""

    def __init__(self, clock: SteppedClock) -> None:
        super().__init__(1.0, clock.now_ns())
        self._stepped = clock

    def now_ns(self) -> int:
        return self._stepped.now_ns()


class StationTime(StationClock):
    """An elution station simulator's clock (`StationModel`) reading the fill's time."""

    def __init__(self, clock: SteppedClock) -> None:
        super().__init__(1.0, clock.now_ns())
        self._stepped = clock

    def now_ns(self) -> int:
        return self._stepped.now_ns()
