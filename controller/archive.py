"""The permanent local archive of everything the controller sent: a SQLite file QC officers keep.

Why: the outbox (controller/outbox.py) forgets a message once every sink acknowledged it, but
inspectors ask for months of constancy checks, elutions and verdicts. The history sink
(controller/sinks/history.py) appends each message here and only then acknowledges it, so a
crash between the two just replays the batch and `INSERT OR IGNORE` on `msg_id` keeps it
idempotent. The QC engine's restore and the report read this module directly; only the sink
loop sits with the other sinks. Where no InfluxDB is configured this archive is the only time series store.

Columns that queries filter on are indexed (kind, time_ns, site, station, device, test / verdict for
qc_result, and quality for readings: `good`, or `suspect` when the plausibility check doubted it,
controller/checked_source.py); the complete JSON payload is kept verbatim beside them. An archive
written before readings had a quality gets the column when it is next opened for writing; its old
rows have none (NULL: never checked). For elution
messages `device` holds the generator id, since a generator is the device an elution
belongs to. Messages without a `msg_id` or an integer `time_ns` cannot be indexed; they go
to the `rejected` table with the reason instead of blocking the queue or being dropped.

Raw readings are not kept forever: controller/archive_retention.py replaces those older than
`[history] raw_days` with per-minute summaries (the `reading_summary` table, read with
`summaries`) and drops repeated device statuses, a bounded chunk at a time through `write`.
A new archive is created with `auto_vacuum=INCREMENTAL`, so the pages retention frees can be
given back to the file system (`release_free_pages`); an older archive reuses them for new rows.
"""

from __future__ import annotations

import heapq
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from hotlab.controller.messages import Message, iso_utc
from hotlab.controller.outbox import rollback_unless_done
from hotlab.errors import InputError
from hotlab.physics.utc_time import parse_utc_ns

