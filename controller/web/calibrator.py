"""The dose calibrator page (`/calibrator/<device>`): the live reading, its nuclide setting, measurements, daily QC.

The reading updates as the bus brings it (server-sent events, static/device.js), shown as read: a
suspect one is marked with its reason, and a reading taken while the daily QC is overdue or failed
says so, since no dose should be taken from such a calibrator unknowingly (docs/qc.md, "Schedule").

The daily check is a QC procedure the controller runs (docs/qc.md, "Procedures"): `start_qc`
opens it with the calibrator's check source (`[qc.devices.<id>] check_source`), then the page
walks the person through its steps: the background of the empty chamber, then the check source on
each setting the procedure covers, the check source's own first. Each step shows its verdict as
the controller publishes it (`qc_result` with the procedure's id), and what to do next; `end_qc`
ends a procedure early (aborted). Changing the nuclide setting is `select_nuclide`. All three are
confirmed and signed (controller/web/commands.py `confirm_or_send`), and audited by the controller.

The live view keeps one verdict per test, so a procedure's earlier steps (one constancy result per
setting) are read from the archive as well (`Panel.archived`: read again only when the bus brought a
message of that kind).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from hotlab.controller.commands import MAX_REASON_CHARS
from hotlab.controller.config import DeviceConfig
from hotlab.controller.qc.engine import DeviceQc, QcConfig
from hotlab.controller.web.auth import signed_in
from hotlab.controller.web.commands import (
    Confirmation,
    ShowPage,
    confirm_or_send,
    confirmation,
    role_refusal,
    shown_answer,
)
from hotlab.controller.web.events import templates_events
from hotlab.controller.web.overview import (
    Notice,
    ReadingLine,
    clock,
    newest_first,
    reading_line,
)
from hotlab.controller.web.panel import Panel
from hotlab.physics.nuclides import NUCLIDES, UnknownNuclideError, get_nuclide
from hotlab.physics.units import format_activity
from hotlab.physics.utc_time import NS_PER_S

#: The actions this page sends (a label is sent from no page yet).
PAGE_ACTIONS: tuple[str, ...] = ("select_nuclide", "start_qc", "end_qc")
#: How far back the archive is read for the latest procedure and the measurements.
HISTORY_S = 86400
MEASUREMENTS_SHOWN = 8
#: Procedures whose steps are the background, then the check source on each setting.
CHECK_PROCEDURES = frozenset({"daily_constancy", "baseline"})
#: Result tests that judge a step of a check procedure: the background, and a setting against its baseline.
STEP_TESTS = frozenset({"background", "constancy"})


@dataclass(frozen=True, slots=True)
class Step:
    label: str
    #: pass, warn or fail once judged; measured (judging), recorded (a baseline: never judged), next (what to
    #: do now), waiting: also its CSS class.
    state: str
    text: str


@dataclass(frozen=True, slots=True)
class ProcedureLine:
    procedure_id: str
    kind: str
    #: started (open), complete, incomplete, aborted.
    status: str
    started: str
    reason: str
    steps: tuple[Step, ...]
    #: Results that are no step of a check procedure (another procedure's), in arrival order.
    results: tuple[Step, ...]
    verdict: str
    detail: str

    @property
    def open(self) -> bool:
        return self.status == "started"


@dataclass(frozen=True, slots=True)
class MeasurementLine:
    time: str
    nuclide: str
    activity: str
    spread: str
    end: str
    labels: str
    #: The QC procedure it was a step of, else empty.
    procedure: str


@dataclass(frozen=True, slots=True)
class CalibratorLive:
    """The parts of the page the event stream re-renders."""

    name: str
    station: str
    status: str
    detail: str
    reading: ReadingLine | None
    #: The nuclide setting of the latest reading; None before any.
    setting: str | None
    notices: tuple[Notice, ...]
    check_source: str | None
    procedure: ProcedureLine | None
    measurements: tuple[MeasurementLine, ...]

    @property
    def flags(self) -> str:
        """What device.js shows or hides forms by (`data-show-when`)."""
        return "procedure-open" if self.procedure is not None and self.procedure.open else "no-procedure"


def routes(panel: Panel) -> list[BaseRoute]:
    qc = QcConfig.from_mapping(panel.config.qc)

    def calibrator_device(request: Request) -> DeviceConfig:
        return panel.device(request, station=False)

    async def live(device: DeviceConfig) -> CalibratorLive:
        return await calibrator_live(panel, qc.devices.get(device.name), device, time.time_ns())

    def shower(request: Request, device: DeviceConfig, state: CalibratorLive) -> ShowPage:
        _, user = signed_in(request)

        def show(*, confirm: Confirmation | None = None, error: str | None = None, status: int = 200) -> Response:
            context = {
                "live": state,
                "device": device,
                "refusals": {action: role_refusal(panel, user, action) for action in PAGE_ACTIONS},
                "acts": panel.commands is not None,
                "nuclides": nuclide_choices(qc.devices.get(device.name), qc, state.setting),
                "confirm": confirm,
                "answer": shown_answer(panel, request, device),
                "error": error,
                "max_reason_chars": MAX_REASON_CHARS,
            }
            return panel.page(request, "calibrator.html", context, status_code=status)

        return show

    async def page(request: Request) -> Response:
        device = calibrator_device(request)
        return shower(request, device, await live(device))()

    async def events(request: Request) -> Response:
        device = calibrator_device(request)
        fragments = {
            "calibrator-status": "_calibrator_status.html",
            "calibrator-qc": "_calibrator_qc.html",
            "calibrator-measurements": "_calibrator_measurements.html",
        }
        return templates_events(panel, request, fragments, lambda: live(device))

    async def act(request: Request) -> Response:
        device = calibrator_device(request)
        action = request.path_params["action"]
        if action not in PAGE_ACTIONS:
            raise HTTPException(404, f"{action!r} is not sent from this page; it sends {', '.join(PAGE_ACTIONS)}")
        state = await live(device)

        def read(form: FormData) -> Confirmation:
            return _confirmation(action, form, state)

        return await confirm_or_send(panel, request, device, action, read, shower(request, device, state))

    return [
        Route("/calibrator/{device}", page, methods=["GET"]),
        Route("/calibrator/{device}/events", events, methods=["GET"]),
        Route("/calibrator/{device}/{action}", act, methods=["POST"]),
    ]


def _confirmation(action: str, form: FormData, state: CalibratorLive) -> Confirmation:
    """The action as asked for, or ValueError saying what to correct; the QC arguments come from the config."""
    if action == "select_nuclide":
        text = str(form.get("nuclide") or "")
        try:
            nuclide = get_nuclide(text).name
        except UnknownNuclideError as exc:
            raise ValueError(str(exc)) from None
        return confirmation(
            form, action, "Change the nuclide setting", f"set {state.name} to {nuclide}", {"nuclide": nuclide}
        )
    if action == "start_qc":
        if state.check_source is None:
            raise ValueError(f"{state.name} has no check source under [qc.devices.{state.name}]: no daily check here.")
        args = {"procedure": "daily_constancy", "source": state.check_source}
        meaning = f"start the daily constancy check of {state.name} with check source {state.check_source}"
        return confirmation(form, action, "Start the daily check", meaning, args)
    procedure = state.procedure
    if procedure is None or not procedure.open:
        raise ValueError(f"No QC procedure is open on {state.name}: there is nothing to end.")
    outcome = "judged on the points it collected" if procedure.kind == "linearity" else "it ends aborted"
    meaning = f"end the open {procedure.kind} procedure on {state.name} now ({outcome})"
    return confirmation(form, action, "End the procedure", meaning, {"procedure": procedure.kind})


def nuclide_choices(device_qc: DeviceQc | None, qc: QcConfig, current: str | None) -> tuple[str, ...]:
    """The settings to choose from: the current one and the daily check's first, then the library's."""
    first: list[str] = [current] if current is not None else []
    if device_qc is not None:
        source = qc.sources.get(device_qc.check_source) if device_qc.check_source is not None else None
        first += ([source.nuclide.name] if source is not None else []) + list(device_qc.settings)
    ordered = list(dict.fromkeys(first))
    return tuple(ordered + sorted(name for name in NUCLIDES if name not in ordered))


# --------------------------------------------------------------------------- what the page shows


async def calibrator_live(
    panel: Panel, device_qc: DeviceQc | None, device: DeviceConfig, now_ns: int
) -> CalibratorLive:
    """The calibrator as the page shows it now: the live view, and the archive for the day's QC and measurements."""
    view = panel.feed.view
    since_ns = now_ns - HISTORY_S * NS_PER_S
    procedures = newest_first(
        await panel.archived("qc_procedure", since_ns, device=device.name),
        [p for p in view.procedures.values() if p.get("device") == device.name],
    )
    measurements = newest_first(
        [m for m in view.measurements if m.get("device") == device.name],
        await panel.archived("measurement", since_ns, device=device.name),
    )
    labels: dict[str, list[str]] = {}
    for label in await panel.archived("measurement_label", since_ns, device=device.name):
        labels.setdefault(str(label.get("measurement_id")), []).append(str(label.get("label")))
    procedure = None
    if procedures:
        started_ns = procedures[0].get("started_ns")
        results = newest_first(
            await panel.archived(
                "qc_result", started_ns if isinstance(started_ns, int) else since_ns, device=device.name
            ),
            [r for (d, _), r in view.verdicts.items() if d == device.name],
        )
        procedure = _procedure(procedures[0], results, measurements, device_qc)
    row = view.devices.get(device.name)
    status = "unknown" if row is None else "online" if row.up else "offline"
    reading = view.latest_reading.get(device.name)
    return CalibratorLive(
        name=device.name,
        station=device.station,
        status=status,
        detail=row.detail if row is not None else "no status from the controller since the panel started",
        reading=reading_line(reading),
        setting=str(reading["nuclide"]) if reading is not None and reading.get("nuclide") else None,
        notices=_notices(panel, device.name, status, reading),
        check_source=device_qc.check_source if device_qc is not None else None,
        procedure=procedure,
        measurements=tuple(_measurement(m, labels) for m in measurements[:MEASUREMENTS_SHOWN]),
    )


