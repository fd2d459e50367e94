"""`hotlab report --from 2026-11-01 --to 2026-11-30`: write the QC officer's report for a period.

The audit trail reported beside the archive is --audit, else `$HOTLAB_AUDIT_LOG`, else the trail
of the known lab (controller/cli/lab_records.py) that wrote the archive. An archive of no known
lab (an inspector's copy, another folder) needs --audit: another lab's trail would list control
actions that never touched the archive's records.

Exit codes: 0 report written; 1 report written but the audit chain is broken (so a scheduled
monthly run cannot pass silently), or it could not be written; 2 bad input (dates, missing
archive, no audit trail known for it, bad key).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from hotlab.controller.archive import HistoryArchive, TimeRange
from hotlab.controller.cli.audit import PATH_ENV, hmac_key
from hotlab.controller.cli.lab_records import KNOWN_LABS, latest_lab
from hotlab.errors import HotlabError, InputError

ARCHIVE_ENV = "HOTLAB_HISTORY"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="write the QC report (self-contained HTML, optional PDF) for a period"
    )
    parser.add_argument(
        "--from", dest="start", required=True, help="first day (UTC), e.g. 2026-11-01, or an ISO instant"
    )
    parser.add_argument(
        "--to", dest="end", required=True, help="last day (UTC, included), e.g. 2026-11-30, or an ISO instant"
    )
    parser.add_argument(
        "--archive",
        type=Path,
        default=None,
        help=f"history archive (default ${ARCHIVE_ENV}, else the newest archive of the labs hotlab runs here)",
    )
    parser.add_argument(
        "--audit",
        type=Path,
        default=None,
        help="audit trail (default $HOTLAB_AUDIT_LOG, else the trail of the known lab that wrote the archive)",
    )
    parser.add_argument(
        "--audit-key-file",
        type=Path,
        default=None,
        help="HMAC key to verify the audit chain (default $HOTLAB_AUDIT_KEY_FILE or $HOTLAB_AUDIT_KEY)",
    )
    parser.add_argument("--site", default=None, help="only this site")
    parser.add_argument(
        "--out", type=Path, default=Path("report.html"), help="HTML file to write (default report.html)"
    )
    parser.add_argument("--pdf", action="store_true", help="also write a PDF next to the HTML file")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    period = TimeRange.from_text(args.start, args.end)
    key = hmac_key(args.audit_key_file)
    archive_path = args.archive or Path(os.environ.get(ARCHIVE_ENV) or latest_lab("archive", "report").archive)
    if not archive_path.is_file():
        raise InputError(f"no history archive at {archive_path} (give --archive PATH)")
    if args.audit is not None and not args.audit.is_file():
        raise InputError(f"no audit trail at {args.audit}")

    build_figures, collect, write_html, write_pdf = report_builders()

    with HistoryArchive(archive_path, read_only=True) as archive:
        data = collect(archive, period, args.audit or _audit_beside(archive_path), audit_key=key, site=args.site)
    with data:
        figures = build_figures(data)
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("w", encoding="utf-8") as out:
                write_html(data, out, figures)
            print(
                f"wrote {args.out}: {data.results} QC result(s), {data.elutions} elution(s), "
                f"{data.audit.in_period} audited action(s), {len(figures)} figure(s)"
            )
            if args.pdf:
                pdf_path = args.out.with_suffix(".pdf")
                pages = write_pdf(data, pdf_path, figures)
                print(f"wrote {pdf_path}: {pages} page(s)")
        except OSError as exc:
            raise HotlabError(f"cannot write the report: {exc}") from exc
    verification = data.audit.verification
    if verification is not None and not verification.ok:
        print(f"warning: {verification.summary()}", file=sys.stderr)
        return 1
    return 0


def _audit_beside(archive: Path) -> Path:
    """`$HOTLAB_AUDIT_LOG`, else the trail of the known lab whose archive `archive` is (the same file,
    however either path is written); no other lab's trail, so InputError when none is."""
    if os.environ.get(PATH_ENV):
        return Path(os.environ[PATH_ENV])
    lab = next((lab for lab in KNOWN_LABS if lab.archive.resolve() == archive.resolve()), None)
    if lab is None:
        raise InputError(
            f"no audit trail known for the archive {archive}: give --audit PATH, the trail of the lab that wrote it"
        )
    return lab.audit


def report_builders() -> tuple[Any, Any, Any, Any]:
    """The report's builders (build_figures, collect, write_html, write_pdf), imported only when a
    report is made: matplotlib is the optional extra `hotlab[report]`, and `hotlab --help`, every
    other command and the web panel must work (and start fast) without it. HotlabError names the extra."""
    try:
        from hotlab.controller.report import build_figures, collect, write_html, write_pdf
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib" and not (exc.name or "").startswith("matplotlib."):
            raise
        raise HotlabError("the report needs matplotlib: pip install 'hotlab[report]'") from exc
    return build_figures, collect, write_html, write_pdf
