"""Generator QC rules: elution yield and its trend, Ge-68 and Mo-99 breakthrough, Ga-68 identity.

Pure functions like the calibrator rules: the expected daughter activity comes from the
two-member Bateman solution in `hotlab.physics.decay` (parent decayed from the generator's
calibration, daughter grown in since the last elution, plus what that elution left behind),
and half-lives from `hotlab.physics.nuclides` (DDEP / ENSDF). Times are UTC epoch ns.
"""

from __future__ import annotations

import math
import statistics
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

#: The shortest time between the two readings of a Ga-68 half-life (hotlab choice; no public text
#: checked here sets one). The half-life's relative uncertainty is sqrt(2) * u / ln(A1/A2) for readings
#: of relative uncertainty u: with u = 0.5 % (a settled calibrator reading; an assumption), 15 min apart
#: (ln(A1/A2) = 15 * ln 2 / 67.8 = 0.153) gives 4.6 %, +-3.1 min on 68 min, half the 62-74 min window;
#: at 5 min apart it would be +-9.4 min, wider than the window, and the verdict would be noise.
GA68_HALF_LIFE_MIN_INTERVAL_S = 15 * 60.0

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
    decays with the daughter half-life. `measured` is the eluted and `expected` the available
    activity (what a 100 %-efficient elution gives); the floor limit judges the yield itself, so
    there is no `deviation_pct`.
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
        expected=None,
        unit="%",
        time_ns=points[-1].end_ns,
        inputs=inputs,
        value=projected,
        detail=f"{generator_id}: yield trend {per_day:+.3f} %/day ({per_elution:+.3f} %/elution) over "
        f"{len(points)} elutions; {projected:.1f} % expected in {horizon_days:g} d",
    )


#: Currie's one-sided 5 % quantile: a net reading above k * (its standard deviation when nothing is
#: there) is "detected" with a 5 % false-detection rate. L. A. Currie, "Limits for qualitative
#: detection and quantitative determination", Anal. Chem. 40 (1968) 586, decision level L_C.
CURRIE_K = 1.645


@dataclass(frozen=True, slots=True)
class DetectableLevel:
    """The background of a measurement and the net reading below which nothing is detected.

    With `n` background readings of standard deviation `sd_bq` and one sample reading of the same
    spread, the net reading (sample - mean background) has the standard deviation
    sd * sqrt(1 + 1/n) when the sample holds nothing; Currie's decision level is CURRIE_K times that.
    A site may configure a higher floor (`minimum_bq`, e.g. the calibrator's display resolution).
    """

    mean_bq: float
    sd_bq: float | None
    n: int
    currie_bq: float | None
    minimum_bq: float

    @property
    def level_bq(self) -> float:
        return max(self.currie_bq or 0.0, self.minimum_bq)

    @property
    def detection_limit_bq(self) -> float:
        """The least net activity sure to be detected: Currie's L_D = 2 L_C (equal false-positive and false-negative
        rates, 5 %), or the configured minimum, which is a minimum detectable activity. A sample not detected
        holds less than this; it bounds a result that is not detected."""
        return max(2.0 * (self.currie_bq or 0.0), self.minimum_bq)

    def describe(self) -> dict[str, object]:
        return {
            "background_mean_bq": self.mean_bq,
            "background_sd_bq": self.sd_bq,
            "background_readings": self.n,
            "currie_decision_level_bq": self.currie_bq,
            "minimum_detectable_bq": self.minimum_bq,
            "detectable_level_bq": self.level_bq,
        }