def _notices(panel: Panel, name: str, status: str, reading: dict[str, Any] | None) -> tuple[Notice, ...]:
    """What a person must see before taking a dose from this calibrator, worst first."""
    view = panel.feed.view
    notices: list[Notice] = []
    if not view.connected:
        notices.append(Notice("fail", f"Not connected to the broker: what is shown may be old ({view.broker_error})."))
    if status != "online":
        notices.append(Notice("fail", f"The calibrator is {status}: the controller cannot read it."))
    if reading is not None and reading.get("qc_state") in ("overdue", "failed"):
        notices.append(
            Notice("fail", f"Daily QC {reading['qc_state']}: no dose should be taken from this calibrator unknowingly.")
        )
    if reading is not None and reading.get("quality") == "suspect":
        notices.append(Notice("warn", f"The latest reading is suspect: {reading.get('quality_reason') or ''}"))
    for (device, item), item_status in sorted(view.schedule.items()):
        state = item_status.get("state")
        if device == name and state in ("overdue", "failed"):  # what is merely due the overview lists
            notices.append(Notice("fail", f"QC {item} {str(state).upper()}: {item_status.get('detail') or ''}"))
    return tuple(sorted(notices, key=lambda n: n.severity != "fail"))


def _procedure(
    record: dict[str, Any],
    results: list[dict[str, Any]],
    measurements: list[dict[str, Any]],
    device_qc: DeviceQc | None,
) -> ProcedureLine:
    """The procedure's latest record with its results so far; a check procedure as its steps, each with what to do."""
    procedure_id = str(record.get("procedure_id"))
    kind = str(record.get("procedure"))
    mine = [r for r in reversed(results) if r.get("procedure_id") == procedure_id]
    measured = [m for m in reversed(measurements) if m.get("procedure_id") == procedure_id]
    open_ = record.get("status") == "started"
    started_by = record.get("started_by")
    who = started_by.get("user") if isinstance(started_by, dict) else "recognised by the controller"
    steps: tuple[Step, ...] = ()
    others = mine
    if kind in CHECK_PROCEDURES:
        source = str(record.get("source_id") or (device_qc.check_source if device_qc else "") or "the check source")
        settings = [str(s) for s in record.get("settings") or []]
        steps = _check_steps(settings, source, mine, measured, open_, judged=kind != "baseline")
        others = [r for r in mine if r.get("test") not in STEP_TESTS]
    return ProcedureLine(
        procedure_id=procedure_id,
        kind=kind,
        status=str(record.get("status")),
        started=f"{clock(record.get('started_ns'))} by {who}",
        reason=str(record.get("reason") or ""),
        steps=steps,
        results=tuple(Step(str(r.get("test")), str(r.get("verdict")), _judged(r)) for r in others),
        verdict=str(record.get("verdict") or ""),
        detail=str(record.get("detail") or ""),
    )


