"""The QC officer's periodic report: every verdict, trend and control action of a period, in one file.

Why one self-contained HTML file: it is what gets attached to a QC record, mailed to an
inspector or archived with the batch documentation, and it must open the same way in ten
years without a network. So the CSS is inline, plots are base64 PNG `data:` URIs, and there
is no script and no external reference of any kind. The PDF variant holds the same figures
and tables (matplotlib's PdfPages). matplotlib is the optional extra `hotlab[report]`: only
this module and controller/report_plots.py import it, and `hotlab report` says which extra to
install when it is missing (controller/cli/report.py).

Input is the local history archive (controller/archive.py) for QC results, procedures and
elutions and the audit trail (controller/audit.py), whose chain is verified as part of the
report so a reader sees at once whether the list of control actions can be trusted. The report
prints the audit head hash: a signed paper copy then anchors the chain against later rewriting.
The QC procedures of the period are listed with their electronic signatures (who, printed name,
meaning, when, comment; 21 CFR 11.50 asks that a signed record show them), each re-hashed
against the archive, and the records with no decision yet as awaiting review or approval. Only
signatures the verified trail vouches for count (controller/signatures.py `read_signatures`);
those it does not are listed as such.
"""

from __future__ import annotations

import html
import json
import textwrap
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from hotlab.controller.archive import HistoryArchive, TimeRange
from hotlab.controller.audit import AuditRecord, VerifyResult, iter_records
from hotlab.controller.messages import iso_utc
from hotlab.controller.report_plots import (
    TEXT_PAGE_COLUMNS,
    TrendPoint,
    elution_yield_figure,
    linearity_figure,
    png_base64,
    text_pages,
    trend_figure,
)
from hotlab.controller.signatures import (
    Signature,
    SignatureLedger,
    SignatureProblem,
    awaiting_review,
    awaits,
    check_signatures,
    payload_sha256,
    read_signatures,
    record_kind,
)
from hotlab.physics.units import format_activity

#: Tests with a dedicated figure; every other test gets the generic trend of its judged value.
DEDICATED_TESTS = ("constancy", "accuracy", "linearity", "elution_yield", "ge68_breakthrough", "mo99_breakthrough")
VERDICTS = ("pass", "warn", "fail")
BREAKTHROUGH_TITLES = {"ge68_breakthrough": "Ge-68 breakthrough", "mo99_breakthrough": "Mo-99 breakthrough"}


@dataclass(frozen=True, slots=True)
class AuditSection:
    path: Path
    records: list[AuditRecord]
    verification: VerifyResult | None  # None: no audit trail exists at `path`


@dataclass(frozen=True, slots=True)
class SignedRow:
    """One signature of one reviewed record (a procedure, or a result outside any procedure)."""

    record: dict[str, Any]
    signature: Signature
    #: The archived record still hashes as signed.
    intact: bool


@dataclass(frozen=True, slots=True)
class ReviewSection:
    #: One record per procedure of the period: its end record, else its start (still running).
    procedures: list[dict[str, Any]]
    signed: list[SignedRow]
    #: Records of the period with no decision signed as they are now (controller/signatures.py).
    awaiting: list[dict[str, Any]]
    #: Signed records anywhere in the trail that changed or went missing from the archive.
    problems: list[SignatureProblem]
    #: Signature entries of the trail that do not count (after the chain's break, or by someone who could not sign).
    uncounted: list[str]

    def signatures_of(self, msg_id: str) -> list[SignedRow]:
        return [row for row in self.signed if row.record.get("msg_id") == msg_id]


@dataclass(frozen=True, slots=True)
class ReportData:
    period: TimeRange
    generated_ns: int
    archive_path: Path
    site: str | None
    qc_results: list[dict[str, Any]]
    elutions: list[dict[str, Any]]
    audit: AuditSection
    review: ReviewSection


@dataclass(frozen=True, slots=True)
class ReportFigure:
    section: str
    caption: str
    figure: Figure


