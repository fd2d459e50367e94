"""A device's clock offset from one exchange, the filter over polls, the alarm with hysteresis and its messages.

Pure logic, no I/O; tests/test_elution_station_clock.py measures a real simulator over Modbus. Every
expected value is derived here from the exchange's arithmetic (the device read its clock somewhere
between request and reply), from RFC 5905's constants and from the decay law.
"""

from __future__ import annotations

import math

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hotlab.controller.device_clock import (
    DEFAULT_MAX_CLOCK_OFFSET_S,
    ClockAlarms,
    ClockFilter,
    DeviceClock,
    alarm_after,
)
from hotlab.controller.messages import ClockStatus, device_status_message
from hotlab.drivers.clock_offset import ClockOffset, measure_offset
from hotlab.physics.decay import decay_correct
from hotlab.physics.nuclides import get_nuclide
from tests.schema_check import validator_for

S = 1_000_000_000
MS = 1_000_000
T0 = 1_796_400_000 * S  # 2026-12-04, on the controller's clock


@given(
    true_offset_ns=st.integers(-(10**15), 10**15),
    round_trip_ns=st.integers(0, 5 * S),
    read_at=st.floats(0.0, 1.0),
    resolution_ns=st.sampled_from([1, MS, S]),
)
def test_the_true_offset_is_always_within_the_bound(
    true_offset_ns: int, round_trip_ns: int, read_at: float, resolution_ns: int
) -> None:
    """Wherever in the round trip the device read its clock, and however the register truncated it."""
    read_ns = T0 + int(read_at * round_trip_ns)  # controller time when the device read its clock
    device_ns = (read_ns + true_offset_ns) // resolution_ns * resolution_ns  # truncated, as a register holds it
    measured = measure_offset(device_ns, T0, round_trip_ns, resolution_ns)
    assert abs(measured.offset_ns - true_offset_ns) <= measured.uncertainty_ns
    # Half the round trip and half a resolution step, and no more (rounded up to the nanosecond).
    assert measured.uncertainty_ns == math.ceil((round_trip_ns + resolution_ns) / 2)
    assert measured.at_ns == T0 + round_trip_ns // 2


def test_a_station_read_mid_exchange_gives_its_offset_and_the_time_it_was_taken() -> None:
    # Sent at T0, reply 4 ms later; the station, 90 s ahead, read 90 s + 2.0004 ms and shows ms only.
    measured = measure_offset(T0 + 90 * S + 2 * MS, T0, 4 * MS, MS)
    assert measured.offset_s == pytest.approx(90.0005)  # 90 s + 2 ms + 0.5 ms (half a step) - 2 ms (midpoint)
    assert measured.uncertainty_s == pytest.approx(0.0025)  # (4 ms + 1 ms) / 2
    assert measured.device_time(T0 + 10 * S) == T0 + 100 * S + MS // 2
    with pytest.raises(ValueError, match="must be >= 0"):
        measure_offset(T0, T0, -1, MS)


