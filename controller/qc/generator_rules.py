"""Generator QC rules: elution yield and its trend, Ge-68 and Mo-99 breakthrough, Ga-68 identity.

Pure functions like the calibrator rules: the expected daughter activity comes from the
two-member Bateman solution in `hotlab.physics.decay` (parent decayed from the generator's
calibration, daughter grown in since the last elution, plus what that elution left behind),
and half-lives from `hotlab.physics.nuclides` (DDEP / ENSDF). Times are UTC epoch ns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hotlab.controller.messages import iso_utc
from hotlab.controller.qc.calibrator_rules import TimedReading
from hotlab.controller.qc.limits import YIELD_LIMIT_BY_DAUGHTER, Limit, LimitKind
from hotlab.controller.qc.result import (
    QcInputError,
    QcResult,
    judged,
    require_non_negative,
    require_not_before,
    require_positive,
)
from hotlab.physics.decay import daughter_activity, decay_factor, generator_daughter_activity
from hotlab.physics.nuclides import Nuclide, get_nuclide, normalize_name
from hotlab.physics.utc_time import NS_PER_S

_DAY_S = 86400.0

#: Ph. Eur. 2464 tests Ge-68 on the eluate after at least 48 h, when the eluted Ga-68 has
#: decayed by 2**(-48 h / 67.83 min) ~ 1.7e-13 and what is left is Ga-68 fed by Ge-68.
GE68_MIN_DELAY_S = 48 * 3600.0

#: With no known previous elution the column is taken as in equilibrium, modelled as an
#: elution this many daughter half-lives ago (ingrowth complete to 2**-30).
_EQUILIBRIUM_HALF_LIVES = 30


@dataclass(frozen=True, slots=True)
class GeneratorSpec:
    """A generator as certified: parent activity `calibration_bq` at `calibration_ns`."""

    generator_id: str
    parent: Nuclide
    daughter: Nuclide
    calibration_bq: float
    calibration_ns: int

    def __post_init__(self) -> None:
        require_positive(f"calibration activity of generator {self.generator_id}", self.calibration_bq)
        if self.parent.branching_to(self.daughter.name) is None:
            raise QcInputError(f"{self.daughter.name} is not a daughter of {self.parent.name} in the nuclide library")


def generator_pair(parent_text: str, daughter_text: str | None = None) -> tuple[Nuclide, Nuclide]:
    """Parent and eluted daughter of a generator the QC knows a yield limit for.

    The daughter defaults to the parent's first listed daughter in the nuclide library.
    """
    parent = get_nuclide(parent_text)
    daughter_name = daughter_text or (parent.decays[0].daughter if parent.decays else parent.name)
    if normalize_name(daughter_name) not in YIELD_LIMIT_BY_DAUGHTER:
        raise QcInputError(
            f"no elution-yield limit for daughter {daughter_name!r} of {parent.name}; supported "
            f"generators elute {', '.join(sorted(YIELD_LIMIT_BY_DAUGHTER))}"
        )
    return parent, get_nuclide(daughter_name)


def available_activity(spec: GeneratorSpec, at_ns: int, last_elution_ns: int | None, residual_bq: float = 0.0) -> float:
    """Daughter activity on the column at `at_ns`: what a 100 %-efficient elution would give."""
    if last_elution_ns is None:
        last_elution_ns = at_ns - int(_EQUILIBRIUM_HALF_LIVES * spec.daughter.half_life_s * NS_PER_S)
        residual_bq = 0.0
    require_not_before("elution time", at_ns, "previous elution", last_elution_ns)
    return float(
        generator_daughter_activity(
            spec.calibration_bq,
            spec.calibration_ns,
            spec.parent,
            spec.daughter,
            last_elution_ns,
            at_ns,
            residual_bq,
        )
    )


def elution_yield(
    spec: GeneratorSpec,
    eluted_bq: float,
    end_ns: int,
    limit: Limit,
    *,
    last_elution_ns: int | None = None,
    residual_bq: float = 0.0,
) -> QcResult:
    """Elution yield = eluted daughter activity at end of elution / daughter available on the column.

    `residual_bq` is what the previous elution left on the column (available - eluted then); it
    decays with the daughter half-life. `deviation_pct` is yield - 100 %; the limit judges the
    yield itself.
    """
    eluted = require_non_negative("eluted activity", eluted_bq)
    residual = require_non_negative("residual daughter activity", residual_bq)
    available = available_activity(spec, end_ns, last_elution_ns, residual)
    yield_pct = eluted / available * 100.0
    since = None if last_elution_ns is None else (end_ns - last_elution_ns) / NS_PER_S
    inputs = {
        "generator": spec.generator_id,
        "parent": spec.parent.name,
        "daughter": spec.daughter.name,
        "parent_half_life_s": spec.parent.half_life_s,
        "daughter_half_life_s": spec.daughter.half_life_s,
        "half_life_sources": [spec.parent.source, spec.daughter.source],
        "branching": spec.parent.branching_to(spec.daughter.name),
        "calibration_bq": spec.calibration_bq,
        "calibration_time": iso_utc(spec.calibration_ns),
        "end_of_elution": iso_utc(end_ns),
        "last_elution": None if last_elution_ns is None else iso_utc(last_elution_ns),
        "since_last_elution_s": since,
        "residual_bq": residual,
        "eluted_bq": eluted,
        "available_bq": available,
        "yield_pct": yield_pct,
    }
    assumed = "" if last_elution_ns is not None else " (no previous elution known: column assumed in equilibrium)"
    return judged(
        "elution_yield",
        limit,
        measured=eluted,
        expected=available,
        unit="Bq",
        time_ns=end_ns,
        inputs=inputs,
        value=yield_pct,
        detail=f"{spec.generator_id}: yield {yield_pct:.1f} % of the Bateman-available {spec.daughter.name}{assumed}",
    )


@dataclass(frozen=True, slots=True)
class YieldPoint:
    """One elution's yield, for the trend over a generator's life."""

    end_ns: int
    counter: int
    yield_pct: float


def yield_trend(
    generator_id: str,
    history: Sequence[YieldPoint],
    yield_limit: Limit,
    horizon_days: float,
    min_points: int = 5,
    min_span_days: float = 2.0,
) -> QcResult | None:
    """Yield trend: least-squares slope per day and per elution, projected `horizon_days` ahead.

    Returns None until `min_points` elutions spread over at least `min_span_days` are known:
    a slope from two points, or from a few elutions within hours, is noise when projected
    weeks ahead (several elutions in one morning would otherwise forecast a dead column).
    A projection is a forecast, not a measurement, so it can only warn: the verdict is warn
    when the projected yield falls below the yield limit's fail level.
    """
    if len(history) < min_points:
        return None
    points = sorted(history, key=lambda p: p.end_ns)
    t0 = points[0].end_ns
    days = np.array([(p.end_ns - t0) / NS_PER_S / _DAY_S for p in points])
    if np.ptp(days) < min_span_days:
        return None
    counters = np.array([float(p.counter) for p in points])
    yields = np.array([p.yield_pct for p in points])
    if np.ptp(days) == 0:  # only reachable with min_span_days = 0
        raise QcInputError("a yield trend needs elutions at different times")
    per_day, at_t0 = np.polyfit(days, yields, 1)
    per_elution = float(np.polyfit(counters, yields, 1)[0]) if np.ptp(counters) > 0 else 0.0
    now_fit = float(at_t0 + per_day * days[-1])
    if now_fit <= 0:
        raise QcInputError(f"{generator_id}: the fitted yield is {now_fit:.3g} %; no trend can be projected from it")
    projected = max(float(at_t0 + per_day * (days[-1] + horizon_days)), 0.0)
    assert yield_limit.kind is LimitKind.FLOOR and yield_limit.fail is not None
    forecast_limit = Limit(
        LimitKind.FLOOR,
        "%",
        f"projection {horizon_days:g} d ahead against the yield fail level ({yield_limit.source})",
        warn=yield_limit.fail,
        fail=0.0,
    )
    inputs = {
        "generator": generator_id,
        "elutions": len(points),
        "slope_pct_per_day": float(per_day),
        "slope_pct_per_elution": per_elution,
        "fitted_yield_now_pct": now_fit,
        "projected_yield_pct": projected,
        "horizon_days": float(horizon_days),
        "history": [{"end_ns": p.end_ns, "counter": p.counter, "yield_pct": p.yield_pct} for p in points],
    }
    return judged(
        "elution_yield_trend",
        forecast_limit,
        measured=projected,
        expected=now_fit,
        unit="%",
        time_ns=points[-1].end_ns,
        inputs=inputs,
        value=projected,
        detail=f"{generator_id}: yield trend {per_day:+.3f} %/day ({per_elution:+.3f} %/elution) over "
        f"{len(points)} elutions; {projected:.1f} % expected in {horizon_days:g} d",
    )


def ge68_breakthrough(
    ga68_eoe_bq: float,
    eoe_ns: int,
    remeasured_bq: float,
    remeasured_ns: int,
    limit: Limit,
    *,
    aliquot_fraction: float = 1.0,
) -> QcResult:
    """Ge-68 breakthrough as % of the Ga-68 at end of elution (Ph. Eur. 2464).

    The aliquot (fraction `aliquot_fraction` of an eluate that held `ga68_eoe_bq` Ga-68 at end
    of elution) is re-measured as Ga-68 >= 48 h later; Ge-68 itself decays by electron capture
    with no gamma a calibrator sees, so the reading is the Ga-68 it feeds. By Bateman:
        reading = Ge0 * f(t) + Ga0 * 2**(-t/T_Ga),   f(t) = Ga-68 grown from 1 Bq of Ge-68,
    so Ge0 = (reading - Ga0 * 2**(-t/T_Ga)) / f(t) at end of elution.
    """
    ga68, ge68 = get_nuclide("Ga-68"), get_nuclide("Ge-68")
    ga_eoe = require_positive("Ga-68 activity at end of elution", ga68_eoe_bq)
    reading = require_non_negative("re-measured activity", remeasured_bq)
    fraction = require_positive("aliquot fraction", aliquot_fraction)
    if fraction > 1.0:
        raise QcInputError(f"aliquot fraction must be <= 1, got {aliquot_fraction}")
    require_not_before("re-measurement time", remeasured_ns, "end of elution", eoe_ns)
    delay_s = (remeasured_ns - eoe_ns) / NS_PER_S
    if delay_s < GE68_MIN_DELAY_S:
        raise QcInputError(
            f"re-measured {delay_s / 3600:.1f} h after end of elution; Ph. Eur. 2464 requires >= 48 h so that the "
            f"eluted Ga-68 has decayed and only Ga-68 fed by Ge-68 remains; re-measure after {iso_utc(eoe_ns + int(GE68_MIN_DELAY_S * NS_PER_S))}"
        )
    ga_aliquot = ga_eoe * fraction
    leftover = float(daughter_activity(0.0, ge68, ga68, delay_s, residual_daughter_bq=ga_aliquot))
    per_bq_ge = float(daughter_activity(1.0, ge68, ga68, delay_s))
    ge_eoe = max(reading - leftover, 0.0) / per_bq_ge
    breakthrough_pct = ge_eoe / ga_aliquot * 100.0
    assert limit.fail is not None
    inputs = {
        "ga68_eoe_bq": ga_eoe,
        "aliquot_fraction": fraction,
        "end_of_elution": iso_utc(eoe_ns),
        "remeasured_bq": reading,
        "remeasured_time": iso_utc(remeasured_ns),
        "delay_s": delay_s,
        "ga68_leftover_bq": leftover,
        "ga68_per_bq_ge68": per_bq_ge,
        "ge68_eoe_bq": ge_eoe,
        "half_lives_s": {"Ge-68": ge68.half_life_s, "Ga-68": ga68.half_life_s},
        "half_life_sources": [ge68.source, ga68.source],
    }
    return judged(
        "ge68_breakthrough",
        limit,
        measured=breakthrough_pct,
        expected=limit.fail,
        unit="%",
        time_ns=remeasured_ns,
        inputs=inputs,
        value=breakthrough_pct,
        detail=f"Ge-68 {ge_eoe:.4g} Bq at end of elution = {breakthrough_pct:.3g} % of Ga-68",
    )


def ga68_half_life(first: TimedReading, second: TimedReading, limit: Limit) -> QcResult:
    """Radionuclidic identity: the half-life from two readings, T = dt * ln 2 / ln(A1 / A2), in minutes."""
    ga68 = get_nuclide("Ga-68")
    a1 = require_positive("first reading", first.activity_bq)
    a2 = require_positive("second reading", second.activity_bq)
    if second.time_ns <= first.time_ns:
        raise QcInputError("the second half-life reading must be taken after the first")
    if a2 >= a1:
        raise QcInputError(f"the activity did not decrease ({a1:g} Bq then {a2:g} Bq); cannot derive a half-life")
    dt_s = (second.time_ns - first.time_ns) / NS_PER_S
    half_life_min = dt_s * math.log(2.0) / math.log(a1 / a2) / 60.0
    inputs = {
        "first_bq": a1,
        "first_time": iso_utc(first.time_ns),
        "second_bq": a2,
        "second_time": iso_utc(second.time_ns),
        "elapsed_s": dt_s,
        "library_half_life_min": ga68.half_life_s / 60.0,
        "half_life_source": ga68.source,
    }
    return judged(
        "ga68_half_life",
        limit,
        measured=half_life_min,
        expected=ga68.half_life_s / 60.0,
        unit="min",
        time_ns=second.time_ns,
        inputs=inputs,
        value=half_life_min,
        detail=f"measured half-life {half_life_min:.2f} min from two readings {dt_s / 60:.1f} min apart",
    )


def mo99_exceed_after_s(ratio_kbq_per_mbq: float, limit_kbq_per_mbq: float) -> float:
    """Seconds until a Mo-99/Tc-99m ratio reaches the limit (0 if it already has; inf if there is no Mo-99).

    Both decay freely in the eluate, so R(t) = R0 * 2**(t/T_Tc - t/T_Mo); solving R(t) = L:
        t = log2(L / R0) / (1/T_Tc - 1/T_Mo),
    positive because Tc-99m (6.0067 h, DDEP) is shorter-lived than Mo-99 (2.7479 d = 65.95 h, DDEP).
    The Tc-99m that the Mo-99 impurity itself feeds (~1e-4 of the eluate) is neglected.
    """
    if ratio_kbq_per_mbq <= 0:
        return math.inf
    if ratio_kbq_per_mbq >= limit_kbq_per_mbq:
        return 0.0
    t_mo, t_tc = get_nuclide("Mo-99").half_life_s, get_nuclide("Tc-99m").half_life_s
    return math.log2(limit_kbq_per_mbq / ratio_kbq_per_mbq) / (1.0 / t_tc - 1.0 / t_mo)


#: Without an administration time the Mo-99 ratio is judged this long after the assay. The
#: ratio only rises, so judging at the assay would pass eluates that are out of limit when
#: injected; 12 h is the usual shelf life of a Tc-99m eluate: "use within 12 hours" of elution
#: (Poltechnet SmPC, POLATOM) and "not later than one working day after the elution (12 hours)"
#: (TechneLite prescribing information, Lantheus). Sites with another eluate shelf life set
#: ``[qc] mo99_judge_horizon_h``.
MO99_DEFAULT_JUDGE_HORIZON_H = 12.0


def mo99_breakthrough(
    mo99_bq: float,
    tc99m_bq: float,
    measured_ns: int,
    limit: Limit,
    *,
    administration_ns: int | None = None,
    judge_horizon_h: float = MO99_DEFAULT_JUDGE_HORIZON_H,
) -> QcResult:
    """Mo-99 breakthrough in kBq Mo-99 per MBq Tc-99m, judged at administration (10 CFR 35.204(a)).

    Without an administration time it is judged at assay + `judge_horizon_h` (the eluate's
    shelf life): the latest time the eluate may still be administered, when the ratio is
    highest. The result names which time was judged and when the eluate crosses the limit.
    """
    mo99, tc99m = get_nuclide("Mo-99"), get_nuclide("Tc-99m")
    mo = require_non_negative("Mo-99 activity", mo99_bq)
    tc = require_positive("Tc-99m activity", tc99m_bq)
    horizon_h = require_non_negative("Mo-99 judge horizon (h)", judge_horizon_h)
    if administration_ns is None:
        at_ns = measured_ns + int(horizon_h * 3600 * NS_PER_S)
        basis = f"assay + {horizon_h:g} h eluate shelf life (no administration time given)"
    else:
        at_ns = administration_ns
        basis = "administration time"
    require_not_before("administration time", at_ns, "Mo-99 assay time", measured_ns)
    ratio_now = (mo / 1e3) / (tc / 1e6)
    dt_s = (at_ns - measured_ns) / NS_PER_S
    ratio_then = ratio_now * float(decay_factor(mo99.half_life_s, dt_s) / decay_factor(tc99m.half_life_s, dt_s))
    assert limit.fail is not None
    exceed_s = mo99_exceed_after_s(ratio_now, limit.fail)
    inputs = {
        "mo99_bq": mo,
        "tc99m_bq": tc,
        "measured_time": iso_utc(measured_ns),
        "administration_time": None if administration_ns is None else iso_utc(administration_ns),
        "judged_time": iso_utc(at_ns),
        "judged_at": basis,
        "judge_horizon_h": None if administration_ns is not None else horizon_h,
        "ratio_at_measurement_kbq_per_mbq": ratio_now,
        "ratio_at_judged_time_kbq_per_mbq": ratio_then,
        "exceeds_limit_after_s": None if math.isinf(exceed_s) else exceed_s,
        "exceeds_limit_at": None if math.isinf(exceed_s) else iso_utc(measured_ns + int(exceed_s * NS_PER_S)),
        "half_lives_s": {"Mo-99": mo99.half_life_s, "Tc-99m": tc99m.half_life_s},
        "half_life_sources": [mo99.source, tc99m.source],
    }
    when = "never (no Mo-99)" if math.isinf(exceed_s) else f"{exceed_s / 3600:.1f} h after the assay"
    return judged(
        "mo99_breakthrough",
        limit,
        measured=ratio_then,
        expected=limit.fail,
        unit="kBq/MBq",
        time_ns=at_ns,
        inputs=inputs,
        value=ratio_then,
        detail=f"{ratio_then:.4g} kBq Mo-99/MBq Tc-99m judged at {basis}; limit reached {when}",
    )
