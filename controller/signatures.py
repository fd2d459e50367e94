"""Electronic signatures of QC records: who signed which exact records, when, and what the signature means.

Why: 21 CFR 11.50 asks that a signed record show the signer's printed name, the date and time,
and the meaning of the signature; 11.70 that the signature be linked to its record so it cannot
be moved to another or the record changed unnoticed; 11.200 that signing take two components
(the username and the signer's own password, never a shared MQTT command token); EU GMP Annex
11 §14 the same for signatures in a computerised system. So a signature is one `record.signed`
record of the hash-chained audit trail (controller/audit.py) holding the signer's username,
printed name and role, the meaning, an optional comment, and for each record signed its kind,
msg_id and the SHA-256 of its payload as archived (controller/archive.py), serialised as
`audit.canonical_json` (sorted keys, no spaces, UTF-8). Re-hashing the archived payloads later
(`check_signatures`, `hotlab review verify`) shows any record changed or removed since.

Signing the end record of a procedure (qc_procedure) also signs each qc_result it lists, so the
verdicts reviewed are bound to the signature, not only their ids. What awaits review: ended
procedures, and results that belong to no procedure, with no decision (approved or rejected)
signed as they are now; one only `reviewed` awaits its approval.

A signature counts only as far as the trail vouches for it (`read_signatures`): the chain is
verified first (with the HMAC key: without it, anyone able to write the file could append a
signature with fresh hashes), entries after its first break are ignored and reported, and a
signature whose signer was not, at that point of the trail, an enabled qc_officer or admin added
by a `user.add` record (controller/users.py) is reported as invalid. Signing needs the key, so
that every signature written can be verified.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from hotlab.controller import archive_reads
from hotlab.controller.archive import OPEN_END_NS, HistoryArchive, TimeRange
from hotlab.controller.archive_reads import Scope
from hotlab.controller.audit import (
    RECORD_SIGNED,
    USER_ADD,
    USER_DISABLE,
    AuditRecord,
    VerifyResult,
    canonical_json,
    iter_records,
    verify_chain,
)
from hotlab.controller.users import ACCOUNT_TARGET_PREFIX, Credentials, UserStore
from hotlab.errors import HotlabError, InputError

#: What each signature meaning states; a rejection must say why (its comment).
MEANINGS: dict[str, str] = {
    "reviewed": "checked for completeness and correctness (a review, not yet a decision)",
    "approved": "accepted as the QC record of the device: it may be used on the strength of it",
    "rejected": "not accepted: the QC record does not stand (the comment says why)",
}
#: The meanings that settle a record: after one of them it no longer awaits review.
DECISIONS: tuple[str, ...] = ("approved", "rejected")
SIGNING_ROLES: tuple[str, ...] = ("qc_officer", "admin")
#: The record kinds a person reviews and signs.
REVIEW_KINDS: tuple[str, ...] = ("qc_procedure", "qc_result")
MAX_COMMENT_CHARS = 2000
_SCHEMA_TAG = re.compile(r"^hotlab\.([a-z_]+)/[0-9]+$")


class SigningError(InputError):
    """A signature that cannot be made as asked: unknown or unsignable record, bad meaning, missing comment, no key."""


class UntrustedTrail(HotlabError):
    """The audit chain that holds the signatures is broken: no signature is added after the break."""


@dataclass(frozen=True, slots=True)
class SignedRecord:
    """One record as signed: its kind, msg_id and the SHA-256 of its archived payload."""

    kind: str
    msg_id: str
    sha256: str

    def as_json(self) -> dict[str, str]:
        return {"kind": self.kind, "msg_id": self.msg_id, "sha256": self.sha256}


@dataclass(frozen=True, slots=True)
class Signature:
    """One `record.signed` audit record, read back."""

    seq: int
    time_ns: int
    time: str
    signer: str
    printed_name: str
    role: str
    meaning: str
    comment: str | None
    records: tuple[SignedRecord, ...]

    @classmethod
    def from_audit(cls, record: AuditRecord) -> Signature | None:
        """The signature an audit record holds; None for another action or a malformed one."""
        body = record.new_value
        if record.action != RECORD_SIGNED or not isinstance(body, Mapping):
            return None
        texts = [body.get(key) for key in ("signer", "printed_name", "role", "meaning")]
        comment = body.get("comment")
        entries = body.get("records")
        if not all(isinstance(t, str) for t in texts) or not isinstance(entries, list):
            return None
        if comment is not None and not isinstance(comment, str):
            return None
        records = []
        for entry in entries:
            values = [entry.get(k) if isinstance(entry, Mapping) else None for k in ("kind", "msg_id", "sha256")]
            if not all(isinstance(v, str) for v in values):
                return None
            records.append(SignedRecord(*(str(v) for v in values)))
        signer, printed_name, role, meaning = (str(t) for t in texts)
        return cls(
            record.seq, record.time_ns, record.time, signer, printed_name, role, meaning, comment, tuple(records)
        )

    def signs(self, record: SignedRecord) -> bool:
        return record in self.records


@dataclass(frozen=True, slots=True)
class SignatureProblem:
    """A signed record that is not, or no longer, in the archive as it was signed."""

    signature: Signature
    record: SignedRecord
    problem: str

    def describe(self) -> str:
        s = self.signature
        return (
            f"signature #{s.seq} ({s.meaning} by {s.signer}, {s.time}): {self.record.kind} {self.record.msg_id} "
            f"{self.problem}"
        )


def payload_sha256(payload: Mapping[str, Any]) -> str:
    """SHA-256 of a payload's canonical JSON: what a signature binds and `hotlab review verify` recomputes."""
    return hashlib.sha256(canonical_json(payload)).hexdigest()


