"""The elution station and dose calibrator pages in a real browser, acting on a real lab through the command path.

Debian's chromium (Playwright) on the panel, a real Mosquitto, the real controller service with the
Modbus elution-station simulator and a VIK-202 calibrator simulator whose chamber the test loads.
Every action goes through the page's confirmation and signature, the panel's signed command, the
controller's checks and audit trail, and back as a reply; the elution, its yield verdict and the
QC verdicts reach the page from the bus. Expected activities are computed here from the decay law
and the two-member Bateman solution with the half-lives written out, not taken from the code.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import secrets
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import uvicorn
from markupsafe import escape
from playwright.async_api import Browser, Page, async_playwright, expect

from hotlab.controller.audit import USER_AUTH_FAILED, AuditLog, iter_records, verify_chain
from hotlab.controller.command_signing import signature_matches
from hotlab.controller.config import DeviceConfig, MqttConfig, parse_config
from hotlab.controller.lab.demo import LabView
from hotlab.controller.messages import ClockStatus, device_status_message, elution_message
from hotlab.controller.qc.generator_rules import GeneratorSpec
from hotlab.controller.qc.schedule import ItemStatus
from hotlab.controller.qc.schedule_stage import qc_status_message
from hotlab.controller.qc.stage import qc_stage_for
from hotlab.controller.service import ControllerService
from hotlab.controller.users import Credentials, UserStore
from hotlab.controller.web.app import create_app
from hotlab.controller.web.commands import CommandSender
from hotlab.controller.web.live import LiveFeed
from hotlab.controller.web.overview import lab_overview
from hotlab.controller.web.panel import Panel
from hotlab.controller.web.station import ingrowth_curve, station_live
from hotlab.drivers.records import ElutionRecord
from hotlab.drivers.station_registers import FaultCode
from hotlab.physics.nuclides import get_nuclide
from hotlab.simulators.calibrator_vik202 import Vik202Simulator
from hotlab.simulators.elution_station import ElutionStationSimulator, StationClock, StationModel
from hotlab.simulators.generator_physics import GeneratorColumn, get_profile
from hotlab.simulators.serial_host import TcpHost
from hotlab.simulators.source import IonChamber, SimClock, Source
from tests.mosquitto_service import MosquittoBroker, MqttCollector, free_tcp_port, mosquitto  # noqa: F401

CHROMIUM = "/usr/bin/chromium"
SITE = "weblab"
AUDIT_KEY = "hotlab web station test audit key, 32+ bytes"
PASSWORDS = {"root": "root passphrase one", "alice": "alice passphrase one", "bob": "bob passphrase one two"}
GENERATOR = "GE68-WEB-1"
CHECK_BQ = 7.4e6
DAY_S = 86400.0
#: Half-lives written out with their source (DDEP recommended data, LNHB).
GE68_HALF_LIFE_S = 270.95 * DAY_S  # DDEP: 270.95 (26) d
GA68_HALF_LIFE_S = 67.83 * 60.0  # DDEP (Kuzmenko 2019): 67.83 (20) min
#: What the page should show within; the panel pushes within a second, a measurement settles in about 2 s.
SHOWN_WITHIN_MS = 15_000
needs_chromium = pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="Debian's chromium is not installed")


@dataclass
class Lab:
    url: str
    audit_path: Path
    chamber: IonChamber
    station: StationModel
    sender: CommandSender
    bus: MqttCollector
    devices: dict[str, DeviceConfig]


@pytest.fixture
async def lab(tmp_path: Path, mosquitto: MosquittoBroker, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Lab]:
    """The controller with a station and a calibrator, the panel signing as sender "panel", and three accounts."""
    monkeypatch.setenv("HOTLAB_AUDIT_KEY", AUDIT_KEY)
    monkeypatch.delenv("HOTLAB_AUDIT_KEY_FILE", raising=False)
    now = time.time_ns()
    cal_ns, last_ns = now - int(30 * DAY_S * 1e9), now - int(DAY_S * 1e9)
    # The real station simulator on the wall clock, with a short priming and a fast pump, so an elution
    # takes seconds rather than the half minute of the "ge68" profile.
    profile = dataclasses.replace(get_profile("ge68"), priming_s=1.0, flow_ml_per_s=1.0)
    column = GeneratorColumn(
        profile, generator_id=GENERATOR, parent_cal_bq=1.85e9, cal_time_ns=cal_ns, last_elution_ns=last_ns
    )
    station = StationModel(column, StationClock(acceleration=1.0))
    station_sim = ElutionStationSimulator(station)
    _, station_port = await station_sim.start_tcp("127.0.0.1", 0)
    chamber = IonChamber(None, clock=SimClock(), selected_nuclide="Cs-137", seed=11)
    calibrator_host = TcpHost(Vik202Simulator(chamber))
    calibrator_url = await calibrator_host.start()
    key_file = tmp_path / "panel.key"
    key_file.write_text(secrets.token_hex(32))
    config = parse_config(
        {
            "site": {"name": SITE},
            "device": [
                {
                    "name": "gen-1",
                    "station": "elution-1",
                    "family": "elution_station",
                    "poll_interval_s": 0.1,
                    "transport": {"modbus": "tcp", "host": "127.0.0.1", "port": station_port},
                },
                {
                    "name": "cal-1",
                    "station": "qc-lab",
                    "family": "vik202",
                    "transport": calibrator_url,
                    "poll_interval_s": 0.05,
                    "timeout_s": 1.0,
                    "measurement": {"settle_readings": 5, "dwell_s": 1.0},
                },
            ],
            "outbox": {"path": "outbox.sqlite3"},
            "history": {"path": "history.sqlite3"},
            "service": {"state_dir": "state", "drain_timeout_s": 5.0, "backoff_initial_s": 0.1, "backoff_max_s": 1.0},
            "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "client_id": f"ctl-{uuid.uuid4().hex[:8]}"},
            "command_sender": [{"name": "panel", "key_file": str(key_file)}],
            "web": {"sender": "panel"},
            # Starting an elution is a QC officer's: an operator is refused by the page (and the controller).
            "commands": {"min_role": {"start_elution": "qc_officer"}},
            "qc": {
                "sources": {
                    "CS-CHECK": {"nuclide": "Cs-137", "activity": CHECK_BQ, "reference_time": "2020-01-01T00:00:00Z"}
                },
                "devices": {"cal-1": {"check_source": "CS-CHECK", "settings": ["Tc-99m"]}},
                "generators": {
                    GENERATOR: {
                        "parent": "Ge-68",
                        "activity": 1.85e9,
                        "calibration_time": _iso(cal_ns),
                        "last_elution": _iso(last_ns),
                    }
                },
            },
        },
        base_dir=tmp_path,
    )
    audit_path = config.commands.resolved_audit_path(config.service.state_dir)
    store = UserStore(config.users.resolved_path(audit_path), AuditLog(audit_path, key=AUDIT_KEY.encode()))
    store.add_user("root", "Ada Admin", "admin", PASSWORDS["root"], admin=None)
    root = Credentials("root", PASSWORDS["root"])
    store.add_user("alice", "Alice Quinn", "qc_officer", PASSWORDS["alice"], admin=root)
    store.add_user("bob", "Bob Operator", "operator", PASSWORDS["bob"], admin=root)

    service = ControllerService(config, stage=qc_stage_for(config))
    service.qc_tick_s = 0.5
    stop = asyncio.Event()
    controller = asyncio.create_task(service.run(stop))
    sender = CommandSender.for_lab(config)
    assert sender is not None
    panel = Panel(config, LiveFeed(config.site, config.mqtt), store, commands=sender)
    port = free_tcp_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(panel), host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    serving = asyncio.create_task(server.serve())
    try:
        async with MqttCollector(mosquitto.host, mosquitto.port, f"hotlab/{SITE}/#", client_id="web-collector") as bus:
            deadline = time.monotonic() + 30
            while not (server.started and panel.feed.view.connected and sender.connected and _up(service)):
                assert time.monotonic() < deadline, "the lab and the panel did not start within 30 s"
                await asyncio.sleep(0.05)
            devices = {device.name: device for device in config.devices}
            yield Lab(f"http://127.0.0.1:{port}", audit_path, chamber, station, sender, bus, devices)
    finally:
        server.should_exit = True
        await serving
        stop.set()
        await asyncio.wait_for(controller, 30)
        await station_sim.stop()
        await calibrator_host.stop()
        store.close()


def _up(service: ControllerService) -> bool:
    return len(service.supervisors) == 2 and all(s.up for s in service.supervisors.values())


def _iso(time_ns: int) -> str:
    return datetime.fromtimestamp(time_ns / 1e9, tz=UTC).isoformat()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()


async def signed_in_page(browser: Browser, lab: Lab, username: str) -> Page:
    page = await (await browser.new_context()).new_page()
    await page.goto(lab.url + "/login")
    await page.fill("#username", username)
    await page.fill("#password", PASSWORDS[username])
    await page.click("button[type=submit]")
    await expect(page).to_have_url(lab.url + "/")
    return page


async def sign(page: Page, password: str) -> None:
    """The confirmation screen: the password again, then the signing button."""
    confirm = page.locator("form.confirm")
    await confirm.get_by_label("Password").fill(password)
    await confirm.get_by_role("button", name="Sign:").click()


def audited(lab: Lab) -> list[tuple[str, str, str]]:
    return [(r.actor, r.action, r.reason) for r in iter_records(lab.audit_path)]


@pytest.mark.integration
@needs_chromium
async def test_an_elution_started_and_aborted_from_the_station_page(lab: Lab, browser: Browser) -> None:
    page = await signed_in_page(browser, lab, "alice")
    # The overview names the station and links to its page.
    await expect(page.locator("[data-device='gen-1'] a.device-link")).to_have_attribute("href", "/station/gen-1")
    await page.goto(lab.url + "/station/gen-1")
    await expect(page.locator(".status-line .state")).to_have_text("online", timeout=SHOWN_WITHIN_MS)

    start = page.locator("form[action='/station/gen-1/start_elution']")
    await start.get_by_label("Volume (mL)").fill("2")
    await start.get_by_label("Reason").fill("Ga-68 for PSMA batch 12")
    await start.get_by_role("button", name="Start elution…").click()
    confirm = page.locator("form.confirm")
    await expect(confirm).to_contain_text("start an elution of 2 mL")
    # The state is shown above the signing button, not after it.
    status_box, confirm_box = await page.locator(".device-status").bounding_box(), await confirm.bounding_box()
    assert status_box is not None and confirm_box is not None and status_box["y"] < confirm_box["y"]

    # A wrong password: refused on the page, audited as a failed password check for this action, nothing sent.
    await sign(page, "not alice's password")
    await expect(page.get_by_role("alert")).to_contain_text("Signature refused")
    assert any(
        actor == "alice" and action == USER_AUTH_FAILED and "web command start_elution on gen-1" in reason
        for actor, action, reason in audited(lab)
    )
    assert station_state(lab) == "idle"

    await sign(page, PASSWORDS["alice"])
    await expect(page.get_by_role("status")).to_contain_text("start_elution: executed")
    await expect(page.get_by_role("status")).to_contain_text("idle → priming")
    # The finished elution and its yield verdict arrive from the bus, without a reload.
    await page.evaluate("window.notReloaded = true")
    row = page.locator("table.elutions tbody tr").first
    await expect(row).to_contain_text("2 mL", timeout=SHOWN_WITHIN_MS)
    await expect(row.locator(".verdict")).to_have_text("PASS", timeout=SHOWN_WITHIN_MS)
    assert await page.evaluate("window.notReloaded === true")
    # The generator, and its parent now: 1.85 GBq of Ge-68 calibrated 30 days ago, decayed with 270.95 d.
    await expect(page.locator(".generator")).to_contain_text(f"{GENERATOR} · Ge-68 → Ga-68")
    parent_gbq = 1.85 * 2 ** (-30 * DAY_S / GE68_HALF_LIFE_S)
    await expect(page.locator(".parent-now")).to_have_text(f"{parent_gbq:.4g} GBq")
    await expect(page.locator(".ingrowth polyline.curve")).to_have_count(1)
    elution = lab.bus.payloads("/elution", kind="elution")[-1]
    assert elution["volume_ml"] == 2.0 and elution["generator"] == GENERATOR
    trail = [r for r in iter_records(lab.audit_path) if r.action == "elution.start"]
    assert trail[-1].actor == "alice" and trail[-1].new_value["outcome"] == "executed"

    # Abort: a long elution started, then stopped from the page while it runs.
    await start.get_by_label("Volume (mL)").fill("10")
    await start.get_by_label("Reason").fill("second vial")
    await start.get_by_role("button", name="Start elution…").click()
    await sign(page, PASSWORDS["alice"])
    await expect(page.get_by_role("status")).to_contain_text("start_elution: executed")
    await expect(page.locator(".notices")).to_contain_text("An elution is in progress")
    abort = page.locator("form[action='/station/gen-1/abort']")
    await abort.get_by_label("Reason").fill("wrong vial in the shield")
    await abort.get_by_role("button", name="Abort elution…").click()
    await expect(page.locator("form.confirm")).to_contain_text("abort the elution in progress")
    await sign(page, PASSWORDS["alice"])
    await expect(page.get_by_role("status")).to_contain_text("abort: executed")
    assert station_state(lab) in ("idle", "done")
    aborts = [r for r in iter_records(lab.audit_path) if r.action == "elution.abort"]
    assert aborts[-1].actor == "alice" and aborts[-1].reason == "wrong vial in the shield"

    # A fault the station raises on its own: the controller publishes the station's state, so the page shows
    # the fault and offers to acknowledge it before anyone presses start.
    acknowledge = page.locator("form[action='/station/gen-1/acknowledge_fault']")
    await expect(acknowledge).to_be_hidden()
    lab.station.raise_fault(FaultCode.OVERPRESSURE)  # the station's own fault: nobody pressed anything
    await expect(page.locator(".station-state")).to_have_text("fault")
    await expect(page.locator(".notices")).to_contain_text("The station is in fault")
    await expect(acknowledge).to_be_visible()
    await acknowledge.get_by_label("Reason").fill("pressure line checked")
    await acknowledge.get_by_role("button", name="Acknowledge fault…").click()
    await sign(page, PASSWORDS["alice"])
    await expect(page.get_by_role("status")).to_contain_text("acknowledge_fault: executed")
    await expect(page.locator(".station-state")).to_have_text("idle")
    await expect(acknowledge).to_be_hidden()
    assert station_state(lab) == "idle"
    assert verify_chain(lab.audit_path, AUDIT_KEY.encode()).ok


def station_state(lab: Lab) -> str:
    return lab.station.state.name.lower()


@pytest.mark.integration
@needs_chromium
async def test_the_station_page_refuses_a_role_too_low_and_a_post_without_csrf(lab: Lab, browser: Browser) -> None:
    page = await signed_in_page(browser, lab, "bob")
    await page.goto(lab.url + "/station/gen-1")
    # Not offered: bob is an operator, and [commands.min_role] start_elution is qc_officer.
    await expect(page.locator("form[action='/station/gen-1/start_elution']")).to_have_count(0)
    await expect(page.locator(".refusal")).to_contain_text("needs the role qc_officer")
    # Sent anyway, with the session's CSRF token: refused with the reason, and nothing reaches the station.
    csrf = await page.locator("form[action='/station/gen-1/abort'] input[name=csrf_token]").input_value()
    form = {"csrf_token": csrf, "volume_ml": "2", "reason": "forged", "confirmed": "yes"}
    form |= {"username": "bob", "password": PASSWORDS["bob"]}
    refused = await page.context.request.post(lab.url + "/station/gen-1/start_elution", form=form)
    assert refused.status == 403
    assert "needs the role qc_officer" in await refused.text()
    # Without the CSRF token, the same POST never reaches the page.
    del form["csrf_token"]
    forged = await page.context.request.post(lab.url + "/station/gen-1/start_elution", form=form)
    assert forged.status == 403 and "CSRF" in await forged.text()
    await asyncio.sleep(0.5)
    assert station_state(lab) == "idle"
    assert not [r for r in iter_records(lab.audit_path) if r.action == "elution.start"]
    assert any(
        actor == "bob" and action == USER_AUTH_FAILED and "needs the role qc_officer" in reason
        for actor, action, reason in audited(lab)
    )


@pytest.mark.integration
@needs_chromium
async def test_the_calibrator_page_reading_setting_and_daily_check_step_by_step(lab: Lab, browser: Browser) -> None:
    await take_baselines(lab)  # they leave the calibrator on Tc-99m, the chamber empty
    page = await signed_in_page(browser, lab, "bob")
    await expect(page.locator("[data-device='cal-1'] a.device-link")).to_have_attribute("href", "/calibrator/cal-1")
    await page.goto(lab.url + "/calibrator/cal-1")
    reading = page.locator(".live-reading")
    await expect(reading.locator(".nuclide")).to_have_text("Tc-99m", timeout=SHOWN_WITHIN_MS)

    # The live reading: a 550 MBq Tc-99m dose goes in on the Tc-99m setting and shows without a reload.
    await page.evaluate("window.notReloaded = true")
    lab.chamber.initial_source = Source(get_nuclide("Tc-99m"), 550e6, time.time_ns())
    await expect(reading.locator(".activity")).to_contain_text("MBq", timeout=SHOWN_WITHIN_MS)
    shown_mbq = float((await reading.locator(".activity").inner_text()).split()[0])
    assert abs(shown_mbq - 550.0) / 550.0 < 0.01  # 550 MBq; the chamber's noise is 0.2 %, decay 10 s is 0.03 %
    assert await page.evaluate("window.notReloaded === true")
    # Settled, the dose is a measurement; labelled (here by the sender, as a dose record would be), the
    # label shows beside it.
    await lab.bus.wait_for(lambda: dose(lab) is not None, 30, "the dose's measurement")
    lab.chamber.initial_source = None
    measurement = dose(lab)
    assert measurement is not None
    labelled = await lab.sender.send(
        lab.devices["cal-1"],
        "label_measurement",
        {"measurement_id": measurement["msg_id"], "label": "patient dose 2026-0412"},
        user="bob",
        reason="dose record",
    )
    assert labelled.ok, labelled
    row = page.locator("table.measurements tbody tr").first
    await expect(row).to_contain_text("patient dose 2026-0412", timeout=SHOWN_WITHIN_MS)
    assert abs(float((await row.locator("td").nth(2).inner_text()).split()[0]) - 550.0) / 550.0 < 0.01
    await change_setting(page, "Cs-137")

    # The daily check, step by step: background, then the check source on Cs-137, then on Tc-99m.
    start = page.locator("form[action='/calibrator/cal-1/start_qc']")
    await start.get_by_role("button", name="Start the daily check…").click()
    await expect(page.locator("form.confirm")).to_contain_text("start the daily constancy check of cal-1")
    await sign(page, PASSWORDS["bob"])
    await expect(page.get_by_role("status")).to_contain_text("start_qc: executed")
    steps = page.locator("ol.steps li")
    await expect(steps).to_have_count(3, timeout=SHOWN_WITHIN_MS)
    await expect(steps.nth(0)).to_have_class("step next")
    await expect(page.locator("form[action='/calibrator/cal-1/end_qc']")).to_be_visible()
    lab.chamber.initial_source = Source(get_nuclide("Cs-137"), CHECK_BQ, time.time_ns())
    await expect(page.locator("li[data-step='background'] .step-state")).to_have_text("pass", timeout=SHOWN_WITHIN_MS)
    await expect(page.locator("li[data-step='Cs-137'] .step-state")).to_have_text("pass", timeout=SHOWN_WITHIN_MS)
    await expect(page.locator("li[data-step='Tc-99m']")).to_have_class("step next")
    await change_setting(page, "Tc-99m")
    await expect(page.locator("li[data-step='Tc-99m'] .step-state")).to_have_text("pass", timeout=SHOWN_WITHIN_MS)
    await expect(page.locator(".procedure-status")).to_have_text("complete", timeout=SHOWN_WITHIN_MS)
    # Earlier steps keep their verdicts once later ones come (the live view holds one per test).
    await expect(page.locator("li[data-step='Cs-137'] .step-state")).to_have_text("pass")
    await expect(page.locator("form[action='/calibrator/cal-1/start_qc']")).to_be_visible()
    starts = [r for r in iter_records(lab.audit_path) if r.action == "qc.start"]
    assert starts[-1].actor == "bob" and starts[-1].new_value["outcome"] == "executed"


async def change_setting(page: Page, nuclide: str) -> None:
    form = page.locator("form[action='/calibrator/cal-1/select_nuclide']")
    await form.get_by_label("Setting").select_option(nuclide)
    await form.get_by_label("Reason").fill(f"{nuclide} next")
    await form.get_by_role("button", name="Change setting…").click()
    await expect(page.locator("form.confirm")).to_contain_text(f"set cal-1 to {nuclide}")
    await sign(page, PASSWORDS["bob"])
    await expect(page.get_by_role("status")).to_contain_text("select_nuclide: executed")


async def take_baselines(lab: Lab) -> None:
    """The QC officer's baselines of the check source on Cs-137 and Tc-99m: setup, sent with the panel's sender."""
    calibrator = lab.devices["cal-1"]
    started = await lab.sender.send(
        calibrator, "start_qc", {"procedure": "baseline", "source": "CS-CHECK"}, user="alice", reason="acceptance"
    )
    assert started.ok, started
    lab.chamber.initial_source = Source(get_nuclide("Cs-137"), CHECK_BQ, time.time_ns())
    await lab.bus.wait_for(lambda: measured(lab, "Cs-137"), 30, "the baseline's Cs-137 measurement")
    switched = await lab.sender.send(
        calibrator, "select_nuclide", {"nuclide": "Tc-99m"}, user="alice", reason="baseline"
    )
    assert switched.ok, switched
    await lab.bus.wait_for(lambda: measured(lab, "Tc-99m"), 30, "the baseline's Tc-99m measurement")
    await lab.bus.wait_for(
        lambda: any(p["status"] == "complete" for p in lab.bus.payloads("/qc/procedure")), 30, "the baseline's end"
    )
    lab.chamber.initial_source = None


def dose(lab: Lab) -> dict[str, Any] | None:
    """The measurement of the 550 MBq Tc-99m dose (the check source reads 7.4 MBq, far below)."""
    return next((m for m in lab.bus.payloads("/measurement", kind="measurement") if m["activity_bq"] > 100e6), None)


def measured(lab: Lab, setting: str) -> bool:
    return any(m["nuclide"] == setting for m in lab.bus.payloads("/measurement", kind="measurement"))


def test_the_ingrowth_curve_is_the_two_member_bateman_solution() -> None:
    """A_d(t) = A_p λd/(λd − λp) (e^(−λp t) − e^(−λd t)) + R e^(−λd t), the parent decayed from its certificate."""
    cal_ns = 1_700_000_000 * 10**9
    last_ns = cal_ns + int(30 * DAY_S * 1e9)
    now_ns = last_ns + 2 * 3600 * 10**9
    residual_bq = 0.2e9
    spec = GeneratorSpec(GENERATOR, get_nuclide("Ge-68"), get_nuclide("Ga-68"), 1.85e9, cal_ns)
    curve = ingrowth_curve(spec, last_ns, residual_bq, now_ns)
    lam_p, lam_d = math.log(2) / GE68_HALF_LIFE_S, math.log(2) / GA68_HALF_LIFE_S
    parent_at_elution = 1.85e9 * math.exp(-lam_p * 30 * DAY_S)  # branching Ge-68 -> Ga-68: 1 (EC, DDEP)

    def bateman(t_s: float) -> float:
        ingrowth = parent_at_elution * lam_d / (lam_d - lam_p) * (math.exp(-lam_p * t_s) - math.exp(-lam_d * t_s))
        return ingrowth + residual_bq * math.exp(-lam_d * t_s)

    assert curve.now_s == 7200.0
    assert curve.now_bq == pytest.approx(bateman(7200.0), rel=1e-9)
    assert curve.samples[0] == (0.0, pytest.approx(residual_bq, rel=1e-12))
    for t_s, bq in curve.samples[::17]:
        assert bq == pytest.approx(bateman(t_s), rel=1e-9)
    # At least six Ga-68 half-lives are drawn (2^-6: 98 % of the way to equilibrium), "now" on the curve.
    assert curve.samples[-1][0] == pytest.approx(6 * GA68_HALF_LIFE_S)
    assert curve.left <= curve.now_x <= curve.right


@pytest.mark.integration
async def test_the_sender_signs_for_the_topic_and_says_when_nothing_or_nobody_answers(
    mosquitto: MosquittoBroker,
) -> None:
    """A command the broker never took, or that no controller answers, is an answer the page shows, not an error."""
    key = secrets.token_bytes(32)
    mqtt = MqttConfig(host=mosquitto.host, port=mosquitto.port)
    sender = CommandSender(SITE, mqtt, "panel", key, reply_timeout_s=0.5)
    transport = {"modbus": "tcp", "host": "127.0.0.1", "port": 502}
    device = {"name": "gen-1", "station": "elution-1", "family": "elution_station", "transport": transport}
    station = parse_config({"site": {"name": SITE}, "device": [device]}).devices[0]
    args = {"volume_ml": 2.0}
    unsent = await sender.send(station, "start_elution", args, user="alice", reason="before the broker")
    assert (unsent.outcome, unsent.ok) == ("not_sent", False) and "not connected to the broker" in unsent.message

    topic = f"hotlab/{SITE}/elution-1/gen-1/cmd/start_elution"
    commands = f"hotlab/{SITE}/+/+/cmd/+"
    async with MqttCollector(mosquitto.host, mosquitto.port, commands, client_id="a-controller") as controller:
        connected = asyncio.Event()
        running = asyncio.create_task(sender.run(subscribed=connected))
        try:
            await asyncio.wait_for(connected.wait(), 10)
            silent = await sender.send(station, "start_elution", args, user="alice", reason="nobody listens")
            assert silent.outcome == "no_reply" and silent.message.startswith(
                "no reply within 0.5 s: check the controller"
            )
            # On the wire: the sender's name, the command as text, and an HMAC over this topic and that text.
            envelope = controller.payloads(topic)[-1]
            assert (envelope["schema"], envelope["sender"]) == ("hotlab.signed_command/1", "panel")
            assert signature_matches(key, topic, envelope["command"], envelope["signature"])
            assert not signature_matches(
                key, topic.replace("gen-1", "gen-2"), envelope["command"], envelope["signature"]
            )
            command = json.loads(envelope["command"])
            assert command["user"] == "alice" and command["args"] == args and command["request_id"] == silent.request_id
            # The controller's reply to a command is the answer to the send that waits for it.
            sender.reply_timeout_s = 10.0
            waiting = asyncio.create_task(sender.send(station, "abort", {}, user="alice", reason="answered"))
            await controller.wait_for(lambda: len(controller.payloads("/abort")) == 1, 10, "the abort command")
            request_id = json.loads(controller.payloads("/abort")[-1]["command"])["request_id"]
            reply = {"schema": "hotlab.command_reply/1", "request_id": request_id, "device": "gen-1", "action": "abort",
                     "ok": False, "outcome": "refused", "error": "station is idle; allowed only when priming or eluting",
                     "old_value": {"state": "idle"}, "new_value": {"state": "idle"}, "duplicate": False}  # fmt: skip
            async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
                await client.publish(f"{topic.replace('start_elution', 'abort')}/reply", json.dumps(reply), qos=1)
            answered = await asyncio.wait_for(waiting, 5)
            assert (answered.outcome, answered.message) == ("refused", reply["error"])
            assert sender.answer(request_id) == answered and sender.latest["gen-1"] == reply
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)


def test_the_overview_links_a_calibrator_and_a_station_to_their_pages_and_a_generator_to_none() -> None:
    """docs/mqtt.md: only a dose calibrator's status counts suspect readings; a generator is named only by QC items."""
    view = LabView(site=SITE, broker="-", acceleration=1.0)
    now = time.time_ns()
    calibrator = device_status_message(SITE, "qc-lab", "cal-1", up=True, latency_ms=1.0, errors=0, suspect_readings=0)
    station = device_status_message(SITE, "elution-1", "gen-1", up=True, latency_ms=1.0, errors=0)
    follow_up = ItemStatus(
        device=GENERATOR,
        station="elution-1",
        item="ge68_breakthrough/" + "a" * 32,
        test="ge68_breakthrough",
        state="due",
        due_ns=now,
        overdue_ns=now,
        last_done_ns=None,
        last_verdict=None,
        last_record_id=None,
        elution_id="a" * 32,
        detail="due",
    )
    for message in (calibrator, station, qc_status_message(SITE, follow_up, now)):
        view.apply(message.topic, json.dumps(message.payload))
    pages = {device.name: device.page for device in lab_overview(view).devices}
    assert pages == {"cal-1": "/calibrator/cal-1", "gen-1": "/station/gen-1", GENERATOR: None}


