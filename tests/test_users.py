"""The user store: argon2id hashes only, the first account an admin, lockout, disabled accounts, every change audited."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from hotlab.controller import users as users_module
from hotlab.controller.audit import (
    USER_ADD,
    USER_AUTH_FAILED,
    USER_DISABLE,
    USER_LOCK,
    USER_PASSWD,
    AuditLog,
    iter_records,
    verify_chain,
)
from hotlab.controller.config import parse_config
from hotlab.controller.config_table import ConfigError
from hotlab.controller.messages import iso_utc
from hotlab.controller.users import AccessDenied, AccountError, Credentials, UserStore

ADMIN_PW = "admin passphrase one"
QC_PW = "qc officer passphrase"
OPERATOR_PW = "operator passphrase"
MAX_FAILED = 3


MINUTE_NS = 60 * 10**9


@pytest.fixture
def store(tmp_path: Path) -> Iterator[UserStore]:
    with UserStore(
        tmp_path / "users.sqlite3", AuditLog(tmp_path / "audit.jsonl"), max_failed_passwords=MAX_FAILED
    ) as s:
        yield s


@pytest.fixture
def staffed(store: UserStore) -> UserStore:
    store.add_user("root", "Ada Admin", "admin", ADMIN_PW, admin=None)
    admin = Credentials("root", ADMIN_PW)
    store.add_user("jdoe", "Jane Doe", "qc_officer", QC_PW, admin=admin)
    store.add_user("op", "Otto Operator", "operator", OPERATOR_PW, admin=admin)
    return store


def actions(store: UserStore) -> list[tuple[str, str, str]]:
    return [(r.actor, r.action, r.target) for r in iter_records(store.audit.path)]


def test_the_first_account_is_an_admin_made_without_one_and_the_rest_need_an_admin(store: UserStore) -> None:
    with pytest.raises(AccountError, match="first account must be an admin"):
        store.add_user("jdoe", "Jane Doe", "qc_officer", QC_PW, admin=None)
    store.add_user("root", "Ada Admin", "admin", ADMIN_PW, admin=None)
    with pytest.raises(AccessDenied, match="an admin must add"):
        store.add_user("jdoe", "Jane Doe", "qc_officer", QC_PW, admin=None)
    store.add_user("jdoe", "Jane Doe", "qc_officer", QC_PW, admin=Credentials("root", ADMIN_PW))
    with pytest.raises(AccessDenied, match="needs the role admin; 'jdoe' has the role qc_officer"):
        store.add_user("op", "Otto Operator", "operator", OPERATOR_PW, admin=Credentials("jdoe", QC_PW))
    assert actions(store) == [
        ("root", USER_ADD, "user:root"),
        ("root", USER_ADD, "user:jdoe"),
        ("jdoe", USER_AUTH_FAILED, "user:jdoe"),  # the refusal for the role is audited too
    ]
    assert [(u.username, u.role, u.status) for u in store.users()] == [
        ("jdoe", "qc_officer", "active"),
        ("root", "admin", "active"),
    ]


def test_only_an_argon2id_hash_is_stored_and_no_password_or_hash_reaches_the_trail(
    staffed: UserStore, tmp_path: Path
) -> None:
    staffed.close()
    with sqlite3.connect(tmp_path / "users.sqlite3") as db:
        stored = dict(db.execute("SELECT username, password_hash FROM account").fetchall())
    assert all(h.startswith("$argon2id$") for h in stored.values())
    assert PasswordHasher().verify(stored["jdoe"], QC_PW)  # the library's own check, not ours
    trail = (tmp_path / "audit.jsonl").read_text()
    for secret in (ADMIN_PW, QC_PW, OPERATOR_PW, *stored.values()):
        assert secret not in trail
    files = b"".join(p.read_bytes() for p in tmp_path.glob("users.sqlite3*"))
    assert not any(pw.encode() in files for pw in (ADMIN_PW, QC_PW, OPERATOR_PW))


def test_a_password_needs_15_characters_counted_as_code_points_and_is_nfkc_normalised(store: UserStore) -> None:
    # NIST SP 800-63B-4 §3.1.1.2: 15 characters for a password used on its own; each code point counts one.
    with pytest.raises(AccountError, match="14 characters; at least 15"):
        store.add_user("root", "Ada Admin", "admin", "x" * 14, admin=None)
    with pytest.raises(AccountError, match="must not be the username"):
        store.add_user("administrator01", "Ada Admin", "admin", "Administrator01", admin=None)
    fullwidth = "".join(chr(0xFF21 + i) for i in range(15))  # FULLWIDTH LATIN CAPITAL A..O: NFKC gives A..O
    store.add_user("root", "Ada Admin", "admin", fullwidth, admin=None)
    ascii_equivalent = "".join(chr(ord("A") + i) for i in range(15))
    assert store.authenticate(Credentials("root", ascii_equivalent), purpose="a test").username == "root"


def test_consecutive_failures_lock_the_account_until_an_admin_sets_a_password(staffed: UserStore) -> None:
    wrong = Credentials("jdoe", "not her passphrase at all")
    for attempt in range(1, MAX_FAILED + 1):
        with pytest.raises(AccessDenied, match="now locked" if attempt == MAX_FAILED else "wrong password"):
            staffed.authenticate(wrong, purpose="a test")
    with pytest.raises(AccessDenied, match="is locked"):
        staffed.authenticate(Credentials("jdoe", QC_PW), purpose="a test")
    user = staffed.user("jdoe")
    assert user is not None and user.locked and user.status == "locked"
    failures = [r for r in iter_records(staffed.audit.path) if r.action == USER_AUTH_FAILED]
    assert [r.new_value for r in failures] == [{"failed_passwords": n} for n in range(1, MAX_FAILED + 2)]
    locks = [r for r in iter_records(staffed.audit.path) if r.action == USER_LOCK]
    assert len(locks) == 1 and locks[0].target == "user:jdoe"

    staffed.change_password("jdoe", "a brand new passphrase", by=Credentials("root", ADMIN_PW))
    assert staffed.authenticate(Credentials("jdoe", "a brand new passphrase"), purpose="a test").role == "qc_officer"
    passwd = [r for r in iter_records(staffed.audit.path) if r.action == USER_PASSWD][-1]
    assert (passwd.actor, passwd.old_value, passwd.new_value) == ("root", {"locked": True}, {"locked": False})


def test_a_success_resets_the_failure_count(staffed: UserStore) -> None:
    for _ in range(MAX_FAILED - 1):
        with pytest.raises(AccessDenied):
            staffed.authenticate(Credentials("op", "wrong wrong wrong"), purpose="a test")
    staffed.authenticate(Credentials("op", OPERATOR_PW), purpose="a test")
    with pytest.raises(AccessDenied):
        staffed.authenticate(Credentials("op", "wrong wrong wrong"), purpose="a test")
    user = staffed.user("op")
    assert user is not None and not user.locked and user.failed_passwords == 1


def test_unknown_users_are_refused_and_audited(staffed: UserStore) -> None:
    with pytest.raises(AccessDenied, match="unknown user or wrong password"):
        staffed.authenticate(Credentials("mallory", "whatever whatever"), purpose="a test")
    last = list(iter_records(staffed.audit.path))[-1]
    assert (last.action, last.target, last.new_value) == (USER_AUTH_FAILED, "user:mallory", None)


def test_a_disabled_account_is_refused_kept_and_its_name_never_reused(staffed: UserStore) -> None:
    admin = Credentials("root", ADMIN_PW)
    with pytest.raises(AccountError, match="needs a reason"):
        staffed.disable("jdoe", admin=admin, reason=" ")
    with pytest.raises(AccessDenied, match="needs the role admin"):
        staffed.disable("op", admin=Credentials("jdoe", QC_PW), reason="left")
    staffed.disable("jdoe", admin=admin, reason="left the department")
    with pytest.raises(AccessDenied, match="is disabled"):
        staffed.authenticate(Credentials("jdoe", QC_PW), purpose="a test")
    with pytest.raises(AccountError, match="never reused"):
        staffed.add_user("jdoe", "John Doe", "operator", "another passphrase", admin=admin)
    with pytest.raises(AccountError, match="last active admin"):
        staffed.disable("root", admin=admin, reason="oops")
    record = next(r for r in iter_records(staffed.audit.path) if r.action == USER_DISABLE)
    assert (record.actor, record.target, record.reason) == ("root", "user:jdoe", "left the department")
    assert (record.old_value, record.new_value) == ({"disabled": False}, {"disabled": True})


def test_a_user_changes_their_own_password_with_the_current_one_only(staffed: UserStore) -> None:
    with pytest.raises(AccessDenied):
        staffed.change_password("jdoe", "my next passphrase", by=Credentials("jdoe", "not the current one"))
    with pytest.raises(AccessDenied, match="needs the role admin"):
        staffed.change_password("op", "my next passphrase", by=Credentials("jdoe", QC_PW))
    staffed.change_password("jdoe", "my next passphrase", by=Credentials("jdoe", QC_PW))
    with pytest.raises(AccessDenied):
        staffed.authenticate(Credentials("jdoe", QC_PW), purpose="a test")
    assert staffed.authenticate(Credentials("jdoe", "my next passphrase"), purpose="a test").username == "jdoe"


def test_every_change_is_in_one_intact_chain(staffed: UserStore) -> None:
    staffed.change_password("op", "operator passphrase 2", by=Credentials("op", OPERATOR_PW))
    staffed.disable("op", admin=Credentials("root", ADMIN_PW), reason="account no longer needed")
    assert verify_chain(staffed.audit.path).ok
    assert [a for _, a, _ in actions(staffed)] == [USER_ADD, USER_ADD, USER_ADD, USER_PASSWD, USER_DISABLE]
    add = next(iter_records(staffed.audit.path))
    assert add.new_value == {"username": "root", "printed_name": "Ada Admin", "role": "admin"}


def test_bad_names_and_roles_are_refused(store: UserStore) -> None:
    with pytest.raises(AccountError, match="username 'Root Admin' is not valid"):
        store.add_user("Root Admin", "Ada Admin", "admin", ADMIN_PW, admin=None)
    with pytest.raises(AccountError, match="role 'boss' is not known"):
        store.add_user("root", "Ada Admin", "boss", ADMIN_PW, admin=None)
    with pytest.raises(AccountError, match="printed name"):
        store.add_user("root", "  ", "admin", ADMIN_PW, admin=None)
    assert store.users() == []


def test_users_table_of_the_lab_config() -> None:
    users = {"min_password_chars": 12, "max_failed_passwords": 4, "lockout_min": 60}
    config = parse_config({"site": {"name": "lab"}, "users": users})
    assert (config.users.min_password_chars, config.users.max_failed_passwords, config.users.lockout_min) == (12, 4, 60)
    assert parse_config({"site": {"name": "lab"}}).users.lockout_min == 15
    assert config.users.resolved_path(Path("/var/lab/audit.jsonl")) == Path("/var/lab/users.sqlite3")
    with pytest.raises(ConfigError, match="users.min_password_chars: must be >= 8"):
        parse_config({"site": {"name": "lab"}, "users": {"min_password_chars": 6}})
    with pytest.raises(ConfigError, match="did you mean 'max_failed_passwords'"):
        parse_config({"site": {"name": "lab"}, "users": {"max_failed_password": 4}})


def rewind_lock(path: Path, username: str, minutes: int) -> None:
    """Move the start of an account's lock `minutes` into the past, as if that much time had gone by."""
    with sqlite3.connect(path) as db:
        db.execute("UPDATE account SET locked_ns = locked_ns - ? WHERE username = ?", (minutes * MINUTE_NS, username))


