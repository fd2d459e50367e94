"""How far a device's clock is from the controller's, measured from one request and its reply.

A device that reports its own time (the elution station's input register `clock_ns`) stamps what
it records with that clock: an elution's start and end. Decay correction between such a time and
one the controller stamped (a calibrator reading) is only as good as the agreement of the two
clocks, so every such exchange is also a measurement of that agreement.

The device read its clock at some instant between the controller sending the request (`sent_ns`
on the controller's clock) and receiving the reply (`round_trip_ns` later). Nothing says where in
that interval, so the best estimate takes the midpoint and the bound is half the round trip: the
same reasoning as NTP's on-wire offset (RFC 5905, section 8), with the one device timestamp that a
Modbus read gives instead of NTP's two. A register that truncates the time to `resolution_ns`
(milliseconds for `clock_ns`) reads up to one resolution step early, which adds half a step to
both. Whatever delays the controller's own timestamps (the event loop was busy when the reply
arrived) only widens the interval, so the bound still holds; it does not hold across a step of
either clock in the middle of the exchange, which is why the round trip is timed on the monotonic
clock and only its start is read from the wall clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from hotlab.physics.utc_time import NS_PER_S


@dataclass(frozen=True, slots=True)
class ClockOffset:
    """Device clock minus controller clock, and the bound on its error, as of `at_ns` (controller clock).

    The device's time at controller time t is t + offset_ns, within ± uncertainty_ns.
    """

    offset_ns: int
    uncertainty_ns: int
    at_ns: int

    @property
    def offset_s(self) -> float:
        return self.offset_ns / NS_PER_S

    @property
    def uncertainty_s(self) -> float:
        return self.uncertainty_ns / NS_PER_S

    def device_time(self, controller_ns: int) -> int:
        """What the device's clock reads at `controller_ns` on the controller's clock."""
        return controller_ns + self.offset_ns


def measure_offset(device_ns: int, sent_ns: int, round_trip_ns: int, resolution_ns: int) -> ClockOffset:
    """The offset from one exchange: the device said `device_ns` between `sent_ns` and `sent_ns + round_trip_ns`.

    `device_ns` is the device's clock truncated to `resolution_ns` (module docstring). A negative
    round trip or resolution is a caller's bug, not a measurement.
    """
    if round_trip_ns < 0 or resolution_ns < 0:
        raise ValueError(f"round trip and resolution must be >= 0 ns; got {round_trip_ns}, {resolution_ns}")
    midpoint_ns = sent_ns + round_trip_ns // 2
    offset_ns = device_ns + resolution_ns // 2 - midpoint_ns
    return ClockOffset(offset_ns, (round_trip_ns + resolution_ns + 1) // 2, midpoint_ns)
