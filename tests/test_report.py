"""The QC report renders a recorded month: every verdict, embedded PNG plots, the audit status; CLI and PDF."""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from hotlab.controller.archive import HistoryArchive, TimeRange
from hotlab.controller.archive_reads import JUDGED_VALUE_SQL
from hotlab.controller.audit import ELUTION_ABORT, ELUTION_START, FAULT_ACKNOWLEDGE, QC_MANUAL_ENTRY, AuditLog
from hotlab.controller.cli.main import main as hotlab
from hotlab.controller.messages import Message, device_status_message, elution_message, qc_message, reading_message
from hotlab.controller.report import build_figures, collect, render_html
from hotlab.controller.report_plots import draw_limit_bands, linearity_figure, new_figure
from hotlab.drivers.records import ElutionRecord, Reading
from tests.schema_check import malformed_on_purpose

HOUR_NS = 3_600_000_000_000
DAY_NS = 24 * HOUR_NS
NOV_1 = 1_793_491_200_000_000_000  # 2026-11-01T00:00:00Z
YEAR_S = 365.25 * 86400
# Half-lives (ENSDF): Cs-137 30.08 y, Tc-99m 6.0067 h.
CS137_HALF_LIFE_S = 30.08 * YEAR_S
TC99M_HALF_LIFE_S = 6.0067 * 3600
SITE, STATION = "hotlab-a", "hot-cell-1"
TOLERANCE = {"kind": "tolerance", "unit": "%", "warn": 5.0, "fail": 10.0}
TG181 = "AAPM Report 181 (TG-181, 2012)"


def tolerance_verdict(dev: float) -> str:
    return "pass" if abs(dev) <= 5 else "warn" if abs(dev) <= 10 else "fail"


def qc(
    device: str,
    test: str,
    time_ns: int,
    *,
    measured: float,
    expected: float,
    unit: str,
    judged: float,
    verdict: str,
    limit_values: dict | None,
    limit: str,
    source: str,
    inputs: dict,
) -> Message:
    """A qc_result as the QC engine sends it: the builder's payload plus the engine's extra fields."""
    base = qc_message(
        SITE,
        STATION,
        device,
        test=test,
        verdict=verdict,
        measured=measured,
        expected=expected,
        # Only a tolerance judges the deviation; for the other limit kinds the schema wants none (null).
        deviation_pct=(measured / expected - 1) * 100 if (limit_values or {}).get("kind") == "tolerance" else None,
        limit=limit,
        limit_source=source,
        inputs=inputs,
        time_ns=time_ns,
    )
    extra = {"alarm": verdict != "pass", "unit": unit, "value_judged": judged, "detail": f"{test} on {device}"}
    if limit_values is not None:
        extra["limit_values"] = limit_values
    return Message(base.kind, base.topic, base.payload | extra)


@dataclass
class RecordedRun:
    messages: list[Message]
    in_period: list[Message] = field(default_factory=list)

    @property
    def qc_in_period(self) -> list[dict]:
        return [m.payload for m in self.in_period if m.kind == "qc_result"]


