"""`hotlab user add|passwd|disable|list`: the accounts of the people who sign QC records.

The store and the audit trail that records its changes are found as `hotlab audit` finds the
trail: --audit, else that of the --config lab (`[commands] audit_path`, else
`<state_dir>/audit.jsonl`), else `$HOTLAB_AUDIT_LOG` or the newest known lab's; the store is
--users, else `[users] path`, else `users.sqlite3` beside that trail (controller/config.py).

Passwords are never arguments (they would sit in shell history and `ps`): they are typed at a
prompt (getpass), or with --password-stdin read one per line from standard input, in the order
the prompts would ask: the acting admin's (or for `passwd` of one's own account, the current
one), then the new password.

The commands that write to the trail (add, passwd, disable) need its HMAC key (--key-file,
else the environment, as for `hotlab audit`): a record without its HMAC would break the chain
for whoever verifies it with the key, and signatures count only up to the first break.

Exit codes (controller/cli/main.py): 0 done, 1 refused (wrong password, disabled or locked
account, role too low) or failed write, 2 bad input (a missing HMAC key too).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from hotlab.controller.audit import KEY_ENV, KEY_FILE_ENV, AuditLog
from hotlab.controller.cli.audit import default_audit_path, hmac_key
from hotlab.controller.cli.lab_records import KNOWN_LABS
from hotlab.controller.config import ROLES, UsersConfig, load_audit_path, load_history_path, load_users_config
from hotlab.controller.messages import iso_utc
from hotlab.controller.users import Credentials, UserStore
from hotlab.errors import InputError

HISTORY_ENV = "HOTLAB_HISTORY"


@dataclass(frozen=True, slots=True)
class LabFiles:
    """Where one lab keeps its accounts, audit trail and (for review) history archive."""

    users: Path
    audit: Path
    archive: Path | None
    settings: UsersConfig

    def open_store(self, key: bytes | None) -> UserStore:
        """The store, its changes audited with `key` (`required_audit_key` for a command that writes)."""
        return UserStore(
            self.users,
            AuditLog(self.audit, key=key),
            min_password_chars=self.settings.min_password_chars,
            max_failed_passwords=self.settings.max_failed_passwords,
            lockout_min=self.settings.lockout_min,
        )


def add_lab_options(parser: argparse.ArgumentParser, *, archive: bool = False) -> None:
    """--config and the path options that override it, --key-file and --password-stdin."""
    parser.add_argument("--config", type=Path, default=None, help="lab config (TOML): that lab's files and [users]")
    parser.add_argument(
        "--audit", type=Path, default=None, help="audit trail (default: the --config lab's, else as `hotlab audit`)"
    )
    parser.add_argument(
        "--users", type=Path, default=None, help="user store (default: [users] path, else beside the audit trail)"
    )
    if archive:
        parser.add_argument(
            "--archive",
            type=Path,
            default=None,
            help=f"history archive (default: the --config lab's, else ${HISTORY_ENV}, else the known lab's)",
        )
    parser.add_argument(
        "--key-file",
        type=Path,
        default=None,
        help="audit HMAC key file (default $HOTLAB_AUDIT_KEY_FILE or $HOTLAB_AUDIT_KEY)",
    )
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        help="read passwords from standard input, one per line, instead of prompting (for scripts)",
    )


def lab_files(args: argparse.Namespace) -> LabFiles:
    """The files `add_lab_options` point at; ConfigError when the --config lab's file is unreadable."""
    audit = args.audit or (load_audit_path(args.config) if args.config else default_audit_path())
    settings = load_users_config(args.config) if args.config else UsersConfig()
    archive = getattr(args, "archive", None)
    if archive is None and hasattr(args, "archive"):
        if args.config:
            archive = load_history_path(args.config)
        elif os.environ.get(HISTORY_ENV):
            archive = Path(os.environ[HISTORY_ENV])
        else:
            archive = next((lab.archive for lab in KNOWN_LABS if lab.audit.resolve() == audit.resolve()), None)
    return LabFiles(args.users or settings.resolved_path(audit), audit, archive, settings)


def required_audit_key(key_file: Path | None) -> bytes:
    """The audit HMAC key, else InputError: a record written without it breaks the chain for whoever
    verifies with the key, and a trail read without it proves nothing against a rewrite."""
    key = hmac_key(key_file)
    if key is None:
        raise InputError(
            f"the audit HMAC key is needed (--key-file, ${KEY_FILE_ENV} or ${KEY_ENV}): "
            "without it the audit trail cannot be verified"
        )
    return key


