"""QC procedures end to end: real Mosquitto, the real controller service, a simulated VIK-202 whose chamber the test loads.

A QC officer takes the baselines (Cs-137 check source on the Cs-137 and Tc-99m settings), an
operator runs the daily check with a patient dose measured in between, and a daily check nobody
finishes times out. Every step goes through the audited start_qc command, the outbox and the QC
stage exactly as in production.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from hotlab.controller.archive import HistoryArchive
from hotlab.controller.audit import iter_records
from hotlab.controller.config import parse_config
from hotlab.controller.qc.stage import qc_stage_for
from hotlab.controller.service import ControllerService
from hotlab.physics.nuclides import get_nuclide
from hotlab.simulators.calibrator_vik202 import Vik202Simulator
from hotlab.simulators.serial_host import TcpHost
from hotlab.simulators.source import IonChamber, SimClock, Source
from tests.mosquitto_service import MosquittoBroker, MqttCollector, mosquitto  # noqa: F401 - fixture
from tests.test_commands_service import PANEL_KEY, add_accounts, sign

SITE = "qclab"
CHECK_BQ = 7.4e6
CAL = f"hotlab/{SITE}/qc-lab/cal-1"


def command(topic: str, user: str, args: dict[str, Any], reason: str) -> bytes:
    """`user`'s command (alice a QC officer, bob an operator: add_accounts), signed by the panel for `topic`."""
    body = {
        "schema": "hotlab.command/2",
        "request_id": uuid.uuid4().hex,
        "user": user,
        "reason": reason,
        "issued_at": datetime.now(UTC).isoformat(),
        "args": args,
    }
    return sign(topic, body)