def recorded_november() -> RecordedRun:
    """A month of a two-calibrator, two-generator hot lab, plus results just outside the month."""
    rng = np.random.default_rng(7)
    messages: list[Message] = []
    cert_ns = NOV_1 - 2 * 365 * DAY_NS  # Cs-137 check source certified two years earlier at 7.4 MBq
    for day in range(-1, 31):  # day -1 and day 30 lie outside 2026-11-01..2026-11-30
        for device, bias in (("crc-1", 0.0), ("crc-2", 1.5)):
            t = NOV_1 + day * DAY_NS + 7 * HOUR_NS
            expected = 7.4e6 * 2 ** (-((t - cert_ns) / 1e9) / CS137_HALF_LIFE_S)
            dev = bias + float(rng.normal(0, 1.2))
            if device == "crc-2" and day == 12:
                dev = 6.3  # one warn
            if device == "crc-2" and day == 20:
                dev = -11.0  # one fail
            measured = expected * (1 + dev / 100)
            messages.append(
                qc(
                    device,
                    "constancy",
                    t,
                    measured=measured,
                    expected=expected,
                    unit="Bq",
                    judged=dev,
                    verdict=tolerance_verdict(dev),
                    limit_values=TOLERANCE,
                    limit="pass |dev| <= 5 %, warn <= 10 %, fail > 10 %",
                    source=TG181,
                    inputs={
                        "source_id": "CS-137-A",
                        "nuclide": "Cs-137",
                        "reference_bq": 7.4e6,
                        "readings_bq": [measured],
                    },
                )
            )
            messages.append(
                reading_message(SITE, STATION, Reading(device, "Cs-137", measured, measured / 3.7e7, "mCi", t))
            )
            messages.append(device_status_message(SITE, STATION, device, up=True, latency_ms=40.0, errors=0, time_ns=t))

    # Linearity by decay: a Tc-99m vial read every 4 h for 2 days, crc-1 slightly non-linear at the top.
    t0 = NOV_1 + 3 * DAY_NS + 8 * HOUR_NS
    times = [t0 + i * 4 * HOUR_NS for i in range(13)]
    activity = [
        3.7e10 * 2 ** (-(t - t0) / 1e9 / TC99M_HALF_LIFE_S) * (1.012 if i == 0 else 1.0) for i, t in enumerate(times)
    ]
    # The decay method: the expectation is the library half-life carried from the low-activity end (the
    # last readings, which follow the decay law exactly here), so only the first point deviates, by +1.2 %.
    expected = [activity[-1] * 2 ** ((times[-1] - t) / 1e9 / TC99M_HALF_LIFE_S) for t in times]
    devs = [(a / e - 1) * 100 for a, e in zip(activity, expected)]
    worst = max(range(len(devs)), key=lambda i: abs(devs[i]))
    points = [
        {"time_ns": t, "activity_bq": a, "expected_bq": e, "deviation_pct": d, "normalisation": i >= len(times) - 3}
        for i, (t, a, e, d) in enumerate(zip(times, activity, expected, devs))
    ]
    linearity_inputs = {"nuclide": "Tc-99m", "half_life_s": TC99M_HALF_LIFE_S, "points": points}
    messages.append(
        qc(
            "crc-1",
            "linearity",
            times[-1],
            measured=activity[worst],
            expected=expected[worst],
            unit="Bq",
            judged=devs[worst],
            verdict=tolerance_verdict(devs[worst]),
            limit_values=TOLERANCE,
            limit="pass |dev| <= 5 %, warn <= 10 %, fail > 10 %",
            source=TG181,
            inputs=linearity_inputs,
        )
    )

    # Ge-68/Ga-68 generator: one elution a working day, yield slowly declining; Ge-68 breakthrough weekly.
    floor = {"kind": "floor", "unit": "%", "warn": 65.0, "fail": 60.0}
    for counter, day in enumerate(range(0, 30), start=101):
        end = NOV_1 + day * DAY_NS + 8 * HOUR_NS
        yield_pct = 74.0 - 0.3 * day + float(rng.normal(0, 0.6))
        if day == 25:
            yield_pct = 63.5
        available = 1.4e9 * 2 ** (-day / 270.95)  # Ge-68 T1/2 = 270.95 d (ENSDF)
        record = ElutionRecord(
            STATION,
            "gen-GE-1",
            "Ge-68",
            "Ga-68",
            counter,
            available * yield_pct / 100,
            5.0,
            end - 150 * 1_000_000_000,
            end,
        )
        messages.append(elution_message(SITE, record, yield_pct=yield_pct))
        verdict = "pass" if yield_pct >= 65 else "warn" if yield_pct >= 60 else "fail"
        messages.append(
            qc(
                "gen-GE-1",
                "elution_yield",
                end,
                measured=record.activity_bq,
                expected=available,
                unit="Bq",
                judged=yield_pct,
                verdict=verdict,
                limit_values=floor,
                limit="pass value >= 65 %, warn >= 60 %, fail < 60 %",
                source="GalliaPharm SmPC section 2",
                inputs={"generator": "gen-GE-1", "yield_pct": yield_pct},
            )
        )
        if day % 7 == 2:
            bt = 1.2e-4 + day * 1e-6
            messages.append(
                qc(
                    "gen-GE-1",
                    "ge68_breakthrough",
                    end + 50 * HOUR_NS,
                    measured=bt,
                    expected=0.001,
                    unit="%",
                    judged=bt,
                    verdict="pass",
                    limit_values={"kind": "ceiling", "unit": "%", "fail": 0.001},
                    limit="pass value <= 0.001 %, fail > 0.001 %",
                    source="Ph. Eur. 2464 Gallium (68Ga) chloride solution for radiolabelling: Ge-68 max 0.001 %",
                    inputs={"generator": "gen-GE-1", "delay_s": 50 * 3600.0},
                )
            )
    for day in (4, 11, 18, 26):
        ratio = 0.01 * (1 + day / 10)
        messages.append(
            qc(
                "gen-TC-1",
                "mo99_breakthrough",
                NOV_1 + day * DAY_NS + 9 * HOUR_NS,
                measured=ratio,
                expected=0.15,
                unit="kBq/MBq",
                judged=ratio,
                verdict="pass",
                limit_values={"kind": "ceiling", "unit": "kBq/MBq", "fail": 0.15},
                limit="pass value <= 0.15 kBq/MBq, fail > 0.15 kBq/MBq",
                source="10 CFR 35.204(a): max 0.15 kBq Mo-99 per MBq Tc-99m at administration (also USP)",
                inputs={"generator": "gen-TC-1"},
            )
        )
    # A test the report has no dedicated figure for, and one from an engine that did not write limit_values.
    for day, dev in ((5, 3.0), (6, -21.5)):
        messages.append(
            qc(
                "crc-1",
                "dosage",
                NOV_1 + day * DAY_NS + 10 * HOUR_NS,
                measured=370e6 * (1 + dev / 100),
                expected=370e6,
                unit="Bq",
                judged=dev,
                verdict="pass" if abs(dev) <= 20 else "fail",
                limit_values={"kind": "tolerance", "unit": "%", "fail": 20.0},
                limit="pass |dev| <= 20 %, fail > 20 %",
                source="10 CFR 35.63(d)",
                inputs={"patient_ref": "P-0042 <script>alert(1)</script>"},
            )
        )
    # Archived before the engine added its fields (alarm, unit, value_judged …): the report must still show it.
    legacy = malformed_on_purpose(
        qc_message(
            SITE,
            STATION,
            "crc-2",
            test="background",
            verdict="pass",
            measured=1.2e3,
            expected=37e3,
            deviation_pct=-96.8,
            limit="value <= 37 kBq",
            limit_source="hotlab default",
            inputs={"nuclide": None},
            time_ns=NOV_1 + 9 * DAY_NS,
        )
    )
    messages.append(legacy)

    period = TimeRange.from_text("2026-11-01", "2026-11-30")
    return RecordedRun(messages, [m for m in messages if period.start_ns <= m.payload["time_ns"] < period.end_ns])


