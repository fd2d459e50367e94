"""Decay correction and generator ingrowth, vectorised with numpy.

Every function takes scalars or numpy arrays and broadcasts them, so the QC engine can
correct one reading and the benchmark a million with the same code. Scalars in give numpy
scalars out (`float()` them for JSON). Activity is in becquerel, time in seconds or UTC
epoch nanoseconds; the physics is the exponential law A(t) = A0 * 2**(-t / T1/2) and, for a
parent -> daughter pair, the two-member Bateman solution (H. Bateman, Proc. Camb. Phil. Soc.
15 (1910) 423).
"""

from __future__ import annotations

import re
from datetime import date, datetime, timezone
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from controller.nuclides import Nuclide, get_nuclide

ArrayLike: TypeAlias = float | int | np.floating | np.integer | npt.NDArray[np.floating] | npt.NDArray[np.integer]
#: A moment: a tz-aware datetime, UTC epoch nanoseconds (int or int64 array), or numpy datetime64.
TimeLike: TypeAlias = datetime | int | np.integer | np.datetime64 | npt.NDArray[np.integer] | npt.NDArray[np.datetime64]

LN2 = float(np.log(2.0))
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class NaiveDatetimeError(ValueError):
    """A datetime without a timezone: decay needs real elapsed time, which a naive local time cannot give."""


class TimeFormatError(ValueError):
    """A value that is not a readable moment: bad ISO text, a float or bool, or an int not in epoch ns."""


#: Smallest integer taken as epoch nanoseconds: 1e17 ns is 1973-03-03. Epoch seconds (~1.8e9 today),
#: milliseconds (~1.8e12) and microseconds (~1.8e15) all fall below it, so a wrong unit cannot pass.
_MIN_PLAUSIBLE_NS = 10**17
#: int64 is what numpy and InfluxDB store a ns timestamp in (its limit is 2262-04-11).
_MAX_NS = 2**63 - 1
#: Fractional seconds after "hh:mm:ss"; read here because datetime.fromisoformat drops digits past the 6th.
_FRACTION = re.compile(r"(?<=:\d\d)[.,](\d+)")


def _resolve(nuclide: str | Nuclide) -> Nuclide:
    return nuclide if isinstance(nuclide, Nuclide) else get_nuclide(nuclide)


def _positive(name: str, value: npt.ArrayLike) -> np.ndarray:
    array = np.asarray(value, dtype=float)
    if not np.all(array > 0):
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return array


def to_epoch_ns(moment: TimeLike) -> np.int64 | npt.NDArray[np.int64]:
    """UTC epoch nanoseconds of a tz-aware datetime, a datetime64 (array) or an epoch-ns int (array)."""
    if isinstance(moment, datetime):
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise NaiveDatetimeError(f"{moment.isoformat()} has no timezone; give UTC (Z) or an offset")
        delta = moment - _EPOCH
        return np.int64((delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000)
    array = np.asarray(moment)
    if np.issubdtype(array.dtype, np.datetime64):
        return array.astype("datetime64[ns]").astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"a time must be a tz-aware datetime, datetime64 or integer epoch ns, got {array.dtype}")
    return array.astype(np.int64)


