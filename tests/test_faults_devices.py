"""Device faults through the whole controller: unplugged and replugged (pty and TCP), slow replies.

Real VIK-202 simulators (pty and TCP), the real driver, the real service with its outbox,
a real Mosquitto and the history archive. The production source of each device is wrapped
by `RecordingSource`, which notes every reading the driver handed over ("produced"); the
tests then require that exactly those readings, each once and in order, reached the MQTT
subscriber and the history archive ("stored") — zero loss across the fault.

The other faults of the issue-9 list are covered elsewhere, each with produced-vs-stored counts:
* broker down/up: tests/test_mqtt_delivery.py::test_broker_outage_loses_nothing_and_keeps_order
* outbox bound reached ("disk nearly full") -> alarm, no loss once space frees:
  tests/test_mqtt_delivery.py::test_full_outbox_holds_device_data_and_raises_alarm
* the disk really full under the outbox and the archive: tests/test_faults_disk_full.py
* controller kill -9 (twice, once with a backlog): tests/test_service_process.py::test_kill_9_and_restart_loses_nothing
  (history sink: tests/test_history.py::test_kill_9_mid_stream_loses_nothing)
* InfluxDB down/up through the service: tests/test_faults_influx.py
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from hotlab.controller.config import DeviceConfig, LabConfig, parse_config
from hotlab.controller.service import ControllerService
from hotlab.controller.sources import driver_source
from hotlab.controller.supervisor import Item, Source
from hotlab.drivers.records import Reading
from hotlab.simulators.calibrator_vik202 import Vik202Simulator
from hotlab.simulators.faults import Fault, FaultInjector
from hotlab.simulators.serial_host import PtyHost, TcpHost
from hotlab.simulators.source import make_chamber
from tests.fault_tally import tally
from tests.mosquitto_service import MosquittoBroker, MqttCollector, mosquitto  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TIMEOUT_S = 0.5


class RecordingSource:
    """The production source of a device (real driver), noting every reading it hands to the controller."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.streaming = inner.streaming
        self.produced: list[Reading] = []

    async def connect(self) -> None:
        await self.inner.connect()

    async def read(self) -> Sequence[Item]:
        items = await self.inner.read()
        self.produced.extend(item for item in items if isinstance(item, Reading))
        return items

    async def delivered(self, items: Sequence[Item]) -> None:
        await self.inner.delivered(items)

    async def close(self) -> None:
        await self.inner.close()


def lab_config(
    tmp_path: Path, broker: MosquittoBroker, transports: dict[str, str], influx: dict[str, Any] | None = None
) -> LabConfig:
    data: dict[str, Any] = {
        "site": {"name": "fault-lab"},
        "device": [
            {
                "name": name,
                "station": "hotcell-1",
                "family": "vik202",
                "transport": url,
                "poll_interval_s": 0.02,
                "timeout_s": TIMEOUT_S,
            }
            for name, url in transports.items()
        ],
        "mqtt": {"host": broker.host, "port": broker.port, "client_id": "ctl-faults", "keepalive_s": 5},
        "outbox": {"path": "outbox.sqlite3"},
        "history": {"path": "history.sqlite3"},
        "service": {"drain_timeout_s": 20, "backoff_initial_s": 0.05, "backoff_max_s": 0.5},
    }
    if influx is not None:
        data["influx"] = influx
    return parse_config(data, file="faults.toml", base_dir=tmp_path)


class RunningLab:
    """The controller service over recorded real drivers; `shutdown()` stops it gracefully (drains)."""

    def __init__(self, config: LabConfig) -> None:
        self.config = config
        self.sources: dict[str, RecordingSource] = {}
        self.service = ControllerService(config, source_factory=self._source)
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.service.run(self.stop))

    def _source(self, device: DeviceConfig) -> RecordingSource:
        self.sources[device.name] = RecordingSource(driver_source(device, self.config.service.state_dir))
        return self.sources[device.name]

    def produced(self, device: str) -> int:
        source = self.sources.get(device)
        return len(source.produced) if source else 0

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 60)


@contextlib.asynccontextmanager
async def running_lab(config: LabConfig) -> AsyncIterator[RunningLab]:
    lab = RunningLab(config)
    try:
        yield lab
    finally:
        if not lab.task.done():
            await lab.shutdown()


def vik202(seed: int, faults: FaultInjector) -> Vik202Simulator:
    return Vik202Simulator(make_chamber("Tc-99m", 740e6, noise_rel=0.002, seed=seed), faults)


def frame_times(collector: MqttCollector, device: str) -> list[int]:
    """The device-frame times of the readings that reached the subscriber, first arrival of each msg_id."""
    seen: set[str] = set()
    times: list[int] = []
    for payload in collector.payloads(f"/{device}/reading", "reading"):
        if payload["msg_id"] not in seen:
            seen.add(payload["msg_id"])
            times.append(payload["time_ns"])
    return times


def archived_frame_times(history: Path, device: str) -> list[int]:
    with contextlib.closing(sqlite3.connect(history)) as db:
        rows = db.execute(
            "SELECT time_ns FROM message WHERE kind = 'reading' AND device = ? ORDER BY time_ns", (device,)
        ).fetchall()
    return [time_ns for (time_ns,) in rows]


