"""The demo's live view: what a lab-wall screen subscribed to the broker would show.

The view is fed only by MQTT (`hotlab/<site>/#`), exactly as any other consumer of the
controller is, so what it shows is what was committed and published, never the controller's
private memory. `LabView` is the pure state (one `apply` per message, de-duplicated on
`msg_id` because delivery is at-least-once, docs/mqtt.md); `render` turns it into rich
renderables; `watch_broker` keeps one aiomqtt client subscribed, reconnecting on loss
(aiomqtt 2.x has no auto-reconnect).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
import uuid
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiomqtt
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from hotlab.controller.messages import ClockStatus
from hotlab.errors import InputError
from hotlab.physics.units import format_activity

log = logging.getLogger("hotlab.demo")

VERDICT_STYLE = {"pass": "bold green", "warn": "bold yellow", "fail": "bold red"}
STATE_STYLE = {"done": "green", "due": "yellow", "overdue": "bold red", "failed": "bold red"}
#: Marks a suspect reading's activity (the reading is shown as read: nothing is hidden).
SUSPECT_MARK = "⚠"
#: How many msg_ids to remember for de-duplication: far more than the MQTT sink's in-flight window.
SEEN_IDS = 4096


class ViewInputError(InputError):
    """A message on the site's topics that the view cannot show (not JSON, or a field missing)."""


@dataclass(slots=True)
class DeviceRow:
    station: str
    up: bool
    latency_ms: float | None
    errors: int
    detail: str
    #: A calibrator's suspect readings since the controller started; None for a station.
    suspect: int | None = None
    #: An answering elution station's state (idle, priming, eluting, done, fault) and fault code; else None.
    station_state: str | None = None
    fault_code: int | None = None
    #: When the controller sent this status (UTC epoch ns).
    time_ns: int = 0
    #: An answering station's clock against the controller's; None for a calibrator (no clock reported).
    clock: ClockStatus | None = None


@dataclass(slots=True)
class Alarm:
    time_ns: int
    severity: str  # "warn" or "fail"
    text: str


