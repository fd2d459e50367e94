"""Append-only, hash-chained audit trail of control actions and manual QC entries.

Why: EU GMP Annex 11 §9 and 21 CFR Part 11 §11.10(e) ask for a secure, computer-generated,
time-stamped audit trail that records who did what, when, and (for changes) why, and that
cannot be altered unnoticed. Each record is one JSON line; its `hash` is SHA-256 over the
canonical JSON of the record itself (everything but `hash` and `mac`), and the record carries
the previous record's hash in `prev_hash` (the first carries `GENESIS_HASH`). Editing,
deleting, inserting or reordering any line therefore breaks the chain at that line.

An optional HMAC key (see `load_hmac_key`) adds `mac` = HMAC-SHA256(key, hash), so that even
rewriting the whole chain with fresh hashes is detectable by anyone holding the key; the
threat model is in docs/audit-and-report.md.

A chain cut short at its end is still an intact chain, so the controller publishes the head
after each append as an anchor (controller/audit_anchor.py), and controller/anchor_check.py
checks the trail against every anchor of it while `verify_chain` streams the file (`on_record`).

Durability: a record is written with one `write` on an O_APPEND descriptor and fsynced
before `append` returns, under a process lock and an `flock`, so concurrent appenders (threads,
asyncio tasks via `append_async`, even other processes) never interleave. A crash mid-write
can leave a torn last line (no trailing newline); `verify_chain` reports it, and the next
`append` moves the fragment to `<log>.torn`, truncates it and records that it did so in the
chain, because an append that never returned was never confirmed to the operator.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import hmac
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from hotlab.controller.messages import iso_utc
from hotlab.errors import HotlabError, InputError

SCHEMA = "hotlab.audit/1"
#: `prev_hash` of the first record: a fixed, documented value rather than zeros, so an
#: empty-string or all-zero hash forged into line 1 is also a mismatch.
GENESIS_HASH = hashlib.sha256(b"hotlab audit trail genesis v1").hexdigest()

#: Control actions and manual QC entries the controller records. Any dotted lower-case
#: name is accepted so new commands need no change here; these are the ones in use.
ELUTION_START = "elution.start"
ELUTION_ABORT = "elution.abort"
FAULT_ACKNOWLEDGE = "fault.acknowledge"
QC_MANUAL_ENTRY = "qc.manual_entry"
TORN_TAIL_DISCARDED = "audit.torn_tail_discarded"
#: Electronic signatures of QC records (controller/signatures.py) and changes to the accounts
#: that make them (controller/users.py); none of these records holds a password or its hash.
RECORD_SIGNED = "record.signed"
USER_ADD = "user.add"
USER_PASSWD = "user.passwd"
USER_DISABLE = "user.disable"
#: A password check that failed, and the lock that consecutive failures put on an account.
USER_AUTH_FAILED = "user.auth_failed"
USER_LOCK = "user.lock"
#: Signing in to and out of the web panel (controller/web/).
USER_LOGIN = "user.login"
USER_LOGOUT = "user.logout"

KEY_ENV = "HOTLAB_AUDIT_KEY"
KEY_FILE_ENV = "HOTLAB_AUDIT_KEY_FILE"
#: RFC 2104 §3: keys shorter than the hash output (32 bytes for SHA-256) weaken the MAC.
MIN_KEY_BYTES = 32

_ACTION_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$")
_HASH = re.compile(r"^[0-9a-f]{64}$")
_TAIL_CHUNK = 64 * 1024
_REQUIRED_FIELDS: dict[str, type] = {
    "schema": str,
    "seq": int,
    "time_ns": int,
    "time": str,
    "actor": str,
    "action": str,
    "target": str,
    "reason": str,
    "prev_hash": str,
    "hash": str,
}


class AuditError(HotlabError):
    """Base of audit-trail errors."""


class AuditEntryError(AuditError, InputError):
    """An entry was refused before writing: missing who/what/why, bad action name, non-JSON value."""


class AuditLogCorrupt(AuditError):
    """The last record of the log cannot be chained onto; nothing was written. Run `hotlab audit verify`."""


class AuditKeyError(AuditError, InputError):
    """The configured HMAC key is missing, unreadable or too short."""


def canonical_json(value: Any) -> bytes:
    """The one byte serialisation that is hashed: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def record_hash(body: dict[str, Any]) -> str:
    """SHA-256 over the canonical JSON of a record without its `hash` and `mac`."""
    unsigned = {k: v for k, v in body.items() if k not in ("hash", "mac")}
    return hashlib.sha256(canonical_json(unsigned)).hexdigest()


