"""Generator rules against hand computations.

Half-lives (library): Ge-68 270.95 d, Ga-68 67.83 min (DDEP); Mo-99 2.7479 d = 65.9496 h, Tc-99m 6.0067 h (DDEP);
Mo-99 -> Tc-99m branching 0.8773 (ICRP 107).
"""

from __future__ import annotations

import math
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotlab.controller.qc.calibrator_rules import TimedReading
from hotlab.controller.qc.generator_rules import (
    GeneratorSpec,
    YieldPoint,
    elution_yield,
    ga68_half_life,
    ge68_breakthrough,
    mo99_breakthrough,
    ratio_limit_reached_after_s,
    yield_trend,
)
from hotlab.controller.qc.limits import DEFAULT_LIMITS as LIMITS
from hotlab.controller.qc.result import QcInputError
from hotlab.physics.nuclides import get_nuclide

HOUR_NS = 3_600_000_000_000
MO99, TC99M = get_nuclide("Mo-99"), get_nuclide("Tc-99m")
#: Background read with each Ge-68 re-measurement: mean 1.0 Bq, sd 0.2 Bq; Currie decision level
#: 1.645 * 0.2 * sqrt(1 + 1/3) = 0.37992 Bq.
BACKGROUND = (1.0, 1.2, 0.8)
MINUTE_NS = 60_000_000_000


def ns(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp()) * 1_000_000_000


GA_GEN = GeneratorSpec("GA-1", get_nuclide("Ge-68"), get_nuclide("Ga-68"), 1.85e9, ns("2026-01-01T00:00:00Z"))
TC_GEN = GeneratorSpec("TC-1", get_nuclide("Mo-99"), get_nuclide("Tc-99m"), 10e9, ns("2026-01-05T12:00:00Z"))


def test_ga68_yield_at_equilibrium() -> None:
    # 59 d after calibration: Ge-68 = 1.85 GBq * 2^(-59/270.95) = 1.85 GBq * 0.859904.
    # Secular equilibrium Ga-68 = Ge-68 * T_Ge / (T_Ge - T_Ga) = * 1 / (1 - 67.83 / (270.95*1440)) = * 1.000174
    # -> available 1.59110 GBq. Eluting 1.2 GBq is 75.42 % -> pass; 1.0 GBq 62.85 % -> warn; 0.9 GBq 56.56 % -> fail.
    end = ns("2026-03-01T00:00:00Z")
    results = [elution_yield(GA_GEN, bq, end, LIMITS["elution_yield_ga68"]) for bq in (1.2e9, 1.0e9, 0.9e9)]
    assert results[0].expected == pytest.approx(1.59110e9, rel=1e-5)
    assert [r.value_judged for r in results] == pytest.approx([75.42, 62.85, 56.56], abs=0.01)
    assert [r.verdict for r in results] == ["pass", "warn", "fail"]
    # The yield is judged against a floor, not a deviation: no deviation_pct to read as a margin.
    assert all(r.deviation_pct is None for r in results)
    assert results[0].measured == 1.2e9 and results[0].unit == "Bq"


def test_ga68_yield_after_a_short_regrowth_with_residual() -> None:
    # Previous elution 3 h before left 0.4 GBq on the column. After t = 180 min:
    # ingrowth = Ge(t_e) * 1.000174 * (2^(-t/T_Ge) - 2^(-t/T_Ga)); residual decays by 2^(-180/67.83) = 0.158932.
    last = ns("2026-03-01T00:00:00Z")
    end = last + 3 * HOUR_NS
    ge_at_last = 1.85e9 * 2 ** (-59 / 270.95)
    ingrowth = ge_at_last * 1.000174 * (2 ** (-(3 / 24) / 270.95) - 2 ** (-180 / 67.83))
    expected = ingrowth + 0.4e9 * 2 ** (-180 / 67.83)
    result = elution_yield(GA_GEN, 1.0e9, end, LIMITS["elution_yield_ga68"], last_elution_ns=last, residual_bq=0.4e9)
    assert result.expected == pytest.approx(expected, rel=1e-5)
    assert result.inputs["since_last_elution_s"] == 3 * 3600


def test_tc99m_available_one_day_after_elution() -> None:
    # Mo-99 10 GBq at the last elution (= calibration), t = 24 h:
    # Tc = 0.8773 * 10 GBq * lambda_Tc/(lambda_Tc - lambda_Mo) * (e^(-lambda_Mo t) - e^(-lambda_Tc t))
    #    = 0.8773 * 10 GBq * 1.100207 * (0.777053 - 0.062694) = 6.89508 GBq.
    cal = TC_GEN.calibration_ns
    result = elution_yield(TC_GEN, 6.2e9, cal + 24 * HOUR_NS, LIMITS["elution_yield_tc99m"], last_elution_ns=cal)
    assert result.expected == pytest.approx(6.89508e9, rel=1e-5)
    assert result.value_judged == pytest.approx(6.2 / 6.89508 * 100, rel=1e-5)  # 89.92 % -> warn
    assert result.verdict == "warn"


