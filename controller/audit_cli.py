"""`hotlab audit verify|show|append`: check, read and (for manual entries) write the audit trail.

Exit codes follow controller/cli.py: 0 ok, 1 broken chain or failed write, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from controller.audit import (
    AuditEntryError,
    AuditKeyError,
    AuditLog,
    AuditLogCorrupt,
    iter_records,
    load_hmac_key,
    verify_chain,
)
from controller.history import HistoryQueryError, TimeRange

PATH_ENV = "HOTLAB_AUDIT_LOG"
DEFAULT_PATH = Path("var/audit.jsonl")


def default_audit_path() -> Path:
    """`$HOTLAB_AUDIT_LOG`, else var/audit.jsonl relative to the working directory."""
    return Path(os.environ.get(PATH_ENV) or DEFAULT_PATH)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("audit", help="verify, show or append to the hash-chained audit trail")
    actions = parser.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--path", type=Path, default=None, help=f"audit log (default ${PATH_ENV} or {DEFAULT_PATH})")
        sub.add_argument("--key-file", type=Path, default=None,
                         help="HMAC key file (default $HOTLAB_AUDIT_KEY_FILE or $HOTLAB_AUDIT_KEY)")

    verify = actions.add_parser("verify", help="check the whole chain; exit 1 at the first broken record")
    common(verify)
    verify.set_defaults(func=_verify)

    show = actions.add_parser("show", help="list records (optionally in a UTC period)")
    common(show)
    show.add_argument("--from", dest="start", help="first day or instant (UTC), e.g. 2026-11-01")
    show.add_argument("--to", dest="end", help="last day (inclusive) or instant (UTC)")
    show.add_argument("--action", help="only this action, e.g. elution.start")
    show.add_argument("--json", action="store_true", help="one JSON record per line instead of a table")
    show.set_defaults(func=_show)

    append = actions.add_parser("append", help="record a manual action or QC entry")
    common(append)
    append.add_argument("--actor", required=True, help="who (user name)")
    append.add_argument("--action", required=True, help="what, a dotted name such as qc.manual_entry")
    append.add_argument("--target", required=True, help="device or station acted on")
    append.add_argument("--reason", required=True, help="why")
    append.add_argument("--old", help="old value as JSON (a bare word is taken as a string)")
    append.add_argument("--new", help="new value as JSON (a bare word is taken as a string)")
    append.set_defaults(func=_append)


def _key(args: argparse.Namespace) -> bytes | None:
    env = dict(os.environ)
    if args.key_file is not None:
        env = {"HOTLAB_AUDIT_KEY_FILE": str(args.key_file)}
    return load_hmac_key(env)


def _path(args: argparse.Namespace) -> Path:
    return args.path if args.path is not None else default_audit_path()


def _verify(args: argparse.Namespace) -> int:
    try:
        result = verify_chain(_path(args), _key(args))
    except AuditKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot read {_path(args)}: {exc.strerror}", file=sys.stderr)
        return 1
    print(result.summary(), file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


def _show(args: argparse.Namespace) -> int:
    try:
        period = TimeRange.from_text(args.start, args.end)
    except HistoryQueryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    records = [
        r for r in iter_records(_path(args))
        if period.start_ns <= r.time_ns < period.end_ns and (args.action is None or r.action == args.action)
    ]
    if args.json:
        for record in records:
            print(json.dumps(record.to_json(), ensure_ascii=False))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"audit trail {_path(args)}")
    for column in ("#", "time (UTC)", "who", "what", "target", "old", "new", "why"):
        table.add_column(column)
    for r in records:
        table.add_row(str(r.seq), r.time, r.actor, r.action, r.target, _cell(r.old_value), _cell(r.new_value), r.reason)
    Console().print(table)
    return 0


def _cell(value: Any) -> str:
    return "" if value is None else value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _json_or_text(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _append(args: argparse.Namespace) -> int:
    try:
        log = AuditLog(_path(args), key=_key(args))
        record = log.append(
            actor=args.actor, action=args.action, target=args.target, reason=args.reason,
            old_value=_json_or_text(args.old), new_value=_json_or_text(args.new),
        )
    except (AuditEntryError, AuditKeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (AuditLogCorrupt, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"recorded #{record.seq} {record.action} on {record.target} by {record.actor}, hash {record.hash}")
    return 0
