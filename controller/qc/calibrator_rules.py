"""Dose-calibrator QC rules: constancy, accuracy, linearity (decay and sleeve), geometry, background.

Each rule is a pure function from measurements to a `QcResult` (or several): no I/O, no
clock, so the streaming engine and the CLI share them and tests can feed published numbers.
Expected activities are always decay-corrected with `hotlab.physics.decay` and the evaluated
half-lives of `hotlab.physics.nuclides` (DDEP / ENSDF, named in every result's inputs).
Times are UTC epoch nanoseconds, activities becquerel.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hotlab.controller.messages import iso_utc
from hotlab.controller.qc.limits import Limit
from hotlab.controller.qc.result import (
    QcInputError,
    QcResult,
    deviation_pct,
    judged,
    require_non_negative,
    require_not_before,
    require_positive,
)
from hotlab.physics.decay import activity_at, corrected_activity_uncertainty
from hotlab.physics.nuclides import Nuclide
from hotlab.physics.units import format_activity

_NS_PER_S = 1e9


def _decayed(activity_bq: float, nuclide: Nuclide, dt_s: float) -> float:
    """`activity_bq` carried dt_s seconds forward (backward if negative), as a plain float for JSON."""
    return float(activity_at(activity_bq, nuclide, dt_s))


@dataclass(frozen=True, slots=True)
class ReferenceSource:
    """A sealed source with a certificate: activity `reference_bq` at `reference_ns`.

    Used as the daily constancy check source (Cs-137, Co-57, Ba-133) and as the certified
    reference for accuracy; `uncertainty_pct` is the certificate's expanded uncertainty.
    """

    source_id: str
    nuclide: Nuclide
    reference_bq: float
    reference_ns: int
    certificate: str = ""
    uncertainty_pct: float | None = None

    def __post_init__(self) -> None:
        require_positive(f"reference activity of source {self.source_id}", self.reference_bq)

    def activity_at_ns(self, time_ns: int, what: str = "measurement time") -> float:
        """The certified activity decay-corrected to `time_ns` (which may not precede the certificate)."""
        require_not_before(what, time_ns, f"reference date of source {self.source_id}", self.reference_ns)
        return _decayed(self.reference_bq, self.nuclide, (time_ns - self.reference_ns) / _NS_PER_S)

    def describe(self) -> dict[str, object]:
        return {
            "source_id": self.source_id,
            "nuclide": self.nuclide.name,
            "half_life_s": self.nuclide.half_life_s,
            "half_life_source": self.nuclide.source,
            "reference_bq": self.reference_bq,
            "reference_time": iso_utc(self.reference_ns),
            "reference_ns": self.reference_ns,
            "certificate": self.certificate,
            "certificate_uncertainty_pct": self.uncertainty_pct,
        }


def _against_source(
    test: str, source: ReferenceSource, readings_bq: Sequence[float], measured_ns: int, limit: Limit
) -> QcResult:
    if not readings_bq:
        raise QcInputError(f"{test} needs at least one reading of source {source.source_id}")
    values = [require_non_negative(f"{test} reading", value) for value in readings_bq]
    measured = statistics.fmean(values)
    expected = source.activity_at_ns(measured_ns)
    elapsed_s = (measured_ns - source.reference_ns) / _NS_PER_S
    # Standard uncertainty of the expected value from the half-life's evaluated uncertainty alone
    # (the certificate's own uncertainty is reported beside it, not combined: its coverage factor
    # is the certificate's to state).
    _, half_life_sigma = corrected_activity_uncertainty(source.reference_bq, source.nuclide, elapsed_s)
    inputs = source.describe() | {
        "readings_bq": values,
        "measured_time": iso_utc(measured_ns),
        "measured_ns": int(measured_ns),
        "elapsed_s": elapsed_s,
        "expected_half_life_sigma_pct": float(half_life_sigma) / expected * 100.0,
    }
    if len(values) > 1:
        inputs["reading_stdev_pct"] = statistics.stdev(values) / measured * 100.0 if measured else 0.0
    return judged(
        test,
        limit,
        measured=measured,
        expected=expected,
        unit="Bq",
        time_ns=measured_ns,
        inputs=inputs,
        detail=f"{source.nuclide.name} source {source.source_id}: mean of {len(values)} reading(s) "
        f"vs certificate decay-corrected to the measurement time",
    )


def constancy(source: ReferenceSource, readings_bq: Sequence[float], measured_ns: int, limit: Limit) -> QcResult:
    """Daily constancy: the check source's reading against its certificate, decay-corrected to today."""
    return _against_source("constancy", source, readings_bq, measured_ns, limit)