def parse_utc_ns(value: Any) -> int:
    """UTC epoch nanoseconds of one moment, as every hotlab input (config, CLI, payload) must give it.

    One parser for all of them, so that a time means the same everywhere. Accepted:
    * a tz-aware datetime (e.g. a TOML offset date-time);
    * ISO 8601 text with `Z` or an offset, e.g. 2026-11-20T12:00Z or 2026-11-20 13:00:00.123456789+01:00
      (up to 9 fractional digits, kept exactly);
    * a bare ISO date such as 2026-11-01, or a date object (a TOML bare date), meaning 00:00 UTC of that
      day (the convention of `hotlab report`);
    * an int (or numpy integer) of epoch nanoseconds, if it is > 1e17 (after 1973-03-03).
    Refused: naive datetimes and date-times without offset (NaiveDatetimeError: across a daylight-saving
    change a local time is off by an hour); floats and bools (a float cannot hold epoch ns exactly, and a
    bool is no time); ints small enough to be seconds, ms or us (TimeFormatError naming the likely unit).
    """
    if isinstance(value, str):
        return _parse_iso_ns(value)
    if isinstance(value, datetime):
        return int(to_epoch_ns(value))
    if isinstance(value, date):
        return _midnight_utc_ns(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return _plausible_ns(int(value))
    raise TimeFormatError(
        f"expected a time (ISO 8601 text with Z or offset, a tz-aware datetime or integer epoch ns), "
        f"got {type(value).__name__} {value!r}"
    )


def _plausible_ns(value: int) -> int:
    if value > _MAX_NS:
        raise TimeFormatError(f"{value} is beyond the int64 epoch-ns range (year 2262)")
    if value >= _MIN_PLAUSIBLE_NS:
        return value
    magnitude = abs(value)
    unit, factor = (
        ("seconds", "1e9") if magnitude < 10**11 else ("milliseconds", "1e6") if magnitude < 10**14 else ("microseconds", "1e3")
    )
    raise TimeFormatError(
        f"{value} is too small to be epoch nanoseconds (before 1973); if it is epoch {unit}, multiply by {factor}"
    )


def _midnight_utc_ns(day: date) -> int:
    return int(to_epoch_ns(datetime(day.year, day.month, day.day, tzinfo=timezone.utc)))


def _parse_iso_ns(text: str) -> int:
    stripped = text.strip()
    try:
        day = date.fromisoformat(stripped)
    except ValueError:
        pass
    else:
        return _midnight_utc_ns(day)
    if stripped.endswith("z"):  # RFC 3339 allows a lower-case z; fromisoformat does not
        stripped = stripped[:-1] + "Z"
    fraction = _FRACTION.search(stripped)
    digits = fraction.group(1) if fraction else ""
    if len(digits) > 9:
        raise TimeFormatError(f"time {text!r} has more than 9 fractional digits; nanoseconds are the finest unit")
    whole = _FRACTION.sub("", stripped, count=1)
    try:
        moment = datetime.fromisoformat(whole)
    except ValueError:
        raise TimeFormatError(
            f"cannot read time {text!r}; use ISO 8601 with Z or an offset, e.g. 2026-11-20T12:00Z, or a date 2026-11-01"
        ) from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise NaiveDatetimeError(f"time {text!r} has no timezone; add Z for UTC or an offset such as +01:00")
    return int(to_epoch_ns(moment)) + int(digits.ljust(9, "0"))


def elapsed_s(from_time: TimeLike, to_time: TimeLike) -> np.floating | npt.NDArray[np.floating]:
    """Seconds from `from_time` to `to_time` (negative if `to_time` is earlier).

    The difference is taken in integer nanoseconds before converting, so epoch-sized
    values lose no precision.
    """
    return (to_epoch_ns(to_time) - to_epoch_ns(from_time)) / 1e9


def decay_factor(half_life_s: ArrayLike, dt_s: ArrayLike) -> np.floating | npt.NDArray[np.floating]:
    """A(t0 + dt) / A(t0) = 2**(-dt / T1/2); dt < 0 goes back in time (factor > 1)."""
    return np.exp2(-np.asarray(dt_s, dtype=float) / _positive("half-life", half_life_s))


def activity_at(a0_bq: ArrayLike, nuclide: str | Nuclide, dt_s: ArrayLike) -> np.floating | npt.NDArray[np.floating]:
    """Activity dt_s seconds after (or before, if negative) a moment when it was a0_bq."""
    return np.asarray(a0_bq, dtype=float) * decay_factor(_resolve(nuclide).half_life_s, dt_s)


def decay_correct(
    activity_bq: ArrayLike, nuclide: str | Nuclide, from_time: TimeLike, to_time: TimeLike
) -> np.floating | npt.NDArray[np.floating]:
    """Carry an activity measured at `from_time` to `to_time`, forward or backward."""
    return activity_at(activity_bq, nuclide, elapsed_s(from_time, to_time))


def time_to_reach(a0_bq: ArrayLike, target_bq: ArrayLike, nuclide: str | Nuclide) -> np.floating | npt.NDArray[np.floating]:
    """Seconds until an activity a0_bq has decayed to target_bq: T1/2 * log2(a0 / target).

    Negative when target_bq is above a0_bq: that is how long ago the activity was target_bq.
    """
    ratio = _positive("a0_bq", a0_bq) / _positive("target_bq", target_bq)
    return _resolve(nuclide).half_life_s * np.log2(ratio)


def corrected_activity_uncertainty(
    activity_bq: ArrayLike, nuclide: str | Nuclide, dt_s: ArrayLike, activity_sigma_bq: ArrayLike = 0.0
) -> tuple[np.floating | npt.NDArray[np.floating], np.floating | npt.NDArray[np.floating]]:
    """Decay-corrected activity and its standard uncertainty (value, sigma).

    A = A0 * exp(-ln2 * dt / T). First-order propagation of the half-life uncertainty u(T):
        dA/dT = A * ln2 * dt / T**2   ->   u_T(A) = |A| * ln2 * |dt| * u(T) / T**2
    and of the measured activity's own uncertainty u(A0) (0 unless given): u_A0(A) = f * u(A0)
    with f the decay factor; the two are independent and add in quadrature (GUM, JCGM 100:2008 §5.1).
    """
    data = _resolve(nuclide)
    dt = np.asarray(dt_s, dtype=float)
    factor = decay_factor(data.half_life_s, dt)
    value = np.asarray(activity_bq, dtype=float) * factor
    sigma_half_life = np.abs(value) * LN2 * np.abs(dt) * data.half_life_unc_s / data.half_life_s**2
    sigma_activity = factor * np.asarray(activity_sigma_bq, dtype=float)
    return value, np.hypot(sigma_half_life, sigma_activity)


def _link_branching(parent: Nuclide, daughter: Nuclide, branching: float | None) -> float:
    if branching is not None:
        return float(branching)
    fraction = parent.branching_to(daughter.name)
    if fraction is None:
        raise ValueError(f"{daughter.name} is not a listed daughter of {parent.name}; pass branching= explicitly")
    return fraction


def _one_minus_exp_over_x(x: npt.NDArray[np.floating]) -> npt.NDArray[np.floating]:
    """(1 - exp(-x)) / x for x >= 0, equal to 1 at x = 0 and accurate for tiny x (expm1)."""
    safe = np.where(x == 0.0, 1.0, x)
    return np.where(x == 0.0, 1.0, -np.expm1(-safe) / safe)


def daughter_activity(
    parent_a0_bq: ArrayLike,
    parent: str | Nuclide,
    daughter: str | Nuclide,
    t_s: ArrayLike,
    residual_daughter_bq: ArrayLike = 0.0,
    branching: float | None = None,
) -> np.floating | npt.NDArray[np.floating]:
    """Daughter activity t_s seconds after the last elution (Bateman, two members).

    parent_a0_bq is the parent activity at the elution, residual_daughter_bq the daughter
    activity left on the column right after it (it then simply decays). branching defaults to
    the library's parent -> daughter link.

        A_d(t) = b * lambda_d * A_p0 * (exp(-lambda_p t) - exp(-lambda_d t)) / (lambda_d - lambda_p)
                 + A_d0 * exp(-lambda_d t)

    The ingrowth term is symmetric in the two constants and is evaluated as
    t * exp(-lambda_min t) * (1 - exp(-dx)) / dx with dx = (lambda_max - lambda_min) t >= 0, which
    stays exact when the half-lives are equal or nearly so (no 0/0) and never overflows.
    """
    parent_data, daughter_data = _resolve(parent), _resolve(daughter)
    b = _link_branching(parent_data, daughter_data, branching)
    t = np.asarray(t_s, dtype=float)
    if np.any(t < 0):
        raise ValueError("t_s is time since the elution and must be >= 0")
    lam_p, lam_d = parent_data.decay_constant_per_s, daughter_data.decay_constant_per_s
    lam_lo, lam_hi = min(lam_p, lam_d), max(lam_p, lam_d)
    ingrowth = t * np.exp(-lam_lo * t) * _one_minus_exp_over_x((lam_hi - lam_lo) * t)
    return b * lam_d * np.asarray(parent_a0_bq, dtype=float) * ingrowth + np.asarray(
        residual_daughter_bq, dtype=float
    ) * np.exp(-lam_d * t)


def generator_daughter_activity(
    parent_cal_bq: ArrayLike,
    cal_time: TimeLike,
    parent: str | Nuclide,
    daughter: str | Nuclide,
    last_elution_time: TimeLike,
    at_time: TimeLike,
    residual_daughter_bq: ArrayLike = 0.0,
) -> np.floating | npt.NDArray[np.floating]:
    """Daughter activity on a generator column at `at_time`.

    The parent is decayed from its calibration (activity parent_cal_bq at cal_time, as on the
    generator's certificate) to the last elution, then the daughter grows in from there
    (`daughter_activity`). This is the expected activity an elution at `at_time` can yield at
    100 % efficiency; the QC elution-yield rule divides the measured eluate by it.
    """
    parent_at_elution = decay_correct(parent_cal_bq, parent, cal_time, last_elution_time)
    since_elution = elapsed_s(last_elution_time, at_time)
    if np.any(since_elution < 0):
        raise ValueError("at_time is before last_elution_time")
    return daughter_activity(parent_at_elution, parent, daughter, since_elution, residual_daughter_bq)


def time_of_max_daughter(parent: str | Nuclide, daughter: str | Nuclide) -> float:
    """Seconds after an elution at which the daughter activity peaks: ln(lambda_d/lambda_p) / (lambda_d - lambda_p).

    Written as log1p(r - 1) / (lambda_p (r - 1)) with r = lambda_d / lambda_p so that equal
    half-lives give the limit 1 / lambda instead of 0/0.
    """
    lam_p = _resolve(parent).decay_constant_per_s
    r_minus_1 = _resolve(daughter).decay_constant_per_s / lam_p - 1.0
    if r_minus_1 == 0.0:
        return 1.0 / lam_p
    return float(np.log1p(r_minus_1) / (lam_p * r_minus_1))


def equilibrium_fraction(
    parent: str | Nuclide, daughter: str | Nuclide, t_s: ArrayLike
) -> np.floating | npt.NDArray[np.floating]:
    """How far a freshly eluted generator has grown back toward equilibrium after t_s seconds.

    Ratio of the daughter activity to its equilibrium value at the same moment,
    b * lambda_d / (lambda_d - lambda_p) * A_p(t); for a zero residual this is
    1 - exp(-(lambda_d - lambda_p) t), independent of branching. Only defined when the daughter
    is shorter-lived than the parent (transient or secular equilibrium exists).
    """
    lam_p, lam_d = _resolve(parent).decay_constant_per_s, _resolve(daughter).decay_constant_per_s
    if lam_d <= lam_p:
        raise ValueError("no equilibrium: the daughter does not decay faster than the parent")
    t = np.asarray(t_s, dtype=float)
    if np.any(t < 0):
        raise ValueError("t_s is time since the elution and must be >= 0")
    return -np.expm1(-(lam_d - lam_p) * t)