def detectable_level(background_bq: Sequence[float], minimum_bq: float = 0.0) -> DetectableLevel:
    """The background readings' mean and the detectable level (Currie decision level, or `minimum_bq` if higher).

    One background reading has no spread: it is accepted only with a configured `minimum_bq` > 0.
    """
    readings = [require_non_negative("background reading", value) for value in background_bq]
    floor = require_non_negative("minimum detectable activity", minimum_bq)
    if not readings:
        raise QcInputError("a breakthrough measurement needs the background measured with it (at least one reading)")
    if len(readings) == 1 and floor == 0:
        raise QcInputError(
            "one background reading has no spread to set a detectable level: take at least 2 background readings "
            "or configure a minimum detectable activity"
        )
    mean = statistics.fmean(readings)
    if len(readings) == 1:
        return DetectableLevel(mean, None, 1, None, floor)
    sd = statistics.stdev(readings)
    if sd == 0 and floor == 0:
        raise QcInputError(
            f"the {len(readings)} background readings are all {mean:g} Bq: no spread to set a detectable level "
            "(a display that rounds to zero); configure a minimum detectable activity"
        )
    currie = CURRIE_K * sd * math.sqrt(1.0 + 1.0 / len(readings))
    return DetectableLevel(mean, sd, len(readings), currie, floor)


