"""`hotlab audit verify|show|append`: check, read and (for manual entries) write the audit trail.

The trail is found, in this order: --path; --config lab.toml (where that lab's service writes
it: `[commands] audit_path`, else `<state_dir>/audit.jsonl`); `$HOTLAB_AUDIT_LOG`; else where
`hotlab run` without a config (the simulated lab) writes it. A missing trail is an error for
`verify` and `show` unless --allow-empty: a typo in the path, or a deleted trail, must not read
as "intact".

`verify` also checks the trail against every anchor of it that it can reach (the history
archive: --archive, else that of the --config lab or of the known lab whose trail it is; and
the retained MQTT anchor: --mqtt, the --config lab's broker with its TLS and credentials, or
--mqtt-host), and names the newest, against which a truncation is measured. A chain cut short at
its end is intact, so without an anchor that truncation cannot be seen: verify says so, and
--require-anchor makes it a failure.

Errors are raised (HotlabError) and reported by controller/cli/main.py, whose exit codes these
follow: 0 ok, 1 broken chain, rewritten, truncated or replaced trail, missing trail or anchor (with
--require-anchor), or failed read or write, 2 bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from hotlab.controller.anchor_check import verify_anchored
from hotlab.controller.archive import TimeRange
from hotlab.controller.audit import KEY_FILE_ENV, AuditError, AuditLog, iter_records, load_hmac_key
from hotlab.controller.cli.audit_anchors import Broker, TrailIdentity, find_anchors, lab_broker
from hotlab.controller.cli.lab_records import KNOWN_LABS, latest_lab
from hotlab.controller.config import MqttConfig, load_audit_path, load_history_path
from hotlab.errors import InputError

PATH_ENV = "HOTLAB_AUDIT_LOG"


def default_audit_path() -> Path:
    """`$HOTLAB_AUDIT_LOG`, else the newest trail that `hotlab run`, `hotlab demo` or a configured lab
    wrote here (controller/cli/lab_records.py), relative to the working directory."""
    return Path(os.environ.get(PATH_ENV) or latest_lab("audit", "audit").audit)


def hmac_key(key_file: Path | None) -> bytes | None:
    """The audit HMAC key from `key_file` (a --key-file option) if given, else from the environment."""
    return load_hmac_key({KEY_FILE_ENV: str(key_file)} if key_file is not None else None)


class _NoTrail(AuditError):
    """The audit trail to read does not exist."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("audit", help="verify, show or append to the hash-chained audit trail")
    actions = parser.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        where = sub.add_mutually_exclusive_group()
        where.add_argument(
            "--path",
            type=Path,
            default=None,
            help=f"audit log (default ${PATH_ENV}, else the newest trail of the labs hotlab runs here)",
        )
        where.add_argument(
            "--config", type=Path, default=None, help="lab config (TOML): use the audit trail that lab's service writes"
        )
        sub.add_argument(
            "--key-file",
            type=Path,
            default=None,
            help="HMAC key file (default $HOTLAB_AUDIT_KEY_FILE or $HOTLAB_AUDIT_KEY)",
        )

    verify = actions.add_parser("verify", help="check the whole chain; exit 1 at the first broken record")
    common(verify)
    verify.add_argument(
        "--allow-empty",
        action="store_true",
        help="a missing trail is an empty, intact one (e.g. a new lab); default: exit 1",
    )
    verify.add_argument(
        "--archive",
        type=Path,
        default=None,
        help="history archive holding the trail's anchors (default: that of the --config lab, or of the known "
        "lab whose trail this is)",
    )
    verify.add_argument(
        "--mqtt",
        action="store_true",
        help="also read the retained anchor from the --config lab's broker ([mqtt]: host, port, TLS, credentials)",
    )
    verify.add_argument(
        "--mqtt-host",
        default=None,
        help="also read the retained anchor from this MQTT broker (with --mqtt: instead of the config's host)",
    )
    verify.add_argument(
        "--mqtt-port", type=int, default=None, help="MQTT broker port (default: the config's with --mqtt, else 1883)"
    )
    verify.add_argument(
        "--mqtt-timeout", type=float, default=3.0, help="seconds to wait for the broker's anchor (default 3)"
    )
    verify.add_argument(
        "--require-anchor",
        action="store_true",
        help="exit 1 when no anchor is reachable (a truncation could not be detected); default: say so, exit 0",
    )
    verify.set_defaults(func=_verify)

    show = actions.add_parser("show", help="list records (optionally in a UTC period)")
    common(show)
    show.add_argument("--from", dest="start", help="first day or instant (UTC), e.g. 2026-11-01")
    show.add_argument("--to", dest="end", help="last day (inclusive) or instant (UTC)")
    show.add_argument("--action", help="only this action, e.g. elution.start")
    show.add_argument("--json", action="store_true", help="one JSON record per line instead of a table")
    show.add_argument("--allow-empty", action="store_true", help="a missing trail lists nothing; default: exit 1")
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


