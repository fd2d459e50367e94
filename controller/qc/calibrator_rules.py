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


#: Readings at the low-activity end of a decay series that are averaged into its normalisation. That
#: end is where the chamber is linear but also where a reading is noisiest (background, display
#: resolution), and one reading alone would shift every other point's deviation by its own noise.
DECAY_NORMALISATION_POINTS = 3

#: Sleeve-corrected readings averaged into the reference of a sleeve test: the most attenuating sleeve
#: alone. It is the chamber's lowest current, and every further sleeve brings a higher current, which
#: is exactly what the test is meant to examine rather than to average in.
SLEEVE_NORMALISATION_POINTS = 1


def _time_ordered_series(series: Sequence[TimedReading], normalisation_points: int) -> tuple[TimedReading, ...]:
    """The series in time order, after checking it can be judged by the decay method."""
    if len(series) < 3:
        raise QcInputError(f"linearity by decay needs at least 3 readings, got {len(series)}")
    if not 1 <= normalisation_points < len(series):
        raise QcInputError(
            f"the normalisation needs between 1 and {len(series) - 1} readings of this series "
            f"(at least one must be left to judge), got {normalisation_points}"
        )
    readings = [TimedReading(p.time_ns, require_positive("linearity reading", p.activity_bq), p.label) for p in series]
    points = tuple(sorted(readings, key=lambda point: point.time_ns))
    if points[-1].time_ns == points[0].time_ns:
        raise QcInputError("linearity by decay needs readings at different times")
    return points


@dataclass(frozen=True, slots=True)
class _Normalisation:
    """The activity a decay series is judged against: its low-activity end, carried with the known half-life.

    The last readings of a decaying series are the smallest chamber currents, far from ion
    recombination and range limits, so that end is taken as right and every point is compared with
    what it implies. `activity_bq` is the mean of those readings decay-corrected to `time_ns` (the last
    reading's time); `indices` are their positions in the time-ordered series.
    """

    nuclide: Nuclide
    time_ns: int
    activity_bq: float
    indices: tuple[int, ...]
    sem_pct: float | None

    def expected_at(self, time_ns: int) -> float:
        """The activity in the chamber at `time_ns` if it decays with the library half-life."""
        return _decayed(self.activity_bq, self.nuclide, (time_ns - self.time_ns) / _NS_PER_S)

    def describe(self) -> dict[str, object]:
        return {
            "points": [index + 1 for index in self.indices],
            "time": iso_utc(self.time_ns),
            "time_ns": self.time_ns,
            "activity_bq": self.activity_bq,
            "standard_error_pct": self.sem_pct,
        }


def _normalise(nuclide: Nuclide, points: Sequence[TimedReading], count: int) -> _Normalisation:
    """The mean of the last `count` readings, each decay-corrected to the time of the last one.

    The standard error of that mean (None for one reading) says how far the whole series may be
    shifted by the noise of its own low end.
    """
    indices = tuple(range(len(points) - count, len(points)))
    to_ns = points[-1].time_ns
    corrected = [_decayed(points[i].activity_bq, nuclide, (to_ns - points[i].time_ns) / _NS_PER_S) for i in indices]
    mean = statistics.fmean(corrected)
    sem_pct = statistics.stdev(corrected) / math.sqrt(count) / mean * 100.0 if count > 1 else None
    return _Normalisation(nuclide, to_ns, mean, indices, sem_pct)


@dataclass(frozen=True, slots=True)
class _DecaySeries:
    """A time-ordered decay series, its normalisation, and each reading against the decay-law expectation."""

    points: tuple[TimedReading, ...]
    normalisation: _Normalisation
    expected_bq: tuple[float, ...]
    deviation_pct: tuple[float, ...]

    def linear_range(self, limit: Limit) -> tuple[float, float] | None:
        """Readings from the lowest up to the highest one below which every reading passes `limit`.

        None if the lowest reading itself does not pass. This is the range a sleeve may be
        calibrated in: a factor taken above it would carry the non-linearity into every later test.
        """
        order = sorted(range(len(self.points)), key=lambda i: self.points[i].activity_bq)
        passing = 0
        while passing < len(order) and limit.judge(self.deviation_pct[order[passing]]) == "pass":
            passing += 1
        if passing == 0:
            return None
        return self.points[order[0]].activity_bq, self.points[order[passing - 1]].activity_bq