class PasswordReader:
    """Passwords from getpass prompts, or one per line from standard input with --password-stdin."""

    def __init__(self, from_stdin: bool) -> None:
        self.from_stdin = from_stdin

    def read(self, prompt: str, *, confirm: bool = False) -> str:
        if self.from_stdin:
            line = sys.stdin.readline()
            if not line:
                raise InputError(f"--password-stdin: standard input ended before the {prompt}")
            return line.rstrip("\r\n")
        password = getpass.getpass(f"{prompt}: ")
        if confirm and getpass.getpass(f"{prompt} again: ") != password:
            raise InputError("the two passwords typed differ; nothing was changed")
        return password


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("user", help="add, list and disable the accounts that sign QC records")
    actions = parser.add_subparsers(dest="user_command", metavar="ACTION", required=True)

    add = actions.add_parser("add", help="create an account (the first one: an admin, without another admin)")
    add.add_argument("username", help="login name, e.g. jdoe")
    add.add_argument("--name", required=True, help="printed name as it appears on a signature, e.g. 'Jane Doe'")
    add.add_argument("--role", required=True, choices=ROLES, help="what the account may do")
    add.add_argument("--admin", default=None, help="username of the admin adding it (not for the first account)")
    add.add_argument("--reason", default="account created", help="why (kept in the audit trail)")
    add_lab_options(add)
    add.set_defaults(func=_add)

    passwd = actions.add_parser("passwd", help="change your password, or (--admin) set someone's and unlock it")
    passwd.add_argument("username")
    passwd.add_argument("--admin", default=None, help="username of the admin setting another user's password")
    passwd.add_argument("--reason", default=None, help="why (kept in the audit trail)")
    add_lab_options(passwd)
    passwd.set_defaults(func=_passwd)

    disable = actions.add_parser("disable", help="close an account for good (its signatures keep its name)")
    disable.add_argument("username")
    disable.add_argument("--admin", required=True, help="username of the admin disabling it")
    disable.add_argument("--reason", required=True, help="why (kept in the audit trail)")
    add_lab_options(disable)
    disable.set_defaults(func=_disable)

    listing = actions.add_parser("list", help="list the accounts (never a password or its hash)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    add_lab_options(listing)
    listing.set_defaults(func=_list)


def _add(args: argparse.Namespace) -> int:
    files = lab_files(args)
    passwords = PasswordReader(args.password_stdin)
    with files.open_store(required_audit_key(args.key_file)) as store:
        admin = (
            None if args.admin is None else Credentials(args.admin, passwords.read(f"password of admin {args.admin}"))
        )
        password = passwords.read(f"new password for {args.username}", confirm=True)
        user = store.add_user(args.username, args.name, args.role, password, admin=admin, reason=args.reason)
    print(f"added {user.username} ({user.printed_name}, {user.role}) to {files.users}")
    return 0


def _passwd(args: argparse.Namespace) -> int:
    files = lab_files(args)
    passwords = PasswordReader(args.password_stdin)
    with files.open_store(required_audit_key(args.key_file)) as store:
        if args.admin is None:
            by = Credentials(args.username, passwords.read(f"current password of {args.username}"))
        else:
            by = Credentials(args.admin, passwords.read(f"password of admin {args.admin}"))
        new = passwords.read(f"new password for {args.username}", confirm=True)
        store.change_password(args.username, new, by=by, reason=args.reason)
    print(f"password of {args.username} changed")
    return 0


def _disable(args: argparse.Namespace) -> int:
    files = lab_files(args)
    with files.open_store(required_audit_key(args.key_file)) as store:
        admin = Credentials(args.admin, PasswordReader(args.password_stdin).read(f"password of admin {args.admin}"))
        user = store.disable(args.username, admin=admin, reason=args.reason)
    print(f"disabled {user.username} ({user.printed_name})")
    return 0


def _list(args: argparse.Namespace) -> int:
    files = lab_files(args)
    if not files.users.exists():
        raise InputError(f"no user store at {files.users} (the first `hotlab user add` creates it)")
    with files.open_store(hmac_key(args.key_file)) as store:
        users = store.users()
    if args.json:
        for user in users:
            print(json.dumps(asdict(user) | {"status": user.status}, ensure_ascii=False))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"accounts in {files.users}")
    for column in ("username", "printed name", "role", "status", "created (UTC)", "changed (UTC)"):
        table.add_column(column)
    for user in users:
        table.add_row(
            user.username,
            user.printed_name,
            user.role,
            user.status,
            iso_utc(user.created_ns)[:19],
            iso_utc(user.changed_ns)[:19],
        )
    Console().print(table)
    return 0
