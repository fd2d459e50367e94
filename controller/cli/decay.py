"""`hotlab decay`: decay-correct an activity between two moments, or ask a generator what it holds.

    hotlab decay Lu-177 7.4GBq --from 2026-11-20T12:00Z --to 2026-11-24T09:00Z --unit MBq
    hotlab decay Mo-99 20GBq --generator Tc-99m --since-elution 23h

Times are ISO 8601 with `Z` or an explicit offset (a bare date such as 2026-11-20 is 00:00 UTC):
a bare local time is refused, because the elapsed time across a daylight-saving change would
silently be off by an hour. Exit codes
follow controller/cli/main.py: 0 ok, 2 bad input (nuclide, unit, time, duration).
"""

from __future__ import annotations

import argparse
import math
import re
import time
from datetime import timedelta

import numpy as np

from hotlab.errors import InputError
from hotlab.physics.decay import (
    corrected_activity_uncertainty,
    decay_factor,
    elapsed_s,
    equilibrium_fraction,
    generator_daughter_activity,
)
from hotlab.physics.nuclides import NUCLIDES, Nuclide, get_nuclide
from hotlab.physics.units import canonical_unit, format_activity, from_bq, parse_activity
from hotlab.physics.utc_time import NS_PER_S, format_utc_ns, parse_utc_ns

_NEGATIVE_QUANTITY = re.compile(r"^-\.?\d")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|sec|min|m|h|d)\s*$", re.IGNORECASE)
_DURATION_UNIT_S = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class DecayInputError(InputError):
    """A command-line value that cannot be used; the message says what was expected."""


def parse_time(text: str) -> int:
    """An ISO 8601 moment with `Z` or an offset (or a bare date: 00:00 UTC), as UTC epoch ns.

    Read by the shared hotlab.physics.utc_time.parse_utc_ns, so a time means here what it means
    in a config file or a command payload.
    """
    try:
        return parse_utc_ns(text)
    except ValueError as exc:  # TimeFormatError, NaiveDatetimeError
        raise DecayInputError(str(exc)) from None


def parse_duration(text: str) -> timedelta:
    """A non-negative duration such as `23h`, `90 min`, `1.5d` or `45s`."""
    match = _DURATION.match(text)
    if not match:
        raise DecayInputError(f"cannot read duration {text!r}; use a number and s, min, h or d, e.g. 23h")
    return timedelta(seconds=float(match.group(1)) * _DURATION_UNIT_S[match.group(2).lower()])


def _half_life_text(nuclide: Nuclide) -> str:
    scales = (("y", 365.24219 * 86400.0), ("d", 86400.0), ("h", 3600.0), ("min", 60.0))
    unit, seconds = next(((u, s) for u, s in scales if nuclide.half_life_s >= 2 * s), ("s", 1.0))
    return f"{nuclide.half_life_s / seconds:.6g} ± {nuclide.half_life_unc_s / seconds:.2g} {unit} [{nuclide.source}]"