def test_concurrent_wrong_passwords_get_no_more_checks_than_the_limit(staffed: UserStore, tmp_path: Path) -> None:
    """Eight connections (as eight processes would have) guess at once: only MAX_FAILED passwords are checked,
    the rest are refused as locked, and the count in the store is exact."""
    guesses = 8
    start = threading.Barrier(guesses)
    outcomes: list[str] = []

    def guess(n: int) -> None:
        with UserStore(staffed.path, AuditLog(staffed.audit.path), max_failed_passwords=MAX_FAILED) as own:
            start.wait()
            try:
                own.authenticate(Credentials("jdoe", f"guess number {n} of many"), purpose="a test")
            except AccessDenied as exc:
                outcomes.append(str(exc))

    threads = [threading.Thread(target=guess, args=(n,)) for n in range(guesses)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(outcomes) == guesses
    failures = [r for r in iter_records(staffed.audit.path) if r.action == USER_AUTH_FAILED]
    checked = [r for r in failures if r.reason.endswith(": wrong password")]
    assert len(checked) == MAX_FAILED
    assert sorted(r.new_value["failed_passwords"] for r in failures) == list(range(1, guesses + 1))
    assert len([r for r in iter_records(staffed.audit.path) if r.action == USER_LOCK]) == 1
    user = staffed.user("jdoe")
    assert user is not None and user.locked and user.failed_passwords == guesses
    assert verify_chain(staffed.audit.path).ok


def test_a_username_that_is_not_valid_never_reaches_the_trail_as_typed(staffed: UserStore) -> None:
    typed = 'x","action":"user.add"}\nROOT'
    with pytest.raises(AccessDenied, match="unknown user or wrong password"):
        staffed.authenticate(Credentials(typed, "whatever whatever"), purpose="a test")
    last = list(iter_records(staffed.audit.path))[-1]
    assert (last.actor, last.action, last.target) == ("?", USER_AUTH_FAILED, "user:?")
    assert "ROOT" not in staffed.audit.path.read_text()
    with pytest.raises(AccountError, match="is not valid"):  # refused before any password check or audit record
        staffed.disable("Mallory Admin", admin=Credentials("root", ADMIN_PW), reason="test")
    assert list(iter_records(staffed.audit.path))[-1] == last


def test_the_store_file_and_its_wal_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)  # the usual umask, which would leave a new file world-readable
    try:
        with UserStore(tmp_path / "users.sqlite3", AuditLog(tmp_path / "audit.jsonl")) as store:
            store.add_user("root", "Ada Admin", "admin", ADMIN_PW, admin=None)
            files = sorted(tmp_path.glob("users.sqlite3*"))
            assert [f.name for f in files] == ["users.sqlite3", "users.sqlite3-shm", "users.sqlite3-wal"]
            assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o600 for f in files}
    finally:
        os.umask(old_umask)