def write_audit(path: Path) -> None:
    log = AuditLog(path)
    log.append(
        actor="alice",
        action=FAULT_ACKNOWLEDGE,
        target="hot-cell-1/gen-GE-1",
        reason="before the period",
        time_ns=NOV_1 - DAY_NS,
    )
    for i, (actor, action, reason) in enumerate(
        (
            ("alice", ELUTION_START, "daily elution"),
            ("bob", ELUTION_ABORT, "line pressure"),
            ("bob", FAULT_ACKNOWLEDGE, "valve reseated"),
            ("carol", QC_MANUAL_ENTRY, "constancy entered by hand"),
        )
    ):
        log.append(
            actor=actor,
            action=action,
            target="hot-cell-1/gen-GE-1",
            reason=reason,
            old_value="idle",
            new_value={"state": "eluting"},
            time_ns=NOV_1 + (i + 2) * DAY_NS,
        )


class ReportParser(HTMLParser):
    """Checks that tags nest properly and collects what the assertions need."""

    VOID = {"img", "meta", "br", "hr", "link", "input", "col", "source"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.section: str | None = None
        self.rows: dict[str, list[tuple[str, str]]] = {}
        self.images: list[tuple[str, str]] = []
        self.tags: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self.section = a.get("id")
        if tag == "tr" and "data-msg-id" in a:
            self.rows.setdefault(self.section or "", []).append((a["data-msg-id"], a.get("class") or ""))
        if tag == "img":
            self.images.append((self.section or "", a.get("src") or ""))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[RecordedRun, Path, Path]:
    root = tmp_path_factory.mktemp("recorded")
    run = recorded_november()
    with HistoryArchive(root / "history.sqlite") as archive:
        archive.add_many(run.messages)
    write_audit(root / "audit.jsonl")
    return run, root / "history.sqlite", root / "audit.jsonl"


@pytest.fixture(scope="module")
def rendered(recorded: tuple[RecordedRun, Path, Path]) -> tuple[str, ReportParser, list]:
    run, archive_path, audit_path = recorded
    with HistoryArchive(archive_path) as archive:
        data = collect(archive, TimeRange.from_text("2026-11-01", "2026-11-30"), audit_path)
    figures = build_figures(data)
    document = render_html(data, figures)
    parser = ReportParser()
    parser.feed(document)
    parser.close()
    return document, parser, figures


def test_html_is_well_formed_and_self_contained(rendered: tuple[str, ReportParser, list]) -> None:
    document, parser, _ = rendered
    assert document.startswith("<!DOCTYPE html>")
    assert "<title>hotlab QC report 2026-11-01 – 2026-11-30</title>" in document
    assert parser.stack == []
    assert not {"script", "link", "iframe", "object"} & parser.tags
    assert "http://" not in document and "https://" not in document and "url(" not in document
    assert "<script>alert(1)</script>" not in document and "&lt;script&gt;alert(1)&lt;/script&gt;" in document


def test_every_verdict_in_the_period_has_a_row(
    recorded: tuple[RecordedRun, Path, Path], rendered: tuple[str, ReportParser, list]
) -> None:
    run, _, _ = recorded
    _, parser, _ = rendered
    rows = dict(parser.rows["verdicts"])
    expected = {p["msg_id"]: p["verdict"] for p in run.qc_in_period}
    assert len(expected) > 100
    assert set(rows) == set(expected)
    assert all(f"verdict-{expected[msg_id]}" in css for msg_id, css in rows.items())
    outside = {m.msg_id for m in run.messages if m.kind == "qc_result"} - set(expected)
    assert outside and not outside & set(rows)
    not_passed = {msg_id for msg_id, verdict in expected.items() if verdict != "pass"}
    assert {msg_id for msg_id, _ in parser.rows["deviations"]} == not_passed
    assert len(not_passed) >= 4  # the crc-2 warn and fail, the low yield, the wrong dosage


def test_plots_are_embedded_pngs_in_their_sections(rendered: tuple[str, ReportParser, list]) -> None:
    _, parser, figures = rendered
    assert len(parser.images) == len(figures)
    for _, src in parser.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix) :])[:8] == b"\x89PNG\r\n\x1a\n"
    per_section: dict[str, int] = {}
    for section, _ in parser.images:
        per_section[section] = per_section.get(section, 0) + 1
    # Constancy per calibrator, one linearity series, one yield curve, Ge-68 and Mo-99 breakthrough,
    # and the generic tests (dosage, background).
    assert per_section == {"constancy": 2, "linearity": 1, "elution-yield": 1, "breakthrough": 2, "other": 2}