@dataclass
class LabView:
    """Everything the screen shows, built from the published messages."""

    site: str
    broker: str
    acceleration: float
    started_monotonic: float = field(default_factory=time.monotonic)
    connected: bool = False
    broker_error: str = ""
    devices: dict[str, DeviceRow] = field(default_factory=dict)
    latest_reading: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The latest measurements, newest first, each with the labels added to it since.
    measurements: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=6))
    elutions: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=6))
    #: The latest verdict of each (device, test): a constancy check every second must not push
    #: the morning's elution verdicts off the screen.
    verdicts: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    alarms: deque[Alarm] = field(default_factory=lambda: deque(maxlen=6))
    #: The conditions in force now, each until the message that ends it (a device back online, a
    #: QC item done, a controller alarm cleared, the controller back), keyed by what they are about.
    active: dict[str, Alarm] = field(default_factory=dict)
    #: Every QC schedule item's latest state (retained qc_status), keyed by (device, item).
    schedule: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    #: The latest QC procedures, newest first, each as its latest record (start, then end).
    procedures: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)
    counts: Counter[str] = field(default_factory=Counter)
    verdict_counts: Counter[str] = field(default_factory=Counter)
    rejected: int = 0
    _seen: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def apply(self, topic: str, raw: bytes | str) -> None:
        """Take one MQTT message; raise ViewInputError if it cannot be shown (the view keeps running)."""
        try:
            payload = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ViewInputError(f"{topic}: not JSON ({exc})") from None
        if not isinstance(payload, dict):
            raise ViewInputError(f"{topic}: payload is not a JSON object")
        schema = str(payload.get("schema", ""))
        kind = schema.split("/")[0].removeprefix("hotlab.")
        handler = _HANDLERS.get(kind)
        if handler is None:
            return  # another consumer's topic (e.g. command replies): not on this screen
        msg_id = payload.get("msg_id")
        if msg_id is not None and msg_id in self._seen:
            return
        try:
            handler(self, payload)
        except (KeyError, TypeError, ValueError) as exc:
            raise ViewInputError(f"{topic}: {kind} message without a usable {exc}") from None
        if msg_id is not None:
            self._seen[msg_id] = None
            if len(self._seen) > SEEN_IDS:
                self._seen.popitem(last=False)
        self.counts[kind] += 1

    def _on_status(self, payload: dict[str, Any]) -> None:
        device, up = str(payload["device"]), bool(payload["up"])
        previous = self.devices.get(device)
        latency = payload.get("latency_ms")
        suspect = payload.get("suspect_readings")
        station_state, fault_code = payload.get("station_state"), payload.get("fault_code")
        self.devices[device] = DeviceRow(
            str(payload["station"]),
            up,
            None if latency is None else float(latency),
            int(payload["errors"]),
            str(payload.get("detail") or ""),
            None if suspect is None else int(suspect),
            None if station_state is None else str(station_state),
            None if fault_code is None else int(fault_code),
            int(payload["time_ns"]),
            ClockStatus.of_status(payload),
        )
        # docs/mqtt.md: a clean shutdown publishes up=false with this detail; that is not an alarm.
        if previous is not None and previous.up and not up and payload.get("detail") != "controller stopped":
            detail = payload.get("detail") or "no detail"
            self._raise(f"offline:{device}", Alarm(int(payload["time_ns"]), "fail", f"{device} offline: {detail}"))
        elif up:
            self.active.pop(f"offline:{device}", None)

    def _on_reading(self, payload: dict[str, Any]) -> None:
        self.latest_reading[str(payload["device"])] = payload | {
            "activity_bq": float(payload["activity_bq"]),
            "station": str(payload["station"]),
        }

    def _on_measurement(self, payload: dict[str, Any]) -> None:
        self.measurements.appendleft(
            payload | {"activity_bq": float(payload["activity_bq"]), "sd_bq": float(payload["sd_bq"]), "labels": []}
        )

    def _on_measurement_label(self, payload: dict[str, Any]) -> None:
        measurement_id, label = str(payload["measurement_id"]), str(payload["label"])
        for measurement in self.measurements:
            if measurement["msg_id"] == measurement_id:
                measurement["labels"].append(label)

    def _on_elution(self, payload: dict[str, Any]) -> None:
        self.elutions.appendleft(payload | {"activity_bq": float(payload["activity_bq"])})

    def _on_qc(self, payload: dict[str, Any]) -> None:
        verdict = str(payload["verdict"])
        if verdict not in VERDICT_STYLE:
            raise ValueError("verdict")
        key = (str(payload["device"]), str(payload["test"]))
        self.verdicts.pop(key, None)  # re-inserted, so the dict stays in arrival order
        self.verdicts[key] = payload
        self.verdict_counts[verdict] += 1
        if verdict != "pass":
            self.alarms.append(
                Alarm(
                    int(payload["time_ns"]),
                    verdict,
                    f"{payload['device']}: {payload['test']} {verdict.upper()} {_judged(payload)} "
                    f"(limit: {payload.get('limit', '?')})",
                )
            )

    def _on_qc_status(self, payload: dict[str, Any]) -> None:
        key = (str(payload["device"]), str(payload["item"]))
        payload = payload | {"test": str(payload["test"]), "station": str(payload["station"])}  # shown as such
        state = str(payload["state"])
        if state not in STATE_STYLE:
            raise ValueError("state")
        previous = self.schedule.get(key)
        self.schedule[key] = payload
        condition = f"qc:{key[0]}:{key[1]}"
        if not payload["alarm"]:
            self.active.pop(condition, None)
        elif previous is None or previous["state"] != state:
            text = f"{key[0]}: QC {key[1]} {state.upper()} ({payload['detail']})"
            self._raise(condition, Alarm(int(payload["time_ns"]), "fail", text))

    def _on_qc_procedure(self, payload: dict[str, Any]) -> None:
        procedure_id = str(payload["procedure_id"])
        self.procedures.pop(procedure_id, None)
        self.procedures[procedure_id] = payload
        self.procedures.move_to_end(procedure_id, last=False)
        while len(self.procedures) > 6:
            self.procedures.popitem()

    def _on_controller_alarm(self, payload: dict[str, Any]) -> None:
        about = payload.get("device") or payload.get("generator") or ""
        condition = f"{payload['alarm']}:{about}"
        if not payload["active"]:
            self.active.pop(condition, None)
            return
        if payload["alarm"] == "suspect_readings":
            text = (
                f"{payload['device']}: {payload['suspect_recent']} of the last {payload['window']} readings "
                f"suspect ({payload.get('reason') or 'no reason'})"
            )
        elif payload["alarm"] == "elution_counter_reset":
            text = f"{payload['generator']}: elution counter started again ({payload['reason']})"
        elif payload["alarm"] == "clock_offset":
            text = (
                f"{payload['device']}: clock {float(payload['clock_offset_s']):+.1f} s from the controller's"
                f" (limit {float(payload['max_clock_offset_s']):g} s)"
            )
        else:
            text = f"outbox {float(payload['fraction']) * 100:.0f} % full: sinks are not keeping up"
        self._raise(condition, Alarm(int(payload["time_ns"]), "fail", text))

    def _on_controller_status(self, payload: dict[str, Any]) -> None:
        # docs/mqtt.md: "offline"/"shutdown" is a clean stop; the last will ("connection lost") is an alarm.
        if payload["state"] == "online":
            self.active.pop("controller", None)
        elif payload.get("reason") != "shutdown":
            text = f"controller {payload['state']}: {payload.get('reason', '')}"
            self._raise("controller", Alarm(time.time_ns(), "fail", text))

    def _raise(self, condition: str, alarm: Alarm) -> None:
        """An alarm: in the recent list, and in force under `condition` until the message that ends it."""
        self.alarms.append(alarm)
        self.active[condition] = alarm


