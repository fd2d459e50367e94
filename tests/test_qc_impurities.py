"""Lu-177m, Sr-82/Sr-85, Ge-68 with its background, and the station's own breakthrough figure.

Expected values come from the decay law written out here with the library half-lives:
Lu-177 6.6443 d, Lu-177m 160.44 d, Sr-82 25.35 d, Sr-85 64.850 d, Rb-82 1.2575 min.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

import pytest

from hotlab.controller.qc.generator_rules import (
    CURRIE_K,
    detectable_level,
    ge68_breakthrough,
    ge68_station_breakthrough,
    lu177m_ratio,
    strontium_breakthrough,
)
from hotlab.controller.qc.limits import DEFAULT_LIMITS as LIMITS
from hotlab.controller.qc.result import QcInputError

DAY_NS = 86_400 * 10**9
HOUR_NS = 3_600 * 10**9
T0 = 1_772_352_000 * 10**9  # 2026-03-01T08:00:00Z
LN2 = math.log(2.0)
LAMBDA_LU177 = LN2 / 6.6443  # per day
LAMBDA_LU177M = LN2 / 160.44


def test_lu177m_ratio_grows_and_the_limit_time_is_the_closed_form() -> None:
    # 0.02 % at the assay: ratio(t) = 0.02 * exp((lambda_177 - lambda_177m) t), t in days.
    r0 = 0.02
    result = lu177m_ratio(r0 / 100 * 7.4e9, 7.4e9, T0, LIMITS["lu177m_ratio"])
    assert result.measured == pytest.approx(r0, rel=1e-12) and result.verdict == "pass"
    assert result.expected is None and result.deviation_pct is None and result.unit == "%"
    # Reaches 0.05 % when t = ln(0.05/0.02) / (lambda_177 - lambda_177m) days.
    t_days = math.log(0.05 / r0) / (LAMBDA_LU177 - LAMBDA_LU177M)
    assert result.limit_reached_ns is not None
    assert (result.limit_reached_ns - T0) / DAY_NS == pytest.approx(t_days, rel=1e-9)
    # Used 10 d later: 0.02 * exp(10 (lambda_177 - lambda_177m)) -> fail.
    used = lu177m_ratio(r0 / 100 * 7.4e9, 7.4e9, T0, LIMITS["lu177m_ratio"], use_ns=T0 + 10 * DAY_NS)
    assert used.measured == pytest.approx(r0 * math.exp(10 * (LAMBDA_LU177 - LAMBDA_LU177M)), rel=1e-9)
    assert used.verdict == "fail" and used.limit_reached_ns == result.limit_reached_ns
    assert used.inputs["use_time"] == "2026-03-11T08:00:00.000000Z"


def test_strontium_breakthrough_is_judged_at_end_of_elution() -> None:
    # 1.85 GBq Rb-82 eluted; 1 h later the eluate holds 20 kBq Sr-82 and 150 kBq Sr-85.
    # Back to end of elution: A_eoe = A * 2^(dt/T). Ratio = (A_eoe / 1e3 kBq) / (1850 MBq).
    sr82, sr85 = strontium_breakthrough(
        1.85e9, T0, 20e3, 150e3, T0 + HOUR_NS, LIMITS["sr82_breakthrough"], LIMITS["sr85_breakthrough"]
    )
    sr82_eoe = 20e3 * 2 ** ((1 / 24) / 25.35)
    sr85_eoe = 150e3 * 2 ** ((1 / 24) / 64.850)
    assert sr82.measured == pytest.approx(sr82_eoe / 1e3 / 1850, rel=1e-9)  # 0.01081 -> pass (<= 0.02)
    assert sr85.measured == pytest.approx(sr85_eoe / 1e3 / 1850, rel=1e-9)  # 0.08109 -> pass (<= 0.2)
    assert (sr82.test, sr85.test, sr82.verdict, sr85.verdict) == (
        "sr82_breakthrough",
        "sr85_breakthrough",
        "pass",
        "pass",
    )
    assert sr82.time_ns == T0 and sr82.unit == "kBq/MBq"
    high, _ = strontium_breakthrough(
        1.85e9, T0, 40e3, 0.0, T0 + HOUR_NS, LIMITS["sr82_breakthrough"], LIMITS["sr85_breakthrough"]
    )
    assert high.verdict == "fail"  # 40 kBq / 1850 MBq = 0.0216 > 0.02


def test_the_detectable_level_is_currie_from_the_background_spread() -> None:
    readings = [2.0, 2.6, 1.7, 2.3, 2.4]
    level = detectable_level(readings)
    expected = 1.645 * statistics.stdev(readings) * math.sqrt(1 + 1 / len(readings))
    assert CURRIE_K == 1.645 and level.level_bq == pytest.approx(expected, rel=1e-12)
    assert detectable_level(readings, minimum_bq=5.0).level_bq == 5.0
    assert detectable_level([2.0], minimum_bq=3.0).level_bq == 3.0
    with pytest.raises(QcInputError, match="one background reading has no spread"):
        detectable_level([2.0])
    with pytest.raises(QcInputError, match="needs the background measured with it"):
        detectable_level([])
    # A display that rounds the empty chamber to 0.000 gives no spread: L_C would be 0 and any reading "below
    # 0 %" a pass. It needs a configured minimum, like one reading.
    with pytest.raises(QcInputError, match="no spread to set a detectable level"):
        detectable_level([0.0, 0.0, 0.0])
    assert detectable_level([0.0, 0.0], minimum_bq=3.0).level_bq == 3.0


def test_ge68_subtracts_the_background_and_bounds_a_net_below_the_detectable_level() -> None:
    eoe, later = T0, T0 + 72 * HOUR_NS
    background = [2.0, 2.6, 1.7, 2.3, 2.4]  # mean 2.2 Bq
    level = 1.645 * statistics.stdev(background) * math.sqrt(1 + 1 / 5)
    # Ga-68 fed by 1 Bq of Ge-68 after 72 h (Bateman, T_Ge 270.95 d, T_Ga 67.83 min).
    t_ge, t_ga = 270.95 * 1440, 67.83  # minutes
    feed = t_ge / (t_ge - t_ga) * (2 ** (-72 * 60 / t_ge) - 2 ** (-72 * 60 / t_ga))
    result = ge68_breakthrough(1e9, eoe, 2.2 + 50.0, later, LIMITS["ge68_breakthrough"], background_bq=background)
    assert result.inputs["net_bq"] == pytest.approx(50.0, rel=1e-9)
    assert result.measured == pytest.approx(50.0 / feed / 1e9 * 100, rel=1e-9)
    # Below the decision level nothing is detected: the eluate holds less than Currie's detection limit
    # L_D = 2 L_C. Of 1 GBq that bound is far below 0.001 %: a clean generator passes as "< bound".
    clean = ge68_breakthrough(1e9, eoe, 2.2 + level * 0.9, later, LIMITS["ge68_breakthrough"], background_bq=background)
    assert clean.inputs["detected"] is False and clean.verdict == "pass"
    assert clean.measured == pytest.approx(2 * level / feed / 1e9 * 100, rel=1e-9)
    assert clean.detail.startswith("Ge-68 not detected: below")
    # Of a 100 kBq eluate the same bound is 1.3e-3 % > 0.001 %: compliance is not shown, so no verdict.
    with pytest.raises(QcInputError, match=r"Ge-68 not detected, and the detection limit .* is above the limit") as no:
        ge68_breakthrough(1e5, eoe, 2.2 + level * 0.9, later, LIMITS["ge68_breakthrough"], background_bq=background)
    assert "\n" not in str(no.value)


def test_the_station_breakthrough_is_judged_against_the_profile_limit() -> None:
    ok = ge68_station_breakthrough(0.0004, T0, LIMITS["ge68_breakthrough"], generator_id="GA-1", elution_id="ab" * 16)
    assert ok.test == "ge68_breakthrough_station" and ok.verdict == "pass" and ok.deviation_pct is None
    assert ok.inputs["elution_id"] == "ab" * 16
    bad = ge68_station_breakthrough(0.002, T0, LIMITS["ge68_breakthrough"], generator_id="GA-1", elution_id="x")
    assert bad.verdict == "fail" and bad.to_message("lab", "st", "GA-1").payload["alarm"] is True


def test_procedure_id_and_limit_reached_reach_the_message() -> None:
    result = lu177m_ratio(1e6, 7.4e9, T0, LIMITS["lu177m_ratio"])
    payload = result.to_message("lab", "hotcell", "LU-1").payload
    assert payload["limit_reached_ns"] == result.limit_reached_ns and payload["procedure_id"] is None
    assert payload["expected"] is None and payload["deviation_pct"] is None


def test_a_result_carries_the_procedure_it_belongs_to() -> None:
    result = replace(lu177m_ratio(1e6, 7.4e9, T0, LIMITS["lu177m_ratio"]), procedure_id="0f" * 16)
    assert result.to_message("lab", "hotcell", "LU-1").payload["procedure_id"] == "0f" * 16
