"""The QC officer's report for a period, made as `hotlab report` makes it, as a file to download.

The builders are the report's own (controller/report.py, through `report_builders` of
controller/cli/report.py, which says which extra to install when matplotlib is missing): the
page's HTML is the same self-contained document the command writes, its PDF the same pages.
The report is written to a temporary file, not held in memory: a report over years is as large as
its lists of failures, procedures and signatures. The page sends the file, then removes it.
Blocking (SQLite, audit verification, plotting): call from a worker thread.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hotlab.controller.archive import HistoryArchive, TimeRange
from hotlab.controller.cli.report import report_builders
from hotlab.controller.messages import iso_utc
from hotlab.errors import InputError

#: Download formats: media type of each.
FORMATS = {"html": "text/html; charset=utf-8", "pdf": "application/pdf"}


@dataclass(frozen=True, slots=True)
class ReportFile:
    name: str
    media_type: str
    #: A temporary file holding the report: the caller removes it once sent.
    path: Path


def report_file(
    archive_path: Path, audit_path: Path, audit_key: bytes | None, site: str, period: TimeRange, fmt: str
) -> ReportFile:
    """The report of `site` for `period` as HTML or PDF (`fmt`), verified against the keyed audit trail."""
    if not archive_path.is_file():
        raise InputError(f"no history archive at {archive_path}: there is nothing to report")
    build_figures, collect, write_html, write_pdf = report_builders()
    with HistoryArchive(archive_path, read_only=True) as archive:
        data = collect(archive, period, audit_path, audit_key=audit_key, site=site)
    last_day = iso_utc(period.end_ns - 1_000)[:10]  # the end is exclusive; 1 µs is iso_utc's resolution
    name = f"hotlab-qc-report-{site}-{iso_utc(period.start_ns)[:10]}-{last_day}.{fmt}"
    descriptor, temporary = tempfile.mkstemp(prefix="hotlab-report-", suffix=f".{fmt}")
    os.close(descriptor)  # reopened by name below, as text or bytes
    path = Path(temporary)
    try:
        with data:
            figures = build_figures(data)
            if fmt == "html":
                with path.open("w", encoding="utf-8") as text:
                    write_html(data, text, figures)
            else:
                with path.open("wb") as binary:
                    write_pdf(data, binary, figures)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return ReportFile(name, FORMATS[fmt], path)