def record_kind(payload: Mapping[str, Any]) -> str | None:
    """The message kind a payload's `schema` field names ("hotlab.qc_result/1" -> "qc_result")."""
    tag = payload.get("schema")
    found = _SCHEMA_TAG.match(tag) if isinstance(tag, str) else None
    return None if found is None else found.group(1)


def signed_record(payload: Mapping[str, Any]) -> SignedRecord:
    return SignedRecord(str(record_kind(payload)), str(payload["msg_id"]), payload_sha256(payload))


@dataclass(frozen=True, slots=True)
class InvalidSignature:
    """A `record.signed` entry of the verified trail that does not count, and why."""

    record: AuditRecord
    problem: str

    def describe(self) -> str:
        return (
            f"audit record #{self.record.seq} ({self.record.actor}, {self.record.time}) does not count: {self.problem}"
        )


@dataclass(frozen=True, slots=True)
class SignatureLedger:
    """The signatures the audit trail vouches for, oldest first, and those it does not."""

    chain: VerifyResult
    valid: list[Signature]
    #: Entries of the verified prefix whose signer could not sign then, or that do not parse.
    invalid: list[InvalidSignature]
    #: `record.signed` entries after the chain's first break: ignored, whatever they say.
    unverified: list[AuditRecord]

    def uncounted(self) -> list[str]:
        """One line for each signature entry that does not count: those after the break, then the invalid."""
        return [
            f"audit record #{r.seq} ({r.actor}, {r.time}) is a signature after the chain's break: ignored"
            for r in self.unverified
        ] + [entry.describe() for entry in self.invalid]


def read_signatures(audit_path: Path, key: bytes | None) -> SignatureLedger:
    """The trail's signatures that count: `verify_chain` first (with `key`, the HMAC too), then only
    the verified records, each signature checked against the accounts the trail shows at that point.

    Records appended after the verification are neither counted nor reported: they were not checked.
    A report over years reads them one at a time instead (`counted_signatures`, `unverified_signatures`).
    """
    chain = verify_chain(audit_path, key)
    valid: list[Signature] = []
    invalid: list[InvalidSignature] = []
    for found in counted_signatures(audit_path, chain):
        if isinstance(found, Signature):
            valid.append(found)
        else:
            invalid.append(found)
    return SignatureLedger(chain, valid, invalid, unverified_signatures(audit_path, chain))


def counted_signatures(audit_path: Path, chain: VerifyResult) -> Iterator[Signature | InvalidSignature]:
    """Each `record.signed` entry of the intact prefix `chain` verified, oldest first: a Signature that
    counts, or an InvalidSignature saying why not. Reads the trail as it goes: memory does not grow with it."""
    # Every line of the intact prefix parses, so the first `chain.records` records are exactly that prefix.
    return _check_signers(islice(iter_records(audit_path), chain.records))


def unverified_signatures(audit_path: Path, chain: VerifyResult) -> list[AuditRecord]:
    """The `record.signed` entries after the chain's first break: ignored, whatever they say (none when intact)."""
    if chain.ok:
        return []
    return [r for r in islice(iter_records(audit_path), chain.records, None) if r.action == RECORD_SIGNED]


