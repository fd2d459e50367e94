"""The lab overview as the page shows it: plain rows built from the live `LabView`, formatted for people.

Kept apart from the templates so the page only lays out text and never computes: every activity
goes through `format_activity` (the unit people read on the calibrator), a suspect reading is
shown as read and marked (never hidden, never used for QC: controller/plausibility.py), and each
QC schedule item keeps the state the controller published (done, due, overdue, failed).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hotlab.controller.lab.demo import LabView
from hotlab.physics.units import format_activity


@dataclass(frozen=True, slots=True)
class ReadingLine:
    nuclide: str
    activity: str
    suspect: bool
    #: Why a suspect reading is suspect; empty for a good one.
    reason: str
    time: str


@dataclass(frozen=True, slots=True)
class QcLine:
    item: str
    test: str
    #: done, due, overdue or failed (controller/qc/schedule.py): also the CSS class that colours it.
    state: str
    detail: str


@dataclass(frozen=True, slots=True)
class DeviceLine:
    name: str
    station: str
    #: online, offline, or unknown while no device_status has arrived since the panel started.
    state: str
    detail: str
    reading: ReadingLine | None
    qc: tuple[QcLine, ...]


@dataclass(frozen=True, slots=True)
class AlarmLine:
    time: str
    #: warn or fail: the CSS class that colours it.
    severity: str
    text: str


@dataclass(frozen=True, slots=True)
class LabOverview:
    site: str
    broker: str
    connected: bool
    broker_error: str
    devices: tuple[DeviceLine, ...]
    #: The latest alarms raised, newest first.
    alarms: tuple[AlarmLine, ...]


def lab_overview(view: LabView) -> LabOverview:
    """Every device the bus has named (status, reading or QC item), sorted by name, and the alarms."""
    names = sorted(set(view.devices) | set(view.latest_reading) | {device for device, _ in view.schedule})
    return LabOverview(
        site=view.site,
        broker=view.broker,
        connected=view.connected,
        broker_error=view.broker_error,
        devices=tuple(_device(view, name) for name in names),
        alarms=tuple(AlarmLine(_clock(a.time_ns), a.severity, a.text) for a in reversed(view.alarms)),
    )


def _device(view: LabView, name: str) -> DeviceLine:
    row = view.devices.get(name)
    reading = view.latest_reading.get(name)
    statuses = [(item, status) for (device, item), status in sorted(view.schedule.items()) if device == name]
    qc = tuple(
        QcLine(item, str(status["test"]), str(status["state"]), str(status.get("detail") or ""))
        for item, status in statuses
    )
    if row is not None:
        return DeviceLine(name, row.station, "online" if row.up else "offline", row.detail, _reading(reading), qc)
    station = reading["station"] if reading is not None else statuses[0][1]["station"]
    return DeviceLine(name, str(station), "unknown", "", _reading(reading), qc)


def _reading(reading: dict[str, Any] | None) -> ReadingLine | None:
    if reading is None:
        return None
    suspect = reading.get("quality") == "suspect"
    return ReadingLine(
        nuclide=str(reading.get("nuclide") or "?"),
        activity=format_activity(float(reading["activity_bq"])),
        suspect=suspect,
        reason=str(reading.get("quality_reason") or "") if suspect else "",
        time=_clock(reading.get("time_ns")),
    )


def _clock(time_ns: Any) -> str:
    if not isinstance(time_ns, int):
        return "-"
    try:
        return datetime.fromtimestamp(time_ns / 1e9, tz=UTC).strftime("%H:%M:%S UTC")
    except (OverflowError, ValueError, OSError):  # a time no clock shows: the rest is still shown
        return "-"