def record_mac(key: bytes, hash_hex: str) -> str:
    """HMAC-SHA256 over the record hash; the hash already covers the content and `prev_hash`."""
    return hmac.new(key, hash_hex.encode("ascii"), hashlib.sha256).hexdigest()


def load_hmac_key(environ: dict[str, str] | None = None) -> bytes | None:
    """The HMAC key from `$HOTLAB_AUDIT_KEY_FILE` (preferred: keeps it out of `ps`/env dumps) or `$HOTLAB_AUDIT_KEY`.

    Returns None when neither is set (chain without HMAC).
    """
    env = os.environ if environ is None else environ
    key_file = env.get(KEY_FILE_ENV)
    if key_file:
        try:
            key = Path(key_file).read_bytes().strip()
        except OSError as exc:
            raise AuditKeyError(f"cannot read audit HMAC key file {key_file}: {exc.strerror}") from None
        source = f"key file {key_file}"
    elif env.get(KEY_ENV):
        key = env[KEY_ENV].encode()
        source = f"${KEY_ENV}"
    else:
        return None
    if len(key) < MIN_KEY_BYTES:
        raise AuditKeyError(f"audit HMAC key from {source} has {len(key)} bytes; at least {MIN_KEY_BYTES} are needed")
    return key


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audited action: who (`actor`), what (`action` on `target`, `old_value` -> `new_value`), when, why."""

    seq: int
    time_ns: int
    actor: str
    action: str
    target: str
    reason: str
    old_value: Any
    new_value: Any
    prev_hash: str
    hash: str
    mac: str | None = None
    time: str = field(default="")

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "schema": SCHEMA,
            "seq": self.seq,
            "time_ns": self.time_ns,
            "time": self.time or iso_utc(self.time_ns),
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "reason": self.reason,
            "old_value": self.old_value,
            "new_value": self.new_value,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }
        if self.mac is not None:
            body["mac"] = self.mac
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> AuditRecord:
        return cls(
            seq=body["seq"],
            time_ns=body["time_ns"],
            actor=body["actor"],
            action=body["action"],
            target=body["target"],
            reason=body["reason"],
            old_value=body.get("old_value"),
            new_value=body.get("new_value"),
            prev_hash=body["prev_hash"],
            hash=body["hash"],
            mac=body.get("mac"),
            time=body["time"],
        )


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True, slots=True)
class Difference:
    """One thing that is not what the chain says it must be."""

    field: str
    expected: str
    found: str


@dataclass(frozen=True, slots=True)
class ChainBreak:
    """The first line at which the chain stops being trustworthy, and why."""

    line: int
    problem: str
    differences: tuple[Difference, ...] = ()

    def describe(self) -> str:
        text = f"line {self.line}: {self.problem}"
        for diff in self.differences:
            text += f"\n  {diff.field}: expected {diff.expected}, found {diff.found}"
        return text


def first_record_hash(path: str | Path) -> str | None:
    """The `hash` of the trail's first line, its identity; None if there is no readable first record."""
    try:
        with Path(path).open("rb") as fh:
            first = fh.readline()
    except FileNotFoundError:
        return None
    try:
        body = json.loads(first.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    digest = body.get("hash") if isinstance(body, dict) else None
    return digest if is_hash(digest) else None


def is_hash(value: object) -> TypeGuard[str]:
    """True for a SHA-256 digest as the trail writes one: 64 lower-case hex digits."""
    return isinstance(value, str) and _HASH.match(value) is not None


def short_hash(value: str) -> str:
    """A hash as messages show it: its first 16 digits, enough to tell two apart by eye."""
    return value if len(value) <= 20 else f"{value[:16]}…"


@dataclass(frozen=True, slots=True)
class VerifyResult:
    path: Path
    records: int
    head_hash: str
    mac_checked: bool
    mac_present: bool
    broken: ChainBreak | None

    @property
    def ok(self) -> bool:
        return self.broken is None

    def summary(self) -> str:
        if self.broken is not None:
            return f"audit trail {self.path} is BROKEN after {self.records} intact record(s)\n{self.broken.describe()}"
        if self.mac_checked:
            mac = "HMAC verified"
        elif self.mac_present:
            mac = "HMAC present but NOT checked (no key configured)"
        else:
            mac = "no HMAC"
        return f"audit trail {self.path} OK: {self.records} record(s), head {self.head_hash}, {mac}"


def _structure_problem(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "is not a JSON object"
    for name, kind in _REQUIRED_FIELDS.items():
        if name not in body:
            return f"lacks the field {name!r}"
        if not isinstance(body[name], kind) or isinstance(body[name], bool):
            return f"field {name!r} has type {type(body[name]).__name__}, expected {kind.__name__}"
    if body["schema"] != SCHEMA:
        return f"has schema {body['schema']!r}, expected {SCHEMA!r}"
    return None


def _check_line(
    line_no: int, raw: bytes, prev_hash: str, key: bytes | None
) -> tuple[dict[str, Any] | None, ChainBreak | None]:
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, ChainBreak(line_no, f"is not valid UTF-8 JSON ({exc})")
    problem = _structure_problem(body)
    if problem is not None:
        return None, ChainBreak(line_no, f"record {problem}")
    diffs: list[Difference] = []
    if body["seq"] != line_no:
        diffs.append(Difference("seq", str(line_no), str(body["seq"])))
    if body["prev_hash"] != prev_hash:
        diffs.append(
            Difference(
                "prev_hash",
                f"{short_hash(prev_hash)} (hash of line {line_no - 1})"
                if line_no > 1
                else f"{short_hash(prev_hash)} (genesis)",
                short_hash(body["prev_hash"]),
            )
        )
    recomputed = record_hash(body)
    if body["hash"] != recomputed:
        diffs.append(
            Difference("hash", f"{short_hash(recomputed)} (recomputed from the content)", short_hash(body["hash"]))
        )
    if key is not None:
        mac = body.get("mac")
        expected_mac = record_mac(key, body["hash"])
        if not isinstance(mac, str):
            diffs.append(Difference("mac", "an HMAC (a key is configured)", "none"))
        elif not hmac.compare_digest(mac, expected_mac):
            diffs.append(
                Difference("mac", f"{short_hash(expected_mac)} (HMAC with the configured key)", short_hash(mac))
            )
    if not diffs:
        return body, None
    fields = {d.field for d in diffs}
    if "hash" in fields:
        problem = "the record's content does not match its hash: it was altered after it was written"
    elif "prev_hash" in fields or "seq" in fields:
        problem = "the record does not follow the previous line: a record was deleted, inserted or moved here"
    else:
        problem = "the record's HMAC is wrong: the chain was rewritten without the key, or the key differs"
    return body, ChainBreak(line_no, problem, tuple(diffs))


def verify_chain(
    path: str | Path, key: bytes | None = None, on_record: Callable[[int, str], None] | None = None
) -> VerifyResult:
    """Walk the whole log once (streaming) and return the first break, if any.

    `on_record(seq, hash)` is called for each record of the intact chain as it passes, so the
    anchors of the trail are checked in the same single pass (controller/anchor_check.py).
    A missing file is an empty, intact trail (nothing has been audited yet).
    """
    log_path = Path(path)
    prev_hash = GENESIS_HASH
    count = 0
    mac_present = False

    def result(broken: ChainBreak | None) -> VerifyResult:
        return VerifyResult(log_path, count, prev_hash, key is not None, mac_present, broken)

    if not log_path.exists():
        return result(None)
    with log_path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.endswith(b"\n"):
                return result(
                    ChainBreak(
                        line_no,
                        f"is a torn last line ({len(raw)} bytes, no newline): a crash interrupted an append; "
                        "that action was never confirmed, and the next append will set the fragment aside",
                    )
                )
            body, broken = _check_line(line_no, raw[:-1], prev_hash, key)
            if broken is not None:
                return result(broken)
            assert body is not None
            mac_present = mac_present or "mac" in body
            prev_hash = body["hash"]
            count += 1
            if on_record is not None:
                on_record(line_no, prev_hash)
    return result(None)


def iter_records(path: str | Path) -> Iterator[AuditRecord]:
    """Every record that parses, in file order, for display; trust comes from `verify_chain`, not from this."""
    log_path = Path(path)
    if not log_path.exists():
        return
    with log_path.open("rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                return
            try:
                body = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if _structure_problem(body) is None:
                yield AuditRecord.from_json(body)


# --------------------------------------------------------------------------- appending


def _require_text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise AuditEntryError(f"audit entry needs a non-empty {name}")
    return value.strip()


def _read_tail(fd: int) -> tuple[bytes, int]:
    """(last complete line without its newline, or b""; offset where a torn fragment starts, or -1).

    Reads backwards in chunks, so the cost does not grow with the length of the log.
    """
    buf = b""
    pos = os.fstat(fd).st_size
    if pos == 0:
        return b"", -1
    while True:
        step = min(_TAIL_CHUNK, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        last_nl = buf.rfind(b"\n")
        if last_nl < 0:
            if pos == 0:
                return b"", 0
            continue
        prev_nl = buf.rfind(b"\n", 0, last_nl)
        if prev_nl >= 0 or pos == 0:
            torn_at = pos + last_nl + 1 if last_nl + 1 < len(buf) else -1
            return buf[prev_nl + 1 : last_nl], torn_at


class AuditLog:
    """The audit trail file. Thread-safe; use `append_async` from the event loop."""

    def __init__(self, path: str | Path, *, key: bytes | None = None) -> None:
        self.path = Path(path)
        self.key = key
        self._lock = threading.Lock()

    def append(
        self,
        *,
        actor: str,
        action: str,
        target: str,
        reason: str,
        old_value: Any = None,
        new_value: Any = None,
        time_ns: int | None = None,
    ) -> AuditRecord:
        """Write one record durably (fsynced) and return it; raises before writing anything on bad input."""
        actor = _require_text("actor (who)", actor)
        action = _require_text("action (what)", action)
        target = _require_text("target (device or station)", target)
        # Annex 11 §9: for a change of GMP-relevant data the reason should be documented.
        reason = _require_text("reason (why)", reason)
        if not _ACTION_NAME.match(action):
            raise AuditEntryError(f"action {action!r} must be a dotted lower-case name such as {ELUTION_START!r}")
        try:
            canonical_json([old_value, new_value])
        except (TypeError, ValueError) as exc:
            raise AuditEntryError(f"old/new values must be plain JSON (no NaN): {exc}") from None
        stamp = time.time_ns() if time_ns is None else int(time_ns)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if created:
                    _fsync_dir(self.path.parent)
                prev_hash, seq = self._chain_head(fd)
                record = self._build(seq, stamp, actor, action, target, reason, old_value, new_value, prev_hash)
                _write_all(fd, canonical_json(record.to_json()) + b"\n")
                os.fsync(fd)
                return record
            finally:
                os.close(fd)  # also releases the flock

    async def append_async(self, **entry: Any) -> AuditRecord:
        """`append` on a worker thread, so the fsync never stalls the event loop."""
        return await asyncio.to_thread(lambda: self.append(**entry))

    def _build(
        self,
        seq: int,
        stamp: int,
        actor: str,
        action: str,
        target: str,
        reason: str,
        old_value: Any,
        new_value: Any,
        prev_hash: str,
    ) -> AuditRecord:
        draft = AuditRecord(
            seq, stamp, actor, action, target, reason, old_value, new_value, prev_hash, "", None, iso_utc(stamp)
        )
        digest = record_hash(draft.to_json())
        mac = record_mac(self.key, digest) if self.key is not None else None
        return AuditRecord(
            seq, stamp, actor, action, target, reason, old_value, new_value, prev_hash, digest, mac, draft.time
        )

    def _chain_head(self, fd: int) -> tuple[str, int]:
        """(hash, next seq) of the last record, after setting aside a torn tail if a crash left one."""
        last, torn_at = _read_tail(fd)
        prev_hash, seq = self._parse_head(last)
        if torn_at < 0:
            return prev_hash, seq
        fragment = self._set_aside_torn_tail(fd, torn_at)
        note = self._build(
            seq,
            time.time_ns(),
            "hotlab",
            TORN_TAIL_DISCARDED,
            str(self.path),
            "a crash interrupted a previous append; that action was never confirmed",
            None,
            {
                "bytes": len(fragment),
                "sha256": hashlib.sha256(fragment).hexdigest(),
                "moved_to": self.path.name + ".torn",
            },
            prev_hash,
        )
        _write_all(fd, canonical_json(note.to_json()) + b"\n")
        return note.hash, seq + 1

    def _parse_head(self, last: bytes) -> tuple[str, int]:
        if not last:
            return GENESIS_HASH, 1
        try:
            body = json.loads(last.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise AuditLogCorrupt(
                f"last record of {self.path} is not valid JSON; refusing to chain onto it (run `hotlab audit verify`)"
            ) from None
        problem = _structure_problem(body)
        if problem is None and record_hash(body) != body["hash"]:
            problem = "does not match its own hash"
        if problem is not None:
            raise AuditLogCorrupt(
                f"last record of {self.path} {problem}; refusing to chain onto it (run `hotlab audit verify`)"
            )
        return body["hash"], body["seq"] + 1

    def _set_aside_torn_tail(self, fd: int, torn_at: int) -> bytes:
        """Copy the fragment to `<log>.torn` (fsynced) before truncating, so no byte is ever thrown away."""
        fragment = os.pread(fd, os.fstat(fd).st_size - torn_at, torn_at)
        quarantine = self.path.with_name(self.path.name + ".torn")
        with quarantine.open("ab") as fh:
            fh.write(fragment + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.ftruncate(fd, torn_at)
        return fragment


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    """Make a newly created log's directory entry durable too (POSIX: fsync of the file alone is not enough)."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
