"""Activity units: parse and format at the edges, becquerel (float) everywhere inside.

1 Ci is defined as exactly 3.7e10 Bq (the curie's definition since 1953, adopted by the
ICRU; see also NIST SP 811, table 11), so every conversion here is exact up to float rounding.
"""

from __future__ import annotations

import math
import re
import sys

from hotlab.errors import InputError

CURIE_IN_BQ = 3.7e10

#: Multiplier from each accepted unit to becquerel. Keys are canonical spellings.
ACTIVITY_UNITS: dict[str, float] = {
    "Bq": 1.0,
    "kBq": 1e3,
    "MBq": 1e6,
    "GBq": 1e9,
    "TBq": 1e12,
    "uCi": CURIE_IN_BQ * 1e-6,
    "mCi": CURIE_IN_BQ * 1e-3,
    "Ci": CURIE_IN_BQ,
}

_CANONICAL = {name.lower(): name for name in ACTIVITY_UNITS}
_CANONICAL["µci"] = "uCi"
_CANONICAL["μci"] = "uCi"
#: Spellings that differ from a real unit only by the case of an SI prefix: "mBq" is a
#: millibecquerel, not a megabecquerel, so folding case would be off by 1e9. Refuse them.
_PREFIX_CASE_TRAPS = {"mBq": "MBq", "MCi": "mCi", "KBq": "kBq", "gBq": "GBq", "tBq": "TBq", "UCi": "uCi"}
_QUANTITY = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-zµμ]+)\s*$")


class UnitError(InputError):
    """An activity or unit that cannot be understood; the message lists what is allowed."""


def canonical_unit(unit: str) -> str:
    """Return the canonical spelling of an activity unit (`mci` -> `mCi`), or raise UnitError."""
    stripped = unit.strip()
    if stripped in _PREFIX_CASE_TRAPS:
        raise UnitError(
            f"ambiguous activity unit {unit!r}: the prefix's case matters (m = milli, M = mega); "
            f"did you mean {_PREFIX_CASE_TRAPS[stripped]}?"
        )
    try:
        return _CANONICAL[stripped.lower()]
    except KeyError:
        allowed = ", ".join(ACTIVITY_UNITS)
        raise UnitError(f"unknown activity unit {unit!r}; allowed: {allowed}") from None


def to_bq(value: float, unit: str) -> float:
    """Convert `value` in `unit` to becquerel."""
    return float(value) * ACTIVITY_UNITS[canonical_unit(unit)]


def from_bq(activity_bq: float, unit: str) -> float:
    """Convert becquerel to `unit`."""
    return float(activity_bq) / ACTIVITY_UNITS[canonical_unit(unit)]


def parse_activity(text: str, *, positive: bool = False) -> float:
    """Parse a quantity such as `7.4GBq`, `200 mCi` or `3.5e6 Bq` into becquerel.

    Zero is an activity (a background, an empty vial) unless `positive` says otherwise; a
    negative one never is. Neither is one beyond the float range: "1e400GBq" would otherwise
    come out as infinity and turn every result computed from it into inf or nan.
    """
    match = _QUANTITY.match(text)
    if not match:
        raise UnitError(f"cannot read activity {text!r}; expected a number and a unit, e.g. 7.4GBq or 200 mCi")
    value = float(match.group(1))
    if positive and not value > 0:
        raise UnitError(f"activity must be positive, got {text!r}")
    if value < 0:
        raise UnitError(f"activity must not be negative: {text!r}")
    activity_bq = to_bq(value, match.group(2))
    if not math.isfinite(activity_bq):
        raise UnitError(f"activity {text!r} is too large: the largest is {sys.float_info.max:.3g} Bq")
    return activity_bq


def format_activity(activity_bq: float, unit: str | None = None, digits: int = 4) -> str:
    """Format becquerel for people: in `unit` if given, else in the SI prefix that fits best."""
    if unit is not None:
        name = canonical_unit(unit)
        return f"{from_bq(activity_bq, name):.{digits}g} {name}"
    for name in ("TBq", "GBq", "MBq", "kBq"):
        if abs(activity_bq) >= ACTIVITY_UNITS[name]:
            return f"{activity_bq / ACTIVITY_UNITS[name]:.{digits}g} {name}"
    return f"{activity_bq:.{digits}g} Bq"
