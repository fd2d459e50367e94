"""The simulated chamber's physics and the fault injector, without any transport."""

from __future__ import annotations

import statistics

import pytest

from hotlab.physics.nuclides import get_nuclide
from hotlab.physics.units import ACTIVITY_UNITS
from hotlab.simulators.faults import Fault, FaultInjector, parse_fault_spec
from hotlab.simulators.source import (
    CURIE_LADDER,
    DEFAULT_RESPONSE_A_PER_BQ,
    SI_LADDER,
    ChamberSchedule,
    IonChamber,
    SimClock,
    Source,
    auto_range,
    fixed_digits,
    make_chamber,
)


def test_decay_follows_the_evaluated_half_life() -> None:
    chamber = make_chamber("F-18", 1e9, noise_rel=0.0)
    start = chamber.true_activity_bq()
    # F-18: 109.77 (5) min, ENSDF (physics/nuclides.py); after 3 half-lives 1/8 is left.
    chamber.clock.advance(3 * 109.77 * 60)
    assert chamber.true_activity_bq() / start == pytest.approx(0.125, rel=1e-6)


def test_accelerated_clock_runs_faster_than_wall_time() -> None:
    clock = SimClock(acceleration=3600.0, start_ns=0)
    first = clock.now_ns()
    later = clock.now_ns()
    assert later >= first
    clock.advance(10.0)
    assert clock.now_ns() - later >= 10e9
    with pytest.raises(ValueError):
        SimClock(acceleration=0)
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_wrong_calibration_scales_by_the_response_ratio() -> None:
    chamber = make_chamber("Tc-99m", 500e6, noise_rel=0.0, selected_nuclide="Cs-137")
    ratio = DEFAULT_RESPONSE_A_PER_BQ["Tc-99m"] / DEFAULT_RESPONSE_A_PER_BQ["Cs-137"]
    now = chamber.clock.now_ns()
    assert chamber.expected_display_bq(now) == pytest.approx(chamber.true_activity_bq(now) * ratio, rel=1e-12)
    chamber.select("99mTc")
    assert chamber.expected_display_bq(now) == pytest.approx(chamber.true_activity_bq(now), rel=1e-12)


def test_background_is_added_unless_subtracted() -> None:
    chamber = make_chamber("Cs-137", 7.4e6, noise_rel=0.0)
    now = chamber.clock.now_ns()
    true_bq = chamber.true_activity_bq(now)
    background_bq = chamber.background_a / DEFAULT_RESPONSE_A_PER_BQ["Cs-137"]
    chamber.background_subtraction = False
    assert chamber.expected_display_bq(now) == pytest.approx(true_bq + background_bq, rel=1e-12)
    chamber.background_subtraction = True
    chamber.background_a *= 2  # background rose since the last autozero
    assert chamber.expected_display_bq(now) == pytest.approx(true_bq + background_bq, rel=1e-12)
    chamber.autozero()
    assert chamber.expected_display_bq(now) == pytest.approx(true_bq, rel=1e-12)


def test_noise_has_the_configured_spread_and_is_reproducible() -> None:
    def sample(seed: int) -> list[float]:
        chamber = make_chamber("Cs-137", 1e7, noise_rel=0.01, seed=seed)
        expected = chamber.expected_display_bq()
        return [chamber.measure_bq() / expected - 1 for _ in range(4000)]

    values = sample(3)
    assert statistics.pstdev(values) == pytest.approx(0.01, rel=0.1)
    assert abs(statistics.fmean(values)) < 0.001
    assert sample(3) == pytest.approx(values, abs=1e-9)
    assert sample(4) != pytest.approx(values, abs=1e-9)


def test_chamber_rejects_nuclides_without_a_response() -> None:
    clock = SimClock()
    source = Source(get_nuclide("I-131"), 1e8, clock.now_ns())
    with pytest.raises(ValueError, match="no chamber response configured for I-131"):
        IonChamber(source, clock=clock)
    chamber = make_chamber("Tc-99m", 1e8)
    with pytest.raises(ValueError):
        chamber.select("I-131")
    assert chamber.selected == "Tc-99m"


def test_auto_range_and_display_digits() -> None:
    value, unit = auto_range(740e6, SI_LADDER, ACTIVITY_UNITS)
    assert unit == "MBq" and value == pytest.approx(740.0)
    value, unit = auto_range(3.7e7, CURIE_LADDER, ACTIVITY_UNITS)
    assert unit == "mCi" and value == pytest.approx(1.0)
    assert auto_range(0.0, SI_LADDER, ACTIVITY_UNITS) == (0.0, "Bq")
    assert [fixed_digits(v) for v in (740.04, 1.23456, 0.012345, 0.0, -5.5)] == [
        "740.0",
        "1.235",
        "0.01235",
        "0.000",
        "-5.500",
    ]