def test_a_lock_lasts_lockout_min_then_the_right_password_works_again(staffed: UserStore) -> None:
    """The only admin locked out by someone guessing is back after lockout_min (default 15) minutes."""
    assert staffed.lockout_min == 15
    for _ in range(MAX_FAILED):
        with pytest.raises(AccessDenied):
            staffed.authenticate(Credentials("root", "someone guessing"), purpose="a test")
    lock = next(r for r in iter_records(staffed.audit.path) if r.action == USER_LOCK)
    assert lock.new_value == {"locked": True, "until": iso_utc(lock.time_ns + 15 * MINUTE_NS)}
    user = staffed.user("root")
    assert user is not None and user.locked_until_ns == lock.time_ns + 15 * MINUTE_NS
    with pytest.raises(AccessDenied, match=f"locked until {iso_utc(lock.time_ns + 15 * MINUTE_NS)[:19]} UTC"):
        staffed.authenticate(Credentials("root", ADMIN_PW), purpose="a test")
    rewind_lock(staffed.path, "root", 14)
    with pytest.raises(AccessDenied, match="is locked"):
        staffed.authenticate(Credentials("root", ADMIN_PW), purpose="a test")
    rewind_lock(staffed.path, "root", 2)  # 16 minutes in all
    assert staffed.authenticate(Credentials("root", ADMIN_PW), purpose="a test").role == "admin"
    user = staffed.user("root")
    assert user is not None and (user.status, user.failed_passwords) == ("active", 0)