def test_elution_before_the_previous_one_is_rejected() -> None:
    with pytest.raises(QcInputError, match="before previous elution"):
        elution_yield(
            GA_GEN,
            1e9,
            ns("2026-03-01T00:00:00Z"),
            LIMITS["elution_yield_ga68"],
            last_elution_ns=ns("2026-03-02T00:00:00Z"),
        )


def test_yield_trend_declining_generator() -> None:
    # Yield 80 % falling 0.5 %/day, one elution a day for 10 days: fit gives -0.5 %/day and -0.5 %/elution;
    # fitted now (day 9) = 75.5 %; 30 d ahead = 60.5 % -> still above the 60 % fail level -> pass.
    start = ns("2026-01-10T08:00:00Z")
    history = [YieldPoint(start + d * 24 * HOUR_NS, d + 1, 80.0 - 0.5 * d) for d in range(10)]
    trend = yield_trend("GA-1", history, LIMITS["elution_yield_ga68"], horizon_days=30)
    assert trend is not None
    assert trend.inputs["slope_pct_per_day"] == pytest.approx(-0.5)
    assert trend.inputs["slope_pct_per_elution"] == pytest.approx(-0.5)
    assert trend.measured == pytest.approx(60.5)
    assert trend.verdict == "pass"
    # 40 d ahead: 55.5 % < 60 % -> warn (a forecast never fails).
    assert yield_trend("GA-1", history, LIMITS["elution_yield_ga68"], horizon_days=40).verdict == "warn"
    assert yield_trend("GA-1", history[:4], LIMITS["elution_yield_ga68"], horizon_days=30) is None


def test_yield_trend_waits_for_history_spread_over_days() -> None:
    # Six elutions an hour apart with a falling yield: a slope of -24 %/day over 5 hours would
    # project a dead column in 30 days; with less than the 2-day minimum span there is no trend.
    start = ns("2026-01-10T08:00:00Z")
    morning = [YieldPoint(start + h * HOUR_NS, h + 1, 80.0 - 1.0 * h) for h in range(6)]
    assert yield_trend("GA-1", morning, LIMITS["elution_yield_ga68"], horizon_days=30) is None
    # The same points judged without the guard show what it prevents.
    unguarded = yield_trend("GA-1", morning, LIMITS["elution_yield_ga68"], horizon_days=30, min_span_days=0)
    assert unguarded is not None and unguarded.verdict == "warn" and unguarded.measured == 0.0


def test_ge68_breakthrough_hand_computed() -> None:
    # 1 GBq Ga-68 at end of elution; whole eluate re-measured 72 h later reads 10 Bq of Ga-68.
    # Ga-68 fed by 1 Bq of Ge-68 after 72 h: 1.000174 * (2^(-3/270.95) - 2^(-4320/67.83)) = 0.992527,
    # so Ge-68 at end of elution = 10 / 0.992527 = 10.0753 Bq = 1.00753e-6 % of 1 GBq -> pass.
    eoe = ns("2026-03-01T10:00:00Z")
    # The background (mean 1.0 Bq) is read with it: the reading is 11 Bq, the net 10 Bq.
    result = ge68_breakthrough(
        1e9, eoe, 11.0, eoe + 72 * HOUR_NS, LIMITS["ge68_breakthrough"], background_bq=BACKGROUND
    )
    assert result.inputs["net_bq"] == pytest.approx(10.0, rel=1e-9)
    assert result.inputs["ge68_eoe_bq"] == pytest.approx(10.0753, rel=1e-5)
    assert result.measured == pytest.approx(1.00753e-6, rel=1e-5)
    assert result.verdict == "pass"
    # 12 kBq re-measured -> 12090 Bq Ge-68 = 0.001209 % > 0.001 % -> fail.
    failed = ge68_breakthrough(
        1e9, eoe, 12e3 + 1.0, eoe + 72 * HOUR_NS, LIMITS["ge68_breakthrough"], background_bq=BACKGROUND
    )
    assert failed.measured == pytest.approx(0.0012090, rel=1e-4)
    assert failed.verdict == "fail" and failed.alarm