def collect(
    archive: HistoryArchive,
    period: TimeRange,
    audit_path: Path,
    *,
    audit_key: bytes | None = None,
    site: str | None = None,
) -> ReportData:
    """Everything the report shows, read once: QC results and elutions in the period, and the audit trail.

    The whole audit chain is verified (a break before the period also makes the period's
    records untrustworthy); only the period's records are listed.
    """
    ledger = read_signatures(audit_path, audit_key)
    verification = ledger.chain if audit_path.exists() else None
    records = [r for r in iter_records(audit_path) if period.start_ns <= r.time_ns < period.end_ns]
    return ReportData(
        period=period,
        generated_ns=time.time_ns(),
        archive_path=archive.path,
        site=site,
        qc_results=archive.query("qc_result", period, site=site),
        elutions=archive.query("elution", period, site=site),
        audit=AuditSection(audit_path, records, verification),
        review=collect_review(archive, period, ledger, site=site),
    )


def collect_review(
    archive: HistoryArchive, period: TimeRange, ledger: SignatureLedger, *, site: str | None = None
) -> ReviewSection:
    """The procedures of the period, the signatures of its reviewed records (made whenever), what awaits review."""
    found = ledger.valid

    def in_report(payload: Mapping[str, Any]) -> bool:
        return period.start_ns <= int(payload["time_ns"]) < period.end_ns and site in (None, payload.get("site"))

    latest: dict[str, dict[str, Any]] = {}
    for record in archive.query("qc_procedure", period, site=site):
        latest[str(record.get("procedure_id"))] = record  # oldest first: an end record replaces its start
    signed = []
    for signature in found:
        for entry in signature.records:
            payload = archive.get(entry.msg_id)
            if payload is None or not in_report(payload) or not _reviewed_on_its_own(payload):
                continue
            signed.append(SignedRow(payload, signature, payload_sha256(payload) == entry.sha256))
    return ReviewSection(
        procedures=sorted(latest.values(), key=lambda p: (int(p.get("started_ns") or p["time_ns"]), p["msg_id"])),
        signed=signed,
        awaiting=[p for p in awaiting_review(archive, found, period=period) if in_report(p)],
        problems=check_signatures(found, archive),
        uncounted=ledger.uncounted(),
    )


def _reviewed_on_its_own(payload: Mapping[str, Any]) -> bool:
    """A procedure, or a result outside any: a procedure's results are signed with it and shown with it."""
    return record_kind(payload) == "qc_procedure" or not payload.get("procedure_id")


# --------------------------------------------------------------------------- values


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def judged_value(result: Mapping[str, Any]) -> float | None:
    """What the limit was applied to: `value_judged` if the engine wrote it, else the deviation
    for a tolerance-style result and the measured value otherwise; None if the payload has neither."""
    value = _number(result.get("value_judged"))
    if value is not None:
        return value
    limit = result.get("limit_values") or {}
    return _number(
        result.get("deviation_pct") if limit.get("kind", "tolerance") == "tolerance" else result.get("measured")
    )


def signed_pct(value: Any) -> str:
    number = _number(value)
    return "–" if number is None else f"{number:+.2f} %"


def quantity(value: Any, unit: str | None) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    if unit == "Bq":
        return format_activity(float(value))
    return f"{value:.4g} {unit}" if unit else f"{value:.4g}"


def _judged_label(result: Mapping[str, Any]) -> str:
    limit = result.get("limit_values") or {}
    unit = limit.get("unit") or result.get("unit") or ""
    if limit.get("kind", "tolerance") == "tolerance":
        return f"deviation ({unit or '%'})"
    return f"{result.get('test', 'value')} ({unit})" if unit else str(result.get("test", "value"))


def _generator_of(result: Mapping[str, Any]) -> str:
    inputs = result.get("inputs") or {}
    return str(inputs.get("generator") or result.get("device") or "?")


