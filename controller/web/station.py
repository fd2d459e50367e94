"""The elution station page (`/station/<device>`): the generator, its elutions, and signed start and abort.

Made for a 10-inch touchscreen used in gloves: every target at least 48 px, nothing on hover. What
could stop a person from eluting (the station offline or in fault, a failed yield or breakthrough
verdict, a Ge-68 follow-up overdue) is shown above the buttons, never only after pressing them.

What the page knows comes from the bus (the live view, plus the controller's replies the command
sender sees) and from the archive for what happened before the panel started:

* the generator is the one the station's newest elution names; its certificate (parent activity
  and calibration time) is its `[qc.generators]` entry, the same the QC engine judges yields with;
* parent activity now, and the daughter available now with its ingrowth since the last elution,
  are the two-member Bateman solution of `hotlab.physics.decay` with what the last elution left
  on the column (available − eluted, from its yield verdict), as the QC engine computes them;
* the station's state (idle, priming, eluting, done, fault with its code) is the one the controller
  published in the station's device_status, as of that status's time; a change is published after
  the poll that saw it, so a fault the station raised on its own is shown before anyone presses
  start. Only while no status carries a state (the station does not answer, or a controller that
  does not publish it) does the page fall back to the last command reply, or "done" when an elution
  ended after that reply. Either way it says where the shown state comes from.

Clocks: the station stamps its elutions with its own clock, which can be off the controller's by
the offset its device_status carries (controller/device_clock.py). The page names the clock of
every time it shows. "Now" is the controller's clock; the ingrowth since the last elution is
computed on one clock, with the elution's end moved to the controller's (end − offset), which is
the same elapsed time as the station's own now (controller now + offset) minus its end. While no
offset is known the station's times are taken as they are, and the page says so.

Each action is confirmed on a second screen and signed there with username and password
(controller/web/commands.py `confirm_or_send`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from hotlab.controller.commands import MAX_REASON_CHARS, MAX_VOLUME_ML, STATION_ACTIONS
from hotlab.controller.config import DeviceConfig
from hotlab.controller.lab.demo import DeviceRow
from hotlab.controller.messages import ClockStatus
from hotlab.controller.qc.engine import QcConfig
from hotlab.controller.qc.generator_rules import GeneratorSpec, available_activity
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
from hotlab.controller.web.overview import Notice, clock, newest_first
from hotlab.controller.web.panel import Panel
from hotlab.drivers.station_registers import FaultCode
from hotlab.physics.decay import daughter_activity, decay_correct
from hotlab.physics.units import format_activity
from hotlab.physics.utc_time import NS_PER_S

#: How far back the archive is read for the station's elutions and their verdicts.
HISTORY_DAYS = 14
#: Elutions listed, newest first.
ELUTIONS_SHOWN = 8
#: The ingrowth curve spans at least this many daughter half-lives after the last elution (2**-6: 98 %
#: of the way to equilibrium), or the time since it plus a sixth, so "now" is always on it.
CURVE_HALF_LIVES = 6
CURVE_SAMPLES = 120
#: The curve's drawing area in SVG user units (the SVG scales to the page's width).
CURVE_WIDTH, CURVE_HEIGHT, CURVE_MARGIN = 600.0, 240.0, 40.0
#: What each action is called on the screen, and what signing it means.
ACTION_TEXT = {
    "start_elution": ("Start elution", "start an elution"),
    "abort": ("Abort elution", "abort the elution in progress"),
    "acknowledge_fault": ("Acknowledge fault", "acknowledge the station's fault"),
}
#: Station states a new elution may not start in (drivers/elution_station.py STARTABLE_STATES: idle, done).
BUSY_STATES = frozenset({"priming", "eluting"})


@dataclass(frozen=True, slots=True)
class StationState:
    #: idle, priming, eluting, done, fault; "unknown" before any reply.
    name: str
    #: Where the page has it from, for people.
    source: str
    #: The station's fault code while in fault, when the controller published it.
    fault_code: int | None = None

    @property
    def fault(self) -> str:
        """The fault code for people: its number and, when drivers/station_registers.py knows it, its name."""
        if self.fault_code is None:
            return ""
        try:
            return f"code {self.fault_code}, {FaultCode(self.fault_code).name.lower().replace('_', ' ')}"
        except ValueError:  # a code the driver's table does not know: shown as its number
            return f"code {self.fault_code}"


@dataclass(frozen=True, slots=True)
class StationClockLine:
    """The station's clock against the controller's, as the page says it, and "now" on both."""

    #: ok, alarm (the controller's clock_offset alarm is raised), or unknown (no offset published).
    state: str
    #: The offset, its bound and the limit, for people; or that it is not known.
    text: str
    #: What "now" is on this page, on each clock.
    now_text: str
    #: Station clock − controller clock; 0 while unknown (the station's times are then taken as they are).
    offset_ns: int = 0


@dataclass(frozen=True, slots=True)
class IngrowthCurve:
    """Daughter activity on the column after the last elution, sampled, and drawn as an SVG polyline."""

    #: (seconds after the last elution, Bq), from the elution to the end of the span.
    samples: tuple[tuple[float, float], ...]
    now_s: float
    now_bq: float
    #: The polyline's points in the SVG's user units, and "now" on it.
    points: str
    now_x: float
    now_y: float
    #: Which side of "now" its label goes, so it stays inside the plot: start (right of it) or end (left).
    now_anchor: str
    top_label: str
    end_label: str
    width: float = CURVE_WIDTH
    height: float = CURVE_HEIGHT
    #: The plot's edges in the SVG: left and right x, top and bottom y.
    left: float = CURVE_MARGIN
    right: float = CURVE_WIDTH - CURVE_MARGIN
    top: float = CURVE_MARGIN
    bottom: float = CURVE_HEIGHT - CURVE_MARGIN


@dataclass(frozen=True, slots=True)
class GeneratorLine:
    generator_id: str
    parent: str
    daughter: str
    #: Empty when the generator has no `[qc.generators]` entry (the page then says so in `note`).
    certificate: str
    parent_now: str
    daughter_now: str
    last_elution: str
    note: str
    curve: IngrowthCurve | None


@dataclass(frozen=True, slots=True)
class ElutionLine:
    end: str
    counter: str
    activity: str
    volume: str
    yield_pct: str
    #: pass, warn, fail, or "" while no verdict is known: also its CSS class.
    verdict: str
    breakthrough: str


@dataclass(frozen=True, slots=True)
class StationLive:
    """The parts of the page the event stream re-renders."""

    name: str
    station: str
    status: str
    detail: str
    state: StationState
    clock: StationClockLine
    notices: tuple[Notice, ...]
    generator: GeneratorLine | None
    elutions: tuple[ElutionLine, ...]

    @property
    def flags(self) -> str:
        """What device.js shows or hides forms by (`data-show-when`)."""
        return self.state.name


def routes(panel: Panel) -> list[BaseRoute]:
    qc = QcConfig.from_mapping(panel.config.qc)

    def station_device(request: Request) -> DeviceConfig:
        return panel.device(request, station=True)

    async def live(device: DeviceConfig) -> StationLive:
        return await station_live(panel, qc.generators, device, time.time_ns())

    def shower(request: Request, device: DeviceConfig, state: StationLive) -> ShowPage:
        """The page for this request, with whatever answer, confirmation or refusal it is to show."""
        _, user = signed_in(request)

        def show(*, confirm: Confirmation | None = None, error: str | None = None, status: int = 200) -> Response:
            context = {
                "live": state,
                "device": device,
                "refusals": {action: role_refusal(panel, user, action) for action in STATION_ACTIONS},
                "acts": panel.commands is not None,
                "confirm": confirm,
                "answer": shown_answer(panel, request, device),
                "error": error,
                "max_reason_chars": MAX_REASON_CHARS,
            }
            return panel.page(request, "station.html", context, status_code=status)

        return show

    async def page(request: Request) -> Response:
        device = station_device(request)
        return shower(request, device, await live(device))()

    async def events(request: Request) -> Response:
        device = station_device(request)
        fragments = {"station-status": "_station_status.html", "station-details": "_station_details.html"}
        return templates_events(panel, request, fragments, lambda: live(device))

    async def act(request: Request) -> Response:
        device = station_device(request)
        action = request.path_params["action"]
        if action not in STATION_ACTIONS:
            raise HTTPException(
                404, f"{action!r} is not an elution station action; they are {', '.join(STATION_ACTIONS)}"
            )
        show = shower(request, device, await live(device))
        return await confirm_or_send(panel, request, device, action, lambda form: _confirmation(action, form), show)

    return [
        Route("/station/{device}", page, methods=["GET"]),
        Route("/station/{device}/events", events, methods=["GET"]),
        Route("/station/{device}/{action}", act, methods=["POST"]),
    ]


def _confirmation(action: str, form: FormData) -> Confirmation:
    title, meaning = ACTION_TEXT[action]
    if action != "start_elution":
        return confirmation(form, action, title, meaning, {})
    volume_ml = _volume_ml(str(form.get("volume_ml") or ""))
    return confirmation(form, action, title, f"{meaning} of {volume_ml:g} mL", {"volume_ml": volume_ml})


def _volume_ml(text: str) -> float:
    try:
        volume_ml = float(text.replace(",", "."))
    except ValueError:
        raise ValueError(f"The volume must be a number of millilitres, e.g. 5; got {text!r}.") from None
    if not (math.isfinite(volume_ml) and 0.0 < volume_ml <= MAX_VOLUME_ML):
        raise ValueError(
            f"The volume must be more than 0 and at most {MAX_VOLUME_ML:g} mL (the station refuses "
            f"volumes outside its generator's range); got {text}."
        )
    return volume_ml


# --------------------------------------------------------------------------- what the page shows


async def station_live(
    panel: Panel,
    generators: Mapping[str, GeneratorSpec],
    device: DeviceConfig,
    now_ns: int,
) -> StationLive:
    """The station as the page shows it at `now_ns` (controller clock): live view, latest reply, the archive's
    elutions, and its clock as the station's latest device_status says it (not known before one)."""
    view = panel.feed.view
    since_ns = now_ns - HISTORY_DAYS * 86400 * NS_PER_S
    archived_elutions = await panel.archived("elution", since_ns, station=device.station)
    elutions = newest_first(archived_elutions, [e for e in view.elutions if e.get("station") == device.station])
    generator_id = str(elutions[0]["generator"]) if elutions else None
    verdicts: list[dict[str, Any]] = []
    if generator_id is not None:
        archived_verdicts = await panel.archived("qc_result", since_ns, device=generator_id, test="elution_yield")
        live_verdicts = [v for (d, t), v in view.verdicts.items() if d == generator_id and t == "elution_yield"]
        verdicts = newest_first(archived_verdicts, live_verdicts)
    row = view.devices.get(device.name)
    status = "unknown" if row is None else "online" if row.up else "offline"
    reply = panel.commands.latest.get(device.name) if panel.commands is not None else None
    state = _published_state(row) or _replied_state(reply, elutions[0] if elutions else None)
    spec = generators.get(generator_id) if generator_id is not None else None
    station_clock = None if row is None else row.clock
    clock_line = station_clock_line(station_clock, now_ns)
    generator = None
    if generator_id is not None:
        generator = _generator(generator_id, elutions[0], spec, verdicts, now_ns, clock_line.offset_ns)
    return StationLive(
        name=device.name,
        station=device.station,
        status=status,
        detail=row.detail if row is not None else "no status from the controller since the panel started",
        state=state,
        clock=clock_line,
        notices=_notices(panel, status, state, generator_id, spec, station_clock),
        generator=generator,
        elutions=tuple(_elution(e, verdicts) for e in elutions[:ELUTIONS_SHOWN]),
    )