def _check_signers(records: Iterable[AuditRecord]) -> Iterator[Signature | InvalidSignature]:
    """Replay the account records (user.add, user.disable) and judge each signature at its place in the trail."""
    accounts: dict[str, Mapping[str, Any]] = {}
    disabled: set[str] = set()
    for record in records:
        if record.action == USER_ADD and isinstance(record.new_value, Mapping):
            accounts.setdefault(str(record.new_value.get("username")), record.new_value)
        elif record.action == USER_DISABLE:
            disabled.add(record.target.removeprefix(ACCOUNT_TARGET_PREFIX))
        elif record.action == RECORD_SIGNED:
            signature = Signature.from_audit(record)
            if signature is None:
                yield InvalidSignature(record, "it is not a well-formed signature")
            elif problem := _signer_problem(
                signature, record, accounts.get(signature.signer), signature.signer in disabled
            ):
                yield InvalidSignature(record, problem)
            else:
                yield signature


def _signer_problem(
    signature: Signature, record: AuditRecord, account: Mapping[str, Any] | None, disabled: bool
) -> str | None:
    who = signature.signer
    if record.actor != who:
        return f"written by {record.actor!r} for the signer {who!r}"
    if account is None:
        return f"no user.add record of {who!r} precedes it"
    if disabled:
        return f"{who!r} was disabled before it"
    if account.get("role") not in SIGNING_ROLES:
        return f"{who!r} was added as {account.get('role')}; only a {' or '.join(SIGNING_ROLES)} signs"
    if (signature.role, signature.printed_name) != (account.get("role"), account.get("printed_name")):
        return (
            f"it names {signature.printed_name!r} ({signature.role}), but {who!r} was added as "
            f"{account.get('printed_name')!r} ({account.get('role')})"
        )
    return None


def records_to_sign(archive: HistoryArchive, record_ids: Sequence[str]) -> list[tuple[dict[str, Any], SignedRecord]]:
    """The archived records a signature of `record_ids` covers, in order, each once: the records
    named, and after an ended procedure its results. SigningError if any cannot be signed."""
    if not record_ids:
        raise SigningError("name at least one record (its msg_id) to sign")
    chosen: dict[str, tuple[dict[str, Any], SignedRecord]] = {}

    def take(msg_id: str, why: str) -> dict[str, Any]:
        payload = archive.get(msg_id)
        if payload is None:
            raise SigningError(f"no record {msg_id!r} in the archive {archive.path}{why}")
        kind = record_kind(payload)
        if kind not in REVIEW_KINDS:
            raise SigningError(f"record {msg_id!r} is a {kind}; only {' and '.join(REVIEW_KINDS)} records are signed")
        chosen.setdefault(msg_id, (payload, signed_record(payload)))
        return payload

    for msg_id in record_ids:
        payload = take(msg_id, "")
        if record_kind(payload) != "qc_procedure":
            continue
        if payload.get("status") == "started":
            raise SigningError(
                f"procedure record {msg_id!r} is its start; sign the record that ends procedure "
                f"{payload.get('procedure_id')} (hotlab review list shows it)"
            )
        for result_id in payload.get("results") or []:
            take(str(result_id), f", a result of procedure {payload.get('procedure_id')}")
    return list(chosen.values())


def sign(
    *,
    store: UserStore,
    archive: HistoryArchive,
    credentials: Credentials,
    record_ids: Sequence[str],
    meaning: str,
    comment: str | None = None,
) -> Signature:
    """Check the signer's password and role, then write one `record.signed` audit record; the signature.

    Refused: a store whose audit log has no HMAC key, a broken chain, an unknown meaning, a
    rejection without a comment, a record not in the archive or not reviewable, a signer who is
    not a QC officer or admin (audited, like a wrong password), and a record this signer already
    signed with this meaning as it is now (another person, or another meaning, may sign it too).
    """
    key = store.audit.key
    if key is None:
        raise SigningError("signing needs the audit HMAC key: a signature written without it could not be verified")
    if meaning not in MEANINGS:
        raise SigningError(f"meaning {meaning!r} is not known; allowed: {', '.join(MEANINGS)}")
    note = " ".join((comment or "").split()) or None
    if note is not None and len(note) > MAX_COMMENT_CHARS:
        raise SigningError(f"the comment has {len(note)} characters; at most {MAX_COMMENT_CHARS} are kept")
    if meaning == "rejected" and note is None:
        raise SigningError("a rejection needs a comment saying why (--comment)")
    covered = records_to_sign(archive, record_ids)
    ledger = read_signatures(store.audit.path, key)
    if not ledger.chain.ok:
        raise UntrustedTrail(
            f"{ledger.chain.summary().splitlines()[0]}: a signature after the break would not count "
            "(hotlab audit verify)"
        )
    signer = store.authorise(credentials, purpose=f"signing {', '.join(record_ids)} as {meaning}", roles=SIGNING_ROLES)
    named = set(record_ids)
    for earlier in ledger.valid:
        if earlier.signer != signer.username or earlier.meaning != meaning:
            continue
        for _, record in covered:
            if record.msg_id in named and earlier.signs(record):
                raise SigningError(
                    f"{signer.username} signed {record.kind} {record.msg_id} as {meaning} already "
                    f"(audit record #{earlier.seq}, {earlier.time})"
                )
    devices = sorted({str(payload.get("device")) for payload, _ in covered})
    entry = store.audit.append(
        actor=signer.username,
        action=RECORD_SIGNED,
        target=", ".join(devices),
        reason=note or f"{meaning}: {MEANINGS[meaning]}",
        new_value={
            "signer": signer.username,
            "printed_name": signer.printed_name,
            "role": signer.role,
            "meaning": meaning,
            "comment": note,
            "records": [record.as_json() for _, record in covered],
        },
    )
    signature = Signature.from_audit(entry)
    assert signature is not None
    return signature


