"""The web panel in a real browser (Debian's chromium driven by Playwright) against a real Mosquitto.

The panel runs in the test's event loop on a free loopback port, with a user store whose audit
trail is HMAC-keyed; the lab's messages are built with the controller's own builders and
published to the broker, as the controller would. Expected activities are written out in the
unit a person reads (370 MBq is 370 × 10^6 Bq), not taken from the formatter.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import uvicorn
from playwright.async_api import Page, async_playwright, expect

from hotlab.controller.audit import USER_AUTH_FAILED, USER_LOGIN, USER_LOGOUT, AuditLog, iter_records, verify_chain
from hotlab.controller.config import MqttConfig, parse_config
from hotlab.controller.messages import Message, device_status_message, reading_message
from hotlab.controller.qc.schedule import ItemStatus
from hotlab.controller.qc.schedule_stage import qc_status_message
from hotlab.controller.users import Credentials, UserStore
from hotlab.controller.web.app import create_app
from hotlab.controller.web.auth import COOKIE_NAME, Sessions
from hotlab.controller.web.live import LiveFeed
from hotlab.controller.web.panel import Panel
from hotlab.drivers.records import Reading
from tests.mosquitto_service import (  # noqa: F401
    AclMosquittoBroker,
    MosquittoBroker,
    free_tcp_port,
    mosquitto,
    require_mosquitto,
)
from tests.web_latency_probe import panel_process, wait_for_http

CHROMIUM = "/usr/bin/chromium"
ACL = Path(__file__).resolve().parent.parent / "examples" / "mosquitto.acl"
KEY = b"hotlab web panel test key, 32 bytes or more"
SITE, STATION, DEVICE = "lab-a", "hotcell-1", "cal-1"
ADMIN_PW = "admin passphrase one"
QC_PW = "qc officer passphrase"
#: Playwright waits this long for what the page should show; the panel pushes within a second.
SHOWN_WITHIN_MS = 3000


@pytest.fixture
def store(tmp_path: Path) -> Iterator[UserStore]:
    with UserStore(tmp_path / "users.sqlite3", AuditLog(tmp_path / "audit.jsonl", key=KEY)) as users:
        users.add_user("root", "Ada Admin", "admin", ADMIN_PW, admin=None)
        users.add_user("jdoe", "Jane Doe", "qc_officer", QC_PW, admin=Credentials("root", ADMIN_PW))
        yield users


@pytest.fixture
async def panel(mosquitto: MosquittoBroker, store: UserStore) -> AsyncIterator[str]:
    """The panel's base URL, once it is subscribed to the broker."""
    feed = LiveFeed(SITE, MqttConfig(host=mosquitto.host, port=mosquitto.port))
    config = parse_config(
        {
            "site": {"name": SITE},
            "device": [{"name": DEVICE, "station": STATION, "family": "vik202", "transport": "/dev/null"}],
        }
    )
    port = free_tcp_port()
    app = create_app(Panel(config, feed, store))
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


async def publish(broker: MosquittoBroker, *messages: Message, retain: bool = False) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        for message in messages:
            await client.publish(message.topic, json.dumps(message.payload), qos=1, retain=retain)


def reading(activity_bq: float) -> Reading:
    return Reading(DEVICE, "Tc-99m", activity_bq, activity_bq / 1e6, "MBq", time.time_ns(), b"frame")


def audited(store: UserStore) -> list[tuple[str, str, str]]:
    return [(r.actor, r.action, r.target) for r in iter_records(store.audit.path)]


def post_status(url: str, cookie: str, body: bytes) -> int:
    """The status of a form POST sent with the session cookie but without the page's CSRF token."""
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Cookie": f"{COOKIE_NAME}={cookie}", "Content-Type": "application/x-www-form-urlencoded"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as refused:
        return refused.code


async def sign_in(page: Page, username: str, password: str) -> None:
    await page.fill("#username", username)
    await page.fill("#password", password)
    await page.click("button[type=submit]")