def _path(args: argparse.Namespace) -> Path:
    """--path, else the trail of the --config lab (ConfigError if it is unreadable), else the default."""
    if args.path is not None:
        return args.path
    if args.config is not None:
        return load_audit_path(args.config)
    return default_audit_path()


def _existing_path(args: argparse.Namespace) -> Path:
    path = _path(args)
    if not args.allow_empty and not path.exists():
        raise _NoTrail(f"no audit trail at {path} (check --path/--config; --allow-empty accepts a missing trail)")
    return path


def _archive_path(args: argparse.Namespace, trail: Path) -> Path | None:
    """--archive; else the [history] archive of the --config lab; else that of the known lab whose trail this is."""
    if args.archive is not None:
        return args.archive
    if args.config is not None:
        return load_history_path(args.config)
    return next((lab.archive for lab in KNOWN_LABS if lab.audit.resolve() == trail.resolve()), None)


def _broker(args: argparse.Namespace) -> Broker | None:
    """--mqtt: the --config lab's broker as its controller reaches it; --mqtt-host/--mqtt-port: another host or port."""
    if args.mqtt:
        if args.config is None:
            raise InputError("--mqtt reads the broker from the lab config: give --config too (or --mqtt-host)")
        mqtt = lab_broker(args.config)
    elif args.mqtt_host is not None:
        mqtt = MqttConfig()  # plain and anonymous, on the host and port given
    else:
        return None
    mqtt = dataclasses.replace(mqtt, host=args.mqtt_host or mqtt.host, port=args.mqtt_port or mqtt.port)
    return Broker(mqtt, args.mqtt_timeout)


def _verify(args: argparse.Namespace) -> int:
    key = hmac_key(args.key_file)  # a bad key is bad input even when the trail is missing too
    broker = _broker(args)
    path = _existing_path(args)
    try:
        search = find_anchors(TrailIdentity.of(path), archive=_archive_path(args, path), broker=broker)
        result = verify_anchored(path, key, search.anchors)
    except OSError as exc:
        raise AuditError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    if result.newest is not None:
        print(f"anchor used: {result.newest.describe()}")
    print(result.summary(), file=sys.stdout if result.ok else sys.stderr)
    unanchored = not search.anchors and args.require_anchor
    if not search.anchors:
        print(
            f"no anchor reachable: a truncation of the last records could not be detected ({'; '.join(search.tried)})",
            file=sys.stderr if unanchored else sys.stdout,
        )
    return 0 if result.ok and not unanchored else 1


def _show(args: argparse.Namespace) -> int:
    period = TimeRange.from_text(args.start, args.end)
    path = _existing_path(args)
    records = [
        r
        for r in iter_records(path)
        if period.start_ns <= r.time_ns < period.end_ns and (args.action is None or r.action == args.action)
    ]
    if args.json:
        for record in records:
            print(json.dumps(record.to_json(), ensure_ascii=False))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"audit trail {path}")
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


#: Actions only their own commands may record: a signature or an account change carries a checked
#: password (controller/signatures.py, controller/users.py), so a typed-in one would be a forgery.
PROTECTED_ACTION_PREFIXES = ("record.", "user.")


def _append(args: argparse.Namespace) -> int:
    if str(args.action).startswith(PROTECTED_ACTION_PREFIXES):
        raise InputError(
            f"{args.action} is recorded only by its own command (hotlab review sign, hotlab user ...), "
            "which checks the signer's password; audit append cannot write it"
        )
    log = AuditLog(_path(args), key=hmac_key(args.key_file))
    try:
        record = log.append(
            actor=args.actor,
            action=args.action,
            target=args.target,
            reason=args.reason,
            old_value=_json_or_text(args.old),
            new_value=_json_or_text(args.new),
        )
    except OSError as exc:
        raise AuditError(f"cannot write {log.path}: {exc}") from exc
    print(f"recorded #{record.seq} {record.action} on {record.target} by {record.actor}, hash {record.hash}")
    return 0
