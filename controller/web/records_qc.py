"""What the QC page shows, read from the archive in one worker-thread call: the schedule, results, charts.

The schedule is computed exactly as `hotlab qc status` computes it (controller/cli/qc_status.py):
the controller's own schedule stage for the lab's `[qc]` (`schedule_stage_for`), restored from
the archive and asked for every item's state now (controller/qc/schedule_stage.py `restore`,
`current`), so the page and the command agree, and the page is right while the controller is
down. Times are shown in the site's zone, as the command shows them. `restore` reads each item's
newest records, not the device's history (the Ge-68 follow-ups still read the generators' elutions).
The filters offer the devices and tests with results in the period shown.

Results are read a page at a time, oldest first within the period (the archive's order), with
a cursor (time, msg_id) of the last row shown: a page reads at most one page and a row more,
however long the period.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from hotlab.controller import archive_reads as reads
from hotlab.controller.archive import HistoryArchive, TimeRange
from hotlab.controller.archive_reads import Scope
from hotlab.controller.config import LabConfig
from hotlab.controller.qc.engine import QcConfig
from hotlab.controller.qc.limits import VERDICTS
from hotlab.controller.qc.schedule import ItemStatus
from hotlab.controller.qc.schedule_stage import schedule_stage_for
from hotlab.controller.web.charts_qc import QcChart, qc_charts
from hotlab.controller.web.records_query import PAGE_SIZE, Period, utc_minute
from hotlab.errors import InputError
from hotlab.physics.units import format_activity
from hotlab.physics.utc_time import NS_PER_S

#: The schedule's states, most urgent first: the order of the page's list.
STATE_ORDER = ("failed", "overdue", "due", "done")


@dataclass(frozen=True, slots=True)
class ScheduleLine:
    device: str
    #: The schedule's key of the item (`hotlab qc status` prints it), and how the page names it.
    item: str
    name: str
    test: str
    #: done, due, overdue or failed: also the CSS class that colours it.
    state: str
    due: str
    overdue_from: str
    last_done: str
    last_verdict: str
    detail: str


@dataclass(frozen=True, slots=True)
class ResultFilter:
    device: str | None
    test: str | None
    verdict: str | None
    period: Period

    def __post_init__(self) -> None:
        if self.verdict is not None and self.verdict not in VERDICTS:
            raise InputError(f"verdict must be one of {', '.join(VERDICTS)}, got {self.verdict!r}")


@dataclass(frozen=True, slots=True)
class Cursor:
    """The last row a page showed: the next page starts after it in the archive's order."""

    time_ns: int
    msg_id: str

    @classmethod
    def from_text(cls, value: str | None) -> Cursor | None:
        if value is None:
            return None
        time_text, _, msg_id = value.partition(":")
        if not time_text.isdigit() or not msg_id:
            raise InputError(f"page cursor {value!r} is not TIME_NS:MSG_ID")
        return cls(int(time_text), msg_id)

    @property
    def text(self) -> str:
        return f"{self.time_ns}:{self.msg_id}"


@dataclass(frozen=True, slots=True)
class ResultLine:
    msg_id: str
    time: str
    device: str
    test: str
    #: The nuclide setting (constancy), the generator (generator tests), or empty.
    subject: str
    verdict: str
    value: str
    limit: str
    limit_source: str
    detail: str


@dataclass(frozen=True, slots=True)
class QcPage:
    #: The schedule, most urgent first; None when there is none to compute (`schedule_note` says why).
    schedule: tuple[ScheduleLine, ...] | None
    schedule_note: str
    results: tuple[ResultLine, ...]
    #: Where the next page of results starts; None on the last page.
    next_cursor: str | None
    devices: tuple[str, ...]
    tests: tuple[str, ...]
    charts: tuple[QcChart, ...]


def read_qc_page(
    config: LabConfig, archive_path: Path | None, wanted: ResultFilter, after: Cursor | None, now_ns: int
) -> QcPage:
    """Everything the QC page shows at `now_ns`. Blocking (SQLite): call from a worker thread."""
    if archive_path is None or not archive_path.is_file():
        where = "the lab keeps none ([history] enabled = false)" if archive_path is None else f"none at {archive_path}"
        return QcPage(None, f"No history archive: {where}.", (), None, (), (), ())
    with HistoryArchive(archive_path, read_only=True) as archive:
        schedule, note = _schedule(config, archive, now_ns)
        rows, next_cursor = _results(archive, config.site, wanted, after)
        return QcPage(
            schedule=schedule,
            schedule_note=note,
            results=tuple(result_line(r) for r in rows),
            next_cursor=next_cursor,
            devices=_offered(archive, config.site, wanted.period.range, "device"),
            tests=_offered(archive, config.site, wanted.period.range, "test"),
            charts=tuple(qc_charts(archive, config.site, wanted.period.range, now_ns, wanted.device)),
        )