@pytest.mark.integration
@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="Debian's chromium is not installed")
async def test_login_live_overview_csrf_and_logout_in_a_browser(
    panel: str,
    mosquitto: MosquittoBroker,
    store: UserStore,
) -> None:
    now = time.time_ns()
    await publish(
        mosquitto,
        device_status_message(SITE, STATION, DEVICE, up=True, latency_ms=12.0, errors=0),
        reading_message(SITE, STATION, reading(370e6)),
    )
    daily = ItemStatus(
        device=DEVICE,
        station=STATION,
        item="daily-constancy",
        test="constancy",
        state="due",
        due_ns=now,
        overdue_ns=now + 3600 * 10**9,
        last_done_ns=None,
        last_verdict=None,
        last_record_id=None,
        elution_id=None,
        detail="due today",
    )
    await publish(mosquitto, qc_status_message(SITE, daily, now), retain=True)

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            await page.goto(panel + "/")
            await expect(page).to_have_url(panel + "/login")  # no session: every page sends to the login

            await sign_in(page, "jdoe", "not the password at all")
            await expect(page.get_by_role("alert")).to_contain_text("Sign-in refused")
            assert ("jdoe", USER_AUTH_FAILED, "user:jdoe") in audited(store)

            await sign_in(page, "jdoe", QC_PW)
            await expect(page).to_have_url(panel + "/")
            device = page.locator(f"[data-device='{DEVICE}']")
            await expect(device).to_contain_text("online")
            await expect(device.locator(".activity")).to_have_text("370 MBq")  # 370e6 Bq
            await expect(device.locator(".qc li.due")).to_contain_text("constancy")

            # A new reading shows without a reload: a mark set on this document must still be there.
            await page.evaluate("window.notReloaded = true")
            await publish(mosquitto, reading_message(SITE, STATION, reading(1.25e9)))
            await expect(device.locator(".activity")).to_have_text("1.25 GBq", timeout=SHOWN_WITHIN_MS)
            assert await page.evaluate("window.notReloaded === true")

            # A POST without the session's CSRF token is refused, in the browser's own session and outside it.
            cookie = next(c["value"] for c in await page.context.cookies() if c["name"] == COOKIE_NAME)
            refused = await page.context.request.post(panel + "/logout", form={"csrf_token": "forged"})
            assert refused.status == 403
            assert await asyncio.to_thread(post_status, panel + "/logout", cookie, b"") == 403
            await page.reload()
            await expect(page).to_have_url(panel + "/")  # still signed in

            await page.get_by_role("button", name="Log out").click()
            await expect(page).to_have_url(panel + "/login")
            await page.goto(panel + "/")
            await expect(page).to_have_url(panel + "/login")
        finally:
            await browser.close()

    # The ended session is gone on the server too: a copy of its cookie opens nothing.
    stale = urllib.request.Request(panel + "/", headers={"Cookie": f"{COOKIE_NAME}={cookie}"})
    with await asyncio.to_thread(urllib.request.urlopen, stale, None, 5) as response:
        assert response.url == panel + "/login"
    trail = audited(store)
    assert ("jdoe", USER_LOGIN, "user:jdoe") in trail
    assert ("jdoe", USER_LOGOUT, "user:jdoe") in trail
    assert trail.index(("jdoe", USER_LOGIN, "user:jdoe")) < trail.index(("jdoe", USER_LOGOUT, "user:jdoe"))
    assert verify_chain(store.audit.path, KEY).ok


def test_a_session_ends_after_15_idle_minutes_and_activity_keeps_it() -> None:
    now = [0.0]
    sessions = Sessions(clock=lambda: now[0])
    session = sessions.start(None)
    cookie = sessions.cookie_value(session)
    now[0] = 14 * 60.0
    assert sessions.from_cookie(cookie) is session
    # The same session id signed with another key (another panel process, or a forger) opens nothing.
    assert sessions.from_cookie(Sessions().cookie_value(session)) is None
    sessions.touch(session)
    now[0] = 28 * 60.0  # 14 min after the last activity, 28 after the start
    assert sessions.from_cookie(cookie) is session
    now[0] = 28 * 60.0 + 15 * 60.0 + 1
    assert sessions.from_cookie(cookie) is None


def test_a_message_the_page_cannot_show_is_counted_and_the_page_still_renders() -> None:
    """A retained qc_status without `test`, an absurd time, or JSON nested too deep crashed the page or the feed."""
    from hotlab.controller.web.overview import lab_overview

    feed = LiveFeed("lab", MqttConfig(host="127.0.0.1", port=1883))
    status = {"schema": "hotlab.qc_status/1", "msg_id": "a" * 32, "time_ns": 1, "site": "lab", "device": "cal",
              "item": "daily_constancy", "state": "due", "alarm": False, "detail": "", "station": "qc"}  # fmt: skip
    feed.apply("hotlab/lab/qc/cal/qc/status/daily_constancy", json.dumps(status))  # no "test"
    feed.apply("hotlab/lab/x", "[" * 100_000)  # RecursionError in json
    alarm = {"schema": "hotlab.controller_alarm/1", "msg_id": "b" * 32, "time_ns": 10**25, "site": "lab",
             "station": "qc", "device": "cal", "alarm": "outbox", "active": True, "fraction": 0.9}  # fmt: skip
    feed.apply("hotlab/lab/controller/alarm", json.dumps(alarm))
    assert feed.view.rejected == 2
    overview = lab_overview(feed.view)
    assert overview.devices == () and overview.alarms[0].time == "-"


