"""Review and sign-off: signatures bind the exact archived records by SHA-256, with who, printed name and meaning.

The hashes are recomputed here from the payload text the archive holds, with the standard
library only: json.dumps(sort_keys=True, separators=(",", ":")) over UTF-8 (every payload here
is ASCII, so ensure_ascii makes no difference), then SHA-256.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hotlab.controller.archive import HistoryArchive
from hotlab.controller.audit import RECORD_SIGNED, USER_AUTH_FAILED, AuditLog, iter_records, verify_chain
from hotlab.controller.cli.main import main as hotlab
from hotlab.controller.messages import Message, qc_procedure_message
from hotlab.controller.qc.limits import DEFAULT_LIMITS
from hotlab.controller.qc.result import QcResult, Verdict
from hotlab.controller.signatures import (
    Signature,
    SigningError,
    UntrustedTrail,
    awaiting_review,
    check_signatures,
    read_signatures,
    sign,
    sign_async,
)
from hotlab.controller.users import AccessDenied, Credentials, UserStore

SITE, STATION, DEVICE = "hotlab-a", "hot-cell-1", "crc-1"
HOUR_NS = 3_600_000_000_000
T0 = 1_793_520_000_000_000_000  # 2026-11-01T08:00:00Z
ADMIN_PW = "admin passphrase one"
QC_PW = "qc officer passphrase"
QC2_PW = "second officer phrase"
OPERATOR_PW = "operator passphrase"
#: The audit HMAC key (at least 32 bytes, RFC 2104 §3), and another that is not it.
KEY = b"hotlab review test key, 32 bytes or more"
OTHER_KEY = b"someone else's key, also 32 bytes long!!"


def signatures(audit_path: Path) -> list[Signature]:
    """The signatures that count, as read with the key."""
    return read_signatures(audit_path, KEY).valid


def archived_sha256(archive_path: Path, msg_id: str) -> str:
    """SHA-256 of the canonical JSON of the payload exactly as the archive's SQLite row holds it."""
    with sqlite3.connect(archive_path) as db:
        (text,) = db.execute("SELECT payload FROM message WHERE msg_id = ?", (msg_id,)).fetchone()
    canonical = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def result(test: str, time_ns: int, procedure_id: str | None, *, verdict: Verdict = "pass") -> Message:
    """A QC verdict as the engine builds it (QcResult.to_message), judged against the default limit."""
    return QcResult(
        test=test,
        verdict=verdict,
        measured=7.1e6,
        expected=7.0e6,
        deviation_pct=100 * (7.1e6 / 7.0e6 - 1),
        unit="Bq",
        limit=DEFAULT_LIMITS[test],
        value_judged=100 * (7.1e6 / 7.0e6 - 1),
        time_ns=time_ns,
        inputs={"source_id": "CS-137-A", "readings_bq": [7.1e6, 7.1e6, 7.1e6]},
        procedure_id=procedure_id,
    ).to_message(SITE, STATION, DEVICE)


def procedure(
    procedure_id: str, status: str, *, started_ns: int, ended_ns: int | None, results: list[str], verdict: str | None
) -> Message:
    return qc_procedure_message(
        SITE,
        STATION,
        DEVICE,
        procedure_id=procedure_id,
        procedure="daily_constancy",
        status=status,
        started_by={"user": "op", "role": "operator"},
        started_ns=started_ns,
        ended_ns=ended_ns,
        source_id="CS-137-A",
        elution_id=None,
        generator=None,
        reason="daily check",
        settings=["Cs-137", "Tc-99m"],
        verdict=verdict,
        results=results,
        measurements=[],
        detail="two settings, three readings each",
    )


@dataclass
class Lab:
    root: Path
    archive_path: Path
    audit_path: Path
    users_path: Path
    procedure_end: str
    procedure_start: str
    procedure_results: list[str]
    loose_result: str
    running_procedure_end: str | None = None

    def store(self) -> UserStore:
        return UserStore(self.users_path, AuditLog(self.audit_path, key=KEY))

    def archive(self) -> HistoryArchive:
        return HistoryArchive(self.archive_path, read_only=True)