def test_ge68_breakthrough_exactly_at_the_limit_passes_and_aliquots_scale() -> None:
    # A 1 % aliquot of a 1 GBq eluate holds 10 MBq Ga-68; 0.001 % of that is 100 Bq Ge-68,
    # which after 48 h shows as 100 * T_Ge/(T_Ge - T_Ga) * (2^(-2/270.95) - 2^(-2880/67.83)) Bq, plus the
    # eluted 10 MBq Ga-68 itself decayed 42.5 half-lives: 10 MBq * 2^(-2880/67.83) = 1.65e-6 Bq (kept for exactness).
    eoe = ns("2026-03-01T10:00:00Z")
    equilibrium = 1 / (1 - 67.83 / (270.95 * 1440))  # = 1.000174
    reading = 100.0 * equilibrium * (2 ** (-2 / 270.95) - 2 ** (-2880 / 67.83)) + 10e6 * 2 ** (-2880 / 67.83) + 1.0
    result = ge68_breakthrough(
        1e9,
        eoe,
        reading,
        eoe + 48 * HOUR_NS,
        LIMITS["ge68_breakthrough"],
        background_bq=BACKGROUND,
        aliquot_fraction=0.01,
    )
    assert result.measured == pytest.approx(0.001, rel=1e-8)
    assert result.verdict == "pass"


def test_ge68_remeasured_too_early_is_rejected() -> None:
    eoe = ns("2026-03-01T10:00:00Z")
    with pytest.raises(QcInputError, match=r"re-measured 47.0 h .* Ph\. Eur\. 2464 requires >= 48 h"):
        ge68_breakthrough(1e9, eoe, 10.0, eoe + 47 * HOUR_NS, LIMITS["ge68_breakthrough"], background_bq=BACKGROUND)


@pytest.mark.parametrize(
    ("minutes", "verdict"), [(67.83, "pass"), (62.0, "pass"), (74.0, "pass"), (60.0, "fail"), (75.0, "fail")]
)
def test_ga68_half_life_identity(minutes: float, verdict: str) -> None:
    # Readings one assumed half-life apart that halve: T = dt * ln2 / ln(2) = dt.
    t0 = ns("2026-03-01T10:00:00Z")
    result = ga68_half_life(
        TimedReading(t0, 800e6), TimedReading(t0 + round(minutes * MINUTE_NS), 400e6), LIMITS["ga68_half_life"]
    )
    assert result.measured == pytest.approx(minutes, rel=1e-9)
    assert result.verdict == verdict


def test_ga68_half_life_needs_decaying_readings() -> None:
    t0 = ns("2026-03-01T10:00:00Z")
    with pytest.raises(QcInputError, match="did not decrease"):
        ga68_half_life(TimedReading(t0, 400e6), TimedReading(t0 + MINUTE_NS, 400e6), LIMITS["ga68_half_life"])


def test_mo99_ratio_and_the_time_the_limit_is_reached() -> None:
    # 1.85 MBq (50 uCi) Mo-99 in 37 GBq (1 Ci) Tc-99m: 1850 kBq / 37000 MBq = 0.05 kBq/MBq.
    # The ratio grows as 2^(t (1/6.0067 h - 1/65.9496 h)) = 2^(0.151318 t/h); it reaches 0.15 when
    # t = log2(0.15/0.05) / 0.151318 = 1.584963 / 0.151318 = 10.4744 h.
    t0 = ns("2026-03-01T06:00:00Z")
    result = mo99_breakthrough(1.85e6, 37e9, t0, LIMITS["mo99_breakthrough"], administration_ns=t0)
    assert result.measured == pytest.approx(0.05)
    assert result.verdict == "pass" and result.expected is None and result.deviation_pct is None
    assert result.limit_reached_ns is not None
    assert (result.limit_reached_ns - t0) / HOUR_NS == pytest.approx(10.4744, abs=1e-4)
    # At administration 8 h later: 0.05 * 2^(8 * 0.151318) = 0.11571 -> pass; 12 h later 0.17603 -> fail.
    later = mo99_breakthrough(1.85e6, 37e9, t0, LIMITS["mo99_breakthrough"], administration_ns=t0 + 8 * HOUR_NS)
    assert later.measured == pytest.approx(0.11571, abs=1e-5) and later.verdict == "pass"
    too_late = mo99_breakthrough(1.85e6, 37e9, t0, LIMITS["mo99_breakthrough"], administration_ns=t0 + 12 * HOUR_NS)
    assert too_late.measured == pytest.approx(0.17603, abs=1e-5) and too_late.verdict == "fail"
    # The expiry does not depend on when it is judged.
    assert later.limit_reached_ns == too_late.limit_reached_ns == result.limit_reached_ns
    # Exactly at that time the ratio is the limit, which passes.
    edge = mo99_breakthrough(1.85e6, 37e9, t0, LIMITS["mo99_breakthrough"], administration_ns=result.limit_reached_ns)
    assert edge.measured == pytest.approx(0.15, rel=1e-9) and edge.verdict == "pass"