def _latest_limit(results: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    for result in reversed(results):
        if result.get("limit_values"):
            return result["limit_values"]
    return None


def _points(results: Iterable[Mapping[str, Any]]) -> list[TrendPoint]:
    return [
        TrendPoint(int(r["time_ns"]), value, str(r.get("verdict")))
        for r in results
        if (value := judged_value(r)) is not None
    ]


def _by(results: Iterable[Mapping[str, Any]], key: Any) -> dict[str, list[Mapping[str, Any]]]:
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for result in results:
        groups[key(result)].append(result)
    return dict(sorted(groups.items()))


# --------------------------------------------------------------------------- figures


def _trend(
    section: str,
    caption: str,
    title: str,
    results: Sequence[Mapping[str, Any]],
    series_key: Any,
    span: tuple[int, int],
    ylabel: str | None = None,
) -> ReportFigure:
    """A judged-value trend of `results`, one marker per `series_key`, on the bands of the latest limit."""
    series = {name: _points(group) for name, group in _by(results, series_key).items()}
    figure = trend_figure(title, ylabel or _judged_label(results[-1]), series, _latest_limit(results), span)
    return ReportFigure(section, caption, figure)


#: What a calibrator test's deviation is from: constancy against the chamber's own baseline, accuracy
#: against the certificate (docs/qc.md).
_REFERENCE_OF_TEST = {
    "constancy": "this chamber's decay-corrected baseline",
    "accuracy": "the decay-corrected certificate value",
}


def build_figures(data: ReportData) -> list[ReportFigure]:
    """Every figure of the report, in reading order, each tagged with its section."""
    by_test = _by((r for r in data.qc_results if judged_value(r) is not None), lambda r: str(r.get("test")))
    span = (data.period.start_ns, data.period.end_ns)
    figures: list[ReportFigure] = []
    for test in _REFERENCE_OF_TEST:
        for device, results in _by(by_test.get(test, []), lambda r: str(r.get("device"))).items():
            reference = _REFERENCE_OF_TEST[test]
            caption = (
                f"{test.capitalize()} of calibrator {device}: deviation from {reference}, one marker per source, "
                "on the warn/fail bands"
            )
            figures.append(
                _trend(
                    test,
                    caption,
                    f"{test} — {device}",
                    results,
                    lambda r: str((r.get("inputs") or {}).get("source_id") or "check source"),
                    span,
                )
            )
    for result in by_test.get("linearity", []):
        inputs = result.get("inputs") or {}
        title = f"linearity (decay method) — {result.get('device')}, {inputs.get('nuclide', '')}, {iso_utc(result['time_ns'])[:10]}"
        figure = linearity_figure(title, inputs, result.get("limit_values"))
        if figure is not None:
            figures.append(
                ReportFigure(
                    "linearity",
                    f"Decay-method linearity of {result.get('device')}: readings, "
                    "the activity expected from the library half-life, normalised at the low-activity end, and each "
                    "reading's deviation from it",
                    figure,
                )
            )
    figures += _yield_figures(data, by_test.get("elution_yield", []), span)
    for test, name in BREAKTHROUGH_TITLES.items():
        if results := by_test.get(test, []):
            figures.append(
                _trend(
                    "breakthrough",
                    f"{name}: every result against its limit",
                    name,
                    results,
                    _generator_of,
                    span,
                    ylabel=f"{name} ({results[-1].get('unit', '')})",
                )
            )
    for test, results in by_test.items():
        if test not in DEDICATED_TESTS:
            figures.append(
                _trend(
                    "other",
                    f"{test}: judged value of every result against its limit",
                    test,
                    results,
                    lambda r: str(r.get("device")),
                    span,
                )
            )
    return figures


def _yield_figures(
    data: ReportData, yield_results: Sequence[Mapping[str, Any]], span: tuple[int, int]
) -> list[ReportFigure]:
    """One figure per generator: QC-judged yields where the engine judged them, else the elution records' yields."""
    judged_by_generator = _by(yield_results, _generator_of)
    recorded = _by(
        (e for e in data.elutions if isinstance(e.get("yield_pct"), (int, float))), lambda e: str(e.get("generator"))
    )
    figures = []
    for generator in sorted(set(judged_by_generator) | set(recorded)):
        results = judged_by_generator.get(generator, [])
        if results:
            points = _points(results)
        else:
            points = [TrendPoint(int(e["time_ns"]), float(e["yield_pct"])) for e in recorded[generator]]
        figures.append(
            ReportFigure(
                "elution-yield",
                f"Elution yield of generator {generator} over its life, with the least-squares trend",
                elution_yield_figure(f"elution yield — {generator}", points, _latest_limit(results), span),
            )
        )
    return figures


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:2em auto;max-width:75em;color:#1b1b1b;
line-height:1.4;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #1f5fa8;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;width:100%;font-size:.82em;margin:.6em 0}
th,td{border:1px solid #c8c8c8;padding:.25em .45em;text-align:left;vertical-align:top}
th{background:#eef2f7}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.verdict-warn td.verdict{background:#fff1c2}tr.verdict-fail td.verdict{background:#f8cfcf}
tr.verdict-pass td.verdict{background:#dcefdc}
.status{padding:.5em .8em;border-radius:.3em;font-weight:600}.status.ok{background:#dcefdc}
.status.broken{background:#f8cfcf}.status.absent{background:#eeeeee}
figure{margin:1em 0;break-inside:avoid}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.85em;color:#444}pre{white-space:pre-wrap;font-size:.9em;margin:.2em 0}
details summary{cursor:pointer;color:#1f5fa8}.meta{color:#555;font-size:.9em}
code{font-size:.9em;word-break:break-all}
@media print{body{max-width:none;margin:0}h2{break-after:avoid}}
"""

_SECTIONS = (
    ("constancy", "Constancy"),
    ("accuracy", "Accuracy"),
    ("linearity", "Linearity (decay method)"),
    ("elution-yield", "Elution yield over generator life"),
    ("breakthrough", "Breakthrough"),
    ("other", "Other tests"),
)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _table(header: Sequence[str], rows: Iterable[str], empty: str) -> str:
    body = "".join(rows)
    if not body:
        return f"<p>{_e(empty)}</p>"
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _verdict_row(r: Mapping[str, Any]) -> str:
    verdict = str(r.get("verdict"))
    unit = r.get("unit")
    inputs = json.dumps(r.get("inputs") or {}, indent=1, ensure_ascii=False, sort_keys=True)
    where = "/".join(str(r.get(k, "")) for k in ("site", "station", "device"))
    return (
        f'<tr class="verdict verdict-{_e(verdict)}" data-msg-id="{_e(r.get("msg_id"))}">'
        f"<td>{_e(r.get('time'))}</td><td>{_e(where)}</td><td>{_e(r.get('test'))}</td>"
        f'<td class="verdict">{_e(verdict)}</td>'
        f'<td class="num">{_e(quantity(r.get("measured"), unit))}</td>'
        f'<td class="num">{_e(quantity(r.get("expected"), unit))}</td>'
        f'<td class="num">{_e(signed_pct(r.get("deviation_pct")))}</td>'
        f"<td>{_e(r.get('limit'))}</td><td>{_e(r.get('limit_source'))}</td>"
        f"<td>{_e(r.get('detail', ''))}<details><summary>inputs</summary><pre>{_e(inputs)}</pre></details></td></tr>"
    )


_VERDICT_HEADER = (
    "time (UTC)",
    "site/station/device",
    "test",
    "verdict",
    "measured",
    "expected",
    "deviation",
    "limit",
    "limit source",
    "detail and inputs",
)


def _summary_html(data: ReportData) -> str:
    counts = Counter((str(r.get("test")), str(r.get("verdict"))) for r in data.qc_results)
    tests = sorted({test for test, _ in counts})
    rows = [
        f"<tr><td>{_e(t)}</td>"
        + "".join(f'<td class="num">{counts[(t, v)]}</td>' for v in VERDICTS)
        + f'<td class="num">{sum(counts[(t, v)] for v in VERDICTS)}</td></tr>'
        for t in tests
    ]
    verdicts = _table(("test", "pass", "warn", "fail", "total"), rows, "No QC results in this period.")
    return (
        f"{verdicts}<p>{len(data.qc_results)} QC result(s), {len(data.elutions)} elution(s), "
        f"{len(data.audit.records)} audited action(s) in the period; {len(data.review.procedures)} QC procedure(s), "
        f"{len(data.review.signed)} signature(s), {len(data.review.awaiting)} record(s) awaiting review.</p>"
        f"{_audit_status_html(data.audit)}"
    )


def _audit_status_html(audit: AuditSection) -> str:
    if audit.verification is None:
        return f'<p class="status absent">No audit trail at <code>{_e(audit.path)}</code>.</p>'
    result = audit.verification
    if result.ok:
        mac = (
            "HMAC verified"
            if result.mac_checked
            else "HMAC present, not checked (no key given)"
            if result.mac_present
            else "no HMAC"
        )
        return (
            f'<p class="status ok">Audit chain intact: {result.records} record(s) in <code>{_e(audit.path)}</code>, '
            f"{mac}. Head hash <code>{_e(result.head_hash)}</code>.</p>"
        )
    assert result.broken is not None
    return (
        f'<div class="status broken">Audit chain BROKEN in <code>{_e(audit.path)}</code> after '
        f"{result.records} intact record(s):<pre>{_e(result.broken.describe())}</pre>"
        "Records from that line on cannot be trusted.</div>"
    )


def _time(value: Any) -> str:
    return iso_utc(int(value))[:19] if isinstance(value, int) and not isinstance(value, bool) else "–"


def started_by(procedure: Mapping[str, Any]) -> str:
    who = procedure.get("started_by")
    if isinstance(who, Mapping):
        return f"{who.get('user')} ({who.get('role')})"
    return "recognised automatically"


def sign_off(review: ReviewSection, record: Mapping[str, Any]) -> str:
    """How far a reviewed record got: each signature's meaning, printed name and comment, then what it
    awaits (review, or approval after a review alone), or running while a procedure has not ended."""
    if record.get("status") == "started":
        return "running"
    rows = review.signatures_of(str(record.get("msg_id")))
    parts = [
        f"{row.signature.meaning} by {row.signature.printed_name}"
        + (f': "{row.signature.comment}"' if row.signature.comment else "")
        + ("" if row.intact else " (record CHANGED since)")
        for row in rows
    ]
    pending = awaits(row.signature for row in rows if row.intact)
    return "; ".join(parts + ([] if pending is None else [f"awaiting {pending}"]))


def _what(record: Mapping[str, Any]) -> str:
    return str(record.get("procedure") if record_kind(record) == "qc_procedure" else record.get("test"))


_PROCEDURE_HEADER = (
    "started (UTC)",
    "procedure",
    "site/station/device",
    "status",
    "verdict",
    "started by",
    "ended (UTC)",
    "results",
    "sign-off",
    "detail",
)


def _procedure_row(review: ReviewSection, p: Mapping[str, Any]) -> str:
    where = "/".join(str(p.get(k, "")) for k in ("site", "station", "device"))
    verdict = p.get("verdict")
    return (
        f'<tr class="procedure verdict-{_e(verdict)}" data-msg-id="{_e(p.get("msg_id"))}">'
        f"<td>{_e(_time(p.get('started_ns')))}</td><td>{_e(p.get('procedure'))}</td><td>{_e(where)}</td>"
        f'<td>{_e(p.get("status"))}</td><td class="verdict">{_e(verdict or "–")}</td><td>{_e(started_by(p))}</td>'
        f'<td>{_e(_time(p.get("ended_ns")))}</td><td class="num">{len(p.get("results") or [])}</td>'
        f"<td>{_e(sign_off(review, p))}</td><td>{_e(p.get('detail', ''))}</td></tr>"
    )


_SIGNATURE_HEADER = (
    "record (UTC)",
    "record",
    "device",
    "verdict",
    "meaning",
    "signed by",
    "printed name",
    "role",
    "signed (UTC)",
    "comment",
    "record since signing",
)


def _signature_row(row: SignedRow) -> str:
    r, s = row.record, row.signature
    return (
        f'<tr class="signature meaning-{_e(s.meaning)}" data-msg-id="{_e(r.get("msg_id"))}">'
        f"<td>{_e(_time(r.get('time_ns')))}</td><td>{_e(record_kind(r))} {_e(_what(r))}</td>"
        f"<td>{_e(r.get('device'))}</td><td>{_e(r.get('verdict') or '–')}</td><td>{_e(s.meaning)}</td>"
        f"<td>{_e(s.signer)}</td><td>{_e(s.printed_name)}</td><td>{_e(s.role)}</td><td>{_e(s.time[:19])}</td>"
        f"<td>{_e(s.comment or '')}</td><td>{'unchanged' if row.intact else 'CHANGED'}</td></tr>"
    )


def _review_status_html(review: ReviewSection) -> str:
    uncounted = (
        '<div class="status broken">Signatures in the audit trail that do not count:<ul>'
        + "".join(f"<li>{_e(line)}</li>" for line in review.uncounted)
        + "</ul></div>"
        if review.uncounted
        else ""
    )
    if not review.problems:
        return uncounted + (
            f'<p class="status ok">{len(review.signed)} signature(s) of records in this period; every record '
            "signed (in any period) is in the archive as it was signed.</p>"
        )
    problems = "".join(f"<li>{_e(p.describe())}</li>" for p in review.problems)
    return (
        uncounted
        + f'<div class="status broken">Signed records changed or missing since signing:<ul>{problems}</ul></div>'
    )


_LOOSE_RESULT_HEADER = ("time (UTC)", "test", "site/station/device", "verdict", "sign-off")


def _loose_result_row(review: ReviewSection, r: Mapping[str, Any]) -> str:
    where = "/".join(str(r.get(k, "")) for k in ("site", "station", "device"))
    return (
        f'<tr class="result verdict-{_e(r.get("verdict"))}" data-msg-id="{_e(r.get("msg_id"))}">'
        f"<td>{_e(_time(r.get('time_ns')))}</td><td>{_e(r.get('test'))}</td><td>{_e(where)}</td>"
        f'<td class="verdict">{_e(r.get("verdict") or "–")}</td><td>{_e(sign_off(review, r))}</td></tr>'
    )


def _review_html(review: ReviewSection) -> str:
    waiting = [p for p in review.awaiting if record_kind(p) == "qc_procedure"]
    loose = [p for p in review.awaiting if record_kind(p) != "qc_procedure"]
    return (
        f'<section id="procedures"><h2>QC procedures</h2>'
        f"{_table(_PROCEDURE_HEADER, (_procedure_row(review, p) for p in review.procedures), 'No QC procedures in this period.')}</section>"
        f'<section id="review"><h2>Review and sign-off</h2>{_review_status_html(review)}'
        f"{_table(_SIGNATURE_HEADER, map(_signature_row, review.signed), 'No record of this period is signed.')}</section>"
        f'<section id="awaiting-review"><h2>Awaiting review or approval</h2>'
        f"{_table(_PROCEDURE_HEADER, (_procedure_row(review, p) for p in waiting), 'No ended procedure awaits review.')}"
        f"{_table(_LOOSE_RESULT_HEADER, (_loose_result_row(review, r) for r in loose), 'No QC result outside a procedure awaits review.')}"
        "</section>"
    )


def _audit_html(audit: AuditSection) -> str:
    rows = [
        f'<tr><td class="num">{r.seq}</td><td>{_e(r.time)}</td><td>{_e(r.actor)}</td><td>{_e(r.action)}</td>'
        f"<td>{_e(r.target)}</td><td>{_e(_plain(r.old_value))}</td><td>{_e(_plain(r.new_value))}</td><td>{_e(r.reason)}</td></tr>"
        for r in audit.records
    ]
    return _audit_status_html(audit) + _table(
        ("#", "time (UTC)", "who", "what", "target", "old", "new", "why"), rows, "No audited actions in this period."
    )


def _plain(value: Any) -> str:
    return (
        ""
        if value is None
        else value
        if isinstance(value, str)
        else json.dumps(value, ensure_ascii=False, sort_keys=True)
    )


def _limits_rows(results: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str, int]]:
    counts = Counter((str(r.get("test")), str(r.get("limit")), str(r.get("limit_source"))) for r in results)
    return [(t, limit, source, n) for (t, limit, source), n in sorted(counts.items())]


def _elution_row(e: Mapping[str, Any]) -> str:
    def pct(key: str) -> str:
        value = e.get(key)
        return "–" if not isinstance(value, (int, float)) else f"{value:.4g} %"

    return (
        f"<tr><td>{_e(e.get('time'))}</td><td>{_e(e.get('station'))}</td><td>{_e(e.get('generator'))}</td>"
        f'<td class="num">{_e(e.get("counter"))}</td><td class="num">{_e(quantity(e.get("activity_bq"), "Bq"))}</td>'
        f'<td class="num">{_e(quantity(e.get("volume_ml"), "mL"))}</td><td class="num">{_e(quantity(e.get("duration_s"), "s"))}</td>'
        f'<td class="num">{_e(pct("yield_pct"))}</td><td class="num">{_e(pct("breakthrough_pct"))}</td></tr>'
    )


def render_html(data: ReportData, figures: Sequence[ReportFigure] | None = None) -> str:
    """The complete report as one self-contained HTML document."""
    figures = build_figures(data) if figures is None else figures
    start, end = iso_utc(data.period.start_ns), iso_utc(data.period.end_ns)
    last_day = iso_utc(data.period.end_ns - 1_000)[:10]  # the end is exclusive; 1 µs is iso_utc's resolution
    title = f"hotlab QC report {start[:10]} – {last_day}"
    parts = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{_CSS}</style></head><body>",
        f'<header><h1>{_e(title)}</h1><p class="meta">Period {_e(start)} to {_e(end)} (end exclusive)'
        f"{' · site ' + _e(data.site) if data.site else ''} · archive <code>{_e(data.archive_path)}</code> · "
        f"generated {_e(iso_utc(data.generated_ns))}</p></header>",
        f'<section id="summary"><h2>Summary</h2>{_summary_html(data)}</section>',
        _review_html(data.review),
    ]
    for section, heading in _SECTIONS:
        chosen = [f for f in figures if f.section == section]
        if chosen:
            body = "".join(
                f'<figure><img alt="{_e(f.caption)}" src="data:image/png;base64,{png_base64(f.figure)}">'
                f"<figcaption>{_e(f.caption)}</figcaption></figure>"
                for f in chosen
            )
            parts.append(f'<section id="{section}"><h2>{_e(heading)}</h2>{body}</section>')
    deviations = [r for r in data.qc_results if r.get("verdict") != "pass"]
    parts.append(
        f'<section id="deviations"><h2>Warnings and failures</h2>'
        f"{_table(_VERDICT_HEADER, map(_verdict_row, deviations), 'Every result in the period passed.')}</section>"
    )
    parts.append(
        f'<section id="verdicts"><h2>All verdicts</h2>'
        f"{_table(_VERDICT_HEADER, map(_verdict_row, data.qc_results), 'No QC results in this period.')}</section>"
    )
    limit_rows = [
        f'<tr><td>{_e(t)}</td><td>{_e(lim)}</td><td>{_e(src)}</td><td class="num">{n}</td></tr>'
        for t, lim, src, n in _limits_rows(data.qc_results)
    ]
    parts.append(
        f'<section id="limits"><h2>Limits and their sources</h2>'
        f"{_table(('test', 'limit', 'source', 'results'), limit_rows, 'No limits applied in this period.')}</section>"
    )
    parts.append(
        f'<section id="elutions"><h2>Elutions</h2>'
        f"{_table(('end (UTC)', 'station', 'generator', 'counter', 'activity', 'volume', 'duration', 'yield', 'breakthrough'), map(_elution_row, data.elutions), 'No elutions in this period.')}</section>"
    )
    parts.append(f'<section id="audit"><h2>Audit trail of control actions</h2>{_audit_html(data.audit)}</section>')
    parts.append("</body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- PDF


def _wrapped(cells: Sequence[str], widths: Sequence[int]) -> list[str]:
    """One table row as monospaced lines; the last column wraps onto continuation lines instead of being cut."""
    fixed = "".join(c[: w - 1].ljust(w) for c, w in zip(cells[:-1], widths))
    tail = textwrap.wrap(cells[-1], width=max(20, TEXT_PAGE_COLUMNS - len(fixed))) or [""]
    return [fixed + tail[0], *(" " * len(fixed) + more for more in tail[1:])]


def _pdf_text(data: ReportData) -> list[tuple[str, list[str]]]:
    widths = (20, 22, 20, 6, 13, 13, 9)

    def verdict_lines(results: Sequence[Mapping[str, Any]]) -> list[str]:
        header = ("time (UTC)", "device", "test", "verd.", "measured", "expected", "dev.")
        lines = ["".join(h.ljust(w) for h, w in zip(header, widths)) + "limit — source"]
        for r in results:
            unit = r.get("unit")
            verdict = str(r.get("verdict"))
            lines += _wrapped(
                (
                    str(r.get("time", ""))[:19],
                    str(r.get("device")),
                    str(r.get("test")),
                    verdict if verdict == "pass" else verdict.upper(),
                    quantity(r.get("measured"), unit),
                    quantity(r.get("expected"), unit),
                    signed_pct(r.get("deviation_pct")),
                    f"{r.get('limit')} — {r.get('limit_source')}",
                ),
                widths,
            )
        return lines

    audit = data.audit
    status = f"no audit trail at {audit.path}" if audit.verification is None else audit.verification.summary()
    summary = [
        f"period {iso_utc(data.period.start_ns)} to {iso_utc(data.period.end_ns)} (end exclusive)",
        f"archive {data.archive_path}",
        f"generated {iso_utc(data.generated_ns)}",
        "",
        f"{len(data.qc_results)} QC result(s), {len(data.elutions)} elution(s), {len(audit.records)} audited action(s)",
        "",
    ]
    counts = Counter((str(r.get("test")), str(r.get("verdict"))) for r in data.qc_results)
    summary += [
        f"{t:<24} pass {counts[(t, 'pass')]:>4}  warn {counts[(t, 'warn')]:>4}  fail {counts[(t, 'fail')]:>4}"
        for t in sorted({t for t, _ in counts})
    ]
    summary += ["", *textwrap.wrap(status, TEXT_PAGE_COLUMNS)]
    limits = [
        line
        for t, lim, src, n in _limits_rows(data.qc_results)
        for line in _wrapped((t, f"{n} result(s)", f"{lim} — {src}"), (24, 14))
    ]
    elutions = [
        f"{str(e.get('time', ''))[:19]:<21}{str(e.get('generator')):<16}#{e.get('counter')!s:<6}"
        f"{quantity(e.get('activity_bq'), 'Bq'):<14} yield {e.get('yield_pct')!s:<8} breakthrough {e.get('breakthrough_pct')}"
        for e in data.elutions
    ]
    review = data.review
    procedures = [
        line
        for p in review.procedures
        for line in _wrapped(
            (
                _time(p.get("started_ns")),
                str(p.get("procedure")),
                str(p.get("device")),
                str(p.get("status")),
                str(p.get("verdict") or "–"),
                f"started by {started_by(p)}; ended {_time(p.get('ended_ns'))}; {sign_off(review, p)}",
            ),
            (21, 20, 14, 12, 7),
        )
    ]
    signed = [
        line
        for row in review.signed
        for line in _wrapped(
            (
                _time(row.record.get("time_ns")),
                f"{_what(row.record)} {row.record.get('device')}",
                row.signature.meaning,
                row.signature.time[:19],
                f"{row.signature.printed_name} ({row.signature.signer}, {row.signature.role})"
                + ("" if row.intact else " — record CHANGED since signing")
                + (f"; comment: {row.signature.comment}" if row.signature.comment else ""),
            ),
            (21, 28, 10, 21),
        )
    ]
    signed += [
        line
        for text in [*(p.describe() for p in review.problems), *review.uncounted]
        for line in textwrap.wrap(text, TEXT_PAGE_COLUMNS)
    ]
    awaiting = [
        line
        for p in review.awaiting
        for line in _wrapped(
            (
                _time(p.get("time_ns")),
                str(record_kind(p)),
                _what(p),
                str(p.get("device")),
                f"{p['msg_id']}: {sign_off(review, p)}",
            ),
            (21, 14, 22, 14),
        )
    ]
    audit_lines = [
        line
        for r in audit.records
        for line in _wrapped(
            (
                f"#{r.seq}",
                r.time[:19],
                r.actor,
                r.action,
                r.target,
                f"{_plain(r.old_value)} -> {_plain(r.new_value)}; why: {r.reason}",
            ),
            (6, 21, 12, 20, 20),
        )
    ]
    return [
        ("hotlab QC report — summary", summary),
        ("Warnings and failures", verdict_lines([r for r in data.qc_results if r.get("verdict") != "pass"])),
        ("All verdicts", verdict_lines(data.qc_results)),
        ("QC procedures", procedures),
        ("Review and sign-off", signed),
        ("Awaiting review", awaiting),
        ("Limits and their sources", limits),
        ("Elutions", elutions),
        ("Audit trail of control actions", [*textwrap.wrap(status, TEXT_PAGE_COLUMNS), "", *audit_lines]),
    ]


def write_pdf(data: ReportData, path: Path | BinaryIO, figures: Sequence[ReportFigure] | None = None) -> int:
    """The report as PDF to a file, or to an open binary stream (the web panel's download): summary,
    figures, then the tables as text pages. Returns the page count."""
    figures = build_figures(data) if figures is None else figures
    texts = _pdf_text(data)
    pages = text_pages(*texts[0]) + [f.figure for f in figures]
    for title, lines in texts[1:]:
        pages += text_pages(title, lines)
    with PdfPages(
        path, metadata={"Title": f"hotlab QC report {iso_utc(data.period.start_ns)[:10]}", "Creator": "hotlab report"}
    ) as pdf:
        for page in pages:
            pdf.savefig(page)
    return len(pages)