def record_lab(root: Path) -> Lab:
    """A complete daily constancy procedure (start, two results, end), one running procedure, and a
    linearity result outside any procedure, archived; a store with an admin, two QC officers, an operator."""
    daily, running = "a" * 32, "b" * 32
    constancy = [result("constancy", T0 + i * 60_000_000_000, daily) for i in (1, 2)]
    start = procedure(daily, "started", started_ns=T0, ended_ns=None, results=[], verdict=None)
    end = procedure(
        daily,
        "complete",
        started_ns=T0,
        ended_ns=T0 + 5 * 60_000_000_000,
        results=[m.msg_id for m in constancy],
        verdict="pass",
    )
    other = procedure(running, "started", started_ns=T0 + 2 * HOUR_NS, ended_ns=None, results=[], verdict=None)
    linearity = result("linearity", T0 + HOUR_NS, None, verdict="warn")
    archive_path = root / "history.sqlite3"
    with HistoryArchive(archive_path) as archive:
        archive.add_many([start, *constancy, end, other, linearity])
    lab = Lab(
        root,
        archive_path,
        root / "state" / "audit.jsonl",
        root / "state" / "users.sqlite3",
        end.msg_id,
        start.msg_id,
        [m.msg_id for m in constancy],
        linearity.msg_id,
    )
    with lab.store() as store:
        store.add_user("root", "Ada Admin", "admin", ADMIN_PW, admin=None)
        admin = Credentials("root", ADMIN_PW)
        store.add_user("jdoe", "Jane Doe", "qc_officer", QC_PW, admin=admin)
        store.add_user("rroe", "Richard Roe", "qc_officer", QC2_PW, admin=admin)
        store.add_user("op", "Otto Operator", "operator", OPERATOR_PW, admin=admin)
    return lab


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return record_lab(tmp_path)


@pytest.fixture
def opened(lab: Lab) -> Iterator[tuple[UserStore, HistoryArchive]]:
    with lab.store() as store, lab.archive() as archive:
        yield store, archive


def test_a_signature_binds_the_procedure_and_its_results_by_their_archived_hashes(
    lab: Lab, opened: tuple[UserStore, HistoryArchive]
) -> None:
    store, archive = opened
    before = time.time_ns()
    signature = sign(
        store=store,
        archive=archive,
        credentials=Credentials("jdoe", QC_PW),
        record_ids=[lab.procedure_end],
        meaning="approved",
        comment="  constancy   within limits ",
    )
    record = list(iter_records(lab.audit_path))[-1]
    assert (record.action, record.actor, record.target, record.seq) == (RECORD_SIGNED, "jdoe", DEVICE, signature.seq)
    assert before <= record.time_ns <= time.time_ns()
    expected = [
        {"kind": kind, "msg_id": msg_id, "sha256": archived_sha256(lab.archive_path, msg_id)}
        for kind, msg_id in [("qc_procedure", lab.procedure_end)] + [("qc_result", r) for r in lab.procedure_results]
    ]
    assert record.new_value == {
        "signer": "jdoe",
        "printed_name": "Jane Doe",
        "role": "qc_officer",
        "meaning": "approved",
        "comment": "constancy within limits",
        "records": expected,
    }
    assert record.reason == "constancy within limits"
    assert verify_chain(lab.audit_path, KEY).ok
    assert signatures(lab.audit_path) == [signature]
    assert check_signatures([signature], archive) == []


def test_what_awaits_review_is_ended_procedures_and_loose_results_not_yet_signed(
    lab: Lab, opened: tuple[UserStore, HistoryArchive]
) -> None:
    store, archive = opened
    pending = [p["msg_id"] for p in awaiting_review(archive, signatures(lab.audit_path))]
    assert pending == [lab.procedure_end, lab.loose_result]  # oldest first; no start, no running, no own results
    sign(
        store=store,
        archive=archive,
        credentials=Credentials("jdoe", QC_PW),
        record_ids=[lab.loose_result],
        meaning="approved",
    )
    found = signatures(lab.audit_path)
    assert [p["msg_id"] for p in awaiting_review(archive, found)] == [lab.procedure_end]
    assert [p["msg_id"] for p in awaiting_review(archive, found, test="daily_constancy")] == [lab.procedure_end]
    assert awaiting_review(archive, found, device="crc-2") == []


