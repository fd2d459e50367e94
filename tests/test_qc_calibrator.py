"""Dose-calibrator rules against hand computations from evaluated half-lives.

Linearity (decay and sleeve methods) has its own file, tests/test_qc_linearity.py.

Half-lives used in the hand computations (the library's evaluated values):
Cs-137 30.08 y (ENSDF), Co-57 271.81 d (DDEP), Tc-99m 6.0067 h (DDEP), F-18 109.77 min (ENSDF);
1 y = 365.24219 d (tropical year, as DDEP/NNDC convert).
"""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from hotlab.controller.qc.calibrator_rules import (
    ReferenceSource,
    TimedReading,
    accuracy,
    background,
    constancy,
    geometry,
)
from hotlab.controller.qc.limits import DEFAULT_LIMITS as LIMITS
from hotlab.controller.qc.result import QcInputError
from hotlab.physics.nuclides import get_nuclide

TC99M_HALF_LIFE_NS = 21_624_120_000_000  # 6.0067 h


def ns(text: str) -> int:
    moment = datetime.fromisoformat(text)
    return int(moment.timestamp()) * 1_000_000_000


CS137 = ReferenceSource("CS-137-A", get_nuclide("Cs-137"), 7.4e6, ns("2016-01-01T00:00:00Z"), "PTB 1234", 3.0)


def test_constancy_cs137_ten_years_after_the_certificate() -> None:
    # 2016-01-01 -> 2026-01-01 is 3653 d (leap days 2016, 2020, 2024) = 3653 / 365.24219 = 10.00158 y.
    # Decay factor 2^(-10.00158 / 30.08) = 2^(-0.332499) = 0.794159; expected 7.4 MBq * 0.794159 = 5.87678 MBq.
    result = constancy(CS137, [5.80e6], ns("2026-01-01T00:00:00Z"), LIMITS["constancy"])
    assert result.expected == pytest.approx(5.87678e6, rel=1e-5)
    # (5.80 / 5.87678 - 1) * 100 = -1.3065 %
    assert result.deviation_pct == pytest.approx(-1.3065, abs=1e-3)
    assert result.verdict == "pass" and not result.alarm
    assert result.inputs["half_life_source"].startswith("ENSDF")
    assert result.inputs["elapsed_s"] == 3653 * 86400
    # Half-life uncertainty carried to the expected value: ln2 * dt * u(T) / T^2 = 0.6931 * 10.00158 * 0.09 / 30.08^2
    # = 6.8957e-4, i.e. 0.068957 % of the expected activity.
    assert result.inputs["expected_half_life_sigma_pct"] == pytest.approx(0.068957, abs=1e-6)


def test_constancy_warn_and_fail_bands() -> None:
    when = ns("2026-01-01T00:00:00Z")
    expected = constancy(CS137, [1.0], when, LIMITS["constancy"]).expected
    verdicts = [
        constancy(CS137, [expected * f], when, LIMITS["constancy"]).verdict for f in (1.05, 1.0501, 0.90, 0.8999)
    ]
    assert verdicts == ["pass", "warn", "warn", "fail"]


def test_constancy_before_the_reference_date_is_rejected() -> None:
    with pytest.raises(QcInputError, match="before reference date of source CS-137-A"):
        constancy(CS137, [7.4e6], ns("2015-12-31T00:00:00Z"), LIMITS["constancy"])


def test_constancy_rejects_negative_reading() -> None:
    with pytest.raises(QcInputError, match="finite number >= 0"):
        constancy(CS137, [-1.0], ns("2026-01-01T00:00:00Z"), LIMITS["constancy"])


def test_accuracy_co57_mean_of_readings() -> None:
    # Co-57 185 MBq (5 mCi) certified 2025-06-01; measured 2025-11-25 = 177 d later.
    # 2^(-177 / 271.81) = 0.636755 -> expected 117.800 MBq. Mean of 125, 126, 127 = 126 MBq: +6.961 % -> warn.
    source = ReferenceSource("CO-57-REF", get_nuclide("Co-57"), 185e6, ns("2025-06-01T00:00:00Z"))
    result = accuracy(source, [125e6, 126e6, 127e6], ns("2025-11-25T00:00:00Z"), LIMITS["accuracy"])
    assert result.expected == pytest.approx(117.800e6, rel=1e-5)
    assert result.measured == pytest.approx(126e6)
    assert result.deviation_pct == pytest.approx(6.961, abs=1e-3)
    assert result.verdict == "warn"
    assert result.inputs["reading_stdev_pct"] == pytest.approx(1 / 126 * 100)


def test_geometry_syringe_vs_reference_vial() -> None:
    tc = get_nuclide("Tc-99m")
    t0 = ns("2026-03-02T08:00:00Z")
    # 10 mL vial reads 370 MBq; the same activity in a 3 mL syringe read one half-life later shows
    # 197.5 MBq -> 395 MBq at the reference time: +6.757 % -> warn, correction factor 370/395 = 0.93671.
    result = geometry(
        tc,
        TimedReading(t0, 370e6, "vial 10 mL"),
        [TimedReading(t0, 372e6, "vial 5 mL"), TimedReading(t0 + TC99M_HALF_LIFE_NS, 197.5e6, "syringe 3 mL")],
        LIMITS["geometry"],
    )
    assert result.deviation_pct == pytest.approx(6.757, abs=1e-3)
    assert result.verdict == "warn"
    assert result.inputs["correction_factors"]["syringe 3 mL"] == pytest.approx(0.93671, abs=1e-5)


@pytest.mark.parametrize(
    ("reading", "verdict"),
    [(0.0, "pass"), (37e3, "pass"), (50e3, "warn"), (370e3, "warn"), (-400e3, "fail"), (1e6, "fail")],
)
def test_background(reading: float, verdict: str) -> None:
    result = background(reading, ns("2026-03-02T08:00:00Z"), LIMITS["background"])
    assert result.verdict == verdict
    # The ideal background is zero: no expected value and no deviation; the magnitude is judged.
    assert result.expected is None and result.deviation_pct is None
    assert result.value_judged == abs(reading)


def test_result_message_is_complete_json() -> None:
    result = constancy(CS137, [6.5e6], ns("2026-01-01T00:00:00Z"), LIMITS["constancy"])
    message = result.to_message("lab1", "hotcell", "calib1")
    assert message.kind == "qc_result"
    assert message.topic == "hotlab/lab1/hotcell/calib1/qc"
    payload = json.loads(json.dumps(message.payload, allow_nan=False))
    assert payload["verdict"] == "fail" and payload["alarm"] is True
    assert payload["limit"] == "pass |dev| <= 5 %, warn <= 10 %, fail > 10 %"
    assert payload["limit_values"] == {"kind": "tolerance", "unit": "%", "warn": 5.0, "fail": 10.0}
    assert "TG-181" in payload["limit_source"]
    assert payload["inputs"]["reference_bq"] == 7.4e6