def _check_steps(
    settings: list[str],
    source: str,
    results: list[dict[str, Any]],
    measured: list[dict[str, Any]],
    open_: bool,
    *,
    judged: bool,
) -> tuple[Step, ...]:
    """Background, then the check source on each setting: judged, measured, the next one to do, or waiting.
    A baseline (`judged` False) records each setting's value for later checks and gives it no verdict."""
    steps: list[Step] = []
    waiting_for_next = open_
    background = next((r for r in results if r.get("test") == "background"), None)
    if background is not None:
        steps.append(Step("background", str(background.get("verdict")), _judged(background)))
    elif measured:
        steps.append(Step("background", "measured", "read before the first source went in; awaiting its verdict"))
    else:
        steps.append(Step("background", "next" if open_ else "waiting", "the chamber empty: no source in it"))
        waiting_for_next = False
    for setting in settings:
        result = next(
            (r for r in results if r.get("test") == "constancy" and (r.get("inputs") or {}).get("setting") == setting),
            None,
        )
        taken = next((m for m in measured if m.get("nuclide") == setting), None)
        if result is not None:
            steps.append(Step(setting, str(result.get("verdict")), _judged(result)))
        elif taken is not None:
            value = format_activity(float(taken["activity_bq"]))
            if judged:
                steps.append(Step(setting, "measured", f"{value}; awaiting verdict"))
            else:
                steps.append(Step(setting, "recorded", f"{value}: the baseline of later checks (not judged)"))
        elif waiting_for_next:
            steps.append(Step(setting, "next", f"select {setting} with {source} in the chamber"))
            waiting_for_next = False
        else:
            steps.append(Step(setting, "waiting", f"{source} on the {setting} setting"))
    return tuple(steps)


