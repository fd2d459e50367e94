"""The QC, review and audit pages in a real browser (Debian's chromium through Playwright), against a real Mosquitto.

The archive is written by the real QC engine (controller/qc/engine.py): a baseline procedure,
nine days of daily constancy on three settings, three Ga-68 elutions and one Ge-68 follow-up,
each commit archived whole as the history sink archives it. The audit trail is the user store's
(HMAC-keyed), and signatures are made through the page. Expected values are worked out here:

- constancy: the site's rule in [qc.limits.constancy] is warn beyond ±4 %, fail beyond ±8 %, so
  +5.5 % warns, and the chart's lines sit at ±4 and ±8 on its linear y axis;
- the schedule ([qc.schedule], docs/qc.md "Schedule"): a calibrator installed 40 days ago and never
  tested is overdue for linearity (7 d grace), accuracy (30 d grace) and geometry (7 d grace); a
  Ge-68 follow-up is due 48 h after its elution and overdue 24 h later; the daily check last done
  two days ago is due today until the 23:59 UTC deadline;
- Ph. Eur. 2464: Ge-68 at most 0.001 % of the Ga-68; GalliaPharm SmPC: yield at least 60 %.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from playwright.async_api import Browser, BrowserContext, Locator, Page, async_playwright, expect

from hotlab.controller.archive import HistoryArchive, TimeRange
from hotlab.controller.audit import RECORD_SIGNED, USER_AUTH_FAILED, AuditLog, iter_records
from hotlab.controller.config import LabConfig, MqttConfig, parse_config
from hotlab.controller.messages import (
    MeasurementValues,
    Message,
    elution_message,
    elution_msg_id,
    iso_utc,
    measurement_message,
)
from hotlab.controller.qc.engine import QcConfig, QcEngine
from hotlab.controller.qc.limits import DEFAULT_LIMITS
from hotlab.controller.qc.procedures import Procedure, new_procedure_id
from hotlab.controller.qc.result import judged
from hotlab.controller.signatures import awaiting_review, read_signatures
from hotlab.controller.users import Credentials, UserStore
from hotlab.controller.web.app import create_app
from hotlab.controller.web.live import LiveFeed
from hotlab.controller.web.panel import Panel
from hotlab.controller.web.records_audit import AuditFilter, audit_page
from hotlab.controller.web.records_qc import Cursor, ResultFilter, read_qc_page
from hotlab.controller.web.records_query import PAGE_SIZE, Period
from hotlab.drivers.records import ElutionRecord
from hotlab.physics.nuclides import get_nuclide
from tests.mosquitto_service import MosquittoBroker, free_tcp_port, mosquitto  # noqa: F401

CHROMIUM = "/usr/bin/chromium"
KEY = b"hotlab web records test key, 32 bytes or more"
SITE, STATION, CALIBRATOR, GENERATOR = "lab-a", "hot", "cal", "GA-1"
ADMIN_PW, QC_PW, OPERATOR_PW = "admin passphrase one", "qc officer passphrase", "operator passphrase"
S = 10**9
H = 3600 * S
D = 24 * H
#: The site's constancy rule (a local SOP tighter than the profile's ±5/±10 %).
CONSTANCY_WARN_PCT, CONSTANCY_FAIL_PCT, CONSTANCY_SOURCE = 4.0, 8.0, "site SOP QC-7 (constancy action levels)"
#: What this chamber reads for the Cs-137 check source on each setting at the baseline (its calibration factors).
READS = {"Cs-137": 7.0e6, "Tc-99m": 9.1e6, "F-18": 5.2e6}
CS137_HALF_LIFE_S = get_nuclide("Cs-137").half_life_s
#: Deviation from the baseline measured on each day (days before now) and setting; all else reads +0.5 %.
WARN_DAY, WARN_DEVIATION_PCT = 5, 5.5
SHOWN_WITHIN_MS = 5000


def qc_table(now_ns: int) -> dict[str, Any]:
    installed = (datetime.fromtimestamp(now_ns / S, UTC) - timedelta(days=40)).date().isoformat()
    return {
        "procedure_timeout_min": 30,
        "sources": {"CS-1": {"nuclide": "Cs-137", "activity": "7.4 MBq", "reference_time": "2020-01-01T00:00:00Z"}},
        "devices": {CALIBRATOR: {"check_source": "CS-1", "settings": ["Tc-99m", "F-18"], "minimum_detectable_bq": 2.0}},
        "generators": {
            GENERATOR: {"parent": "Ge-68", "activity": "1.85 GBq", "calibration_time": iso_utc(now_ns - 60 * D)}
        },
        "limits": {"constancy": {"warn": CONSTANCY_WARN_PCT, "fail": CONSTANCY_FAIL_PCT, "source": CONSTANCY_SOURCE}},
        "schedule": {"timezone": "UTC", "daily_deadline": "23:59", "devices": {CALIBRATOR: {"installed": installed}}},
    }


def measured(
    activity_bq: float, settle_ns: int, setting: str, *, start_ns: int, end: str, background_bq: float = 1e3
) -> Message:
    values = MeasurementValues(
        CALIBRATOR,
        setting,
        activity_bq,
        activity_bq * 1e-3,
        5,
        background_bq,
        start_ns,
        settle_ns,
        settle_ns + S if end == "removed" else None,
        end,  # type: ignore[arg-type]
        ("a" * 32, "b" * 32),
        (background_bq,),
    )
    return measurement_message(SITE, STATION, values)


def started(kind: str, at_ns: int, role: str, **subject: Any) -> Message:
    """A start record as the start_qc command commits it (controller/qc/procedure_commands.py)."""
    settings = ("Cs-137", "Tc-99m", "F-18") if kind in ("baseline", "daily_constancy") else ("Ga-68",)
    procedure = Procedure(
        procedure_id=new_procedure_id(),
        kind=kind,
        site=SITE,
        station=STATION,
        device=CALIBRATOR,
        started_by={"user": "jdoe", "role": role},
        started_ns=at_ns,
        settings=settings,
        reason="acceptance" if kind == "baseline" else "follow-up",
        **subject,
    )
    return procedure.started_message()


def elution(counter: int, activity_bq: float, end_ns: int) -> Message:
    record = ElutionRecord(
        "gastation", GENERATOR, "Ge-68", "Ga-68", counter, activity_bq, 5.0, end_ns - 300 * S, end_ns
    )
    return elution_message(SITE, record, msg_id=elution_msg_id(record))


@dataclass
class Lab:
    config: LabConfig
    now_ns: int
    archive_path: Path
    audit_path: Path
    users_path: Path
    #: msg_id of each constancy result by (days before now, setting).
    constancy: dict[tuple[int, str], str]
    #: The end record of each daily constancy procedure, by days before now.
    daily_ends: dict[int, dict[str, Any]]
    elutions: list[str]
    #: The elution_yield result of each elution, in order: results outside any procedure.
    yields: list[str]

    def store(self) -> UserStore:
        return UserStore(self.users_path, AuditLog(self.audit_path, key=KEY))


def record_lab(root: Path) -> Lab:
    """A lab's archive as the controller leaves it, and a user store with an admin, a QC officer and an operator."""
    now = time.time_ns() // S * S
    qc_config = qc_table(now)
    engine = QcEngine(SITE, QcConfig.from_mapping(qc_config))
    archive_path = root / "history.sqlite3"
    constancy: dict[tuple[int, str], str] = {}
    daily_ends: dict[int, dict[str, Any]] = {}
    with HistoryArchive(archive_path) as archive:

        def commit(*messages: Message) -> list[Message]:
            outcome = engine.process(*messages)
            engine.apply(outcome)
            archive.add_many(outcome.messages)
            return list(outcome.messages)

        baseline_ns = now - 20 * D
        commit(started("baseline", baseline_ns, "qc_officer", source_id="CS-1"))
        settled = {}
        steps = []
        for i, setting in enumerate(READS):
            settled[setting] = baseline_ns + (60 + 30 * i) * S
            steps.append(
                measured(
                    READS[setting],
                    settled[setting],
                    setting,
                    start_ns=settled[setting] - 29 * S,
                    end="dwell" if i == 2 else "setting_changed",
                )
            )
        commit(*steps)
        for day in range(10, 1, -1):
            day_ns = now - day * D
            steps = []
            for i, setting in enumerate(READS):
                settle = day_ns + (60 + 30 * i) * S
                # The baseline reading decayed with the SOURCE's half-life (Cs-137), whatever the setting.
                expected = READS[setting] * 2 ** (-((settle - settled[setting]) / S) / CS137_HALF_LIFE_S)
                deviation = WARN_DEVIATION_PCT if (day, setting) == (WARN_DAY, "Tc-99m") else 0.5
                end = "removed" if i == 2 else "setting_changed"
                steps.append(
                    measured(expected * (1 + deviation / 100), settle, setting, start_ns=settle - 29 * S, end=end)
                )
            for message in commit(*steps):
                if message.kind == "qc_result" and message.payload["test"] == "constancy":
                    constancy[(day, message.payload["inputs"]["setting"])] = message.msg_id
                if message.kind == "qc_procedure" and message.payload["status"] != "started":
                    daily_ends[day] = message.payload
        elutions, yields = [], []
        for counter, (back_ns, eluted_bq) in enumerate([(6 * D, 1.3e9), (4 * D, 1.2e9), (50 * H, 1.1e9)], start=1):
            eluted = elution(counter, eluted_bq, now - back_ns)
            elutions.append(eluted.msg_id)
            yields += [m.msg_id for m in commit(eluted) if m.payload.get("test") == "elution_yield"]
            if counter == 2:  # the first elution's Ge-68 follow-up, 60 h after it (>= 48 h, Ph. Eur. 2464)
                at = now - 6 * D + 60 * H
                commit(started("ge68_breakthrough", at, "operator", elution_id=elutions[0], generator=GENERATOR))
                commit(measured(60.0, at + 60 * S, "Ga-68", start_ns=at + 30 * S, end="removed", background_bq=10.0))
    device = {"name": CALIBRATOR, "station": STATION, "family": "vik202", "transport": "/dev/null"}
    config = parse_config(
        {"site": {"name": SITE}, "history": {"path": str(archive_path)}, "device": [device], "qc": qc_config}
    )
    lab = Lab(
        config, now, archive_path, root / "audit.jsonl", root / "users.sqlite3", constancy, daily_ends, elutions, yields
    )
    with lab.store() as store:
        store.add_user("root", "Ada Admin", "admin", ADMIN_PW, admin=None)
        store.add_user("jdoe", "Jane Doe", "qc_officer", QC_PW, admin=Credentials("root", ADMIN_PW))
        store.add_user("op", "Otto Operator", "operator", OPERATOR_PW, admin=Credentials("root", ADMIN_PW))
    return lab


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return record_lab(tmp_path)