def test_limits_sources_elutions_and_audit_are_listed(rendered: tuple[str, ReportParser, list]) -> None:
    document, parser, _ = rendered
    text = " ".join(parser.text)
    assert "Ph. Eur. 2464 Gallium (68Ga) chloride solution for radiolabelling" in text
    assert "10 CFR 35.204(a)" in text and TG181 in text
    assert "Audit chain intact: 5 record(s)" in text
    for reason in ("daily elution", "line pressure", "valve reseated", "constancy entered by hand"):
        assert reason in text
    assert "before the period" not in text
    # One elution a day at 08:00 on Nov 1..30: `--to 2026-11-30` includes the whole last day.
    elutions = parser.rows["elutions"]
    assert len(elutions) == 30 and len(set(elutions)) == 30


def test_audit_tampering_shows_in_the_report_and_fails_the_cli(
    recorded: tuple[RecordedRun, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, archive_path, audit_path = recorded
    tampered = tmp_path / "audit.jsonl"
    lines = audit_path.read_text().splitlines(keepends=True)
    record = json.loads(lines[2])
    record["reason"] = "routine"
    lines[2] = json.dumps(record) + "\n"
    tampered.write_text("".join(lines))
    out = tmp_path / "tampered.html"
    # One day is enough: the whole chain is verified whatever the period.
    code = hotlab(
        [
            "report",
            "--from",
            "2026-11-01",
            "--to",
            "2026-11-01",
            "--archive",
            str(archive_path),
            "--audit",
            str(tampered),
            "--out",
            str(out),
        ]
    )
    assert code == 1
    assert "line 3" in capsys.readouterr().err
    document = out.read_text()
    assert "Audit chain BROKEN" in document and "line 3:" in document


def test_cli_writes_html_and_pdf(
    recorded: tuple[RecordedRun, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, archive_path, audit_path = recorded
    out = tmp_path / "nov" / "report.html"
    # The first ten days hold a result of every test (all nine figures) with fewer table pages.
    code = hotlab(
        [
            "report",
            "--from",
            "2026-11-01",
            "--to",
            "2026-11-10",
            "--archive",
            str(archive_path),
            "--audit",
            str(audit_path),
            "--out",
            str(out),
            "--pdf",
            "--site",
            SITE,
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert '<section id="verdicts">' in out.read_text()
    pdf = out.with_suffix(".pdf").read_bytes()
    assert pdf.startswith(b"%PDF")
    pages = pdf.count(b"/Type /Page\n") or pdf.count(b"/Type /Page ")
    printed = int(capsys.readouterr().out.split(".pdf: ")[1].split(" page")[0])
    # Summary, eight figures, nine table sections of one page each (the verdicts per day among them).
    assert printed == 1 + 8 + 9
    assert pages in (0, printed)  # PdfPages writes one /Type /Page object per page


def test_cli_bad_input_exits_2(
    tmp_path: Path, recorded: tuple[RecordedRun, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, archive_path, _ = recorded
    assert hotlab(["report", "--from", "November", "--to", "2026-11-30", "--archive", str(archive_path)]) == 2
    assert "cannot read the start" in capsys.readouterr().err
    assert (
        hotlab(["report", "--from", "2026-11-01", "--to", "2026-11-30", "--archive", str(tmp_path / "none.sqlite")])
        == 2
    )
    assert "no history archive" in capsys.readouterr().err
    assert hotlab(["report", "--from", "2026-11-30", "--to", "2026-11-01", "--archive", str(archive_path)]) == 2


def test_empty_period_renders_without_figures(recorded: tuple[RecordedRun, Path, Path], tmp_path: Path) -> None:
    _, archive_path, _ = recorded
    with HistoryArchive(archive_path) as archive:
        data = collect(archive, TimeRange.from_text("2025-01-01", "2025-01-31"), tmp_path / "no-audit.jsonl")
    document = render_html(data)
    assert "<img" not in document
    assert "No QC results in this period." in document and "No audit trail at" in document


def test_judged_value_falls_back_for_results_without_engine_fields(tmp_path: Path) -> None:
    """What a limit judged: `value_judged` when the engine wrote it, else the deviation for a tolerance (the
    kind assumed without limit_values), else the measured value (a ceiling judges the measured ratio)."""
    cases = [
        ({"value_judged": 63.5, "deviation_pct": -10.0}, 63.5),
        ({"deviation_pct": -4.0, "measured": 1.0}, -4.0),
        ({"limit_values": {"kind": "ceiling"}, "deviation_pct": -4.0, "measured": 0.02}, 0.02),
        ({"limit_values": {"kind": "ceiling"}, "measured": None}, None),
    ]
    with HistoryArchive(tmp_path / "history.sqlite3") as archive:
        archive.add_many(
            malformed_on_purpose(Message("qc_result", "t", {"msg_id": f"m{i}", "time_ns": i} | fields))
            for i, (fields, _) in enumerate(cases)
        )
        judged = archive.select(f"SELECT {JUDGED_VALUE_SQL} FROM message ORDER BY time_ns")
    assert [value for (value,) in judged] == [expected for _, expected in cases]


def test_limit_bands_follow_the_limit_kind() -> None:
    ax = new_figure().add_subplot()
    draw_limit_bands(ax, TOLERANCE, [1.0, -2.0, 12.0])
    low, high = ax.get_ylim()
    assert low < -10 and high > 12 and math.isclose(low, -high)
    assert len(ax.patches) == 5  # pass, 2 warn, 2 fail
    ax = new_figure().add_subplot()
    draw_limit_bands(ax, {"kind": "floor", "unit": "%", "warn": 65.0, "fail": 60.0}, [70.0, 72.0])
    assert ax.get_ylim()[0] < 60 and len(ax.patches) == 3
    ax = new_figure().add_subplot()
    draw_limit_bands(ax, {"kind": "ceiling", "unit": "%", "fail": 0.001}, [1e-4])
    assert ax.get_ylim()[0] == 0.0 and ax.get_ylim()[1] > 0.001 and len(ax.patches) == 2


def test_linearity_figure_needs_points() -> None:
    assert linearity_figure("x", {"nuclide": "Tc-99m"}, TOLERANCE) is None
    assert linearity_figure("x", {"points": [{"time_ns": 1}]}, TOLERANCE) is None


def test_without_matplotlib_the_report_says_which_extra_to_install(tmp_path: Path) -> None:
    """matplotlib is the optional extra hotlab[report]: its absence is one line, not a traceback."""
    archive = tmp_path / "history.sqlite3"
    HistoryArchive(archive).close()
    program = (
        "import sys\n"
        "class NoMatplotlib:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'matplotlib':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoMatplotlib())\n"
        "from hotlab.controller.cli.main import main\n"
        f"sys.exit(main(['report', '--from', '2026-11-01', '--to', '2026-11-02', '--archive', {str(archive)!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == "hotlab report: error: the report needs matplotlib: pip install 'hotlab[report]'"


def test_procedures_signatures_and_what_awaits_review_are_reported(tmp_path: Path) -> None:
    """One daily procedure signed twice (reviewed, then approved with a comment), one ended and unsigned, one
    running; the report lists each procedure with its sign-off, and every signature with who, name and meaning."""
    from hotlab.controller.report import write_pdf
    from hotlab.controller.signatures import sign
    from hotlab.controller.users import Credentials, UserStore
    from tests.test_review import KEY, procedure, result

    t0 = NOV_1 + 3 * DAY_NS + 7 * HOUR_NS
    signed_id, unsigned_id, running_id = "1" * 32, "2" * 32, "3" * 32
    results = [result("constancy", t0 + 60_000_000_000, signed_id)]
    signed_end = procedure(
        signed_id, "complete", started_ns=t0, ended_ns=t0 + 120_000_000_000, results=[results[0].msg_id], verdict="pass"
    )
    unsigned_end = procedure(
        unsigned_id,
        "incomplete",
        started_ns=t0 + DAY_NS,
        ended_ns=t0 + DAY_NS + 600_000_000_000,
        results=[],
        verdict=None,
    )
    running = procedure(running_id, "started", started_ns=t0 + 2 * DAY_NS, ended_ns=None, results=[], verdict=None)
    archive_path, audit_path = tmp_path / "history.sqlite3", tmp_path / "audit.jsonl"
    with HistoryArchive(archive_path) as archive:
        archive.add_many([*results, signed_end, unsigned_end, running])
    with (
        UserStore(tmp_path / "users.sqlite3", AuditLog(audit_path, key=KEY)) as store,
        HistoryArchive(archive_path) as archive,
    ):
        store.add_user("root", "Ada Admin", "admin", "admin passphrase one", admin=None)
        store.add_user(
            "jdoe", "Jane Doe", "qc_officer", "qc officer passphrase", admin=Credentials("root", "admin passphrase one")
        )
        jane = Credentials("jdoe", "qc officer passphrase")
        sign(store=store, archive=archive, credentials=jane, record_ids=[signed_end.msg_id], meaning="reviewed")
        sign(
            store=store,
            archive=archive,
            credentials=Credentials("root", "admin passphrase one"),
            record_ids=[signed_end.msg_id],
            meaning="approved",
            comment="<b>fine</b>",
        )
        data = collect(archive, TimeRange.from_text("2026-11-01", "2026-11-30"), audit_path, audit_key=KEY)
    document = render_html(data, [])
    parser = ReportParser()
    parser.feed(document)
    parser.close()
    assert [msg_id for msg_id, _ in parser.rows["procedures"]] == [
        signed_end.msg_id,
        unsigned_end.msg_id,
        running.msg_id,
    ]
    assert [msg_id for msg_id, _ in parser.rows["review"]] == [signed_end.msg_id, signed_end.msg_id]
    assert [css for _, css in parser.rows["review"]] == ["signature meaning-reviewed", "signature meaning-approved"]
    assert [msg_id for msg_id, _ in parser.rows["awaiting-review"]] == [unsigned_end.msg_id]
    text = " ".join(parser.text)
    assert 'reviewed by Jane Doe; approved by Ada Admin: "<b>fine</b>"' in text
    assert "op (operator)" in text and "awaiting review" in text and "running" in text
    assert "<b>fine</b>" in text and "<b>fine</b>" not in document  # the comment is shown, escaped
    assert "every record signed (in any period) is in the archive as it was signed" in text
    assert parser.stack == []
    pages = write_pdf(data, tmp_path / "report.pdf", [])
    assert pages >= 8 and (tmp_path / "report.pdf").read_bytes().startswith(b"%PDF")


def test_a_record_only_reviewed_awaits_approval_and_uncounted_signatures_are_named(tmp_path: Path) -> None:
    """A loose result reviewed with a comment still awaits approval, and says so; a signature entry by an
    operator, though in an intact chain, is listed as not counting instead of as a sign-off."""
    from hotlab.controller.audit import RECORD_SIGNED
    from hotlab.controller.signatures import sign
    from hotlab.controller.users import Credentials, UserStore
    from tests.test_review import KEY, result

    loose = result("linearity", NOV_1 + 3 * DAY_NS, None, verdict="warn")
    archive_path, audit_path = tmp_path / "history.sqlite3", tmp_path / "audit.jsonl"
    with HistoryArchive(archive_path) as archive:
        archive.add_many([loose])
    audit = AuditLog(audit_path, key=KEY)
    with UserStore(tmp_path / "users.sqlite3", audit) as store, HistoryArchive(archive_path) as archive:
        store.add_user("root", "Ada Admin", "admin", "admin passphrase one", admin=None)
        admin = Credentials("root", "admin passphrase one")
        store.add_user("jdoe", "Jane Doe", "qc_officer", "qc officer passphrase", admin=admin)
        store.add_user("op", "Otto Operator", "operator", "operator passphrase", admin=admin)
        review = sign(
            store=store,
            archive=archive,
            credentials=Credentials("jdoe", "qc officer passphrase"),
            record_ids=[loose.msg_id],
            meaning="reviewed",
            comment="second series pending",
        )
        forged = audit.append(
            actor="op",
            action=RECORD_SIGNED,
            target="crc-1",
            reason="approved",
            new_value={
                "signer": "op",
                "printed_name": "Otto Operator",
                "role": "qc_officer",
                "meaning": "approved",
                "comment": None,
                "records": [r.as_json() for r in review.records],
            },
        )
        data = collect(archive, TimeRange.from_text("2026-11-01", "2026-11-30"), audit_path, audit_key=KEY)
    assert [row.signature.seq for row in data.review.index.rows()] == [review.seq]
    assert [p["msg_id"] for p, _ in data.review.index.awaiting("qc_result")] == [loose.msg_id]
    document = render_html(data, [])
    parser = ReportParser()
    parser.feed(document)
    parser.close()
    assert [msg_id for msg_id, _ in parser.rows["awaiting-review"]] == [loose.msg_id]
    text = " ".join(parser.text)
    assert 'reviewed by Jane Doe: "second series pending"; awaiting approval' in text
    assert f"audit record #{forged.seq} (op, {forged.time}) does not count: 'op' was added as operator" in text
    assert parser.stack == []
