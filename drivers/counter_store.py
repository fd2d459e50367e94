"""Delivery bookkeeping: the last elution the controller confirmed per (station, generator), and how it was identified.

Why a store of its own: the elution-station driver returns a station's last elution until the
controller marks it delivered, and only a store that survives restarts (SqliteCounterStore)
keeps a restart from replaying it; the driver reaches the store through asyncio.to_thread.

Why more than the counter: a station that is restarted without keeping its counter, serviced,
replaced, or whose counter rolls over counts from 0 again, and an elution whose counter is not
above the last delivered one would otherwise be taken for a repeat and dropped. The station's
serial number and counter epoch (input registers `serial` and `counter_epoch_ns`) say which
count a counter belongs to, and the end time tells the same elution repeated from another one
that has the same counter.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hotlab.physics.utc_time import format_utc_ns


@dataclass(frozen=True, slots=True)
class DeliveredElution:
    """An elution as the station identifies it: its counter within one count of one station, and its end.

    None is "not known": a mark stored before register map version 2 has the counter only, and
    the parts it lacks are not compared.
    """

    counter: int
    end_ns: int | None = None
    station_serial: str | None = None
    counter_epoch_ns: int | None = None

    def same_count(self, last: DeliveredElution) -> bool:
        """True if both counters belong to one count: the same station serial and counter epoch, where known."""
        return _same(last.station_serial, self.station_serial) and _same(last.counter_epoch_ns, self.counter_epoch_ns)

    def restart_reason(self, last: DeliveredElution) -> str | None:
        """Why this elution cannot follow `last` in one count (the counter started again), or None if it can.

        None means `last` itself, or a later elution of the same count: the caller tells them
        apart by the counter.
        """
        if not _same(last.station_serial, self.station_serial):
            cause = f"station serial changed from {last.station_serial!r} to {self.station_serial!r}"
        elif not _same(last.counter_epoch_ns, self.counter_epoch_ns):
            cause = f"counter epoch changed from {_iso(last.counter_epoch_ns)} to {_iso(self.counter_epoch_ns)}"
        elif self.counter < last.counter:
            cause = "counter went back"
        elif self.counter == last.counter and not _same(last.end_ns, self.end_ns):
            cause = f"counter {self.counter} came again with end {_iso(self.end_ns)}, not {_iso(last.end_ns)}"
        else:
            return None
        return f"{cause}; counter {last.counter} -> {self.counter}"


def _same(known: object | None, value: object) -> bool:
    return known is None or known == value


def _iso(time_ns: int | None) -> str:
    return "unknown" if time_ns is None else format_utc_ns(time_ns)


class CounterStore(Protocol):
    """Where the driver remembers the last elution delivered; must survive restarts to be useful."""

    def last_delivered(self, station: str, generator_id: str) -> DeliveredElution | None: ...

    def set_last_delivered(self, station: str, generator_id: str, elution: DeliveredElution) -> None: ...


class MemoryCounterStore:
    """Process-lifetime store: no replay across reconnects, but a restart replays the last elution (tests, dry runs)."""

    def __init__(self) -> None:
        self._delivered: dict[tuple[str, str], DeliveredElution] = {}

    def last_delivered(self, station: str, generator_id: str) -> DeliveredElution | None:
        return self._delivered.get((station, generator_id))

    def set_last_delivered(self, station: str, generator_id: str, elution: DeliveredElution) -> None:
        self._delivered[(station, generator_id)] = elution


#: The identity columns added with register map version 2; rows stored before have NULL there.
_IDENTITY_COLUMNS = {"end_ns": "INTEGER", "station_serial": "TEXT", "counter_epoch_ns": "INTEGER"}


class SqliteCounterStore:
    """Durable store: one row per (station, generator) in a small SQLite file, committed per update.

    A connection is opened per call, so the store can be used from worker threads
    (the driver calls it through asyncio.to_thread to keep disk syncs off the event loop).
    A file from before the identity columns gains them on open, its marks kept.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS last_elution ("
                " station TEXT NOT NULL, generator_id TEXT NOT NULL, counter INTEGER NOT NULL,"
                " updated_ns INTEGER NOT NULL, PRIMARY KEY (station, generator_id))"
            )
            present = {row[1] for row in db.execute("PRAGMA table_info(last_elution)")}
            for column, sql_type in _IDENTITY_COLUMNS.items():
                if column not in present:
                    db.execute(f"ALTER TABLE last_elution ADD COLUMN {column} {sql_type}")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10.0)

    def last_delivered(self, station: str, generator_id: str) -> DeliveredElution | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT counter, end_ns, station_serial, counter_epoch_ns FROM last_elution"
                " WHERE station = ? AND generator_id = ?",
                (station, generator_id),
            ).fetchone()
        return None if row is None else DeliveredElution(*row)

    def set_last_delivered(self, station: str, generator_id: str, elution: DeliveredElution) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO last_elution"
                " (station, generator_id, counter, end_ns, station_serial, counter_epoch_ns, updated_ns)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (station, generator_id) DO UPDATE SET counter = excluded.counter,"
                " end_ns = excluded.end_ns, station_serial = excluded.station_serial,"
                " counter_epoch_ns = excluded.counter_epoch_ns, updated_ns = excluded.updated_ns",
                (
                    station,
                    generator_id,
                    elution.counter,
                    elution.end_ns,
                    elution.station_serial,
                    elution.counter_epoch_ns,
                    time.time_ns(),
                ),
            )