async def assert_zero_loss(lab: RunningLab, collector: MqttCollector, device: str) -> list[Reading]:
    """Every reading the driver produced reached MQTT (once per msg_id, in order) and the archive."""
    produced = list(lab.sources[device].produced)
    expected = [reading.timestamp_ns for reading in produced]
    await collector.wait_for(
        lambda: len(frame_times(collector, device)) >= len(expected), what=f"all {len(expected)} readings of {device}"
    )
    assert frame_times(collector, device) == expected, "MQTT: readings lost, duplicated under new ids or reordered"
    archived = await asyncio.to_thread(archived_frame_times, lab.config.history_path, device)  # type: ignore[arg-type]
    assert archived == expected, f"history archive: {len(archived)} stored of {len(expected)} produced"
    delivered = len(frame_times(collector, device))
    tally(
        "readings through device and sink faults", produced=len(expected), to_MQTT=delivered, to_archive=len(archived)
    )
    return produced


def device_statuses(collector: MqttCollector, device: str) -> list[dict[str, Any]]:
    return collector.payloads(f"/{device}/status", "device_status")


async def test_pty_unplugged_and_replugged_loses_nothing(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    faults = FaultInjector(seed=1)
    host = PtyHost(vik202(1, faults))
    path = await host.start()
    try:
        async with MqttCollector(mosquitto.host, mosquitto.port) as collector:
            async with running_lab(lab_config(tmp_path, mosquitto, {"cal-pty": path})) as lab:
                await collector.wait_for(lambda: len(frame_times(collector, "cal-pty")) >= 20, what="20 readings")
                first_tty = host.slave_path
                faults.arm(Fault.DISCONNECT, 3)  # pulled, and the first reconnection attempts fail too
                await collector.wait_for(
                    lambda: any(not s["up"] for s in device_statuses(collector, "cal-pty")), what="device offline"
                )
                at_unplug = lab.produced("cal-pty")
                await collector.wait_for(
                    lambda: (
                        lab.produced("cal-pty") >= at_unplug + 20 and device_statuses(collector, "cal-pty")[-1]["up"]
                    ),
                    what="readings after the replug",
                )
                assert host.slave_path != first_tty  # a new pty behind the same path
                await lab.shutdown()
            produced = await assert_zero_loss(lab, collector, "cal-pty")
    finally:
        await host.stop()
    offline = [s for s in device_statuses(collector, "cal-pty") if not s["up"]]
    assert offline[0]["detail"].startswith("DeviceDisconnected")
    assert len(produced) >= 40


async def test_tcp_device_server_rebooted_loses_nothing(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """The serial device server goes away (connection refused) for a while, then comes back on its port."""
    model = vik202(2, FaultInjector(seed=2))
    host = TcpHost(model)
    url = await host.start()
    port = int(url.rsplit(":", 1)[1])
    try:
        async with MqttCollector(mosquitto.host, mosquitto.port) as collector:
            async with running_lab(lab_config(tmp_path, mosquitto, {"cal-tcp": url})) as lab:
                await collector.wait_for(lambda: len(frame_times(collector, "cal-tcp")) >= 20, what="20 readings")
                await host.stop()
                await collector.wait_for(
                    lambda: any(not s["up"] for s in device_statuses(collector, "cal-tcp")), what="device offline"
                )
                at_unplug = lab.produced("cal-tcp")
                await asyncio.sleep(1.0)  # the outage: reconnection attempts are refused meanwhile
                assert lab.produced("cal-tcp") == at_unplug
                host = TcpHost(model, port=port)
                await host.start()
                await collector.wait_for(
                    lambda: lab.produced("cal-tcp") >= at_unplug + 20, what="readings after the device server is back"
                )
                await lab.shutdown()
            await assert_zero_loss(lab, collector, "cal-tcp")
    finally:
        await host.stop()
    assert lab.service.supervisors["cal-tcp"].errors >= 2  # the drop and at least one refused reconnection


async def test_slow_device_late_replies_lose_nothing_and_the_device_stays_usable(
    tmp_path: Path, mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """Replies later than the driver's timeout: DeviceTimeout each time, no reading lost, reading continues."""
    faults = FaultInjector(seed=3, late_s=TIMEOUT_S + 0.3)
    host = TcpHost(vik202(3, faults))
    url = await host.start()
    try:
        async with MqttCollector(mosquitto.host, mosquitto.port) as collector:
            async with running_lab(lab_config(tmp_path, mosquitto, {"cal-slow": url})) as lab:
                await collector.wait_for(lambda: len(frame_times(collector, "cal-slow")) >= 10, what="10 readings")
                faults.set_rate(Fault.LATE, 0.3)
                await collector.wait_for(lambda: lab.service.supervisors["cal-slow"].errors >= 3, what="three timeouts")
                faults.disable(Fault.LATE)
                at_recovery = lab.produced("cal-slow")
                await collector.wait_for(
                    lambda: lab.produced("cal-slow") >= at_recovery + 20, what="readings after the device is fast again"
                )
                await lab.shutdown()
            produced = await assert_zero_loss(lab, collector, "cal-slow")
    finally:
        await host.stop()
    assert "device cal-slow: DeviceTimeout: no reply" in caplog.text
    assert device_statuses(collector, "cal-slow")[-1]["errors"] >= 3
    # A late reply must not be booked as a fresh one twice: each produced frame time is unique and increasing.
    times = [reading.timestamp_ns for reading in produced]
    assert times == sorted(set(times))
    assert all(reading.activity_bq == pytest.approx(740e6, rel=0.05) for reading in produced)