def _show(activity_bq: float, unit: str | None) -> str:
    return format_activity(activity_bq, unit, digits=6)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "decay",
        help="decay-correct an activity, or compute a generator's available daughter activity",
        description="Decay-correct ACTIVITY of NUCLIDE measured at --from to --to (both default to now). "
        "With --generator, NUCLIDE is the generator parent and ACTIVITY its calibrated activity at --from "
        "(default: the elution time).",
    )
    parser.add_argument("nuclide", help="e.g. Lu-177, 99mTc, Ga68")
    parser.add_argument("activity", nargs="+", metavar="ACTIVITY", help="activity with unit: 7.4GBq or 200 mCi")
    # "-5GBq" is an activity to refuse with a reason, not an unknown option: argparse takes only
    # plain negative numbers for positionals. Its matcher is private, but this is what it is for.
    parser._negative_number_matcher = _NEGATIVE_QUANTITY
    parser.add_argument("--from", dest="start", help="when ACTIVITY was measured (ISO 8601 with Z or offset)")
    parser.add_argument("--to", dest="end", help="moment to correct to (default now)")
    parser.add_argument("--unit", help="output unit: Bq, kBq, MBq, GBq, TBq, uCi, mCi, Ci (default: best SI prefix)")
    parser.add_argument("--generator", metavar="DAUGHTER", help="daughter to elute, e.g. Tc-99m from Mo-99")
    parser.add_argument(
        "--since-elution", metavar="DURATION", help="time since the last elution, e.g. 23h (with --generator)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Bad input (nuclide, unit, time) raises an InputError, which the CLI reports with exit 2."""
    nuclide = get_nuclide(args.nuclide)
    activity_bq = parse_activity(" ".join(args.activity), positive=True)  # `10 GBq` may come as two words
    unit = canonical_unit(args.unit) if args.unit else None
    end = parse_time(args.end) if args.end else time.time_ns()
    start = parse_time(args.start) if args.start else None
    if args.generator and not args.since_elution:
        raise DecayInputError("--generator needs --since-elution, e.g. --since-elution 23h")
    if args.since_elution and not args.generator:
        raise DecayInputError("--since-elution only makes sense with --generator DAUGHTER")
    # An activity near the float limit can overflow in the correction: that is reported as bad
    # input (_require_finite), so numpy's own warning would only be a second, confusing line.
    with np.errstate(over="ignore", invalid="ignore"):
        if args.generator:
            since_elution = parse_duration(args.since_elution)
            lines = _generator_report(
                nuclide, get_nuclide(args.generator), activity_bq, start, end, since_elution, unit
            )
        else:
            lines = _decay_report(nuclide, activity_bq, end if start is None else start, end, unit)
    print("\n".join(lines))
    return 0


def _require_finite(*values: float) -> None:
    if not all(math.isfinite(value) for value in values):
        raise DecayInputError("the activity is too large to decay-correct: the result overflows")


def _decay_report(nuclide: Nuclide, activity_bq: float, start: int, end: int, unit: str | None) -> list[str]:
    dt_s = float(elapsed_s(start, end))
    value, sigma = corrected_activity_uncertainty(activity_bq, nuclide, dt_s)
    _require_finite(float(value), float(sigma))
    shown_unit = unit or format_activity(float(value)).split()[-1]  # the SI prefix format_activity picks
    direction = "" if dt_s >= 0 else "  (back-correction: --to is before --from)"
    return [
        f"nuclide      {nuclide.name}  T1/2 = {_half_life_text(nuclide)}",
        f"activity     {_show(activity_bq, unit)} at {format_utc_ns(start)}",
        f"corrected    {_show(float(value), shown_unit)} ± {from_bq(float(sigma), shown_unit):.2g} {shown_unit}"
        f" at {format_utc_ns(end)}  (1 sigma from the half-life uncertainty)",
        f"elapsed      {dt_s / 3600.0:.4f} h = {dt_s / 86400.0:.5f} d{direction}",
        f"decay factor {float(decay_factor(nuclide.half_life_s, dt_s)):.6f}",
    ]


def _generator_report(
    parent: Nuclide,
    daughter: Nuclide,
    parent_bq: float,
    calibration: int | None,
    end: int,
    since_elution: timedelta,
    unit: str | None,
) -> list[str]:
    if parent.branching_to(daughter.name) is None:
        links = ", ".join(
            f"{n.name} -> {d.daughter}" for n in NUCLIDES.values() for d in n.decays if d.daughter in NUCLIDES
        )
        raise DecayInputError(
            f"{daughter.name} is not a daughter of {parent.name} in the library; known links: {links}"
        )
    elution = end - round(since_elution.total_seconds() * NS_PER_S)
    calibration = elution if calibration is None else calibration
    daughter_bq = float(generator_daughter_activity(parent_bq, calibration, parent, daughter, elution, end))
    parent_now = parent_bq * float(decay_factor(parent.half_life_s, float(elapsed_s(calibration, end))))
    _require_finite(daughter_bq, parent_now)
    lines = [
        f"generator    {parent.name} -> {daughter.name}",
        f"parent       {_show(parent_bq, unit)} at {format_utc_ns(calibration)}; "
        f"{_show(parent_now, unit)} at {format_utc_ns(end)}",
        f"last elution {format_utc_ns(elution)} "
        f"({since_elution.total_seconds() / 3600.0:.4f} h of ingrowth, no residual)",
        f"available    {_show(daughter_bq, unit)} of {daughter.name} at {format_utc_ns(end)}",
    ]
    if daughter.half_life_s < parent.half_life_s:
        fraction = float(equilibrium_fraction(parent, daughter, since_elution.total_seconds()))
        lines.append(f"equilibrium  {100.0 * fraction:.2f} % of the equilibrium daughter activity")
    return lines