@pytest.fixture
def store(lab: Lab) -> Iterator[UserStore]:
    with lab.store() as users:
        yield users


@pytest.fixture
async def panel(mosquitto: MosquittoBroker, lab: Lab, store: UserStore) -> AsyncIterator[str]:
    """The panel's base URL, once it is subscribed to the broker."""
    feed = LiveFeed(SITE, MqttConfig(host=mosquitto.host, port=mosquitto.port))
    port = free_tcp_port()
    app = create_app(Panel(lab.config, feed, store))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    serving = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not (server.started and feed.view.connected):
        assert time.monotonic() < deadline, "the panel did not start and subscribe within 10 s"
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            await chromium.close()


async def signed_in(browser: Browser, base: str, username: str, password: str) -> tuple[BrowserContext, Page]:
    context = await browser.new_context(accept_downloads=True)
    page = await context.new_page()
    await page.goto(base + "/login")
    await page.fill("#username", username)
    await page.fill("#password", password)
    await page.click("button[type=submit]")
    await expect(page).to_have_url(base + "/")
    return context, page


async def number(element: Locator, attribute: str) -> float:
    return float(await element.get_attribute(attribute) or "nan")


def archived_sha256(archive_path: Path, msg_id: str) -> str:
    """SHA-256 of the canonical JSON (sorted keys, no spaces, UTF-8) of the payload as the archive's row holds it."""
    with sqlite3.connect(archive_path) as db:
        (text,) = db.execute("SELECT payload FROM message WHERE msg_id = ?", (msg_id,)).fetchone()
    canonical = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


