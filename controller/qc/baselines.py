"""Constancy baselines: the chamber's own reading of its check source, and today's reading judged against it.

Constancy asks whether the chamber reads its check source as it did when it was known to be right
(at acceptance, after a service), on the source's own setting and on every clinically used setting.
So the reference is the same chamber's reading at that baseline, decay-corrected with the SOURCE's
half-life (a Cs-137 source read on the Tc-99m setting still decays as Cs-137), never the source's
certificate: comparing with the certificate is accuracy, a test of its own (calibrator_rules.accuracy).

A baseline is a `qc_baseline` record (controller/messages.py `qc_baseline_message`), one per
(calibrator, check source, setting), taken by a baseline procedure a QC officer starts
(controller/qc/procedures.py); the newest one per key is the reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hotlab.controller.messages import iso_utc
from hotlab.controller.qc.limits import Limit
from hotlab.controller.qc.result import QcInputError, QcResult, judged, require_not_before, require_positive
from hotlab.physics.decay import activity_at
from hotlab.physics.nuclides import Nuclide, get_nuclide

_NS_PER_S = 1e9


@dataclass(frozen=True, slots=True)
class Baseline:
    """The chamber's reading `activity_bq` of check source `source_id` on `setting` at `baseline_ns`."""

    msg_id: str
    device: str
    source_id: str
    setting: str
    source_nuclide: Nuclide
    activity_bq: float
    baseline_ns: int
    measurement_id: str
    procedure_id: str
    taken_by: Mapping[str, str]
    reason: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.device, self.source_id, self.setting)

    def expected_at(self, time_ns: int) -> float:
        """The reading the chamber should give at `time_ns`: the baseline decayed with the source's half-life."""
        require_not_before("measurement time", time_ns, f"baseline {self.msg_id}", self.baseline_ns)
        return float(activity_at(self.activity_bq, self.source_nuclide, (time_ns - self.baseline_ns) / _NS_PER_S))

    def describe(self) -> dict[str, Any]:
        """What a constancy result names as its reference: which record, when, who took it and why."""
        return {
            "baseline_id": self.msg_id,
            "baseline_bq": self.activity_bq,
            "baseline_ns": self.baseline_ns,
            "baseline_time": iso_utc(self.baseline_ns),
            "baseline_measurement_id": self.measurement_id,
            "baseline_taken_by": dict(self.taken_by),
            "baseline_reason": self.reason,
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Baseline:
        """A baseline from a qc_baseline payload (archived or just built); QcInputError if it cannot be read."""
        try:
            taken_by = payload["taken_by"]
            return cls(
                msg_id=str(payload["msg_id"]),
                device=str(payload["device"]),
                source_id=str(payload["source_id"]),
                setting=get_nuclide(str(payload["setting"])).name,
                source_nuclide=get_nuclide(str(payload["source_nuclide"])),
                activity_bq=require_positive("baseline activity", float(payload["activity_bq"])),
                baseline_ns=int(payload["baseline_ns"]),
                measurement_id=str(payload["measurement_id"]),
                procedure_id=str(payload["procedure_id"]),
                taken_by={"user": str(taken_by["user"]), "role": str(taken_by["role"])},
                reason=str(payload["reason"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise QcInputError(f"qc_baseline {payload.get('msg_id')} cannot be read: {exc!r}") from None


def constancy(
    baseline: Baseline,
    measured_bq: float,
    measured_ns: int,
    limit: Limit,
    *,
    inputs: Mapping[str, Any],
) -> QcResult:
    """Daily constancy on one setting: today's reading against the baseline decay-corrected to today.

    expected = baseline_bq * 2**(-(t - t_baseline) / T_half(source)); the deviation is judged by `limit`.
    `inputs` adds what identifies today's measurement (id, n, sd, reading ids).
    """
    measured = require_positive(f"constancy reading on the {baseline.setting} setting", measured_bq)
    expected = baseline.expected_at(measured_ns)
    nuclide = baseline.source_nuclide
    return judged(
        "constancy",
        limit,
        measured=measured,
        expected=expected,
        unit="Bq",
        time_ns=measured_ns,
        inputs={
            "source_id": baseline.source_id,
            "source_nuclide": nuclide.name,
            "half_life_s": nuclide.half_life_s,
            "half_life_source": nuclide.source,
            "setting": baseline.setting,
            "measured_ns": int(measured_ns),
            "measured_time": iso_utc(measured_ns),
            "elapsed_s": (measured_ns - baseline.baseline_ns) / _NS_PER_S,
            **baseline.describe(),
            **inputs,
        },
        detail=f"{nuclide.name} source {baseline.source_id} on the {baseline.setting} setting vs this chamber's "
        f"baseline of {iso_utc(baseline.baseline_ns)} (taken by {baseline.taken_by['user']}), decay-corrected "
        f"with the {nuclide.name} half-life",
    )