_HANDLERS = {
    "device_status": LabView._on_status,
    "reading": LabView._on_reading,
    "measurement": LabView._on_measurement,
    "measurement_label": LabView._on_measurement_label,
    "elution": LabView._on_elution,
    "qc_result": LabView._on_qc,
    "qc_status": LabView._on_qc_status,
    "qc_procedure": LabView._on_qc_procedure,
    "controller_alarm": LabView._on_controller_alarm,
    "controller_status": LabView._on_controller_status,
}


async def watch_broker(view: LabView, host: str, port: int, *, subscribed: asyncio.Event | None = None) -> None:
    """Keep the view subscribed to hotlab/<site>/# until cancelled; reconnect after any loss."""
    topic = f"hotlab/{view.site}/#"
    identifier = f"hotlab-demo-view-{uuid.uuid4().hex[:8]}"
    while True:
        try:
            async with aiomqtt.Client(host, port, identifier=identifier, keepalive=30) as client:
                await client.subscribe(topic, qos=1)
                view.connected, view.broker_error = True, ""
                if subscribed is not None:
                    subscribed.set()
                async for message in client.messages:
                    try:
                        view.apply(str(message.topic), message.payload)
                    except ViewInputError as exc:
                        view.rejected += 1
                        log.warning("live view: %s", exc)
        except aiomqtt.MqttError as exc:
            view.connected, view.broker_error = False, str(exc)
            await asyncio.sleep(1.0)


# -- rendering -------------------------------------------------------------------------------


def render(view: LabView) -> RenderableType:
    """The whole screen: header; devices beside activities; measurements; elutions; QC verdicts beside alarms;
    what QC is due beside the QC procedures."""
    return Group(
        _header(view),
        _side_by_side(_devices(view), _activities(view), (3, 2)),
        _measurements(view),
        _elutions(view),
        _side_by_side(_verdicts(view), _alarms(view), (3, 2)),
        _side_by_side(_schedule(view), _procedures(view), (2, 3)),
    )


def _side_by_side(left: RenderableType, right: RenderableType, ratios: tuple[int, int]) -> Table:
    grid = Table.grid(expand=True, padding=(0, 1))
    grid.add_column(ratio=ratios[0])
    grid.add_column(ratio=ratios[1])
    grid.add_row(left, right)
    return grid


