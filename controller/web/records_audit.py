"""What the audit page shows: the verdict on the trail, and one page of its records, newest first.

The verdict is `hotlab audit verify`'s (controller/cli/audit.py): the chain verified with the
HMAC key and checked, in the same single pass, against every anchor of the trail the lab's
history archive holds (controller/anchor_check.py, controller/cli/audit_anchors.py). The page
does not ask the broker for its retained anchor (`hotlab audit verify --mqtt` does).

Records are read with `iter_records` as the command reads them, streaming: a page keeps at most
one page of records in memory, and a page after a cursor stops reading as soon as it is full.
Paging is by record number (seq), so a page does not shift while records are appended.
Blocking (file reads, hashing): call from a worker thread.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hotlab.controller.anchor_check import verify_anchored
from hotlab.controller.archive import TimeRange
from hotlab.controller.audit import AuditRecord, iter_records
from hotlab.controller.cli.audit_anchors import TrailIdentity, find_anchors
from hotlab.controller.web.records_query import PAGE_SIZE


@dataclass(frozen=True, slots=True)
class AuditFilter:
    actor: str | None
    action: str | None
    #: Part of the target, any case: "cal-1" finds "cal-1" and "hotcell-1/cal-1".
    target: str | None
    period: TimeRange

    def matches(self, record: AuditRecord) -> bool:
        return (
            self.period.start_ns <= record.time_ns < self.period.end_ns
            and self.actor in (None, record.actor)
            and self.action in (None, record.action)
            and (self.target is None or self.target.casefold() in record.target.casefold())
        )


@dataclass(frozen=True, slots=True)
class TrailCheck:
    ok: bool
    #: The verdict in the words of `hotlab audit verify` (several lines when the chain is broken).
    summary: str
    #: The newest anchor of the trail, against which a truncation is measured; None when none was found.
    anchor: str | None
    #: What each anchor source gave.
    sources: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AuditLine:
    seq: int
    time: str
    actor: str
    action: str
    target: str
    old: str
    new: str
    reason: str


@dataclass(frozen=True, slots=True)
class AuditPage:
    #: Newest first.
    lines: tuple[AuditLine, ...]
    #: Cursors of the neighbouring pages: records older than `older_before`, newer than `newer_after`.
    older_before: int | None
    newer_after: int | None


def check_trail(path: Path, key: bytes | None, archive: Path | None) -> TrailCheck:
    """The chain and its anchors, verified as `hotlab audit verify` verifies them."""
    if not path.exists():
        return TrailCheck(
            False, f"No audit trail at {path}: nothing has been audited, or the trail was removed.", None, ()
        )
    search = find_anchors(TrailIdentity.of(path), archive=archive, broker=None)
    result = verify_anchored(path, key, search.anchors)
    anchor = None if result.newest is None else result.newest.describe()
    return TrailCheck(result.ok, result.summary(), anchor, search.tried)


def audit_page(path: Path, wanted: AuditFilter, *, before: int | None, after: int | None) -> AuditPage:
    """The matching records just older than `before` (or the newest), or just newer than `after`, newest first."""
    matching = (record for record in iter_records(path) if wanted.matches(record))
    if after is not None:
        return _newer(matching, after)
    return _older(matching, before)


def _older(matching: Iterator[AuditRecord], before: int | None) -> AuditPage:
    """The last PAGE_SIZE matches below `before`; reading stops at the first match at or past it."""
    kept: deque[AuditRecord] = deque(maxlen=PAGE_SIZE)
    seen = 0
    newer = False
    for record in matching:
        if before is not None and record.seq >= before:
            newer = True
            break
        kept.append(record)
        seen += 1
    lines = tuple(_line(r) for r in reversed(kept))
    return AuditPage(
        lines,
        older_before=kept[0].seq if seen > len(kept) else None,
        newer_after=kept[-1].seq if newer and kept else None,
    )


def _newer(matching: Iterator[AuditRecord], after: int) -> AuditPage:
    """The first PAGE_SIZE matches above `after`; reading stops once one more than a page is found."""
    page: list[AuditRecord] = []
    older = False
    for record in matching:
        if record.seq <= after:
            older = True
            continue
        page.append(record)
        if len(page) > PAGE_SIZE:
            break
    newer = len(page) > PAGE_SIZE
    page = page[:PAGE_SIZE]
    return AuditPage(
        tuple(_line(r) for r in reversed(page)),
        older_before=page[0].seq if older and page else None,
        newer_after=page[-1].seq if newer else None,
    )


def _line(record: AuditRecord) -> AuditLine:
    return AuditLine(
        seq=record.seq,
        time=record.time[:19].replace("T", " ") + " UTC",
        actor=record.actor,
        action=record.action,
        target=record.target,
        old=_plain(record.old_value),
        new=_plain(record.new_value),
        reason=record.reason,
    )


def _plain(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
