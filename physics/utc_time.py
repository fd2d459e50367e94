"""UTC time: the one parser every hotlab input goes through, epoch-nanosecond conversion, and the
one way a moment is written for people to the second.

Decay correction is only as good as the elapsed time it is given, so a moment is always UTC epoch
nanoseconds inside hotlab; a time without an offset is refused rather than guessed.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from hotlab.errors import InputError

#: A moment: a tz-aware datetime, UTC epoch nanoseconds (int or int64 array), or numpy datetime64.
TimeLike: TypeAlias = datetime | int | np.integer | np.datetime64 | npt.NDArray[np.integer] | npt.NDArray[np.datetime64]

#: Nanoseconds per second: the unit of every hotlab moment against the unit of every duration.
NS_PER_S = 1_000_000_000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class NaiveDatetimeError(InputError):
    """A datetime without a timezone: decay needs real elapsed time, which a naive local time cannot give."""


class TimeFormatError(InputError):
    """A value that is not a readable moment: bad ISO text, a float or bool, or an int not in epoch ns."""


#: Smallest integer taken as epoch nanoseconds: 1e17 ns is 1973-03-03. Epoch seconds (~1.8e9 today),
#: milliseconds (~1.8e12) and microseconds (~1.8e15) all fall below it, so a wrong unit cannot pass.
_MIN_PLAUSIBLE_NS = 10**17
#: int64 is what numpy and InfluxDB store a ns timestamp in (its limit is 2262-04-11).
_MAX_NS = 2**63 - 1
#: Fractional seconds after "hh:mm:ss"; read here because datetime.fromisoformat drops digits past the 6th.
_FRACTION = re.compile(r"(?<=:\d\d)[.,](\d+)")


def to_epoch_ns(moment: TimeLike) -> np.int64 | npt.NDArray[np.int64]:
    """UTC epoch nanoseconds of a tz-aware datetime, a datetime64 (array) or an epoch-ns int (array)."""
    if isinstance(moment, datetime):
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise NaiveDatetimeError(f"{moment.isoformat()} has no timezone; give UTC (Z) or an offset")
        delta = moment - _EPOCH
        time_ns = (delta.days * 86_400 + delta.seconds) * NS_PER_S + delta.microseconds * 1_000
        if not -_MAX_NS <= time_ns <= _MAX_NS:
            raise TimeFormatError(f"{moment.isoformat()} is beyond the int64 epoch-ns range (years 1677 to 2262)")
        return np.int64(time_ns)
    array = np.asarray(moment)
    if np.issubdtype(array.dtype, np.datetime64):
        return array.astype("datetime64[ns]").astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"a time must be a tz-aware datetime, datetime64 or integer epoch ns, got {array.dtype}")
    return array.astype(np.int64)


def format_utc_ns(time_ns: int) -> str:
    """`time_ns` as RFC 3339 UTC to the whole second (truncated), e.g. 2026-11-20T12:00:00Z.

    For messages and command output that people read, where a second is fine enough and the
    digits below it would only be noise; payloads keep `time_ns` itself.
    """
    moment = datetime.fromtimestamp(time_ns // NS_PER_S, UTC)
    return moment.replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


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
        ("seconds", "1e9")
        if magnitude < 10**11
        else ("milliseconds", "1e6")
        if magnitude < 10**14
        else ("microseconds", "1e3")
    )
    raise TimeFormatError(
        f"{value} is too small to be epoch nanoseconds (before 1973); if it is epoch {unit}, multiply by {factor}"
    )


def _midnight_utc_ns(day: date) -> int:
    return int(to_epoch_ns(datetime(day.year, day.month, day.day, tzinfo=UTC)))


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