def test_mo99_without_administration_time_is_judged_at_the_assay_and_reports_its_expiry() -> None:
    # The reviewer's case: 0.06 kBq/MBq at the assay is within the limit there and reaches 0.15 after
    # log2(0.15/0.06) / 0.151318 h^-1 = 1.321928 / 0.151318 = 8.7361 h: a pass, with that expiry.
    t0 = ns("2026-03-01T06:00:00Z")
    mo99_bq, tc99m_bq = 0.06 * 37e9 / 1e3, 37e9
    unknown = mo99_breakthrough(mo99_bq, tc99m_bq, t0, LIMITS["mo99_breakthrough"])
    assert unknown.verdict == "pass" and unknown.measured == pytest.approx(0.06, rel=1e-12)
    assert unknown.inputs["judged_at"] == "the assay time (no administration time given)"
    assert unknown.inputs["judged_time"] == "2026-03-01T06:00:00.000000Z"
    assert unknown.inputs["administration_time"] is None
    assert unknown.limit_reached_ns is not None
    assert (unknown.limit_reached_ns - t0) / HOUR_NS == pytest.approx(8.7361, abs=1e-4)
    assert unknown.detail.startswith("limit 0.15 kBq/MBq reached at 2026-03-01T14:44")
    # Administered 1 h after the assay: 0.06 * 2^0.151318 = 0.066635 -> pass, judged at administration.
    given = mo99_breakthrough(mo99_bq, tc99m_bq, t0, LIMITS["mo99_breakthrough"], administration_ns=t0 + HOUR_NS)
    assert given.verdict == "pass" and given.measured == pytest.approx(0.066635, abs=1e-5)
    assert given.inputs["judged_at"] == "administration time"


def test_mo99_edge_cases() -> None:
    assert ratio_limit_reached_after_s(0.0, 0.15, MO99, TC99M) == math.inf
    assert ratio_limit_reached_after_s(0.2, 0.15, MO99, TC99M) == 0.0
    with pytest.raises(QcInputError, match="does not outlive"):
        ratio_limit_reached_after_s(0.1, 0.15, TC99M, MO99)
    t0 = ns("2026-03-01T06:00:00Z")
    with pytest.raises(QcInputError, match="Tc-99m activity must be a positive"):
        mo99_breakthrough(1e3, 0.0, t0, LIMITS["mo99_breakthrough"])
    with pytest.raises(QcInputError, match="administration time .* is before Mo-99 assay time"):
        mo99_breakthrough(1e3, 1e9, t0, LIMITS["mo99_breakthrough"], administration_ns=t0 - HOUR_NS)
    clean = mo99_breakthrough(0.0, 1e9, t0, LIMITS["mo99_breakthrough"])
    assert clean.limit_reached_ns is None and clean.verdict == "pass"
    # Already beyond the limit at the assay: reached at the assay itself.
    over = mo99_breakthrough(0.2e-3 * 1e9, 1e9, t0, LIMITS["mo99_breakthrough"])
    assert over.verdict == "fail" and over.limit_reached_ns == t0


def test_generator_spec_rejects_an_unrelated_pair() -> None:
    with pytest.raises(QcInputError, match="Ga-68 is not a daughter of Mo-99"):
        GeneratorSpec("X", get_nuclide("Mo-99"), get_nuclide("Ga-68"), 1e9, 0)


@settings(max_examples=60, deadline=None)
@given(st.floats(min_value=1e-4, max_value=0.149), st.floats(min_value=1e6, max_value=1e11))
def test_mo99_closed_form_matches_the_decay_law(ratio: float, tc99m_bq: float) -> None:
    # Whatever the starting ratio, judging at the closed-form exceed time lands on the limit.
    t0 = ns("2026-03-01T06:00:00Z")
    mo99_bq = ratio * tc99m_bq / 1e3
    exceed_s = ratio_limit_reached_after_s(ratio, 0.15, MO99, TC99M)
    at_exceed = mo99_breakthrough(
        mo99_bq, tc99m_bq, t0, LIMITS["mo99_breakthrough"], administration_ns=t0 + round(exceed_s * 1e9)
    )
    assert at_exceed.measured == pytest.approx(0.15, rel=1e-7)
