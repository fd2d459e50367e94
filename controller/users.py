"""The accounts of the people who sign QC records: one SQLite store, argon2id password hashes, audited changes.

Why: an electronic signature is worth only its link to one person. 21 CFR 11.100 and 11.200(a)
ask for signatures unique to one individual, never reused or reassigned, made with two distinct
components (here the username and a password only that person knows), and 11.300 for
safeguards against their misuse; EU GMP Annex 11 §12 for access limited to authorised people.
So each account has a role (config.ROLES), a printed name (what a signature shows), and a
password kept only as an argon2id hash (RFC 9106, argon2-cffi's default cost). A username is
never reused: an account is disabled, not deleted. Every change, failure, refusal and lock is
written to the hash-chained audit trail (controller/audit.py) without the password or its hash,
and a username that is not valid is written there as "?", never as typed.

Lockout: `max_failed_passwords` wrong passwords in a row lock the account for `lockout_min`
minutes; after that each further wrong password locks it again, until a correct password or an
admin's new password (which also unlocks at once) resets the count. 21 CFR 11.300(d) asks for
safeguards against unauthorised use and for reporting attempts, but fixes no number; a time-based
lock keeps guessing to a few attempts an hour without letting anyone lock the last admin out for
good. The count, the lock check and the password check run in one `BEGIN IMMEDIATE` transaction,
so concurrent guesses (threads or processes) never get more checks than the limit. A disabled,
locked or unknown account still costs one argon2 verification, so timing does not tell which.

Bootstrapping: the first account may be created by nobody, and must be an admin; after that an
admin's own password authorises adding, disabling or resetting someone else's account, and a
user changes their own password with the current one. Keep two admins: the store has no back door.

Each change is one SQLite transaction (WAL) that appends its audit record before it commits, so
a change the trail does not show is never committed. The store file is created readable by its
owner only (SQLite gives its -wal and -shm files the same mode). argon2 and SQLite block: async
callers go through `asyncio.to_thread` (controller/signatures.py `sign_async`).
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from hotlab.controller.audit import USER_ADD, USER_AUTH_FAILED, USER_DISABLE, USER_LOCK, USER_PASSWD, AuditLog
from hotlab.controller.config import (
    DEFAULT_LOCKOUT_MIN,
    DEFAULT_MAX_FAILED_PASSWORDS,
    DEFAULT_MIN_PASSWORD_CHARS,
    ROLES,
)
from hotlab.controller.messages import iso_utc
from hotlab.controller.outbox import rollback_unless_done
from hotlab.errors import HotlabError, InputError

ADMIN = "admin"
#: SP 800-63B-4 §3.1.1.2: verifiers permit at least 64 characters; far longer only costs hashing time.
MAX_PASSWORD_CHARS = 256
USERNAME = re.compile(r"^[a-z][a-z0-9_.-]{1,31}$")
USERNAME_RULE = "2-32 characters: lower-case letters, digits, '_', '.', '-', starting with a letter"
MAX_PRINTED_NAME_CHARS = 100
#: The audit target of an account, and the prefix controller/signatures.py reads back.
ACCOUNT_TARGET_PREFIX = "user:"
#: What the trail shows for a username that is not valid: never the text as typed.
UNKNOWN_NAME = "?"
_NS_PER_MIN = 60_000_000_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS account (
    username         TEXT PRIMARY KEY,
    printed_name     TEXT NOT NULL,
    role             TEXT NOT NULL,
    password_hash    TEXT NOT NULL,
    disabled         INTEGER NOT NULL DEFAULT 0,
    locked_ns        INTEGER NOT NULL DEFAULT 0,
    failed_passwords INTEGER NOT NULL DEFAULT 0,
    created_ns       INTEGER NOT NULL,
    changed_ns       INTEGER NOT NULL
) WITHOUT ROWID;
"""
_COLUMNS = "username, printed_name, role, disabled, locked_ns, failed_passwords, created_ns, changed_ns"


class AccountError(InputError):
    """A request the store refuses as given: a bad username or name, a weak password, an unknown account."""


class AccessDenied(HotlabError):
    """Who asked could not be authenticated, or may not do it: wrong password, disabled, locked, role too low."""


@dataclass(frozen=True, slots=True)
class User:
    """An account as others may see it, at the time it was read: never the password hash."""

    username: str
    printed_name: str
    role: str
    disabled: bool
    #: When the lock in force ends (ns since the epoch); None when the account is not locked.
    locked_until_ns: int | None
    failed_passwords: int
    created_ns: int
    changed_ns: int

    @property
    def locked(self) -> bool:
        return self.locked_until_ns is not None

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


def account_target(username: str) -> str:
    """The audit `target` of an account's records ("user:jdoe"); "user:?" for a username that is not valid."""
    return ACCOUNT_TARGET_PREFIX + (username if USERNAME.match(username) else UNKNOWN_NAME)


