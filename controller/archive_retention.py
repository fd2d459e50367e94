"""Retention of the history archive: raw polls give way to per-minute summaries, records stay forever.

Why: at 1 Hz a dose calibrator's raw readings fill ~90 MB of archive a day, but the records a lab must
keep (10 CFR 35.2063 and 35.2204: three years) are its measurements, QC results, procedures, baselines,
elutions, alarms, audit anchors and status changes, not every poll of an empty chamber. So, for what is
older than `[history] raw_days` (controller/config.py RetentionConfig):

* `reading` messages become one summary row (`reading_minute`; the `reading_summary` view names its series)
  per site, station, device, setting (nuclide) and UTC minute: min, mean and max of the good readings' activity in Bq, how many there were (`n`) and how
  many the plausibility check found suspect. Suspect readings are counted but kept out of the values,
  as QC keeps them out (controller/checked_source.py). A reading without a numeric activity cannot be
  summarised and stays raw; an old one without a quality counts as good, as everywhere else.
* `device_status` messages are re-published every `status_interval_s` while nothing changes. Of each
  run of statuses with the same state (site, station, up, detail, station state, fault code, clock alarm), only the
  first (the change) and the last (how long it lasted) are kept; latency and counters of the dropped
  repeats go, the readings' summaries show that the device was read.
* Every other kind is kept as it is, including kinds this module does not know.

A pass works one device-hour (at most CHUNK_READINGS readings) per transaction (`HistoryArchive.write`):
the minute rows are written and the raw rows they summarise deleted in the same transaction, so a crash
leaves either the readings or their summary, never neither nor both, and the archive's lock is free
between chunks for the history sink. A summary minute that already exists is merged with (added to) what a later pass finds, so a pass
run again finds nothing to count twice. Only rows archived before `archived_before_ns` are touched:
the history sink passes the moment it had acknowledged everything it archived, because a row the
outbox may still replay (a crash between archive and ack) would otherwise come back after its summary
and be counted again. Where statuses were thinned is kept per device (`retention_mark`), so a pass
walks only the hours it has not seen; the readings it walks are those still raw.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from hotlab.controller.archive import HistoryArchive
from hotlab.physics.utc_time import NS_PER_S

log = logging.getLogger(__name__)

MINUTE_NS = 60 * NS_PER_S
HOUR_NS = 60 * MINUTE_NS
DAY_NS = 24 * HOUR_NS
#: The most readings one chunk summarises (a device polled faster than ~0.5 Hz has shorter chunks than an hour),
#: so the time the archive's lock is held does not grow with the poll rate: ~0.2 s on a slow virtual disk.
CHUNK_READINGS = 2000
#: Pages one `release_free_pages` call may move (8 MiB in a new archive): the lock's longest hold there.
RELEASE_PAGES_PER_STEP = 1024

#: What makes a reading summarisable; the same condition picks the rows counted and the rows deleted.
_SUMMARISABLE = "CASE WHEN json_valid(m.payload) THEN json_type(m.payload, '$.activity_bq') END IN ('real', 'integer')"
_CHUNK_READINGS = (
    "m.kind = 'reading' AND m.device = ? AND m.time_ns >= ? AND m.time_ns < ? AND m.archived_ns < ? AND "
    + _SUMMARISABLE
)
_GOOD = "COALESCE(m.quality, 'good') != 'suspect'"
_BQ = "json_extract(m.payload, '$.activity_bq')"
_SERIES = (
    "COALESCE(m.site, '') AS site, COALESCE(m.station, '') AS station, "
    "COALESCE(json_extract(m.payload, '$.nuclide'), '') AS nuclide"
)
_NEW_SERIES = f"""
INSERT OR IGNORE INTO reading_series (device, site, station, nuclide)
SELECT DISTINCT m.device, {_SERIES} FROM message AS m WHERE {_CHUNK_READINGS}
"""
_SUMMARISE = f"""
INSERT INTO reading_minute (series, minute, n, suspect, min_bq, mean_bq, max_bq)
SELECT s.id, r.time_ns / {MINUTE_NS}, SUM(r.good), SUM(NOT r.good),
       MIN(CASE WHEN r.good THEN r.bq END), AVG(CASE WHEN r.good THEN r.bq END), MAX(CASE WHEN r.good THEN r.bq END)
