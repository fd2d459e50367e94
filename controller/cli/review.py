"""`hotlab review list|sign|verify`: what awaits a QC officer's signature, signing it, and checking signatures.

`list` shows ended QC procedures and results outside any procedure (from the history archive)
with no decision (approved or rejected) signed as they are now, and what each awaits; `sign`
signs records with a meaning (reviewed, approved, rejected) after checking the signer's password
and role (controller/signatures.py); `verify` checks the audit chain and the signers, and
re-hashes every signed record in the archive. Only signatures of the verified chain by an enabled
QC officer or admin count (`read_signatures`); `sign` and `verify` need the audit HMAC key, `list`
uses it when configured. Files are found as for `hotlab user` (controller/cli/user.py), the
archive as the --config lab's, else --archive, `$HOTLAB_HISTORY` or the known lab whose trail it is.

Exit codes: 0 done (verify: every signature intact), 1 refused signature, broken chain, a
signature that does not count, or a signed record changed or missing, 2 bad input (a missing
HMAC key too).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hotlab.controller.archive import HistoryArchive, TimeRange
from hotlab.controller.cli.audit import hmac_key
from hotlab.controller.cli.user import LabFiles, PasswordReader, add_lab_options, lab_files, required_audit_key
from hotlab.controller.signatures import (
    MEANINGS,
    Signature,
    awaiting_review,
    awaits,
    check_signatures,
    payload_sha256,
    read_signatures,
    record_kind,
    records_to_sign,
    sign,
    signatures_by_record,
    signed_record,
)
from hotlab.controller.users import Credentials
from hotlab.errors import HotlabError, InputError


class SignaturesBroken(HotlabError):
    """The audit chain holding the signatures is broken, a signature does not count, or a signed record changed."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("review", help="list QC records awaiting review, sign them, verify signatures")
    actions = parser.add_subparsers(dest="review_command", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="ended procedures and results outside procedures not yet signed")
    listing.add_argument("--device", default=None, help="only this calibrator or generator")
    listing.add_argument("--since", default=None, help="only records from this day or instant (UTC) on")
    listing.add_argument("--test", default=None, help="only this test or procedure, e.g. linearity, daily_constancy")
    listing.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    add_lab_options(listing, archive=True)
    listing.set_defaults(func=_list)

    signing = actions.add_parser("sign", help="sign records (their msg_id) with your username and password")
    signing.add_argument("record_ids", nargs="+", metavar="RECORD_ID", help="msg_id of a record `list` shows")
    signing.add_argument("--meaning", required=True, choices=tuple(MEANINGS), help="what the signature states")
    signing.add_argument("--comment", default=None, help="remark kept with the signature (required to reject)")
    signing.add_argument("--user", default=None, help="your username (default: asked)")
    add_lab_options(signing, archive=True)
    signing.set_defaults(func=_sign)

    verify = actions.add_parser("verify", help="check the audit chain and re-hash every signed record")
    add_lab_options(verify, archive=True)
    verify.set_defaults(func=_verify)


def _archive(files: LabFiles) -> HistoryArchive:
    path = files.archive
    if path is None or not path.is_file():
        raise InputError(f"no history archive at {path} (give --archive PATH or --config)")
    return HistoryArchive(path, read_only=True)


def _audit(files: LabFiles) -> Path:
    path = files.audit
    if not path.is_file():
        raise InputError(f"no audit trail at {path} (give --audit PATH or --config)")
    return path


def _summary(payload: dict[str, Any], signed: list[Signature]) -> dict[str, Any]:
    kind = record_kind(payload)
    return {
        "msg_id": payload["msg_id"],
        "kind": kind,
        "time": payload.get("time"),
        "device": payload.get("device"),
        "what": payload.get("procedure") if kind == "qc_procedure" else payload.get("test"),
        "status": payload.get("status"),
        "verdict": payload.get("verdict"),
        "sha256": payload_sha256(payload),
        "awaits": awaits(signed),
        "signatures": [
            {"meaning": x.meaning, "signer": x.signer, "printed_name": x.printed_name, "comment": x.comment}
            for x in signed
        ],
    }


def _list(args: argparse.Namespace) -> int:
    period = None if args.since is None else TimeRange.from_text(args.since, None)
    files = lab_files(args)
    ledger = read_signatures(files.audit, hmac_key(args.key_file))
    for problem in ([] if ledger.chain.ok else [ledger.chain.summary()]) + ledger.uncounted():
        print(problem, file=sys.stderr)
    by_record = signatures_by_record(ledger.valid)
    with _archive(files) as archive:
        pending = awaiting_review(archive, ledger.valid, period=period, device=args.device, test=args.test)
    rows = [_summary(p, by_record.get(signed_record(p), [])) for p in pending]
    if args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(rows)} record(s) awaiting review")
    columns = ("time (UTC)", "kind", "device", "test or procedure", "status", "verdict", "awaits", "signed so far")
    for column in (*columns, "record id"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row["time"])[:19],
            str(row["kind"]),
            str(row["device"]),
            str(row["what"]),
            row["status"] or "",
            row["verdict"] or "",
            row["awaits"],
            "; ".join(
                f"{x['meaning']} by {x['printed_name']}" + (f" ({x['comment']})" if x["comment"] else "")
                for x in row["signatures"]
            ),
            row["msg_id"],
        )
    Console().print(table)
    return 0


def _sign(args: argparse.Namespace) -> int:
    if args.password_stdin and args.user is None:
        raise InputError("--password-stdin needs --user (standard input holds only the password)")
    files = lab_files(args)
    key = required_audit_key(args.key_file)
    with _archive(files) as archive, files.open_store(key) as store:
        records_to_sign(archive, args.record_ids)  # a typo in an id fails before the password is asked
        username = args.user or input("username: ").strip()
        credentials = Credentials(username, PasswordReader(args.password_stdin).read(f"password of {username}"))
        signature = sign(
            store=store,
            archive=archive,
            credentials=credentials,
            record_ids=args.record_ids,
            meaning=args.meaning,
            comment=args.comment,
        )
    print(
        f"signed {len(signature.records)} record(s) as {signature.meaning} by {signature.printed_name} "
        f"({signature.signer}, {signature.role}) at {signature.time}: audit record #{signature.seq}"
    )
    for record in signature.records:
        print(f"  {record.kind} {record.msg_id} sha256 {record.sha256}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    files = lab_files(args)
    key = required_audit_key(args.key_file)
    ledger = read_signatures(_audit(files), key)
    with _archive(files) as archive:
        problems = check_signatures(ledger.valid, archive)
    records = sum(len(s.records) for s in ledger.valid)
    print(ledger.chain.summary(), file=sys.stdout if ledger.chain.ok else sys.stderr)
    for line in [*ledger.uncounted(), *(p.describe() for p in problems)]:
        print(line, file=sys.stderr)
    if not ledger.chain.ok or ledger.invalid or problems:
        uncounted = len(ledger.invalid) + len(ledger.unverified)
        raise SignaturesBroken(
            f"{len(problems)} of {records} signed record(s) changed or missing; "
            f"{uncounted} signature(s) do not count"
            + ("" if ledger.chain.ok else "; the audit chain holding the signatures is broken")
        )
    print(
        f"{len(ledger.valid)} signature(s) over {records} record(s): every signer could sign, and every record "
        "is in the archive as it was signed"
    )
    return 0