def _logged_name(username: str) -> str:
    return username if USERNAME.match(username) else UNKNOWN_NAME


class UserStore:
    """The account store file. Thread-safe (one connection behind a lock); blocking, like the audit log."""

    def __init__(
        self,
        path: str | Path,
        audit: AuditLog,
        *,
        min_password_chars: int = DEFAULT_MIN_PASSWORD_CHARS,
        max_failed_passwords: int = DEFAULT_MAX_FAILED_PASSWORDS,
        lockout_min: int = DEFAULT_LOCKOUT_MIN,
    ) -> None:
        self.path = Path(path)
        self.audit = audit
        self.min_password_chars = min_password_chars
        self.max_failed_passwords = max_failed_passwords
        self.lockout_min = lockout_min
        self._hasher = PasswordHasher()  # argon2id, RFC 9106 low-memory profile
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))  # an existing file keeps its mode
        self._db = sqlite3.connect(self.path, timeout=5.0, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._upgrade_schema()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise AccountError(f"{self.path} is not a hotlab user store ({exc})") from None

    def _upgrade_schema(self) -> None:
        """A store from before time-based lockout has a `locked` flag where `locked_ns` now says since when;
        renamed, an old lock (1) began at the epoch and has expired, while its failure count stays."""
        columns = {str(row[1]) for row in self._db.execute("PRAGMA table_info(account)")}
        if "locked_ns" not in columns:
            self._db.execute("ALTER TABLE account RENAME COLUMN locked TO locked_ns")

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
        now = time.time_ns()
        return [self._user(row, now) for row in rows]

    def user(self, username: str) -> User | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM account WHERE username = ?", (username,)).fetchone()
        return None if row is None else self._user(row, time.time_ns())

    def _user(self, row: tuple[Any, ...], now: int) -> User:
        username, printed_name, role, disabled, locked_ns, failed, created_ns, changed_ns = row
        until = int(locked_ns) + self.lockout_min * _NS_PER_MIN
        return User(
            username=str(username),
            printed_name=str(printed_name),
            role=str(role),
            disabled=bool(disabled),
            locked_until_ns=until if locked_ns and now < until else None,
            failed_passwords=int(failed),
            created_ns=int(created_ns),
            changed_ns=int(changed_ns),
        )

    # ----------------------------------------------------------------------- authentication

    def authenticate(self, credentials: Credentials, *, purpose: str) -> User:
        """The account whose password this is, or AccessDenied. Every failure is audited with `purpose`
        (what was attempted), and a wrong password at or past `max_failed_passwords` in a row locks the
        account for `lockout_min` minutes. One transaction from reading the count to writing it back."""
        if not USERNAME.match(credentials.username):
            self._password_matches(self._decoy_hash, credentials.password)  # same time as a known user
            self._audit_failure(credentials.username, purpose, "the username is not valid", None)
            raise AccessDenied("unknown user or wrong password")
        with self._transaction() as db:
            outcome = self._check_password(db, credentials, purpose, time.time_ns())
        if isinstance(outcome, AccessDenied):
            raise outcome
        return outcome

    def _check_password(
        self, db: sqlite3.Connection, credentials: Credentials, purpose: str, now: int
    ) -> User | AccessDenied:
        """Inside the caller's transaction: check, count and audit; the refusal is returned so its writes commit."""
        username, password = credentials.username, credentials.password
        row = db.execute(f"SELECT {_COLUMNS}, password_hash FROM account WHERE username = ?", (username,)).fetchone()
        if row is None:
            self._password_matches(self._decoy_hash, password)
            self._audit_failure(username, purpose, "no such account", None)
            return AccessDenied(f"unknown user or wrong password for {username!r}")
        user, password_hash = self._user(row[:-1], now), str(row[-1])
        if user.disabled:
            return self._refuse(
                db, user, password, purpose, "the account is disabled", f"account {username!r} is disabled"
            )
        if user.locked_until_ns is not None:
            until = iso_utc(user.locked_until_ns)[:19]
            return self._refuse(
                db,
                user,
                password,
                purpose,
                f"the account is locked until {until} UTC",
                f"account {username!r} is locked until {until} UTC after {self.max_failed_passwords} failed "
                f"password checks; it unlocks then, or now when an admin sets a new password "
                f"(hotlab user passwd {username} --admin NAME)",
            )
        if not self._password_matches(password_hash, password):
            failed = user.failed_passwords + 1
            lock = failed >= self.max_failed_passwords
            db.execute(
                "UPDATE account SET failed_passwords = ?, locked_ns = ? WHERE username = ?",
                (failed, now if lock else 0, username),
            )
            self._audit_failure(username, purpose, "wrong password", failed)
            if not lock:
                return AccessDenied(f"unknown user or wrong password for {username!r}")
            self.audit.append(
                actor="hotlab",
                action=USER_LOCK,
                target=account_target(username),
                reason=f"{failed} failed password checks in a row (limit {self.max_failed_passwords}); "
                f"locked for {self.lockout_min} min",
                old_value={"locked": False},
                new_value={"locked": True, "until": iso_utc(now + self.lockout_min * _NS_PER_MIN)},
                time_ns=now,
            )
            return AccessDenied(
                f"wrong password for {username!r}; the account is now locked for {self.lockout_min} min after "
                f"{failed} failed password checks in a row"
            )
        if self._hasher.check_needs_rehash(password_hash):
            db.execute(
                "UPDATE account SET password_hash = ? WHERE username = ?",
                (self._hasher.hash(normalised_password(password)), username),
            )
        if user.failed_passwords:
            db.execute("UPDATE account SET failed_passwords = 0, locked_ns = 0 WHERE username = ?", (username,))
        return user

    def _refuse(
        self, db: sqlite3.Connection, user: User, password: str, purpose: str, why: str, message: str
    ) -> AccessDenied:
        """A refusal before any password check: counted and audited, after one verification against the
        decoy hash so that it takes as long as a check and its timing does not tell the account's state."""
        self._password_matches(self._decoy_hash, password)
        failed = user.failed_passwords + 1
        db.execute("UPDATE account SET failed_passwords = ? WHERE username = ?", (failed, user.username))
        self._audit_failure(user.username, purpose, why, failed)
        return AccessDenied(message)

    def authorise(self, credentials: Credentials, *, purpose: str, roles: Sequence[str]) -> User:
        """`authenticate`, then AccessDenied unless the account has one of `roles`; a refusal is audited."""
        actor = self.authenticate(credentials, purpose=purpose)
        if actor.role not in roles:
            self._audit_failure(actor.username, purpose, f"the role {actor.role} may not do this", None)
            raise AccessDenied(
                f"{purpose} needs the role {' or '.join(roles)}; {actor.username!r} has the role {actor.role}"
            )
        return actor

    def _password_matches(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, normalised_password(password))
        except (VerificationError, InvalidHashError):
            return False

    @cached_property
    def _decoy_hash(self) -> str:
        """What a refused account's password is checked against, so a refusal takes as long as a check."""
        return self._hasher.hash("no account has this password")

    def _audit_failure(self, username: str, purpose: str, why: str, failed: int | None) -> None:
        name = _logged_name(username)
        self.audit.append(
            actor=name,
            action=USER_AUTH_FAILED,
            target=account_target(name),
            reason=f"refused {purpose}: {why}",
            new_value=None if failed is None else {"failed_passwords": failed},
        )

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
        actor = (
            None if admin is None else self.authorise(admin, purpose=f"adding the account {username!r}", roles=(ADMIN,))
        )
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
                target=account_target(username),
                reason=reason if actor is not None else f"{reason} (first account of the store, no admin existed)",
                new_value={"username": username, "printed_name": printed_name, "role": role},
                time_ns=now,
            )
        created = self.user(username)
        assert created is not None
        return created

    def change_password(self, username: str, new_password: str, *, by: Credentials, reason: str | None = None) -> User:
        """Set a new password: the user themself (`by` holds their current one) or an admin (which also unlocks)."""
        username = _check_username(username)
        own = by.username == username
        actor = (
            self.authenticate(by, purpose="changing their own password")
            if own
            else self.authorise(by, purpose=f"setting the password of {username!r}", roles=(ADMIN,))
        )
        text = check_new_password(new_password, username=username, min_chars=self.min_password_chars)
        password_hash = self._hasher.hash(text)
        now = time.time_ns()
        with self._transaction() as db:
            target = self._existing(db, username, now)
            if target.disabled:
                raise AccountError(f"account {username!r} is disabled; a disabled account gets no new password")
            db.execute(
                "UPDATE account SET password_hash = ?, failed_passwords = 0, locked_ns = 0, changed_ns = ? "
                "WHERE username = ?",
                (password_hash, now, username),
            )
            self.audit.append(
                actor=actor.username,
                action=USER_PASSWD,
                target=account_target(username),
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
        username = _check_username(username)
        if not reason.strip():
            raise AccountError("disabling an account needs a reason")
        actor = self.authorise(admin, purpose=f"disabling the account {username!r}", roles=(ADMIN,))
        now = time.time_ns()
        with self._transaction() as db:
            target = self._existing(db, username, now)
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
                target=account_target(username),
                reason=reason,
                old_value={"disabled": False},
                new_value={"disabled": True},
                time_ns=now,
            )
        disabled = self.user(username)
        assert disabled is not None
        return disabled

    def _existing(self, db: sqlite3.Connection, username: str, now: int) -> User:
        row = db.execute(f"SELECT {_COLUMNS} FROM account WHERE username = ?", (username,)).fetchone()
        if row is None:
            raise AccountError(f"no account {username!r}")
        return self._user(row, now)

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