def test_a_review_alone_leaves_a_record_awaiting_approval_a_decision_settles_it(
    lab: Lab, opened: tuple[UserStore, HistoryArchive]
) -> None:
    store, archive = opened

    def by(username: str, password: str, record: str, meaning: str, comment: str | None = None) -> None:
        sign(
            store=store,
            archive=archive,
            credentials=Credentials(username, password),
            record_ids=[record],
            meaning=meaning,
            comment=comment,
        )

    def pending() -> list[str]:
        return [p["msg_id"] for p in awaiting_review(archive, signatures(lab.audit_path))]

    by("jdoe", QC_PW, lab.procedure_end, "reviewed")
    by("rroe", QC2_PW, lab.loose_result, "reviewed")
    assert pending() == [lab.procedure_end, lab.loose_result]  # reviewed is not yet a decision
    by("rroe", QC2_PW, lab.procedure_end, "approved")
    by("jdoe", QC_PW, lab.loose_result, "rejected", "fit drifts")
    assert pending() == []


def test_a_rejection_needs_a_comment_and_a_started_procedure_cannot_be_signed(
    lab: Lab, opened: tuple[UserStore, HistoryArchive]
) -> None:
    store, archive = opened
    officer = Credentials("jdoe", QC_PW)
    with pytest.raises(SigningError, match="rejection needs a comment"):
        sign(store=store, archive=archive, credentials=officer, record_ids=[lab.loose_result], meaning="rejected")
    with pytest.raises(SigningError, match="is its start"):
        sign(store=store, archive=archive, credentials=officer, record_ids=[lab.procedure_start], meaning="reviewed")
    with pytest.raises(SigningError, match="no record 'f+' in the archive"):
        sign(store=store, archive=archive, credentials=officer, record_ids=["f" * 32], meaning="reviewed")
    with pytest.raises(SigningError, match="meaning 'ok' is not known"):
        sign(store=store, archive=archive, credentials=officer, record_ids=[lab.loose_result], meaning="ok")
    sign(
        store=store,
        archive=archive,
        credentials=officer,
        record_ids=[lab.loose_result],
        meaning="rejected",
        comment="series too short",
    )
    assert signatures(lab.audit_path)[-1].comment == "series too short"


def test_only_qc_officers_and_admins_with_their_own_password_sign(
    lab: Lab, opened: tuple[UserStore, HistoryArchive]
) -> None:
    store, archive = opened
    ids = [lab.loose_result]
    with pytest.raises(AccessDenied, match="needs the role qc_officer or admin; 'op' has the role operator"):
        sign(
            store=store, archive=archive, credentials=Credentials("op", OPERATOR_PW), record_ids=ids, meaning="reviewed"
        )
    with pytest.raises(AccessDenied, match="wrong password"):
        sign(store=store, archive=archive, credentials=Credentials("jdoe", QC2_PW), record_ids=ids, meaning="reviewed")
    store.disable("rroe", admin=Credentials("root", ADMIN_PW), reason="left")
    with pytest.raises(AccessDenied, match="disabled"):
        sign(store=store, archive=archive, credentials=Credentials("rroe", QC2_PW), record_ids=ids, meaning="reviewed")
    sign(store=store, archive=archive, credentials=Credentials("root", ADMIN_PW), record_ids=ids, meaning="reviewed")
    assert [s.signer for s in signatures(lab.audit_path)] == ["root"]


def test_the_same_person_signs_a_record_once_per_meaning(lab: Lab, opened: tuple[UserStore, HistoryArchive]) -> None:
    store, archive = opened
    ids = [lab.procedure_end]

    def by(username: str, password: str, meaning: str) -> None:
        sign(store=store, archive=archive, credentials=Credentials(username, password), record_ids=ids, meaning=meaning)

    by("jdoe", QC_PW, "reviewed")
    with pytest.raises(SigningError, match="signed qc_procedure .* as reviewed already"):
        by("jdoe", QC_PW, "reviewed")
    by("rroe", QC2_PW, "reviewed")
    by("jdoe", QC_PW, "approved")
    assert [(s.signer, s.meaning) for s in signatures(lab.audit_path)] == [
        ("jdoe", "reviewed"),
        ("rroe", "reviewed"),
        ("jdoe", "approved"),
    ]


def tamper(archive_path: Path, msg_id: str) -> str:
    """Change one archived payload behind the archive's back, as an edit of the file would; its new hash."""
    with sqlite3.connect(archive_path) as db:
        (text,) = db.execute("SELECT payload FROM message WHERE msg_id = ?", (msg_id,)).fetchone()
        payload = json.loads(text)
        payload["detail"] += " (edited)"
        db.execute("UPDATE message SET payload = ? WHERE msg_id = ?", (json.dumps(payload), msg_id))
    return archived_sha256(archive_path, msg_id)


