"""`hotlab run` as a real process: kill -9 and restart loses nothing, SIGTERM drains, bad config exits 2.

Devices are the VIK-202 simulator (simulators/) served over TCP, polled by the real driver in
the controller process through `socket://` URLs; the broker is a real Mosquitto.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hotlab.simulators.calibrator_cli import CALIBRATOR_SIMULATORS
from hotlab.simulators.faults import FaultInjector
from hotlab.simulators.serial_host import TcpHost
from hotlab.simulators.source import make_chamber
from tests.mosquitto_service import MosquittoBroker, MqttCollector, mosquitto  # noqa: F401

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent


async def vik202_hosts(count: int) -> list[TcpHost]:
    hosts = []
    for index in range(count):
        chamber = make_chamber("Tc-99m", 740e6 * (index + 1), noise_rel=0.002, seed=index)
        host = TcpHost(CALIBRATOR_SIMULATORS["vik202"](chamber, FaultInjector(seed=index)))
        await host.start()
        hosts.append(host)
    return hosts


def write_config(tmp_path: Path, broker: MosquittoBroker, hosts: list[TcpHost], drain_s: float = 10.0) -> Path:
    devices = "".join(
        f'[[device]]\nname = "cal-{i}"\nstation = "hotcell-1"\nfamily = "vik202"\ntransport = "{host.url}"\n'
        f"poll_interval_s = 0.05\ntimeout_s = 2.0\n\n"
        for i, host in enumerate(hosts, start=1)
    )
    config = tmp_path / "lab.toml"
    config.write_text(
        f'[site]\nname = "proc-lab"\n\n[service]\ndrain_timeout_s = {drain_s}\nbackoff_initial_s = 0.1\n'
        f'backoff_max_s = 1.0\n\n[outbox]\npath = "outbox.sqlite3"\n\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nclient_id = "proc-ctl"\nkeepalive_s = 5\n\n' + devices
    )
    return config


class Controller:
    """`python -m hotlab.controller.cli run --config ...` as a child process, its log in a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, *extra: str) -> None:
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "hotlab.controller.cli",
                "run",
                "--config",
                str(self.config),
                *extra,
                cwd=REPO,
                stdout=log,
                stderr=log,
            )

    async def signal_and_wait(self, signum: int, timeout: float = 40.0) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    ctl = Controller(tmp_path / "lab.toml", tmp_path / "controller.log")
    try:
        yield ctl
    finally:
        await ctl.stop()


def pending_in_outbox(path: Path) -> list[dict[str, Any]]:
    """Payloads still waiting for the MQTT sink, read straight from the SQLite outbox."""
    try:
        with sqlite3.connect(path) as db:
            rows = db.execute(
                "SELECT m.payload FROM delivery d JOIN message m ON m.seq = d.seq WHERE d.sink = 'mqtt' ORDER BY d.seq"
            ).fetchall()
    except sqlite3.OperationalError:  # the controller has not created its tables yet
        return []
    return [json.loads(payload) for (payload,) in rows]


def pending_readings(path: Path) -> list[dict[str, Any]]:
    return [p for p in pending_in_outbox(path) if p["schema"] == "hotlab.reading/1"]


def reading_ids(collector: MqttCollector) -> set[str]:
    return {p["msg_id"] for p in collector.payloads("/reading", "reading")}


