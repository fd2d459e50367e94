"""What every QC rule returns (a `QcResult`) or raises (a `QcInputError`).

A result is self-contained: measured and expected values, the deviation, the limit that
judged it (text, numbers and source) and every input the rule used, so a reviewer can
recompute the verdict months later from the stored message alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hotlab.controller.messages import Message, iso_utc, qc_message
from hotlab.controller.qc.limits import Limit, Verdict
from hotlab.errors import InputError


class QcInputError(InputError):
    """Input a QC rule cannot judge (negative activity, times out of order, too early a re-measurement)."""


def require_positive(name: str, value: float) -> float:
    """`value` as float if it is a finite number > 0, else a QcInputError naming it."""
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise QcInputError(f"{name} must be a positive finite number, got {value!r}")
    return number


def require_non_negative(name: str, value: float) -> float:
    """`value` as float if it is a finite number >= 0, else a QcInputError naming it."""
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise QcInputError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def require_not_before(later_name: str, later_ns: int, earlier_name: str, earlier_ns: int) -> None:
    """Reject a time that lies before the time it is decay-corrected from (a typo or a clock error)."""
    if later_ns < earlier_ns:
        raise QcInputError(
            f"{later_name} ({iso_utc(later_ns)}) is before {earlier_name} ({iso_utc(earlier_ns)}); check the dates"
        )


def deviation_pct(measured: float, expected: float) -> float:
    """Signed relative deviation of `measured` from `expected` in percent."""
    return (measured / expected - 1.0) * 100.0


@dataclass(frozen=True, slots=True)
class QcResult:
    """One verdict of one QC test.

    `deviation_pct` is always 100 * (measured - expected) / expected. For limit-only tests
    (breakthrough, background) `expected` is the limit itself, so the deviation reads as
    the margin to the limit (negative = below it). `value_judged` is what the limit was
    applied to (the deviation for tolerances, e.g. the yield in % for a floor).
    """

    test: str
    verdict: Verdict
    measured: float
    expected: float
    deviation_pct: float
    unit: str
    limit: Limit
    value_judged: float
    time_ns: int
    inputs: Mapping[str, Any] = field(default_factory=dict)
    detail: str = ""

    @property
    def alarm(self) -> bool:
        """True for warn and fail: the result needs a person's attention."""
        return self.verdict != "pass"

    def to_message(self, site: str, station: str, device: str) -> Message:
        """The qc_result message on hotlab/<site>/<station>/<device>/qc.

        Alarms are not a second message: the payload carries ``alarm: true`` and the sinks
        publish it on the same topic, so a verdict is committed, sent and stored exactly once.
        """
        base = qc_message(
            site,
            station,
            device,
            test=self.test,
            verdict=self.verdict,
            measured=self.measured,
            expected=self.expected,
            deviation_pct=self.deviation_pct,
            limit=self.limit.text,
            limit_source=self.limit.source,
            inputs=dict(self.inputs),
            time_ns=self.time_ns,
        )
        extra = {
            "alarm": self.alarm,
            "unit": self.unit,
            "value_judged": float(self.value_judged),
            "limit_values": self.limit.as_dict(),
            "detail": self.detail,
        }
        return Message(base.kind, base.topic, base.payload | extra)


def judged(
    test: str,
    limit: Limit,
    *,
    measured: float,
    expected: float,
    unit: str,
    time_ns: int,
    inputs: Mapping[str, Any],
    value: float | None = None,
    detail: str = "",
) -> QcResult:
    """Build a result: the limit judges `value`, or the deviation of measured from expected if omitted."""
    deviation = deviation_pct(measured, expected)
    value_judged = deviation if value is None else float(value)
    return QcResult(
        test=test,
        verdict=limit.judge(value_judged),
        measured=float(measured),
        expected=float(expected),
        deviation_pct=deviation,
        unit=unit,
        limit=limit,
        value_judged=value_judged,
        time_ns=int(time_ns),
        inputs=dict(inputs),
        detail=detail,
    )
