"""The simulated lab's user accounts and its QC officer's signature (controller/users.py, controller/signatures.py).

The simulated lab (`hotlab run`, `hotlab demo`) creates a user store with an admin, an operator and
the QC officer, each with a random password kept beside the store in a file only the owner can
read: the controller runs the consoles' signed commands for them (an account must be active), the
demo's officer signs with theirs, and a newcomer can try `hotlab review`, `hotlab cmd` or the web
panel with the same accounts. The store, the audit trail it writes to and the archive are the lab's
own; nothing here is a shortcut the real commands do not take: a signature is the same `sign` call
`hotlab review sign` makes.
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
from hotlab.controller.signatures import sign_async
from hotlab.controller.users import ADMIN, Credentials, UserStore

ADMIN_USER = "demo-admin"
OPERATOR_USER = "demo-operator"
QC_OFFICER_USER = "demo-qc-officer"
#: (username, printed name, role) of each account, the admin first: it adds the others.
DEMO_ACCOUNTS: tuple[tuple[str, str, str], ...] = (
    (ADMIN_USER, "Demo Admin", ADMIN),
    (OPERATOR_USER, "Demo Operator", "operator"),
    (QC_OFFICER_USER, "Demo QC Officer", "qc_officer"),
)
#: How long the officer waits for the records to sign to reach the archive (the history sink runs behind MQTT).
ARCHIVE_WAIT_S = 30.0


def user_store_path(state_dir: Path) -> Path:
    return state_dir / "users.sqlite3"


def password_file(state_dir: Path, username: str) -> Path:
    return state_dir / f"{username}.password"


def demo_accounts(store_path: Path, audit_path: Path, key: bytes | None) -> None:
    """Create the DEMO_ACCOUNTS the store at `store_path` lacks, their passwords in files beside it
    (blocking: call in a thread)."""
    with UserStore(store_path, AuditLog(audit_path, key=key)) as store:
        (admin_name, admin_printed, admin_role), *others = DEMO_ACCOUNTS
        admin = _account(store, store_path.parent, admin_name, admin_printed, admin_role, None)
        for username, printed_name, role in others:
            _account(store, store_path.parent, username, printed_name, role, admin)


def demo_signer(state_dir: Path, audit_path: Path, archive_path: Path, key: bytes) -> Sign:
    """Create the demo's accounts if needed (blocking: call in a thread); how its QC officer signs."""
    demo_accounts(user_store_path(state_dir), audit_path, key)
    officer = Credentials(QC_OFFICER_USER, password_file(state_dir, QC_OFFICER_USER).read_text().strip())

    def archived(record_ids: Sequence[str]) -> bool:
        with HistoryArchive(archive_path, read_only=True) as archive:
            return all(archive.get(record_id) is not None for record_id in record_ids)

    async def signer(record_ids: Sequence[str]) -> str:
        """Approve `record_ids` once the history sink has archived them (a signature hashes the archived record)."""
        async with asyncio.timeout(ARCHIVE_WAIT_S):
            while not await asyncio.to_thread(archived, record_ids):
                await asyncio.sleep(0.2)
        store = await asyncio.to_thread(UserStore, user_store_path(state_dir), AuditLog(audit_path, key=key))
        archive = await asyncio.to_thread(HistoryArchive, archive_path, read_only=True)
        try:
            signature = await sign_async(
                store=store,
                archive=archive,
                credentials=officer,
                record_ids=record_ids,
                meaning="approved",
                comment="demo: procedures reviewed on the controller's records",
            )
        finally:
            await asyncio.to_thread(archive.close)
            await asyncio.to_thread(store.close)
        return f"signed {len(record_ids)} record(s) as {signature.meaning} (audit record #{signature.seq})"

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