def test_a_record_changed_after_signing_is_found_and_awaits_review_again(lab: Lab) -> None:
    with lab.store() as store, lab.archive() as archive:
        sign(
            store=store,
            archive=archive,
            credentials=Credentials("jdoe", QC_PW),
            record_ids=[lab.procedure_end],
            meaning="approved",
        )
    signed_hash = archived_sha256(lab.archive_path, lab.procedure_results[1])
    changed_hash = tamper(lab.archive_path, lab.procedure_results[1])
    assert changed_hash != signed_hash
    with lab.archive() as archive:
        problems = check_signatures(signatures(lab.audit_path), archive)
        assert [(p.record.msg_id, p.problem) for p in problems] == [
            (
                lab.procedure_results[1],
                f"changed since it was signed: SHA-256 now {changed_hash}, signed {signed_hash}",
            )
        ]
        # The procedure's own record is unchanged and stays signed; its result does not belong to it as signed.
        assert lab.procedure_end not in [p["msg_id"] for p in awaiting_review(archive, signatures(lab.audit_path))]


async def test_signing_from_async_code_leaves_the_event_loop_running(lab: Lab) -> None:
    ticks = 0
    done = asyncio.Event()

    async def tick() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    ticker = asyncio.create_task(tick())
    with lab.store() as store, lab.archive() as archive:
        signature = await sign_async(
            store=store,
            archive=archive,
            credentials=Credentials("jdoe", QC_PW),
            record_ids=[lab.loose_result],
            meaning="reviewed",
        )
    done.set()
    await ticker
    assert signature.printed_name == "Jane Doe"
    assert ticks > 5  # argon2 (~0.1 s at the default cost) ran on a worker thread


# --------------------------------------------------------------------------- command line


def write_config(lab: Lab) -> Path:
    config = lab.root / "lab.toml"
    config.write_text(
        '[site]\nname = "hotlab-a"\n[service]\nstate_dir = "state"\n[history]\npath = "history.sqlite3"\n'
        "[users]\nmax_failed_passwords = 2\n"
    )
    return config


def run(monkeypatch: pytest.MonkeyPatch, stdin: str, *argv: str) -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return hotlab(list(argv))