def test_server_sent_event_data_cannot_start_a_field_of_its_own() -> None:
    """Only LF was split: a CR in a device's detail could end the data line and inject `event: signed-out`."""
    from hotlab.controller.web.events import server_sent_event

    event = server_sent_event("lab", "x\r\revent: signed-out\rdata: y\r\nz")
    lines = event.split("\n")
    assert all(line.startswith(("event: lab", "data: ")) or line == "" for line in lines), lines
    assert "\r" not in event


async def test_every_method_that_may_change_something_needs_the_csrf_token() -> None:
    """Only POST was checked: a PUT or DELETE route added later would have had no CSRF protection."""
    from hotlab.controller.web.auth import SessionGuard

    reached: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["method"])

    sessions = Sessions()
    session = sessions.start(None)
    cookie = f"{COOKIE_NAME}={sessions.cookie_value(session)}".encode()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    for method in ("PUT", "PATCH", "DELETE", "POST"):
        scope = {"type": "http", "path": "/login", "method": method, "headers": [(b"cookie", cookie)]}
        await SessionGuard(app, sessions)(scope, receive, send)
    assert reached == [] and [m["status"] for m in sent if m["type"] == "http.response.start"] == [403] * 4


@pytest.mark.integration
async def test_a_form_sent_after_its_session_ended_leads_to_a_sign_in_form_that_says_so(panel: str) -> None:
    """A sign-in form left open past the idle limit was a bare 403; nothing is done, and the form says why."""
    ended = Sessions()  # another key: to this panel, a session that no longer exists
    cookie = ended.cookie_value(ended.start(None))
    request = urllib.request.Request(
        panel + "/login",
        data=b"csrf_token=whatever&username=jdoe&password=x",
        headers={"Cookie": f"{COOKIE_NAME}={cookie}", "Content-Type": "application/x-www-form-urlencoded"},
    )
    with await asyncio.to_thread(urllib.request.urlopen, request, None, 5) as response:
        assert response.url == panel + "/login?expired=1"
        assert "Your session had ended, so nothing was done" in response.read().decode()


