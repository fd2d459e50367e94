"""Who is signed in to the panel: server-side sessions behind a signed cookie, idle logout, and the CSRF gate.

Sessions live in this process's memory, and the cookie carries only a random session id signed
with a key made at start: logout (or 15 idle minutes) ends a session for good, even for a copy of
its cookie, and a restart of the panel ends every session (docs/web.md). A visitor of /login gets
an anonymous session first, so the login form has a CSRF token too; signing in replaces it with a
new session (a session id known before login is worth nothing after it).

`SessionGuard` sits in front of every route: without a signed-in session only /login and /static
answer, and every POST must carry its session's token in the form field `csrf_token` (403
otherwise; a POST whose session has ended goes back to the sign-in form, which says so). Checking here rather than in each handler means a route added later cannot forget it.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qs

from itsdangerous import BadSignature, Signer
from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hotlab.controller.users import User

#: Idle logout: a screen left signed in is closed after this long without a request from its user
#: (the live stream does not count: a page left open is exactly what this is for).
IDLE_LIMIT_S = 15 * 60
COOKIE_NAME = "hotlab_session"
CSRF_FIELD = "csrf_token"
#: The paths that answer without a signed-in session; /static serves only the panel's own CSS and JS.
LOGIN_PATH = "/login"
#: Where a form sent with an ended session goes: the sign-in form, saying the session had ended.
EXPIRED_LOGIN = f"{LOGIN_PATH}?expired=1"
STATIC_PREFIX = "/static/"
#: Methods that change nothing (RFC 9110 9.2.1); every other one must carry the session's CSRF token.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: The overview's live stream. Every path ending in /events is a page's stream (controller/web/events.py):
#: it does not count as activity, and refuses with 401 (a browser's EventSource then stops).
EVENTS_PATH = "/events"
_STREAM_SUFFIX = "/events"
#: Anonymous sessions (a login form shown) kept at most; the oldest go first, signed-in ones never.
MAX_ANONYMOUS = 1000
#: The panel's forms are a few short fields: a larger body is refused before it is read.
MAX_FORM_BYTES = 16 * 1024


@dataclass(slots=True)
class Session:
    id: str
    csrf_token: str
    #: None until the visitor signed in.
    user: User | None
    last_active: float


class Sessions:
    """The sessions of this process; the cookie key is made here, so none outlives the process."""

    def __init__(self, *, idle_limit_s: float = IDLE_LIMIT_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_limit_s = idle_limit_s
        self._clock = clock
        self._signer = Signer(secrets.token_bytes(32), salt="hotlab-web-session")
        self._by_id: OrderedDict[str, Session] = OrderedDict()

    def start(self, user: User | None) -> Session:
        """A new session with a fresh id and CSRF token (anonymous while `user` is None)."""
        self._forget_idle()
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), user, self._clock())
        self._by_id[session.id] = session
        anonymous = [s.id for s in self._by_id.values() if s.user is None]
        for session_id in anonymous[: max(0, len(anonymous) - MAX_ANONYMOUS)]:
            del self._by_id[session_id]
        return session

    def end(self, session: Session) -> None:
        self._by_id.pop(session.id, None)

    def from_cookie(self, value: str | None) -> Session | None:
        """The live session this cookie names, else None (unsigned, forged, ended or idle too long)."""
        if not value:
            return None
        try:
            session_id = self._signer.unsign(value).decode("ascii")
        except (BadSignature, UnicodeDecodeError):
            return None
        session = self._by_id.get(session_id)
        return session if session is not None and self.is_live(session) else None

    def is_live(self, session: Session) -> bool:
        """Still signed in: not ended, and active within the idle limit (an idle one is ended here)."""
        if self._by_id.get(session.id) is not session:
            return False
        if self._clock() - session.last_active > self.idle_limit_s:
            self.end(session)
            return False
        return True

    def touch(self, session: Session) -> None:
        session.last_active = self._clock()
        self._by_id.move_to_end(session.id)

    def cookie_value(self, session: Session) -> str:
        return self._signer.sign(session.id).decode("ascii")

    def _forget_idle(self) -> None:
        now = self._clock()
        for session in [s for s in self._by_id.values() if now - s.last_active > self.idle_limit_s]:
            self.end(session)


def set_session_cookie(response: Response, request: Request, sessions: Sessions, session: Session) -> None:
    """HttpOnly (no script reads it), SameSite=Strict (no other site sends it), Secure when served over TLS.
    No Max-Age: the browser drops it when closed; the server ends it on logout or idle."""
    response.set_cookie(
        COOKIE_NAME,
        sessions.cookie_value(session),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


def clear_session_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(
        COOKIE_NAME, httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/"
    )


def current_session(request: Request) -> Session | None:
    """The session `SessionGuard` found for this request (always signed in, except on /login)."""
    session: Session | None = request.state.session
    return session


def signed_in(request: Request) -> tuple[Session, User]:
    """The session and its user, on a route the guard lets through only when signed in."""
    session = current_session(request)
    if session is None or session.user is None:
        raise RuntimeError(f"{request.url.path} was reached without a signed-in session")
    return session, session.user


class SessionGuard:
    """ASGI middleware: finds the request's session, refuses what needs one it lacks, checks every POST's token."""

    def __init__(
        self, app: ASGIApp, sessions: Sessions, account: Callable[[str], Awaitable[User | None]] | None = None
    ) -> None:
        self.app = app
        self.sessions = sessions
        #: The account as the store has it now: a signed-in page sees the current role, and an account
        #: disabled meanwhile ends its sessions at their next request (21 CFR 11.10(d), Annex 11 §12).
        self.account = account

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(STATIC_PREFIX):
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        session = self.sessions.from_cookie(HTTPConnection(scope).cookies.get(COOKIE_NAME))
        if session is not None and session.user is not None and self.account is not None:
            current = await self.account(session.user.username)
            if current is None or current.disabled:
                self.sessions.end(session)
                session = None
            else:
                session.user = current
        if method not in SAFE_METHODS:  # every method that may change something, not only POST
            body = await _read_body(receive)
            if body is None:
                await PlainTextResponse("form too large", status_code=413)(scope, receive, send)
                return
            if session is None:
                # A form left open past the idle limit (or a panel restarted): nothing was done, so a
                # fresh sign-in form says so, instead of a bare refusal.
                await RedirectResponse(EXPIRED_LOGIN, status_code=303)(scope, receive, send)
                return
            if not _token_matches(scope, body, session.csrf_token):
                await PlainTextResponse("missing or wrong CSRF token", status_code=403)(scope, receive, send)
                return
            receive = _replay(body, receive)
        if path != LOGIN_PATH and (session is None or session.user is None):
            await _refusal(path, method)(scope, receive, send)
            return
        if session is not None and not is_stream(path):
            self.sessions.touch(session)
        scope.setdefault("state", {})["session"] = session
        await self.app(scope, receive, _no_store(send))


def is_stream(path: str) -> bool:
    """Whether `path` is a page's live stream (the overview's, a station's, a calibrator's)."""
    return path.endswith(_STREAM_SUFFIX)


def _refusal(path: str, method: str) -> Response:
    if is_stream(path):
        return PlainTextResponse("not signed in", status_code=401)
    if method in ("GET", "HEAD"):
        return RedirectResponse(LOGIN_PATH, status_code=303)
    return PlainTextResponse("not signed in", status_code=403)


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None past MAX_FORM_BYTES."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then whatever the client sends next."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if delivered:
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _token_matches(scope: Scope, body: bytes, expected: str) -> bool:
    content_type = HTTPConnection(scope).headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        return False
    sent = parse_qs(body.decode("utf-8", "replace")).get(CSRF_FIELD, [""])
    return len(sent) == 1 and hmac.compare_digest(sent[0].encode(), expected.encode())


def _no_store(send: Send) -> Send:
    """Pages behind a session are never cached: a shared screen's back button must not show them."""

    async def send_no_store(message: Message) -> None:
        if message["type"] == "http.response.start":
            MutableHeaders(scope=message)["Cache-Control"] = "no-store"
        await send(message)

    return send_no_store
