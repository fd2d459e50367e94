"""Decay maths: properties, agreement with radioactivedecay (ICRP-107), and generator textbook cases."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta, timezone

import numpy as np
import pytest
import radioactivedecay as rd
from hypothesis import given, settings
from hypothesis import strategies as st

from hotlab.physics.decay import (
    activity_at,
    corrected_activity_uncertainty,
    daughter_activity,
    decay_correct,
    decay_factor,
    elapsed_s,
    equilibrium_fraction,
    generator_daughter_activity,
    time_of_max_daughter,
    time_to_reach,
)
from hotlab.physics.nuclides import NUCLIDES, Decay, Nuclide, UnknownNuclideError
from hotlab.physics.utc_time import NaiveDatetimeError, TimeFormatError, parse_utc_ns, to_epoch_ns

NAMES = sorted(NUCLIDES)
HOUR = 3600.0
PROPERTY = settings(max_examples=200, deadline=None)

nuclide_names = st.sampled_from(NAMES)
activities = st.floats(min_value=1.0, max_value=1e15)
half_life_multiples = st.floats(min_value=0.0, max_value=30.0)


# --- properties -------------------------------------------------------------------------


@PROPERTY
@given(name=nuclide_names, a0=activities, multiple=st.floats(min_value=-20.0, max_value=20.0))
def test_forward_then_back_returns_the_start(name: str, a0: float, multiple: float) -> None:
    dt = multiple * NUCLIDES[name].half_life_s
    assert activity_at(activity_at(a0, name, dt), name, -dt) == pytest.approx(a0, rel=1e-12)


@PROPERTY
@given(name=nuclide_names, a0=activities, first=half_life_multiples, extra=st.floats(min_value=1e-3, max_value=10.0))
def test_activity_strictly_decreases_with_time(name: str, a0: float, first: float, extra: float) -> None:
    t1 = first * NUCLIDES[name].half_life_s
    t2 = t1 + extra * NUCLIDES[name].half_life_s
    assert activity_at(a0, name, t2) < activity_at(a0, name, t1)


@PROPERTY
@given(half_life=st.floats(min_value=1e-3, max_value=1e12), dt=st.floats(min_value=0.0, max_value=1e12))
def test_forward_factor_lies_in_zero_one(half_life: float, dt: float) -> None:
    factor = decay_factor(half_life, dt)
    assert 0.0 <= factor <= 1.0
    if dt == 0.0:
        assert factor == 1.0


@PROPERTY
@given(name=nuclide_names, a0=activities, multiple=st.floats(min_value=-15.0, max_value=15.0))
def test_time_to_reach_inverts_activity_at(name: str, a0: float, multiple: float) -> None:
    dt = multiple * NUCLIDES[name].half_life_s
    target = float(activity_at(a0, name, dt))
    assert time_to_reach(a0, target, name) == pytest.approx(dt, rel=1e-9, abs=1e-9 * NUCLIDES[name].half_life_s)


def test_time_to_reach_is_negative_when_the_target_is_above_the_start() -> None:
    half_life = NUCLIDES["F-18"].half_life_s
    assert time_to_reach(1e9, 2e9, "F-18") == pytest.approx(-half_life)
    assert time_to_reach(1e9, 0.25e9, "F-18") == pytest.approx(2 * half_life)


def test_one_half_life_halves_and_negative_time_goes_back() -> None:
    half_life = NUCLIDES["Tc-99m"].half_life_s
    assert activity_at(800.0, "Tc-99m", half_life) == pytest.approx(400.0, rel=1e-15)
    assert activity_at(800.0, "99mTc", -2 * half_life) == pytest.approx(3200.0, rel=1e-15)


def test_arrays_broadcast_against_each_other() -> None:
    a0 = np.array([[1e6], [2e6], [3e6]])
    dt = np.array([0.0, 1.0, 2.0, 3.0]) * NUCLIDES["Ga-68"].half_life_s
    result = activity_at(a0, "Ga-68", dt)
    assert result.shape == (3, 4)
    np.testing.assert_allclose(result[2], 3e6 * np.array([1, 0.5, 0.25, 0.125]), rtol=1e-14)
    half_lives = np.array([nuclide.half_life_s for nuclide in NUCLIDES.values()])
    np.testing.assert_allclose(decay_factor(half_lives, half_lives), 0.5, rtol=1e-15)


@pytest.mark.parametrize("half_life", [0.0, -1.0, np.array([1.0, 0.0])])
def test_non_positive_half_life_is_refused(half_life) -> None:
    with pytest.raises(ValueError, match="half-life must be > 0"):
        decay_factor(half_life, 1.0)


def test_unknown_nuclide_raises_the_library_error() -> None:
    with pytest.raises(UnknownNuclideError):
        activity_at(1.0, "Xx-1", 1.0)


# --- times --------------------------------------------------------------------------------


def test_decay_correct_accepts_datetimes_epoch_ns_and_datetime64_alike() -> None:
    start = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
    end = datetime(2026, 11, 24, 10, 0, tzinfo=timezone(timedelta(hours=1)))  # 09:00Z
    expected = 7.4e9 * 2 ** (-93 * HOUR / NUCLIDES["Lu-177"].half_life_s)
    by_datetime = decay_correct(7.4e9, "Lu-177", start, end)
    by_ns = decay_correct(7.4e9, "Lu-177", int(start.timestamp()) * 10**9, int(end.timestamp()) * 10**9)
    by_dt64 = decay_correct(7.4e9, "Lu-177", np.datetime64("2026-11-20T12:00"), np.datetime64("2026-11-24T09:00"))
    for value in (by_datetime, by_ns, by_dt64):
        assert value == pytest.approx(expected, rel=1e-14)
    assert decay_correct(float(by_datetime), "Lu-177", end, start) == pytest.approx(7.4e9, rel=1e-14)


def test_epoch_ns_arrays_are_differenced_exactly() -> None:
    base = 1_795_000_000_000_000_000
    seconds = elapsed_s(np.array([base, base]), np.array([base + 1, base + 3_600_000_000_000]))
    np.testing.assert_array_equal(seconds, [1e-9, 3600.0])


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(NaiveDatetimeError, match="no timezone"):
        decay_correct(1.0, "F-18", datetime(2026, 1, 1), datetime(2026, 1, 2, tzinfo=UTC))


# --- the shared time parser ---------------------------------------------------------------

NOV_1_NS = 1_793_491_200_000_000_000  # 2026-11-01T00:00:00Z = 20758 days * 86400 s after the epoch


@pytest.mark.parametrize(
    ("value", "expected_ns"),
    [
        ("2026-11-01T00:00:00Z", NOV_1_NS),
        ("2026-11-01", NOV_1_NS),  # a bare date is 00:00 UTC
        (date(2026, 11, 1), NOV_1_NS),  # as is a TOML bare date
        (" 2026-11-01T01:00+01:00 ", NOV_1_NS),
        ("2026-10-31 19:00:00-05:00", NOV_1_NS),
        ("2026-11-01T00:00:00z", NOV_1_NS),  # RFC 3339 lower-case z
        ("2026-11-01T00:00:00.123456789Z", NOV_1_NS + 123_456_789),  # all 9 digits, not truncated to 6
        ("2026-11-01T00:00:00,5Z", NOV_1_NS + 500_000_000),
        (datetime(2026, 11, 1, 2, tzinfo=timezone(timedelta(hours=2))), NOV_1_NS),
        (NOV_1_NS, NOV_1_NS),
        (np.int64(NOV_1_NS), NOV_1_NS),
    ],
)
def test_parse_utc_ns_reads_every_accepted_form(value: object, expected_ns: int) -> None:
    assert parse_utc_ns(value) == expected_ns
    assert type(parse_utc_ns(value)) is int


@pytest.mark.parametrize("value", ["2026-11-01T00:00", "2026-11-01 08:30:00.5", datetime(2026, 11, 1)])
def test_parse_utc_ns_refuses_times_without_offset(value: object) -> None:
    with pytest.raises(NaiveDatetimeError, match="no timezone"):
        parse_utc_ns(value)


@pytest.mark.parametrize(
    ("value", "unit"),
    [(1_793_491_200, "seconds"), (1_793_491_200_000, "milliseconds"), (1_793_491_200_000_000, "microseconds")],
)
def test_parse_utc_ns_refuses_epoch_ints_in_a_smaller_unit_and_names_it(value: int, unit: str) -> None:
    with pytest.raises(TimeFormatError, match=f"epoch {unit}"):
        parse_utc_ns(value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1.7934912e18, "got float"),
        (True, "got bool"),
        (None, "got NoneType"),
        ("next tuesday", "cannot read time"),
        ("2026-11-01T00:00:00.1234567891Z", "more than 9 fractional digits"),
        (2**63, "int64"),
    ],
)
def test_parse_utc_ns_refuses_other_values_with_a_typed_error(value: object, message: str) -> None:
    with pytest.raises(TimeFormatError, match=message):
        parse_utc_ns(value)


@settings(max_examples=100, deadline=None)
@given(
    moment=st.datetimes(min_value=datetime(1974, 1, 1), max_value=datetime(2200, 1, 1)),
    offset_min=st.integers(min_value=-14 * 60, max_value=14 * 60),
    extra_ns=st.integers(min_value=0, max_value=999),
)
def test_parse_utc_ns_round_trips_iso_text_to_the_nanosecond(moment: datetime, offset_min: int, extra_ns: int) -> None:
    aware = moment.replace(tzinfo=timezone(timedelta(minutes=offset_min)))
    text = aware.strftime("%Y-%m-%dT%H:%M:%S") + f".{aware.microsecond:06d}{extra_ns:03d}" + aware.strftime("%z")
    assert parse_utc_ns(text) == int(to_epoch_ns(aware)) + extra_ns


def test_float_times_are_refused_with_a_type_error() -> None:
    with pytest.raises(TypeError, match="epoch ns"):
        to_epoch_ns(1.5)  # type: ignore[arg-type]


# --- uncertainty ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["F-18", "Ga-68", "Lu-177", "Cs-137"])
def test_half_life_uncertainty_matches_a_numerical_derivative(name: str) -> None:
    nuclide = NUCLIDES[name]
    dt = 3.7 * nuclide.half_life_s
    value, sigma = corrected_activity_uncertainty(1e9, name, dt)
    step = nuclide.half_life_s * 1e-6
    derivative = (1e9 * 2 ** (-dt / (nuclide.half_life_s + step)) - 1e9 * 2 ** (-dt / (nuclide.half_life_s - step))) / (
        2 * step
    )
    assert value == pytest.approx(activity_at(1e9, name, dt), rel=1e-15)
    assert sigma == pytest.approx(abs(derivative) * nuclide.half_life_unc_s, rel=1e-6)
    # Same size whether correcting forward or backward by the same time.
    assert corrected_activity_uncertainty(1e9, name, -dt)[1] / activity_at(1e9, name, -dt) == pytest.approx(
        sigma / value
    )


def test_no_elapsed_time_means_no_half_life_uncertainty_and_sources_add_in_quadrature() -> None:
    assert corrected_activity_uncertainty(5e8, "Tc-99m", 0.0) == (5e8, 0.0)
    dt = 24 * HOUR
    _, from_half_life = corrected_activity_uncertainty(5e8, "Tc-99m", dt)
    value, combined = corrected_activity_uncertainty(5e8, "Tc-99m", dt, activity_sigma_bq=1e7)
    factor = value / 5e8
    assert combined == pytest.approx(math.hypot(from_half_life, factor * 1e7))


# --- agreement with radioactivedecay (ICRP-107) ----------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_decayed_activity_agrees_with_radioactivedecay_within_the_half_life_difference(name: str) -> None:
    ours = NUCLIDES[name].half_life_s
    theirs = rd.Nuclide(name).half_life("s")
    inventory = rd.Inventory({name: 1e9}, "Bq")
    for multiple in (0.1, 1.0, 3.0, 10.0):
        dt = multiple * ours
        reference = inventory.decay(dt, "s").activities("Bq")[name]
        # The ratio of the two results is exactly 2**(dt (1/T_theirs - 1/T_ours)); allow that,
        # plus a floor for float rounding in both codes.
        implied = abs(2.0 ** (dt * (1.0 / theirs - 1.0 / ours)) - 1.0)
        assert activity_at(1e9, name, dt) / reference - 1.0 == pytest.approx(0.0, abs=1.001 * implied + 1e-10)


def _as_icrp(name: str) -> Nuclide:
    """The library entry re-stated with ICRP-107 data, to compare maths with maths."""
    nuclide = rd.Nuclide(name)
    decays = tuple(Decay(d, b, "ICRP-107") for d, b in zip(nuclide.progeny(), nuclide.branching_fractions()))
    return Nuclide(name, nuclide.half_life("s"), 0.0, "ICRP-107", decays)


@pytest.mark.parametrize(
    ("parent", "daughter"), [("Mo-99", "Tc-99m"), ("Ge-68", "Ga-68"), ("Sr-82", "Rb-82"), ("Lu-177m", "Lu-177")]
)
def test_bateman_ingrowth_matches_radioactivedecay_on_the_same_data(parent: str, daughter: str) -> None:
    p, d = _as_icrp(parent), _as_icrp(daughter)
    times = np.array([1e-3, 0.3, 1.0, 2.5, 7.0, 20.0]) * d.half_life_s
    ours = daughter_activity(1e9, p, d, times)
    inventory = rd.Inventory({parent: 1e9}, "Bq")
    theirs = np.array([inventory.decay(t, "s").activities("Bq")[daughter] for t in times])
    np.testing.assert_allclose(ours, theirs, rtol=1e-8)


# --- Bateman edge cases -----------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(offset=st.floats(min_value=-1e-6, max_value=1e-6), multiple=st.floats(min_value=0.0, max_value=50.0))
def test_equal_and_near_equal_half_lives_stay_finite_and_continuous(offset: float, multiple: float) -> None:
    half_life = 3600.0
    parent = Nuclide("P-1", half_life, 0.0, "test", (Decay("D-1", 1.0, "test"),))
    daughter = Nuclide("D-1", half_life * (1.0 + offset), 0.0, "test")
    t = multiple * half_life
    lam = math.log(2) / half_life
    degenerate_limit = 1e9 * lam * t * math.exp(-lam * t)  # A_d for exactly equal constants
    value = daughter_activity(1e9, parent, daughter, t)
    assert math.isfinite(value)
    assert value == pytest.approx(degenerate_limit, rel=1e-4, abs=1e-6)


def test_far_apart_half_lives_do_not_overflow() -> None:
    # Daughter 1e7 times longer-lived than the parent, after 2000 parent half-lives.
    parent = Nuclide("P-1", 1.0, 0.0, "test", (Decay("D-1", 1.0, "test"),))
    daughter = Nuclide("D-1", 1e7, 0.0, "test")
    value = daughter_activity(1e9, parent, daughter, 2000.0)
    assert value == pytest.approx(1e9 * 1e-7 * 2 ** (-2000 / 1e7), rel=1e-6)


def test_residual_daughter_decays_on_top_of_ingrowth() -> None:
    t = np.array([0.0, 1.0, 6.0]) * HOUR
    fresh = daughter_activity(10e9, "Mo-99", "Tc-99m", t)
    with_residual = daughter_activity(10e9, "Mo-99", "Tc-99m", t, residual_daughter_bq=1e9)
    np.testing.assert_allclose(with_residual - fresh, 1e9 * 2 ** (-t / NUCLIDES["Tc-99m"].half_life_s), rtol=1e-12)
    assert fresh[0] == 0.0


def test_explicit_branching_overrides_the_library_and_unlinked_pairs_need_one() -> None:
    t = 5 * HOUR
    default = daughter_activity(1e9, "Mo-99", "Tc-99m", t)
    assert daughter_activity(1e9, "Mo-99", "Tc-99m", t, branching=1.0) == pytest.approx(default / 0.8773)
    with pytest.raises(ValueError, match="not a listed daughter"):
        daughter_activity(1e9, "Ga-68", "Ge-68", t)


def test_time_before_the_elution_is_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        daughter_activity(1e9, "Ge-68", "Ga-68", np.array([1.0, -1.0]))


# --- generator textbook cases -----------------------------------------------------------------


@pytest.mark.parametrize(("minutes", "textbook"), [(60, 0.46), (120, 0.71), (240, 0.91)])
def test_ga68_ingrowth_fraction_of_equilibrium(minutes: int, textbook: float) -> None:
    t = minutes * 60.0
    ga, ge = NUCLIDES["Ga-68"].half_life_s, NUCLIDES["Ge-68"].half_life_s
    exact = 1.0 - 2.0 ** (-t / ga + t / ge)
    fraction = equilibrium_fraction("Ge-68", "Ga-68", t)
    assert fraction == pytest.approx(exact, rel=1e-12)
    assert fraction == pytest.approx(textbook, abs=0.01)
    # The same number from the full ingrowth divided by the equilibrium activity at t.
    lam_p, lam_d = math.log(2) / ge, math.log(2) / ga
    equilibrium = lam_d / (lam_d - lam_p) * activity_at(1e9, "Ge-68", t)
    assert daughter_activity(1e9, "Ge-68", "Ga-68", t) / equilibrium == pytest.approx(exact, rel=1e-10)


def test_tc99m_peaks_about_23_hours_after_elution() -> None:
    t_max = time_of_max_daughter("Mo-99", "Tc-99m")
    assert t_max / HOUR == pytest.approx(22.9, abs=0.1)
    around = daughter_activity(1e9, "Mo-99", "Tc-99m", np.array([t_max - 600.0, t_max, t_max + 600.0]))
    assert around[1] > around[0] and around[1] > around[2]


def test_time_of_max_for_equal_half_lives_is_the_mean_life() -> None:
    same = NUCLIDES["Ga-68"]
    assert time_of_max_daughter(same, same) == pytest.approx(same.half_life_s / math.log(2), rel=1e-15)


def test_mo99_tc99m_transient_equilibrium_ratio() -> None:
    mo, tc = NUCLIDES["Mo-99"], NUCLIDES["Tc-99m"]
    lam_p, lam_d = mo.decay_constant_per_s, tc.decay_constant_per_s
    expected = 0.8773 * lam_d / (lam_d - lam_p)
    assert expected == pytest.approx(0.96, abs=0.01)
    t = 10 * 24 * HOUR  # 40 Tc-99m half-lives: the transient term is gone
    ratio = daughter_activity(1e9, mo, tc, t) / activity_at(1e9, mo, t)
    assert ratio == pytest.approx(expected, rel=1e-9)


def test_ge68_ga68_secular_equilibrium_is_unity() -> None:
    t = 24 * HOUR
    ratio = daughter_activity(1e9, "Ge-68", "Ga-68", t) / activity_at(1e9, "Ge-68", t)
    assert ratio == pytest.approx(1.0, abs=3e-4)


def test_equilibrium_fraction_needs_a_shorter_lived_daughter() -> None:
    with pytest.raises(ValueError, match="no equilibrium"):
        equilibrium_fraction("Ga-68", "Ge-68", 3600.0)


def test_generator_daughter_decays_the_parent_from_calibration_to_elution_first() -> None:
    calibration = datetime(2026, 11, 16, 6, 0, tzinfo=UTC)
    elution = datetime(2026, 11, 20, 7, 30, tzinfo=UTC)
    now = datetime(2026, 11, 21, 6, 30, tzinfo=UTC)
    got = generator_daughter_activity(20e9, calibration, "Mo-99", "Tc-99m", elution, now, residual_daughter_bq=0.5e9)
    parent_at_elution = 20e9 * 2 ** (-(elution - calibration).total_seconds() / NUCLIDES["Mo-99"].half_life_s)
    expected = daughter_activity(parent_at_elution, "Mo-99", "Tc-99m", 23 * HOUR, residual_daughter_bq=0.5e9)
    assert got == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="before last_elution_time"):
        generator_daughter_activity(20e9, calibration, "Mo-99", "Tc-99m", now, elution)


def test_generator_daughter_activity_vectorises_over_query_times() -> None:
    elution_ns = 1_795_000_000_000_000_000
    at_ns = elution_ns + (np.arange(0, 25, 6) * HOUR * 1e9).astype(np.int64)
    values = generator_daughter_activity(1e9, elution_ns, "Ge-68", "Ga-68", elution_ns, at_ns)
    assert values.shape == (5,) and values[0] == 0.0
    assert np.all(np.diff(values[:3]) > 0)


def test_a_datetime_beyond_the_epoch_ns_range_is_a_typed_error_not_an_overflow() -> None:
    """Found by the config fuzzer: a TOML date-time in year 9999 raised OverflowError from numpy."""
    with pytest.raises(TimeFormatError, match="beyond the int64 epoch-ns range"):
        parse_utc_ns(datetime(9999, 12, 31, tzinfo=UTC))