class Console:
    """An operator console: one command at a time, answered on <topic>/reply."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client

    async def send(self, action: str, user: str, args: dict[str, Any], reason: str = "daily QC") -> dict[str, Any]:
        topic = f"{CAL}/cmd/{action}"
        await self.client.publish(topic, command(topic, user, args, reason), qos=1)
        async for message in self.client.messages:
            return dict(json.loads(bytes(message.payload)))  # type: ignore[arg-type]
        raise AssertionError("no reply")


@pytest.fixture
async def lab(
    tmp_path: Path, mosquitto: MosquittoBroker, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[ControllerService, IonChamber, MqttCollector, Console]]:
    monkeypatch.setenv("HOTLAB_TEST_KEY_PANEL", PANEL_KEY.hex())
    await asyncio.to_thread(add_accounts, tmp_path / "state")
    monkeypatch.delenv("HOTLAB_AUDIT_KEY", raising=False)
    monkeypatch.delenv("HOTLAB_AUDIT_KEY_FILE", raising=False)
    chamber = IonChamber(None, clock=SimClock(), selected_nuclide="Cs-137", seed=7)
    host = TcpHost(Vik202Simulator(chamber))
    url = await host.start()
    config = parse_config(
        {
            "site": {"name": SITE},
            "device": [
                {
                    "name": "cal-1",
                    "station": "qc-lab",
                    "family": "vik202",
                    "transport": url,
                    "poll_interval_s": 0.05,
                    "timeout_s": 1.0,
                    "measurement": {"settle_readings": 5, "dwell_s": 1.0},
                }
            ],
            "outbox": {"path": "outbox.sqlite3"},
            "history": {"path": "history.sqlite3"},
            "service": {"state_dir": "state", "drain_timeout_s": 5.0},
            "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "client_id": f"ctl-{uuid.uuid4().hex[:8]}"},
            "command_sender": [{"name": "panel", "key_env": "HOTLAB_TEST_KEY_PANEL"}],
            "qc": {
                "procedure_timeout_min": 0.25,
                "sources": {
                    "CS-CHECK": {"nuclide": "Cs-137", "activity": CHECK_BQ, "reference_time": "2020-01-01T00:00:00Z"}
                },
                "devices": {"cal-1": {"check_source": "CS-CHECK", "settings": ["Tc-99m"]}},
            },
        },
        base_dir=tmp_path,
    )
    service = ControllerService(config, stage=qc_stage_for(config))
    service.qc_tick_s = 0.5
    stop = asyncio.Event()
    async with MqttCollector(mosquitto.host, mosquitto.port, f"hotlab/{SITE}/#", client_id="qc-collector") as bus:
        task = asyncio.create_task(service.run(stop))
        try:
            async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="qc-console") as client:
                await client.subscribe(f"{CAL}/cmd/+/reply", qos=1)
                await bus.wait_for(lambda: len(bus.payloads("/reading")) >= 10, 30, "readings of the empty chamber")
                yield service, chamber, bus, Console(client)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await host.stop()


async def measured(bus: MqttCollector, setting: str, count: int = 1) -> dict[str, Any]:
    """Wait for the `count`-th measurement on `setting` and return it."""
    await bus.wait_for(
        lambda: len([m for m in bus.payloads("/measurement") if m["nuclide"] == setting]) >= count,
        30,
        f"a {setting} measurement",
    )
    return [m for m in bus.payloads("/measurement") if m["nuclide"] == setting][count - 1]


async def test_baseline_then_daily_check_with_a_patient_dose_in_between_then_a_timeout(
    tmp_path: Path, lab: tuple[ControllerService, IonChamber, MqttCollector, Console]
) -> None:
    service, chamber, bus, console = lab
    check = Source(get_nuclide("Cs-137"), CHECK_BQ, time.time_ns())
    # -- the baseline: only a QC officer may take it -----------------------------------------
    refused = await console.send("start_qc", "bob", {"procedure": "baseline", "source": "CS-CHECK"}, "acceptance")
    assert refused["outcome"] == "unauthorised" and "qc_baseline" in refused["error"]
    started = await console.send("start_qc", "alice", {"procedure": "baseline", "source": "CS-CHECK"}, "acceptance")
    assert started["outcome"] == "executed", started
    baseline_id = started["new_value"]["procedure_id"]
    chamber.initial_source = check
    await measured(bus, "Cs-137")
    assert (await console.send("select_nuclide", "alice", {"nuclide": "Tc-99m"}))["outcome"] == "executed"
    await measured(bus, "Tc-99m")
    await bus.wait_for(lambda: len(bus.payloads("/qc/procedure")) >= 2, 30, "the baseline's end")
    baselines = [p for t, p, _ in bus.messages if "/qc/baseline/" in t]
    assert [(b["setting"], b["taken_by"], b["reason"]) for b in baselines] == [
        ("Cs-137", {"user": "alice", "role": "qc_officer"}, "acceptance"),
        ("Tc-99m", {"user": "alice", "role": "qc_officer"}, "acceptance"),
    ]
    assert bus.payloads("/qc/procedure")[-1]["status"] == "complete"
    assert bus.payloads("/qc/procedure")[-1]["procedure_id"] == baseline_id
    # -- the daily check, with a patient dose measured on the Tc-99m setting before the source -------
    chamber.initial_source = None
    await asyncio.sleep(0.5)
    daily = await console.send("start_qc", "bob", {"procedure": "daily_constancy", "source": "CS-CHECK"})
    assert daily["outcome"] == "executed", daily
    daily_id = daily["new_value"]["procedure_id"]
    chamber.initial_source = Source(get_nuclide("Tc-99m"), 550e6, time.time_ns())
    dose = await measured(bus, "Tc-99m", 2)
    chamber.initial_source = None
    await asyncio.sleep(0.5)
    assert (await console.send("select_nuclide", "bob", {"nuclide": "Cs-137"}))["outcome"] == "executed"
    chamber.initial_source = check
    await measured(bus, "Cs-137", 2)
    assert (await console.send("select_nuclide", "bob", {"nuclide": "Tc-99m"}))["outcome"] == "executed"
    await measured(bus, "Tc-99m", 3)
    await bus.wait_for(lambda: bus.payloads("/qc/procedure")[-1]["status"] != "started", 30, "the daily check's end")
    end = bus.payloads("/qc/procedure")[-1]
    assert (end["procedure_id"], end["status"], end["started_by"]) == (
        daily_id,
        "complete",
        {"user": "bob", "role": "operator"},
    )
    results = {r["msg_id"]: r for r in bus.payloads("/qc", kind="qc_result")}
    mine = [results[msg_id] for msg_id in end["results"]]
    assert [(r["test"], r["inputs"].get("setting")) for r in mine] == [
        ("background", None),
        ("constancy", "Cs-137"),
        ("constancy", "Tc-99m"),
    ]
    assert {r["verdict"] for r in mine} == {"pass"} and end["verdict"] == "pass"
    assert dose["msg_id"] not in end["measurements"] and "procedure_id" not in dose
    # The schedule, chained after the engine: a patient dose before the day's check is marked, and the
    # check's end makes the daily item done, on its retained status topic.
    assert dose["qc_state"] == "overdue"
    await bus.wait_for(
        lambda: any(p["item"] == "daily_constancy" and p["state"] == "done" for p in bus.payloads(kind="qc_status")),
        30,
        "daily constancy done",
    )
    done = [p for p in bus.payloads("/qc/status/daily_constancy") if p["state"] == "done"][-1]
    assert done["last_verdict"] == "pass" and done["alarm"] is False
    # -- a daily check nobody finishes ends incomplete after [qc] procedure_timeout_min (15 s) -------
    chamber.initial_source = None
    forgotten = await console.send("start_qc", "bob", {"procedure": "daily_constancy", "source": "CS-CHECK"})
    forgotten_id = forgotten["new_value"]["procedure_id"]
    await bus.wait_for(
        lambda: (
            bus.payloads("/qc/procedure")[-1]["procedure_id"] == forgotten_id
            and bus.payloads("/qc/procedure")[-1]["status"] == "incomplete"
        ),
        40,
        "the timeout",
    )
    assert "procedure_timeout_min" in bus.payloads("/qc/procedure")[-1]["detail"]
    trail = [
        (r.action, r.new_value["outcome"])
        for r in iter_records(tmp_path / "state" / "audit.jsonl")
        if r.action == "qc.start"
    ]
    assert trail[0] == ("qc.start", "unauthorised") and trail.count(("qc.start", "executed")) == 3
    await asyncio.sleep(1.0)  # the history sink archives what was published
    with HistoryArchive(tmp_path / "history.sqlite3", read_only=True) as archive:
        ids = {p["procedure_id"] for p in archive.query("qc_procedure")}
    assert {baseline_id, daily_id, forgotten_id} <= ids


async def test_a_geometry_test_started_by_command_is_judged_and_does_the_schedules_geometry_item(
    lab: tuple[ControllerService, IonChamber, MqttCollector, Console],
) -> None:
    """The same Tc-99m vial measured as the reference and as a second geometry; the chamber reads both alike."""
    _service, chamber, bus, console = lab
    assert (await console.send("select_nuclide", "bob", {"nuclide": "Tc-99m"}))["outcome"] == "executed"
    args = {"procedure": "geometry", "nuclide": "Tc-99m", "geometries": ["vial 10 mL", "syringe 3 mL"]}
    started = await console.send("start_qc", "bob", args, "acceptance of the new calibrator")
    assert started["outcome"] == "executed", started
    procedure_id = started["new_value"]["procedure_id"]
    vial = Source(get_nuclide("Tc-99m"), 400e6, time.time_ns())
    for count in (1, 2):
        chamber.initial_source = vial
        await measured(bus, "Tc-99m", count)
        chamber.initial_source = None
        await asyncio.sleep(0.5)
    await bus.wait_for(lambda: bus.payloads("/qc/procedure")[-1]["status"] != "started", 30, "the geometry test's end")
    end = bus.payloads("/qc/procedure")[-1]
    assert (end["procedure_id"], end["procedure"], end["status"]) == (procedure_id, "geometry", "complete")
    assert end["step_labels"] == ["vial 10 mL", "syringe 3 mL"] and len(end["measurements"]) == 2
    [result] = [r for r in bus.payloads("/qc", kind="qc_result") if r["msg_id"] in end["results"]]
    assert (result["test"], result["verdict"], result["procedure_id"]) == ("geometry", "pass", procedure_id)
    assert list(result["inputs"]["deviation_pct"]) == ["syringe 3 mL"]
    await bus.wait_for(
        lambda: any(p["item"] == "geometry" and p["state"] == "done" for p in bus.payloads(kind="qc_status")),
        30,
        "the geometry item done",
    )
    done = [p for p in bus.payloads("/qc/status/geometry") if p["state"] == "done"][-1]
    assert done["last_record_id"] == result["msg_id"]