def _published_state(row: DeviceRow | None) -> StationState | None:
    """The state in the station's latest device_status, if it carries one (the station answered)."""
    if row is None or row.station_state is None:
        return None
    said = f"polled by the controller, status of {clock(row.time_ns)} (controller clock)"
    return StationState(row.station_state, said, row.fault_code)


def _replied_state(reply: dict[str, Any] | None, newest_elution: dict[str, Any] | None) -> StationState:
    """Fallback: the newest command reply's state, or done when an elution ended after it."""
    end_ns = newest_elution.get("end_ns") if newest_elution is not None else None
    if reply is None:
        if isinstance(end_ns, int):
            return StationState(
                "done", f"no state from the controller; an elution ended {clock(end_ns)} (station clock)"
            )
        return StationState("unknown", "no state from the controller, and no command reply seen yet")
    reply_ns = reply["time_ns"] if isinstance(reply.get("time_ns"), int) else 0
    if isinstance(end_ns, int) and end_ns > reply_ns:
        return StationState("done", f"an elution ended {clock(end_ns)} (station clock), after the last reply")
    # Executed: the state it left the station in. Refused: the state that refused it. Unconfirmed: not known.
    value = {"executed": reply.get("new_value"), "refused": reply.get("old_value")}.get(str(reply.get("outcome")))
    named = value.get("state") if isinstance(value, dict) else None
    said = f"reply to {reply.get('action')} ({reply.get('outcome')}) at {clock(reply_ns)} (controller clock)"
    return StationState(named if isinstance(named, str) else "unknown", said)