@pytest.mark.integration
async def test_every_page_stream_refuses_a_visitor_who_is_not_signed_in_with_401(panel: str) -> None:
    """A device page's stream answered 303 to the sign-in form, which a browser's EventSource retries forever."""
    for path in ("/events", f"/calibrator/{DEVICE}/events"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            await asyncio.to_thread(urllib.request.urlopen, panel + path, None, 5)
        assert refused.value.code == 401, path


@pytest.mark.integration
async def test_the_panel_reads_the_bus_under_its_own_broker_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under examples/mosquitto.acl the controller's broker user reads only commands, so a panel reading with
    the [mqtt] login (the controller's, in a shared lab.toml) showed nothing: it reads as [web] mqtt_username."""
    require_mosquitto()
    users = {"hotlab-controller": "controller-password-1", "hotlab-panel": "panel-password-1"}
    with AclMosquittoBroker(users=users, acl_file=ACL, workdir=tmp_path) as broker:
        monkeypatch.setenv("TEST_PANEL_MQTT_PASSWORD", users["hotlab-panel"])
        monkeypatch.setenv("TEST_CONTROLLER_MQTT_PASSWORD", users["hotlab-controller"])
        config = parse_config(
            {
                "site": {"name": SITE},
                "device": [{"name": DEVICE, "station": STATION, "family": "vik202", "transport": "/dev/null"}],
                "mqtt": {
                    "host": broker.host,
                    "port": broker.port,
                    "username": "hotlab-controller",
                    "password_env": "TEST_CONTROLLER_MQTT_PASSWORD",
                },
                "web": {"mqtt_username": "hotlab-panel", "mqtt_password_env": "TEST_PANEL_MQTT_PASSWORD"},
            }
        )
        assert config.mqtt is not None
        feed = LiveFeed.for_lab(config, config.mqtt)
        subscribed = asyncio.Event()
        reader = asyncio.create_task(feed.run(subscribed=subscribed))
        try:
            await asyncio.wait_for(subscribed.wait(), 10)
            message = reading_message(SITE, STATION, reading(370e6))
            async with aiomqtt.Client(
                broker.host, broker.port, username="hotlab-controller", password=users["hotlab-controller"]
            ) as controller:
                await controller.publish(message.topic, json.dumps(message.payload), qos=1)
            deadline = time.monotonic() + 5
            while feed.view.latest_reading.get(DEVICE) is None:
                assert time.monotonic() < deadline, "the panel never saw the controller's reading"
                await asyncio.sleep(0.05)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


@pytest.mark.integration
async def test_disabling_an_account_ends_its_open_sessions_at_their_next_request(panel: str, store: UserStore) -> None:
    """A signed-in session kept the account as it was at sign-in: a disabled QC officer went on reading."""
    import http.cookiejar
    import re

    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def get(path: str, data: bytes | None = None) -> tuple[str, str]:
        with opener.open(panel + path, data, 10) as response:
            return str(response.url), response.read().decode()

    _, form = await asyncio.to_thread(get, "/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form)
    assert csrf is not None
    body = f"csrf_token={csrf.group(1)}&username=jdoe&password={QC_PW.replace(' ', '+')}".encode()
    assert (await asyncio.to_thread(get, "/login", body))[0] == panel + "/"
    assert (await asyncio.to_thread(get, "/"))[0] == panel + "/"
    await asyncio.to_thread(store.disable, "jdoe", admin=Credentials("root", ADMIN_PW), reason="left the lab")
    assert (await asyncio.to_thread(get, "/"))[0] == panel + "/login"


async def test_a_live_page_reads_the_archive_again_only_after_the_bus_brought_that_kind(
    tmp_path: Path, store: UserStore
) -> None:
    """Each push of a device page re-read the archive (up to ten times a second, for any device's reading)."""
    from hotlab.controller.archive import HistoryArchive

    archive_path = tmp_path / "history.sqlite3"
    config = parse_config(
        {
            "site": {"name": SITE},
            "device": [{"name": DEVICE, "station": STATION, "family": "vik202", "transport": "/dev/null"}],
            "history": {"path": str(archive_path)},
        }
    )
    feed = LiveFeed(SITE, MqttConfig(host="127.0.0.1", port=1))
    panel = Panel(config, feed, store)
    first, second = (
        device_status_message(SITE, STATION, DEVICE, up=True, latency_ms=1.0, errors=0, time_ns=time.time_ns() + n)
        for n in (0, 1)
    )
    with HistoryArchive(archive_path) as archive:
        archive.add_many([first])
    assert len(await panel.archived("device_status", 0)) == 1
    with HistoryArchive(archive_path) as archive:
        archive.add_many([second])
    feed.apply(
        reading_message(SITE, STATION, reading(1e6)).topic,
        json.dumps(reading_message(SITE, STATION, reading(1e6)).payload),
    )
    assert len(await panel.archived("device_status", 0)) == 1  # a reading: the statuses were not read again
    feed.apply(second.topic, json.dumps(second.payload))
    assert len(await panel.archived("device_status", 0)) == 2  # a status on the bus: read again
    assert await panel.archived("device_status", time.time_ns() + 10) == []  # a later start filters what was read


def test_the_overview_shows_alarms_in_force_until_the_message_that_ends_them() -> None:
    """The overview listed the latest six alarms raised, whether a device had come back or a QC item was
    done since; "active alarms" are the conditions still in force, the list of recent ones stays beside them."""
    from hotlab.controller.lab.demo import LabView
    from hotlab.controller.messages import suspect_alarm_message
    from hotlab.controller.web.overview import lab_overview

    view = LabView(site=SITE, broker="test", acceleration=1.0)
    now = time.time_ns()

    def apply(message: Message) -> None:
        view.apply(message.topic, json.dumps(message.payload))

    def status(up: bool, at: int) -> Message:
        return device_status_message(SITE, STATION, DEVICE, up=up, latency_ms=1.0, errors=0, detail="", time_ns=at)

    def suspect(active: bool, at: int) -> Message:
        return suspect_alarm_message(
            SITE, STATION, DEVICE, active=active, recent_suspect=5 if active else 0, window=20, threshold=0.2,
            total=5, reason="checksum" if active else None, time_ns=at,
        )  # fmt: skip

    def daily(state: str, alarm_at: int) -> Message:
        item = ItemStatus(
            device=DEVICE, station=STATION, item="daily-constancy", test="constancy", state=state, due_ns=now,
            overdue_ns=now + 1, last_done_ns=None, last_verdict=None, last_record_id=None, elution_id=None,
            detail=state,
        )  # fmt: skip
        return qc_status_message(SITE, item, alarm_at)

    apply(status(True, now))
    apply(status(False, now + 1))
    apply(suspect(True, now + 2))
    apply(daily("overdue", now + 3))
    texts = [a.text for a in lab_overview(view).active]
    assert len(texts) == 3 and "offline" in texts[2] and "suspect" in texts[1] and "OVERDUE" in texts[0]

    apply(status(True, now + 4))
    apply(suspect(False, now + 5))
    apply(daily("done", now + 6))
    overview = lab_overview(view)
    assert overview.active == ()
    assert len(overview.alarms) == 3  # what happened stays in the recent list


async def test_hotlab_web_stops_gracefully_on_sigterm_as_its_service_unit_asks(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """systemd stops the panel with SIGTERM: it must end like Ctrl-C (exit 0), not be killed by the signal."""
    with panel_process(tmp_path, mosquitto) as (url, process):
        await wait_for_http(url + "/login", process)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 15) == 0
