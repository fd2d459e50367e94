"""The lab overview as the page shows it: plain rows built from the live `LabView`, formatted for people.

Kept apart from the templates so the page only lays out text and never computes: every activity
goes through `format_activity` (the unit people read on the calibrator), a suspect reading is
shown as read and marked (never hidden, never used for QC: controller/plausibility.py), and each
QC schedule item keeps the state the controller published (done, due, overdue, failed).

The device pages (station.py, calibrator.py) show the same lab closer up, so what they share with
the overview lives here too: the clock format and the archive's history beside the live view.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hotlab.controller.archive import HistoryArchive
from hotlab.controller.archive_reads import newest
from hotlab.controller.lab.demo import DeviceRow, LabView
from hotlab.physics.units import format_activity

log = logging.getLogger("hotlab.web")
#: Archived messages a device page reads of one kind at most: more than any page shows.
ARCHIVED_ROWS = 500


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
    #: The device's own page (`_page`), or None.
    page: str | None
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
class Notice:
    """What a device page says above its buttons: something to know before acting. `severity` is
    warn or fail (its CSS class)."""

    severity: str
    text: str


@dataclass(frozen=True, slots=True)
class LabOverview:
    site: str
    broker: str
    connected: bool
    broker_error: str
    devices: tuple[DeviceLine, ...]
    #: The alarms in force now (device offline, QC overdue or failed, a controller alarm), newest first.
    active: tuple[AlarmLine, ...]
    #: The latest alarms raised, in force or not (a failed verdict is an event), newest first.
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
        active=tuple(
            AlarmLine(clock(a.time_ns), a.severity, a.text)
            for a in sorted(view.active.values(), key=lambda a: a.time_ns, reverse=True)
        ),
        alarms=tuple(AlarmLine(clock(a.time_ns), a.severity, a.text) for a in reversed(view.alarms)),
    )


def _device(view: LabView, name: str) -> DeviceLine:
    row = view.devices.get(name)
    reading = view.latest_reading.get(name)
    statuses = [(item, status) for (device, item), status in sorted(view.schedule.items()) if device == name]
    qc = tuple(
        QcLine(item, str(status["test"]), str(status["state"]), str(status.get("detail") or ""))
        for item, status in statuses
    )
    page = _page(name, row, reading)
    if row is not None:
        state = "online" if row.up else "offline"
        return DeviceLine(name, row.station, page, state, row.detail, reading_line(reading), qc)
    station = reading["station"] if reading is not None else statuses[0][1]["station"]
    return DeviceLine(name, str(station), page, "unknown", "", reading_line(reading), qc)


def _page(name: str, row: DeviceRow | None, reading: dict[str, Any] | None) -> str | None:
    """The device's own page: a dose calibrator's (it has readings, or its status counts suspect ones,
    docs/mqtt.md), else an elution station's (it has a status but no readings); None for a name only
    QC items carry (a generator) or a device that has not reported."""
    if reading is not None or (row is not None and row.suspect is not None):
        return f"/calibrator/{name}"
    return f"/station/{name}" if row is not None else None


def reading_line(reading: dict[str, Any] | None) -> ReadingLine | None:
    if reading is None:
        return None
    suspect = reading.get("quality") == "suspect"
    return ReadingLine(
        nuclide=str(reading.get("nuclide") or "?"),
        activity=format_activity(float(reading["activity_bq"])),
        suspect=suspect,
        reason=str(reading.get("quality_reason") or "") if suspect else "",
        time=clock(reading.get("time_ns")),
    )


def clock(time_ns: Any, pattern: str = "%H:%M:%S UTC") -> str:
    """A message's time for people (UTC, as every time on the bus); "-" for none or one no clock shows."""
    if not isinstance(time_ns, int):
        return "-"
    try:
        return datetime.fromtimestamp(time_ns / 1e9, tz=UTC).strftime(pattern)
    except (OverflowError, ValueError, OSError):  # a time no clock shows: the rest is still shown
        return "-"


# --------------------------------------------------------------------------- shared by the device pages


def archived(
    path: Path | None,
    kind: str,
    since_ns: int,
    *,
    station: str | None = None,
    device: str | None = None,
    test: str | None = None,
) -> list[dict[str, Any]]:
    """The newest ARCHIVED_ROWS messages of `kind` since `since_ns` from the lab's archive, oldest first (blocking:
    run in a thread). Newest first in SQL with a LIMIT: a page's read costs the same after years of history.

    The live view holds only what the panel saw since it started, and one verdict per test; the
    archive (read only) holds what came before. Empty when the lab keeps no archive or it cannot
    be read yet: the page then shows what the bus brought.
    """
    if path is None or not path.is_file():
        return []
    try:
        with HistoryArchive(path, read_only=True) as archive:
            return newest(archive, kind, since_ns, ARCHIVED_ROWS, station=station, device=device, test=test)
    except Exception as exc:  # a page shows the live part even when the archive is locked or damaged
        log.warning("web panel: archive %s not read: %s", path, exc)
        return []


def newest_first(*sources: Iterable[Mapping[str, Any]], key: str = "time_ns") -> list[dict[str, Any]]:
    """The messages of every source once each (de-duplicated on msg_id, docs/mqtt.md), newest first."""
    unique: dict[Any, dict[str, Any]] = {}
    for source in sources:
        for message in source:
            unique.setdefault(message.get("msg_id") or id(message), dict(message))

    def when(message: Mapping[str, Any]) -> int:
        value = message.get(key)
        return value if isinstance(value, int) else 0

    return sorted(unique.values(), key=when, reverse=True)
