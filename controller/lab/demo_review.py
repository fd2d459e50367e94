"""The demo's user accounts and its QC officer's signature (controller/users.py, controller/signatures.py).

`hotlab demo` creates a user store in its state directory with an admin and the QC officer, each
with a random password kept beside it in a file only the owner can read, so the demo's officer
can sign and a newcomer can try `hotlab review` with the same accounts. The store, the audit
trail it writes to and the archive are the demo's own; nothing here is a shortcut the real
commands do not take: a signature is the same `sign` call `hotlab review sign` makes.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from pathlib import Path

from hotlab.controller.archive import HistoryArchive
from hotlab.controller.audit import AuditLog
from hotlab.controller.lab.embedded_broker import write_file
from hotlab.controller.lab.qc_officer import Sign
from hotlab.controller.signatures import sign
from hotlab.controller.users import ADMIN, Credentials, UserStore

ADMIN_USER = "demo-admin"
QC_OFFICER_USER = "demo-qc-officer"


def user_store_path(state_dir: Path) -> Path:
    return state_dir / "users.sqlite3"


def password_file(state_dir: Path, username: str) -> Path:
    return state_dir / f"{username}.password"


def demo_signer(state_dir: Path, audit_path: Path, archive_path: Path, key: bytes) -> Sign:
    """Create the demo's accounts if needed (blocking: call in a thread); how its QC officer signs."""
    with UserStore(user_store_path(state_dir), AuditLog(audit_path, key=key)) as store:
        admin = _account(store, state_dir, ADMIN_USER, "Demo Admin", ADMIN, None)
        _account(store, state_dir, QC_OFFICER_USER, "Demo QC Officer", "qc_officer", admin)
    officer = Credentials(QC_OFFICER_USER, password_file(state_dir, QC_OFFICER_USER).read_text().strip())

    def approve(record_ids: Sequence[str]) -> str:
        with (
            UserStore(user_store_path(state_dir), AuditLog(audit_path, key=key)) as store,
            HistoryArchive(archive_path, read_only=True) as archive,
        ):
            signature = sign(
                store=store,
                archive=archive,
                credentials=officer,
                record_ids=record_ids,
                meaning="approved",
                comment="demo: procedures reviewed on the controller's records",
            )
        return f"signed {len(record_ids)} record(s) as {signature.meaning} (audit record #{signature.seq})"

    async def signer(record_ids: Sequence[str]) -> str:
        return await asyncio.to_thread(approve, record_ids)

    return signer


def _account(
    store: UserStore, state_dir: Path, username: str, printed_name: str, role: str, admin: Credentials | None
) -> Credentials:
    """The account `username`, created with a new random password (kept in its file) if the store lacks it."""
    path = password_file(state_dir, username)
    if store.user(username) is None:
        password = secrets.token_urlsafe(24)
        write_file(path, password + "\n", private=True)
        store.add_user(username, printed_name, role, password, admin=admin, reason="hotlab demo account")
    return Credentials(username, path.read_text().strip())