def _header(view: LabView) -> Panel:
    uptime = int(time.monotonic() - view.started_monotonic)
    broker = Text(f"broker {view.broker}", style="green" if view.connected else "bold red")
    if not view.connected:
        broker.append(f" (not connected: {view.broker_error or 'connecting'})")
    first = Text.assemble(
        broker,
        f" · generator stations and calibrators run {view.acceleration:g}x faster than "
        f"the wall clock · up {uptime // 60:02d}:{uptime % 60:02d}",
    )
    second = Text.assemble(
        f"{view.counts['reading']} readings · {view.counts['measurement']} measurements · "
        f"{view.counts['elution']} elutions · QC verdicts: ",
        (f"{view.verdict_counts['pass']} pass", VERDICT_STYLE["pass"]),
        ", ",
        (f"{view.verdict_counts['warn']} warn", VERDICT_STYLE["warn"]),
        ", ",
        (f"{view.verdict_counts['fail']} fail", VERDICT_STYLE["fail"]),
    )
    return Panel(Group(first, second), title=f"hotlab demo · site {view.site}", title_align="left", border_style="cyan")


def _devices(view: LabView) -> Table:
    table = Table(title="Devices", title_justify="left", expand=True)
    for name in ("device", "station", "state", "latency", "errors", "suspect", "detail"):
        # Only the free-text detail gives way when the terminal is narrow.
        table.add_column(
            name,
            justify="right" if name in ("latency", "errors", "suspect") else "left",
            no_wrap=True,
            overflow="ellipsis",
            ratio=1 if name == "detail" else None,
        )
    for name, row in sorted(view.devices.items()):
        state = Text("online", "bold green") if row.up else Text("offline", "bold red")
        latency = "-" if row.latency_ms is None else f"{row.latency_ms:.0f} ms"
        errors = Text(str(row.errors), "yellow" if row.errors else "")
        suspect = Text("-" if row.suspect is None else str(row.suspect), "yellow" if row.suspect else "")
        table.add_row(name, row.station, state, latency, errors, suspect, row.detail)
    return table


def _activities(view: LabView) -> Table:
    table = Table(title="Latest activities", title_justify="left", expand=True)
    for name in ("device", "nuclide", "activity", "time"):
        table.add_column(name, justify="right" if name == "activity" else "left", no_wrap=True)
    for name, reading in sorted(view.latest_reading.items()):
        activity = Text(format_activity(float(reading["activity_bq"])))
        if reading.get("quality") == "suspect":  # shown as read, marked: never hidden
            activity = Text(f"{activity} {SUSPECT_MARK}", "bold yellow")
            table.caption = f"{SUSPECT_MARK} suspect: shown, never used for QC"
        table.add_row(name, str(reading.get("nuclide") or "?"), activity, _clock(reading.get("time_ns")))
    return table


def _measurements(view: LabView) -> Table:
    table = Table(title="Measurements (settled values)", title_justify="left", expand=True)
    for name in ("settled", "device", "nuclide", "activity", "sd", "n", "ended", "labels"):
        table.add_column(
            name,
            justify="right" if name in ("activity", "sd", "n") else "left",
            no_wrap=True,
            overflow="ellipsis",
            ratio=1 if name == "labels" else None,
        )
    for measurement in view.measurements:
        activity_bq, sd_bq = measurement["activity_bq"], measurement["sd_bq"]
        table.add_row(
            _clock(measurement.get("time_ns")),
            str(measurement["device"]),
            str(measurement.get("nuclide") or "?"),
            format_activity(activity_bq),
            f"{sd_bq / activity_bq * 100:.2f} %" if activity_bq else "-",
            str(measurement.get("n", "")),
            str(measurement.get("end", "")),
            ", ".join(measurement["labels"]) or "-",
        )
    return table


def _elutions(view: LabView) -> Table:
    table = Table(title="Elutions (station clock)", title_justify="left", expand=True)
    for name in ("end", "generator", "#", "activity", "volume", "yield", "breakthrough"):
        table.add_column(name, justify="left" if name in ("end", "generator") else "right", no_wrap=True)
    for elution in view.elutions:
        yield_pct, breakthrough = elution.get("yield_pct"), elution.get("breakthrough_pct")
        table.add_row(
            _clock(elution.get("end_ns")),
            str(elution["generator"]),
            str(elution.get("counter", "")),
            f"{format_activity(float(elution['activity_bq']))} {elution.get('nuclide', '')}",
            f"{float(elution.get('volume_ml', 0.0)):g} mL",
            "-" if yield_pct is None else f"{float(yield_pct):.1f} %",
            "-" if breakthrough is None else f"{float(breakthrough):.2e} %",
        )
    return table


