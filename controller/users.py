"""The accounts of the people who sign QC records: one SQLite store, argon2id password hashes, audited changes.

Why: an electronic signature is worth only its link to one person. 21 CFR 11.100 and 11.200(a)
ask for signatures unique to one individual, never reused or reassigned, made with two distinct
components (here the username and a password only that person knows), and 11.300 for
safeguards against their misuse; EU GMP Annex 11 §12 for access limited to authorised people.
So each account has a role (config.ROLES), a printed name (what a signature shows), and a
password kept only as an argon2id hash (RFC 9106, argon2-cffi's default cost). A username is
never reused: an account is disabled, not deleted. Consecutive failed password checks lock an
account until an admin sets a new password, and every change, failure and lock is written to
the hash-chained audit trail (controller/audit.py) without the password or its hash.

Bootstrapping: the first account may be created by nobody, and must be an admin; after that an
admin's own password authorises adding, disabling or resetting someone else's account, and a
user changes their own password with the current one. Keep two admins: the store has no back door.

Each change is one SQLite transaction (WAL) that appends its audit record before it commits, so
a change the trail does not show is never committed. argon2 and SQLite block: async callers go
through `asyncio.to_thread` (controller/signatures.py `sign_async`).
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from hotlab.controller.audit import USER_ADD, USER_AUTH_FAILED, USER_DISABLE, USER_LOCK, USER_PASSWD, AuditLog
from hotlab.controller.config import DEFAULT_MAX_FAILED_PASSWORDS, DEFAULT_MIN_PASSWORD_CHARS, ROLES
from hotlab.controller.outbox import rollback_unless_done
from hotlab.errors import HotlabError, InputError

ADMIN = "admin"
#: SP 800-63B-4 §3.1.1.2: verifiers permit at least 64 characters; far longer only costs hashing time.
MAX_PASSWORD_CHARS = 256
USERNAME = re.compile(r"^[a-z][a-z0-9_.-]{1,31}$")
USERNAME_RULE = "2-32 characters: lower-case letters, digits, '_', '.', '-', starting with a letter"
MAX_PRINTED_NAME_CHARS = 100

_SCHEMA = """
CREATE TABLE IF NOT EXISTS account (
    username         TEXT PRIMARY KEY,
    printed_name     TEXT NOT NULL,
    role             TEXT NOT NULL,
    password_hash    TEXT NOT NULL,
    disabled         INTEGER NOT NULL DEFAULT 0,
    locked           INTEGER NOT NULL DEFAULT 0,
    failed_passwords INTEGER NOT NULL DEFAULT 0,
    created_ns       INTEGER NOT NULL,
    changed_ns       INTEGER NOT NULL
) WITHOUT ROWID;
"""
_COLUMNS = "username, printed_name, role, disabled, locked, failed_passwords, created_ns, changed_ns"


class AccountError(InputError):
    """A request the store refuses as given: a bad username or name, a weak password, an unknown account."""


class AccessDenied(HotlabError):
    """Who asked could not be authenticated, or may not do it: wrong password, disabled, locked, role too low."""


@dataclass(frozen=True, slots=True)
class User:
    """An account as others may see it: never the password hash."""

    username: str
    printed_name: str
    role: str
    disabled: bool
    locked: bool
    failed_passwords: int
    created_ns: int
    changed_ns: int

    @property
    def status(self) -> str:
        return "disabled" if self.disabled else "locked" if self.locked else "active"


@dataclass(frozen=True, slots=True)
class Credentials:
    """A username and the password its owner typed; the password never shows in a repr or log."""

    username: str
    password: str = field(repr=False)


def normalised_password(password: str) -> str:
    """SP 800-63B-4 §3.1.1.2: Unicode passwords are NFKC-normalised before hashing, so the same
    characters typed on another keyboard or system still match."""
    return unicodedata.normalize("NFKC", password)


def check_new_password(password: str, *, username: str, min_chars: int) -> str:
    """The normalised password if it may be set, else AccountError saying why.

    SP 800-63B-4 §3.1.1.2: length is what counts (each code point one character), no composition
    rules; a password equal to the username is the one context-specific guess refused here.
    """
    text = normalised_password(password)
    if len(text) < min_chars:
        raise AccountError(f"the password has {len(text)} characters; at least {min_chars} are needed")
    if len(text) > MAX_PASSWORD_CHARS:
        raise AccountError(f"the password has {len(text)} characters; at most {MAX_PASSWORD_CHARS} are accepted")
    if text.casefold() == username.casefold():
        raise AccountError("the password must not be the username")
    return text


def _check_username(username: str) -> str:
    if not USERNAME.match(username):
        raise AccountError(f"username {username!r} is not valid; expected {USERNAME_RULE}")
    return username


def _check_printed_name(name: str) -> str:
    text = " ".join(name.split())
    if not text or len(text) > MAX_PRINTED_NAME_CHARS or not text.isprintable():
        raise AccountError(
            f"the printed name must be 1-{MAX_PRINTED_NAME_CHARS} printable characters, as it appears on a signature"
        )
    return text


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise AccountError(f"role {role!r} is not known; allowed: {', '.join(ROLES)}")
    return role


def _target(username: str) -> str:
    return f"user:{username}"


class UserStore:
    """The account store file. Thread-safe (one connection behind a lock); blocking, like the audit log."""

    def __init__(
        self,
        path: str | Path,
        audit: AuditLog,
        *,
        min_password_chars: int = DEFAULT_MIN_PASSWORD_CHARS,
        max_failed_passwords: int = DEFAULT_MAX_FAILED_PASSWORDS,
    ) -> None:
        self.path = Path(path)
        self.audit = audit
        self.min_password_chars = min_password_chars
        self.max_failed_passwords = max_failed_passwords
        self._hasher = PasswordHasher()  # argon2id, RFC 9106 low-memory profile
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=5.0, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise AccountError(f"{self.path} is not a hotlab user store ({exc})") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> UserStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------- reading

    def users(self) -> list[User]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM account ORDER BY username").fetchall()
        return [_user(row) for row in rows]

    def user(self, username: str) -> User | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM account WHERE username = ?", (username,)).fetchone()
        return None if row is None else _user(row)

    # ----------------------------------------------------------------------- authentication

    def authenticate(self, credentials: Credentials, *, purpose: str) -> User:
        """The account whose password this is, or AccessDenied; every failure is audited, and the
        `max_failed_passwords`-th in a row locks the account. `purpose` says in the trail what for."""
        username = credentials.username
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS}, password_hash FROM account WHERE username = ?", (username,)
            ).fetchone()
        if row is None:
            self._password_matches(self._unknown_user_hash, credentials.password)  # same time as a known user
            self._record_failure(username, purpose, "no such account")
            raise AccessDenied(f"unknown user or wrong password for {username!r}")
        user, password_hash = _user(row[:-1]), row[-1]
        if user.disabled:
            self._record_failure(username, purpose, "the account is disabled")
            raise AccessDenied(f"account {username!r} is disabled")
        if user.locked:
            self._record_failure(username, purpose, "the account is locked")
            raise AccessDenied(
                f"account {username!r} is locked after {self.max_failed_passwords} failed password checks; "
                f"an admin unlocks it by setting a new password (hotlab user passwd {username} --admin NAME)"
            )
        if not self._password_matches(password_hash, credentials.password):
            locked_now = self._record_failure(username, purpose, "wrong password")
            if locked_now:
                raise AccessDenied(
                    f"wrong password for {username!r}; the account is now locked after "
                    f"{self.max_failed_passwords} failed password checks in a row"
                )
            raise AccessDenied(f"unknown user or wrong password for {username!r}")
        if user.failed_passwords:
            with self._transaction() as db:
                db.execute("UPDATE account SET failed_passwords = 0 WHERE username = ?", (username,))
        return user

    def _password_matches(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, normalised_password(password))
        except (VerificationError, InvalidHashError):
            return False

    @cached_property
    def _unknown_user_hash(self) -> str:
        return self._hasher.hash("no account has this password")

    def _record_failure(self, username: str, purpose: str, why: str) -> bool:
        """Count and audit one failed check; True if it locked the account just now."""
        with self._transaction() as db:
            row = db.execute("SELECT failed_passwords, locked FROM account WHERE username = ?", (username,)).fetchone()
            failed = None if row is None else row[0] + 1
            lock = row is not None and not row[1] and failed is not None and failed >= self.max_failed_passwords
            if row is not None:
                db.execute(
                    "UPDATE account SET failed_passwords = ?, locked = ? WHERE username = ?",
                    (failed, int(bool(row[1]) or lock), username),
                )
            self.audit.append(
                actor=username or "?",
                action=USER_AUTH_FAILED,
                target=_target(username or "?"),
                reason=f"password check for {purpose} failed: {why}",
                new_value=None if failed is None else {"failed_passwords": failed},
            )
            if lock:
                self.audit.append(
                    actor="hotlab",
                    action=USER_LOCK,
                    target=_target(username),
                    reason=f"{failed} failed password checks in a row (limit {self.max_failed_passwords})",
                    old_value={"locked": False},
                    new_value={"locked": True},
                )
        return lock

    def _require_admin(self, credentials: Credentials, purpose: str) -> User:
        actor = self.authenticate(credentials, purpose=purpose)
        if actor.role != ADMIN:
            raise AccessDenied(f"{actor.username!r} is a {actor.role}; only an admin may {purpose}")
        return actor

    # ----------------------------------------------------------------------- changes

    def add_user(
        self,
        username: str,
        printed_name: str,
        role: str,
        password: str,
        *,
        admin: Credentials | None,
        reason: str = "account created",
    ) -> User:
        """Create an account. `admin` None only for the first account of an empty store, which must be an admin."""
        username = _check_username(username)
        printed_name = _check_printed_name(printed_name)
        role = _check_role(role)
        password_hash = self._hasher.hash(
            check_new_password(password, username=username, min_chars=self.min_password_chars)
        )
        actor = None if admin is None else self._require_admin(admin, f"add the account {username!r}")
        now = time.time_ns()
        with self._transaction() as db:
            (count,) = db.execute("SELECT COUNT(*) FROM account").fetchone()
            if actor is None and count:
                raise AccessDenied("accounts exist already: an admin must add this one (give the admin's username)")
            if actor is None and role != ADMIN:
                raise AccountError(f"the first account must be an admin (it adds the others), not a {role}")
            if db.execute("SELECT 1 FROM account WHERE username = ?", (username,)).fetchone():
                raise AccountError(f"username {username!r} exists already (a username is never reused)")
            db.execute(
                "INSERT INTO account (username, printed_name, role, password_hash, created_ns, changed_ns) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (username, printed_name, role, password_hash, now, now),
            )
            self.audit.append(
                actor=username if actor is None else actor.username,
                action=USER_ADD,
                target=_target(username),
                reason=reason if actor is not None else f"{reason} (first account of the store, no admin existed)",
                new_value={"username": username, "printed_name": printed_name, "role": role},
                time_ns=now,
            )
        created = self.user(username)
        assert created is not None
        return created

    def change_password(self, username: str, new_password: str, *, by: Credentials, reason: str | None = None) -> User:
        """Set a new password: the user themself (`by` holds their current one) or an admin (which also unlocks)."""
        own = by.username == username
        actor = (
            self.authenticate(by, purpose="changing their own password")
            if own
            else self._require_admin(by, f"set the password of {username!r}")
        )
        text = check_new_password(new_password, username=username, min_chars=self.min_password_chars)
        password_hash = self._hasher.hash(text)
        now = time.time_ns()
        with self._transaction() as db:
            target = self._existing(db, username)
            if target.disabled:
                raise AccountError(f"account {username!r} is disabled; a disabled account gets no new password")
            db.execute(
                "UPDATE account SET password_hash = ?, failed_passwords = 0, locked = 0, changed_ns = ? "
                "WHERE username = ?",
                (password_hash, now, username),
            )
            self.audit.append(
                actor=actor.username,
                action=USER_PASSWD,
                target=_target(username),
                reason=reason or ("own password changed" if own else "password set by an admin"),
                old_value={"locked": target.locked},
                new_value={"locked": False},
                time_ns=now,
            )
        changed = self.user(username)
        assert changed is not None
        return changed

    def disable(self, username: str, *, admin: Credentials, reason: str) -> User:
        """Close an account for good (it stays, so its signatures keep their name); never the last active admin."""
        if not reason.strip():
            raise AccountError("disabling an account needs a reason")
        actor = self._require_admin(admin, f"disable the account {username!r}")
        now = time.time_ns()
        with self._transaction() as db:
            target = self._existing(db, username)
            if target.disabled:
                raise AccountError(f"account {username!r} is disabled already")
            if target.role == ADMIN:
                (admins,) = db.execute(
                    "SELECT COUNT(*) FROM account WHERE role = ? AND disabled = 0 AND username != ?", (ADMIN, username)
                ).fetchone()
                if not admins:
                    raise AccountError(f"{username!r} is the last active admin; add another admin first")
            db.execute("UPDATE account SET disabled = 1, changed_ns = ? WHERE username = ?", (now, username))
            self.audit.append(
                actor=actor.username,
                action=USER_DISABLE,
                target=_target(username),
                reason=reason,
                old_value={"disabled": False},
                new_value={"disabled": True},
                time_ns=now,
            )
        disabled = self.user(username)
        assert disabled is not None
        return disabled

    def _existing(self, db: sqlite3.Connection, username: str) -> User:
        row = db.execute(f"SELECT {_COLUMNS} FROM account WHERE username = ?", (username,)).fetchone()
        if row is None:
            raise AccountError(f"no account {username!r}")
        return _user(row)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One change: BEGIN IMMEDIATE (writers queue here), the caller's reads, writes and audit record, COMMIT."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                rollback_unless_done(self._db)
                raise


def _user(row: tuple[Any, ...]) -> User:
    username, printed_name, role, disabled, locked, failed, created_ns, changed_ns = row
    return User(
        username=str(username),
        printed_name=str(printed_name),
        role=str(role),
        disabled=bool(disabled),
        locked=bool(locked),
        failed_passwords=int(failed),
        created_ns=int(created_ns),
        changed_ns=int(changed_ns),
    )