def accuracy(source: ReferenceSource, readings_bq: Sequence[float], measured_ns: int, limit: Limit) -> QcResult:
    """Accuracy: mean reading of a certified reference source against its decay-corrected certificate."""
    return _against_source("accuracy", source, readings_bq, measured_ns, limit)


@dataclass(frozen=True, slots=True)
class TimedReading:
    """One activity reading at one time (a point of a decay series, or a sleeve measurement)."""

    time_ns: int
    activity_bq: float
    label: str = ""


def _worst(deviations: Sequence[float]) -> int:
    return max(range(len(deviations)), key=lambda i: abs(deviations[i]))


def linearity_decay(
    nuclide: Nuclide,
    series: Sequence[TimedReading],
    limit: Limit,
    half_life_limit: Limit,
) -> list[QcResult]:
    """Linearity by the decay method: fit ln(A) = ln(A0) - lambda*t to a decaying Tc-99m/F-18 series.

    A linear calibrator follows a pure exponential, so each point's deviation from the fitted
    line is its non-linearity (judged by `limit`). The fitted half-life is reported against the
    library value (judged by `half_life_limit`): a drift that the fit absorbed as a slope shows
    up there instead.
    """
    if len(series) < 3:
        raise QcInputError(f"linearity by decay needs at least 3 readings, got {len(series)}")
    points = sorted(series, key=lambda point: point.time_ns)
    if points[-1].time_ns == points[0].time_ns:
        raise QcInputError("linearity by decay needs readings at different times")
    t0 = points[0].time_ns
    t_s = np.array([(point.time_ns - t0) / _NS_PER_S for point in points])
    activity = np.array([require_positive("linearity reading", point.activity_bq) for point in points])
    slope, intercept = np.polyfit(t_s, np.log(activity), 1)
    if slope >= 0:
        raise QcInputError("the readings do not decay (fitted slope >= 0); check the series and the nuclide")
    fitted = np.exp(intercept + slope * t_s)
    deviations = [deviation_pct(float(a), float(f)) for a, f in zip(activity, fitted)]
    worst = _worst(deviations)
    fitted_half_life_s = math.log(2.0) / -float(slope)
    inputs = {
        "nuclide": nuclide.name,
        "half_life_s": nuclide.half_life_s,
        "half_life_source": nuclide.source,
        "fitted_half_life_s": fitted_half_life_s,
        "points": [
            {
                "time": iso_utc(p.time_ns),
                "time_ns": p.time_ns,
                "activity_bq": float(a),
                "fitted_bq": float(f),
                "deviation_pct": d,
            }
            for p, a, f, d in zip(points, activity, fitted, deviations)
        ],
    }
    last_ns = points[-1].time_ns
    point_result = judged(
        "linearity",
        limit,
        measured=float(activity[worst]),
        expected=float(fitted[worst]),
        unit="Bq",
        time_ns=last_ns,
        inputs=inputs,
        detail=f"{len(points)} points from {format_activity(float(activity[0]))} to "
        f"{format_activity(float(activity[-1]))}; "
        f"worst deviation from the log-linear fit at point {worst + 1}",
    )
    half_life_result = judged(
        "linearity_half_life",
        half_life_limit,
        measured=fitted_half_life_s,
        expected=nuclide.half_life_s,
        unit="s",
        time_ns=last_ns,
        inputs=inputs,
        detail=f"fitted half-life {fitted_half_life_s / 3600:.4f} h vs {nuclide.name} "
        f"{nuclide.half_life_s / 3600:.4f} h ({nuclide.source})",
    )
    return [point_result, half_life_result]