browser_test = pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="Debian's chromium is not installed")


@pytest.mark.integration
@browser_test
async def test_qc_page_shows_what_is_due_filtered_results_charts_with_their_limits_and_the_report(
    panel: str, lab: Lab, browser: Browser, tmp_path: Path
) -> None:
    context, page = await signed_in(browser, panel, "jdoe", QC_PW)
    await page.goto(panel + "/qc")

    def item(name: str) -> Any:
        return page.locator(f"#schedule tr[data-item='{name}']")

    for overdue in ("linearity", "accuracy", "geometry"):  # installed 40 d ago, never tested, grace 7/30/7 d
        await expect(item(f"{CALIBRATOR}/{overdue}")).to_have_class("overdue")
    before_deadline = datetime.now(UTC).strftime("%H:%M") < "23:59"
    await expect(item(f"{CALIBRATOR}/daily_constancy")).to_have_class("due" if before_deadline else "overdue")
    done, overdue, due = lab.elutions  # ended 6 d (followed up at 60 h), 4 d (96 h > 48 + 24 h) and 50 h ago
    await expect(item(f"{GENERATOR}/ge68_breakthrough/{done}")).to_have_class("done")
    await expect(item(f"{GENERATOR}/ge68_breakthrough/{overdue}")).to_have_class("overdue")
    await expect(item(f"{GENERATOR}/ge68_breakthrough/{due}")).to_have_class("due")

    # Filters: the one constancy result that warned: +5.5 % is beyond the site's 4 % and within its 8 %.
    await page.select_option("select[name=device]", CALIBRATOR)
    await page.select_option("select[name=test]", "constancy")
    await page.select_option("select[name=verdict]", "warn")
    await page.get_by_role("button", name="Show").click()
    rows = page.locator("#results tbody tr")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_have_attribute("data-msg-id", lab.constancy[(WARN_DAY, "Tc-99m")])
    await expect(rows.first.locator(".num")).to_have_text(f"+{WARN_DEVIATION_PCT:.2f} %")
    await page.select_option("select[name=verdict]", "pass")
    await page.get_by_role("button", name="Show").click()
    await expect(rows).to_have_count(9 * 3 - 1)  # nine days, three settings, less the one that warned

    # The Tc-99m constancy chart: each limit line where the site's rule puts it on the drawn y axis.
    await page.goto(panel + "/qc")  # every device: a generator's charts too
    chart = page.locator(f"[data-chart='constancy-{CALIBRATOR}-Tc-99m']")
    svg = chart.locator("svg")
    y_min, y_max, top, bottom = [
        await number(svg, f"data-{name}") for name in ("y-min", "y-max", "plot-top", "plot-bottom")
    ]

    def y_of(value: float) -> float:  # linear: y_max at the top of the plot, y_min at its bottom
        return top + (y_max - value) / (y_max - y_min) * (bottom - top)

    for value in (CONSTANCY_WARN_PCT, -CONSTANCY_WARN_PCT, CONSTANCY_FAIL_PCT, -CONSTANCY_FAIL_PCT):
        line = svg.locator(f"line.level[data-value='{value}']")
        assert await number(line, "y1") == pytest.approx(y_of(value), abs=0.01)
    band = svg.locator("rect.pass-band")
    band_top, band_height = await number(band, "y"), await number(band, "height")
    assert band_top == pytest.approx(y_of(CONSTANCY_WARN_PCT), abs=0.01)
    assert band_top + band_height == pytest.approx(y_of(-CONSTANCY_WARN_PCT), abs=0.02)
    await expect(svg.locator("circle.dot")).to_have_count(9)  # one result a day on this setting
    await expect(svg.locator("circle.dot.warn")).to_have_count(1)
    await expect(chart.locator(".limit")).to_contain_text(CONSTANCY_SOURCE)

    ge68 = page.locator(f"[data-chart='ge68-{GENERATOR}']")
    await expect(ge68.locator("line.level.fail")).to_have_attribute("data-value", "0.001")  # Ph. Eur. 2464
    await expect(ge68.locator(".limit")).to_contain_text("Ph. Eur. 2464")
    yields = page.locator(f"[data-chart='yield-{GENERATOR}']")
    await expect(yields.locator("line.level.fail")).to_have_attribute("data-value", "60.0")  # GalliaPharm SmPC
    await expect(yields.locator(".limit")).to_contain_text("GalliaPharm SmPC")
    await expect(yields.locator("circle.dot")).to_have_count(3)

    # The report for the period, as HTML and as PDF.
    first_day = datetime.fromtimestamp((lab.now_ns - 30 * D) / S, UTC).date().isoformat()
    last_day = datetime.fromtimestamp(lab.now_ns / S, UTC).date().isoformat()
    report = page.locator("#report")
    await report.locator("input[name=from]").fill(first_day)
    await report.locator("input[name=to]").fill(last_day)
    downloaded = {}
    for fmt in ("HTML", "PDF"):
        async with page.expect_download() as waiting:
            await report.get_by_role("button", name=f"Download {fmt}").click()
        download = await waiting.value
        target = tmp_path / download.suggested_filename
        await download.save_as(target)
        downloaded[fmt] = target.read_bytes()
    assert downloaded["HTML"].startswith(b"<!DOCTYPE html>")
    assert lab.constancy[(WARN_DAY, "Tc-99m")].encode() in downloaded["HTML"]
    assert downloaded["PDF"].startswith(b"%PDF")
    await context.close()


