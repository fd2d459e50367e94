"""The QC officer's periodic report: every failure, procedure, sign-off and trend of a period, in one file.

Why one self-contained HTML file: it is what gets attached to a QC record, mailed to an
inspector or archived with the batch documentation, and it must open the same way in ten
years without a network. So the CSS is inline, plots are base64 PNG `data:` URIs, and there
is no script and no external reference of any kind. The PDF variant holds the same figures
and tables (matplotlib's PdfPages). matplotlib is the optional extra `hotlab[report]`: only
this module and controller/report_plots.py import it, and `hotlab report` says which extra to
install when it is missing (controller/cli/report.py).

Input is the local history archive (controller/archive.py) for QC results, procedures and
elutions and the audit trail (controller/audit.py), whose chain is verified as part of the
report so a reader sees at once whether the list of control actions can be trusted. The report
prints the audit head hash: a signed paper copy then anchors the chain against later rewriting.
The QC procedures of the period are listed with their electronic signatures (who, printed name,
meaning, when, comment; 21 CFR 11.50 asks that a signed record show them), each re-hashed
against the archive, and the records with no decision yet as awaiting review or approval. Only
signatures the verified trail vouches for count (controller/signatures.py `counted_signatures`);
those it does not are listed as such.

Memory does not grow with the period (a month or three years): counts, limits and trends are
aggregated by SQLite (controller/archive_reads.py), rows are read in chunks and written straight
to the output, and the sign-offs of the period's records are kept in a temporary SQLite file, not
in memory. What every report lists one by one: every result that did not pass, every procedure
with its sign-off, every signature, everything awaiting review, every limit applied. A report of
at most LIST_ALL_DAYS also lists every passing result, every elution and every audited action; a
longer one counts them per week instead and says where the full list is. Every time says which
clock it was read from (`CLOCKS`): elution times come from the station's own clock.
"""

from __future__ import annotations

import html
import io
import itertools
import json
import math
import sqlite3
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import matplotlib
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from hotlab.controller import archive_reads as reads
from hotlab.controller.archive import HistoryArchive, TimeRange
from hotlab.controller.archive_reads import DAY_NS, JUDGED_VALUE_SQL, STATION_TIMED_SQL, WEEK_NS, WEEK_OFFSET_NS, Scope
from hotlab.controller.audit import AuditRecord, VerifyResult, iter_records, verify_chain
from hotlab.controller.messages import iso_utc
from hotlab.controller.report_plots import (
    TEXT_PAGE_COLUMNS,
    Fit,
    TrendPoint,
    linearity_figure,
    png_base64,
    text_pages,
    trend_figure,
)
from hotlab.controller.signatures import (
    DECISIONS,
    InvalidSignature,
    SignatureProblem,
    counted_signatures,
    payload_sha256,
    record_kind,
    still_to_do,
    unverified_signatures,
)
from hotlab.physics.units import format_activity

#: Periods of at most this many days list every result, elution and audited action (a monthly report).
LIST_ALL_DAYS = 31
#: Periods of at most this many days count verdicts per day; longer ones per week (Monday, UTC).
DAILY_COUNTS_DAYS = 92
#: A trend plots one marker per result up to this many results; beyond, one per-day (or per-N-day) mean
#: with the bucket's range, every result that did not pass marked on top (at most this many of them).
MAX_POINTS = 600
#: A trend draws at most this many series (markers and legend entries); more are drawn as one.
MAX_SERIES = 8
#: A trend has at most this many buckets: per day up to that many days, else per N days.
MAX_BUCKETS = 1100
#: Decay-method linearity figures drawn one per result up to this many; beyond, a trend per calibrator and
#: the figures of the newest result of each calibrator and of the results that did not pass (this many in all).
LINEARITY_FIGURES = 12
#: Sign-off rows written to the temporary index per transaction, and signed records looked up per query.
_BATCH = 500
#: Tests with a dedicated figure; every other test gets the generic trend of its judged value.
DEDICATED_TESTS = ("constancy", "accuracy", "linearity", "elution_yield", "ge68_breakthrough", "mo99_breakthrough")
VERDICTS = ("pass", "warn", "fail")
BREAKTHROUGH_TITLES = {"ge68_breakthrough": "Ge-68 breakthrough", "mo99_breakthrough": "Mo-99 breakthrough"}
CONTROLLER_CLOCK = "controller clock"
STATION_CLOCK = "station clock"
#: The legend of the clocks every time of the report comes from.
CLOCKS = (
    (
        CONTROLLER_CLOCK,
        "the clock of the host that runs hotlab (the controller, its web panel, the hotlab command): it stamps "
        "calibrator readings and measurements and the QC results judged from them, procedures, audited actions "
        "and signatures, the report's own generation time",
    ),
    (
        STATION_CLOCK,
        "an elution station's own clock, read from its registers: the start and end of each elution, and the "
        "time of each QC result judged at the end of an elution (yield, the station's breakthrough figures). "
        "It is shown as the station gave it, not corrected for any offset from the controller clock",
    ),
)
#: Every time is UTC; a record belongs to the period by its own time, whichever clock gave it.
CLOCK_NOTE = "All times are UTC. A record belongs to the period by its own time, whichever clock gave it."


# --------------------------------------------------------------------------- sign-offs


@dataclass(frozen=True, slots=True)
class SignOff:
    """One counted signature of one reviewed record: who, as whom, when, what it means."""

    seq: int
    meaning: str
    signer: str
    printed_name: str
    role: str
    #: When it was signed (controller clock, RFC 3339).
    time: str
    comment: str | None
    #: The archived record still hashes as signed.
    intact: bool


@dataclass(frozen=True, slots=True)
class SignedRow:
    """One signature of one reviewed record (a procedure, or a result outside any procedure)."""

    record: dict[str, Any]
    signature: SignOff
    #: The record's time is the end of an elution it judged: the station's clock.
    station_timed: bool


def _sign_off(row: Sequence[Any]) -> SignOff:
    """A SignOff from (seq, meaning, signer, printed name, role, time, comment, intact) as the index stores them."""
    seq, meaning, signer, printed_name, role, signed, comment, intact = row
    return SignOff(int(seq), meaning, signer, printed_name, role, signed, comment, bool(intact))