def test_review_end_to_end_on_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lab = record_lab(tmp_path)
    lab.users_path.unlink()  # start from an empty store: the command line bootstraps it
    for leftover in lab.users_path.parent.glob("users.sqlite3-*"):
        leftover.unlink()
    config = write_config(lab)
    monkeypatch.delenv("HOTLAB_AUDIT_KEY", raising=False)
    monkeypatch.delenv("HOTLAB_AUDIT_KEY_FILE", raising=False)
    key_file = tmp_path / "audit.key"
    key_file.write_bytes(KEY)
    keyed = ("--config", str(config), "--key-file", str(key_file))
    cfg = (*keyed, "--password-stdin")

    assert run(monkeypatch, f"{ADMIN_PW}\n", "user", "add", "boss", "--name", "Ada Admin", "--role", "admin", *cfg) == 0
    assert (
        run(
            monkeypatch,
            f"{ADMIN_PW}\n{QC_PW}\n",
            "user",
            "add",
            "qa1",
            "--name",
            "Jane Doe",
            "--role",
            "qc_officer",
            "--admin",
            "boss",
            *cfg,
        )
        == 0
    )
    assert run(monkeypatch, "", "user", "list", "--json", "--config", str(config)) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(u["username"], u["printed_name"], u["role"], u["status"]) for u in listed] == [
        ("boss", "Ada Admin", "admin", "active"),
        ("qa1", "Jane Doe", "qc_officer", "active"),
    ]
    assert all("hash" not in key for u in listed for key in u)

    assert run(monkeypatch, "", "review", "list", "--json", *keyed) == 0
    pending = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(p["msg_id"], p["kind"], p["what"], p["awaits"]) for p in pending] == [
        (lab.procedure_end, "qc_procedure", "daily_constancy", "review"),
        (lab.loose_result, "qc_result", "linearity", "review"),
    ]
    assert pending[0]["sha256"] == archived_sha256(lab.archive_path, lab.procedure_end)

    # Without the audit HMAC key nothing is signed or verified: one line, exit 2, before any password is asked.
    unkeyed = ("--config", str(config), "--password-stdin")
    no_key = "error: the audit HMAC key is needed (--key-file, $HOTLAB_AUDIT_KEY_FILE or $HOTLAB_AUDIT_KEY)"
    for command in (("sign", lab.procedure_end, "--meaning", "approved", "--user", "qa1"), ("verify",)):
        records_before = len(list(iter_records(lab.audit_path)))
        assert run(monkeypatch, f"{QC_PW}\n", "review", *command, *unkeyed) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and no_key in err
        assert len(list(iter_records(lab.audit_path))) == records_before

    sign_args = ("review", "sign", lab.procedure_end, "--meaning", "approved", "--user", "qa1", *cfg)
    assert run(monkeypatch, f"{QC_PW}\n", *sign_args) == 0
    out = capsys.readouterr().out
    assert "signed 3 record(s) as approved by Jane Doe (qa1, qc_officer)" in out
    assert f"qc_procedure {lab.procedure_end} sha256 {archived_sha256(lab.archive_path, lab.procedure_end)}" in out
    assert run(monkeypatch, f"{QC_PW}\n", *sign_args) == 2  # the same person, the same meaning: refused
    assert "as approved already" in capsys.readouterr().err

    assert run(monkeypatch, "", "review", "list", "--json", *keyed) == 0
    assert [json.loads(line)["msg_id"] for line in capsys.readouterr().out.splitlines()] == [lab.loose_result]

    reject = ("review", "sign", lab.loose_result, "--meaning", "rejected", "--user", "qa1", *cfg)
    assert run(monkeypatch, f"{QC_PW}\n", *reject) == 2
    assert "rejection needs a comment" in capsys.readouterr().err
    assert run(monkeypatch, "a wrong passphrase\n", *reject, "--comment", "x") == 1
    assert "wrong password" in capsys.readouterr().err

    assert run(monkeypatch, "", "review", "verify", *keyed) == 0
    assert "1 signature(s) over 3 record(s)" in capsys.readouterr().out
    tamper(lab.archive_path, lab.procedure_end)
    assert run(monkeypatch, "", "review", "verify", *keyed) == 1
    err = capsys.readouterr().err
    assert f"qc_procedure {lab.procedure_end} changed since it was signed" in err
    assert "1 of 3 signed record(s) changed or missing" in err

    # Two failures in a row lock qa1 ([users] max_failed_passwords = 2); the admin's new password unlocks.
    assert run(monkeypatch, "a wrong passphrase\n", *reject, "--comment", "x") == 1
    assert "now locked" in capsys.readouterr().err
    assert run(monkeypatch, f"{QC_PW}\n", *reject, "--comment", "x") == 1
    assert "is locked" in capsys.readouterr().err
    new_pw = "qc officer passphrase 2"
    assert run(monkeypatch, f"{ADMIN_PW}\n{new_pw}\n", "user", "passwd", "qa1", "--admin", "boss", *cfg) == 0
    assert run(monkeypatch, f"{new_pw}\n", *reject, "--comment", "fit drifts") == 0
    assert verify_chain(lab.audit_path, KEY).ok
    assert [s.meaning for s in signatures(lab.audit_path)] == ["approved", "rejected"]


# --------------------------------------------------------------------------- what the trail vouches for


def forge(audit: AuditLog, *, signer: str, printed_name: str, role: str, record: str, sha256: str) -> int:
    """Append a `record.signed` entry as someone writing the file directly would; its seq."""
    entry = audit.append(
        actor=signer,
        action=RECORD_SIGNED,
        target=DEVICE,
        reason="approved",
        new_value={
            "signer": signer,
            "printed_name": printed_name,
            "role": role,
            "meaning": "approved",
            "comment": None,
            "records": [{"kind": "qc_result", "msg_id": record, "sha256": sha256}],
        },
    )
    return entry.seq