def ge68_breakthrough(
    ga68_eoe_bq: float,
    eoe_ns: int,
    remeasured_bq: float,
    remeasured_ns: int,
    limit: Limit,
    *,
    background_bq: Sequence[float],
    minimum_detectable_bq: float = 0.0,
    aliquot_fraction: float = 1.0,
) -> QcResult:
    """Ge-68 breakthrough as % of the Ga-68 at end of elution (Ph. Eur. 2464).

    The aliquot (fraction `aliquot_fraction` of an eluate that held `ga68_eoe_bq` Ga-68 at end
    of elution) is re-measured as Ga-68 >= 48 h later, with the background (`background_bq`, the
    chamber with the empty container) read at the same session. Ge-68 itself decays by electron
    capture with no gamma a calibrator sees, so the net reading is the Ga-68 it feeds. By Bateman:
        net = reading - background = Ge0 * f(t) + Ga0 * 2**(-t/T_Ga),   f(t) = Ga-68 grown from 1 Bq of Ge-68,
    so Ge0 = (net - Ga0 * 2**(-t/T_Ga)) / f(t) at end of elution.

    A net reading below the detectable level (`detectable_level`) detects no Ge-68: a value computed
    from noise is not a measurement. The sample then holds less than the detection limit, so the
    result is that bound ("< x %", `inputs.detected` false) when it is within the limit, which shows
    compliance; when the bound is above the limit nothing is shown and the measurement is refused
    (re-measure more of the eluate, or with a more sensitive instrument).
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
    background = detectable_level(background_bq, minimum_detectable_bq)
    ga_aliquot = ga_eoe * fraction
    leftover = float(daughter_activity(0.0, ge68, ga68, delay_s, residual_daughter_bq=ga_aliquot))
    per_bq_ge = float(daughter_activity(1.0, ge68, ga68, delay_s))
    net = reading - background.mean_bq - leftover
    detected = net >= background.level_bq
    if detected:
        ge_eoe = net / per_bq_ge
    else:
        ge_eoe = background.detection_limit_bq / per_bq_ge
        bound_pct = ge_eoe / ga_aliquot * 100.0
        if limit.fail is None or bound_pct > limit.fail:
            raise QcInputError(
                f"net reading {net:.3g} Bq is below the detectable level {background.level_bq:.3g} Bq "
                f"(Currie decision level from {background.n} background reading(s), or the configured minimum): "
                f"Ge-68 not detected, and the detection limit ({bound_pct:.2g} % breakthrough) is above the limit "
                f"({limit.text}), so no verdict; re-measure a larger aliquot or with a more sensitive instrument"
            )
    breakthrough_pct = ge_eoe / ga_aliquot * 100.0
    inputs = {
        "ga68_eoe_bq": ga_eoe,
        "aliquot_fraction": fraction,
        "end_of_elution": iso_utc(eoe_ns),
        "remeasured_bq": reading,
        "remeasured_time": iso_utc(remeasured_ns),
        "delay_s": delay_s,
        **background.describe(),
        "currie_k": CURRIE_K,
        "ga68_leftover_bq": leftover,
        "net_bq": net,
        "detected": detected,
        "detection_limit_bq": background.detection_limit_bq,
        "ga68_per_bq_ge68": per_bq_ge,
        "ge68_eoe_bq": ge_eoe,
        "half_lives_s": {"Ge-68": ge68.half_life_s, "Ga-68": ga68.half_life_s},
        "half_life_sources": [ge68.source, ga68.source],
    }
    return judged(
        "ge68_breakthrough",
        limit,
        measured=breakthrough_pct,
        expected=None,
        unit="%",
        time_ns=remeasured_ns,
        inputs=inputs,
        value=breakthrough_pct,
        detail=(
            f"Ge-68 {ge_eoe:.4g} Bq at end of elution = {breakthrough_pct:.3g} % of Ga-68 "
            f"(net of {background.mean_bq:.3g} Bq background, detectable from {background.level_bq:.3g} Bq)"
            if detected
            else f"Ge-68 not detected: below {breakthrough_pct:.3g} % of Ga-68 at end of elution (the detection "
            f"limit {background.detection_limit_bq:.3g} Bq net; net reading {net:.3g} Bq, decision level "
            f"{background.level_bq:.3g} Bq)"
        ),
    )


def ge68_station_breakthrough(
    breakthrough_pct: float, end_ns: int, limit: Limit, *, generator_id: str, elution_id: str
) -> QcResult:
    """The Ge-68/Ga-68 figure the elution station reports (`breakthrough_pct` of the elution message).

    It is the station's own estimate of parent/daughter in the eluate at end of elution, judged against
    the same limit as the measurement; it does not replace the >= 48 h re-measurement (test
    `ge68_breakthrough`), so it has a test name of its own, `ge68_breakthrough_station`.
    """
    value = require_non_negative("station breakthrough (%)", breakthrough_pct)
    return judged(
        "ge68_breakthrough_station",
        limit,
        measured=value,
        expected=None,
        unit="%",
        time_ns=end_ns,
        inputs={"generator": generator_id, "elution_id": elution_id, "end_of_elution": iso_utc(end_ns)},
        value=value,
        detail=f"{generator_id}: Ge-68 breakthrough {value:.3g} % as reported by the elution station at end of elution",
    )


def ga68_half_life(first: TimedReading, second: TimedReading, limit: Limit) -> QcResult:
    """Radionuclidic identity: the half-life from two readings, T = dt * ln 2 / ln(A1 / A2), in minutes.

    The readings must be at least GA68_HALF_LIFE_MIN_INTERVAL_S apart: closer ones give a half-life
    whose noise is wider than the 62-74 min window.
    """
    ga68 = get_nuclide("Ga-68")
    a1 = require_positive("first reading", first.activity_bq)
    a2 = require_positive("second reading", second.activity_bq)
    if second.time_ns <= first.time_ns:
        raise QcInputError("the second half-life reading must be taken after the first")
    if a2 >= a1:
        raise QcInputError(f"the activity did not decrease ({a1:g} Bq then {a2:g} Bq); cannot derive a half-life")
    dt_s = (second.time_ns - first.time_ns) / NS_PER_S
    if dt_s < GA68_HALF_LIFE_MIN_INTERVAL_S:
        raise QcInputError(
            f"the two half-life readings are {dt_s / 60:.1f} min apart; they must be at least "
            f"{GA68_HALF_LIFE_MIN_INTERVAL_S / 60:g} min apart for the half-life to be told from noise: read it again later"
        )
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


def ratio_limit_reached_after_s(ratio: float, limit: float, impurity: Nuclide, product: Nuclide) -> float:
    """Seconds until an impurity/product activity ratio reaches `limit` (0 if it has; inf if there is no impurity).

    Both decay freely, so R(t) = R0 * 2**(t/T_product - t/T_impurity); solving R(t) = L:
        t = log2(L / R0) / (1/T_product - 1/T_impurity),
    positive because the impurities judged this way (Mo-99 in Tc-99m, Lu-177m in Lu-177) outlive
    the product.
    """
    if impurity.half_life_s <= product.half_life_s:
        raise QcInputError(f"{impurity.name} does not outlive {product.name}: its ratio does not grow")
    if ratio <= 0:
        return math.inf
    if ratio >= limit:
        return 0.0
    return math.log2(limit / ratio) / (1.0 / product.half_life_s - 1.0 / impurity.half_life_s)


@dataclass(frozen=True, slots=True)
class _GrowingImpurity:
    """How a growing impurity test names and scales its ratio (e.g. kBq Mo-99 per MBq Tc-99m = 1000 Bq/Bq)."""

    test: str
    impurity: str
    product: str
    unit: str
    scale: float
    use: str
    use_key: str


_MO99 = _GrowingImpurity(
    "mo99_breakthrough", "Mo-99", "Tc-99m", "kBq/MBq", 1e3, "administration", "administration_time"
)
_LU177M = _GrowingImpurity("lu177m_ratio", "Lu-177m", "Lu-177", "%", 1e2, "use", "use_time")


def _key(nuclide_name: str) -> str:
    """A nuclide name as an inputs key prefix: ``Tc-99m`` -> ``tc99m``."""
    return nuclide_name.lower().replace("-", "")


def _growing_impurity(
    kind: _GrowingImpurity,
    impurity_bq: float,
    product_bq: float,
    measured_ns: int,
    limit: Limit,
    use_ns: int | None,
) -> QcResult:
    """An impurity ratio that only grows: the time it reaches the limit, and the verdict at use (or at the assay)."""
    impurity, product = get_nuclide(kind.impurity), get_nuclide(kind.product)
    impurity_activity = require_non_negative(f"{impurity.name} activity", impurity_bq)
    product_activity = require_positive(f"{product.name} activity", product_bq)
    at_ns = measured_ns if use_ns is None else use_ns
    require_not_before(f"{kind.use} time", at_ns, f"{impurity.name} assay time", measured_ns)
    ratio_now = impurity_activity / product_activity * kind.scale
    dt_s = (at_ns - measured_ns) / NS_PER_S
    ratio_then = ratio_now * float(decay_factor(impurity.half_life_s, dt_s) / decay_factor(product.half_life_s, dt_s))
    assert limit.fail is not None
    reached_s = ratio_limit_reached_after_s(ratio_now, limit.fail, impurity, product)
    reached_ns = None if math.isinf(reached_s) else measured_ns + int(reached_s * NS_PER_S)
    basis = f"{kind.use} time" if use_ns is not None else f"the assay time (no {kind.use} time given)"
    inputs = {
        f"{_key(impurity.name)}_bq": impurity_activity,
        f"{_key(product.name)}_bq": product_activity,
        "measured_time": iso_utc(measured_ns),
        kind.use_key: None if use_ns is None else iso_utc(use_ns),
        "judged_time": iso_utc(at_ns),
        "judged_at": basis,
        "ratio_unit": kind.unit,
        "ratio_at_measurement": ratio_now,
        "ratio_at_judged_time": ratio_then,
        "limit_reached_after_s": None if math.isinf(reached_s) else reached_s,
        "limit_reached_at": None if reached_ns is None else iso_utc(reached_ns),
        "half_lives_s": {impurity.name: impurity.half_life_s, product.name: product.half_life_s},
        "half_life_sources": [impurity.source, product.source],
    }
    when = (
        f"never (no {impurity.name})"
        if reached_ns is None
        else f"at {iso_utc(reached_ns)} ({reached_s / 3600:.1f} h after the assay)"
    )
    return judged(
        kind.test,
        limit,
        measured=ratio_then,
        expected=None,
        unit=kind.unit,
        time_ns=at_ns,
        inputs=inputs,
        value=ratio_then,
        limit_reached_ns=reached_ns,
        detail=f"limit {limit.fail:g} {kind.unit} reached {when}; {ratio_then:.4g} {kind.unit} "
        f"{impurity.name}/{product.name} at {basis}",
    )


def mo99_breakthrough(
    mo99_bq: float,
    tc99m_bq: float,
    measured_ns: int,
    limit: Limit,
    *,
    administration_ns: int | None = None,
) -> QcResult:
    """Mo-99 breakthrough in kBq Mo-99 per MBq Tc-99m (10 CFR 35.204(a): at administration).

    The primary output is `limit_reached_ns`: the time the ratio, which only grows because Tc-99m
    (6.0067 h) decays faster than Mo-99 (65.95 h), reaches the limit, i.e. the eluate's expiry by this
    test. The verdict is at `administration_ns` when given, else at the assay time. The Tc-99m that
    the Mo-99 impurity itself feeds (~1e-4 of the eluate) is neglected, which overstates the ratio.
    """
    return _growing_impurity(_MO99, mo99_bq, tc99m_bq, measured_ns, limit, administration_ns)


def lu177m_ratio(
    lu177m_bq: float,
    lu177_bq: float,
    measured_ns: int,
    limit: Limit,
    *,
    use_ns: int | None = None,
) -> QcResult:
    """Lu-177m as % of Lu-177 in carrier-added Lu-177, and when it reaches the limit.

    Lu-177m (160.44 d) outlives Lu-177 (6.6443 d), so the ratio grows by 2**(t/T_177 - t/T_177m),
    about 11 % a day; `limit_reached_ns` is when it reaches the limit. The verdict is at `use_ns`
    (labelling or administration) when given, else at the assay time. The Lu-177 that the
    isomer's 21.4 % IT branch feeds (< 1e-4 of the Lu-177 at these ratios) is neglected.
    """
    return _growing_impurity(_LU177M, lu177m_bq, lu177_bq, measured_ns, limit, use_ns)


def strontium_breakthrough(
    rb82_eoe_bq: float,
    eoe_ns: int,
    sr82_bq: float,
    sr85_bq: float,
    measured_ns: int,
    sr82_limit: Limit,
    sr85_limit: Limit,
) -> tuple[QcResult, QcResult]:
    """Sr-82 and Sr-85 breakthrough of a Rb-82 generator in kBq per MBq Rb-82 at end of elution (10 CFR 35.204(a)).

    `rb82_eoe_bq` is the eluate's Rb-82 at end of elution; `sr82_bq` and `sr85_bq` are its strontium
    activities as determined at `measured_ns`, after the eluted Rb-82 (75 s) has decayed (the
    generator's instructions say how to split the reading between them). Both are decay-corrected
    back to the end of elution: Rb-82 is infused as it is eluted, so that is the time the ratio
    applies to. Returns (sr82_breakthrough, sr85_breakthrough).
    """
    rb82 = get_nuclide("Rb-82")
    rb = require_positive("Rb-82 activity at end of elution", rb82_eoe_bq)
    require_not_before("strontium measurement time", measured_ns, "end of elution", eoe_ns)
    dt_s = (measured_ns - eoe_ns) / NS_PER_S
    results = []
    for test, name, activity, limit in (
        ("sr82_breakthrough", "Sr-82", sr82_bq, sr82_limit),
        ("sr85_breakthrough", "Sr-85", sr85_bq, sr85_limit),
    ):
        nuclide = get_nuclide(name)
        measured = require_non_negative(f"{name} activity", activity)
        at_eoe = measured / float(decay_factor(nuclide.half_life_s, dt_s))
        ratio = (at_eoe / 1e3) / (rb / 1e6)
        inputs = {
            "rb82_eoe_bq": rb,
            "end_of_elution": iso_utc(eoe_ns),
            "measured_time": iso_utc(measured_ns),
            f"{_key(name)}_measured_bq": measured,
            f"{_key(name)}_eoe_bq": at_eoe,
            "half_lives_s": {name: nuclide.half_life_s, "Rb-82": rb82.half_life_s},
            "half_life_sources": [nuclide.source, rb82.source],
        }
        results.append(
            judged(
                test,
                limit,
                measured=ratio,
                expected=None,
                unit="kBq/MBq",
                time_ns=eoe_ns,
                inputs=inputs,
                value=ratio,
                detail=f"{ratio:.4g} kBq {name} per MBq Rb-82 at end of elution",
            )
        )
    return results[0], results[1]
