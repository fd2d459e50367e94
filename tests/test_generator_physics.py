"""Generator column physics: yield and breakthrough curves, and elutions built on hotlab.physics.decay."""

from __future__ import annotations

import math

import pytest

from hotlab.physics.decay import generator_daughter_activity
from hotlab.physics.nuclides import get_nuclide
from hotlab.simulators.generator_physics import (
    NS_PER_S,
    PROFILES,
    GeneratorColumn,
    UnknownGeneratorError,
    get_profile,
)

DAY_NS = 86_400 * NS_PER_S
HOUR_NS = 3_600 * NS_PER_S
CAL_NS = 1_790_000_000 * NS_PER_S


def column(key: str, **kwargs) -> GeneratorColumn:
    profile = get_profile(key)
    return GeneratorColumn(
        profile, generator_id="G1", parent_cal_bq=profile.nominal_cal_bq, cal_time_ns=CAL_NS, **kwargs
    )


def test_yield_falls_with_age_and_use_but_not_below_the_floor() -> None:
    ge = PROFILES["ge68"]
    fresh = ge.elution_yield(0.0, 0)
    year_old = ge.elution_yield(365 * 86_400.0, 0)
    used = ge.elution_yield(0.0, 500)
    assert fresh == pytest.approx(0.80)
    assert 0.6 < year_old < fresh  # literature: > 60 % over the shelf life
    assert used < fresh
    assert ge.elution_yield(1e12, 10**6) == ge.yield_floor


def test_breakthrough_rises_with_age_and_starts_below_the_limit() -> None:
    for profile in PROFILES.values():
        assert profile.breakthrough_fraction(0.0) < profile.breakthrough_limit
        doubling_s = profile.breakthrough_doubling_days * 86_400.0
        assert profile.breakthrough_fraction(doubling_s) == pytest.approx(2 * profile.breakthrough_fraction(0.0))


def test_ge68_column_reaches_secular_equilibrium() -> None:
    """Ga-68 (67.8 min) under Ge-68 (271 d): A_d/A_p -> l_d / (l_d - l_p), 1.00017, i.e. A_d ~ A_p."""
    ge = column("ge68")
    lam_p, lam_d = get_nuclide("Ge-68").decay_constant_per_s, get_nuclide("Ga-68").decay_constant_per_s
    at = CAL_NS + 2 * DAY_NS
    assert ge.available_daughter_bq(at) / ge.parent_bq(at) == pytest.approx(lam_d / (lam_d - lam_p), rel=1e-9)


def test_mo99_column_reaches_transient_equilibrium_with_branching() -> None:
    """A_Tc/A_Mo -> b * l_d / (l_d - l_p) for Mo-99/Tc-99m (about 0.96 with b = 0.877)."""
    mo = column("mo99")
    parent, daughter = get_nuclide("Mo-99"), get_nuclide("Tc-99m")
    lam_p, lam_d = parent.decay_constant_per_s, daughter.decay_constant_per_s
    branching = next(d.branching for d in parent.decays if d.daughter == "Tc-99m")
    at = CAL_NS + 4 * DAY_NS
    ratio = mo.available_daughter_bq(at) / mo.parent_bq(at)
    assert ratio == pytest.approx(branching * lam_d / (lam_d - lam_p), rel=1e-3)
    assert 0.9 < ratio < 1.0


def test_elution_yields_bateman_times_yield_and_leaves_the_rest_as_residual() -> None:
    mo = column("mo99", last_elution_ns=CAL_NS)
    end = CAL_NS + 23 * HOUR_NS
    available = float(generator_daughter_activity(mo.parent_cal_bq, CAL_NS, "Mo-99", "Tc-99m", CAL_NS, end))
    expected_yield = mo.profile.elution_yield(23 * 3600.0, 0)
    outcome = mo.elute(end, 10.0)
    assert outcome.available_daughter_bq == pytest.approx(available, rel=1e-12)
    assert outcome.daughter_bq == pytest.approx(available * expected_yield, rel=1e-12)
    assert outcome.parent_bq == pytest.approx(outcome.daughter_bq * mo.profile.breakthrough_fraction(23 * 3600.0))
    assert mo.elution_count == 1
    assert mo.last_elution_ns == end
    assert mo.residual_daughter_bq == pytest.approx(available * (1 - expected_yield))
    # Right after an elution only the residual is left, and the next elution starts from it.
    assert mo.available_daughter_bq(end) == pytest.approx(mo.residual_daughter_bq)
    later = end + HOUR_NS
    with_residual = generator_daughter_activity(
        mo.parent_cal_bq, CAL_NS, "Mo-99", "Tc-99m", end, later, residual_daughter_bq=mo.residual_daughter_bq
    )
    assert mo.available_daughter_bq(later) == pytest.approx(float(with_residual))


def test_aborted_elution_recovers_only_its_fraction() -> None:
    ge = column("ge68")
    end = CAL_NS + DAY_NS
    full = ge.preview(end, 5.0)
    half = ge.elute(end, 5.0, volume_fraction=0.5)
    assert half.daughter_bq == pytest.approx(full.daughter_bq / 2)
    assert half.volume_ml == 2.5


def test_elution_cannot_go_back_in_time() -> None:
    ge = column("ge68", last_elution_ns=CAL_NS + DAY_NS)
    with pytest.raises(ValueError, match="before the previous"):
        ge.elute(CAL_NS, 5.0)


def test_line_dose_rate_is_background_plus_inverse_square() -> None:
    ge = PROFILES["ge68"]
    assert ge.line_dose_rate_usv_h(0.0) == ge.background_usv_h
    one_gbq = ge.line_dose_rate_usv_h(1e9) - ge.background_usv_h
    assert one_gbq == pytest.approx(0.13 * 1000 / 0.05**2 * 1e-3)
    assert math.isclose(ge.line_dose_rate_usv_h(2e9) - ge.background_usv_h, 2 * one_gbq)


def test_bad_inputs_are_refused_clearly() -> None:
    with pytest.raises(UnknownGeneratorError, match="ge68, mo99"):
        get_profile("sr82")
    with pytest.raises(ValueError, match="positive"):
        GeneratorColumn(PROFILES["ge68"], generator_id="G", parent_cal_bq=-1.0, cal_time_ns=CAL_NS)
