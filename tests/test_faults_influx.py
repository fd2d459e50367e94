"""InfluxDB down and up while the controller runs: MQTT stays live, InfluxDB catches up, nothing is lost.

The sink-level outage (a stopped influxd mid-batch, no loss, no duplicates) is
tests/test_influx_sink.py::test_outage_mid_stream_loses_nothing_and_duplicates_nothing; this is
the same fault seen from the whole controller: a real VIK-202 simulator on TCP, the real
driver and service, real Mosquitto, a real influxd, written to with its own 1.x API, that is
stopped and restarted, and the history archive. Produced = readings the driver handed over.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotlab.simulators.faults import FaultInjector
from hotlab.simulators.serial_host import TcpHost
from tests.fault_tally import tally
from tests.influx_service import InfluxService, InfluxServiceError, running_influxd
from tests.mosquitto_service import MosquittoBroker, MqttCollector, mosquitto  # noqa: F401
from tests.test_faults_devices import (
    assert_zero_loss,
    frame_times,
    lab_config,
    running_lab,
    vik202,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
def influxd() -> Iterator[InfluxService]:
    """A private influxd: this test stops and restarts it, so it cannot be the shared module server."""
    with running_influxd("hotlab-influxd-faults-") as service:
        yield service


def influx_frame_times(influx: InfluxService, database: str, device: str) -> list[int]:
    try:
        rows = influx.rows(f'SELECT "activity_bq" FROM "raw"."reading" WHERE "device" = \'{device}\'', database)
    except InfluxServiceError as exc:
        if "retention policy not found" not in str(exc):
            raise
        return []  # the sink has not provisioned the raw readings' policy yet
    return sorted(int(row["time"]) for row in rows)


async def test_influxdb_down_and_up_loses_nothing(
    tmp_path: Path, mosquitto: MosquittoBroker, influxd: InfluxService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAULTS_INFLUX_PASSWORD", influxd.password)
    database = influxd.create_database()
    host = TcpHost(vik202(4, FaultInjector(seed=4)))
    url = await host.start()
    influx = {
        "url": influxd.url,
        "username": influxd.username,
        "password_env": "FAULTS_INFLUX_PASSWORD",
        "database": database,
        "flush_interval_s": 0.2,
        "timeout_s": 2.0,
    }
    config = lab_config(tmp_path, mosquitto, {"cal-1": url}, influx=influx)
    try:
        async with MqttCollector(mosquitto.host, mosquitto.port) as collector:
            async with running_lab(config) as lab:
                service = lab.service
                while len(await asyncio.to_thread(influx_frame_times, influxd, database, "cal-1")) < 20:
                    await asyncio.sleep(0.1)
                await asyncio.to_thread(influxd.stop)
                at_outage = len(frame_times(collector, "cal-1"))
                # MQTT stays live during the outage while InfluxDB's deliveries wait in the outbox.
                await collector.wait_for(
                    lambda: len(frame_times(collector, "cal-1")) >= at_outage + 60,
                    what="live MQTT readings during the InfluxDB outage",
                )
                assert service.outbox is not None
                waiting_for_influx = await service.outbox.pending_count("influx")
                waiting_for_mqtt = await service.outbox.pending_count("mqtt")
                await asyncio.to_thread(influxd.start)
                await lab.shutdown()  # the drain sends InfluxDB its backlog
            produced = await assert_zero_loss(lab, collector, "cal-1")
        stored = await asyncio.to_thread(influx_frame_times, influxd, database, "cal-1")
    finally:
        await host.stop()
    assert waiting_for_influx >= 50 and waiting_for_mqtt < waiting_for_influx
    assert stored == [reading.timestamp_ns for reading in produced], (
        f"InfluxDB holds {len(stored)} of {len(produced)} produced readings"
    )
    tally("readings through an InfluxDB outage", produced=len(produced), to_InfluxDB=len(stored))