@pytest.mark.integration
@browser_test
async def test_a_signature_made_on_the_review_page_is_in_the_audit_page_and_the_archives_review_state(
    panel: str, lab: Lab, store: UserStore, browser: Browser
) -> None:
    context, page = await signed_in(browser, panel, "jdoe", QC_PW)
    await page.goto(panel + "/review")
    # Awaiting review: every ended procedure (the baseline, nine daily checks, the Ge-68 follow-up) and each
    # result outside a procedure (the three elution yields).
    await expect(page.locator("#awaiting h2")).to_have_text("Awaiting review (14)")
    warned, lowest_yield = lab.daily_ends[WARN_DAY], lab.yields[-1]
    for msg_id in (warned["msg_id"], lowest_yield):  # a procedure and a result outside any, signed together
        await page.locator(f"#awaiting tr[data-msg-id='{msg_id}']").get_by_role("checkbox").check()
    await page.get_by_label("approved").check()
    await page.fill("textarea[name=comment]", "Tc-99m +5.5 % checked against the service log")
    await page.fill("input[name=username]", "jdoe")

    # A wrong password: refused in one line, audited by the store and counted towards the lockout.
    await page.fill("input[name=password]", "not my password")
    async with page.expect_response(lambda r: r.url.endswith("/review/sign")) as refused:
        await page.get_by_role("button", name="Sign the chosen records").click()
    assert (await refused.value).status == 401
    await expect(page.get_by_role("alert")).to_have_text("Not signed: unknown user or wrong password for 'jdoe'.")
    failures = [r for r in iter_records(lab.audit_path) if r.action == USER_AUTH_FAILED and r.actor == "jdoe"]
    assert len(failures) == 1 and failures[0].new_value == {"failed_passwords": 1}
    assert read_signatures(lab.audit_path, KEY).valid == []

    await page.fill("input[name=username]", "jdoe")  # the choices were kept; the password is typed again
    await page.fill("input[name=password]", QC_PW)
    await page.get_by_role("button", name="Sign the chosen records").click()
    await expect(page.get_by_role("status")).to_contain_text("approved by Jane Doe (jdoe, qc_officer)")
    await expect(page.locator("#awaiting h2")).to_have_text("Awaiting review (12)")
    signed_row = page.locator("#signed tbody tr").first
    await expect(signed_row).to_contain_text("Jane Doe")
    await expect(signed_row).to_contain_text("Tc-99m +5.5 % checked against the service log")
    await expect(signed_row.locator(f"li[data-msg-id='{warned['msg_id']}']")).to_contain_text("unchanged")

    # The archive's review state: one signature that counts, binding the procedure, its three results and the yield.
    [signature] = read_signatures(lab.audit_path, KEY).valid
    assert (signature.signer, signature.printed_name, signature.meaning) == ("jdoe", "Jane Doe", "approved")
    bound = {record.msg_id: record.sha256 for record in signature.records}
    signed_ids = [warned["msg_id"], *warned["results"], lowest_yield]
    assert bound == {m: archived_sha256(lab.archive_path, m) for m in signed_ids}
    with HistoryArchive(lab.archive_path, read_only=True) as archive:
        pending = {p["msg_id"] for p in awaiting_review(archive, [signature])}
    assert not pending & {warned["msg_id"], lowest_yield} and len(pending) == 12

    # The audit page finds it; each filter narrows the list.
    await page.get_by_role("link", name="Audit").click()
    await expect(page.locator("#verification")).to_have_class("status ok")
    trail = page.locator("#trail tbody tr")
    everything = len(list(iter_records(lab.audit_path)))
    await expect(trail).to_have_count(everything)
    await page.fill("input[name=action]", RECORD_SIGNED)
    await page.get_by_role("button", name="Show").click()
    await expect(trail).to_have_count(1)
    await expect(trail.first).to_have_attribute("data-seq", str(signature.seq))
    await expect(trail.first).to_contain_text("Jane Doe")
    await expect(trail.first).to_contain_text("approved")
    await page.fill("input[name=action]", "")
    await page.fill("input[name=actor]", "jdoe")
    await page.get_by_role("button", name="Show").click()
    jdoe = [r for r in iter_records(lab.audit_path) if r.actor == "jdoe"]
    await expect(trail).to_have_count(len(jdoe))
    assert 1 < len(jdoe) < everything
    await page.fill("input[name=actor]", "")
    await page.fill("input[name=target]", "USER:OP")  # any case, part of the target
    await page.get_by_role("button", name="Show").click()
    await expect(trail).to_have_count(len([r for r in iter_records(lab.audit_path) if "user:op" in r.target]))

    # A POST without the session's CSRF token signs nothing.
    sent = await context.request.post(
        panel + "/review/sign",
        form={"record": lab.daily_ends[3]["msg_id"], "meaning": "approved", "username": "jdoe", "password": QC_PW},
    )
    assert sent.status == 403
    assert len(read_signatures(lab.audit_path, KEY).valid) == 1
    await context.close()


