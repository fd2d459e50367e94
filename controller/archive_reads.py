"""Reads of the history archive whose cost does not grow with the archive: aggregates, chunked streams, newest rows.

Why a module of its own: the report (controller/report.py), the web panel and the review list read
months or years of records, and loading every payload of a period into a list took 1 GB for one
busy day. Everything here either lets SQLite aggregate (counts, per-day or per-week groups,
least-squares sums) and returns one row per group, or reads rows `chunk_size` at a time in the
archive's order (time, msg_id), or reads a bounded number of the newest rows. Each function takes
an open `HistoryArchive` and uses only its public `select` (read-only SELECTs), so the archive's
own schema code stays in controller/archive.py.

A `Scope` is the period, the site and, for a report made in several reads, a cut on `archived_ns`
(the archive's own insertion time): records archived after the report began are left out of every
read alike, so the counts of its summary and the rows of its tables agree.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from hotlab.controller.archive import HistoryArchive, HistoryQueryError, TimeRange

DAY_NS = 86_400 * 1_000_000_000
WEEK_NS = 7 * DAY_NS
#: Weeks start on Monday 00:00 UTC (ISO 8601); the epoch, 1970-01-01, was a Thursday, so Monday 1970-01-05 is 4 days later.
WEEK_OFFSET_NS = 4 * DAY_NS

#: What a qc_result's limit was applied to, as SQL: `value_judged` when the engine wrote it, else the
#: deviation for a tolerance-style limit (or a result without limit_values) and the measured value otherwise.
JUDGED_VALUE_SQL = (
    "COALESCE(json_extract(payload, '$.value_judged'), "
    "CASE WHEN COALESCE(json_extract(payload, '$.limit_values.kind'), 'tolerance') = 'tolerance' "
    "THEN json_extract(payload, '$.deviation_pct') ELSE json_extract(payload, '$.measured') END)"
)
#: A qc_result whose time is the end of an elution it judged: that time was read from the station's own clock.
#: The elution's generator is `inputs.generator`, else the result's device (the archive's `device` of an elution).
STATION_TIMED_SQL = (
    "EXISTS (SELECT 1 FROM message AS e WHERE e.kind = 'elution' "
    "AND e.device = COALESCE(json_extract(message.payload, '$.inputs.generator'), message.device) "
    "AND e.time_ns = message.time_ns)"
)


_KIND = re.compile(r"^[a-z_]+$")


@dataclass(frozen=True, slots=True)
class Scope:
    """Which rows a read sees: a period, one site (None: every site), archived up to `archived_until_ns` (None: all)."""

    period: TimeRange
    site: str | None = None
    archived_until_ns: int | None = None

    def where(self, kind: str, extra: str = "", params: Sequence[Any] = ()) -> tuple[str, list[Any]]:
        """The WHERE clause (without the keyword) for `kind` in this scope, and `extra` (SQL with its params)."""
        if not _KIND.match(kind):
            raise HistoryQueryError(f"{kind!r} is not a message kind")
        # The kind as a literal: SQLite then uses the partial index of qc_results (test, verdict, time_ns).
        clauses = [f"kind = '{kind}'", "time_ns >= ?", "time_ns < ?"]
        values: list[Any] = [self.period.start_ns, self.period.end_ns]
        if self.site is not None:
            clauses.append("site = ?")
            values.append(self.site)
        if self.archived_until_ns is not None:
            clauses.append("archived_ns <= ?")
            values.append(self.archived_until_ns)
        if extra:
            clauses.append(f"({extra})")
            values += list(params)
        return " AND ".join(clauses), values


def bucket_sql(size_ns: int, offset_ns: int = 0) -> str:
    """SQL for the start of the `size_ns` bucket holding `time_ns` (UTC days: DAY_NS; Monday weeks: WEEK_NS, WEEK_OFFSET_NS)."""
    return f"(((time_ns - {int(offset_ns)}) / {int(size_ns)}) * {int(size_ns)} + {int(offset_ns)})"


def count(archive: HistoryArchive, kind: str, scope: Scope, extra: str = "", params: Sequence[Any] = ()) -> int:
    where, values = scope.where(kind, extra, params)
    return int(archive.select(f"SELECT COUNT(*) FROM message WHERE {where}", values)[0][0])


def grouped(
    archive: HistoryArchive,
    kind: str,
    scope: Scope,
    keys: Sequence[str],
    aggregates: Sequence[str] = ("COUNT(*)",),
    extra: str = "",
    params: Sequence[Any] = (),
) -> list[tuple[Any, ...]]:
    """One row per distinct value of the SQL expressions `keys` (ordered by them): the keys, then the `aggregates`.

    As many rows as groups, whatever the number of records: e.g. keys (day bucket, device, test, verdict).
    """
    where, values = scope.where(kind, extra, params)
    positions = ", ".join(str(i + 1) for i in range(len(keys)))
    sql = (
        f"SELECT {', '.join([*keys, *aggregates])} FROM message WHERE {where} GROUP BY {positions} ORDER BY {positions}"
    )
    return archive.select(sql, values)


def stream(
    archive: HistoryArchive,
    kind: str,
    scope: Scope,
    extra: str = "",
    params: Sequence[Any] = (),
    *,
    columns: Sequence[str] = (),
    chunk_size: int = 500,
) -> Iterator[tuple[Any, ...]]:
    """(payload, *columns) of every row in scope matching `extra`, oldest first, `chunk_size` rows per read.

    Like `HistoryArchive.stream` (each chunk continues after the last (time_ns, msg_id) seen), with
    any SQL condition and computed columns (e.g. STATION_TIMED_SQL) besides the payload.
    """
    selected = ", ".join(["time_ns", "msg_id", "payload", *columns])
    after: tuple[int, str] | None = None
    while True:
        # Each chunk's range starts at the last time seen: with a second lower bound on time_ns beside the
        # period's, SQLite would start the index scan at the period's start for every chunk.
        start = scope if after is None else replace(scope, period=TimeRange(after[0], scope.period.end_ns))
        where, values = start.where(kind, extra, params)
        keyset = "" if after is None else " AND (time_ns > ? OR msg_id > ?)"
        more = [] if after is None else [after[0], after[1]]
        rows = archive.select(
            f"SELECT {selected} FROM message WHERE {where}{keyset} ORDER BY time_ns, msg_id LIMIT ?",
            [*values, *more, chunk_size],
        )
        for row in rows:
            yield (json.loads(row[2]), *row[3:])
        if len(rows) < chunk_size:
            return
        after = (int(rows[-1][0]), str(rows[-1][1]))


def newest_payload(
    archive: HistoryArchive, kind: str, scope: Scope, extra: str = "", params: Sequence[Any] = ()
) -> dict[str, Any] | None:
    """The newest payload in scope matching `extra`, or None."""
    where, values = scope.where(kind, extra, params)
    rows = archive.select(
        f"SELECT payload FROM message WHERE {where} ORDER BY time_ns DESC, msg_id DESC LIMIT 1", values
    )
    return None if not rows else dict(json.loads(rows[0][0]))


def by_id(archive: HistoryArchive, msg_ids: Iterable[str], columns: Sequence[str] = ()) -> dict[str, tuple[Any, ...]]:
    """(payload JSON text as archived, *columns) of each msg_id that is archived, in one query (a bounded batch of ids)."""
    ids = json.dumps(list(msg_ids))
    selected = ", ".join(["msg_id", "payload", *columns])
    rows = archive.select(f"SELECT {selected} FROM message WHERE msg_id IN (SELECT value FROM json_each(?))", [ids])
    return {str(row[0]): tuple(row[1:]) for row in rows}


def station_timed(archive: HistoryArchive, payload: dict[str, Any]) -> bool:
    """Whether a qc_result's time is the end of an elution it judged (so the station's clock), by one indexed lookup."""
    generator = (payload.get("inputs") or {}).get("generator") or payload.get("device")
    rows = archive.select(
        "SELECT 1 FROM message WHERE kind = 'elution' AND device = ? AND time_ns = ? LIMIT 1",
        [generator, payload.get("time_ns")],
    )
    return bool(rows)


def newest(archive: HistoryArchive, kind: str, since_ns: int, limit: int, **where: str | None) -> list[dict[str, Any]]:
    """The `limit` newest payloads of `kind` since `since_ns` (equality filters on the indexed columns), oldest first.

    What a page that shows the latest records needs: the read costs the same however long the archive's history.
    """
    clauses = ["kind = ?", "time_ns >= ?"]
    values: list[Any] = [kind, since_ns]
    for column in ("site", "station", "device", "test", "verdict"):
        value = where.pop(column, None)
        if value is not None:
            clauses.append(f"{column} = ?")
            values.append(value)
    if where:
        raise HistoryQueryError(f"cannot filter on {', '.join(sorted(where))}")
    rows = archive.select(
        f"SELECT payload FROM message WHERE {' AND '.join(clauses)} ORDER BY time_ns DESC, msg_id DESC LIMIT ?",
        [*values, int(limit)],
    )
    return [dict(json.loads(payload)) for (payload,) in reversed(rows)]