def sleeve_factors(nuclide: Nuclide, unshielded: TimedReading, sleeves: Sequence[TimedReading]) -> dict[str, float]:
    """Sleeve factors from a calibration run in the calibrator's linear range.

    factor = unshielded activity (decay-corrected to the sleeve reading's time) / sleeve reading,
    so that later `reading * factor` is the activity in the chamber. Sleeves are named by `label`.
    """
    require_positive("unshielded calibration reading", unshielded.activity_bq)
    factors: dict[str, float] = {}
    for sleeve in sleeves:
        if not sleeve.label:
            raise QcInputError("every sleeve reading needs a label naming the sleeve")
        if sleeve.label in factors:
            raise QcInputError(f"sleeve {sleeve.label!r} appears twice in the calibration run")
        reading = require_positive(f"calibration reading of sleeve {sleeve.label}", sleeve.activity_bq)
        dt_s = (sleeve.time_ns - unshielded.time_ns) / _NS_PER_S
        factors[sleeve.label] = _decayed(unshielded.activity_bq, nuclide, dt_s) / reading
    if not factors:
        raise QcInputError("a sleeve calibration needs at least one sleeve reading")
    return factors


@dataclass(frozen=True, slots=True)
class _Spread:
    """Readings decay-corrected to one time and their deviations from a reference activity."""

    corrected_bq: dict[str, float]
    reference_bq: float
    deviation_pct: dict[str, float]
    worst: str


def _spread(
    nuclide: Nuclide, to_ns: int, readings: dict[str, tuple[int, float]], reference_bq: float | None = None
) -> _Spread:
    """Decay-correct `readings` (label -> (time_ns, Bq)) to `to_ns` and compare each with the reference.

    The reference is `reference_bq`, or the median of the corrected readings when None (so one
    deviant point cannot drag the reference with it). `worst` labels the largest |deviation|.
    """
    corrected = {
        label: _decayed(bq, nuclide, (to_ns - time_ns) / _NS_PER_S) for label, (time_ns, bq) in readings.items()
    }
    reference = statistics.median(corrected.values()) if reference_bq is None else reference_bq
    deviations = {label: deviation_pct(value, reference) for label, value in corrected.items()}
    labels = list(deviations)
    return _Spread(corrected, reference, deviations, labels[_worst([deviations[label] for label in labels])])


def linearity_sleeve(
    nuclide: Nuclide,
    factors: dict[str, float],
    unshielded: TimedReading,
    sleeves: Sequence[TimedReading],
    limit: Limit,
) -> QcResult:
    """Linearity by shielded sleeves: every sleeve-corrected reading should equal the chamber activity.

    Readings are sleeve-corrected and decay-corrected to the unshielded reading's time; the
    reference is the median of all of them (unshielded included), so one non-linear point
    cannot drag the reference with it. The worst deviation from the median is judged.
    """
    readings = {"unshielded": (unshielded.time_ns, require_positive("unshielded reading", unshielded.activity_bq))}
    for sleeve in sleeves:
        if sleeve.label not in factors:
            raise QcInputError(
                f"no calibration factor for sleeve {sleeve.label!r}; known: {', '.join(sorted(factors))}"
            )
        reading = require_positive(f"reading of sleeve {sleeve.label}", sleeve.activity_bq)
        readings[sleeve.label] = (sleeve.time_ns, reading * factors[sleeve.label])
    if len(readings) < 2:
        raise QcInputError("a sleeve linearity test needs at least one sleeve reading")
    spread = _spread(nuclide, unshielded.time_ns, readings)
    inputs = {
        "nuclide": nuclide.name,
        "half_life_s": nuclide.half_life_s,
        "half_life_source": nuclide.source,
        "reference_time": iso_utc(unshielded.time_ns),
        "sleeve_factors": dict(factors),
        "corrected_bq": spread.corrected_bq,
        "deviation_pct": spread.deviation_pct,
        "readings": [{"label": s.label, "time_ns": s.time_ns, "activity_bq": s.activity_bq} for s in sleeves],
    }
    return judged(
        "linearity_sleeve",
        limit,
        measured=spread.corrected_bq[spread.worst],
        expected=spread.reference_bq,
        unit="Bq",
        time_ns=max([unshielded.time_ns, *(s.time_ns for s in sleeves)]),
        inputs=inputs,
        detail=f"worst: {spread.worst} vs the median of {len(readings)} sleeve-corrected activities",
    )


