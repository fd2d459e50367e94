"""Delivery bookkeeping: the last elution counter the controller confirmed per (station, generator).

Why a store of its own: the elution-station driver returns a station's last elution until the
controller marks it delivered, and only a store that survives restarts (SqliteCounterStore)
keeps a restart from replaying it; the driver reaches the store through asyncio.to_thread.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Protocol


class CounterStore(Protocol):
    """Where the driver remembers the last elution counter delivered; must survive restarts to be useful."""

    def last_counter(self, station: str, generator_id: str) -> int | None: ...

    def set_last_counter(self, station: str, generator_id: str, counter: int) -> None: ...


class MemoryCounterStore:
    """Process-lifetime store: no replay across reconnects, but a restart replays the last elution (tests, dry runs)."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, str], int] = {}

    def last_counter(self, station: str, generator_id: str) -> int | None:
        return self._counters.get((station, generator_id))

    def set_last_counter(self, station: str, generator_id: str, counter: int) -> None:
        self._counters[(station, generator_id)] = counter


class SqliteCounterStore:
    """Durable store: one row per (station, generator) in a small SQLite file, committed per update.

    A connection is opened per call, so the store can be used from worker threads
    (the driver calls it through asyncio.to_thread to keep disk syncs off the event loop).
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

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10.0)

    def last_counter(self, station: str, generator_id: str) -> int | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT counter FROM last_elution WHERE station = ? AND generator_id = ?", (station, generator_id)
            ).fetchone()
        return None if row is None else int(row[0])

    def set_last_counter(self, station: str, generator_id: str, counter: int) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO last_elution (station, generator_id, counter, updated_ns) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (station, generator_id) DO UPDATE SET counter = excluded.counter,"
                " updated_ns = excluded.updated_ns",
                (station, generator_id, counter, time.time_ns()),
            )
