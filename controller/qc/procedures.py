"""QC procedures: daily check, baseline, linearity, geometry, Ga-68 identity, Ge-68 follow-up: records with steps.

A QC test is something a person performs, not one verdict per reading: a daily constancy check is
the empty chamber's background, then the check source on each configured setting, one result per
setting. A procedure starts with an audited `start_qc` command (controller/qc/procedure_commands.py)
or, for daily constancy, when the calibrator's check source is measured on its own setting while no
procedure is open; it ends `complete` when every step has its result, `incomplete` when it cannot
be finished (a timeout, no baseline for a setting, a rule that refuses the measurement) and
`aborted` by an `end_qc` command. Both ends are `qc_procedure` records with the same procedure_id.

Steps are `measurement` records (controller/measurements.py: mean, sd and n of settled readings),
never raw polls. A measurement made while a procedure is open is taken only if it is plausibly the
procedure's source, so a patient dose measured in between is not mistaken for a step:

* daily constancy and baseline: a measurement on a setting the procedure still needs, and
  - on the check source's own setting (nothing else is measured on a Cs-137/Co-57/Ba-133 setting), or
  - the continuation of a setting change with the source still in: the previous step did not end
    with the source's removal, the setting differs, and no reading since that step fell to
    `SOURCE_LEFT_FRACTION` of it (the chamber never emptied), or
  - within `STEP_BAND_PCT` of that setting's baseline expectation (wide enough that a failing
    chamber is still judged, narrow enough that a dose of another activity is not taken);
* linearity: on the series' setting, the first one, then each within `STEP_BAND_PCT` of the previous
  step decayed to its time (the same vial, read again later);
* ge68_breakthrough: the next measurement on the Ga-68 setting (the eluate kept for the test);
* geometry, sleeve_linearity and ga68_half_life, whose steps are labelled (`step_labels`: the
  geometries with the reference first; unshielded then each configured sleeve; the first and the
  second reading): on the procedure's setting, the first one, then each, once multiplied by its
  sleeve's factor, within `STEP_BAND_PCT` of the first step decayed to its time (the same source
  in another container, sleeve, or later). The procedure is judged when every label has its step.

This module holds a procedure's state and its records; controller/qc/engine.py feeds it
measurements and readings in its pure `process` and takes the state over in `apply`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from hotlab.controller.messages import MSG_ID_NAMESPACE, Message, qc_procedure_message

ProcedureKind = Literal[
    "daily_constancy", "baseline", "linearity", "geometry", "sleeve_linearity", "ga68_half_life", "ge68_breakthrough"
]
PROCEDURES: tuple[str, ...] = get_args(ProcedureKind)
Status = Literal["started", "complete", "incomplete", "aborted"]
END_STATUSES = frozenset({"complete", "incomplete", "aborted"})
_VERDICT_ORDER = ("pass", "warn", "fail")

#: A measurement within this many percent of the activity a step expects is plausibly the procedure's source.
STEP_BAND_PCT = 50.0
#: A reading at or below this fraction of the last step's activity means the source was taken out.
SOURCE_LEFT_FRACTION = 0.05
#: Procedures that time out (`[qc] procedure_timeout_min`); a linearity series runs over days.
TIMED_PROCEDURES = frozenset(PROCEDURES) - {"linearity"}
#: The step of a sleeve_linearity procedure read without a sleeve (no `[qc.devices.X.sleeves]` label may take it).
UNSHIELDED = "unshielded"
#: The steps of a ga68_half_life procedure: the same sample read twice.
HALF_LIFE_STEPS = ("first reading", "second reading")


def within_band(measured_bq: float, expected_bq: float) -> bool:
    """Whether `measured_bq` lies within STEP_BAND_PCT of `expected_bq`."""
    return expected_bq > 0 and abs(measured_bq / expected_bq - 1.0) * 100.0 <= STEP_BAND_PCT


def recognised_procedure_id(device: str, measurement_id: str) -> str:
    """The procedure_id of a daily check recognised from a measurement: the same however often it is re-judged."""
    return uuid.uuid5(MSG_ID_NAMESPACE, json.dumps(["qc_procedure", device, measurement_id])).hex


def new_procedure_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Step:
    """One measurement taken into a procedure."""

    measurement_id: str
    setting: str
    activity_bq: float
    time_ns: int
    end: str


@dataclass(slots=True)
class Procedure:
    """An open procedure on one device: what it is, who started it, and the steps and results so far."""

    procedure_id: str
    kind: str
    site: str
    station: str
    device: str
    started_by: dict[str, str] | None
    started_ns: int
    settings: tuple[str, ...]
    source_id: str | None = None
    elution_id: str | None = None
    #: A Ge-68 follow-up: the part of the eluate measured (the whole eluate: 1).
    aliquot_fraction: float = 1.0
    generator: str | None = None
    reason: str | None = None
    #: The labels of the steps, in order, for a procedure whose steps are not its settings (module docstring).
    step_labels: tuple[str, ...] = ()
    steps: list[Step] = field(default_factory=list)
    results: list[str] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    #: setting -> the result or baseline record that covers it
    done: dict[str, str] = field(default_factory=dict)
    #: True once a reading since the last step fell to SOURCE_LEFT_FRACTION of it (module docstring).
    source_left: bool = False

    def copy(self) -> Procedure:
        return replace(
            self,
            steps=list(self.steps),
            results=list(self.results),
            verdicts=list(self.verdicts),
            done=dict(self.done),
        )

    @property
    def last_step(self) -> Step | None:
        return self.steps[-1] if self.steps else None

    @property
    def missing(self) -> tuple[str, ...]:
        """The labelled steps not measured yet, else the settings that have no result (or baseline) yet."""
        if self.step_labels:
            return self.step_labels[len(self.steps) :]
        return tuple(s for s in self.settings if s not in self.done)

    def deadline_ns(self, timeout_ns: int) -> int | None:
        return self.started_ns + timeout_ns if self.kind in TIMED_PROCEDURES else None

    def take(self, step: Step) -> None:
        self.steps.append(step)
        self.source_left = False

    def saw_reading(self, activity_bq: float) -> None:
        last = self.last_step
        if last is not None and activity_bq <= SOURCE_LEFT_FRACTION * last.activity_bq:
            self.source_left = True

    def continues_setting_change(self, setting: str, start_ns: int) -> bool:
        """Whether a measurement on `setting` starting at `start_ns` is the source still in after a setting change."""
        last = self.last_step
        return (
            last is not None
            and last.end != "removed"
            and last.setting != setting
            and not self.source_left
            and start_ns >= last.time_ns
        )

    def add_result(self, message: Message) -> None:
        self.results.append(message.msg_id)
        self.verdicts.append(str(message.payload["verdict"]))

    def worst_verdict(self) -> str | None:
        if not self.verdicts:
            return None
        return max(self.verdicts, key=_VERDICT_ORDER.index)

    def started_message(self, msg_id: str | None = None) -> Message:
        return self._message("started", None, self._started_detail(), msg_id)

    def end_message(self, status: Status, ended_ns: int, detail: str, msg_id: str | None = None) -> Message:
        verdict = self.worst_verdict() if status == "complete" else None
        return self._message(status, ended_ns, detail, msg_id, verdict)

    def _started_detail(self) -> str:
        who = (
            "recognised from a check-source measurement"
            if self.started_by is None
            else (f"started by {self.started_by['user']} ({self.started_by['role']})")
        )
        steps = f", steps {', '.join(self.step_labels)}" if self.step_labels else ""
        return f"{self.kind} on {self.device}, settings {', '.join(self.settings)}{steps}: {who}"

    def _message(
        self, status: Status, ended_ns: int | None, detail: str, msg_id: str | None, verdict: str | None = None
    ) -> Message:
        """The record; its msg_id, unless given, is name-based on the procedure, status and end time, so
        the same end decided again (a batch processed again after a failed commit) is the same record."""
        if msg_id is None:
            name = json.dumps(["qc_procedure_record", self.procedure_id, status, ended_ns])
            msg_id = uuid.uuid5(MSG_ID_NAMESPACE, name).hex
        return qc_procedure_message(
            self.site,
            self.station,
            self.device,
            procedure_id=self.procedure_id,
            procedure=self.kind,
            status=status,
            started_by=self.started_by,
            started_ns=self.started_ns,
            ended_ns=ended_ns,
            source_id=self.source_id,
            elution_id=self.elution_id,
            generator=self.generator,
            reason=self.reason,
            settings=list(self.settings),
            verdict=verdict,
            results=self.results,
            measurements=[step.measurement_id for step in self.steps],
            detail=detail,
            msg_id=msg_id,
            step_labels=list(self.step_labels),
            aliquot_fraction=self.aliquot_fraction if self.kind == "ge68_breakthrough" else None,
        )

    @classmethod
    def from_started(cls, payload: dict[str, Any]) -> Procedure:
        """The open procedure a "started" record describes (KeyError/TypeError/ValueError if it cannot be read)."""
        started_by = payload["started_by"]
        return cls(
            procedure_id=str(payload["procedure_id"]),
            kind=str(payload["procedure"]),
            site=str(payload["site"]),
            station=str(payload["station"]),
            device=str(payload["device"]),
            started_by=None
            if started_by is None
            else {"user": str(started_by["user"]), "role": str(started_by["role"])},
            started_ns=int(payload["started_ns"]),
            settings=tuple(str(s) for s in payload["settings"]),
            source_id=payload["source_id"],
            elution_id=payload["elution_id"],
            aliquot_fraction=float(payload.get("aliquot_fraction", 1.0)),
            generator=payload["generator"],
            reason=payload["reason"],
            step_labels=tuple(str(label) for label in payload.get("step_labels", ())),
        )