def test_a_baseline_step_is_recorded_not_left_awaiting_a_verdict_it_never_gets() -> None:
    """A baseline gives its settings no verdict: its measured step stayed 'awaiting verdict' for good."""
    from hotlab.controller.web.calibrator import _check_steps

    measured = [{"nuclide": "Cs-137", "activity_bq": 7.4e6}]
    background = [{"test": "background", "verdict": "pass", "value_judged": 120.0}]
    steps = _check_steps(["Cs-137"], "cs137-check", background, measured, False, judged=False)
    assert [(s.label, s.state) for s in steps] == [("background", "pass"), ("Cs-137", "recorded")]
    daily = _check_steps(["Cs-137"], "cs137-check", background, measured, True, judged=True)
    assert daily[-1].state == "measured" and "awaiting verdict" in daily[-1].text


async def test_the_station_page_shows_the_clock_offset_and_computes_ingrowth_on_one_clock(tmp_path: Path) -> None:
    """A station 90 s ahead: the page says so, warns above the limit, and its "now" ingrowth uses the real elapsed
    time. The elution ended 2 h ago on the controller's clock; its end, as the station stamped it, is 90 s later,
    so taking the stamp as it is would show 90 s less ingrowth (about 0.6 % of Ga-68 at 2 h)."""
    config = parse_config(
        {
            "site": {"name": SITE},
            "device": [
                {
                    "name": "gen-1",
                    "station": "elution-1",
                    "family": "elution_station",
                    "transport": {"modbus": "tcp", "host": "127.0.0.1", "port": 1502},
                }
            ],
            "history": {"enabled": False},
            "service": {"state_dir": "state"},
            "mqtt": {"host": "127.0.0.1", "port": 1883},  # never connected: the view is fed by hand
        },
        base_dir=tmp_path,
    )
    store = UserStore(tmp_path / "users.sqlite3", AuditLog(tmp_path / "audit.jsonl", key=b"k" * 32))
    try:
        panel = Panel(config, LiveFeed(SITE, config.mqtt), store)
        panel.feed.view.connected = True
        now = time.time_ns()
        cal_ns = now - int(30 * DAY_S * 1e9)
        ended_ns = now - 2 * 3600 * 10**9  # on the controller's clock
        stamped_ns = ended_ns + 90 * 10**9  # as the station, 90 s ahead, stamped it
        record = ElutionRecord(
            "elution-1", GENERATOR, "Ge-68", "Ga-68", 3, 1.0e9, 5.0, stamped_ns - 20 * 10**9, stamped_ns
        )
        elution = elution_message(SITE, record)
        status = device_status_message(
            SITE, "elution-1", "gen-1", up=True, latency_ms=2.0, errors=0, station_state="idle",
            clock=ClockStatus(90.0, 0.002, 10.0, True),
        )  # fmt: skip
        for message in (elution, status):
            panel.feed.apply(message.topic, json.dumps(message.payload))
        spec = GeneratorSpec(GENERATOR, get_nuclide("Ge-68"), get_nuclide("Ga-68"), 1.85e9, cal_ns)
        live = await station_live(panel, {GENERATOR: spec}, config.devices[0], now)

        lam_p, lam_d = math.log(2) / GE68_HALF_LIFE_S, math.log(2) / GA68_HALF_LIFE_S
        parent_at_elution = 1.85e9 * math.exp(-lam_p * (ended_ns - cal_ns) / 1e9)
        t_s = 7200.0  # elapsed on one clock; the residual is 0 (no yield verdict known: the page says so)
        expected = parent_at_elution * lam_d / (lam_d - lam_p) * (math.exp(-lam_p * t_s) - math.exp(-lam_d * t_s))
        assert live.generator is not None and live.generator.curve is not None
        assert live.generator.curve.now_s == t_s
        assert live.generator.curve.now_bq == pytest.approx(expected, rel=1e-9)

        assert live.clock.state == "alarm"
        assert live.clock.text == "Station clock 90.000 s ahead of the controller's (± 0.002 s; limit 10 s)"
        hms = "%H:%M:%S UTC"
        assert live.clock.now_text == (
            f"now {_utc(now, hms)} on the controller's clock, {_utc(now + 90 * 10**9, hms)} on the station's"
        )
        assert live.generator.last_elution == (
            f"{_utc(stamped_ns, '%Y-%m-%d %H:%M:%S UTC')} (station clock), "
            f"{_utc(ended_ns, '%Y-%m-%d %H:%M:%S UTC')} on the controller's clock"
        )
        warning = [n for n in live.notices if "clock" in n.text]
        assert [n.severity for n in warning] == ["warn"] and "90.000 s ahead of the controller's" in warning[0].text
        shown = panel.templates.get_template("_station_status.html").render(live=live)
        assert 'class="clock alarm"' in shown and escape(live.clock.text) in shown and escape(warning[0].text) in shown
        details = panel.templates.get_template("_station_details.html").render(live=live)
        assert escape(live.clock.now_text) in details and "end (station clock)" in details
        assert "(certificate)" in details and "the station's end moved to the controller's clock" in details

        # Within the limit: no warning; with no offset published, the page says it takes the stamps as they are.
        def publish_status(clock: ClockStatus | None) -> None:
            message = device_status_message(
                SITE, "elution-1", "gen-1", up=True, latency_ms=2.0, errors=0, station_state="idle", clock=clock
            )
            panel.feed.apply(message.topic, json.dumps(message.payload))

        publish_status(ClockStatus(0.4, 0.002, 10.0, False))
        calm = await station_live(panel, {GENERATOR: spec}, config.devices[0], now)
        assert calm.clock.state == "ok" and not [n for n in calm.notices if "clock" in n.text]
        publish_status(None)
        unknown = await station_live(panel, {GENERATOR: spec}, config.devices[0], now)
        assert unknown.clock.state == "unknown" and "taken as they are" in unknown.clock.text
        assert unknown.generator is not None and unknown.generator.curve is not None
        assert unknown.generator.curve.now_s == t_s - 90.0
    finally:
        store.close()


def _utc(time_ns: int, pattern: str) -> str:
    return datetime.fromtimestamp(time_ns / 1e9, tz=UTC).strftime(pattern)
