"""A device's clock against the controller's: the smoothed offset, and the alarm when it is too far off.

Why it matters: an elution's start and end are stamped by the elution station's clock, a calibrator
reading by the controller's, and decay correction between the two takes their difference as elapsed
time. A clock that is Δt off mis-corrects an activity by the factor exp(ln 2·Δt/T½), i.e. by about
ln 2·Δt/T½ for Δt much shorter than the half-life T½.

Each poll of a station measures the offset once (hotlab.drivers.clock_offset: the midpoint of the
request, ± half its round trip). One sample can be poor (a reply delayed by a busy line or loop),
so `ClockFilter` keeps the last FILTER_STAGES samples and takes the one with the smallest bound, as
NTP's clock filter does (RFC 5905, section 10: eight stages, the minimum-delay sample wins, since
its half round trip bounds its error tightest). An older sample's bound grows with its age at
PHI, the frequency tolerance NTP assumes of a clock (RFC 5905, section 7.2: 15 ppm), so a fresh
sample wins over a slightly tighter old one. A new sample whose interval does not meet the
estimate's cannot come from the same steady clock (someone set the station's clock, the
controller's stepped, or a simulated station runs accelerated): the older samples are dropped and
the estimate starts again from the new one.

The limit, `max_clock_offset_s` (default DEFAULT_MAX_CLOCK_OFFSET_S = 10 s), is a hotlab
engineering default: no standard sets one. It keeps the clock's share of a decay correction at
about 0.2 % for Ga-68, the shortest-lived daughter of the generators hotlab judges (T½ = 67.83 min,
DDEP as in hotlab.physics.nuclides): ln 2 × 10 s / 4069.8 s = 0.17 %, a thirtieth of the 5 %
action levels of calibrator QC (controller/qc/limits.py) and under the 1 % of the background
limit. Δt ≤ 0.002 × T½ / ln 2 = 11.7 s; 10 s is that, rounded down. For F-18 (109.77 min) the
same 10 s is 0.11 %, for Tc-99m (6.0067 h) 0.03 %; for Rb-82 (1.2575 min) it would be 9.2 %, so a
Sr-82/Rb-82 station needs a limit of 1 s (0.92 %) or less. An unsynchronised real-time clock
drifting 20 ppm passes 10 s in under six days: the alarm asks for the station's clock to be set
(or synchronised) long before it matters to QC.

The alarm has hysteresis, so it does not flap at the limit: it is raised once the offset is
above the limit beyond doubt (|offset| − uncertainty > limit) and cleared once it is below half
the limit beyond doubt (|offset| + uncertainty < limit / 2), as the suspect-readings alarm clears
at half its threshold (controller/suspect_alarm.py). A measurement too poor to say either way
changes nothing.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence

from hotlab.controller.messages import ClockStatus, Message, clock_offset_alarm_message
from hotlab.drivers.clock_offset import ClockOffset
from hotlab.physics.utc_time import NS_PER_S

log = logging.getLogger(__name__)

#: Samples the filter keeps (RFC 5905, section 10: NTP's clock filter has eight stages).
FILTER_STAGES = 8
#: How fast an old sample's bound grows, in seconds per second (RFC 5905, section 7.2: PHI, 15 ppm).
PHI = 15e-6
#: `[service] max_clock_offset_s` when a lab does not set it (module docstring: the arithmetic).
DEFAULT_MAX_CLOCK_OFFSET_S = 10.0
#: The alarm clears below this fraction of the limit.
CLEAR_RATIO = 0.5


def aged(sample: ClockOffset, at_ns: int) -> ClockOffset:
    """`sample` as an estimate at `at_ns`: the same offset, its bound grown by PHI for each second since."""
    age_ns = max(at_ns - sample.at_ns, 0)  # a controller clock stepped back: no growth, the check below sees it
    return ClockOffset(sample.offset_ns, sample.uncertainty_ns + math.ceil(age_ns * PHI), at_ns)


def consistent(a: ClockOffset, b: ClockOffset) -> bool:
    """Whether the two intervals (offset ± uncertainty) meet: both can hold for one steady clock."""
    return abs(a.offset_ns - b.offset_ns) <= a.uncertainty_ns + b.uncertainty_ns


class ClockFilter:
    """The best offset of the last FILTER_STAGES samples of one device (module docstring)."""

    def __init__(self, stages: int = FILTER_STAGES) -> None:
        if stages < 1:
            raise ValueError(f"a clock filter needs at least one stage, got {stages}")
        self._samples: deque[ClockOffset] = deque(maxlen=stages)

    def add(self, sample: ClockOffset) -> ClockOffset:
        """Take one sample; return the estimate as of its time."""
        if self._samples and not consistent(self.estimate(sample.at_ns), sample):
            self._samples.clear()
        self._samples.append(sample)
        return self.estimate(sample.at_ns)

    def estimate(self, at_ns: int) -> ClockOffset:
        """The sample whose bound, aged to `at_ns`, is smallest; the newest wins a tie."""
        if not self._samples:
            raise LookupError("no clock sample yet")
        return min((aged(s, at_ns) for s in reversed(self._samples)), key=lambda s: s.uncertainty_ns)


def alarm_after(active: bool, offset: ClockOffset, limit_s: float) -> bool:
    """The alarm's state after `offset`, from `active` before it (hysteresis: module docstring)."""
    limit_ns = limit_s * NS_PER_S
    size_ns = abs(offset.offset_ns)
    if size_ns - offset.uncertainty_ns > limit_ns:
        return True
    if size_ns + offset.uncertainty_ns < limit_ns * CLEAR_RATIO:
        return False
    return active