def test_signatures_after_the_first_break_of_the_chain_are_ignored_and_reported(
    lab: Lab, opened: tuple[UserStore, HistoryArchive]
) -> None:
    store, archive = opened
    genuine = sign(
        store=store,
        archive=archive,
        credentials=Credentials("jdoe", QC_PW),
        record_ids=[lab.procedure_end],
        meaning="approved",
    )
    sha = archived_sha256(lab.archive_path, lab.loose_result)
    # Fresh hashes chain on correctly, but without the key the HMAC is wrong: the chain breaks there.
    forged = forge(
        AuditLog(lab.audit_path, key=OTHER_KEY),
        signer="jdoe",
        printed_name="Jane Doe",
        role="qc_officer",
        record=lab.loose_result,
        sha256=sha,
    )
    ledger = read_signatures(lab.audit_path, KEY)
    assert ledger.chain.broken is not None and ledger.chain.broken.line == forged
    assert ledger.valid == [genuine]
    assert [r.seq for r in ledger.unverified] == [forged]
    assert ledger.uncounted() == [
        f"audit record #{forged} (jdoe, {ledger.unverified[0].time}) is a signature after the chain's break: ignored"
    ]
    assert [p["msg_id"] for p in awaiting_review(archive, ledger.valid)] == [lab.loose_result]
    with pytest.raises(UntrustedTrail, match=f"BROKEN after {forged - 1} intact record"):
        sign(
            store=store,
            archive=archive,
            credentials=Credentials("rroe", QC2_PW),
            record_ids=[lab.loose_result],
            meaning="reviewed",
        )


def test_a_signature_by_someone_who_could_not_sign_then_does_not_count(
    lab: Lab,
    opened: tuple[UserStore, HistoryArchive],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Written with the key (an intact chain), but the trail's own user records say the signer could not sign."""
    store, archive = opened
    sha = archived_sha256(lab.archive_path, lab.loose_result)
    store.disable("rroe", admin=Credentials("root", ADMIN_PW), reason="left")
    keyed = AuditLog(lab.audit_path, key=KEY)
    entries = {
        "mallory": forge(
            keyed, signer="mallory", printed_name="M", role="qc_officer", record=lab.loose_result, sha256=sha
        ),
        "op": forge(
            keyed, signer="op", printed_name="Otto Operator", role="qc_officer", record=lab.loose_result, sha256=sha
        ),
        "rroe": forge(
            keyed, signer="rroe", printed_name="Richard Roe", role="qc_officer", record=lab.loose_result, sha256=sha
        ),
        "jdoe": forge(
            keyed, signer="jdoe", printed_name="Joe Other", role="qc_officer", record=lab.loose_result, sha256=sha
        ),
    }
    ledger = read_signatures(lab.audit_path, KEY)
    assert ledger.chain.ok and ledger.valid == [] and ledger.unverified == []
    assert [(i.record.seq, i.problem) for i in ledger.invalid] == [
        (entries["mallory"], "no user.add record of 'mallory' precedes it"),
        (entries["op"], "'op' was added as operator; only a qc_officer or admin signs"),
        (entries["rroe"], "'rroe' was disabled before it"),
        (entries["jdoe"], "it names 'Joe Other' (qc_officer), but 'jdoe' was added as 'Jane Doe' (qc_officer)"),
    ]
    assert [p["msg_id"] for p in awaiting_review(archive, ledger.valid)] == [lab.procedure_end, lab.loose_result]

    key_file = lab.root / "audit.key"
    key_file.write_bytes(KEY)
    config = write_config(lab)
    assert run(monkeypatch, "", "review", "verify", "--config", str(config), "--key-file", str(key_file)) == 1
    err = capsys.readouterr().err
    assert f"audit record #{entries['op']} (op, " in err and "4 signature(s) do not count" in err


def test_signing_needs_the_key(lab: Lab) -> None:
    with UserStore(lab.users_path, AuditLog(lab.audit_path)) as store, lab.archive() as archive:
        with pytest.raises(SigningError, match="signing needs the audit HMAC key"):
            sign(
                store=store,
                archive=archive,
                credentials=Credentials("jdoe", QC_PW),
                record_ids=[lab.loose_result],
                meaning="reviewed",
            )
    assert not [r for r in iter_records(lab.audit_path) if r.action in (RECORD_SIGNED, USER_AUTH_FAILED)]


def test_a_refused_signature_is_audited_with_what_was_attempted(
    lab: Lab, opened: tuple[UserStore, HistoryArchive]
) -> None:
    store, archive = opened
    attempts = [("op", OPERATOR_PW, "the role operator may not do this"), ("jdoe", QC2_PW, "wrong password")]
    for username, password, why in attempts:
        with pytest.raises(AccessDenied):
            sign(
                store=store,
                archive=archive,
                credentials=Credentials(username, password),
                record_ids=[lab.loose_result],
                meaning="approved",
            )
        last = list(iter_records(lab.audit_path))[-1]
        assert (last.action, last.actor, last.target) == (USER_AUTH_FAILED, username, f"user:{username}")
        assert last.reason == f"refused signing {lab.loose_result} as approved: {why}"
    assert signatures(lab.audit_path) == []