def _judged(result: dict[str, Any]) -> str:
    """A verdict in a few words: the deviation where the limit judges one, else the measured value."""
    deviation = result.get("deviation_pct")
    if isinstance(deviation, (int, float)):
        return f"{deviation:+.2f} % (limit {result.get('limit') or '?'})"
    measured = result.get("measured")
    if isinstance(measured, (int, float)) and result.get("unit") == "Bq":
        return f"{format_activity(float(measured))} (limit {result.get('limit') or '?'})"
    return str(result.get("detail") or "")


def _measurement(measurement: dict[str, Any], archived_labels: Mapping[str, list[str]]) -> MeasurementLine:
    activity, sd = float(measurement["activity_bq"]), float(measurement.get("sd_bq") or 0.0)
    labels = list(measurement.get("labels") or []) + archived_labels.get(str(measurement.get("msg_id")), [])
    return MeasurementLine(
        time=clock(measurement.get("time_ns")),
        nuclide=str(measurement.get("nuclide") or "?"),
        activity=format_activity(activity),
        spread=f"{sd / activity * 100:.2f} %" if activity else "-",
        end=str(measurement.get("end") or ""),
        labels=", ".join(dict.fromkeys(labels)) or "-",
        procedure="QC step" if measurement.get("procedure_id") else "",
    )
