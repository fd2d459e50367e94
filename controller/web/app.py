"""The panel's routes: login and logout, the lab overview, and its live stream (server-sent events).

The overview is rendered on the server from one template fragment, both for the page and for each
update the stream pushes, so there is one way to show the lab; the page's own small script only
swaps that fragment in. Password checks (argon2) and audit writes (fsync) block, so they run on
worker threads: the loop keeps serving the live stream meanwhile. Every asset is served from the
package (no CDN), and the Content-Security-Policy allows nothing else to load.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hotlab.controller.audit import USER_LOGIN, USER_LOGOUT
from hotlab.controller.users import AccessDenied, Credentials, UserStore, account_target
from hotlab.controller.web.auth import (
    CSRF_FIELD,
    EVENTS_PATH,
    LOGIN_PATH,
    SessionGuard,
    Sessions,
    clear_session_cookie,
    current_session,
    set_session_cookie,
    signed_in,
)
from hotlab.controller.web.live import LiveFeed
from hotlab.controller.web.overview import lab_overview

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
#: argon2id checks (64 MiB each) at once: a flood of sign-ins waits instead of taking every worker
#: thread (and the audit writes queued behind them).
PASSWORD_CHECKS_AT_ONCE = 2
#: At most this many updates a second reach a page, however busy the bus is (changes in between merge).
MAX_PUSHES_PER_S = 4
#: A comment line this often keeps proxies from closing a quiet stream, and ends one whose session ended.
KEEPALIVE_S = 5.0
#: What the login form says to any refusal: which of user, password, lock or disabled account it was
#: is in the audit trail, not on a screen anyone can walk up to.
LOGIN_REFUSED = "Sign-in refused: unknown user or wrong password, or the account is locked or disabled."
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _report_end(task: asyncio.Task[None]) -> None:
    """The subscriber only ends when cancelled; anything else is said at once, not at shutdown."""
    if not task.cancelled() and task.exception() is not None:
        log.error("web panel: the broker subscription ended: %r; the page no longer updates", task.exception())


def create_app(feed: LiveFeed, store: UserStore, sessions: Sessions | None = None) -> Starlette:
    """The panel for one lab: `feed` is subscribed while the app runs; `store` checks passwords and
    its audit log (with the HMAC key) records logins and logouts."""
    sessions = sessions or Sessions()
    templates = Jinja2Templates(directory=HERE / "templates")
    password_checks = asyncio.Semaphore(PASSWORD_CHECKS_AT_ONCE)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        subscriber = asyncio.create_task(feed.run(), name="web-panel-mqtt")
        subscriber.add_done_callback(_report_end)
        try:
            yield
        finally:
            subscriber.cancel()
            await asyncio.gather(subscriber, return_exceptions=True)

    async def login_form(request: Request) -> Response:
        session = current_session(request)
        if session is not None and session.user is not None:
            return RedirectResponse("/", status_code=303)
        session = session or sessions.start(None)
        response = _login_page(request, session.csrf_token, None, 200)
        set_session_cookie(response, request, sessions, session)
        return response

    async def login(request: Request) -> Response:
        anonymous = current_session(request)
        assert anonymous is not None  # SessionGuard refuses a POST without a session
        form = await request.form()
        credentials = Credentials(str(form.get("username") or ""), str(form.get("password") or ""))
        try:
            async with password_checks:
                user = await asyncio.to_thread(store.authenticate, credentials, purpose="web login")
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
        session, user = signed_in(request)
        context = {"lab": lab_overview(feed.view), "user": user, "csrf_field": CSRF_FIELD, "csrf": session.csrf_token}
        return templates.TemplateResponse(request, "overview.html", context)

    async def events(request: Request) -> Response:
        session, _ = signed_in(request)
        fragment = templates.get_template("_lab.html")

        async def stream() -> AsyncIterator[str]:
            seen = -1
            while sessions.is_live(session):
                version = await feed.wait_for_change(seen, KEEPALIVE_S)
                if not sessions.is_live(session):
                    break
                if version == seen:
                    yield ": keepalive\n\n"
                    continue
                seen = version
                yield server_sent_event("lab", fragment.render(lab=lab_overview(feed.view)))
                await asyncio.sleep(1 / MAX_PUSHES_PER_S)
            yield server_sent_event("signed-out", "")

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )

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
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
        middleware=[Middleware(SecurityHeaders), Middleware(SessionGuard, sessions=sessions)],
        lifespan=lifespan,
    )


def server_sent_event(name: str, data: str) -> str:
    """One event of the text/event-stream format (WHATWG HTML §9.2): each line of `data` on its own data: line."""
    # Browsers end an event-stream line at CR, LF or CRLF: split at each, so no text can start a field.
    lines = "".join(f"data: {line}\n" for line in re.split(r"\r\n|\r|\n", data))
    return f"event: {name}\n{lines}\n"


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