def _offered(archive: HistoryArchive, site: str, period: TimeRange, column: str) -> tuple[str, ...]:
    """The devices or tests with results in the period, offered as filters: a read of the period, not of the archive."""
    return tuple(
        str(value) for value, _n in reads.grouped(archive, "qc_result", Scope(period, site), (column,)) if value
    )


def _schedule(config: LabConfig, archive: HistoryArchive, now_ns: int) -> tuple[tuple[ScheduleLine, ...] | None, str]:
    if not config.qc:
        return None, "The lab config has no [qc] table: no calibrator or generator has scheduled QC."
    qc = QcConfig.from_mapping(config.qc)
    stations = {device.name: device.station for device in config.devices}
    stage = schedule_stage_for(config.site, qc, qc.schedule, stations)
    stage.restore(archive, now_ns=now_ns)
    zone = qc.schedule.timezone

    def local(time_ns: int | None) -> str:
        if time_ns is None:
            return "-"
        return datetime.fromtimestamp(time_ns // NS_PER_S, zone).strftime("%Y-%m-%d %H:%M %Z")

    def line(status: ItemStatus) -> ScheduleLine:
        return ScheduleLine(
            device=status.device,
            item=status.item,
            name=status.item if status.elution_id is None else f"{status.test} of elution {status.elution_id[:8]}…",
            test=status.test,
            state=status.state,
            due=local(status.due_ns),
            overdue_from=local(status.overdue_ns),
            last_done=local(status.last_done_ns),
            last_verdict=status.last_verdict or "-",
            detail=status.detail,
        )

    statuses = sorted(stage.current(now_ns), key=lambda s: STATE_ORDER.index(s.state))
    return tuple(line(s) for s in statuses), f"as of {local(now_ns)} ({zone.key}), from the archive"


def _results(
    archive: HistoryArchive, site: str, wanted: ResultFilter, after: Cursor | None
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of results after `after`, and the cursor of the next page (None on the last).

    Rows at the cursor's own time are read again and skipped; should more than a page of them share
    that time, the read widens until the page is full or the period ends.
    """
    start = wanted.period.range.start_ns if after is None else max(after.time_ns, wanted.period.range.start_ns)
    span = TimeRange(start, wanted.period.range.end_ns)
    limit = PAGE_SIZE + 1
    while True:
        rows = archive.query(
            "qc_result", span, site=site, device=wanted.device, test=wanted.test, verdict=wanted.verdict, limit=limit
        )
        fresh = [
            r for r in rows if after is None or (int(r["time_ns"]), str(r["msg_id"])) > (after.time_ns, after.msg_id)
        ]
        if len(fresh) > PAGE_SIZE or len(rows) < limit:
            break
        limit *= 2
    page = fresh[:PAGE_SIZE]
    more = len(fresh) > PAGE_SIZE
    return page, Cursor(int(page[-1]["time_ns"]), str(page[-1]["msg_id"])).text if more else None


def result_line(result: Mapping[str, Any]) -> ResultLine:
    inputs = result.get("inputs") or {}
    limit = result.get("limit_values") or {}
    value = result.get("value_judged")
    unit = limit.get("unit") or result.get("unit") or ""
    if not isinstance(value, (int, float)):
        shown = "-"
    elif unit == "Bq":
        shown = format_activity(float(value))
    elif limit.get("kind") == "tolerance":
        shown = f"{value:+.2f} {unit}"
    else:
        shown = f"{value:.4g} {unit}"
    return ResultLine(
        msg_id=str(result.get("msg_id")),
        time=utc_minute(int(result["time_ns"])),
        device=str(result.get("device")),
        test=str(result.get("test")),
        subject=str(inputs.get("setting") or inputs.get("generator") or ""),
        verdict=str(result.get("verdict")),
        value=shown,
        limit=str(result.get("limit") or ""),
        limit_source=str(result.get("limit_source") or ""),
        detail=str(result.get("detail") or ""),
    )
