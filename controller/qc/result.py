"""What every QC rule returns (a `QcResult`) or raises (a `QcInputError`).

A result is self-contained: measured and expected values, the deviation, the limit that
judged it (text, numbers and source) and every input the rule used, so a reviewer can
recompute the verdict months later from the stored message alone. What each field means is
defined once, on `QcResult`, and holds for every test.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hotlab.controller.messages import MSG_ID_NAMESPACE, Message, iso_utc, qc_message
from hotlab.controller.qc.limits import Limit, LimitKind, Verdict
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
    """One verdict of one QC test. Every field means the same in every result:

    - `measured`: the value the test measured or derived from measurements, in `unit`.
    - `expected`: the value `measured` would have if the instrument or product were exactly right
      (a decay-corrected certificate or reference, the prescription, the Bateman-available daughter,
      the library half-life), in `unit`; None where there is no such value (an impurity, a
      background, a forecast: the ideal is zero or unknown, and the limit is not a deviation).
    - `deviation_pct`: 100 * (measured - expected) / expected, present only when the limit judges
      it (tolerance tests); None otherwise, so no number is ever read as a margin that was not judged.
    - `value_judged`: what the limit was applied to, in the limit's unit (`limit.unit`): the
      deviation for a tolerance, the quantity itself (yield, ratio, half-life, reading) otherwise.
    - `limit_reached_ns`: for a ratio that grows with time (Mo-99, Lu-177m), when it reaches the
      fail level (the product's expiry by this test); None for every other test.
    - `procedure_id`: the QC procedure the result belongs to, or None.
    """

    test: str
    verdict: Verdict
    measured: float
    expected: float | None
    deviation_pct: float | None
    unit: str
    limit: Limit
    value_judged: float
    time_ns: int
    inputs: Mapping[str, Any] = field(default_factory=dict)
    detail: str = ""
    limit_reached_ns: int | None = None
    procedure_id: str | None = None

    @property
    def alarm(self) -> bool:
        """True for warn and fail: the result needs a person's attention."""
        return self.verdict != "pass"

    def to_message(self, site: str, station: str, device: str) -> Message:
        """The qc_result message on hotlab/<site>/<station>/<device>/qc.

        Alarms are not a second message: the payload carries ``alarm: true`` and the sinks
        publish it on the same topic, so a verdict is committed, sent and stored exactly once.
        The msg_id is name-based on what was judged and how (device, test, time, procedure, inputs,
        verdict, value, limit), so
        the same inputs judged again (a batch processed again after a failed commit, a restart)
        give the same message.
        """
        name = json.dumps(
            [
                "qc_result",
                site,
                device,
                self.test,
                self.time_ns,
                self.procedure_id,
                dict(self.inputs),
                self.verdict,
                self.measured,
                self.limit.text,
            ],  # fmt: skip
            sort_keys=True,
            default=str,
        )
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
            procedure_id=self.procedure_id,
            msg_id=uuid.uuid5(MSG_ID_NAMESPACE, name).hex,
        )
        extra = {
            "alarm": self.alarm,
            "unit": self.unit,
            "value_judged": float(self.value_judged),
            "limit_values": self.limit.as_dict(),
            "limit_reached_ns": self.limit_reached_ns,
            "detail": self.detail,
        }
        return Message(base.kind, base.topic, base.payload | extra)


def judged(
    test: str,
    limit: Limit,
    *,
    measured: float,
    expected: float | None,
    unit: str,
    time_ns: int,
    inputs: Mapping[str, Any],
    value: float | None = None,
    detail: str = "",
    limit_reached_ns: int | None = None,
) -> QcResult:
    """Build a result: a tolerance judges the deviation of measured from expected, any other limit `value`.

    The two are exclusive so that `deviation_pct` exists exactly when it was judged (see QcResult).
    """
    if limit.kind is LimitKind.TOLERANCE:
        if expected is None or value is not None:
            raise ValueError(f"{test}: a tolerance judges the deviation from an expected value, not a value")
        value_judged = deviation_pct(measured, expected)
        deviation: float | None = value_judged
    else:
        if value is None:
            raise ValueError(f"{test}: a {limit.kind} limit needs the value it judges")
        value_judged, deviation = float(value), None
    return QcResult(
        test=test,
        verdict=limit.judge(value_judged),
        measured=float(measured),
        expected=None if expected is None else float(expected),
        deviation_pct=deviation,
        unit=unit,
        limit=limit,
        value_judged=value_judged,
        time_ns=int(time_ns),
        inputs=dict(inputs),
        detail=detail,
        limit_reached_ns=limit_reached_ns,
    )