def _against_decay(nuclide: Nuclide, series: Sequence[TimedReading], normalisation_points: int) -> _DecaySeries:
    """Each reading of `series` against the activity its low end implies at that time (known half-life)."""
    points = _time_ordered_series(series, normalisation_points)
    normalisation = _normalise(nuclide, points, normalisation_points)
    expected = tuple(normalisation.expected_at(point.time_ns) for point in points)
    deviations = tuple(deviation_pct(point.activity_bq, e) for point, e in zip(points, expected))
    return _DecaySeries(points, normalisation, expected, deviations)


def _half_life_fit(nuclide: Nuclide, points: Sequence[TimedReading]) -> dict[str, object]:
    """The half-life a free log-linear fit gives, reported beside the verdict and never judged.

    A free fit cannot judge linearity: a response proportional to A^(1+k) decays with T/(1+k) and stays
    perfectly log-linear, so the fit absorbs the error. It can name a slope error (a wrong nuclide
    setting, a long-lived impurity, a clock error) and size it. Its standard uncertainty comes from the
    residuals (n - 2 degrees of freedom) and is combined with the library's. `end_to_end_deviation_pct`
    turns the difference into the linearity limit's unit: how far the first reading would be from the
    expectation set by the last one if the series decayed with the fitted half-life.
    """
    t0 = points[0].time_ns
    t_s = np.array([(point.time_ns - t0) / _NS_PER_S for point in points])
    log_activity = np.log([point.activity_bq for point in points])
    slope, intercept = (float(c) for c in np.polyfit(t_s, log_activity, 1))
    dof = len(points) - 2
    if slope >= 0:
        # No half-life to report, but the fit is a diagnostic: the verdict stands on the
        # per-point deviations (which show such a series plainly), so say so instead of aborting.
        return {
            "half_life_s": None,
            "fitted_slope_per_s": slope,
            "degrees_of_freedom": dof,
            "span_half_lives": float(t_s[-1]) / nuclide.half_life_s,
            "note": "the readings do not decay (fitted slope >= 0): no half-life fitted; "
            "check the series, the clock and the nuclide setting",
            "judged": False,
        }
    residuals = log_activity - (intercept + slope * t_s)
    slope_sigma = math.sqrt(float(residuals @ residuals) / dof / float(((t_s - t_s.mean()) ** 2).sum()))
    half_life_s = math.log(2.0) / -slope
    fit_sigma_s = half_life_s * slope_sigma / -slope
    sigma_s = math.hypot(fit_sigma_s, nuclide.half_life_unc_s)
    span_s = float(t_s[-1])
    difference_s = half_life_s - nuclide.half_life_s
    return {
        "half_life_s": half_life_s,
        "fit_sigma_s": fit_sigma_s,
        "degrees_of_freedom": dof,
        "combined_sigma_s": sigma_s,
        "difference_pct": difference_s / nuclide.half_life_s * 100.0,
        "difference_in_sigma": difference_s / sigma_s if sigma_s > 0 else None,
        "span_half_lives": span_s / nuclide.half_life_s,
        "end_to_end_deviation_pct": (2.0 ** (span_s / half_life_s - span_s / nuclide.half_life_s) - 1.0) * 100.0,
        "judged": False,
    }


