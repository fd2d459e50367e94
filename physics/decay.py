"""Decay correction and generator ingrowth, vectorised with numpy.

Every function takes scalars or numpy arrays and broadcasts them, so the QC engine can
correct one reading and the benchmark a million with the same code. Scalars in give numpy
scalars out (`float()` them for JSON). Activity is in becquerel, time in seconds or UTC
epoch nanoseconds; the physics is the exponential law A(t) = A0 * 2**(-t / T1/2) and, for a
parent -> daughter pair, the two-member Bateman solution (H. Bateman, Proc. Camb. Phil. Soc.
15 (1910) 423).
"""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from hotlab.physics.nuclides import Nuclide, get_nuclide
from hotlab.physics.utc_time import TimeLike, to_epoch_ns

ArrayLike: TypeAlias = float | int | np.floating | np.integer | npt.NDArray[np.floating] | npt.NDArray[np.integer]

LN2 = float(np.log(2.0))


def _resolve(nuclide: str | Nuclide) -> Nuclide:
    return nuclide if isinstance(nuclide, Nuclide) else get_nuclide(nuclide)


def _positive(name: str, value: npt.ArrayLike) -> npt.NDArray[np.float64]:
    array = np.asarray(value, dtype=np.float64)
    if not np.all(array > 0):
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return array


def elapsed_s(from_time: TimeLike, to_time: TimeLike) -> np.floating | npt.NDArray[np.floating]:
    """Seconds from `from_time` to `to_time` (negative if `to_time` is earlier).

    The difference is taken in integer nanoseconds before converting, so epoch-sized
    values lose no precision.
    """
    return (to_epoch_ns(to_time) - to_epoch_ns(from_time)) / 1e9


def decay_factor(half_life_s: ArrayLike, dt_s: ArrayLike) -> np.floating | npt.NDArray[np.floating]:
    """A(t0 + dt) / A(t0) = 2**(-dt / T1/2); dt < 0 goes back in time (factor > 1)."""
    return np.exp2(-np.asarray(dt_s, dtype=np.float64) / _positive("half-life", half_life_s))


def activity_at(a0_bq: ArrayLike, nuclide: str | Nuclide, dt_s: ArrayLike) -> np.floating | npt.NDArray[np.floating]:
    """Activity dt_s seconds after (or before, if negative) a moment when it was a0_bq."""
    return np.asarray(a0_bq, dtype=np.float64) * decay_factor(_resolve(nuclide).half_life_s, dt_s)


def decay_correct(
    activity_bq: ArrayLike, nuclide: str | Nuclide, from_time: TimeLike, to_time: TimeLike
) -> np.floating | npt.NDArray[np.floating]:
    """Carry an activity measured at `from_time` to `to_time`, forward or backward."""
    return activity_at(activity_bq, nuclide, elapsed_s(from_time, to_time))


def time_to_reach(
    a0_bq: ArrayLike, target_bq: ArrayLike, nuclide: str | Nuclide
) -> np.floating | npt.NDArray[np.floating]:
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
    dt = np.asarray(dt_s, dtype=np.float64)
    factor = decay_factor(data.half_life_s, dt)
    value = np.asarray(activity_bq, dtype=np.float64) * factor
    sigma_half_life = np.abs(value) * LN2 * np.abs(dt) * data.half_life_unc_s / data.half_life_s**2
    sigma_activity = factor * np.asarray(activity_sigma_bq, dtype=np.float64)
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
    t = np.asarray(t_s, dtype=np.float64)
    if np.any(t < 0):
        raise ValueError("t_s is time since the elution and must be >= 0")
    lam_p, lam_d = parent_data.decay_constant_per_s, daughter_data.decay_constant_per_s
    lam_lo, lam_hi = min(lam_p, lam_d), max(lam_p, lam_d)
    ingrowth = t * np.exp(-lam_lo * t) * _one_minus_exp_over_x((lam_hi - lam_lo) * t)
    return b * lam_d * np.asarray(parent_a0_bq, dtype=np.float64) * ingrowth + np.asarray(
        residual_daughter_bq, dtype=np.float64
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
    t = np.asarray(t_s, dtype=np.float64)
    if np.any(t < 0):
        raise ValueError("t_s is time since the elution and must be >= 0")
    return -np.expm1(-(lam_d - lam_p) * t)