def test_the_filter_takes_the_tightest_sample_and_ages_it_at_15_ppm() -> None:
    chooser = ClockFilter()
    chooser.add(ClockOffset(90 * S, 10 * MS, T0))  # a slow reply
    tight = ClockOffset(90 * S + 2 * MS, MS, T0 + S)
    chooser.add(tight)
    best = chooser.add(ClockOffset(90 * S - 3 * MS, 8 * MS, T0 + 2 * S))
    # The tight one, a second old: RFC 5905 grows its bound by PHI = 15 ppm of that second, 15 us.
    assert (best.offset_ns, best.uncertainty_ns, best.at_ns) == (tight.offset_ns, MS + 15_000, T0 + 2 * S)
    # 600 s later a fresh sample of 1.5 ms beats it: 1 ms + 15 ppm x 601 s = 10.015 ms.
    fresh = ClockOffset(90 * S, 3 * MS // 2, T0 + 601 * S)
    assert chooser.add(fresh) == fresh


def test_the_filter_keeps_eight_samples() -> None:
    chooser = ClockFilter()
    chooser.add(ClockOffset(0, MS // 10, T0))  # the tightest, but gone after eight more
    for i in range(1, 9):
        best = chooser.add(ClockOffset(0, MS, T0 + i * MS))
    assert best.uncertainty_ns == MS


def test_a_sample_the_estimate_cannot_hold_starts_the_filter_again() -> None:
    """A clock set in between (or one running fast): the old tight samples no longer describe it."""
    chooser = ClockFilter()
    chooser.add(ClockOffset(90 * S, MS // 10, T0))
    stepped = ClockOffset(5 * S, 5 * MS, T0 + S)
    assert chooser.add(stepped) == stepped
    # Jitter within the bounds is not a step: the tighter old sample stays the estimate.
    jitter = ClockOffset(5 * S + 4 * MS, 2 * MS, T0 + 2 * S)
    assert chooser.add(jitter).offset_ns == jitter.offset_ns  # 2 ms beats 5 ms aged
    assert chooser.add(ClockOffset(5 * S, 3 * MS, T0 + 3 * S)).offset_ns == jitter.offset_ns


def test_the_default_limit_keeps_the_ga68_decay_error_near_two_per_mille() -> None:
    """A clock Δt off mis-corrects an activity by 2**(Δt/T½) - 1; for Ga-68 and 10 s that is 0.17 %."""
    ga68 = get_nuclide("Ga-68")
    assert ga68.half_life_s == pytest.approx(67.83 * 60)  # DDEP (Kuzmenko 2019), as hotlab.physics.nuclides cites
    error = 2 ** (DEFAULT_MAX_CLOCK_OFFSET_S / ga68.half_life_s) - 1
    assert error == pytest.approx(math.log(2) * 10 / 4069.8, rel=1e-3)
    assert 0.0016 < error < 0.0018
    # The same through the decay code: an activity corrected over 10 s too many.
    corrected = float(decay_correct(1e9, ga68, T0, T0 + round(DEFAULT_MAX_CLOCK_OFFSET_S * S)))
    assert 1e9 / corrected - 1 == pytest.approx(error, rel=1e-9)
    # The largest offset that keeps it under 0.2 %: 0.002 x T½ / ln 2 = 11.7 s, so 10 s is inside.
    assert DEFAULT_MAX_CLOCK_OFFSET_S <= 0.002 * ga68.half_life_s / math.log(2) < 12


def test_the_alarm_rises_above_the_limit_and_clears_below_half_of_it() -> None:
    def at(offset_s: float, uncertainty_s: float = 0.001) -> ClockOffset:
        return ClockOffset(round(offset_s * S), round(uncertainty_s * S), T0)

    limit = 10.0
    assert alarm_after(False, at(10.5), limit) is True
    assert alarm_after(False, at(-10.5), limit) is True  # behind counts as much as ahead
    assert alarm_after(False, at(9.9), limit) is False
    # Between half the limit and the limit nothing changes: no flapping around 10 s.
    assert alarm_after(True, at(7.0), limit) is True
    assert alarm_after(False, at(7.0), limit) is False
    assert alarm_after(True, at(4.9), limit) is False
    # Not beyond doubt: 10.5 s ± 1 s may be 9.5 s, 4.5 s ± 1 s may be 5.5 s.
    assert alarm_after(False, at(10.5, 1.0), limit) is False
    assert alarm_after(True, at(4.5, 1.0), limit) is True


def test_a_device_clock_raises_and_clears_as_the_offset_moves() -> None:
    device = DeviceClock(10.0)
    assert device.status() is None and not device.alarm
    states = []
    for step, offset_s in enumerate((90.0, 90.0, 7.0, 2.0, 7.0, 11.0)):
        device.observe(ClockOffset(round(offset_s * S), MS, T0 + step * S))
        states.append(device.alarm)
    assert states == [True, True, True, False, False, True]
    assert device.status() == ClockStatus(11.0, 0.001, 10.0, True)
    with pytest.raises(ValueError, match="positive number of seconds"):
        DeviceClock(0.0)


def test_alarm_messages_are_published_once_per_change_and_once_after_a_start() -> None:
    alarms = ClockAlarms("lab")
    device = DeviceClock(10.0)
    device.observe(ClockOffset(2 * S, MS, T0))
    first = alarms.changes("elution-1", "gen-1", device, T0)
    assert [m.payload["active"] for m in first] == [False]  # after a start: the state, whatever it is
    alarms.committed(first)
    assert alarms.changes("elution-1", "gen-1", device, T0) == []
    device.observe(ClockOffset(90 * S, MS, T0 + S))
    raised = alarms.changes("elution-1", "gen-1", device, T0 + S)
    assert len(raised) == 1
    payload = raised[0].payload
    assert raised[0].topic == "hotlab/lab/elution-1/gen-1/clock_alarm"
    assert (payload["alarm"], payload["active"], payload["clock_offset_s"], payload["measured_ns"]) == (
        "clock_offset",
        True,
        90.0,
        T0 + S,
    )
    # Until committed the change is offered again (a failed commit is retried with the next status).
    assert len(alarms.changes("elution-1", "gen-1", device, T0 + S)) == 1
    alarms.committed(raised)
    assert alarms.changes("elution-1", "gen-1", device, T0 + 2 * S) == []
    validator = validator_for("controller_alarm")
    assert validator is not None
    for message in first + raised:
        validator.validate(message.payload)


def test_a_station_status_with_its_clock_matches_the_schema_and_reads_back() -> None:
    validator = validator_for("device_status")
    assert validator is not None
    clock = ClockStatus(-90.25, 0.0015, 10.0, True)
    payload = device_status_message(
        "lab", "elution-1", "gen-1", up=True, latency_ms=3.0, errors=0, station_state="idle", clock=clock
    ).payload
    validator.validate(payload)
    assert ClockStatus.of_status(payload) == clock
    assert (
        ClockStatus.of_status(device_status_message("lab", "qc", "cal-1", up=True, latency_ms=1.0, errors=0).payload)
        is None
    )
    partial = {k: v for k, v in payload.items() if k != "clock_alarm"}
    with pytest.raises(jsonschema.ValidationError, match="clock_alarm"):
        validator.validate(partial)
    with pytest.raises(KeyError):
        ClockStatus.of_status(partial)
