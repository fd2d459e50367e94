"""The web panel inside `hotlab demo`: started by default, its URL in the banner, the demo's accounts sign in,
and the archive filled by --history-days is what its QC page shows. Real processes, real broker, plain HTTP."""

from __future__ import annotations

import http.cookiejar
import os
import re
import selectors
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from hotlab.controller.web.server import listening_socket
from hotlab.errors import InputError
from tests.mosquitto_service import require_mosquitto

pytest.importorskip("starlette")


def _demo(cwd: Path, *, duration_s: int, history_days: int) -> subprocess.Popen[str]:
    """A headless demo with its own audit key, its panel on a free port and `history_days` of history;
    its stderr is read by `_lines_until`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTLAB_AUDIT_KEY")}
    return subprocess.Popen(
        [sys.executable, "-m", "hotlab.controller.cli", "demo", "--headless", "--duration", str(duration_s)]
        + ["--state-dir", "state", "--web-port", "0", "--history-days", str(history_days)],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _lines_until(process: subprocess.Popen[str], pattern: str, timeout_s: float) -> re.Match[str]:
    """Read the process's stderr until a line matches `pattern`.

    It reads the file descriptor itself: a buffered `readline` after `select` can take two lines into
    Python's buffer and leave the second there, unseen, while the process writes nothing more.
    """
    assert process.stderr is not None
    fd = process.stderr.fileno()
    selector = selectors.DefaultSelector()
    selector.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    pending = ""
    while time.monotonic() < deadline:
        if selector.select(timeout=0.5):
            chunk = os.read(fd, 65536).decode(errors="replace")
            if not chunk:
                break
            *lines, pending = (pending + chunk).split("\n")
            for line in lines:
                seen.append(line + "\n")
                if match := re.search(pattern, line):
                    return match
    raise AssertionError(f"no line matching {pattern!r} within {timeout_s:g} s:\n{''.join(seen)[-3000:]}")


def _sign_in(opener: urllib.request.OpenerDirector, url: str, username: str, password: str) -> str:
    with opener.open(url + "login", timeout=10) as response:
        form = response.read().decode()
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form)
    assert csrf is not None, form
    body = urllib.parse.urlencode({"csrf_token": csrf.group(1), "username": username, "password": password})
    with opener.open(url + "login", body.encode(), timeout=30) as response:
        return str(response.url)


@pytest.mark.integration
def test_the_demo_serves_its_panel_by_default_and_the_history_shows_on_the_qc_page(tmp_path: Path) -> None:
    require_mosquitto()
    started = time.time_ns()
    process = _demo(tmp_path, duration_s=90, history_days=14)
    try:
        url = _lines_until(process, r"web panel: (http://127\.0\.0\.1:\d+/)", 90).group(1)
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        password = (tmp_path / "state" / "demo-qc-officer.password").read_text().strip()
        with pytest.raises(urllib.error.HTTPError) as refused:
            _sign_in(opener, url, "demo-qc-officer", "not the password")
        assert refused.value.code == 401
        assert _sign_in(opener, url, "demo-qc-officer", password) == url
        with opener.open(url + "qc", timeout=30) as response:
            page = response.read().decode()
        # 14 days of daily constancy checks are in the archive before the live lab starts.
        assert page.count("constancy") >= 14, page[:2000]
        # The live QC officer's morning starts at the daily check: the calibrator's acceptance baseline is
        # in the history already, and taking it again would record a second acceptance.
        archive_path = tmp_path / "state" / "history.sqlite3"
        deadline = time.monotonic() + 60
        while not (live := _live_procedures(archive_path, started)):
            assert time.monotonic() < deadline, "the live QC officer's daily check never ended"
            time.sleep(0.5)
        assert "baseline" not in live, live
    finally:
        process.terminate()
        process.wait(60)
    assert process.returncode == 0


def _live_procedures(archive_path: Path, since_ns: int) -> list[str]:
    """The QC procedures that ended after `since_ns` (the live lab's, not the history's)."""
    from hotlab.controller.archive import HistoryArchive

    with HistoryArchive(archive_path, read_only=True) as archive:
        ended = [p for p in archive.query("qc_procedure") if p["status"] != "started"]
    return [str(p["procedure"]) for p in ended if int(p["time_ns"]) >= since_ns]


def test_a_port_in_use_is_a_one_line_error_naming_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(InputError, match=rf"cannot listen on 127\.0\.0\.1:{port}: the port is in use"):
            listening_socket("127.0.0.1", port)


CHROMIUM = "/usr/bin/chromium"
#: Set to a directory (docs/images for the README) to keep the screenshots this test takes of each page.
SCREENSHOTS_ENV = "HOTLAB_SCREENSHOTS"
PAGES = {
    "overview": "",
    "station": "station/ga68-station",
    "calibrator": "calibrator/qc-calibrator",
    "qc": "qc",
    "review": "review",
    "audit": "audit",
}


@pytest.mark.integration
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
async def test_every_page_of_the_demo_lab_opens_in_a_browser_and_is_photographed(tmp_path: Path) -> None:
    """Each page of a demo lab with 30 days of history, as a QC officer sees it: the README's screenshots."""
    from playwright.async_api import async_playwright, expect

    require_mosquitto()
    process = _demo(tmp_path, duration_s=120, history_days=30)
    shots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    try:
        url = _lines_until(process, r"web panel: (http://127\.0\.0\.1:\d+/)", 90).group(1)
        password = (tmp_path / "state" / "demo-qc-officer.password").read_text().strip()
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 900})
                await page.goto(url + "login")
                await page.fill("#username", "demo-qc-officer")
                await page.fill("#password", password)
                await page.click("button[type=submit]")
                await expect(page).to_have_url(url)
                await expect(page.locator("[data-device='ga68-station']")).to_be_visible(timeout=15_000)
                # The live Ga-68 generator's first elution (one every 15 s of wall time): the station page then
                # shows the generator in use, not the one the history ended with.
                deadline = time.monotonic() + 60
                while "GE68-DEMO-001" not in await page.content():
                    assert time.monotonic() < deadline, "no live Ga-68 elution within 60 s"
                    await page.wait_for_timeout(1000)
                    await page.goto(url + PAGES["station"])
                for name, path in PAGES.items():
                    response = await page.goto(url + path)
                    assert response is not None and response.status == 200, (name, response)
                    await page.screenshot(path=shots / f"web-{name}.png", full_page=False)
                    assert "Traceback" not in await page.content()
            finally:
                await browser.close()
    finally:
        process.terminate()
        process.wait(60)
    assert {p.name for p in shots.glob("web-*.png")} == {f"web-{name}.png" for name in PAGES}


def test_run_refuses_web_port_for_a_configured_lab(capsys: pytest.CaptureFixture[str]) -> None:
    """--web-port used to be ignored silently with --config: a configured lab's panel is `hotlab web`."""
    from hotlab.controller.cli.main import main as hotlab

    example = Path(__file__).resolve().parent.parent / "examples" / "lab.toml"
    assert hotlab(["run", "--config", str(example), "--web-port", "9000"]) == 2
    assert "a configured lab's is `hotlab web --config`" in capsys.readouterr().err