class DeviceClock:
    """One device's clock as the controller knows it: the filtered offset and whether it is too far off.

    `alarm` is the controller's judgement after the last sample; the device's source hands it to
    the supervisor with the device's condition, so a change publishes a status at once while the
    offset itself, which moves a little at every poll, does not.
    """

    def __init__(self, limit_s: float = DEFAULT_MAX_CLOCK_OFFSET_S, stages: int = FILTER_STAGES) -> None:
        if not (math.isfinite(limit_s) and limit_s > 0):
            raise ValueError(f"max_clock_offset_s must be a positive number of seconds, got {limit_s!r}")
        self.limit_s = limit_s
        self._filter = ClockFilter(stages)
        #: The estimate after the last sample; None before the first.
        self.offset: ClockOffset | None = None
        self.alarm = False

    def observe(self, sample: ClockOffset) -> None:
        self.offset = self._filter.add(sample)
        self.alarm = alarm_after(self.alarm, self.offset, self.limit_s)

    def status(self) -> ClockStatus | None:
        """What the device's status says of its clock; None before the first sample."""
        if self.offset is None:
            return None
        return ClockStatus(self.offset.offset_s, self.offset.uncertainty_s, self.limit_s, self.alarm)


class ClockAlarms:
    """Which device clock alarms are raised as of the last commit, and the messages that change them.

    Each change is a `controller_alarm` (`alarm: clock_offset`), committed with the device status
    that carries the new state, retained on hotlab/<site>/<station>/<device>/clock_alarm. After a
    start the controller cannot know what an earlier run left retained, so the first status with
    an offset publishes the alarm's state, raised or cleared.
    """

    def __init__(self, site: str) -> None:
        self.site = site
        self._raised: dict[str, bool] = {}

    def changes(self, station: str, device: str, clock: DeviceClock, time_ns: int) -> list[Message]:
        """The alarm message to commit with `device`'s next status, if its alarm state changed."""
        status, offset = clock.status(), clock.offset
        if status is None or offset is None or self._raised.get(device) == status.alarm:
            return []
        return [
            clock_offset_alarm_message(self.site, station, device, status, measured_ns=offset.at_ns, time_ns=time_ns)
        ]

    def committed(self, messages: Sequence[Message]) -> None:
        """Take over the alarm states of `messages` once their commit succeeded, and say so in the log."""
        for message in messages:
            alarm = message.payload
            if message.kind != "controller_alarm" or alarm.get("alarm") != "clock_offset":
                continue
            device, active = str(alarm["device"]), bool(alarm["active"])
            was = self._raised.get(device)
            self._raised[device] = active
            if active:
                log.warning(
                    "device %s: CLOCK OFFSET alarm raised: its clock is %+.3f s (± %.3f s) from the controller's,"
                    " limit %g s; its times (elution start and end) are that far off",
                    device,
                    alarm["clock_offset_s"],
                    alarm["clock_uncertainty_s"],
                    alarm["max_clock_offset_s"],
                )
            elif was:
                log.info(
                    "device %s: clock offset alarm cleared: %+.3f s (± %.3f s)",
                    device,
                    alarm["clock_offset_s"],
                    alarm["clock_uncertainty_s"],
                )