def _verdicts(view: LabView) -> Table:
    table = Table(title="QC verdicts (latest of each test)", title_justify="left", expand=True)
    for name in ("time", "device", "test", "verdict", "value"):
        table.add_column(name, justify="right" if name == "value" else "left", no_wrap=True)
    for result in reversed(view.verdicts.values()):
        verdict = str(result["verdict"])
        table.add_row(
            _clock(result.get("time_ns")),
            str(result["device"]),
            str(result["test"]),
            Text(verdict.upper(), VERDICT_STYLE[verdict]),
            _judged(result),
        )
    return table


def _schedule(view: LabView) -> Table:
    table = Table(title="QC due (schedule)", title_justify="left", expand=True)
    for name in ("device", "item", "state", "due"):
        table.add_column(name, no_wrap=True, overflow="ellipsis", ratio=1 if name == "item" else None)
    for (device, item), status in sorted(view.schedule.items()):
        state = str(status["state"])
        table.add_row(
            device, item, Text(state.upper(), STATE_STYLE[state]), _clock(status.get("due_ns"), "%m-%d %H:%M")
        )
    return table


def _procedures(view: LabView) -> Table:
    table = Table(title="QC procedures", title_justify="left", expand=True)
    for name in ("started", "device", "procedure", "status", "verdict", "by"):
        table.add_column(name, no_wrap=True, overflow="ellipsis")
    for procedure in view.procedures.values():
        verdict = procedure.get("verdict")
        started_by = procedure.get("started_by")
        table.add_row(
            _clock(procedure.get("started_ns")),
            str(procedure["device"]),
            str(procedure["procedure"]),
            str(procedure["status"]),
            Text(str(verdict).upper(), VERDICT_STYLE.get(str(verdict), "")) if verdict else "-",
            "recognised" if started_by is None else str(started_by.get("user", "?")),
        )
    return table


def _alarms(view: LabView) -> Panel:
    if not view.alarms:
        return Panel(Text("none", "green"), title="Alarms", title_align="left", border_style="green")
    lines = Text()
    for alarm in reversed(view.alarms):
        lines.append(f"{_clock(alarm.time_ns)} ", "dim")
        lines.append(alarm.text + "\n", VERDICT_STYLE[alarm.severity])
    lines.rstrip()
    return Panel(lines, title="Alarms", title_align="left", border_style="red")


def snapshot_svg(view: LabView, *, width: int = 150) -> str:
    """The view as an SVG image (for documentation), rendered the way the terminal shows it."""
    console = Console(record=True, width=width, file=io.StringIO(), force_terminal=True, color_system="truecolor")
    console.print(render(view))
    return console.export_svg(title="hotlab demo")


def _judged(result: dict[str, Any]) -> str:
    """The value the limit was applied to, in the limit's unit (a deviation in %, a yield in %, kBq/MBq...)."""
    value = result.get("value_judged")
    limit_values = result.get("limit_values") or {}
    if value is None:
        deviation = result.get("deviation_pct")
        return "-" if deviation is None else f"{float(deviation):+.2f} %"
    sign = "+" if limit_values.get("kind") == "tolerance" else ""
    return f"{float(value):{sign}.4g} {limit_values.get('unit', '')}".strip()


def _clock(time_ns: Any, layout: str = "%H:%M:%S") -> str:
    """A UTC time of day; `layout` "%m-%d %H:%M" for a time that can be days away (a quarterly test's due)."""
    if not isinstance(time_ns, int):
        return "-"
    try:
        return datetime.fromtimestamp(time_ns / 1e9, tz=UTC).strftime(layout)
    except (OverflowError, ValueError, OSError):  # a time no clock shows: the message is shown without it
        return "-"
