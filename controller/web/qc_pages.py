"""The QC page: what is due and overdue now, the results with filters, the trend charts, the report.

Everything is read from the lab's archive on a worker thread (controller/web/records_qc.py), so
the page shows what `hotlab qc status` and `hotlab report` show, and the event loop keeps
serving the live pages meanwhile. Any signed-in person sees the page (the bench needs to know
what QC is due); the report, which lists the audit trail of control actions, is for QC officers
and admins, as the audit page is.
"""

from __future__ import annotations

import asyncio
import time

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from hotlab.controller.archive import TimeRange
from hotlab.controller.config import ROLES
from hotlab.controller.web.auth import signed_in
from hotlab.controller.web.charts_qc import MAX_POINTS
from hotlab.controller.web.panel import Panel, require_role
from hotlab.controller.web.records_qc import Cursor, ResultFilter, read_qc_page
from hotlab.controller.web.records_query import PAGE_SIZE, page_link, period, text
from hotlab.controller.web.records_report import FORMATS, report_file
from hotlab.errors import HotlabError, InputError

#: Results and charts cover this many days back unless the form says otherwise.
DEFAULT_DAYS = 30
#: Who may download the report (and read the audit page): it lists every audited action.
REPORT_ROLE = "qc_officer"


def routes(panel: Panel) -> list[BaseRoute]:
    async def qc_page(request: Request) -> Response:
        _, user = signed_in(request)
        params = request.query_params
        context = {
            "params": params,
            "page_size": PAGE_SIZE,
            "may_report": ROLES.index(user.role) >= ROLES.index(REPORT_ROLE),
            "report_role": REPORT_ROLE,
            "max_points": MAX_POINTS,
        }
        try:
            wanted = ResultFilter(
                device=text(params, "device"),
                test=text(params, "test"),
                verdict=text(params, "verdict"),
                period=period(params, default_days=DEFAULT_DAYS),
            )
            after = Cursor.from_text(text(params, "after"))
            qc = await asyncio.to_thread(read_qc_page, panel.config, panel.history_path, wanted, after, time.time_ns())
        except InputError as exc:  # a filter that cannot be read, a file that is not an archive
            return panel.page(request, "qc.html", context | {"qc": None, "wanted": None, "error": str(exc)}, 400)
        pages = {
            "first_page": page_link("/qc", params, after=None) if after is not None else None,
            "next_page": page_link("/qc", params, after=qc.next_cursor) if qc.next_cursor is not None else None,
        }
        return panel.page(request, "qc.html", context | pages | {"qc": qc, "wanted": wanted, "error": None})

    async def report(request: Request) -> Response:
        _, user = signed_in(request)
        require_role(user, REPORT_ROLE)
        params = request.query_params
        fmt = params.get("format", "html")
        start, end = text(params, "from"), text(params, "to")
        archive_path = panel.history_path
        if fmt not in FORMATS:
            return PlainTextResponse(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}", status_code=400)
        if start is None or end is None:
            return PlainTextResponse("give the first and the last day of the report (from, to)", status_code=400)
        if archive_path is None:
            return PlainTextResponse("the lab keeps no history archive: there is nothing to report", status_code=404)
        try:
            span = TimeRange.from_text(start, end)
            made = await asyncio.to_thread(
                report_file, archive_path, panel.audit_path, panel.store.audit.key, panel.site, span, fmt
            )
        except InputError as exc:
            return PlainTextResponse(str(exc), status_code=400)
        except HotlabError as exc:  # matplotlib missing: the message names the extra to install
            return PlainTextResponse(str(exc), status_code=503)
        return FileResponse(
            made.path,
            media_type=made.media_type,
            filename=made.name,
            background=BackgroundTask(made.path.unlink, missing_ok=True),
        )

    return [Route("/qc", qc_page), Route("/qc/report", report)]