def test_after_a_lock_ends_each_further_wrong_password_locks_again(staffed: UserStore) -> None:
    for _ in range(MAX_FAILED):
        with pytest.raises(AccessDenied):
            staffed.authenticate(Credentials("jdoe", "someone guessing"), purpose="a test")
    rewind_lock(staffed.path, "jdoe", 16)
    with pytest.raises(AccessDenied, match="now locked"):
        staffed.authenticate(Credentials("jdoe", "one more guess"), purpose="a test")
    assert len([r for r in iter_records(staffed.audit.path) if r.action == USER_LOCK]) == 2


class CountingHasher(PasswordHasher):
    """argon2-cffi's own hasher, counting the verifications it runs."""

    verifications = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        CountingHasher.verifications += 1
        return super().verify(hash, password)


def test_every_refusal_costs_one_argon2_verification(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unknown, disabled, locked and malformed names take one verification each, as a wrong password does,
    so the time a refusal takes does not tell which accounts exist or what state they are in."""
    monkeypatch.setattr(users_module, "PasswordHasher", CountingHasher)
    with UserStore(tmp_path / "u.sqlite3", AuditLog(tmp_path / "a.jsonl"), max_failed_passwords=1) as store:
        store.add_user("root", "Ada Admin", "admin", ADMIN_PW, admin=None)
        admin = Credentials("root", ADMIN_PW)
        store.add_user("gone", "Gina Gone", "operator", OPERATOR_PW, admin=admin)
        store.add_user("jdoe", "Jane Doe", "qc_officer", QC_PW, admin=admin)
        store.disable("gone", admin=admin, reason="left")
        with pytest.raises(AccessDenied, match="now locked"):
            store.authenticate(Credentials("jdoe", "wrong wrong wrong"), purpose="a test")
        for username in ("nobody", "gone", "jdoe", "Not Valid", "root"):
            before = CountingHasher.verifications
            with pytest.raises(AccessDenied):
                store.authenticate(Credentials(username, "wrong wrong wrong"), purpose="a test")
            assert CountingHasher.verifications - before == 1, username


def test_a_hash_of_an_older_cost_is_replaced_at_the_next_successful_check(staffed: UserStore) -> None:
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(QC_PW)
    with sqlite3.connect(staffed.path) as db:
        db.execute("UPDATE account SET password_hash = ? WHERE username = 'jdoe'", (weak,))
    staffed.authenticate(Credentials("jdoe", QC_PW), purpose="a test")
    with sqlite3.connect(staffed.path) as db:
        (stored,) = db.execute("SELECT password_hash FROM account WHERE username = 'jdoe'").fetchone()
    # RFC 9106 §4, second recommended option (argon2-cffi's default): t=3 passes, m=64 MiB, p=4 lanes.
    assert stored.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert PasswordHasher().verify(stored, QC_PW)


def test_a_store_from_before_time_based_lockout_opens(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "old.sqlite3") as db:
        db.execute(
            "CREATE TABLE account (username TEXT PRIMARY KEY, printed_name TEXT NOT NULL, role TEXT NOT NULL, "
            "password_hash TEXT NOT NULL, disabled INTEGER NOT NULL DEFAULT 0, locked INTEGER NOT NULL DEFAULT 0, "
            "failed_passwords INTEGER NOT NULL DEFAULT 0, created_ns INTEGER NOT NULL, changed_ns INTEGER NOT NULL"
            ") WITHOUT ROWID"
        )
        row: tuple[Any, ...] = ("root", "Ada Admin", "admin", PasswordHasher().hash(ADMIN_PW), 0, 1, 5, 1, 1)
        db.execute("INSERT INTO account VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
    with UserStore(tmp_path / "old.sqlite3", AuditLog(tmp_path / "a.jsonl")) as store:
        old = store.user("root")
        assert old is not None and not old.locked and old.failed_passwords == 5
        assert store.authenticate(Credentials("root", ADMIN_PW), purpose="a test").username == "root"
