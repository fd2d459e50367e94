"""Dosage check (10 CFR 35.63(d), +-20 %): F-18 half-life 109.77 min (ENSDF)."""

from __future__ import annotations

from datetime import datetime

import pytest

from hotlab.controller.qc.dosage import dosage_check
from hotlab.controller.qc.limits import DEFAULT_LIMITS as LIMITS
from hotlab.controller.qc.result import QcInputError
from hotlab.physics.nuclides import get_nuclide

F18 = get_nuclide("F-18")
T0 = int(datetime.fromisoformat("2026-03-01T08:00:00Z").timestamp()) * 1_000_000_000
ONE_HOUR_LATER = T0 + 3_600_000_000_000


@pytest.mark.parametrize(
    ("measured_mbq", "deviation", "verdict"),
    [
        # 60 min of F-18 decay: 2^(-60/109.77) = 0.684633.
        (550.0, 1.7698, "pass"),  # 550 * 0.684633 = 376.548 MBq vs 370: +1.770 %
        (430.0, -20.4346, "fail"),  # 430 * 0.684633 = 294.392 MBq: -20.435 %
        (440.0, -18.5842, "pass"),  # 440 * 0.684633 = 301.238 MBq: -18.584 %
    ],
)
def test_fdg_dose_decay_corrected_to_administration(measured_mbq: float, deviation: float, verdict: str) -> None:
    result = dosage_check(F18, measured_mbq * 1e6, T0, 370e6, ONE_HOUR_LATER, LIMITS["dosage"])
    assert result.deviation_pct == pytest.approx(deviation, abs=1e-3)
    assert result.verdict == verdict


def test_exactly_twenty_percent_passes() -> None:
    # A dose that will be exactly 444 MBq (1.2 * 370) at administration: 444 / 0.684633 MBq now.
    result = dosage_check(F18, 444e6 / 2 ** (-60 / 109.77), T0, 370e6, ONE_HOUR_LATER, LIMITS["dosage"])
    assert result.deviation_pct == pytest.approx(20.0, abs=1e-9)
    assert result.verdict == "pass"


def test_bad_dosage_inputs() -> None:
    with pytest.raises(QcInputError, match="measured dose activity must be a positive"):
        dosage_check(F18, -1.0, T0, 370e6, ONE_HOUR_LATER, LIMITS["dosage"])
    with pytest.raises(QcInputError, match="administration time .* is before dose measurement time"):
        dosage_check(F18, 400e6, ONE_HOUR_LATER, 370e6, T0, LIMITS["dosage"])