def _notices(
    panel: Panel,
    status: str,
    state: StationState,
    generator_id: str | None,
    spec: GeneratorSpec | None,
    station_clock: ClockStatus | None,
) -> tuple[Notice, ...]:
    """What a person must see before starting an elution, worst first."""
    view = panel.feed.view
    notices: list[Notice] = []
    if station_clock is not None and station_clock.alarm:
        notices.append(
            Notice(
                "warn",
                f"The station's clock is {_offset_words(station_clock.offset_s)} the controller's (limit"
                f" {station_clock.limit_s:g} s): the times it stamps on its elutions are that far off. Set its clock.",
            )
        )
    if not view.connected:
        notices.append(Notice("fail", f"Not connected to the broker: what is shown may be old ({view.broker_error})."))
    if status != "online":
        notices.append(Notice("fail", f"The station is {status}: the controller cannot reach it."))
    if state.name == "fault":
        code = f" ({state.fault})" if state.fault else ""
        notices.append(Notice("fail", f"The station is in fault{code}: acknowledge the fault before eluting."))
    elif state.name in BUSY_STATES:
        notices.append(Notice("warn", f"An elution is in progress ({state.name}): abort it, or wait for its end."))
    if generator_id is not None:
        for (device, test), result in view.verdicts.items():
            if device == generator_id and result.get("verdict") in ("warn", "fail"):
                verdict = str(result["verdict"])
                notices.append(Notice(verdict, f"{test} {verdict.upper()}: {result.get('detail') or ''}"))
        for (device, item), item_status in sorted(view.schedule.items()):
            if device == generator_id and item_status.get("state") in ("overdue", "failed"):
                notices.append(
                    Notice("fail", f"QC {item} {item_status['state'].upper()}: {item_status.get('detail') or ''}")
                )
        if spec is None:
            notices.append(
                Notice("warn", f"Generator {generator_id} is not under [qc.generators]: its yields are not judged.")
            )
    return tuple(sorted(notices, key=lambda n: n.severity != "fail"))


