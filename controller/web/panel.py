"""What every page of one lab's panel shares: the lab, its live feed, its people, and how a page is rendered.

One object handed to each page module (overview, station, calibrator, QC, review, audit), so
a page reads the lab the same way as every other and cannot forget the session's CSRF token in
its forms or the role check of its actions. Password checks (argon2id, 64 MiB each) run on
worker threads, at most PASSWORD_CHECKS_AT_ONCE at a time, for sign-in and for every signed
action alike.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from hotlab.controller.config import ROLES, DeviceConfig, LabConfig
from hotlab.controller.users import Credentials, User, UserStore
from hotlab.controller.web.auth import CSRF_FIELD, Sessions, signed_in
from hotlab.controller.web.live import LiveFeed
from hotlab.controller.web.overview import archived

if TYPE_CHECKING:
    from hotlab.controller.web.commands import CommandSender

HERE = Path(__file__).parent
#: argon2id checks at once: a flood of sign-ins waits instead of taking every worker thread
#: (and the audit writes queued behind them).
PASSWORD_CHECKS_AT_ONCE = 2
#: An archive read is reused this long at most while the bus brought no message of its kind: the
#: archive also holds what the panel did not see (records archived late, another panel's commands).
ARCHIVE_REUSE_S = 30.0
#: The pages of the navigation bar: (path, label); device pages are reached from the overview.
NAVIGATION: tuple[tuple[str, str], ...] = (
    ("/", "Lab"),
    ("/qc", "QC"),
    ("/review", "Review"),
    ("/audit", "Audit"),
)


@dataclass(frozen=True, slots=True)
class _ArchiveRead:
    #: How many messages of the kind the bus had brought when the archive was read.
    seen: int
    since_ns: int
    at: float
    rows: list[dict[str, Any]]


@dataclass
class Panel:
    """One lab's panel. `commands` is None when no sender key is configured: pages then show, never act."""

    config: LabConfig
    feed: LiveFeed
    store: UserStore
    sessions: Sessions = field(default_factory=Sessions)
    commands: CommandSender | None = None
    templates: Jinja2Templates = field(default_factory=lambda: Jinja2Templates(directory=HERE / "templates"))
    password_checks: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(PASSWORD_CHECKS_AT_ONCE))
    _archive_reads: dict[tuple[Any, ...], _ArchiveRead] = field(default_factory=dict, repr=False)

    @property
    def site(self) -> str:
        return self.config.site

    @property
    def audit_path(self) -> Path:
        return self.store.audit.path

    @property
    def history_path(self) -> Path | None:
        """The lab's permanent archive, read only; None when the lab keeps none."""
        return self.config.history_path

    async def archived(self, kind: str, since_ns: int, **where: str) -> list[dict[str, Any]]:
        """The newest messages of `kind` since `since_ns` from the archive (overview.archived: at most
        ARCHIVED_ROWS), oldest first.

        A live page re-renders after every change on the bus, up to ten times a second; it reads the
        archive again only when a message of `kind` arrived since its last read (or after
        ARCHIVE_REUSE_S), so a reading from another device costs no database query.
        """
        key = (kind, *sorted(where.items()))
        seen = self.feed.view.counts[kind]
        read = self._archive_reads.get(key)
        now = time.monotonic()
        if read is None or read.seen != seen or read.since_ns > since_ns or now - read.at > ARCHIVE_REUSE_S:
            rows = await asyncio.to_thread(archived, self.history_path, kind, since_ns, **where)
            read = self._archive_reads[key] = _ArchiveRead(seen, since_ns, now, rows)
        return [row for row in read.rows if int(row.get("time_ns") or 0) >= since_ns]

    def device(self, request: Request, *, station: bool) -> DeviceConfig:
        """The device the request's path names, of the kind its page shows (a station or a calibrator); 404 if not."""
        name = request.path_params["device"]
        device = next((d for d in self.config.devices if d.name == name), None)
        if device is None:
            raise HTTPException(404, f"no device {name!r} in this lab's configuration")
        if device.is_station != station:
            page = "station" if device.is_station else "calibrator"
            raise HTTPException(404, f"{name} is not shown on this page: its page is /{page}/{name}")
        return device

    async def authenticate(self, credentials: Credentials, *, purpose: str) -> User:
        """The account whose password this is, or AccessDenied (audited with `purpose`, counted for lockout)."""
        async with self.password_checks:
            return await asyncio.to_thread(self.store.authenticate, credentials, purpose=purpose)

    def page(self, request: Request, template: str, context: Mapping[str, Any], status_code: int = 200) -> Response:
        """`template` for the signed-in user, with what base.html needs (who, navigation, CSRF field)."""
        session, user = signed_in(request)
        full = {
            "site": self.site,
            "user": user,
            "navigation": NAVIGATION,
            "path": request.url.path,
            "csrf_field": CSRF_FIELD,
            "csrf": session.csrf_token,
        } | dict(context)
        return self.templates.TemplateResponse(request, template, full, status_code=status_code)


def require_role(user: User, role: str) -> None:
    """403 unless `user`'s role is `role` or above (config.ROLES is ordered from least to most)."""
    if ROLES.index(user.role) < ROLES.index(role):
        raise HTTPException(403, f"this needs the role {role} or higher; {user.username} is {user.role}")