async def sign_async(
    *,
    store: UserStore,
    archive: HistoryArchive,
    credentials: Credentials,
    record_ids: Sequence[str],
    meaning: str,
    comment: str | None = None,
) -> Signature:
    """`sign` on a worker thread: argon2, SQLite and the audit fsync must not stall an event loop."""
    return await asyncio.to_thread(
        lambda: sign(
            store=store,
            archive=archive,
            credentials=credentials,
            record_ids=record_ids,
            meaning=meaning,
            comment=comment,
        )
    )


def check_signatures(found: Iterable[Signature], archive: HistoryArchive) -> list[SignatureProblem]:
    """Every signed record that is missing from the archive or whose payload no longer hashes as signed."""
    problems: list[SignatureProblem] = []
    for signature in found:
        for record in signature.records:
            payload = archive.get(record.msg_id)
            if payload is None:
                problems.append(SignatureProblem(signature, record, "is no longer in the archive"))
            elif (now := payload_sha256(payload)) != record.sha256:
                problems.append(
                    SignatureProblem(
                        signature,
                        record,
                        f"changed since it was signed: SHA-256 now {now}, signed {record.sha256}",
                    )
                )
    return problems


def signatures_by_record(found: Iterable[Signature]) -> dict[SignedRecord, list[Signature]]:
    """The signatures of each record as signed (kind, msg_id and hash), oldest first."""
    by_record: dict[SignedRecord, list[Signature]] = {}
    for signature in found:
        for record in signature.records:
            by_record.setdefault(record, []).append(signature)
    return by_record


def awaits(signatures_of_record: Iterable[Signature]) -> str | None:
    """What a record's signatures (of it as it is now) leave to do: "review", "approval", or None once decided."""
    return still_to_do(s.meaning for s in signatures_of_record)


def still_to_do(meanings: Iterable[str]) -> str | None:
    """What the meanings signed of a record as it is now leave to do: "review", "approval", or None once decided."""
    signed = set(meanings)
    if signed & set(DECISIONS):
        return None
    return "approval" if signed else "review"


def awaiting_review(
    archive: HistoryArchive,
    found: Iterable[Signature],
    *,
    period: TimeRange | None = None,
    device: str | None = None,
    test: str | None = None,
) -> list[dict[str, Any]]:
    """Ended procedures and results outside any procedure, oldest first, with no decision signed as they are now.

    Read in chunks, filtered in SQL: memory holds what awaits, never the period's every record.

    `test` matches a result's `test` or a procedure's `procedure` (e.g. "daily_constancy").
    """
    by_record = signatures_by_record(found)
    scope = Scope(period or TimeRange(0, OPEN_END_NS))
    device_sql, device_params = ("device = ?", [device]) if device is not None else ("1", [])
    ended = "COALESCE(json_extract(payload, '$.status'), '') != 'started'"
    named = "json_extract(payload, '$.procedure') = ?" if test is not None else "1"
    procedures = archive_reads.stream(
        archive,
        "qc_procedure",
        scope,
        f"{device_sql} AND {ended} AND {named}",
        [*device_params, *([test] if test else [])],
    )
    loose = "COALESCE(json_extract(payload, '$.procedure_id'), '') = ''"
    test_sql = "test = ?" if test is not None else "1"
    results = archive_reads.stream(
        archive,
        "qc_result",
        scope,
        f"{device_sql} AND {test_sql} AND {loose}",
        [*device_params, *([test] if test else [])],
    )
    in_order = heapq.merge(
        (row[0] for row in procedures), (row[0] for row in results), key=lambda p: (int(p["time_ns"]), str(p["msg_id"]))
    )
    return [p for p in in_order if awaits(by_record.get(signed_record(p), ())) is not None]