def _generator(
    generator_id: str,
    newest: dict[str, Any],
    spec: GeneratorSpec | None,
    verdicts: list[dict[str, Any]],
    now_ns: int,
    offset_ns: int,
) -> GeneratorLine:
    """The generator now (`now_ns`, controller clock); `offset_ns` takes the station's times to the controller's."""
    parent, daughter = str(newest.get("parent") or "?"), str(newest.get("nuclide") or "?")
    last_ns = newest.get("end_ns") if isinstance(newest.get("end_ns"), int) else None
    # The last elution's end on the controller's clock, which "now" and the certificate's time are on.
    ended_ns = None if last_ns is None else last_ns - offset_ns
    last = "-"
    if last_ns is not None and ended_ns is not None:
        pattern = "%Y-%m-%d %H:%M:%S UTC"
        last = f"{clock(last_ns, pattern)} (station clock)"
        if offset_ns:
            last += f", {clock(ended_ns, pattern)} on the controller's clock"
    if spec is None:
        note = "No certificate under [qc.generators]: parent and daughter activity cannot be computed."
        return GeneratorLine(generator_id, parent, daughter, "", "-", "-", last, note, None)
    residual_bq, note = _residual(newest, verdicts)
    parent_now = float(decay_correct(spec.calibration_bq, spec.parent, spec.calibration_ns, now_ns))
    curve = None
    if ended_ns is not None and now_ns >= ended_ns:
        curve = ingrowth_curve(spec, ended_ns, residual_bq, now_ns)
        daughter_now = curve.now_bq
    else:  # no elution time the page can use: the column in equilibrium, as the QC engine takes it
        daughter_now = available_activity(spec, now_ns, None)
        note = "The last elution ended after now: the column is taken to be in equilibrium."
    certificate = (
        f"{format_activity(spec.calibration_bq)} {spec.parent.name} at "
        f"{clock(spec.calibration_ns, '%Y-%m-%d %H:%M UTC')} (certificate)"
    )
    return GeneratorLine(
        generator_id=generator_id,
        parent=spec.parent.name,
        daughter=spec.daughter.name,
        certificate=certificate,
        parent_now=format_activity(parent_now),
        daughter_now=format_activity(daughter_now),
        last_elution=last,
        note=note,
        curve=curve,
    )


def station_clock_line(station_clock: ClockStatus | None, now_ns: int) -> StationClockLine:
    """What the page says of the station's clock, and of "now" on each clock, at `now_ns` (controller clock)."""
    if station_clock is None:
        return StationClockLine(
            "unknown",
            "Station clock offset not known (no status of the answering station): its times are shown as it stamped"
            " them, and taken as they are.",
            f"now {clock(now_ns)} on the controller's clock",
        )
    offset_ns = round(station_clock.offset_s * NS_PER_S)
    text = (
        f"Station clock {_offset_words(station_clock.offset_s)} the controller's"
        f" (± {_duration(station_clock.uncertainty_s)}; limit {station_clock.limit_s:g} s)"
    )
    now_text = f"now {clock(now_ns)} on the controller's clock, {clock(now_ns + offset_ns)} on the station's"
    return StationClockLine("alarm" if station_clock.alarm else "ok", text, now_text, offset_ns)