@pytest.mark.integration
@browser_test
async def test_an_operator_may_see_qc_but_not_review_sign_or_read_the_trail(
    panel: str, lab: Lab, browser: Browser
) -> None:
    context, page = await signed_in(browser, panel, "op", OPERATOR_PW)
    await page.goto(panel + "/qc")
    await expect(page.locator("#schedule tbody tr").first).to_be_visible()
    await expect(page.locator("#report")).to_contain_text("for the role qc_officer or higher")
    for path in ("/review", "/audit", "/qc/report?from=2026-01-01&to=2026-01-31"):
        response = await page.goto(panel + path)
        assert response is not None and response.status == 403
        await expect(page.locator("body")).to_contain_text("this needs the role qc_officer or higher; op is operator")
    await page.goto(panel + "/qc")
    csrf = await page.locator("input[name=csrf_token]").first.get_attribute("value")
    sent = await context.request.post(
        panel + "/review/sign",
        form={
            "csrf_token": csrf or "",
            "record": lab.daily_ends[3]["msg_id"],
            "meaning": "approved",
            "username": "op",
            "password": OPERATOR_PW,
        },
    )
    assert sent.status == 403
    assert read_signatures(lab.audit_path, KEY).valid == []
    await context.close()


@pytest.mark.integration
@browser_test
async def test_a_tampered_trail_shows_that_verification_failed(panel: str, lab: Lab, browser: Browser) -> None:
    context, page = await signed_in(browser, panel, "root", ADMIN_PW)
    await page.goto(panel + "/audit")
    await expect(page.locator("#verification")).to_have_class("status ok")
    lines = lab.audit_path.read_bytes().splitlines(keepends=True)
    body = json.loads(lines[1])
    body["reason"] = "an account nobody added"  # the record's content no longer matches its hash
    lines[1] = json.dumps(body, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    lab.audit_path.write_bytes(b"".join(lines))
    await page.reload()
    verdict = page.locator("#verification")
    await expect(verdict).to_have_class("status broken")
    await expect(verdict.locator("h2")).to_have_text("Audit trail verification FAILED")
    await expect(verdict).to_contain_text("line 2: the record's content does not match its hash")
    await context.close()


def test_audit_pages_follow_each_other_newest_first_without_gaps_or_repeats(tmp_path: Path) -> None:
    trail = AuditLog(tmp_path / "audit.jsonl", key=KEY)
    for n in range(2 * PAGE_SIZE + 7):
        trail.append(actor="alice" if n % 3 else "bob", action="qc.manual_entry", target=f"cal-{n}", reason="test")
    wanted = AuditFilter(actor="alice", action=None, target=None, period=TimeRange(0, 2**63 - 1))
    alice = [r.seq for r in iter_records(trail.path) if r.actor == "alice"]
    seen: list[int] = []
    page = audit_page(trail.path, wanted, before=None, after=None)
    assert page.newer_after is None
    while True:
        seen += [line.seq for line in page.lines]
        if page.older_before is None:
            break
        page = audit_page(trail.path, wanted, before=page.older_before, after=None)
    assert seen == sorted(alice, reverse=True)
    # Back from the oldest page: the page just newer starts right after it.
    oldest = audit_page(trail.path, wanted, before=alice[PAGE_SIZE // 2], after=None)
    assert oldest.newer_after is not None
    newer = audit_page(trail.path, wanted, before=None, after=oldest.newer_after)
    assert [line.seq for line in newer.lines] == sorted(a for a in alice if a > oldest.newer_after)[:PAGE_SIZE][::-1]


def test_result_pages_follow_each_other_even_when_many_results_share_one_time(lab: Lab) -> None:
    """More than a page of results at one instant (a batch judged together) must page without gaps or repeats."""
    same_ns = lab.now_ns - 3 * H
    extra = [
        judged(
            "accuracy",
            DEFAULT_LIMITS["accuracy"],
            measured=7.0e6 * (1 + n / 1000),
            expected=7.0e6,
            unit="Bq",
            time_ns=same_ns,
            inputs={"n": n},
        ).to_message(SITE, STATION, CALIBRATOR)
        for n in range(PAGE_SIZE + 20)
    ]
    with HistoryArchive(lab.archive_path) as archive:
        archive.add_many(extra)
        everything = [r["msg_id"] for r in archive.query("qc_result", site=SITE)]
    wanted = ResultFilter(None, None, None, Period(TimeRange(0, 2**63 - 1), "", ""))
    seen: list[str] = []
    after = None
    while True:
        page = read_qc_page(lab.config, lab.archive_path, wanted, after, lab.now_ns)
        seen += [line.msg_id for line in page.results]
        if page.next_cursor is None:
            break
        after = Cursor.from_text(page.next_cursor)
    assert seen == everything