async def test_kill_9_and_restart_loses_nothing(
    tmp_path: Path, mosquitto: MosquittoBroker, controller: Controller
) -> None:
    hosts = await vik202_hosts(2)
    write_config(tmp_path, mosquitto, hosts)
    outbox = tmp_path / "outbox.sqlite3"
    try:
        async with MqttCollector(mosquitto.host, mosquitto.port) as collector:
            await controller.start()
            await collector.wait_for(lambda: len(reading_ids(collector)) >= 40, what="40 readings before the kill")
            assert controller.process is not None
            controller.process.kill()  # SIGKILL: no drain, no offline message, mid-stream
            await controller.process.wait()
            await collector.wait_for(
                lambda: any(
                    p["reason"] == "connection lost (last will)" for p in collector.payloads("controller/status")
                ),
                what="the Last Will",
            )

            committed = reading_ids(collector) | {
                p["msg_id"] for p in await asyncio.to_thread(pending_readings, outbox)
            }

            # Second kill, this time with a real backlog: the broker is down and readings pile up on disk.
            await controller.start()
            await collector.wait_for(
                lambda: committed <= reading_ids(collector) and len(reading_ids(collector)) >= len(committed) + 20,
                what="the first backlog and new readings",
            )
            await asyncio.to_thread(mosquitto.stop)
            while len(await asyncio.to_thread(pending_readings, outbox)) < 30:
                await asyncio.sleep(0.1)
            controller.process.kill()
            await controller.process.wait()
            backlog = await asyncio.to_thread(pending_readings, outbox)
            committed |= reading_ids(collector) | {p["msg_id"] for p in backlog}
            await asyncio.to_thread(mosquitto.start)

            await controller.start()
            await collector.wait_for(
                lambda: committed <= reading_ids(collector) and len(reading_ids(collector)) >= len(committed) + 20,
                what="every committed reading plus new ones after the restart",
            )
            assert await controller.signal_and_wait(signal.SIGTERM) == 0
            await collector.wait_for(
                lambda: collector.payloads("controller/status")[-1]["reason"] == "shutdown",
                what="the offline status of the clean stop",
            )
    finally:
        for host in hosts:
            await host.stop()

    log = controller.log.read_text()
    assert log.count("mqtt: connected to") == 3, log
    assert len(backlog) >= 30
    assert not await asyncio.to_thread(pending_in_outbox, tmp_path / "outbox.sqlite3"), "a clean stop drains all"
    for device in ("cal-1", "cal-2"):
        payloads = [p for p in collector.payloads("/reading", "reading") if p["device"] == device]
        first: dict[str, int] = {}
        for p in payloads:
            first.setdefault(p["msg_id"], p["time_ns"])
        times = list(first.values())
        assert times == sorted(times) and len(set(times)) == len(times), f"{device}: out of order"
        assert all(p["nuclide"] == "Tc-99m" and p["unit"] == "Bq" for p in payloads)
    # The only repeats allowed are the ones that were still unacknowledged at the kill.
    all_readings = collector.payloads("/reading", "reading")
    assert len(all_readings) - len(reading_ids(collector)) <= len(backlog) + 64


async def test_sigterm_without_broker_keeps_backlog_then_sends_it(
    tmp_path: Path, mosquitto: MosquittoBroker, controller: Controller
) -> None:
    hosts = await vik202_hosts(1)
    write_config(tmp_path, mosquitto, hosts, drain_s=2.0)
    try:
        async with MqttCollector(mosquitto.host, mosquitto.port) as collector:
            await asyncio.to_thread(mosquitto.stop)
            await controller.start()
            outbox = tmp_path / "outbox.sqlite3"
            while not outbox.exists() or len(await asyncio.to_thread(pending_readings, outbox)) < 20:
                await asyncio.sleep(0.2)
            started = asyncio.get_running_loop().time()
            assert await controller.signal_and_wait(signal.SIGTERM) == 0
            assert asyncio.get_running_loop().time() - started < 2.0 + 10.0  # bounded by drain_timeout_s
            kept = [p["msg_id"] for p in await asyncio.to_thread(pending_readings, outbox)]
            assert len(kept) >= 20

            await asyncio.to_thread(mosquitto.start)
            await controller.start("--duration", "3")
            await collector.wait_for(lambda: set(kept) <= reading_ids(collector), what="the kept backlog")
            assert controller.process is not None
            assert await asyncio.wait_for(controller.process.wait(), 40) == 0
    finally:
        for host in hosts:
            await host.stop()
    first_ids = [p["msg_id"] for p in collector.payloads("/reading", "reading")][: len(kept)]
    assert first_ids == kept  # the backlog goes first, in its original order
    log = controller.log.read_text()
    assert "drain time over while disconnected" in log
    assert log.count("garbage collector: ") == 2 and "thresholds 10000/50/50" in log  # once per start


def test_bad_config_exits_2_with_precise_message(tmp_path: Path) -> None:
    import subprocess

    config = tmp_path / "bad.toml"
    config.write_text(
        '[site]\nname = "lab"\n\n[[device]]\nname = "c"\nstation = "s"\nfamily = "capintec"\n'
        'transport = "/dev/ttyUSB0"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "hotlab.controller.cli", "run", "--config", str(config)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"hotlab run: error: {config}: device[0].family: 'capintec' is not allowed; "
        "allowed: vik202, crc15r, vdc404, atomlab500, elution_station"
    )