class SignOffIndex:
    """The sign-offs of the report's reviewed records, in a temporary SQLite file (removed on close).

    Why on disk: a report over years covers thousands of signed records, and the procedure list,
    the signature list and what awaits review each need them; memory holds one batch at a time.
    """

    def __init__(self) -> None:
        self._db = sqlite3.connect("", check_same_thread=False)  # "": a private temporary file
        self._db.execute(
            "CREATE TABLE sign_off (seq INTEGER, pos INTEGER, msg_id TEXT, payload TEXT, meaning TEXT, signer TEXT, "
            "printed_name TEXT, role TEXT, time TEXT, comment TEXT, intact INTEGER, station_timed INTEGER, "
            "PRIMARY KEY (seq, pos))"
        )
        self._db.execute("CREATE INDEX sign_off_record ON sign_off (msg_id, seq)")
        self._db.execute(
            "CREATE TABLE awaiting (kind TEXT, time_ns INTEGER, msg_id TEXT, payload TEXT, station_timed INTEGER, "
            "PRIMARY KEY (kind, time_ns, msg_id))"
        )

    def add(self, rows: Iterable[tuple[Any, ...]]) -> None:
        with self._db:
            self._db.executemany("INSERT OR IGNORE INTO sign_off VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def add_awaiting(self, rows: Iterable[tuple[str, int, str, str, bool]]) -> None:
        """(kind, time_ns, msg_id, payload JSON, station-timed) of records awaiting review."""
        with self._db:
            self._db.executemany("INSERT OR IGNORE INTO awaiting VALUES (?, ?, ?, ?, ?)", rows)

    def awaiting(self, kind: str) -> Iterator[tuple[dict[str, Any], bool]]:
        """(payload, station-timed) of the records of `kind` awaiting review, oldest first, a chunk at a time."""
        after = (-1, "")
        while True:
            chunk = self._db.execute(
                "SELECT time_ns, msg_id, payload, station_timed FROM awaiting WHERE kind = ? AND (time_ns, msg_id) > (?, ?) "
                "ORDER BY time_ns, msg_id LIMIT ?",
                (kind, *after, _BATCH),
            ).fetchall()
            for _time, _msg_id, payload, station_timed in chunk:
                yield json.loads(payload), bool(station_timed)
            if len(chunk) < _BATCH:
                return
            after = (chunk[-1][0], chunk[-1][1])

    def awaiting_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM awaiting").fetchone()[0])

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM sign_off").fetchone()[0])

    def of(self, msg_id: str) -> list[SignOff]:
        rows = self._db.execute(
            "SELECT seq, meaning, signer, printed_name, role, time, comment, intact FROM sign_off WHERE msg_id = ? "
            "ORDER BY seq, pos",
            (msg_id,),
        )
        return [_sign_off(row) for row in rows]

    def decided(self, msg_ids: Iterable[str]) -> set[str]:
        """Those of `msg_ids` with a decision (approved, rejected) signed of them as they are now."""
        rows = self._db.execute(
            f"SELECT DISTINCT msg_id FROM sign_off WHERE intact AND meaning IN ({', '.join('?' * len(DECISIONS))}) "
            "AND msg_id IN (SELECT value FROM json_each(?))",
            (*DECISIONS, json.dumps(list(msg_ids))),
        )
        return {msg_id for (msg_id,) in rows}

    def rows(self) -> Iterator[SignedRow]:
        """Every sign-off, in the order of the trail, a chunk at a time."""
        after = (-1, -1)
        while True:
            chunk = self._db.execute(
                "SELECT seq, pos, payload, meaning, signer, printed_name, role, time, comment, intact, station_timed "
                "FROM sign_off WHERE (seq, pos) > (?, ?) ORDER BY seq, pos LIMIT ?",
                (*after, _BATCH),
            ).fetchall()
            for seq, _pos, payload, *rest in chunk:
                yield SignedRow(json.loads(payload), _sign_off((seq, *rest[:7])), bool(rest[7]))
            if len(chunk) < _BATCH:
                return
            after = (chunk[-1][0], chunk[-1][1])

    def signatures(self) -> Iterator[tuple[SignOff, int, int, int]]:
        """Each signature once, in the order of the trail: its sign-off (intact: every record it signs of the
        period is unchanged), and how many of the period's procedures and loose results it signs, how many changed."""
        after = -1
        while True:
            chunk = self._db.execute(
                "SELECT seq, meaning, signer, printed_name, role, time, comment, MIN(intact), "
                "SUM(json_extract(payload, '$.schema') LIKE 'hotlab.qc_procedure/%'), COUNT(*), SUM(NOT intact) "
                "FROM sign_off WHERE seq > ? GROUP BY seq ORDER BY seq LIMIT ?",
                (after, _BATCH),
            ).fetchall()
            for seq, *rest, procedures, records, changed in chunk:
                yield _sign_off((seq, *rest)), int(procedures), int(records - procedures), int(changed)
            if len(chunk) < _BATCH:
                return
            after = chunk[-1][0]

    def close(self) -> None:
        self._db.close()


@dataclass(slots=True)
class AuditSection:
    path: Path
    verification: VerifyResult | None  # None: no audit trail exists at `path`
    #: The trail's last record when the report was collected: records appended later are not listed.
    last_seq: int
    #: Audited actions in the period.
    in_period: int

    def records(self, period: TimeRange) -> Iterator[AuditRecord]:
        if self.verification is None:
            return
        for record in iter_records(self.path):
            if record.seq > self.last_seq:
                return
            if period.start_ns <= record.time_ns < period.end_ns:
                yield record


@dataclass(slots=True)
class ReviewSection:
    index: SignOffIndex
    #: QC procedures of the period (one each, whatever its records).
    procedures: int
    #: Records of the period with no decision signed as they are now (controller/signatures.py).
    awaiting: int
    #: Signed records anywhere in the trail that changed or went missing from the archive.
    problems: list[SignatureProblem]
    #: Signature entries of the trail that do not count (after the chain's break, or by someone who could not sign).
    uncounted: list[str]

    @property
    def signed(self) -> int:
        return self.index.count()

    def signatures_of(self, msg_id: str) -> list[SignOff]:
        return self.index.of(msg_id)


@dataclass(slots=True)
class ReportData:
    """What the report states, gathered once; the rows themselves are read again, in chunks, as they are written."""

    period: TimeRange
    generated_ns: int
    archive_path: Path
    site: str | None
    #: The reads of this report: its period and site, and the records archived before it began.
    scope: Scope
    #: (test, verdict, results) of the period.
    totals: list[tuple[str, str, int]]
    results: int
    elutions: int
    audit: AuditSection
    review: ReviewSection
    _closed: bool = field(default=False, repr=False)

    @property
    def days(self) -> float:
        return (self.period.end_ns - self.period.start_ns) / DAY_NS

    @property
    def lists_all(self) -> bool:
        """Every result, elution and audited action is listed (a period of at most LIST_ALL_DAYS)."""
        return self.days <= LIST_ALL_DAYS

    @contextmanager
    def archive(self) -> Iterator[HistoryArchive]:
        """The archive, opened read only for one pass of reads."""
        with HistoryArchive(self.archive_path, read_only=True) as archive:
            yield archive

    def close(self) -> None:
        """Remove the temporary sign-off index."""
        if not self._closed:
            self.review.index.close()
            self._closed = True

    def __enter__(self) -> ReportData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class ReportFigure:
    section: str
    caption: str
    figure: Figure


def collect(
    archive: HistoryArchive,
    period: TimeRange,
    audit_path: Path,
    *,
    audit_key: bytes | None = None,
    site: str | None = None,
) -> ReportData:
    """What the report states: counts and totals of the period, the audit chain's verdict, the sign-offs.

    The whole audit chain is verified (a break before the period also makes the period's
    records untrustworthy); only the period's records are listed. Rows are read later, as they are
    written, from the records archived before this call (the scope's `archived_until_ns`), so
    what arrives meanwhile is neither counted nor listed. Close the result (a context manager).
    """
    generated_ns = time.time_ns()
    scope = Scope(period, site, generated_ns)
    chain = verify_chain(audit_path, audit_key) if audit_path.exists() else None
    totals = [(str(t), str(v), int(n)) for t, v, n in reads.grouped(archive, "qc_result", scope, ("test", "verdict"))]
    return ReportData(
        period=period,
        generated_ns=generated_ns,
        archive_path=archive.path,
        site=site,
        scope=scope,
        totals=totals,
        results=sum(n for *_, n in totals),
        elutions=reads.count(archive, "elution", scope),
        audit=_audit_section(audit_path, chain, period),
        review=collect_review(archive, scope, audit_path, chain),
    )


def _audit_section(path: Path, verification: VerifyResult | None, period: TimeRange) -> AuditSection:
    if verification is None:
        return AuditSection(path, None, 0, 0)
    last_seq = in_period = 0
    for record in iter_records(path):
        last_seq = record.seq
        in_period += period.start_ns <= record.time_ns < period.end_ns
    return AuditSection(path, verification, last_seq, in_period)


_ENDED_PROCEDURE = "COALESCE(json_extract(payload, '$.status'), '') != 'started'"
_LOOSE_RESULT = "COALESCE(json_extract(payload, '$.procedure_id'), '') = ''"


def collect_review(
    archive: HistoryArchive, scope: Scope, audit_path: Path, chain: VerifyResult | None
) -> ReviewSection:
    """The sign-offs of the period's reviewed records (made whenever), the signature problems, what awaits review;
    `chain` is the trail's verification (None: there is no trail)."""
    index = SignOffIndex()
    problems: list[SignatureProblem] = []
    invalid: list[InvalidSignature] = []
    pending: list[tuple[Any, ...]] = []  # (signature, position, record) not yet looked up

    def look_up() -> None:
        archived = reads.by_id(archive, (entry.msg_id for _, _, entry in pending), (STATION_TIMED_SQL,))
        rows = []
        for signature, position, entry in pending:
            found = archived.get(entry.msg_id)
            if found is None:
                problems.append(SignatureProblem(signature, entry, "is no longer in the archive"))
                continue
            text, station_timed = found
            payload = json.loads(text)
            now = payload_sha256(payload)
            if now != entry.sha256:
                problem = f"changed since it was signed: SHA-256 now {now}, signed {entry.sha256}"
                problems.append(SignatureProblem(signature, entry, problem))
            if _in_scope(payload, scope) and _reviewed_on_its_own(payload):
                s = signature
                rows.append(
                    (s.seq, position, entry.msg_id, text, s.meaning, s.signer, s.printed_name, s.role)
                    + (s.time, s.comment, now == entry.sha256, bool(station_timed))
                )
        index.add(rows)
        pending.clear()

    for found in counted_signatures(audit_path, chain) if chain is not None else ():
        if isinstance(found, InvalidSignature):
            invalid.append(found)
            continue
        for position, entry in enumerate(found.records):
            pending.append((found, position, entry))
            if len(pending) >= _BATCH:
                look_up()
    look_up()
    unverified = unverified_signatures(audit_path, chain) if chain is not None else []
    uncounted = [
        f"audit record #{r.seq} ({r.actor}, {r.time}) is a signature after the chain's break: ignored"
        for r in unverified
    ] + [entry.describe() for entry in invalid]
    procedures = int(
        archive.select(
            f"SELECT COUNT(DISTINCT json_extract(payload, '$.procedure_id')) FROM message WHERE "
            f"{scope.where('qc_procedure')[0]}",
            scope.where("qc_procedure")[1],
        )[0][0]
    )
    _find_awaiting(archive, scope, index)
    return ReviewSection(index, procedures, index.awaiting_count(), problems, uncounted)


def _find_awaiting(archive: HistoryArchive, scope: Scope, index: SignOffIndex) -> None:
    """Note in `index` the ended procedures and results outside any procedure of the period with no decision
    signed as they are now, checked a batch at a time."""
    for kind, condition in (("qc_procedure", _ENDED_PROCEDURE), ("qc_result", _LOOSE_RESULT)):
        rows = reads.stream(archive, kind, scope, condition, columns=(STATION_TIMED_SQL,))
        while batch := list(itertools.islice(rows, _BATCH)):
            decided = index.decided(str(p["msg_id"]) for p, _ in batch)
            index.add_awaiting(
                (kind, int(p["time_ns"]), str(p["msg_id"]), json.dumps(p), bool(timed))
                for p, timed in batch
                if str(p["msg_id"]) not in decided
            )


def _in_scope(payload: Mapping[str, Any], scope: Scope) -> bool:
    period = scope.period
    return period.start_ns <= int(payload["time_ns"]) < period.end_ns and scope.site in (None, payload.get("site"))


def _reviewed_on_its_own(payload: Mapping[str, Any]) -> bool:
    """A procedure, or a result outside any: a procedure's results are signed with it and shown with it."""
    return record_kind(payload) == "qc_procedure" or not payload.get("procedure_id")


def procedures(archive: HistoryArchive, scope: Scope) -> Iterator[dict[str, Any]]:
    """One record per procedure of the period, in the order they ended, those still running (or ending after
    the period) last: its end record, else its start. Memory holds only the procedures open at a time."""
    running: dict[str, dict[str, Any]] = {}
    for (record,) in reads.stream(archive, "qc_procedure", scope):
        key = str(record.get("procedure_id"))
        if record.get("status") == "started":
            running[key] = record
        else:
            running.pop(key, None)
            yield record
    yield from sorted(running.values(), key=lambda p: (int(p.get("started_ns") or p["time_ns"]), str(p["msg_id"])))


# --------------------------------------------------------------------------- values


def signed_pct(value: Any) -> str:
    number = _number(value)
    return "–" if number is None else f"{number:+.2f} %"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def quantity(value: Any, unit: str | None) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    if unit == "Bq":
        return format_activity(float(value))
    return f"{value:.4g} {unit}" if unit else f"{value:.4g}"


def _judged_label(result: Mapping[str, Any]) -> str:
    limit = result.get("limit_values") or {}
    unit = limit.get("unit") or result.get("unit") or ""
    if limit.get("kind", "tolerance") == "tolerance":
        return f"deviation ({unit or '%'})"
    return f"{result.get('test', 'value')} ({unit})" if unit else str(result.get("test", "value"))


def _clock_of(station_timed: Any) -> str:
    return STATION_CLOCK if station_timed else CONTROLLER_CLOCK


# --------------------------------------------------------------------------- figures

_GENERATOR_SQL = "COALESCE(json_extract(payload, '$.inputs.generator'), device)"
_SOURCE_SQL = "COALESCE(json_extract(payload, '$.inputs.source_id'), 'check source')"


@dataclass(frozen=True, slots=True)
class TrendQuery:
    """Which values one figure plots: a kind, a condition, the value and the series of each row, as SQL."""

    kind: str
    condition: str
    params: tuple[Any, ...]
    value_sql: str = JUDGED_VALUE_SQL
    series_sql: str = "device"


@dataclass(frozen=True, slots=True)
class Trend:
    series: dict[str, list[TrendPoint]]
    #: Per series, (bucket middle, lowest, highest) when the values were aggregated; empty otherwise.
    ranges: dict[str, list[tuple[int, float, float]]]
    #: Results that did not pass, drawn over aggregated series (empty when every result is a marker).
    marked: list[TrendPoint]
    #: Days per aggregated bucket; None when every result is a marker.
    bucket_days: int | None
    total: int
    #: The series the values belong to before more than MAX_SERIES were drawn as one (e.g. every generator).
    names: list[str]

    def describe(self) -> str:
        """How the figure shows the values, for its caption."""
        if self.bucket_days is None:
            return f"{self.total} value(s), one marker each"
        per = "day" if self.bucket_days == 1 else f"{self.bucket_days} days"
        return (
            f"{self.total} values: the mean per {per} (the bar spans its lowest to highest), "
            f"every value that did not pass marked ({len(self.marked)} drawn)"
        )


def read_trend(archive: HistoryArchive, scope: Scope, query: TrendQuery) -> Trend:
    """The values of `query` in scope: each one when at most MAX_POINTS, else aggregated per bucket in SQL.

    The points are read first, MAX_POINTS and one at most; only when there are more does one grouped scan
    give the buckets, and a second the values that did not pass. More than MAX_SERIES series are drawn as one."""
    where, params = scope.where(query.kind, query.condition, query.params)
    value, series_of = query.value_sql, query.series_sql
    point_sql = f"SELECT time_ns, {series_of}, {value}, verdict FROM message WHERE {where} AND ({value}) IS NOT NULL"
    points = archive.select(f"{point_sql} ORDER BY time_ns, msg_id LIMIT {MAX_POINTS + 1}", params)
    if len(points) <= MAX_POINTS:
        names = sorted({str(name) for _, name, _, _ in points})
        merged = len(names) > MAX_SERIES  # e.g. a Mo-99 generator a week: one series of them all
        series: dict[str, list[TrendPoint]] = {}
        for t, name, v, verdict in points:
            series.setdefault("all" if merged else str(name), []).append(TrendPoint(int(t), float(v), verdict))
        return Trend(series, {}, [], None, len(points), names)
    span_ns = min(scope.period.end_ns, scope.archived_until_ns or scope.period.end_ns) - scope.period.start_ns
    bucket_days = max(1, math.ceil(span_ns / DAY_NS / MAX_BUCKETS))
    size = bucket_days * DAY_NS
    # Each value is extracted from its payload once (MATERIALIZED), not once per aggregate.
    rows = archive.select(
        f"WITH v AS MATERIALIZED (SELECT time_ns, {series_of} AS series, {value} AS value FROM message WHERE {where}) "
        f"SELECT {reads.bucket_sql(size)}, series, COUNT(*), MIN(value), SUM(value), MAX(value) FROM v "
        "WHERE value IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2",
        params,
    )
    names = sorted({str(name) for _, name, *_ in rows})
    merged = len(names) > MAX_SERIES
    buckets: dict[tuple[str, int], list[float]] = {}  # (series, bucket) -> [count, lowest, sum, highest]
    for bucket, name, n, low, added, high in rows:
        key = ("all" if merged else str(name), int(bucket))
        known = buckets.setdefault(key, [0.0, math.inf, 0.0, -math.inf])
        known[:] = [known[0] + n, min(known[1], low), known[2] + added, max(known[3], high)]
    means: dict[str, list[TrendPoint]] = {}
    ranges: dict[str, list[tuple[int, float, float]]] = {}
    for (name, bucket), (n, low, added, high) in sorted(buckets.items()):
        middle = bucket + size // 2
        means.setdefault(name, []).append(TrendPoint(middle, added / n))
        ranges.setdefault(name, []).append((middle, low, high))
    marked = [
        TrendPoint(int(t), float(v), verdict)
        for t, _name, v, verdict in archive.select(
            f"{point_sql} AND COALESCE(verdict, '') != 'pass' ORDER BY time_ns, msg_id LIMIT {MAX_POINTS}", params
        )
    ]
    total = sum(int(n) for _, _, n, *_ in rows)
    return Trend(means, ranges, marked, bucket_days, total, names)


def read_fit(archive: HistoryArchive, scope: Scope, query: TrendQuery) -> Fit | None:
    """The least-squares line of the values over time in days, from sums SQLite adds up; None under 3 values
    or when they all share one time."""
    where, params = scope.where(query.kind, query.condition, query.params)
    x = f"((time_ns - {scope.period.start_ns}) / {float(DAY_NS)})"
    (n, sx, sy, sxx, sxy, first, last), *_ = archive.select(
        f"WITH v AS MATERIALIZED (SELECT time_ns, {x} AS x, {query.value_sql} AS y FROM message WHERE {where}) "
        "SELECT COUNT(*), SUM(x), SUM(y), SUM(x * x), SUM(x * y), MIN(time_ns), MAX(time_ns) FROM v WHERE y IS NOT NULL",
        params,
    )
    if n < 3 or first == last:
        return None
    denominator = n * sxx - sx * sx
    if denominator <= 0:
        return None
    slope = (n * sxy - sx * sy) / denominator
    intercept = (sy - slope * sx) / n

    def at(time_ns: int) -> float:
        return float(intercept + slope * (time_ns - scope.period.start_ns) / DAY_NS)

    return Fit(float(slope), int(first), at(int(first)), int(last), at(int(last)))


def _newest_with_limit(archive: HistoryArchive, scope: Scope, query: TrendQuery) -> tuple[dict[str, Any] | None, Any]:
    newest = reads.newest_payload(archive, query.kind, scope, query.condition, query.params)
    limited = reads.newest_payload(
        archive,
        query.kind,
        scope,
        f"({query.condition}) AND json_type(payload, '$.limit_values') = 'object'",
        query.params,
    )
    return newest, None if limited is None else limited["limit_values"]


def _trend_figure(
    archive: HistoryArchive,
    data: ReportData,
    query: TrendQuery,
    *,
    section: str,
    caption: str | Callable[[Trend], str],
    title: str | Callable[[Trend], str],
    xlabel: str,
    ylabel: str | None = None,
    fit: bool = False,
) -> ReportFigure | None:
    """The trend of `query`, or None when it has no value; `fit` draws the least-squares line of a single series."""
    trend = read_trend(archive, data.scope, query)
    if not trend.total:
        return None
    caption = caption(trend) if callable(caption) else caption
    title = title(trend) if callable(title) else title
    newest, limit = _newest_with_limit(archive, data.scope, query)
    figure = trend_figure(
        title,
        ylabel or _judged_label(newest or {}),
        trend.series,
        limit,
        (data.period.start_ns, data.period.end_ns),
        xlabel=xlabel,
        ranges=trend.ranges,
        marked=trend.marked,
        fit=read_fit(archive, data.scope, query) if fit and len(trend.names) == 1 else None,
    )
    return ReportFigure(section, f"{caption}; {trend.describe()}", figure)


#: What a calibrator test's deviation is from: constancy against the chamber's own baseline, accuracy
#: against the certificate (docs/qc.md).
_REFERENCE_OF_TEST = {
    "constancy": "this chamber's decay-corrected baseline",
    "accuracy": "the decay-corrected certificate value",
}
_AXIS = {
    CONTROLLER_CLOCK: "measurement time (UTC, controller clock)",
    STATION_CLOCK: "end of elution (UTC, station clock)",
    "mixed": "time judged (UTC; station clock at an elution's end, else controller clock)",
}


def build_figures(data: ReportData) -> list[ReportFigure]:
    """Every figure of the report, in reading order, each tagged with its section; a bounded number whatever the period."""
    with data.archive() as archive:
        return _figures(archive, data)


def _figures(archive: HistoryArchive, data: ReportData) -> list[ReportFigure]:
    scope = data.scope
    figures: list[ReportFigure | None] = []
    tests = [str(t) for (t, _n) in reads.grouped(archive, "qc_result", scope, ("test",))]
    for test, reference in _REFERENCE_OF_TEST.items():
        devices = reads.grouped(archive, "qc_result", scope, ("device",), extra="test = ?", params=[test])
        for device, _n in devices:
            query = TrendQuery("qc_result", "test = ? AND device IS ?", (test, device), series_sql=_SOURCE_SQL)
            caption = (
                f"{test.capitalize()} of calibrator {device}: deviation from {reference}, one marker per source, "
                "on the warn/fail bands"
            )
            figures.append(
                _trend_figure(
                    archive,
                    data,
                    query,
                    section=test,
                    caption=caption,
                    title=f"{test} — {device}",
                    xlabel=_AXIS[CONTROLLER_CLOCK],
                )
            )
    if "linearity" in tests:
        figures += _linearity_figures(archive, data)
    figures += _yield_figures(archive, data)
    for test, name in BREAKTHROUGH_TITLES.items():
        if test in tests:
            query = TrendQuery("qc_result", "test = ?", (test,), series_sql=_GENERATOR_SQL)
            newest = reads.newest_payload(archive, "qc_result", scope, "test = ?", [test]) or {}
            figures.append(
                _trend_figure(
                    archive,
                    data,
                    query,
                    section="breakthrough",
                    caption=f"{name}: every result against its limit",
                    title=name,
                    xlabel=_AXIS["mixed"],
                    ylabel=f"{name} ({newest.get('unit', '')})",
                )
            )
    for test in tests:
        if test not in DEDICATED_TESTS:
            figures.append(
                _trend_figure(
                    archive,
                    data,
                    TrendQuery("qc_result", "test = ?", (test,)),
                    section="other",
                    caption=f"{test}: judged value of every result against its limit",
                    title=test,
                    xlabel=_AXIS["mixed"],
                )
            )
    return [f for f in figures if f is not None]


def _linearity_figures(archive: HistoryArchive, data: ReportData) -> list[ReportFigure | None]:
    """Each decay-method series as its own figure; over a long period the trend of each calibrator's worst
    deviation instead, with the figures of its newest series and of those that did not pass."""
    scope = data.scope
    total = reads.count(archive, "qc_result", scope, "test = 'linearity'")
    figures: list[ReportFigure | None] = []
    if total <= LINEARITY_FIGURES:
        chosen = [row[0] for row in reads.stream(archive, "qc_result", scope, "test = 'linearity'")]
    else:
        devices = [d for d, _n in reads.grouped(archive, "qc_result", scope, ("device",), extra="test = 'linearity'")]
        for device in devices:
            figures.append(
                _trend_figure(
                    archive,
                    data,
                    TrendQuery("qc_result", "test = 'linearity' AND device IS ?", (device,)),
                    section="linearity",
                    caption=f"Decay-method linearity of {device}: the judged (largest) deviation of each series",
                    title=f"linearity — {device}",
                    xlabel=_AXIS[CONTROLLER_CLOCK],
                )
            )
        newest = (
            reads.newest_payload(archive, "qc_result", scope, "test = 'linearity' AND device IS ?", [d])
            for d in devices
        )
        failed = (row[0] for row in reads.stream(archive, "qc_result", scope, "test = 'linearity' AND " + _NOT_PASSED))
        chosen = _first_unique(itertools.chain(newest, failed), LINEARITY_FIGURES)
    for result in chosen:
        inputs = result.get("inputs") or {}
        title = f"linearity (decay method) — {result.get('device')}, {inputs.get('nuclide', '')}, {iso_utc(result['time_ns'])[:10]}"
        figure = linearity_figure(title, inputs, result.get("limit_values"))
        if figure is not None:
            figures.append(
                ReportFigure(
                    "linearity",
                    f"Decay-method linearity of {result.get('device')}: readings, "
                    "the activity expected from the library half-life, normalised at the low-activity end, and each "
                    f"reading's deviation from it (verdict {result.get('verdict')})",
                    figure,
                )
            )
    return figures


def _first_unique(records: Iterable[dict[str, Any] | None], count: int) -> list[dict[str, Any]]:
    """The first `count` distinct records (by msg_id); reading stops there."""
    chosen: dict[str, dict[str, Any]] = {}
    for record in records:
        if len(chosen) == count:
            break
        if record is not None:
            chosen.setdefault(str(record["msg_id"]), record)
    return list(chosen.values())


def _yield_figures(archive: HistoryArchive, data: ReportData) -> list[ReportFigure | None]:
    """One figure per station: the yields of the generators it eluted (a Mo-99 station gets a new one each week),
    QC-judged where the engine judged them, else the elution records' own, with the least-squares trend of a
    single generator."""
    scope = data.scope
    yield_sql = "CASE WHEN json_type(payload, '$.yield_pct') IN ('integer', 'real') THEN json_extract(payload, '$.yield_pct') END"
    stations: dict[str, TrendQuery] = {}
    for station, _n in reads.grouped(archive, "elution", scope, ("station",)):
        stations[str(station)] = TrendQuery("elution", "station IS ?", (station,), value_sql=yield_sql)
    for station, _n in reads.grouped(archive, "qc_result", scope, ("station",), extra="test = 'elution_yield'"):
        query = TrendQuery(
            "qc_result", "station IS ? AND test = 'elution_yield'", (station,), series_sql=_GENERATOR_SQL
        )
        stations[str(station)] = query
    figures = []
    for station, query in sorted(stations.items()):
        source = "QC-judged yields" if query.kind == "qc_result" else "the elution records' yields"

        def named(trend: Trend) -> str:
            return trend.names[0] if len(trend.names) == 1 else f"{len(trend.names)} generators"

        def caption(trend: Trend, station: str = station, source: str = source) -> str:
            return (
                f"Elution yield of {named(trend)} on station {station} ({source}), with the least-squares trend "
                "of a single generator"
            )

        def title(trend: Trend, station: str = station) -> str:
            return f"elution yield — {station}: {named(trend)}"

        figures.append(
            _trend_figure(
                archive,
                data,
                query,
                section="elution-yield",
                caption=caption,
                title=title,
                xlabel=_AXIS[STATION_CLOCK],
                ylabel="elution yield (%)",
                fit=True,
            )
        )
    return figures


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:2em auto;max-width:75em;color:#1b1b1b;
line-height:1.4;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #1f5fa8;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;width:100%;font-size:.82em;margin:.6em 0}
th,td{border:1px solid #c8c8c8;padding:.25em .45em;text-align:left;vertical-align:top}
th{background:#eef2f7}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.verdict-warn td.verdict{background:#fff1c2}tr.verdict-fail td.verdict{background:#f8cfcf}
tr.verdict-pass td.verdict{background:#dcefdc}
.status{padding:.5em .8em;border-radius:.3em;font-weight:600}.status.ok{background:#dcefdc}
.status.broken{background:#f8cfcf}.status.absent{background:#eeeeee}
figure{margin:1em 0;break-inside:avoid}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.85em;color:#444}pre{white-space:pre-wrap;font-size:.9em;margin:.2em 0}
details summary{cursor:pointer;color:#1f5fa8}.meta{color:#555;font-size:.9em}
code{font-size:.9em;word-break:break-all}dl.clocks dt{font-weight:600}dl.clocks dd{margin:0 0 .4em 1.5em}
@media print{body{max-width:none;margin:0}h2{break-after:avoid}}
"""

_SECTIONS = (
    ("constancy", "Constancy"),
    ("accuracy", "Accuracy"),
    ("linearity", "Linearity (decay method)"),
    ("elution-yield", "Elution yield over generator life"),
    ("breakthrough", "Breakthrough"),
    ("other", "Other tests"),
)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _write_table(out: TextIO, header: Sequence[str], rows: Iterable[str], empty: str) -> None:
    """A table, written row by row as `rows` yields them; `empty` as a paragraph when there is none."""
    started = False
    for row in rows:
        if not started:
            head = "".join(f"<th>{_e(h)}</th>" for h in header)
            out.write(f"<table><thead><tr>{head}</tr></thead><tbody>")
            started = True
        out.write(row)
    out.write("</tbody></table>" if started else f"<p>{_e(empty)}</p>")


def _time(value: Any) -> str:
    return iso_utc(int(value))[:19] if isinstance(value, int) and not isinstance(value, bool) else "–"


def _where(record: Mapping[str, Any]) -> str:
    return "/".join(str(record.get(k, "")) for k in ("site", "station", "device"))


_VERDICT_HEADER = (
    "time (UTC)",
    "clock",
    "site/station/device",
    "test",
    "verdict",
    "measured",
    "expected",
    "deviation",
    "limit",
    "limit source",
    "detail and inputs",
)


def _verdict_row(r: Mapping[str, Any], station_timed: Any) -> str:
    verdict = str(r.get("verdict"))
    unit = r.get("unit")
    inputs = json.dumps(r.get("inputs") or {}, indent=1, ensure_ascii=False, sort_keys=True)
    return (
        f'<tr class="verdict verdict-{_e(verdict)}" data-msg-id="{_e(r.get("msg_id"))}">'
        f"<td>{_e(r.get('time'))}</td><td>{_e(_clock_of(station_timed))}</td><td>{_e(_where(r))}</td>"
        f'<td>{_e(r.get("test"))}</td><td class="verdict">{_e(verdict)}</td>'
        f'<td class="num">{_e(quantity(r.get("measured"), unit))}</td>'
        f'<td class="num">{_e(quantity(r.get("expected"), unit))}</td>'
        f'<td class="num">{_e(signed_pct(r.get("deviation_pct")))}</td>'
        f"<td>{_e(r.get('limit'))}</td><td>{_e(r.get('limit_source'))}</td>"
        f"<td>{_e(r.get('detail', ''))}<details><summary>inputs</summary><pre>{_e(inputs)}</pre></details></td></tr>"
    )


_NOT_PASSED = "COALESCE(verdict, '') != 'pass'"


def _results(archive: HistoryArchive, data: ReportData, condition: str = "") -> Iterator[tuple[Any, ...]]:
    """(payload, station-timed) of the period's results, oldest first, in chunks."""
    return reads.stream(archive, "qc_result", data.scope, condition, columns=(STATION_TIMED_SQL,))


def _clock_legend_html() -> str:
    items = "".join(f"<dt>{_e(name)}</dt><dd>{_e(text)}.</dd>" for name, text in CLOCKS)
    return f'<section id="clocks"><h2>Clocks</h2><p>{_e(CLOCK_NOTE)}</p><dl class="clocks">{items}</dl></section>'


def _listing_note(data: ReportData) -> str:
    if data.lists_all:
        return f"Every result, elution and audited action of the period is listed (a period of at most {LIST_ALL_DAYS} days)."
    passed = sum(n for _, v, n in data.totals if v == "pass")
    return (
        f"This period has {data.days:.0f} days: its {passed} passing result(s), {data.elutions} elution(s) and "
        f"{data.audit.in_period} audited action(s) are counted per {_bucket_name(data)} and shown in the trends, not "
        "listed one by one. Every result that did not pass, every procedure with its sign-off and every signature "
        f"are listed. A report of at most {LIST_ALL_DAYS} days lists every record; `hotlab audit show --from --to` "
        "lists the audited actions."
    )


def _summary_html(data: ReportData) -> str:
    counts = Counter({(t, v): n for t, v, n in data.totals})
    tests = sorted({test for test, _ in counts})
    rows = [
        f"<tr><td>{_e(t)}</td>"
        + "".join(f'<td class="num">{counts[(t, v)]}</td>' for v in VERDICTS)
        + f'<td class="num">{sum(n for (test, _v), n in counts.items() if test == t)}</td></tr>'
        for t in tests
    ]
    buffer = io.StringIO()
    _write_table(buffer, ("test", "pass", "warn", "fail", "total"), rows, "No QC results in this period.")
    review = data.review
    return (
        f"{buffer.getvalue()}<p>{data.results} QC result(s), {data.elutions} elution(s), "
        f"{data.audit.in_period} audited action(s) in the period; {review.procedures} QC procedure(s), "
        f"{review.signed} signature(s), {review.awaiting} record(s) awaiting review.</p>"
        f"<p>{_e(_listing_note(data))}</p>{_audit_status_html(data.audit)}"
    )


def _audit_status_html(audit: AuditSection) -> str:
    if audit.verification is None:
        return f'<p class="status absent">No audit trail at <code>{_e(audit.path)}</code>.</p>'
    result = audit.verification
    if result.ok:
        mac = (
            "HMAC verified"
            if result.mac_checked
            else "HMAC present, not checked (no key given)"
            if result.mac_present
            else "no HMAC"
        )
        return (
            f'<p class="status ok">Audit chain intact: {result.records} record(s) in <code>{_e(audit.path)}</code>, '
            f"{mac}. Head hash <code>{_e(result.head_hash)}</code>.</p>"
        )
    assert result.broken is not None
    return (
        f'<div class="status broken">Audit chain BROKEN in <code>{_e(audit.path)}</code> after '
        f"{result.records} intact record(s):<pre>{_e(result.broken.describe())}</pre>"
        "Records from that line on cannot be trusted.</div>"
    )


def started_by(procedure: Mapping[str, Any]) -> str:
    who = procedure.get("started_by")
    if isinstance(who, Mapping):
        return f"{who.get('user')} ({who.get('role')})"
    return "recognised automatically"


def sign_off(review: ReviewSection, record: Mapping[str, Any]) -> str:
    """How far a reviewed record got: each signature's meaning, printed name and comment, then what it
    awaits (review, or approval after a review alone), or running while a procedure has not ended."""
    if record.get("status") == "started":
        return "running"
    rows = review.signatures_of(str(record.get("msg_id")))
    parts = [
        f"{row.meaning} by {row.printed_name}"
        + (f': "{row.comment}"' if row.comment else "")
        + ("" if row.intact else " (record CHANGED since)")
        for row in rows
    ]
    pending = still_to_do(row.meaning for row in rows if row.intact)
    return "; ".join(parts + ([] if pending is None else [f"awaiting {pending}"]))


def _what(record: Mapping[str, Any]) -> str:
    return str(record.get("procedure") if record_kind(record) == "qc_procedure" else record.get("test"))


_PROCEDURE_HEADER = (
    "started (UTC, controller clock)",
    "procedure",
    "site/station/device",
    "status",
    "verdict",
    "started by",
    "ended (UTC, controller clock)",
    "results",
    "sign-off",
    "detail",
)


def _procedure_row(review: ReviewSection, p: Mapping[str, Any]) -> str:
    verdict = p.get("verdict")
    return (
        f'<tr class="procedure verdict-{_e(verdict)}" data-msg-id="{_e(p.get("msg_id"))}">'
        f"<td>{_e(_time(p.get('started_ns')))}</td><td>{_e(p.get('procedure'))}</td><td>{_e(_where(p))}</td>"
        f'<td>{_e(p.get("status"))}</td><td class="verdict">{_e(verdict or "–")}</td><td>{_e(started_by(p))}</td>'
        f'<td>{_e(_time(p.get("ended_ns")))}</td><td class="num">{len(p.get("results") or [])}</td>'
        f"<td>{_e(sign_off(review, p))}</td><td>{_e(p.get('detail', ''))}</td></tr>"
    )


_SIGNATURE_HEADER = (
    "record time (UTC)",
    "record clock",
    "record",
    "device",
    "verdict",
    "meaning",
    "signed by",
    "printed name",
    "role",
    "signed (UTC, controller clock)",
    "comment",
    "record since signing",
)


def _signature_row(row: SignedRow) -> str:
    r, s = row.record, row.signature
    return (
        f'<tr class="signature meaning-{_e(s.meaning)}" data-msg-id="{_e(r.get("msg_id"))}">'
        f"<td>{_e(_time(r.get('time_ns')))}</td><td>{_e(_clock_of(row.station_timed))}</td>"
        f"<td>{_e(record_kind(r))} {_e(_what(r))}</td>"
        f"<td>{_e(r.get('device'))}</td><td>{_e(r.get('verdict') or '–')}</td><td>{_e(s.meaning)}</td>"
        f"<td>{_e(s.signer)}</td><td>{_e(s.printed_name)}</td><td>{_e(s.role)}</td><td>{_e(s.time[:19])}</td>"
        f"<td>{_e(s.comment or '')}</td><td>{'unchanged' if s.intact else 'CHANGED'}</td></tr>"
    )


_SIGNATURE_SUMMARY_HEADER = (
    "signed (UTC, controller clock)",
    "audit record",
    "meaning",
    "signed by",
    "printed name",
    "role",
    "comment",
    "procedures",
    "results outside procedures",
    "records since signing",
)


def _signature_summary_row(s: SignOff, procedures: int, results: int, changed: int) -> str:
    return (
        f'<tr class="signature meaning-{_e(s.meaning)}"><td>{_e(s.time[:19])}</td><td class="num">#{s.seq}</td>'
        f"<td>{_e(s.meaning)}</td><td>{_e(s.signer)}</td><td>{_e(s.printed_name)}</td><td>{_e(s.role)}</td>"
        f'<td>{_e(s.comment or "")}</td><td class="num">{procedures}</td><td class="num">{results}</td>'
        f"<td>{'unchanged' if not changed else f'{changed} CHANGED'}</td></tr>"
    )


def _review_status_html(review: ReviewSection) -> str:
    uncounted = (
        '<div class="status broken">Signatures in the audit trail that do not count:<ul>'
        + "".join(f"<li>{_e(line)}</li>" for line in review.uncounted)
        + "</ul></div>"
        if review.uncounted
        else ""
    )
    if not review.problems:
        return uncounted + (
            f'<p class="status ok">{review.signed} signature(s) of records in this period; every record '
            "signed (in any period) is in the archive as it was signed.</p>"
        )
    problems = "".join(f"<li>{_e(p.describe())}</li>" for p in review.problems)
    return (
        uncounted
        + f'<div class="status broken">Signed records changed or missing since signing:<ul>{problems}</ul></div>'
    )


_LOOSE_RESULT_HEADER = ("time (UTC)", "clock", "test", "site/station/device", "verdict", "sign-off")


def _loose_result_row(review: ReviewSection, r: dict[str, Any], station_timed: bool) -> str:
    return (
        f'<tr class="result verdict-{_e(r.get("verdict"))}" data-msg-id="{_e(r.get("msg_id"))}">'
        f"<td>{_e(_time(r.get('time_ns')))}</td><td>{_e(_clock_of(station_timed))}</td><td>{_e(r.get('test'))}</td>"
        f'<td>{_e(_where(r))}</td><td class="verdict">{_e(r.get("verdict") or "–")}</td>'
        f"<td>{_e(sign_off(review, r))}</td></tr>"
    )


def _write_review(out: TextIO, archive: HistoryArchive, data: ReportData) -> None:
    review = data.review
    out.write('<section id="procedures"><h2>QC procedures</h2>')
    _write_table(
        out,
        _PROCEDURE_HEADER,
        (_procedure_row(review, p) for p in procedures(archive, data.scope)),
        "No QC procedures in this period.",
    )
    out.write(f'</section><section id="review"><h2>Review and sign-off</h2>{_review_status_html(review)}')
    if data.lists_all:
        _write_table(
            out, _SIGNATURE_HEADER, map(_signature_row, review.index.rows()), "No record of this period is signed."
        )
    else:
        out.write(
            "<p>Each signature once, with the number of this period's records it signs; each procedure's sign-off "
            "is in its row above.</p>"
        )
        _write_table(
            out, _SIGNATURE_SUMMARY_HEADER, (_signature_summary_row(*row) for row in review.index.signatures()),
            "No record of this period is signed.",
        )  # fmt: skip
    out.write('</section><section id="awaiting-review"><h2>Awaiting review or approval</h2>')
    waiting = (_procedure_row(review, p) for p, _ in review.index.awaiting("qc_procedure"))
    _write_table(out, _PROCEDURE_HEADER, waiting, "No ended procedure awaits review.")
    loose = (_loose_result_row(review, r, timed) for r, timed in review.index.awaiting("qc_result"))
    _write_table(out, _LOOSE_RESULT_HEADER, loose, "No QC result outside a procedure awaits review.")
    out.write("</section>")


def _audit_rows(data: ReportData) -> Iterator[str]:
    for r in data.audit.records(data.period):
        yield (
            f'<tr><td class="num">{r.seq}</td><td>{_e(r.time)}</td><td>{_e(r.actor)}</td><td>{_e(r.action)}</td>'
            f"<td>{_e(r.target)}</td><td>{_e(_plain(r.old_value))}</td><td>{_e(_plain(r.new_value))}</td><td>{_e(r.reason)}</td></tr>"
        )


def _audit_counts(data: ReportData) -> list[tuple[str, str, int]]:
    """(month, action, count) of the period's audited actions: one entry per month and action."""
    counts = Counter((r.time[:7], r.action) for r in data.audit.records(data.period))
    return [(month, action, n) for (month, action), n in sorted(counts.items())]


def _plain(value: Any) -> str:
    return (
        ""
        if value is None
        else value
        if isinstance(value, str)
        else json.dumps(value, ensure_ascii=False, sort_keys=True)
    )


def _limits_rows(archive: HistoryArchive, data: ReportData) -> list[tuple[str, str, str, int]]:
    """(test, limit, source, results): one row per distinct limit applied in the period."""
    keys = ("test", "json_extract(payload, '$.limit')", "json_extract(payload, '$.limit_source')")
    return [
        (str(t), str(lim), str(src), int(n)) for t, lim, src, n in reads.grouped(archive, "qc_result", data.scope, keys)
    ]


def _bucket(data: ReportData) -> tuple[int, int]:
    """(size, offset) of the verdict and elution counts: UTC days for short periods, Monday weeks for long ones."""
    return (DAY_NS, 0) if data.days <= DAILY_COUNTS_DAYS else (WEEK_NS, WEEK_OFFSET_NS)


def _bucket_name(data: ReportData) -> str:
    return "day" if _bucket(data)[0] == DAY_NS else "week (from Monday)"


def verdict_counts(archive: HistoryArchive, data: ReportData) -> Iterator[tuple[int, str, str, dict[str, int]]]:
    """(bucket start, device, test, {verdict: count}) per day or week of the period, oldest first, read a
    quarter at a time: memory holds one quarter's groups."""
    size, offset = _bucket(data)
    keys = (reads.bucket_sql(size, offset), "device", "test", "COALESCE(verdict, '–')")
    for window in _windows(data, size, offset):
        current: tuple[int, str, str] | None = None
        counts: dict[str, int] = {}
        for bucket, device, test, verdict, n in reads.grouped(archive, "qc_result", window, keys):
            key = (int(bucket), str(device), str(test))
            if key != current:
                if current is not None:
                    yield (*current, counts)
                current, counts = key, {}
            counts[str(verdict)] = int(n)
        if current is not None:
            yield (*current, counts)


def _windows(data: ReportData, size: int, offset: int, buckets: int = 13) -> Iterator[Scope]:
    """The report's scope cut into windows of whole buckets (13 days or 13 weeks): each grouped query stays small."""
    period = data.scope.period
    start = period.start_ns
    first = ((start - offset) // size) * size + offset
    edge = first + buckets * size
    while start < period.end_ns:
        end = min(edge, period.end_ns)
        yield Scope(TimeRange(start, end), data.scope.site, data.scope.archived_until_ns)
        start, edge = end, edge + buckets * size


def _day(bucket_ns: int) -> str:
    return iso_utc(bucket_ns)[:10]


def _count_rows(archive: HistoryArchive, data: ReportData) -> Iterator[str]:
    for bucket, device, test, counts in verdict_counts(archive, data):
        other = sum(n for v, n in counts.items() if v not in VERDICTS)
        yield (
            f'<tr class="count" data-bucket="{_day(bucket)}" data-device="{_e(device)}" data-test="{_e(test)}">'
            f"<td>{_day(bucket)}</td><td>{_e(device)}</td><td>{_e(test)}</td>"
            + "".join(f'<td class="num">{counts.get(v, 0)}</td>' for v in VERDICTS)
            + f'<td class="num">{other}</td></tr>'
        )


_ELUTION_SUMS = (
    "COUNT(*)",
    "SUM(json_extract(payload, '$.activity_bq'))",
    "MIN(json_extract(payload, '$.yield_pct'))",
    "AVG(json_extract(payload, '$.yield_pct'))",
    "MAX(json_extract(payload, '$.yield_pct'))",
    "MAX(json_extract(payload, '$.breakthrough_pct'))",
)


def _elution_summary_rows(archive: HistoryArchive, data: ReportData) -> Iterator[tuple[Any, ...]]:
    """(week start, station, generator, elutions, activity, lowest, mean and highest yield, highest breakthrough)."""
    size, offset = WEEK_NS, WEEK_OFFSET_NS
    keys = (reads.bucket_sql(size, offset), "station", "device")
    for window in _windows(data, size, offset):
        yield from reads.grouped(archive, "elution", window, keys, _ELUTION_SUMS)


def _pct(value: Any) -> str:
    return "–" if not isinstance(value, (int, float)) else f"{value:.4g} %"


def _elution_row(e: Mapping[str, Any]) -> str:
    return (
        f'<tr class="elution" data-msg-id="{_e(e.get("msg_id"))}"><td>{_e(_time(e.get("start_ns")))}</td>'
        f"<td>{_e(e.get('time'))}</td><td>{_e(e.get('station'))}</td>"
        f'<td>{_e(e.get("generator"))}</td><td class="num">{_e(e.get("counter"))}</td>'
        f'<td class="num">{_e(quantity(e.get("activity_bq"), "Bq"))}</td>'
        f'<td class="num">{_e(quantity(e.get("volume_ml"), "mL"))}</td><td class="num">{_e(quantity(e.get("duration_s"), "s"))}</td>'
        f'<td class="num">{_e(_pct(e.get("yield_pct")))}</td><td class="num">{_e(_pct(e.get("breakthrough_pct")))}</td></tr>'
    )


def _elution_summary_row(row: tuple[Any, ...]) -> str:
    week, station, generator, n, activity, low, mean, high, breakthrough = row
    yields = "–" if low is None else f"{low:.4g} / {mean:.4g} / {high:.4g} %"
    return (
        f'<tr><td>{_day(int(week))}</td><td>{_e(station)}</td><td>{_e(generator)}</td><td class="num">{n}</td>'
        f'<td class="num">{_e(quantity(activity, "Bq"))}</td><td class="num">{_e(yields)}</td>'
        f'<td class="num">{_e(_pct(breakthrough))}</td></tr>'
    )


_ELUTION_HEADER = (
    "start (UTC, station clock)",
    "end (UTC, station clock)",
    "station",
    "generator",
    "counter",
    "activity",
    "volume",
    "duration",
    "yield",
    "breakthrough",
)
_ELUTION_SUMMARY_HEADER = (
    "week from (UTC, station clock)",
    "station",
    "generator",
    "elutions",
    "activity eluted",
    "yield lowest / mean / highest",
    "highest breakthrough",
)
_AUDIT_HEADER = ("#", "time (UTC, controller clock)", "who", "what", "target", "old", "new", "why")


def render_html(data: ReportData, figures: Sequence[ReportFigure] | None = None) -> str:
    """The complete report as one self-contained HTML document (`write_html` into a string)."""
    buffer = io.StringIO()
    write_html(data, buffer, figures)
    return buffer.getvalue()


def write_html(data: ReportData, out: TextIO, figures: Sequence[ReportFigure] | None = None) -> None:
    """The complete report as one self-contained HTML document, written to `out` a row at a time."""
    figures = build_figures(data) if figures is None else figures
    start, end = iso_utc(data.period.start_ns), iso_utc(data.period.end_ns)
    last_day = iso_utc(data.period.end_ns - 1_000)[:10]  # the end is exclusive; 1 µs is iso_utc's resolution
    title = f"hotlab QC report {start[:10]} – {last_day}"
    out.write(
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n"
        f'<header><h1>{_e(title)}</h1><p class="meta">Period {_e(start)} to {_e(end)} (end exclusive)'
        f"{' · site ' + _e(data.site) if data.site else ''} · archive <code>{_e(data.archive_path)}</code> · "
        f"generated {_e(iso_utc(data.generated_ns))} (controller clock)</p></header>\n"
        f'<section id="summary"><h2>Summary</h2>{_summary_html(data)}</section>\n{_clock_legend_html()}\n'
    )
    with data.archive() as archive:
        _write_review(out, archive, data)
        for section, heading in _SECTIONS:
            chosen = [f for f in figures if f.section == section]
            if chosen:
                out.write(f'\n<section id="{section}"><h2>{_e(heading)}</h2>')
                for f in chosen:
                    out.write(
                        f'<figure><img alt="{_e(f.caption)}" src="data:image/png;base64,{png_base64(f.figure)}">'
                        f"<figcaption>{_e(f.caption)}</figcaption></figure>"
                    )
                out.write("</section>")
        out.write('\n<section id="deviations"><h2>Warnings and failures</h2>')
        rows = (_verdict_row(r, station) for r, station in _results(archive, data, _NOT_PASSED))
        _write_table(out, _VERDICT_HEADER, rows, "Every result in the period passed.")
        out.write(
            f'</section>\n<section id="counts"><h2>Verdicts per {_e(_bucket_name(data))}</h2>'
            f"<p>Results per {_e(_bucket_name(data))} (UTC, by each result's own time and clock), device and test.</p>"
        )
        _write_table(
            out,
            (f"{_bucket_name(data)} (UTC)", "device", "test", *VERDICTS, "other"),
            _count_rows(archive, data),
            "No QC results in this period.",
        )
        out.write('</section>\n<section id="verdicts"><h2>All verdicts</h2>')
        if data.lists_all:
            rows = (_verdict_row(r, station) for r, station in _results(archive, data))
            _write_table(out, _VERDICT_HEADER, rows, "No QC results in this period.")
        else:
            out.write(f"<p>{_e(_listing_note(data))}</p>")
        limit_rows = (
            f'<tr><td>{_e(t)}</td><td>{_e(lim)}</td><td>{_e(src)}</td><td class="num">{n}</td></tr>'
            for t, lim, src, n in _limits_rows(archive, data)
        )
        out.write('</section>\n<section id="limits"><h2>Limits and their sources</h2>')
        _write_table(out, ("test", "limit", "source", "results"), limit_rows, "No limits applied in this period.")
        out.write('</section>\n<section id="elutions"><h2>Elutions</h2>')
        if data.lists_all:
            elutions = (_elution_row(row[0]) for row in reads.stream(archive, "elution", data.scope))
            _write_table(out, _ELUTION_HEADER, elutions, "No elutions in this period.")
        else:
            summary = (_elution_summary_row(row) for row in _elution_summary_rows(archive, data))
            _write_table(out, _ELUTION_SUMMARY_HEADER, summary, "No elutions in this period.")
    out.write(
        f'</section>\n<section id="audit"><h2>Audit trail of control actions</h2>{_audit_status_html(data.audit)}'
    )
    if data.lists_all:
        _write_table(out, _AUDIT_HEADER, _audit_rows(data), "No audited actions in this period.")
    else:
        month_rows = (
            f'<tr><td>{_e(month)}</td><td>{_e(action)}</td><td class="num">{n}</td></tr>'
            for month, action, n in _audit_counts(data)
        )
        _write_table(
            out,
            ("month (UTC, controller clock)", "action", "records"),
            month_rows,
            "No audited actions in this period.",
        )
    out.write("</section>\n</body></html>\n")


# --------------------------------------------------------------------------- PDF


def _wrapped(cells: Sequence[str], widths: Sequence[int]) -> list[str]:
    """One table row as monospaced lines; the last column wraps onto continuation lines instead of being cut."""
    fixed = "".join(c[: w - 1].ljust(w) for c, w in zip(cells[:-1], widths))
    tail = textwrap.wrap(cells[-1], width=max(20, TEXT_PAGE_COLUMNS - len(fixed))) or [""]
    return [fixed + tail[0], *(" " * len(fixed) + more for more in tail[1:])]


def _header(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "".join(h[: w - 1].ljust(w) for h, w in zip(cells[:-1], widths)) + cells[-1]


_VERDICT_WIDTHS = (20, 11, 22, 20, 6, 13, 13, 9)


def _verdict_lines(rows: Iterable[tuple[Any, ...]]) -> Iterator[str]:
    header = ("time (UTC)", "clock", "device", "test", "verd.", "measured", "expected", "dev.", "limit — source")
    yield _header(header, _VERDICT_WIDTHS)
    for r, station in rows:
        unit = r.get("unit")
        verdict = str(r.get("verdict"))
        yield from _wrapped(
            (
                str(r.get("time", ""))[:19],
                "station" if station else "controller",
                str(r.get("device")),
                str(r.get("test")),
                verdict if verdict == "pass" else verdict.upper(),
                quantity(r.get("measured"), unit),
                quantity(r.get("expected"), unit),
                signed_pct(r.get("deviation_pct")),
                f"{r.get('limit')} — {r.get('limit_source')}",
            ),
            _VERDICT_WIDTHS,
        )


def _summary_lines(data: ReportData) -> list[str]:
    audit = data.audit
    status = f"no audit trail at {audit.path}" if audit.verification is None else audit.verification.summary()
    counts = Counter({(t, v): n for t, v, n in data.totals})
    lines = [
        f"period {iso_utc(data.period.start_ns)} to {iso_utc(data.period.end_ns)} (end exclusive)",
        f"archive {data.archive_path}",
        f"generated {iso_utc(data.generated_ns)} (controller clock)",
        "",
        f"{data.results} QC result(s), {data.elutions} elution(s), {audit.in_period} audited action(s); "
        f"{data.review.procedures} QC procedure(s), {data.review.signed} signature(s), "
        f"{data.review.awaiting} record(s) awaiting review",
        "",
        *(
            f"{t:<24} pass {counts[(t, 'pass')]:>6}  warn {counts[(t, 'warn')]:>6}  fail {counts[(t, 'fail')]:>6}"
            for t in sorted({t for t, _ in counts})
        ),
        "",
        *textwrap.wrap(_listing_note(data), TEXT_PAGE_COLUMNS),
        "",
        *textwrap.wrap(status, TEXT_PAGE_COLUMNS),
        "",
        "Clocks. " + CLOCK_NOTE,
    ]
    for name, text in CLOCKS:
        lines += textwrap.wrap(f"{name}: {text}.", TEXT_PAGE_COLUMNS)
    return lines


def _procedure_lines(archive: HistoryArchive, data: ReportData, records: Iterable[dict[str, Any]]) -> Iterator[str]:
    widths = (21, 20, 14, 12, 7)
    yield _header(
        ("started (UTC, ctrl)", "procedure", "device", "status", "verd.", "started by; ended; sign-off"), widths
    )
    for p in records:
        yield from _wrapped(
            (
                _time(p.get("started_ns")),
                str(p.get("procedure")),
                str(p.get("device")),
                str(p.get("status")),
                str(p.get("verdict") or "–"),
                f"started by {started_by(p)}; ended {_time(p.get('ended_ns'))}; {sign_off(data.review, p)}",
            ),
            widths,
        )


def _signature_lines(archive: HistoryArchive, data: ReportData) -> Iterator[str]:
    widths = (21, 11, 28, 10, 21)
    header = ("record time (UTC)", "clock", "record", "meaning", "signed (UTC, ctrl)", "signed by")
    if data.lists_all:
        yield _header(header, widths)
    else:
        yield "Each signature once, with the number of this period's procedures and loose results it signs"
        for s, procedures, results, changed in data.review.index.signatures():
            yield from _wrapped(
                (s.time[:19], f"#{s.seq}", s.meaning, f"{procedures} proc., {results} results",
                 f"{s.printed_name} ({s.signer}, {s.role})" + (f"; {changed} record(s) CHANGED since" if changed else "")
                 + (f"; comment: {s.comment}" if s.comment else "")),
                (21, 9, 10, 24),
            )  # fmt: skip
    for row in data.review.index.rows() if data.lists_all else ():
        record, s = row.record, row.signature
        yield from _wrapped(
            (
                _time(record.get("time_ns")),
                _clock_of(row.station_timed).removesuffix(" clock"),
                f"{_what(record)} {record.get('device')}",
                s.meaning,
                s.time[:19],
                f"{s.printed_name} ({s.signer}, {s.role})"
                + ("" if s.intact else " — record CHANGED since signing")
                + (f"; comment: {s.comment}" if s.comment else ""),
            ),
            widths,
        )
    for text in [*(p.describe() for p in data.review.problems), *data.review.uncounted]:
        yield from textwrap.wrap(text, TEXT_PAGE_COLUMNS)


def _awaiting_lines(archive: HistoryArchive, data: ReportData) -> Iterator[str]:
    widths = (21, 11, 14, 22, 14)
    yield _header(("time (UTC)", "clock", "kind", "what", "device", "msg_id: sign-off"), widths)
    kinds = ("qc_procedure", "qc_result")
    for p, station_timed in itertools.chain.from_iterable(data.review.index.awaiting(kind) for kind in kinds):
        yield from _wrapped(
            (
                _time(p.get("time_ns")),
                _clock_of(station_timed).removesuffix(" clock"),
                str(record_kind(p)),
                _what(p),
                str(p.get("device")),
                f"{p['msg_id']}: {sign_off(data.review, p)}",
            ),
            widths,
        )


def _count_lines(archive: HistoryArchive, data: ReportData) -> Iterator[str]:
    yield f"{_bucket_name(data)[:10]:<12}{'device':<22}{'test':<26}{'pass':>8}{'warn':>8}{'fail':>8}{'other':>8}"
    for bucket, device, test, counts in verdict_counts(archive, data):
        other = sum(n for v, n in counts.items() if v not in VERDICTS)
        yield (
            f"{_day(bucket):<12}{device[:21]:<22}{test[:25]:<26}"
            + "".join(f"{counts.get(v, 0):>8}" for v in VERDICTS)
            + f"{other:>8}"
        )


def _elution_lines(archive: HistoryArchive, data: ReportData) -> Iterator[str]:
    if data.lists_all:
        yield "start and end: station clock (UTC)"
        for (e,) in reads.stream(archive, "elution", data.scope):
            yield (
                f"{_time(e.get('start_ns')):<21}{str(e.get('time', ''))[:19]:<21}{str(e.get('generator')):<18}"
                f"#{e.get('counter')!s:<6}{quantity(e.get('activity_bq'), 'Bq'):<14} yield {_pct(e.get('yield_pct')):<10} "
                f"breakthrough {_pct(e.get('breakthrough_pct'))}"
            )
        return
    yield f"{'week from':<12}{'station':<18}{'generator':<22}{'elutions':>9}  activity      yield low / mean / high   breakthrough max"
    for week, station, generator, n, activity, low, mean, high, breakthrough in _elution_summary_rows(archive, data):
        yields = "–" if low is None else f"{low:.4g} / {mean:.4g} / {high:.4g} %"
        yield (
            f"{_day(int(week)):<12}{str(station)[:17]:<18}{str(generator)[:21]:<22}{n:>9}  "
            f"{quantity(activity, 'Bq'):<14}{yields:<26}{_pct(breakthrough)}"
        )


def _audit_lines(data: ReportData) -> Iterator[str]:
    audit = data.audit
    status = f"no audit trail at {audit.path}" if audit.verification is None else audit.verification.summary()
    yield from textwrap.wrap(status, TEXT_PAGE_COLUMNS)
    yield ""
    if not data.lists_all:
        yield "month (UTC, controller clock), action, records"
        for month, action, n in _audit_counts(data):
            yield f"{month:<10}{action:<40}{n:>8}"
        return
    widths = (6, 21, 12, 20, 20)
    yield _header(("#", "time (UTC, ctrl)", "who", "what", "target", "old -> new; why"), widths)
    for r in audit.records(data.period):
        yield from _wrapped(
            (
                f"#{r.seq}",
                r.time[:19],
                r.actor,
                r.action,
                r.target,
                f"{_plain(r.old_value)} -> {_plain(r.new_value)}; why: {r.reason}",
            ),
            widths,
        )


def _text_sections(archive: HistoryArchive, data: ReportData) -> Iterator[tuple[str, Callable[[], Iterable[str]]]]:
    """(title, lines) of each table section of the PDF, in order; the lines are read as the pages are made."""
    yield "Warnings and failures", lambda: _verdict_lines(_results(archive, data, _NOT_PASSED))
    yield f"Verdicts per {_bucket_name(data)}", lambda: _count_lines(archive, data)
    yield (
        "All verdicts",
        lambda: (
            _verdict_lines(_results(archive, data))
            if data.lists_all
            else textwrap.wrap(_listing_note(data), TEXT_PAGE_COLUMNS)
        ),
    )
    yield "QC procedures", lambda: _procedure_lines(archive, data, procedures(archive, data.scope))
    yield "Review and sign-off", lambda: _signature_lines(archive, data)
    yield "Awaiting review", lambda: _awaiting_lines(archive, data)
    yield (
        "Limits and their sources",
        lambda: (
            line
            for t, lim, src, n in _limits_rows(archive, data)
            for line in _wrapped((t, f"{n} result(s)", f"{lim} — {src}"), (24, 14))
        ),
    )
    yield "Elutions", lambda: _elution_lines(archive, data)
    yield "Audit trail of control actions", lambda: _audit_lines(data)


def write_pdf(data: ReportData, path: Path | BinaryIO, figures: Sequence[ReportFigure] | None = None) -> int:
    """The report as PDF to a file, or to an open binary stream (the web panel's download): summary,
    figures, then the tables as text pages, each page written and dropped before the next is made.
    Returns the page count."""
    figures = build_figures(data) if figures is None else figures
    pages = 0
    with (
        PdfPages(
            path,
            metadata={"Title": f"hotlab QC report {iso_utc(data.period.start_ns)[:10]}", "Creator": "hotlab report"},
        ) as pdf,
        data.archive() as archive,
    ):

        def save(page: Figure, core_font: bool = False) -> None:
            nonlocal pages
            # A text page in the PDF's own Courier (nothing embedded) is drawn ~50 times faster than with an
            # embedded font; a page with a character Courier's encoding (cp1252) lacks keeps the embedded font.
            with matplotlib.rc_context({"pdf.use14corefonts": True} if core_font else {}):
                pdf.savefig(page)
            pages += 1

        for page, core_font in text_pages("hotlab QC report — summary", _summary_lines(data)):
            save(page, core_font)
        for figure in figures:
            save(figure.figure)
        for title, lines in _text_sections(archive, data):
            for page, core_font in text_pages(title, lines()):
                save(page, core_font)
    return pages
