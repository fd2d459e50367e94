"""The user store: argon2id hashes only, the first account an admin, lockout, disabled accounts, every change audited."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from argon2 import PasswordHasher

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
from hotlab.controller.users import AccessDenied, AccountError, Credentials, UserStore

ADMIN_PW = "admin passphrase one"
QC_PW = "qc officer passphrase"
OPERATOR_PW = "operator passphrase"
MAX_FAILED = 3


@pytest.fixture
def store(tmp_path: Path) -> UserStore:
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
    with pytest.raises(AccessDenied, match="only an admin"):
        store.add_user("op", "Otto Operator", "operator", OPERATOR_PW, admin=Credentials("jdoe", QC_PW))
    assert actions(store) == [
        ("root", USER_ADD, "user:root"),
        ("root", USER_ADD, "user:jdoe"),
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
    with pytest.raises(AccessDenied, match="only an admin"):
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
    with pytest.raises(AccessDenied, match="only an admin"):
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
    config = parse_config({"site": {"name": "lab"}, "users": {"min_password_chars": 12, "max_failed_passwords": 4}})
    assert (config.users.min_password_chars, config.users.max_failed_passwords) == (12, 4)
    assert config.users.resolved_path(Path("/var/lab/audit.jsonl")) == Path("/var/lab/users.sqlite3")
    with pytest.raises(ConfigError, match="users.min_password_chars: must be >= 8"):
        parse_config({"site": {"name": "lab"}, "users": {"min_password_chars": 6}})
    with pytest.raises(ConfigError, match="did you mean 'max_failed_passwords'"):
        parse_config({"site": {"name": "lab"}, "users": {"max_failed_password": 4}})
