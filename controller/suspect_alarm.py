"""Per calibrator: how many readings were suspect, and the alarm when too many of the recent ones are.

One suspect reading is noise on a line; many in a row is a failing cable, a ground loop or a device
that needs service, and somebody must look. The service keeps a `SuspectRate` per calibrator: the
count since the controller started (in the device status) and the fraction over the last
`alarm_window` readings. The alarm is raised when that fraction reaches `alarm_fraction` over a
full window, and cleared once it is below half of it (hysteresis, so that it does not flap at the
threshold). Each change is a `controller_alarm` message (`alarm: suspect_readings`), committed with
the reading that caused it and published retained on hotlab/<site>/<station>/<device>/alarm.

`observe` is pure: it returns the state after the readings without changing this one, so the
service takes it over only once the commit that holds those readings succeeded (a failed commit is
retried with the same readings, which must not be counted twice).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: The alarm clears below this fraction of `alarm_fraction`.
CLEAR_RATIO = 0.5


@dataclass(frozen=True, slots=True)
class SuspectRate:
    window: int
    threshold: float
    #: Suspect readings since the controller started.
    total: int = 0
    #: The last `window` readings, True where suspect, oldest first.
    recent: tuple[bool, ...] = ()
    active: bool = False
    #: Why the last suspect reading was suspect.
    last_reason: str | None = None

    @property
    def fraction(self) -> float | None:
        """Suspect fraction over the recent readings; None before the first reading."""
        return sum(self.recent) / len(self.recent) if self.recent else None

    def observe(self, reasons: Sequence[str | None]) -> SuspectRate:
        """The state after readings whose quality reasons are `reasons` (None for a good reading), in order."""
        suspects = [reason is not None for reason in reasons]
        recent = (self.recent + tuple(suspects))[-self.window :]
        last_reason = next((reason for reason in reversed(reasons) if reason is not None), self.last_reason)
        fraction = sum(recent) / len(recent) if recent else 0.0
        active = self.active
        if len(recent) == self.window and fraction >= self.threshold:
            active = True
        elif fraction < self.threshold * CLEAR_RATIO:
            active = False
        return SuspectRate(self.window, self.threshold, self.total + sum(suspects), recent, active, last_reason)