def _offset_words(offset_s: float) -> str:
    """An offset for people: "90.000 s ahead of", "3.0 d behind"."""
    side = "ahead of" if offset_s >= 0 else "behind"
    return f"{_duration(abs(offset_s))} {side}"


def _duration(seconds: float) -> str:
    """Milliseconds shown while they matter (under 2 minutes), then minutes, hours or days."""
    if seconds < 120:
        return f"{seconds:.3f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _residual(newest: dict[str, Any], verdicts: list[dict[str, Any]]) -> tuple[float, str]:
    """What the newest elution left on the column: available − eluted from its yield verdict's inputs."""
    verdict = _verdict_of(newest, verdicts)
    inputs = verdict.get("inputs") if verdict is not None else None
    if isinstance(inputs, dict):
        available, eluted = inputs.get("available_bq"), inputs.get("eluted_bq")
        if isinstance(available, (int, float)) and isinstance(eluted, (int, float)):
            return max(float(available) - float(eluted), 0.0), ""
    return 0.0, "The last elution's yield verdict is not known here: its residual on the column is taken as 0."


def _verdict_of(elution: dict[str, Any], verdicts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The elution_yield result of this elution: the same generator, timed at its end (generator_rules.py)."""
    return next(
        (
            v
            for v in verdicts
            if v.get("device") == elution.get("generator") and v.get("time_ns") == elution.get("end_ns")
        ),
        None,
    )


def _elution(elution: dict[str, Any], verdicts: list[dict[str, Any]]) -> ElutionLine:
    verdict = _verdict_of(elution, verdicts)
    yield_pct, breakthrough = elution.get("yield_pct"), elution.get("breakthrough_pct")
    return ElutionLine(
        end=clock(elution.get("end_ns"), "%m-%d %H:%M:%S"),
        counter=str(elution.get("counter", "")),
        activity=f"{format_activity(float(elution['activity_bq']))} {elution.get('nuclide', '')}",
        volume=f"{float(elution.get('volume_ml') or 0.0):g} mL",
        yield_pct="-" if yield_pct is None else f"{float(yield_pct):.1f} %",
        verdict=str(verdict["verdict"]) if verdict is not None else "",
        breakthrough="-" if breakthrough is None else f"{float(breakthrough):.2e} %",
    )


def ingrowth_curve(
    spec: GeneratorSpec, last_elution_ns: int, residual_bq: float, now_ns: int, samples: int = CURVE_SAMPLES
) -> IngrowthCurve:
    """The daughter's ingrowth on the column since the last elution (Bateman, `physics.decay`), to draw.

    The parent is decayed from the certificate to the last elution, then the daughter grows in with
    what that elution left behind decaying on top, exactly as the QC engine's available activity.
    """
    parent_at_elution = float(decay_correct(spec.calibration_bq, spec.parent, spec.calibration_ns, last_elution_ns))
    now_s = (now_ns - last_elution_ns) / NS_PER_S
    span_s = max(CURVE_HALF_LIVES * spec.daughter.half_life_s, now_s * 7 / 6)
    times = np.linspace(0.0, span_s, samples)
    values = np.asarray(daughter_activity(parent_at_elution, spec.parent, spec.daughter, times, residual_bq))
    now_bq = float(daughter_activity(parent_at_elution, spec.parent, spec.daughter, now_s, residual_bq))
    points = tuple((float(t), float(bq)) for t, bq in zip(times, values))
    top = max(bq for _, bq in points) * 1.1 or 1.0

    def x(t: float) -> float:
        return CURVE_MARGIN + (CURVE_WIDTH - 2 * CURVE_MARGIN) * t / span_s

    def y(bq: float) -> float:
        return CURVE_HEIGHT - CURVE_MARGIN - (CURVE_HEIGHT - 2 * CURVE_MARGIN) * bq / top

    return IngrowthCurve(
        samples=points,
        now_s=now_s,
        now_bq=now_bq,
        points=" ".join(f"{x(t):.1f},{y(bq):.1f}" for t, bq in points),
        now_x=round(x(now_s), 1),
        now_y=round(y(now_bq), 1),
        now_anchor="start" if now_s < span_s / 2 else "end",
        top_label=format_activity(top, digits=3),
        end_label=f"{span_s / 3600:.3g} h",
    )