def linearity_decay(
    nuclide: Nuclide,
    series: Sequence[TimedReading],
    limit: Limit,
    *,
    normalisation_points: int = DECAY_NORMALISATION_POINTS,
) -> QcResult:
    """Linearity by the decay method: every reading against the activity the known half-life predicts.

    A Tc-99m or F-18 source is read from the highest activity used clinically down to the lowest.
    The expectation is the series' own low-activity end (the mean of its last `normalisation_points`
    readings, decay-corrected with the library half-life), carried to each reading's time; each
    reading's deviation from it is that point's non-linearity and the worst one is judged by `limit`.
    Fitting the slope instead would absorb the error being tested for (see `_half_life_fit`), so the
    fitted half-life is only reported, with its uncertainty, in `inputs["half_life_fit"]`.
    """
    decay = _against_decay(nuclide, series, normalisation_points)
    points, normalisation = decay.points, decay.normalisation
    worst = _worst(decay.deviation_pct)
    linear_range = decay.linear_range(limit)
    inputs = {
        "method": "decay: each reading vs the activity expected from the library half-life, "
        "normalised at the low-activity end of the series",
        "nuclide": nuclide.name,
        "half_life_s": nuclide.half_life_s,
        "half_life_source": nuclide.source,
        "normalisation": normalisation.describe(),
        "points": [
            {
                "index": i + 1,
                "label": point.label,
                "time": iso_utc(point.time_ns),
                "time_ns": point.time_ns,
                "activity_bq": point.activity_bq,
                "expected_bq": expected,
                "deviation_pct": deviation,
                "normalisation": i in normalisation.indices,
            }
            for i, (point, expected, deviation) in enumerate(zip(points, decay.expected_bq, decay.deviation_pct))
        ],
        "worst_point": worst + 1,
        "linear_range_bq": None if linear_range is None else list(linear_range),
        "half_life_fit": _half_life_fit(nuclide, points),
    }
    first_norm, last_norm = normalisation.indices[0] + 1, normalisation.indices[-1] + 1
    normalised_at = f"point {last_norm}" if first_norm == last_norm else f"points {first_norm}-{last_norm}"
    return judged(
        "linearity",
        limit,
        measured=points[worst].activity_bq,
        expected=decay.expected_bq[worst],
        unit="Bq",
        time_ns=points[-1].time_ns,
        inputs=inputs,
        detail=f"{len(points)} points from {format_activity(points[0].activity_bq)} to "
        f"{format_activity(points[-1].activity_bq)}, normalised at {normalised_at} "
        f"(mean decay-corrected with {nuclide.name} T½ {nuclide.half_life_s / 3600:.4f} h, {nuclide.source}); "
        f"worst: point {worst + 1} at {iso_utc(points[worst].time_ns)}, {decay.deviation_pct[worst]:+.2f} %",
    )


def sleeve_factors(
    nuclide: Nuclide,
    series: Sequence[TimedReading],
    sleeves: Sequence[TimedReading],
    limit: Limit,
    *,
    normalisation_points: int = DECAY_NORMALISATION_POINTS,
) -> dict[str, float]:
    """Sleeve factors set up as TG-181 describes: from a decay series the sleeves are read along with.

    factor = activity the decay series implies at the sleeve reading's time (its low-activity end
    carried with the library half-life, as in `linearity_decay`) / sleeve reading, so that later
    `reading * factor` is the activity in the chamber. An unshielded reading is not the reference: at
    high activity it is the very non-linear quantity the sleeves are meant to detect. A sleeve reading
    outside the range the series shows to be linear (`limit`) is refused, because its factor would
    carry the non-linearity into every later test. Sleeves are named by `label`.
    """
    decay = _against_decay(nuclide, series, normalisation_points)
    linear_range = decay.linear_range(limit)
    if linear_range is None:
        raise QcInputError("the decay series is not linear even at its low end; sleeve factors cannot be set from it")
    low, high = linear_range
    factors: dict[str, float] = {}
    for sleeve in sleeves:
        if not sleeve.label:
            raise QcInputError("every sleeve reading needs a label naming the sleeve")
        if sleeve.label in factors:
            raise QcInputError(f"sleeve {sleeve.label!r} appears twice in the calibration run")
        reading = require_positive(f"calibration reading of sleeve {sleeve.label}", sleeve.activity_bq)
        if not low <= reading <= high:
            raise QcInputError(
                f"sleeve {sleeve.label}: calibration reading {format_activity(reading)} is outside the range the "
                f"decay series shows linear ({format_activity(low)} to {format_activity(high)}); "
                "read it when the source is in that range"
            )
        factors[sleeve.label] = decay.normalisation.expected_at(sleeve.time_ns) / reading
    if not factors:
        raise QcInputError("a sleeve calibration needs at least one sleeve reading")
    return factors


