"""Linearity by decay and by sleeves, judged against the KNOWN half-life, with simulated chambers.

Every expected number here is derived in the test, from first principles:

* true activity: the decay law A(t) = A0 * 2^(-t / T), with T(Tc-99m) = 6.0067 h, the DDEP value
  (Decay Data Evaluation Project, LNHB), written out below and not read from the library;
* reading: a response model R(A) of the chamber (power law, saturation, additive offset, noise),
  whose true error R/A - 1 at each point is computed here;
* judged deviation: the decay method normalises at the low-activity end. The mean of the last m
  readings decay-corrected with the true T is A_ref * g with g = mean_j (R_j / A_j), so each point
  is expected at g * A_i and its judged deviation is (R_i / A_i) / g - 1, a closed form of the
  true errors alone.

The series: 30 GBq Tc-99m, read every 6 h for 90 h (16 readings, down to 0.93 MBq, 15 half-lives),
from the highest clinical activity down to about the lowest.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable

import numpy as np
import pytest

from hotlab.controller.qc.calibrator_rules import TimedReading, linearity_decay, linearity_sleeve, sleeve_factors
from hotlab.controller.qc.limits import DEFAULT_LIMITS
from hotlab.controller.qc.result import QcInputError, QcResult
from hotlab.physics.nuclides import get_nuclide

TC99M = get_nuclide("Tc-99m")
T_HALF_S = 6.0067 * 3600.0  # DDEP 6.0067 (10) h
T_HALF_UNC_S = 0.0010 * 3600.0
HOUR_NS = 3_600_000_000_000
START_NS = 1_772_409_600_000_000_000  # 2026-03-02T00:00:00Z
STEP_H = 6
COUNT = 16
TOP_BQ = 30e9
LIMIT = DEFAULT_LIMITS["linearity"]  # +-5 %, fail only

Response = Callable[[float], float]


def true_activity(hours: float, top_bq: float = TOP_BQ) -> float:
    return top_bq * 2.0 ** (-hours * 3600.0 / T_HALF_S)


HOURS = [i * STEP_H for i in range(COUNT)]
ACTIVITY = [true_activity(h) for h in HOURS]
BOTTOM_BQ = ACTIVITY[-1]


def series(response: Response) -> list[TimedReading]:
    return [TimedReading(START_NS + h * HOUR_NS, response(a)) for h, a in zip(HOURS, ACTIVITY)]


def judged_deviations(ratios: list[float], normalisation: int) -> list[float]:
    """(R_i / A_i) / g - 1 in %, g the mean response ratio of the last `normalisation` readings."""
    g = statistics.fmean(ratios[-normalisation:])
    return [(r / g - 1.0) * 100.0 for r in ratios]


def power_law(top_error: float) -> Response:
    """R = A (A / A_ref)^k, exact at the bottom of the series (A_ref = BOTTOM_BQ), `top_error` at 30 GBq."""
    k = math.log(1.0 + top_error) / math.log(TOP_BQ / BOTTOM_BQ)
    return lambda a: a * (a / BOTTOM_BQ) ** k


def saturation(top_error: float) -> Response:
    """R = A / (1 + A / A_sat), with A_sat set so that the reading at 30 GBq is `top_error` (< 0) off."""
    a_sat = TOP_BQ * (1.0 + top_error) / -top_error
    return lambda a: a / (1.0 + a / a_sat)


def offset(b_bq: float) -> Response:
    """R = A + b: an unsubtracted background or a drifted zero."""
    return lambda a: a + b_bq


def assert_deviations(result: QcResult, expected_pct: list[float]) -> None:
    got = [point["deviation_pct"] for point in result.inputs["points"]]
    assert got == pytest.approx(expected_pct, rel=1e-9, abs=1e-9)
    worst = max(range(len(expected_pct)), key=lambda i: abs(expected_pct[i]))
    assert result.inputs["worst_point"] == worst + 1
    assert result.deviation_pct == pytest.approx(expected_pct[worst], rel=1e-9, abs=1e-9)


# (model, chamber response, expected verdict). The errors named in the ids are relative to the TRUE
# activity; the judged deviations differ from them by the normalisation end's own error, which the
# test computes with `judged_deviations`.
MODELS = [
    ("power law, +17.6 % at 30 GBq (the review's case 1)", power_law(0.176), "fail"),
    ("saturation, -12 % at 30 GBq (the review's case 2)", saturation(-0.12), "fail"),
    ("power law, +8 % at 30 GBq (the review's case 3)", power_law(0.08), "fail"),
    ("saturation, -8 % at 30 GBq", saturation(-0.08), "fail"),
    ("power law, +3 % at 30 GBq", power_law(0.03), "pass"),
    ("saturation, -4 % at 30 GBq", saturation(-0.04), "pass"),
    # 150 kBq reads the bottom (0.93 MBq) 16.2 % high; 20 kBq at most 2.2 % high.
    ("offset +150 kBq", offset(150e3), "fail"),
    ("offset +20 kBq", offset(20e3), "pass"),
]


@pytest.mark.parametrize(("model", "response", "verdict"), MODELS, ids=[m[0] for m in MODELS])
def test_each_response_model_is_judged_point_by_point(model: str, response: Response, verdict: str) -> None:
    ratios = [response(a) / a for a in ACTIVITY]
    expected = judged_deviations(ratios, normalisation=3)
    result = linearity_decay(TC99M, series(response), LIMIT)
    assert_deviations(result, expected)
    assert result.verdict == verdict
    # The verdict follows from the hand-computed worst deviation and the +-5 % limit.
    assert (max(abs(d) for d in expected) <= 5.0) == (verdict == "pass")


def test_the_review_cases_in_numbers() -> None:
    # Case 1: k = ln 1.176 / ln(30 GBq / 0.926207 MBq) = 0.0156099; the last three readings are read
    # (A_j / A_bottom)^k = 1.021851, 1.010867, 1 times the truth -> g = 1.010906, so the 30 GBq
    # reading is judged 1.176 / 1.010906 - 1 = +16.331 %.
    k = math.log(1.176) / math.log(TOP_BQ / BOTTOM_BQ)
    g = statistics.fmean((a / BOTTOM_BQ) ** k for a in ACTIVITY[-3:])
    case1 = linearity_decay(TC99M, series(power_law(0.176)), LIMIT)
    assert case1.deviation_pct == pytest.approx((1.176 / g - 1.0) * 100.0, rel=1e-9)
    assert case1.deviation_pct == pytest.approx(16.331, abs=1e-3)
    # Case 2: A_sat = 30 GBq * 0.88 / 0.12 = 220 GBq; the low end reads at most 0.0017 % low
    # (g = 0.9999902), so the top is judged 0.88 / g - 1 = -11.999 %.
    case2 = linearity_decay(TC99M, series(saturation(-0.12)), LIMIT)
    assert case2.deviation_pct == pytest.approx(-11.999, abs=1e-3)
    # Case 3: +8 % at the top (k = 0.0074104; g = 1.005153) -> judged 1.08 / g - 1 = +7.446 %: beyond +-5 %.
    case3 = linearity_decay(TC99M, series(power_law(0.08)), LIMIT)
    assert case3.deviation_pct == pytest.approx(7.446, abs=1e-3)
    assert [case1.verdict, case2.verdict, case3.verdict] == ["fail", "fail", "fail"]


def test_a_linear_chamber_with_noise_passes() -> None:
    # Reading noise of 1 % standard deviation, fixed seed: the judged deviations are (1 + e_i) / mean(1 + e_last3) - 1.
    noise = np.random.default_rng(181).normal(0.0, 0.01, COUNT)
    ratios = [1.0 + float(e) for e in noise]
    readings = [TimedReading(START_NS + h * HOUR_NS, a * r) for h, a, r in zip(HOURS, ACTIVITY, ratios)]
    expected = judged_deviations(ratios, normalisation=3)
    assert max(abs(d) for d in expected) < 5.0
    result = linearity_decay(TC99M, readings, LIMIT)
    assert_deviations(result, expected)
    assert result.verdict == "pass"
    tail = ratios[-3:]
    assert result.inputs["normalisation"]["standard_error_pct"] == pytest.approx(
        statistics.stdev(tail) / math.sqrt(3) / statistics.fmean(tail) * 100.0, rel=1e-9
    )


def test_a_noisy_normalisation_end_is_averaged_not_trusted() -> None:
    # A linear chamber whose last three readings are -2.5 %, +1.0 %, +4.0 % off (noise at the low end).
    # Mean of three: g = 1.0083333, the -2.5 % reading is judged 0.975 / 1.0083333 - 1 = -3.306 %,
    # every exact reading 1 / 1.0083333 - 1 = -0.826 %: pass.
    # Last reading alone: g = 1.04, the -2.5 % reading is judged 0.975 / 1.04 - 1 = -6.25 %: fail,
    # a linear chamber failed by the noise of one reading.
    ratios = [1.0] * (COUNT - 3) + [0.975, 1.010, 1.040]
    readings = [TimedReading(START_NS + h * HOUR_NS, a * r) for h, a, r in zip(HOURS, ACTIVITY, ratios)]
    averaged = linearity_decay(TC99M, readings, LIMIT)
    assert_deviations(averaged, judged_deviations(ratios, normalisation=3))
    assert averaged.deviation_pct == pytest.approx(-3.306, abs=1e-3)
    assert averaged.verdict == "pass"
    single = linearity_decay(TC99M, readings, LIMIT, normalisation_points=1)
    assert_deviations(single, judged_deviations(ratios, normalisation=1))
    assert single.deviation_pct == pytest.approx(-6.25, abs=1e-9)
    assert single.verdict == "fail"
    # The spread of the normalisation readings is reported: stdev(0.975, 1.01, 1.04) / sqrt 3 / mean.
    assert averaged.inputs["normalisation"]["standard_error_pct"] == pytest.approx(1.8627, abs=1e-4)
    assert single.inputs["normalisation"]["standard_error_pct"] is None


def test_the_result_names_worst_point_normalisation_each_deviation_and_limit_source() -> None:
    result = linearity_decay(TC99M, series(saturation(-0.12)), LIMIT)
    payload = json.loads(json.dumps(result.to_message("lab1", "hotcell", "crc-1").payload, allow_nan=False))
    inputs = payload["inputs"]
    assert payload["test"] == "linearity" and payload["verdict"] == "fail"
    assert payload["limit"] == "pass |dev| <= 5 %, fail > 5 %"
    assert "TG-181" in payload["limit_source"] and "N42.13-2004" in payload["limit_source"]
    assert "not checked" in payload["limit_source"]
    assert inputs["worst_point"] == 1 and payload["measured"] == inputs["points"][0]["activity_bq"]
    assert inputs["normalisation"]["points"] == [14, 15, 16]
    assert [p["normalisation"] for p in inputs["points"]] == [False] * 13 + [True] * 3
    assert inputs["normalisation"]["time_ns"] == START_NS + 90 * HOUR_NS
    assert len(inputs["points"]) == COUNT and all("expected_bq" in p for p in inputs["points"])
    assert inputs["half_life_source"].startswith("DDEP")
    assert "point 1" in payload["detail"] and "points 14-16" in payload["detail"]
    # Saturation: -6.39 % at 6 h (15.0 GBq) fails, -3.30 % at 12 h (7.5 GBq) passes, so the readings
    # are within the limit from the bottom up to the 12 h reading.
    response = saturation(-0.12)
    assert inputs["linear_range_bq"] == pytest.approx([response(ACTIVITY[-1]), response(ACTIVITY[2])], rel=1e-12)


def test_the_fitted_half_life_is_a_diagnostic_that_shows_what_a_free_fit_absorbs() -> None:
    # ln R = (1 + k) ln A - k ln A_ref: a power-law chamber decays exactly log-linearly with T / (1 + k).
    # A free fit sees no residual at all, which is why it cannot judge linearity; against the known T
    # the slope error is (1 / (1 + k) - 1) and, over the 90 h span, the first reading is
    # 2^(90 h * (1 + k) / T - 90 h / T) - 1 = (30 GBq / 0.926 MBq)^k - 1 = +17.6 % off the last one.
    k = math.log(1.176) / math.log(TOP_BQ / BOTTOM_BQ)
    fit = linearity_decay(TC99M, series(power_law(0.176)), LIMIT).inputs["half_life_fit"]
    assert fit["judged"] is False
    assert fit["half_life_s"] == pytest.approx(T_HALF_S / (1.0 + k), rel=1e-9)
    assert fit["difference_pct"] == pytest.approx((1.0 / (1.0 + k) - 1.0) * 100.0, rel=1e-7)
    assert fit["end_to_end_deviation_pct"] == pytest.approx(17.6, rel=1e-7)
    assert fit["span_half_lives"] == pytest.approx(90.0 * 3600.0 / T_HALF_S, rel=1e-12)
    assert fit["degrees_of_freedom"] == COUNT - 2
    # No residual: the fit's own uncertainty vanishes and the library's 0.0010 h is what remains.
    assert fit["fit_sigma_s"] < 1e-6 * T_HALF_S
    assert fit["combined_sigma_s"] == pytest.approx(T_HALF_UNC_S, rel=1e-6)


def test_f18_series_is_judged_against_the_f18_half_life() -> None:
    # F-18 (ENSDF 109.77 min) read every 112 min, halving each time: against the true activity the
    # response ratio is 2^(k * (112 / 109.77 - 1)) = 2^(0.0203151 k), k = 0..4. Normalised at the
    # last three: g = mean(2^0.04063, 2^0.06095, 2^0.08126) = 1.043239, so the first reading is
    # judged 1 / g - 1 = -4.143 % (pass). The fit finds 112 min (+2.0315 %); over the 448 min span
    # that is 2^(448 / 112 - 448 / 109.77) - 1 = -5.477 % first reading vs last: reported, not judged.
    minute_ns = 60_000_000_000
    readings = [TimedReading(START_NS + k * 112 * minute_ns, 2e9 / 2**k) for k in range(5)]
    ratios = [2.0 ** (k * (112.0 / 109.77 - 1.0)) for k in range(5)]
    result = linearity_decay(get_nuclide("F-18"), readings, LIMIT)
    assert_deviations(result, judged_deviations(ratios, normalisation=3))
    assert result.deviation_pct == pytest.approx(-4.143, abs=1e-3)
    assert result.verdict == "pass"
    fit = result.inputs["half_life_fit"]
    assert fit["half_life_s"] == pytest.approx(112.0 * 60.0, rel=1e-9)
    assert fit["difference_pct"] == pytest.approx(2.0315, abs=1e-4)
    assert fit["end_to_end_deviation_pct"] == pytest.approx(-5.477, abs=1e-3)


def test_fit_uncertainty_from_the_residuals() -> None:
    # Three points at 0, T, 2T reading 1000, 560, 250 MBq: ln-readings y = (6.9078, 6.3279, 5.5215).
    # Least squares: slope b = (y3 - y1) / 2T, residuals (r, -2r, r) with r = (y1 + y3 - 2 y2) / 6
    # = -0.037776; s^2 = 6 r^2 / (n - 2) = 0.0085623, Sxx = 2 T^2, u(b) = s / (T sqrt 2),
    # u(T_fit) = T_fit * u(b) / |b|.
    y = [math.log(v) for v in (1000.0, 560.0, 250.0)]
    slope = (y[2] - y[0]) / (2 * T_HALF_S)
    r = (y[0] + y[2] - 2 * y[1]) / 6.0
    slope_sigma = math.sqrt(6 * r * r / 1.0) / (T_HALF_S * math.sqrt(2.0))
    fitted = math.log(2.0) / -slope
    readings = [TimedReading(START_NS + i * int(T_HALF_S * 1e9), v * 1e6) for i, v in enumerate((1000, 560, 250))]
    fit = linearity_decay(TC99M, readings, LIMIT, normalisation_points=1).inputs["half_life_fit"]
    assert fit["half_life_s"] == pytest.approx(fitted, rel=1e-9)
    assert fit["fit_sigma_s"] == pytest.approx(fitted * slope_sigma / -slope, rel=1e-6)
    assert fit["difference_in_sigma"] == pytest.approx(
        (fitted - T_HALF_S) / math.hypot(fitted * slope_sigma / -slope, T_HALF_UNC_S), rel=1e-6
    )


def test_decay_series_input_errors() -> None:
    good = series(lambda a: a)
    with pytest.raises(QcInputError, match="at least 3"):
        linearity_decay(TC99M, good[:2], LIMIT)
    with pytest.raises(QcInputError, match="between 1 and 2 readings"):
        linearity_decay(TC99M, good[:3], LIMIT)  # the default 3 would leave nothing to judge
    with pytest.raises(QcInputError, match="between 1 and 15 readings"):
        linearity_decay(TC99M, good, LIMIT, normalisation_points=0)
    with pytest.raises(QcInputError, match="different times"):
        linearity_decay(TC99M, [TimedReading(START_NS, v) for v in (3e9, 2e9, 1e9)], LIMIT, normalisation_points=1)
    with pytest.raises(QcInputError, match="positive finite"):
        linearity_decay(TC99M, [*good[:-1], TimedReading(good[-1].time_ns, 0.0)], LIMIT)


# Sleeve method. Sleeves pass a fraction TAU of the photons: the chamber current is that of TAU * A.
# The chamber saturates (-12 % at 30 GBq, A_sat = 220 GBq), so an unshielded reference would be wrong.
TAU = {"A": 0.5, "B": 0.1, "C": 0.02}
CHAMBER = saturation(-0.12)
SETUP_H = 24  # the sleeves are read with the decay series, 24 h in (1.877 GBq in the vial)


def _setup_factors() -> dict[str, float]:
    sleeves = [
        TimedReading(START_NS + SETUP_H * HOUR_NS, CHAMBER(tau * true_activity(SETUP_H)), s) for s, tau in TAU.items()
    ]
    return sleeve_factors(TC99M, series(CHAMBER), sleeves, DEFAULT_LIMITS["linearity_sleeve"])


def test_sleeve_factors_come_from_the_decay_series_low_end() -> None:
    # The series implies g * A(t) at any time (g = mean response ratio of its last three readings),
    # so factor = g * A / R(TAU * A) = g * (1 + TAU * A / A_sat) / TAU: right even though the
    # unshielded chamber reads 30 GBq 12 % low.
    a_sat = TOP_BQ * 0.88 / 0.12
    g = statistics.fmean(CHAMBER(a) / a for a in ACTIVITY[-3:])
    a = true_activity(SETUP_H)
    expected = {s: g * (1.0 + tau * a / a_sat) / tau for s, tau in TAU.items()}
    assert _setup_factors() == pytest.approx(expected, rel=1e-9)


def test_a_sleeve_read_outside_the_verified_linear_range_is_refused() -> None:
    # At the start sleeve A passes 15 GBq, which this chamber reads as 14.04 GBq (6.4 % low); the series passes
    # only up to its 12 h reading (7.26 GBq), so a factor taken there would carry the saturation.
    early = [TimedReading(START_NS, CHAMBER(0.5 * TOP_BQ), "A")]
    with pytest.raises(QcInputError, match="sleeve A: calibration reading 14.04 GBq is outside the range"):
        sleeve_factors(TC99M, series(CHAMBER), early, DEFAULT_LIMITS["linearity_sleeve"])


def test_sleeve_test_is_judged_against_the_most_attenuating_sleeve() -> None:
    # Test run: a fresh 20 GBq vial, unshielded at t1, sleeves 2, 4, 6 min later. Each reading is
    # sleeve-corrected, decay-corrected back to t1 (x 2^(dt / T)), and compared with sleeve C's.
    factors = _setup_factors()
    t1 = START_NS + 72 * HOUR_NS
    minutes = {"A": 2, "B": 4, "C": 6}
    unshielded = TimedReading(t1, CHAMBER(20e9))
    sleeves = [
        TimedReading(t1 + m * 60_000_000_000, CHAMBER(TAU[s] * true_activity(m / 60, 20e9)), s)
        for s, m in minutes.items()
    ]
    at_t1 = {"unshielded": CHAMBER(20e9)} | {
        s.label: s.activity_bq * factors[s.label] * 2.0 ** (minutes[s.label] * 60 / T_HALF_S) for s in sleeves
    }
    expected = {label: (value / at_t1["C"] - 1.0) * 100.0 for label, value in at_t1.items()}
    result = linearity_sleeve(TC99M, factors, unshielded, sleeves, DEFAULT_LIMITS["linearity_sleeve"])
    assert result.inputs["deviation_pct"] == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert result.inputs["normalisation"]["labels"] == ["C"]
    # The unshielded 20 GBq reading is 20 / (1 + 20 / 220) = 0.91667 of the truth; sleeve C passes
    # 0.4 GBq, read 0.18 % low, and its factor is 0.016 % high, so C stands for 0.99834 of the truth
    # and the unshielded reading is judged 0.91667 / 0.99834 - 1 = -8.18 %.
    assert max(expected, key=lambda label: abs(expected[label])) == "unshielded"
    assert result.deviation_pct == pytest.approx(expected["unshielded"], rel=1e-9)
    assert result.deviation_pct == pytest.approx(-8.18, abs=0.01)
    assert result.verdict == "fail"


def test_sleeve_test_of_a_linear_chamber_passes_and_names_unknown_sleeves() -> None:
    linear_series = series(lambda a: a)
    a = true_activity(SETUP_H)
    setup = [TimedReading(START_NS + SETUP_H * HOUR_NS, tau * a, s) for s, tau in TAU.items()]
    factors = sleeve_factors(TC99M, linear_series, setup, DEFAULT_LIMITS["linearity_sleeve"])
    assert factors == pytest.approx({s: 1.0 / tau for s, tau in TAU.items()}, rel=1e-12)
    t1 = START_NS + 72 * HOUR_NS
    result = linearity_sleeve(
        TC99M,
        factors,
        TimedReading(t1, 20e9),
        [TimedReading(t1, tau * 20e9, s) for s, tau in TAU.items()],
        DEFAULT_LIMITS["linearity_sleeve"],
    )
    assert result.verdict == "pass" and abs(result.deviation_pct) < 1e-9
    with pytest.raises(QcInputError, match="no calibration factor for sleeve 'D'"):
        linearity_sleeve(TC99M, factors, TimedReading(t1, 20e9), [TimedReading(t1, 1e9, "D")], LIMIT)


def test_a_series_that_does_not_decay_is_judged_and_its_fit_only_reported() -> None:
    """The half-life fit is an unjudged diagnostic: a slope >= 0 is noted in it, never an exception."""
    good = series(lambda a: a)
    rising = [TimedReading(p.time_ns, 1e6 * (i + 1)) for i, p in enumerate(good)]
    result = linearity_decay(TC99M, rising, LIMIT)
    fit = result.inputs["half_life_fit"]
    assert fit["judged"] is False and fit["half_life_s"] is None
    assert "do not decay" in fit["note"]
    # ln(1e6 (i + 1)) against time rises: the least-squares slope is positive.
    t_s = [(p.time_ns - rising[0].time_ns) / 1e9 for p in rising]
    y = [math.log(p.activity_bq) for p in rising]
    t_mean, y_mean = sum(t_s) / len(t_s), sum(y) / len(y)
    slope = sum((t - t_mean) * (v - y_mean) for t, v in zip(t_s, y)) / sum((t - t_mean) ** 2 for t in t_s)
    assert fit["fitted_slope_per_s"] == pytest.approx(slope, rel=1e-9) and slope > 0
    assert fit["degrees_of_freedom"] == len(rising) - 2
    # The verdict is judged from the per-point deviations as for any series: far off, so a failure.
    assert result.verdict == "fail"
