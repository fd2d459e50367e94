"""The audit page: the verdict on the trail at the top, then its records, newest first, with filters.

Both are read on worker threads (controller/web/records_audit.py): verifying the chain hashes
the whole trail, and reading it is file I/O. The trail names every person's actions and every
refused password, so the page is for QC officers and admins (the reviewers of the trail, EU GMP
Annex 11 §9); others get 403.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from hotlab.controller.audit import (
    ELUTION_ABORT,
    ELUTION_START,
    FAULT_ACKNOWLEDGE,
    QC_MANUAL_ENTRY,
    RECORD_SIGNED,
    USER_ADD,
    USER_AUTH_FAILED,
    USER_DISABLE,
    USER_LOCK,
    USER_LOGIN,
    USER_LOGOUT,
    USER_PASSWD,
)
from hotlab.controller.web.auth import signed_in
from hotlab.controller.web.panel import Panel, require_role
from hotlab.controller.web.records_audit import AuditFilter, audit_page, check_trail
from hotlab.controller.web.records_query import PAGE_SIZE, cursor_number, page_link, period, text
from hotlab.errors import InputError

#: The lowest role that reads the trail.
AUDIT_ROLE = "qc_officer"
PATH = "/audit"
#: Offered as the action filter's suggestions; any dotted name can be typed.
KNOWN_ACTIONS = (
    ELUTION_START,
    ELUTION_ABORT,
    FAULT_ACKNOWLEDGE,
    QC_MANUAL_ENTRY,
    RECORD_SIGNED,
    USER_LOGIN,
    USER_LOGOUT,
    USER_AUTH_FAILED,
    USER_LOCK,
    USER_ADD,
    USER_PASSWD,
    USER_DISABLE,
)


def routes(panel: Panel) -> list[BaseRoute]:
    async def audit(request: Request) -> Response:
        _, user = signed_in(request)
        require_role(user, AUDIT_ROLE)
        params = request.query_params
        context = {"params": params, "actions": KNOWN_ACTIONS, "page_size": PAGE_SIZE}
        check = await asyncio.to_thread(check_trail, panel.audit_path, panel.store.audit.key, panel.history_path)
        try:
            wanted = AuditFilter(
                actor=text(params, "actor"),
                action=text(params, "action"),
                target=text(params, "target"),
                period=period(params, default_days=None).range,
            )
            before, after = cursor_number(params, "before"), cursor_number(params, "after")
        except InputError as exc:
            return panel.page(request, "audit.html", context | {"check": check, "page": None, "error": str(exc)}, 400)
        page = await asyncio.to_thread(audit_page, panel.audit_path, wanted, before=before, after=after)
        links = {
            "newest": None if before is None and after is None else page_link(PATH, params, before=None, after=None),
            "newer": None if page.newer_after is None else page_link(PATH, params, before=None, after=page.newer_after),
            "older": None
            if page.older_before is None
            else page_link(PATH, params, after=None, before=page.older_before),
        }
        return panel.page(request, "audit.html", context | links | {"check": check, "page": page, "error": None})

    return [Route(PATH, audit)]