FROM (SELECT m.device, m.time_ns, {_SERIES}, {_GOOD} AS good, {_BQ} AS bq FROM message AS m WHERE {_CHUNK_READINGS}) AS r
JOIN reading_series AS s ON (s.device, s.site, s.station, s.nuclide) = (r.device, r.site, r.station, r.nuclide)
WHERE true
GROUP BY 1, 2
ON CONFLICT (series, minute) DO UPDATE SET
    n = n + excluded.n,
    suspect = suspect + excluded.suspect,
    min_bq = MIN(COALESCE(min_bq, excluded.min_bq), COALESCE(excluded.min_bq, min_bq)),
    max_bq = MAX(COALESCE(max_bq, excluded.max_bq), COALESCE(excluded.max_bq, max_bq)),
    mean_bq = CASE WHEN n + excluded.n = 0 THEN NULL
        ELSE (COALESCE(mean_bq * n, 0.0) + COALESCE(excluded.mean_bq * excluded.n, 0.0)) / (n + excluded.n) END
"""
#: The keys of a device_status that make its state; a status equal to both neighbours on these is a repeat.
STATUS_STATE = ("site", "station", "up", "detail", "station_state", "fault_code", "clock_alarm")


@dataclass(slots=True)
class RetentionPass:
    """What one pass did, for its log line and its `archive_retention` record."""

    cutoff_ns: int
    started_ns: int
    readings: int = 0
    minutes: int = 0
    statuses: int = 0
    chunks: int = 0
    freed_bytes: int = 0
    #: False when the pass was stopped before it had walked everything past the window.
    complete: bool = True
    duration_s: float = 0.0
    archive_bytes: int = 0
    _started: float = field(default_factory=time.monotonic, repr=False)

    @property
    def changed(self) -> bool:
        return bool(self.readings or self.statuses)


def raw_cutoff_ns(now_ns: int, raw_days: float) -> int:
    """The start of the UTC minute `raw_days` before `now_ns`: raw rows before it are past the window.

    Whole minutes, so a pass never summarises part of a minute whose other readings are still raw.
    """
    return (now_ns - round(raw_days * DAY_NS)) // MINUTE_NS * MINUTE_NS


def retain(
    archive: HistoryArchive,
    cutoff_ns: int,
    *,
    archived_before_ns: int,
    stop: threading.Event | None = None,
    chunk_ns: int = HOUR_NS,
) -> RetentionPass:
    """Summarise the readings and thin the statuses before `cutoff_ns`, one device and `chunk_ns` at a time.

    Blocking SQLite I/O: from async code run it in a worker thread. `stop` is looked at between chunks;
    what was done by then stays done (`complete` is False). Then the freed pages go back to the file
    system, in steps that hold the lock briefly.
    """
    outcome = RetentionPass(cutoff_ns=cutoff_ns, started_ns=time.time_ns())
    for device in _devices(archive):
        start = _next_chunk(archive, device, 0, cutoff_ns, chunk_ns)
        while start is not None:
            if stop is not None and stop.is_set():
                outcome.complete = False
                break
            end = _chunk_end(archive, device, start, min(start + chunk_ns, cutoff_ns))
            work = functools.partial(_chunk, device=device, start_ns=start, end_ns=end, before_ns=archived_before_ns)
            readings, minutes, statuses = archive.write(work)
            outcome.readings += readings
            outcome.minutes += minutes
            outcome.statuses += statuses
            outcome.chunks += 1
            start = _next_chunk(archive, device, end, cutoff_ns, chunk_ns)
        if not outcome.complete:
            break
    [(page_size,)] = archive.select("SELECT page_size FROM pragma_page_size")
    while not (stop is not None and stop.is_set()):
        released = archive.release_free_pages(RELEASE_PAGES_PER_STEP)
        outcome.freed_bytes += released * int(page_size)
        if released < RELEASE_PAGES_PER_STEP:
            break
    outcome.archive_bytes = archive.size_bytes()
    outcome.duration_s = time.monotonic() - outcome._started
    return outcome


def _devices(archive: HistoryArchive) -> list[str]:
    """Every device in the archive, one index seek each (a DISTINCT would read the whole index)."""
    devices: list[str] = []
    while True:
        [(device,)] = archive.select(
            "SELECT MIN(device) FROM message WHERE device > ?", (devices[-1] if devices else "",)
        )
        if device is None:
            return devices
        devices.append(str(device))


def _next_chunk(archive: HistoryArchive, device: str, after_ns: int, cutoff_ns: int, chunk_ns: int) -> int | None:
    """Where the next chunk of `device` starts (`after_ns`, or later at a multiple of `chunk_ns`), or None.

    It skips hours with nothing to do: readings are searched from `after_ns` (those left are raw),
    statuses from where the device's last thinning ended (`retention_mark`).
    """
    [(reading_ns, status_ns)] = archive.select(
        "SELECT (SELECT MIN(time_ns) FROM message WHERE device = ?1 AND kind = 'reading' AND time_ns >= ?2), "
        "(SELECT MIN(time_ns) FROM message WHERE device = ?1 AND kind = 'device_status' AND time_ns >= MAX(?2, "
        "COALESCE((SELECT statuses_through_ns FROM retention_mark WHERE device = ?1), 0)))",
        (device, after_ns),
    )
    found = [int(t) for t in (reading_ns, status_ns) if t is not None and t < cutoff_ns]
    if not found:
        return None
    return max(after_ns, min(found) // chunk_ns * chunk_ns)


def _chunk_end(archive: HistoryArchive, device: str, start_ns: int, end_ns: int) -> int:
    """`end_ns`, or the start of the minute of the reading CHUNK_READINGS after `start_ns` if that comes sooner
    (at least one minute on: the minute is what is summarised whole)."""
    rows = archive.select(
        "SELECT time_ns FROM message WHERE device = ? AND kind = 'reading' AND time_ns >= ? AND time_ns < ? "
        "ORDER BY time_ns LIMIT 1 OFFSET ?",
        (device, start_ns, end_ns, CHUNK_READINGS),
    )
    if not rows:
        return end_ns
    return max(int(rows[0][0]) // MINUTE_NS * MINUTE_NS, start_ns + MINUTE_NS)


def _chunk(db: sqlite3.Connection, device: str, start_ns: int, end_ns: int, before_ns: int) -> tuple[int, int, int]:
    """One transaction: summarise and delete `device`'s readings in [start_ns, end_ns), thin its statuses there.

    Returns (readings removed, summary minutes written, statuses removed).
    """
    chunk = (device, start_ns, end_ns, before_ns)
    db.execute(_NEW_SERIES, chunk)
    minutes = db.execute(_SUMMARISE, chunk).rowcount
    readings = db.execute(f"DELETE FROM message AS m WHERE {_CHUNK_READINGS}", chunk).rowcount
    repeats = _repeated_statuses(db, device, start_ns, end_ns, before_ns)
    db.executemany("DELETE FROM message WHERE msg_id = ?", [(msg_id,) for msg_id in repeats])
    db.execute(
        "INSERT INTO retention_mark (device, statuses_through_ns) VALUES (?, ?) ON CONFLICT (device) "
        "DO UPDATE SET statuses_through_ns = MAX(statuses_through_ns, excluded.statuses_through_ns)",
        (device, end_ns),
    )
    return readings, max(minutes, 0), len(repeats)


def _repeated_statuses(db: sqlite3.Connection, device: str, start_ns: int, end_ns: int, before_ns: int) -> list[str]:
    """The msg_ids of `device`'s statuses in [start_ns, end_ns) whose state equals both neighbours'.

    The neighbours of the chunk's first and last rows are the rows just outside it, wherever they lie
    (the next one may be inside the raw window), so each run keeps its first and last status.
    """
    order = "ORDER BY time_ns {0}, msg_id {0} LIMIT 1"
    before = db.execute(
        "SELECT msg_id, payload, archived_ns FROM message WHERE device = ? AND kind = 'device_status' "
        "AND time_ns < ? " + order.format("DESC"),
        (device, start_ns),
    ).fetchall()
    inside = db.execute(
        "SELECT msg_id, payload, archived_ns FROM message WHERE device = ? AND kind = 'device_status' "
        "AND time_ns >= ? AND time_ns < ? ORDER BY time_ns, msg_id",
        (device, start_ns, end_ns),
    ).fetchall()
    after = db.execute(
        "SELECT msg_id, payload, archived_ns FROM message WHERE device = ? AND kind = 'device_status' "
        "AND time_ns >= ? " + order.format("ASC"),
        (device, end_ns),
    ).fetchall()
    rows = [*before, *inside, *after]
    states = [_status_state(payload) for _, payload, _ in rows]
    first = len(before)
    return [
        rows[i][0]
        for i in range(first, first + len(inside))
        if 0 < i < len(rows) - 1
        and rows[i][2] < before_ns
        and states[i] is not None
        and states[i - 1] == states[i] == states[i + 1]
    ]


def _status_state(payload: str) -> tuple[Any, ...] | None:
    """The state a device_status reports, or None for a payload that cannot be read (kept, never a repeat)."""
    try:
        status = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(status, dict):
        return None
    return tuple(json.dumps(status.get(key)) for key in STATUS_STATE)
