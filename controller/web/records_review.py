"""What the review page shows: the records awaiting review and the signatures made, as `hotlab review` reads them.

The same functions as the command (controller/signatures.py): `read_signatures` verifies the
audit chain with the HMAC key and keeps only the signatures it vouches for, `awaiting_review`
says what awaits review (ended procedures and results outside any procedure with no decision
signed as they are now), and each signature shown is re-hashed against the archive
(`check_signatures`), so a record changed since it was signed says so. Every signature shows
what 21 CFR 11.50 asks of a signed record: the signer's printed name, when, and the meaning.

Blocking (audit verification, SQLite): call from a worker thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hotlab.controller.archive import HistoryArchive, TimeRange
from hotlab.controller.signatures import (
    Signature,
    awaiting_review,
    awaits,
    check_signatures,
    read_signatures,
    record_kind,
    signatures_by_record,
    signed_record,
)
from hotlab.controller.web.records_qc import ResultLine, result_line
from hotlab.controller.web.records_query import utc_minute

#: Rows per page of each list.
REVIEW_PAGE_SIZE = 25


@dataclass(frozen=True, slots=True)
class ReviewFilter:
    """As `hotlab review list --device --test --since`."""

    device: str | None
    test: str | None
    period: TimeRange | None


@dataclass(frozen=True, slots=True)
class SignatureLine:
    """One signature as 21 CFR 11.50 asks a signed record to show it."""

    seq: int
    meaning: str
    printed_name: str
    signer: str
    role: str
    time: str
    comment: str


@dataclass(frozen=True, slots=True)
class AwaitingLine:
    msg_id: str
    kind: str
    time: str
    device: str
    #: The test of a result, or the procedure of a procedure record.
    what: str
    status: str
    verdict: str
    #: "review", or "approval" after a review alone.
    awaits: str
    signatures: tuple[SignatureLine, ...]
    #: A procedure's results, signed with it: what the reviewer checks.
    results: tuple[ResultLine, ...]


@dataclass(frozen=True, slots=True)
class SignedRecordLine:
    kind: str
    msg_id: str
    device: str
    what: str
    verdict: str
    #: unchanged, CHANGED since signing, or missing from the archive.
    state: str


@dataclass(frozen=True, slots=True)
class SignedLine:
    signature: SignatureLine
    records: tuple[SignedRecordLine, ...]


@dataclass(frozen=True, slots=True)
class ReviewPage:
    #: Why some or all signatures cannot be trusted (a broken chain, signatures that do not count).
    problems: tuple[str, ...]
    awaiting: tuple[AwaitingLine, ...]
    awaiting_total: int
    #: Signatures that count, newest first: one page of them.
    signed: tuple[SignedLine, ...]
    signed_total: int
    #: The signature just made (after a redirect from signing), when asked for by its audit record number.
    just_signed: SignedLine | None


def read_review(
    archive_path: Path | None,
    audit_path: Path,
    audit_key: bytes | None,
    wanted: ReviewFilter,
    *,
    awaiting_page: int,
    signed_page: int,
    just_signed: int | None,
) -> ReviewPage:
    """One page of what awaits review and of the signatures made. Blocking: call from a worker thread."""
    ledger = read_signatures(audit_path, audit_key)
    problems = ([] if ledger.chain.ok else [ledger.chain.summary()]) + ledger.uncounted()
    if archive_path is None or not archive_path.is_file():
        problems.append(f"No history archive at {archive_path}: nothing can be reviewed.")
        return ReviewPage(tuple(problems), (), 0, (), len(ledger.valid), None)
    by_record = signatures_by_record(ledger.valid)
    newest_first = list(reversed(ledger.valid))
    shown = _page(newest_first, signed_page)
    with HistoryArchive(archive_path, read_only=True) as archive:
        pending = awaiting_review(archive, ledger.valid, period=wanted.period, device=wanted.device, test=wanted.test)
        awaiting = [
            _awaiting(p, by_record.get(signed_record(p), []), _results_of(archive, p))
            for p in _page(pending, awaiting_page)
        ]
        signed = [_signed(archive, s) for s in shown]
        just = next((s for s in ledger.valid if s.seq == just_signed), None)
        just_line = None if just is None else _signed(archive, just)
    return ReviewPage(tuple(problems), tuple(awaiting), len(pending), tuple(signed), len(newest_first), just_line)


def _page(rows: Sequence[Any], page: int) -> Sequence[Any]:
    return rows[page * REVIEW_PAGE_SIZE : (page + 1) * REVIEW_PAGE_SIZE]


def _what(payload: Mapping[str, Any]) -> str:
    return str(payload.get("procedure") if record_kind(payload) == "qc_procedure" else payload.get("test"))


def _signature_line(signature: Signature) -> SignatureLine:
    return SignatureLine(
        seq=signature.seq,
        meaning=signature.meaning,
        printed_name=signature.printed_name,
        signer=signature.signer,
        role=signature.role,
        time=utc_minute(signature.time_ns),
        comment=signature.comment or "",
    )


def _results_of(archive: HistoryArchive, payload: Mapping[str, Any]) -> tuple[ResultLine, ...]:
    found = (archive.get(str(msg_id)) for msg_id in payload.get("results") or [])
    return tuple(result_line(result) for result in found if result is not None)


def _awaiting(payload: Mapping[str, Any], signed: list[Signature], results: tuple[ResultLine, ...]) -> AwaitingLine:
    return AwaitingLine(
        msg_id=str(payload["msg_id"]),
        kind=str(record_kind(payload)),
        time=utc_minute(int(payload["time_ns"])),
        device=str(payload.get("device")),
        what=_what(payload),
        status=str(payload.get("status") or ""),
        verdict=str(payload.get("verdict") or "-"),
        awaits=awaits(signed) or "",
        signatures=tuple(_signature_line(s) for s in signed),
        results=results,
    )


def _signed(archive: HistoryArchive, signature: Signature) -> SignedLine:
    """A signature with each record it signs as the archive holds it now."""
    problems = {p.record: p.problem for p in check_signatures([signature], archive)}
    records = []
    for record in signature.records:
        payload = archive.get(record.msg_id) or {}
        problem = problems.get(record)
        state = "unchanged" if problem is None else "missing" if not payload else "CHANGED since signing"
        records.append(
            SignedRecordLine(
                kind=record.kind,
                msg_id=record.msg_id,
                device=str(payload.get("device") or "-"),
                what=_what(payload) if payload else "-",
                verdict=str(payload.get("verdict") or "-"),
                state=state,
            )
        )
    return SignedLine(_signature_line(signature), tuple(records))