def _decay_corrected(nuclide: Nuclide, to_ns: int, readings: dict[str, tuple[int, float]]) -> dict[str, float]:
    """`readings` (label -> (time_ns, Bq)) each decay-corrected to `to_ns`."""
    return {label: _decayed(bq, nuclide, (to_ns - time_ns) / _NS_PER_S) for label, (time_ns, bq) in readings.items()}


@dataclass(frozen=True, slots=True)
class _Spread:
    """Activities at one time and their deviations from a reference activity; `worst` labels the largest."""

    corrected_bq: dict[str, float]
    reference_bq: float
    deviation_pct: dict[str, float]
    worst: str


def _spread(corrected_bq: dict[str, float], reference_bq: float) -> _Spread:
    deviations = {label: deviation_pct(value, reference_bq) for label, value in corrected_bq.items()}
    labels = list(deviations)
    return _Spread(corrected_bq, reference_bq, deviations, labels[_worst([deviations[label] for label in labels])])


def linearity_sleeve(
    nuclide: Nuclide,
    factors: dict[str, float],
    unshielded: TimedReading,
    sleeves: Sequence[TimedReading],
    limit: Limit,
    *,
    normalisation_points: int = SLEEVE_NORMALISATION_POINTS,
) -> QcResult:
    """Linearity by shielded sleeves: every sleeve-corrected reading against the low-current end.

    Readings are sleeve-corrected (factors from `sleeve_factors`) and decay-corrected to the
    unshielded reading's time. The reference is the mean of the `normalisation_points` readings with
    the lowest chamber reading (the most attenuating sleeves), where the chamber is linear, just as
    the decay method normalises at its low-activity end: a median or a mean of all readings would
    let the non-linear high-current readings pull the reference towards themselves.
    """
    unshielded_bq = require_positive("unshielded reading", unshielded.activity_bq)
    chamber = {"unshielded": unshielded_bq}  # label -> the reading as the chamber shows it
    scaled = {"unshielded": (unshielded.time_ns, unshielded_bq)}  # label -> (time, reading * factor)
    for sleeve in sleeves:
        if sleeve.label not in factors:
            raise QcInputError(
                f"no calibration factor for sleeve {sleeve.label!r}; known: {', '.join(sorted(factors))}"
            )
        if sleeve.label in chamber:
            raise QcInputError(f"sleeve {sleeve.label!r} appears twice in the test")
        reading = require_positive(f"reading of sleeve {sleeve.label}", sleeve.activity_bq)
        chamber[sleeve.label] = reading
        scaled[sleeve.label] = (sleeve.time_ns, reading * factors[sleeve.label])
    if not 1 <= normalisation_points < len(chamber):
        raise QcInputError(
            f"the normalisation needs between 1 and {len(chamber) - 1} of the {len(chamber)} readings, "
            f"got {normalisation_points}"
        )
    corrected = _decay_corrected(nuclide, unshielded.time_ns, scaled)
    lowest = sorted(chamber, key=chamber.__getitem__)[:normalisation_points]
    spread = _spread(corrected, statistics.fmean(corrected[label] for label in lowest))
    inputs = {
        "method": "sleeve: each sleeve-corrected reading vs the mean of the lowest chamber reading(s)",
        "nuclide": nuclide.name,
        "half_life_s": nuclide.half_life_s,
        "half_life_source": nuclide.source,
        "reference_time": iso_utc(unshielded.time_ns),
        "sleeve_factors": dict(factors),
        "normalisation": {"labels": lowest, "activity_bq": spread.reference_bq},
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
        detail=f"worst: {spread.worst} vs the mean of {', '.join(lowest)} (lowest chamber reading)",
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
    spread = _spread(_decay_corrected(nuclide, reference.time_ns, readings), reference_bq)
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
    measurement just as much as a contaminated chamber does. There is no expected value (the
    ideal is zero), so `expected` and `deviation_pct` are None.
    """
    value = float(reading_bq)
    if not math.isfinite(value):
        raise QcInputError(f"background reading must be a finite number, got {reading_bq!r}")
    return judged(
        "background",
        limit,
        measured=value,
        expected=None,
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