def geometry(nuclide: Nuclide, reference: TimedReading, others: Sequence[TimedReading], limit: Limit) -> QcResult:
    """Geometry / volume dependence: the same activity in other volumes or containers.

    Each reading is decay-corrected to the reference reading's time and compared with the
    reference geometry; the correction factor (reference / reading) per geometry is reported
    so a site can apply it when the deviation is above the limit.
    """
    if not others:
        raise QcInputError("a geometry test needs at least one reading besides the reference geometry")
    reference_bq = require_positive("reference-geometry reading", reference.activity_bq)
    readings: dict[str, tuple[int, float]] = {}
    for reading in others:
        label = reading.label or f"reading {len(readings) + 1}"
        if label in readings:
            raise QcInputError(f"geometry {label!r} appears twice")
        readings[label] = (reading.time_ns, require_positive(f"reading in geometry {label}", reading.activity_bq))
    spread = _spread(nuclide, reference.time_ns, readings, reference_bq)
    reference_label = reference.label or "reference"
    inputs = {
        "nuclide": nuclide.name,
        "half_life_s": nuclide.half_life_s,
        "half_life_source": nuclide.source,
        "reference_geometry": reference_label,
        "reference_bq": reference_bq,
        "reference_time": iso_utc(reference.time_ns),
        "corrected_bq": spread.corrected_bq,
        "deviation_pct": spread.deviation_pct,
        "correction_factors": {label: reference_bq / value for label, value in spread.corrected_bq.items()},
    }
    return judged(
        "geometry",
        limit,
        measured=spread.corrected_bq[spread.worst],
        expected=reference_bq,
        unit="Bq",
        time_ns=max([reference.time_ns, *(r.time_ns for r in others)]),
        inputs=inputs,
        detail=f"worst geometry: {spread.worst} vs {reference_label}",
    )


def background(reading_bq: float, measured_ns: int, limit: Limit, *, nuclide: str | None = None) -> QcResult:
    """Background / zero check with the chamber empty.

    The magnitude is judged: a negative reading means the zero has drifted, which biases every
    measurement just as much as a contaminated chamber does. `expected` is the warn level (or
    the fail level if there is none), so the deviation reads as the margin to it.
    """
    value = float(reading_bq)
    if not math.isfinite(value):
        raise QcInputError(f"background reading must be a finite number, got {reading_bq!r}")
    reference = limit.warn if limit.warn is not None else limit.fail
    assert reference is not None and reference > 0
    return judged(
        "background",
        limit,
        measured=value,
        expected=reference,
        unit="Bq",
        time_ns=measured_ns,
        inputs={
            "reading_bq": value,
            "measured_time": iso_utc(measured_ns),
            "measured_ns": int(measured_ns),
            "nuclide_setting": nuclide,
        },
        value=abs(value),
        detail="empty-chamber reading (magnitude judged; negative means a zero offset)",
    )