def test_fault_injector_arm_enable_rate_and_hold() -> None:
    faults = FaultInjector(seed=1)
    faults.arm(Fault.DROP, times=2)
    assert [faults.fires(Fault.DROP) for _ in range(3)] == [True, True, False]
    faults.enable(Fault.GARBAGE)
    assert all(faults.fires(Fault.GARBAGE) for _ in range(5))
    faults.disable(Fault.GARBAGE)
    assert not faults.fires(Fault.GARBAGE)
    faults.set_rate(Fault.LATE, 0.25)
    hits = sum(faults.fires(Fault.LATE) for _ in range(4000))
    assert 800 < hits < 1200
    counter = iter(range(100))
    assert faults.hold(lambda: next(counter)) == 0
    faults.enable(Fault.STUCK)
    assert [faults.hold(lambda: next(counter)) for _ in range(3)] == [0, 0, 0]
    faults.clear()
    assert faults.hold(lambda: next(counter)) == 1
    garbage = faults.garbage()
    assert len(garbage) == faults.garbage_bytes and min(garbage) >= 0x80


def test_fault_spec_parsing() -> None:
    assert parse_fault_spec("drop:0.1") == (Fault.DROP, 0.1)
    assert parse_fault_spec("STUCK") == (Fault.STUCK, 1.0)
    with pytest.raises(ValueError, match="unknown fault 'melt'"):
        parse_fault_spec("melt")
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        parse_fault_spec("late:2")
    with pytest.raises(ValueError, match="not a number"):
        parse_fault_spec("late:x")


def test_a_chamber_schedule_puts_sources_in_and_takes_them_out() -> None:
    """Empty 10 s, then the check source 20 s and empty 10 s, repeating every 30 s; the vial keeps decaying."""
    clock = SimClock(start_ns=0)
    cs137 = Source(get_nuclide("Cs-137"), 7.4e6, 0)
    f18 = Source(get_nuclide("F-18"), 1e9, 0)
    s = 1_000_000_000
    routine = ChamberSchedule(((10 * s, cs137), (30 * s, None)), repeat_every_ns=30 * s)
    chamber = IonChamber(None, clock=clock, selected_nuclide="Cs-137", noise_rel=0.0, schedule=routine)
    timeline = [chamber.source_at(t * s) for t in (0, 9, 10, 29, 30, 39, 40, 59, 60, 69, 70)]
    assert timeline == [None, None, cs137, cs137, None, None, cs137, cs137, None, None, cs137]
    assert chamber.expected_display_bq(5 * s) == 0.0  # empty: background only, and it is subtracted
    assert chamber.expected_display_bq(15 * s) == pytest.approx(cs137.activity_bq(15 * s), rel=1e-12)
    # A dose inserted once and never taken out, in a chamber that held the check source before.
    once = IonChamber(
        cs137, clock=clock, selected_nuclide="F-18", noise_rel=0.0, schedule=ChamberSchedule(((100 * s, f18),))
    )
    assert once.source_at(99 * s) is cs137 and once.source_at(10**6 * s) is f18
    t = 100 * s + int(109.77 * 60 * s)  # one F-18 half-life (ENSDF 109.77 min) after its reference
    assert once.true_activity_bq(t) == pytest.approx(1e9 * 2.0 ** (-(t / s) / (109.77 * 60)), rel=1e-4)
    with pytest.raises(ValueError, match="in time order"):
        ChamberSchedule(((20 * s, None), (10 * s, cs137)))
    with pytest.raises(ValueError, match="fit in one period"):
        ChamberSchedule(((0, cs137), (40 * s, None)), repeat_every_ns=30 * s)
    with pytest.raises(ValueError, match="no chamber response configured for Ge-68"):
        IonChamber(None, clock=clock, schedule=ChamberSchedule(((0, Source(get_nuclide("Ge-68"), 1.0, 0)),)))


def test_a_bit_flip_changes_one_digit_by_one_bit_and_keeps_the_frame_valid() -> None:
    faults = FaultInjector(seed=3)
    frame = b">7.4000E+09\r\n"
    flipped = {faults.flip_digit(frame) for _ in range(200)}
    assert frame not in flipped and len(flipped) == 7  # one variant per digit: 7, 4, 0, 0, 0, 0, 9
    for variant in flipped:
        [(a, b)] = [(a, b) for a, b in zip(frame, variant) if a != b]
        assert a ^ b == 1 and chr(b).isdigit()
    assert b">7.4000E+19\r\n" in flipped and b">7.4000E+08\r\n" in flipped  # the review's two frames
    assert faults.flip_digit(b">OK\r\n") == b">OK\r\n"
    assert parse_fault_spec("bit_flip:0.25") == (Fault.BIT_FLIP, 0.25)
