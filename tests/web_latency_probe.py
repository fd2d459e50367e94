"""Times readings from the bus to a signed-in page of the web panel: shared by bench/web_latency.py and its test.

Everything is real and on loopback: a `mosquitto`, the panel as its own process (`python -m
hotlab.controller.cli web`, with a user store and a keyed audit trail), and Debian's chromium driven
by Playwright, signed in on the lab overview. Readings are published as the controller publishes
them after their commit (controller/messages.py `reading_message`), each with an activity no other
has; the page stamps the wall-clock time at which each activity appears in the device's card (a
MutationObserver: the moment of the DOM change, not of a poll). Browser and probe share the clock.
The baseline is a plain MQTT subscriber receiving the same messages (the broker's delivery alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
from playwright.async_api import async_playwright

from hotlab.controller.audit import KEY_FILE_ENV, AuditLog
from hotlab.controller.lab.embedded_broker import MosquittoBroker, free_tcp_port
from hotlab.controller.messages import reading_message
from hotlab.controller.users import UserStore
from hotlab.drivers.records import Reading
from hotlab.physics.units import format_activity

CHROMIUM = "/usr/bin/chromium"
SITE, STATION, DEVICE = "bench", "hotcell-1", "cal-1"
USER, PASSWORD = "bench", "bench panel passphrase"
#: Records the moment each new activity text appears in the device's card.
OBSERVER = """
(device) => {
  window.seen = [];
  const lab = document.getElementById("lab");
  const record = () => {
    const cell = lab.querySelector(`[data-device='${device}'] .activity`);
    const text = cell ? cell.textContent.trim() : null;
    const last = window.seen.length ? window.seen[window.seen.length - 1][1] : null;
    if (text && text !== last) window.seen.push([Date.now(), text]);
  };
  new MutationObserver(record).observe(lab, {childList: true, subtree: true, characterData: true});
}
"""


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def write_lab(workdir: Path, broker: MosquittoBroker) -> tuple[Path, Path]:
    """The panel's config, and its audit key file; the user store holds one account."""
    key = os.urandom(32).hex()
    key_file = workdir / "audit.key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    with UserStore(workdir / "users.sqlite3", AuditLog(workdir / "audit.jsonl", key=key.encode())) as store:
        store.add_user(USER, "Bench Reader", "admin", PASSWORD, admin=None)
    config = workdir / "lab.toml"
    config.write_text(
        f'[site]\nname = "{SITE}"\n\n[commands]\naudit_path = "{workdir / "audit.jsonl"}"\n\n'
        f'[[device]]\nname = "{DEVICE}"\nstation = "{STATION}"\nfamily = "vik202"\ntransport = "/dev/null"\n\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
    )
    return config, key_file


async def wait_for_http(url: str, process: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the panel exited with {process.returncode}")
        try:
            await asyncio.to_thread(urllib.request.urlopen, url, None, 1)
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the panel did not answer at {url} within {timeout_s:g} s")


async def measure(broker: MosquittoBroker, url: str, readings: int, interval_s: float) -> dict[str, list[float]]:
    published: dict[str, float] = {}
    delivered: dict[str, float] = {}
    async with async_playwright() as playwright, aiomqtt.Client(broker.host, broker.port) as client:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = await browser.new_page()
        await page.goto(url + "/login")
        await page.fill("#username", USER)
        await page.fill("#password", PASSWORD)
        await page.click("button[type=submit]")
        await page.wait_for_url(url + "/")
        await page.evaluate(OBSERVER, DEVICE)
        await client.subscribe(f"hotlab/{SITE}/+/+/reading", qos=1)
        await asyncio.sleep(1.0)  # the page's event stream is open and idle

        async def collect() -> None:
            async for message in client.messages:
                payload = json.loads(message.payload)
                delivered[format_activity(float(payload["activity_bq"]))] = time.time()

        collector = asyncio.create_task(collect())
        for index in range(readings):
            activity_bq = (100 + index) * 1e6  # shown as "100 MBq", "101 MBq", ...: each text once
            reading = Reading(DEVICE, "Tc-99m", activity_bq, activity_bq / 1e6, "MBq", time.time_ns(), b"bench")
            message = reading_message(SITE, STATION, reading)
            published[format_activity(activity_bq)] = time.time()
            await client.publish(message.topic, json.dumps(message.payload), qos=1)
            await asyncio.sleep(interval_s)
        await asyncio.sleep(1.0)
        seen: list[tuple[float, str]] = await page.evaluate("window.seen")
        collector.cancel()
        await browser.close()
    page_ms = [ms - published[text] * 1000 for ms, text in seen if text in published]
    broker_ms = [(delivered[text] - published[text]) * 1000 for text in published if text in delivered]
    return {"panel": page_ms, "baseline": broker_ms}


@dataclass(frozen=True, slots=True)
class Latencies:
    readings: int
    #: Milliseconds from publication to the page, for each reading the page showed (a burst merges some).
    panel_ms: list[float]
    #: Milliseconds from publication to a plain subscriber, for each reading.
    baseline_ms: list[float]


@contextlib.contextmanager
def panel_process(workdir: Path, broker: MosquittoBroker) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`hotlab web` for a one-device lab on `broker`, as its own process; yields its URL."""
    config, key_file = write_lab(workdir, broker)
    port = free_tcp_port()
    env = os.environ | {KEY_FILE_ENV: str(key_file)}
    command = [sys.executable, "-m", "hotlab.controller.cli", "web", "--config", str(config), "--port", str(port)]
    panel = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}", panel
    finally:
        panel.terminate()
        panel.wait(10)


async def time_readings(workdir: Path, readings: int, interval_s: float) -> Latencies:
    """Start a broker and the panel in `workdir`, publish `readings` one every `interval_s`, and time them."""
    with MosquittoBroker(workdir=workdir) as broker, panel_process(workdir, broker) as (url, panel):
        await wait_for_http(url + "/login", panel)
        result = await measure(broker, url, readings, interval_s)
    return Latencies(readings, result["panel"], result["baseline"])
