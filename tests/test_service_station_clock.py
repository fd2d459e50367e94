"""The controller raises a station's clock alarm on the bus, and clears it, with a status each time and no more.

Real Mosquitto, the real controller service and the Modbus station simulator with its clock set 90 s
ahead; `[service] max_clock_offset_s = 10`. The bounds come from the statuses' own uncertainty.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hotlab.controller.config import ServiceConfig, parse_config
from hotlab.controller.service import ControllerService
from hotlab.physics.utc_time import NS_PER_S
from hotlab.simulators.elution_station import ElutionStationSimulator, StationClock, StationIdentity, StationModel
from hotlab.simulators.generator_physics import GeneratorColumn, get_profile
from tests.mosquitto_service import MosquittoBroker, MqttCollector, mosquitto  # noqa: F401 - fixture

SITE = "clocklab"
DAY_NS = 86_400 * NS_PER_S
#: Far longer than the test: every status seen was sent for a change.
STATUS_INTERVAL_S = 600.0

pytestmark = pytest.mark.skipif(
    "max_clock_offset_s" not in ServiceConfig.__dataclass_fields__,
    reason="needs [service] max_clock_offset_s in controller/config.py and the clock alarm wired into the service",
)


@pytest.fixture
async def lab(tmp_path: Path, mosquitto: MosquittoBroker) -> AsyncIterator[tuple[StationModel, MqttCollector]]:
    now = time.time_ns()
    column = GeneratorColumn(
        get_profile("ge68"),
        generator_id="GE68-CLOCK-2",
        parent_cal_bq=1.85e9,
        cal_time_ns=now - 30 * DAY_NS,
        last_elution_ns=now - DAY_NS,
    )
    model = StationModel(column, StationClock(1.0, offset_s=90.0), StationIdentity())
    simulator = ElutionStationSimulator(model)
    _, port = await simulator.start_tcp("127.0.0.1", 0)
    config = parse_config(
        {
            "site": {"name": SITE},
            "device": [
                {
                    "name": "gen-1",
                    "station": "elution-1",
                    "family": "elution_station",
                    "poll_interval_s": 0.05,
                    "transport": {"modbus": "tcp", "host": "127.0.0.1", "port": port},
                }
            ],
            "outbox": {"path": "outbox.sqlite3"},
            "history": {"enabled": False},
            "service": {
                "state_dir": "state",
                "drain_timeout_s": 2.0,
                "status_interval_s": STATUS_INTERVAL_S,
                "max_clock_offset_s": 10.0,
            },
            "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "client_id": f"ctl-{uuid.uuid4().hex[:8]}"},
        },
        base_dir=tmp_path,
    )
    service = ControllerService(config)
    stop = asyncio.Event()
    try:
        async with MqttCollector(
            mosquitto.host, mosquitto.port, f"hotlab/{SITE}/#", client_id="clock-collector"
        ) as bus:
            controller = asyncio.create_task(service.run(stop))
            try:
                yield model, bus
                assert not controller.done(), "the service ended during the test"
            finally:
                stop.set()
                await asyncio.wait_for(controller, 30)
    finally:
        await simulator.stop()


def statuses(bus: MqttCollector) -> list[dict[str, Any]]:
    return [s for s in bus.payloads("/gen-1/status", "device_status") if s["up"]]


def alarms(bus: MqttCollector) -> list[dict[str, Any]]:
    return bus.payloads("/gen-1/clock_alarm", "controller_alarm")


async def test_a_station_clock_90_s_ahead_raises_the_alarm_and_setting_it_clears_it(
    lab: tuple[StationModel, MqttCollector],
) -> None:
    model, bus = lab
    await bus.wait_for(lambda: any(a["active"] for a in alarms(bus)), what="the clock alarm raised")
    raised = alarms(bus)[-1]
    assert abs(raised["clock_offset_s"] - 90.0) <= raised["clock_uncertainty_s"] < 0.05
    assert raised["max_clock_offset_s"] == 10.0
    status = statuses(bus)[-1]
    assert status["clock_alarm"] is True and abs(status["clock_offset_s"] - 90.0) <= status["clock_uncertainty_s"]

    await asyncio.sleep(1.0)  # 20 polls, each measuring a slightly different offset
    assert len(statuses(bus)) == 1, "the offset's jitter published statuses"

    model.clock.offset_ns = 0  # someone sets the station's clock
    await bus.wait_for(lambda: not alarms(bus)[-1]["active"], what="the clock alarm cleared")
    cleared = alarms(bus)[-1]
    assert abs(cleared["clock_offset_s"]) <= cleared["clock_uncertainty_s"]
    await asyncio.sleep(0.5)
    assert [s["clock_alarm"] for s in statuses(bus)] == [True, False]
    assert [a["active"] for a in alarms(bus)] == [True, False]
