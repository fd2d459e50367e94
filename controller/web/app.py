"""The panel's application: login and logout, the lab overview and its live stream (server-sent events),
and the routes of each page module (station, calibrator, QC, review, audit).

The overview is rendered on the server from one template fragment, both for the page and for each
update the stream pushes, so there is one way to show the lab; the page's own small script only
swaps that fragment in. Password checks (argon2) and audit writes (fsync) block, so they run on
worker threads: the loop keeps serving the live stream meanwhile. Every asset is served from the
package (no CDN), and the Content-Security-Policy allows nothing else to load.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hotlab.controller.audit import USER_LOGIN, USER_LOGOUT
from hotlab.controller.users import AccessDenied, Credentials, User, account_target
from hotlab.controller.web import audit_page, calibrator, qc_pages, review, station
from hotlab.controller.web.auth import (
    CSRF_FIELD,
    EVENTS_PATH,
    LOGIN_PATH,
    SessionGuard,
    clear_session_cookie,
    current_session,
    set_session_cookie,
    signed_in,
)
from hotlab.controller.web.events import fragment_events
from hotlab.controller.web.overview import lab_overview
from hotlab.controller.web.panel import HERE, Panel

log = logging.getLogger(__name__)

#: What the login form says to any refusal: which of user, password, lock or disabled account it was
#: is in the audit trail, not on a screen anyone can walk up to.
LOGIN_REFUSED = "Sign-in refused: unknown user or wrong password, or the account is locked or disabled."
#: Shown on the sign-in form reached by a form sent after its session ended (idle logout, restart).
SESSION_ENDED = "Your session had ended, so nothing was done: sign in again."
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _report_end(task: asyncio.Task[None]) -> None:
    """The broker connections only end when cancelled; anything else is said at once, not at shutdown."""
    if not task.cancelled() and task.exception() is not None:
        log.error("web panel: %s ended: %r; the panel no longer updates or acts", task.get_name(), task.exception())


def create_app(panel: Panel) -> Starlette:
    """The panel for one lab: its feed is subscribed while the app runs; its store checks passwords
    and its audit log (with the HMAC key) records logins, logouts and every action."""
    feed, store, sessions, templates = panel.feed, panel.store, panel.sessions, panel.templates

    async def account(username: str) -> User | None:
        return await asyncio.to_thread(store.user, username)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(feed.run(), name="web-panel-mqtt")]
        if panel.commands is not None:
            tasks.append(asyncio.create_task(panel.commands.run(), name="web-panel-commands"))
        for task in tasks:
            task.add_done_callback(_report_end)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def login_form(request: Request) -> Response:
        session = current_session(request)
        if session is not None and session.user is not None:
            return RedirectResponse("/", status_code=303)
        session = session or sessions.start(None)
        notice = SESSION_ENDED if request.query_params.get("expired") else None
        response = _login_page(request, session.csrf_token, notice, 200)
        set_session_cookie(response, request, sessions, session)
        return response

    async def login(request: Request) -> Response:
        anonymous = current_session(request)
        assert anonymous is not None  # SessionGuard refuses a POST without a session
        form = await request.form()
        credentials = Credentials(str(form.get("username") or ""), str(form.get("password") or ""))
        try:
            user = await panel.authenticate(credentials, purpose="web login")
        except AccessDenied:
            return _login_page(request, anonymous.csrf_token, LOGIN_REFUSED, 401)
        await store.audit.append_async(
            actor=user.username,
            action=USER_LOGIN,
            target=account_target(user.username),
            reason=f"signed in to the web panel from {_client(request)}",
        )
        sessions.end(anonymous)
        response = RedirectResponse("/", status_code=303)
        set_session_cookie(response, request, sessions, sessions.start(user))
        return response

    async def logout(request: Request) -> Response:
        session, user = signed_in(request)
        sessions.end(session)
        await store.audit.append_async(
            actor=user.username,
            action=USER_LOGOUT,
            target=account_target(user.username),
            reason=f"signed out of the web panel from {_client(request)}",
        )
        response = RedirectResponse(LOGIN_PATH, status_code=303)
        clear_session_cookie(response, request)
        return response

    async def overview(request: Request) -> Response:
        return panel.page(request, "overview.html", {"lab": lab_overview(feed.view)})

    async def events(request: Request) -> Response:
        fragment = templates.get_template("_lab.html")

        async def render() -> dict[str, str]:
            return {"lab": fragment.render(lab=lab_overview(feed.view))}

        return fragment_events(panel, request, render)

    def _login_page(request: Request, csrf: str, error: str | None, status: int) -> Response:
        context = {"csrf_field": CSRF_FIELD, "csrf": csrf, "error": error}
        return templates.TemplateResponse(request, "login.html", context, status_code=status)

    return Starlette(
        routes=[
            Route("/", overview),
            Route(LOGIN_PATH, login_form, methods=["GET"]),
            Route(LOGIN_PATH, login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route(EVENTS_PATH, events),
            *station.routes(panel),
            *calibrator.routes(panel),
            *qc_pages.routes(panel),
            *review.routes(panel),
            *audit_page.routes(panel),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
        middleware=[Middleware(SecurityHeaders), Middleware(SessionGuard, sessions=sessions, account=account)],
        lifespan=lifespan,
    )


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else "an unknown address"


class SecurityHeaders:
    """ASGI middleware adding SECURITY_HEADERS to every response, static files and refusals too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)
