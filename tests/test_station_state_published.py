"""An elution station's own state reaches the bus, and the station page shows it before anyone acts.

Issue 18: a station that faults on its own (a pressure switch, a valve sensor) must be shown
faulted before the radiopharmacist presses start, not once a command is refused. Real Mosquitto,
the real controller service and the real Modbus station simulator, whose fault is injected
without any command; the page's state is built from a LabView fed with what the bus carried.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from hotlab.controller.audit import AuditLog
from hotlab.controller.config import DeviceConfig, LabConfig, parse_config
from hotlab.controller.messages import device_status_message
from hotlab.controller.service import ControllerService
from hotlab.controller.users import UserStore
from hotlab.controller.web.live import LiveFeed
from hotlab.controller.web.panel import Panel
from hotlab.controller.web.station import station_live
from hotlab.drivers.station_registers import FaultCode
from hotlab.simulators.elution_station import ElutionStationSimulator, StationClock, StationIdentity, StationModel
from hotlab.simulators.generator_physics import GeneratorColumn, get_profile
from tests.mosquitto_service import MosquittoBroker, MqttCollector, mosquitto  # noqa: F401 - fixture
from tests.schema_check import validator_for

SITE = "statelab"
DAY_NS = 86400 * 10**9
#: docs/elution-station-registers.md, input register 36 `fault_code`: "2 valve position".
VALVE_POSITION_CODE = 2
#: Far longer than the test: a status that arrives in time was sent for the change, not for the interval.
STATUS_INTERVAL_S = 600.0
#: "Within a few seconds" of the fault: the station is polled every 0.05 s.
PUBLISHED_WITHIN_S = 5.0
TEMPLATES = Path(__file__).resolve().parent.parent / "controller" / "web" / "templates"


@dataclass
class StationLab:
    config: LabConfig
    device: DeviceConfig
    model: StationModel
    simulator: ElutionStationSimulator
    bus: MqttCollector


@pytest.fixture
async def station_lab(tmp_path: Path, mosquitto: MosquittoBroker) -> AsyncIterator[StationLab]:
    """The controller polling one idle station simulator, with statuses due only every 10 minutes."""
    now = time.time_ns()
    column = GeneratorColumn(
        get_profile("ge68"),
        generator_id="GE68-STATE-1",
        parent_cal_bq=1.85e9,
        cal_time_ns=now - 30 * DAY_NS,
        last_elution_ns=now - DAY_NS,
    )
    model = StationModel(column, StationClock(acceleration=1.0), StationIdentity())
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
            "service": {"state_dir": "state", "drain_timeout_s": 2.0, "status_interval_s": STATUS_INTERVAL_S},
            "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "client_id": f"ctl-{uuid.uuid4().hex[:8]}"},
        },
        base_dir=tmp_path,
    )
    service = ControllerService(config)
    stop = asyncio.Event()
    try:
        async with MqttCollector(
            mosquitto.host, mosquitto.port, f"hotlab/{SITE}/#", client_id="state-collector"
        ) as bus:
            controller = asyncio.create_task(service.run(stop))
            try:
                yield StationLab(config, config.devices[0], model, simulator, bus)
                assert not controller.done(), "the service ended during the test"
            finally:
                stop.set()
                await asyncio.wait_for(controller, 30)
    finally:
        await simulator.stop()


def statuses(bus: MqttCollector) -> list[dict[str, Any]]:
    return bus.payloads("/gen-1/status", "device_status")


async def test_a_fault_the_station_raised_on_its_own_is_published_and_shown_above_the_start_button(
    station_lab: StationLab, tmp_path: Path
) -> None:
    lab = station_lab
    await lab.bus.wait_for(
        lambda: any(s["up"] and s.get("station_state") == "idle" for s in statuses(lab.bus)),
        what="a status of the idle station",
    )
    idle = next(s for s in statuses(lab.bus) if s.get("station_state") == "idle")
    assert idle["fault_code"] is None

    faulted_at = time.monotonic()
    lab.simulator.raise_fault(FaultCode(VALVE_POSITION_CODE))  # the station's valve sensor: no command sent
    await lab.bus.wait_for(
        lambda: any(s.get("station_state") == "fault" for s in statuses(lab.bus)),
        timeout=PUBLISHED_WITHIN_S,
        what="a status of the faulted station",
    )
    assert time.monotonic() - faulted_at < PUBLISHED_WITHIN_S
    fault = next(s for s in statuses(lab.bus) if s.get("station_state") == "fault")
    assert fault["up"] is True and fault["fault_code"] == VALVE_POSITION_CODE

    # The page, from a panel's live view fed with what the bus carried (no command reply exists).
    store = UserStore(tmp_path / "users.sqlite3", AuditLog(tmp_path / "audit.jsonl", key=b"k" * 32))
    try:
        panel = Panel(lab.config, LiveFeed(SITE, lab.config.mqtt), store)
        panel.feed.view.connected = True
        for payload in statuses(lab.bus):
            panel.feed.apply(f"hotlab/{SITE}/elution-1/gen-1/status", json.dumps(payload))
        live = await station_live(panel, {}, lab.device, time.time_ns())
        assert live.state.name == "fault"
        assert "polled by the controller" in live.state.source
        assert live.notices[0].severity == "fail" and "in fault (code 2, valve position)" in live.notices[0].text
        shown = panel.templates.get_template("_station_status.html").render(live=live)
        assert 'class="station-state fault">fault<' in shown and "code 2, valve position" in shown
        # station.html includes this status section before its forms, the start button's among them.
        page = (TEMPLATES / "station.html").read_text()
        assert page.index('include "_station_status.html"') < page.index("Start elution…")
    finally:
        store.close()


async def test_without_a_published_state_the_page_says_it_has_none_from_the_controller(tmp_path: Path) -> None:
    """A status without a state (the station does not answer): the page falls back and says so."""
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
        down = device_status_message(SITE, "elution-1", "gen-1", up=False, latency_ms=None, errors=1, detail="timeout")
        panel.feed.apply(down.topic, json.dumps(down.payload))
        live = await station_live(panel, {}, config.devices[0], time.time_ns())
        assert (live.state.name, live.status) == ("unknown", "offline")
        assert "no state from the controller" in live.state.source
    finally:
        store.close()


def test_a_station_status_matches_the_schema_and_a_fault_needs_its_code() -> None:
    validator = validator_for("device_status")
    assert validator is not None

    def status(**fields: Any) -> dict[str, Any]:
        return device_status_message(SITE, "elution-1", "gen-1", up=True, latency_ms=2.0, errors=0, **fields).payload

    validator.validate(status(station_state="idle"))
    validator.validate(status(station_state="fault", fault_code=VALVE_POSITION_CODE))
    for wrong in (
        status(station_state="fault", fault_code=VALVE_POSITION_CODE) | {"fault_code": None},  # no code
        status(station_state="idle") | {"fault_code": VALVE_POSITION_CODE},  # a code without a fault
        status(station_state="idle") | {"station_state": "resting"},
        {k: v for k, v in status(station_state="idle").items() if k != "fault_code"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(wrong)
    with pytest.raises(ValueError, match="station_state must be one of idle, priming, eluting, done, fault"):
        status(station_state="resting")
    for state, code in (("eluting", VALVE_POSITION_CODE), ("fault", None)):
        with pytest.raises(ValueError, match="a fault code goes with a station in fault and only then"):
            status(station_state=state, fault_code=code)
