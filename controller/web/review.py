"""The review page: what awaits review, and signing it with a meaning and a comment (an electronic signature).

Signing takes the two components 21 CFR 11.200(a)(1) asks for, typed again for each signature:
the signer's username and password (also EU GMP Annex 11 §14); the username must be that of
the person signed in, so a session left open cannot sign for someone else. The signature itself
is `controller/signatures.py` `sign_async`, the same as `hotlab review sign`: the password and
role are checked by the user store (a wrong password is audited and counts towards the lockout),
and the signature is one `record.signed` record of the keyed audit trail binding each record's
archived SHA-256. The page is for the roles that may sign (qc_officer, admin); others get 403.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from hotlab.controller.archive import HistoryArchive, TimeRange
from hotlab.controller.signatures import MEANINGS, Signature, UntrustedTrail, sign_async
from hotlab.controller.users import AccessDenied, Credentials
from hotlab.controller.web.auth import signed_in
from hotlab.controller.web.panel import Panel, require_role
from hotlab.controller.web.records_query import cursor_number, page_link, text
from hotlab.controller.web.records_review import REVIEW_PAGE_SIZE, ReviewFilter, read_review
from hotlab.errors import InputError

#: The lowest role that may sign (controller/signatures.py SIGNING_ROLES: qc_officer and admin).
SIGNING_ROLE = "qc_officer"
PATH = "/review"


def routes(panel: Panel) -> list[BaseRoute]:
    async def render(
        request: Request,
        *,
        status: int = 200,
        error: str | None = None,
        chosen: Sequence[str] = (),
        meaning: str | None = None,
        comment: str = "",
    ) -> Response:
        params = request.query_params
        context: dict[str, Any] = {"meanings": MEANINGS, "chosen": set(chosen), "meaning": meaning, "comment": comment}
        context |= {"params": params, "error": error, "page_size": REVIEW_PAGE_SIZE}
        try:
            since = text(params, "from")
            wanted = ReviewFilter(
                text(params, "device"),
                text(params, "test"),
                None if since is None else TimeRange.from_text(since, None),
            )
            awaiting_page = cursor_number(params, "page") or 0
            signed_page = cursor_number(params, "signed_page") or 0
            just_signed = cursor_number(params, "signed")
            review = await asyncio.to_thread(
                read_review,
                panel.history_path,
                panel.audit_path,
                panel.store.audit.key,
                wanted,
                awaiting_page=awaiting_page,
                signed_page=signed_page,
                just_signed=just_signed,
            )
        except InputError as exc:  # a filter that cannot be read, a file that is not an archive
            return panel.page(request, "review.html", context | {"review": None, "error": str(exc)}, 400)
        links = {
            "awaiting_next": _next(params, "page", awaiting_page, review.awaiting_total),
            "awaiting_previous": page_link(PATH, params, page=awaiting_page - 1) if awaiting_page else None,
            "signed_next": _next(params, "signed_page", signed_page, review.signed_total),
            "signed_previous": page_link(PATH, params, signed_page=signed_page - 1) if signed_page else None,
        }
        return panel.page(request, "review.html", context | links | {"review": review}, status)

    async def review_page(request: Request) -> Response:
        _, user = signed_in(request)
        require_role(user, SIGNING_ROLE)
        return await render(request)

    async def sign_records(request: Request) -> Response:
        _, user = signed_in(request)
        require_role(user, SIGNING_ROLE)
        form = await request.form()
        record_ids = [str(value) for value in form.getlist("record")]
        meaning = str(form.get("meaning") or "")
        comment = str(form.get("comment") or "")
        username = str(form.get("username") or "").strip()

        async def refused(status: int, error: str) -> Response:
            """The page again with the error in one line and the choices kept (never the password)."""
            return await render(
                request, status=status, error=error, chosen=record_ids, meaning=meaning, comment=comment
            )

        if not record_ids:
            return await refused(400, "Not signed: choose at least one record.")
        if username != user.username:
            return await refused(
                400, f"Not signed: sign with your own username ({user.username}), the person signed in."
            )
        credentials = Credentials(username, str(form.get("password") or ""))
        try:
            signature = await _sign(panel, credentials, record_ids, meaning, comment or None)
        except AccessDenied as exc:  # wrong password, locked, disabled: audited and counted by the store
            return await refused(401, f"Not signed: {exc}.")
        except UntrustedTrail as exc:
            return await refused(409, f"Not signed: {exc}")
        except InputError as exc:  # unknown meaning, rejection without a comment, already signed, no archive
            return await refused(400, f"Not signed: {exc}")
        return RedirectResponse(f"{PATH}?signed={signature.seq}", status_code=303)

    return [Route(PATH, review_page), Route(f"{PATH}/sign", sign_records, methods=["POST"])]


async def _sign(
    panel: Panel, credentials: Credentials, record_ids: list[str], meaning: str, comment: str | None
) -> Signature:
    """`sign_async` with the archive opened (and closed) on a worker thread, among the panel's password checks."""
    path = panel.history_path
    if path is None:
        raise InputError("the lab keeps no history archive ([history] enabled = false): there is nothing to sign")
    async with panel.password_checks:
        try:
            archive = await asyncio.to_thread(HistoryArchive, path, read_only=True)
        except FileNotFoundError:
            raise InputError(f"no history archive at {path}: there is nothing to sign") from None
        try:
            return await sign_async(
                store=panel.store,
                archive=archive,
                credentials=credentials,
                record_ids=record_ids,
                meaning=meaning,
                comment=comment,
            )
        finally:
            await asyncio.to_thread(archive.close)


def _next(params: QueryParams, name: str, page: int, total: int) -> str | None:
    return page_link(PATH, params, **{name: page + 1}) if (page + 1) * REVIEW_PAGE_SIZE < total else None
