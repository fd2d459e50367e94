"""The pages' live updates: one server-sent event stream per open page, re-rendered from the bus.

Every page that updates itself (the overview, a station, a calibrator) streams the same way: after
each change on the bus its live regions are rendered on the server and pushed as named events,
which the page's small script swaps into place, so there is one way to show a region. Pacing: a
change is pushed at once, and a burst is merged into at most MAX_PUSHES_PER_S updates a second
(bench/web_latency.py measures what that costs). A keep-alive comment keeps proxies from closing a
quiet stream and ends the stream of a session that ended, with a final `signed-out` event.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from hotlab.controller.web.auth import signed_in
from hotlab.controller.web.panel import Panel

#: At most this many updates a second reach a page, however busy the bus is (changes in between merge).
MAX_PUSHES_PER_S = 10
#: A comment line this often keeps proxies from closing a quiet stream, and ends one whose session ended.
KEEPALIVE_S = 5.0


def server_sent_event(name: str, data: str) -> str:
    """One event of the text/event-stream format (WHATWG HTML §9.2): each line of `data` on its own data: line."""
    # Browsers end an event-stream line at CR, LF or CRLF: split at each, so no text can start a field.
    lines = "".join(f"data: {line}\n" for line in re.split(r"\r\n|\r|\n", data))
    return f"event: {name}\n{lines}\n"


def fragment_events(panel: Panel, request: Request, render: Callable[[], Awaitable[Mapping[str, str]]]) -> Response:
    """The stream of one open page: `render` returns region name -> HTML, pushed after each change."""
    session, _ = signed_in(request)
    feed, sessions = panel.feed, panel.sessions

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
            for name, html in (await render()).items():
                yield server_sent_event(name, html)
            await asyncio.sleep(1 / MAX_PUSHES_PER_S)
        yield server_sent_event("signed-out", "")

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )


def templates_events(
    panel: Panel, request: Request, fragments: Mapping[str, str], state: Callable[[], Awaitable[Any]]
) -> Response:
    """A device page's stream: each live region (name -> template) rendered with `live` = the page's state now."""

    async def render() -> Mapping[str, str]:
        live = await state()
        return {name: panel.templates.get_template(template).render(live=live) for name, template in fragments.items()}

    return fragment_events(panel, request, render)