#: The largest time SQLite's INTEGER holds: the end of an open time range.
OPEN_END_NS = 2**63 - 1
_DAY_NS = 86_400_000_000_000
_MINUTE_NS = 60_000_000_000
log = logging.getLogger(__name__)
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS message (
    msg_id      TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    topic       TEXT NOT NULL,
    time_ns     INTEGER NOT NULL,
    site        TEXT,
    station     TEXT,
    device      TEXT,
    test        TEXT,
    verdict     TEXT,
    payload     TEXT NOT NULL,
    archived_ns INTEGER NOT NULL,
    quality     TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS message_kind_time ON message (kind, time_ns);
CREATE INDEX IF NOT EXISTS message_device_time ON message (device, kind, time_ns);
CREATE INDEX IF NOT EXISTS message_station_time ON message (site, station, kind, time_ns);
CREATE INDEX IF NOT EXISTS message_qc ON message (test, verdict, time_ns) WHERE kind = 'qc_result';
CREATE TABLE IF NOT EXISTS rejected (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT NOT NULL,
    topic       TEXT NOT NULL,
    payload     TEXT NOT NULL,
    reason      TEXT NOT NULL,
    archived_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS reading_series (
    id          INTEGER PRIMARY KEY,
    device      TEXT NOT NULL,
    site        TEXT NOT NULL,
    station     TEXT NOT NULL,
    nuclide     TEXT NOT NULL,
    UNIQUE (device, site, station, nuclide)
);
CREATE TABLE IF NOT EXISTS reading_minute (
    series      INTEGER NOT NULL,
    minute      INTEGER NOT NULL,
    n           INTEGER NOT NULL,
    suspect     INTEGER NOT NULL,
    min_bq      REAL,
    mean_bq     REAL,
    max_bq      REAL,
    PRIMARY KEY (series, minute)
) WITHOUT ROWID;
CREATE VIEW IF NOT EXISTS reading_summary AS
    SELECT s.site, s.station, s.device, NULLIF(s.nuclide, '') AS nuclide, m.minute * 60000000000 AS minute_ns,
           m.n, m.suspect, m.min_bq, m.mean_bq, m.max_bq
    FROM reading_minute AS m JOIN reading_series AS s ON s.id = m.series;
CREATE TABLE IF NOT EXISTS retention_mark (
    device      TEXT PRIMARY KEY,
    statuses_through_ns INTEGER NOT NULL
) WITHOUT ROWID;
"""


class HistoryQueryError(InputError):
    """A query that cannot be answered as asked (empty or inverted time range, unknown filter)."""


class NotAnArchiveError(InputError):
    """The file given as an archive is not one (another file, another database, a damaged copy)."""


@dataclass(frozen=True, slots=True)
class TimeRange:
    """Half-open UTC interval [start_ns, end_ns) in epoch nanoseconds."""

    start_ns: int
    end_ns: int

    def __post_init__(self) -> None:
        if self.end_ns <= self.start_ns:
            raise HistoryQueryError(
                f"time range ends ({iso_utc(self.end_ns)}) before or when it starts ({iso_utc(self.start_ns)})"
            )

    @classmethod
    def from_text(cls, start: str | None, end: str | None) -> TimeRange:
        """From ISO dates or date-times with Z/offset; a bare end date includes that whole UTC day (`--to 2026-11-30`).

        A missing bound is open (the epoch, or the largest time SQLite's INTEGER can hold).
        """
        start_ns = 0 if start is None else _parse_instant(start, "start", end_of_day=False)
        end_ns = OPEN_END_NS if end is None else _parse_instant(end, "end", end_of_day=True)
        return cls(start_ns, end_ns)


def _parse_instant(text: str, which: str, *, end_of_day: bool) -> int:
    """A bound as UTC epoch ns via the shared parser (hotlab.physics.utc_time.parse_utc_ns).

    A bare date is 00:00 UTC of that day; as the end of a range it means the whole day, so the
    next midnight. Date-times need Z or an offset, exactly as everywhere else in hotlab.
    """
    try:
        moment_ns = parse_utc_ns(text)
    except ValueError as exc:  # TimeFormatError, NaiveDatetimeError
        raise HistoryQueryError(f"cannot read the {which} {text!r}: {exc}") from None
    if end_of_day and _is_bare_date(text):
        moment_ns += _DAY_NS
    return moment_ns


def _is_bare_date(text: str) -> bool:
    try:
        date.fromisoformat(text.strip())
    except ValueError:
        return False
    return True


_QUALITY_INDEX = (
    "CREATE INDEX IF NOT EXISTS message_quality ON message (device, quality, time_ns) WHERE kind = 'reading'"
)


#: The indexed columns a query may filter on by equality.
FILTER_COLUMNS = ("site", "station", "device", "test", "verdict", "quality")


@dataclass(frozen=True, slots=True)
class ReadingSummary:
    """The readings of one device on one setting in one UTC minute, once the raw readings are gone.

    `n` counts the good readings (and those archived before readings had a quality); `min_bq`,
    `mean_bq` and `max_bq` are theirs, None when the minute had none. `suspect` counts the readings
    the plausibility check doubted: kept out of the values, as QC keeps them out, but counted.
    Activity in Bq whatever unit the device displayed; `nuclide` is None when the readings named no setting.
    """

    site: str
    station: str
    device: str
    nuclide: str | None
    minute_ns: int
    n: int
    suspect: int
    min_bq: float | None
    mean_bq: float | None
    max_bq: float | None


def _where(kind: str, period: TimeRange | None, where: Mapping[str, str | None]) -> tuple[str, list[Any]]:
    """The WHERE clause (without the keyword) and its parameters for one kind, period and filters."""
    unknown = sorted(set(where) - set(FILTER_COLUMNS))
    if unknown:
        raise HistoryQueryError(f"cannot filter on {', '.join(unknown)}; use {', '.join(FILTER_COLUMNS)}")
    clauses = ["kind = ?"]
    params: list[Any] = [kind]
    if period is not None:
        clauses.append("time_ns >= ? AND time_ns < ?")
        params += [period.start_ns, period.end_ns]
    for column in FILTER_COLUMNS:
        value = where.get(column)
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    return " AND ".join(clauses), params


def _index_columns(
    message: Message,
) -> tuple[str, int, str | None, str | None, str | None, str | None, str | None, str | None]:
    """The indexed columns of a message, or raise ValueError saying why it cannot be indexed."""
    payload = message.payload
    msg_id = payload.get("msg_id")
    time_ns = payload.get("time_ns")
    if not isinstance(msg_id, str) or not msg_id:
        raise ValueError("payload has no msg_id")
    if not isinstance(time_ns, int) or isinstance(time_ns, bool):
        raise ValueError(f"payload time_ns is {time_ns!r}, not an integer")

    def text(key: str) -> str | None:
        value = payload.get(key)
        return None if value is None else str(value)

    device = text("device") if "device" in payload else text("generator")
    return msg_id, time_ns, text("site"), text("station"), device, text("test"), text("verdict"), text("quality")


class HistoryArchive:
    """The SQLite archive. Thread-safe (one connection behind a lock); async code calls it via `asyncio.to_thread`."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 5.0, read_only: bool = False) -> None:
        """Open (creating if needed) the archive; `read_only` opens an existing one for reports and
        inspectors' copies without ever writing to it."""
        self.path = Path(path)
        self._lock = threading.Lock()
        self._has_summaries = True
        if read_only:
            if not self.path.is_file():
                raise FileNotFoundError(f"no history archive at {self.path}")
            uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
            self._db = sqlite3.connect(
                uri, uri=True, timeout=busy_timeout_s, check_same_thread=False, isolation_level=None
            )
            self._require_archive()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, check_same_thread=False, isolation_level=None)
        # Both take effect only on a new file (before its first table): an existing archive keeps its own.
        self._db.execute("PRAGMA page_size=8192")
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        self._db.execute("PRAGMA journal_mode=WAL")
        # A record we acknowledge to the outbox must survive power loss, not only a crash.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(message)")}
        if "quality" not in columns:  # an archive from before readings had a quality
            self._db.execute("ALTER TABLE message ADD COLUMN quality TEXT")
        self._db.execute(_QUALITY_INDEX)

    def _require_archive(self) -> None:
        """Fail at open, in one line, on a file that is not an archive, not at the first query."""
        try:
            tables = {name for (name,) in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise NotAnArchiveError(f"{self.path} is not a hotlab history archive ({exc})") from None
        if "message" not in tables:
            self._db.close()
            raise NotAnArchiveError(f"{self.path} is not a hotlab history archive (it has no message table)")
        self._has_summaries = "reading_minute" in tables  # an archive from before retention has none

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> HistoryArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_many(self, messages: Iterable[Message]) -> int:
        """Archive messages in one transaction; return how many were new (replays are ignored).

        `archived_ns` is the time the transaction began, under the lock: retention
        (controller/archive_retention.py) leaves rows archived after the sink last caught up alone.
        """
        rows: list[tuple[Any, ...]] = []
        rejected: list[tuple[Any, ...]] = []
        for message in messages:
            payload_json = json.dumps(message.payload, separators=(",", ":"), allow_nan=False)
            try:
                msg_id, time_ns, site, station, device, test, verdict, quality = _index_columns(message)
            except ValueError as exc:
                rejected.append((message.kind, message.topic, payload_json, str(exc)))
                continue
            columns = (msg_id, message.kind, message.topic, time_ns, site, station, device, test, verdict)
            rows.append((*columns, payload_json, quality))

        def insert(db: sqlite3.Connection) -> int:
            now = time.time_ns()
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO message (msg_id, kind, topic, time_ns, site, station, device, test, "
                "verdict, payload, quality, archived_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(*row, now) for row in rows],
            )
            added = db.total_changes - before
            db.executemany(
                "INSERT INTO rejected (kind, topic, payload, reason, archived_ns) VALUES (?, ?, ?, ?, ?)",
                [(*row, now) for row in rejected],
            )
            return added

        added = self.write(insert)
        if rejected:
            log.warning("history: %d message(s) without msg_id/time_ns kept in the rejected table", len(rejected))
        return added

    def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` in one write transaction under the archive's lock: all of it is committed, or
        (when it raises) none of it. Other threads wait only while one `work` runs, so a long job such
        as retention (controller/archive_retention.py) calls this once per bounded chunk."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = work(self._db)
                self._db.execute("COMMIT")
            except BaseException:
                rollback_unless_done(self._db)
                raise
        return result

    def release_free_pages(self, max_pages: int) -> int:
        """Give up to `max_pages` free pages back to the file system; return how many went.

        Only an archive created with `auto_vacuum=INCREMENTAL` (every new one) can; an older one
        keeps its free pages and fills them with new rows first. One call holds the lock for
        `max_pages` page moves at most.
        """
        with self._lock:
            before = int(self._db.execute("PRAGMA freelist_count").fetchone()[0])
            if before == 0 or int(self._db.execute("PRAGMA auto_vacuum").fetchone()[0]) != 2:
                return 0
            # executescript steps the pragma to its end; a plain execute frees a single page.
            self._db.executescript(f"PRAGMA incremental_vacuum({int(max_pages)})")
            return before - int(self._db.execute("PRAGMA freelist_count").fetchone()[0])

    def size_bytes(self) -> int:
        """The pages the archive's data takes (page count × page size), whatever the WAL holds meanwhile."""
        with self._lock:
            pages = int(self._db.execute("PRAGMA page_count").fetchone()[0])
            return pages * int(self._db.execute("PRAGMA page_size").fetchone()[0])

    def summaries(
        self, device: str, period: TimeRange | None = None, *, site: str | None = None, chunk_size: int = 2000
    ) -> Iterator[ReadingSummary]:
        """The per-minute summaries of `device`'s readings past the raw window, oldest minute first.

        A minute belongs to `period` if it starts in it. Each series (site, station, setting) is read
        `chunk_size` rows at a time, with the lock held only per chunk, like `stream`, and the series
        are merged by minute. Raw readings not yet summarised are read with `query`/`stream("reading")`;
        a minute is in one or the other, never both (controller/archive_retention.py).
        """
        if chunk_size <= 0:
            raise HistoryQueryError(f"chunk size must be positive, got {chunk_size}")
        if not self._has_summaries:
            return
        span = period or TimeRange(0, OPEN_END_NS)
        first, end = -(-span.start_ns // _MINUTE_NS), -(-span.end_ns // _MINUTE_NS)
        clauses, params = ("device = ?", [device]) if site is None else ("device = ? AND site = ?", [device, site])
        with self._lock:
            series = self._db.execute(
                f"SELECT id, site, station, nuclide FROM reading_series WHERE {clauses} ORDER BY site, station, nuclide",
                params,
            ).fetchall()
        streams = [
            self._series_minutes(
                number,
                ReadingSummary(site_, station, device, nuclide or None, 0, 0, 0, None, None, None),
                first,
                end,
                chunk_size,
            )
            for number, site_, station, nuclide in series
        ]
        yield from heapq.merge(*streams, key=lambda summary: summary.minute_ns)

    def _series_minutes(
        self, series: int, named: ReadingSummary, first: int, end: int, chunk_size: int
    ) -> Iterator[ReadingSummary]:
        """One series' minutes in [first, end), in order, a chunk at a time (keyset on the primary key)."""
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT minute, n, suspect, min_bq, mean_bq, max_bq FROM reading_minute "
                    "WHERE series = ? AND minute >= ? AND minute < ? ORDER BY minute LIMIT ?",
                    (series, first, end, chunk_size),
                ).fetchall()
            for minute, n, suspect, low, mean, high in rows:
                yield replace(
                    named, minute_ns=minute * _MINUTE_NS, n=n, suspect=suspect, min_bq=low, mean_bq=mean, max_bq=high
                )
            if len(rows) < chunk_size:
                return
            first = rows[-1][0] + 1

    def query(
        self,
        kind: str,
        period: TimeRange | None = None,
        *,
        limit: int | None = None,
        **where: str | None,
    ) -> list[dict[str, Any]]:
        """Payloads of one kind, oldest first, filtered by time range and indexed columns
        (site, station, device, test, verdict, quality). For periods of unknown size use `stream`."""
        clauses, params = _where(kind, period, where)
        sql = f"SELECT payload FROM message WHERE {clauses} ORDER BY time_ns, msg_id"
        if limit is not None:
            if limit <= 0:
                raise HistoryQueryError(f"limit must be positive, got {limit}")
            sql += " LIMIT ?"
            params.append(limit)
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return [json.loads(payload) for (payload,) in rows]

    def stream(
        self, kind: str, period: TimeRange | None = None, *, chunk_size: int = 2000, **where: str | None
    ) -> Iterator[dict[str, Any]]:
        """Like `query`, oldest first, but read `chunk_size` rows at a time, so memory stays bounded
        whatever the period. Each chunk continues after the last (time_ns, msg_id) seen, and the lock
        is held only while a chunk is read, so a long report never stalls the history sink."""
        if chunk_size <= 0:
            raise HistoryQueryError(f"chunk size must be positive, got {chunk_size}")
        span = period or TimeRange(0, OPEN_END_NS)
        after: tuple[int, str] | None = None
        while True:
            # The range starts at the last time seen, so each chunk seeks in the index instead of
            # scanning from the period's start; the msg_id test drops what was read at that time.
            start_ns = span.start_ns if after is None else after[0]
            clauses, params = _where(kind, TimeRange(start_ns, span.end_ns), where)
            keyset = "" if after is None else " AND (time_ns > ? OR msg_id > ?)"
            more = [] if after is None else [after[0], after[1]]
            sql = (
                f"SELECT time_ns, msg_id, payload FROM message WHERE {clauses}{keyset} ORDER BY time_ns, msg_id LIMIT ?"
            )
            with self._lock:
                rows = self._db.execute(sql, [*params, *more, chunk_size]).fetchall()
            for _time_ns, _msg_id, payload in rows:
                yield json.loads(payload)
            if len(rows) < chunk_size:
                return
            after = (rows[-1][0], rows[-1][1])

    def select(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows of one read-only SELECT: for aggregates (counts, per-day groups) that SQLite
        answers in bounded memory and Python would have to load every payload for."""
        if not sql.lstrip().upper().startswith(("SELECT", "WITH")):
            raise HistoryQueryError("the archive answers only SELECT statements here")
        with self._lock:
            return [tuple(row) for row in self._db.execute(sql, params).fetchall()]

    def get(self, msg_id: str) -> dict[str, Any] | None:
        """The payload archived under `msg_id`, or None."""
        with self._lock:
            row = self._db.execute("SELECT payload FROM message WHERE msg_id = ?", (msg_id,)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def count(self, kind: str | None = None) -> int:
        with self._lock:
            if kind is None:
                return int(self._db.execute("SELECT COUNT(*) FROM message").fetchone()[0])
            return int(self._db.execute("SELECT COUNT(*) FROM message WHERE kind = ?", (kind,)).fetchone()[0])

    def rejected(self) -> list[tuple[str, str]]:
        """(payload JSON, reason) of every message that could not be indexed."""
        with self._lock:
            return [(p, r) for p, r in self._db.execute("SELECT payload, reason FROM rejected ORDER BY id")]

    def distinct(self, column: str, kind: str) -> list[str]:
        """Distinct non-null values of an indexed column for one kind, e.g. every calibrator with qc results."""
        if column not in FILTER_COLUMNS:
            raise HistoryQueryError(f"cannot list distinct {column!r}; use {', '.join(FILTER_COLUMNS)}")
        with self._lock:
            rows = self._db.execute(
                f"SELECT DISTINCT {column} FROM message WHERE kind = ? AND {column} IS NOT NULL ORDER BY {column}",
                (kind,),
            ).fetchall()
        return [value for (value,) in rows]
