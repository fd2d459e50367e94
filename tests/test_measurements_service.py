"""Measurements end to end: a simulated VIK-202 whose chamber a script loads and empties, the real service.

The simulator's chamber follows a schedule (simulators/source.py `ChamberSchedule`): empty, then the
Cs-137 check source, then empty again, repeating. Every insertion the controller saw from an empty
chamber to an empty chamber must give exactly one measurement, one daily check recognised from it,
and a radiopharmacist's label must reach the archive through an audited command. A source left in
the chamber gives one measurement after its dwell, and no more.
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
import jsonschema
import pytest

from hotlab.controller.archive import HistoryArchive
from hotlab.controller.audit import iter_records
from hotlab.controller.config import LabConfig, parse_config
from hotlab.controller.qc.stage import qc_stage_for
from hotlab.controller.service import ControllerService
from hotlab.physics.nuclides import get_nuclide
from hotlab.simulators.calibrator_vik202 import Vik202Simulator
from hotlab.simulators.serial_host import TcpHost
from hotlab.simulators.source import ChamberSchedule, IonChamber, SimClock, Source
from tests.mosquitto_service import MosquittoBroker, MqttCollector, mosquitto  # noqa: F401 - fixture
from tests.test_commands_service import PANEL_KEY, add_accounts, sign

SITE = "measlab"
S = 1_000_000_000
SCHEMAS = Path(__file__).resolve().parent.parent / "controller" / "schemas"
#: 7.4 MBq (200 uCi) Cs-137: the check source the script puts in and takes out.
CHECK_BQ = 7.4e6


def validate(kind: str, payload: dict[str, Any]) -> None:
    schema = json.loads((SCHEMAS / f"{kind}.json").read_text())
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(payload)


def scripted_chamber(empty_s: float, loaded_s: float | None) -> IonChamber:
    """Empty for `empty_s`, then the check source for `loaded_s`, again and again (None: it stays in)."""
    clock = SimClock()
    start = clock.now_ns()
    source = Source(get_nuclide("Cs-137"), CHECK_BQ, start)
    changes: tuple[tuple[int, Source | None], ...] = ((start + int(empty_s * S), source),)
    period = None
    if loaded_s is not None:
        changes += ((start + int((empty_s + loaded_s) * S), None),)
        period = int((empty_s + loaded_s) * S)
    schedule = ChamberSchedule(changes, repeat_every_ns=period)
    return IonChamber(None, clock=clock, selected_nuclide="Cs-137", seed=5, schedule=schedule)


def lab_config(tmp_path: Path, url: str, *, broker: MosquittoBroker | None, dwell_s: float) -> LabConfig:
    now = datetime.now(UTC).isoformat()
    document: dict[str, Any] = {
        "site": {"name": SITE},
        "device": [
            {
                "name": "cal-1",
                "station": "qc-lab",
                "family": "vik202",
                "transport": url,
                "poll_interval_s": 0.05,
                "timeout_s": 1.0,
                "measurement": {"settle_readings": 5, "dwell_s": dwell_s},
            }
        ],
        "outbox": {"path": "outbox.sqlite3"},
        "history": {"path": "history.sqlite3"},
        "service": {"state_dir": "state", "drain_timeout_s": 5.0},
        "qc": {
            "sources": {"CS-CHECK": {"nuclide": "Cs-137", "activity": CHECK_BQ, "reference_time": now}},
            "devices": {"cal-1": {"check_source": "CS-CHECK"}},
        },
    }
    if broker is not None:
        document["mqtt"] = {"host": broker.host, "port": broker.port, "client_id": f"ctl-{uuid.uuid4().hex[:8]}"}
        # alice is a qc_officer (add_accounts): the accuracy label below asks for a verdict (label_accuracy).
        document["command_sender"] = [{"name": "panel", "key_env": "HOTLAB_TEST_KEY_PANEL"}]
    return parse_config(document, base_dir=tmp_path)


@pytest.fixture
async def simulated_vik() -> AsyncIterator[tuple[Vik202Simulator, str]]:
    simulator = Vik202Simulator(scripted_chamber(1.0, 1.5))
    host = TcpHost(simulator)
    url = await host.start()
    try:
        yield simulator, url
    finally:
        await host.stop()


def archived(tmp_path: Path, kind: str) -> list[dict[str, Any]]:
    with HistoryArchive(tmp_path / "history.sqlite3", read_only=True) as archive:
        return archive.query(kind)


def insertions(readings: list[dict[str, Any]], background_bq: float = 37e3) -> list[tuple[int, int]]:
    """(first reading in, first reading out) of every insertion seen from an empty chamber to an empty chamber."""
    found, start, seen_empty = [], None, False
    for reading in readings:
        if reading["quality"] != "good":
            continue
        empty = reading["activity_bq"] <= background_bq
        if empty and start is not None:
            found.append((start, reading["time_ns"]))
        if empty:
            start, seen_empty = None, True
        elif start is None and seen_empty:
            start = reading["time_ns"]
            seen_empty = False
    return found


def command(topic: str, action_args: dict[str, Any], request_id: str | None = None) -> bytes:
    """alice's command, signed by the panel for `topic`."""
    body = {
        "schema": "hotlab.command/2",
        "request_id": request_id or uuid.uuid4().hex,
        "user": "alice",
        "reason": "dispensed for patient 2026-0412",
        "issued_at": datetime.now(UTC).isoformat(),
        "args": action_args,
    }
    return sign(topic, body)


async def test_one_measurement_per_insertion_judged_once_and_labelled_by_an_audited_command(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    monkeypatch: pytest.MonkeyPatch,
    simulated_vik: tuple[Vik202Simulator, str],
) -> None:
    monkeypatch.setenv("HOTLAB_TEST_KEY_PANEL", PANEL_KEY.hex())
    await asyncio.to_thread(add_accounts, tmp_path / "state")
    monkeypatch.delenv("HOTLAB_AUDIT_KEY", raising=False)
    monkeypatch.delenv("HOTLAB_AUDIT_KEY_FILE", raising=False)
    _simulator, url = simulated_vik
    config = lab_config(tmp_path, url, broker=mosquitto, dwell_s=30.0)
    service = ControllerService(config, stage=qc_stage_for(config))
    stop = asyncio.Event()
    cal_topic = f"hotlab/{SITE}/qc-lab/cal-1"
    async with MqttCollector(mosquitto.host, mosquitto.port, f"hotlab/{SITE}/#", client_id="meas-collector") as bus:
        task = asyncio.create_task(service.run(stop))
        try:
            await bus.wait_for(lambda: len(bus.payloads("/measurement")) >= 3, 60, "three measurements")
            first, second = bus.payloads("/measurement")[:2]
            async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="meas-console") as console:
                await console.subscribe(f"{cal_topic}/cmd/+/reply", qos=1)
                replies = []
                for args in (
                    {"measurement_id": first["msg_id"], "label": "CS-CHECK daily constancy"},
                    {"measurement_id": "0" * 32, "label": "nothing"},
                    {"measurement_id": first["msg_id"][:8], "label": "too short an id"},
                    {"measurement_id": second["msg_id"], "label": "annual accuracy", "reference_source": "CS-CHECK"},
                    {"measurement_id": second["msg_id"], "label": "annual accuracy", "reference_source": "NOPE"},
                ):
                    topic = f"{cal_topic}/cmd/label_measurement"
                    await console.publish(topic, command(topic, args), qos=1)
                    async for message in console.messages:
                        replies.append(json.loads(bytes(message.payload)))  # type: ignore[arg-type]
                        break
            await bus.wait_for(lambda: len(bus.payloads("/label")) == 2, 30, "the label records")
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    executed, unknown, malformed, accuracy, no_source = replies
    assert executed["outcome"] == "executed" and executed["old_value"] is None, executed
    assert executed["new_value"]["measurement_id"] == first["msg_id"]
    assert executed["new_value"]["label"] == "CS-CHECK daily constancy"
    assert unknown["outcome"] == "refused" and "no measurement 00000000" in unknown["error"]
    assert malformed["outcome"] == "malformed" and "32 lower-case hex digits" in malformed["error"]
    assert accuracy["outcome"] == "executed", accuracy
    assert no_source["outcome"] == "refused" and "no reference source 'NOPE' under [qc.sources]" in no_source["error"]
    label, accuracy_label = bus.payloads("/label")
    validate("measurement_label", accuracy_label)
    assert accuracy_label["reference_source"] == "CS-CHECK" and accuracy_label["measurement_id"] == second["msg_id"]
    validate("measurement_label", label)
    assert (label["measurement_id"], label["user"], label["msg_id"]) == (
        first["msg_id"],
        "alice",
        executed["new_value"]["record"],
    )
    assert label["measurement"]["activity_bq"] == first["activity_bq"]
    trail = [(r.action, r.new_value["outcome"]) for r in iter_records(tmp_path / "state" / "audit.jsonl")]
    assert trail == [
        ("measurement.label", "requested"),
        ("measurement.label", "executed"),
        ("measurement.label", "requested"),
        ("measurement.label", "refused"),
        ("measurement.label", "malformed"),
        ("measurement.label", "requested"),
        ("measurement.label", "executed"),
        ("measurement.label", "requested"),
        ("measurement.label", "refused"),
    ]

    readings = archived(tmp_path, "reading")
    measurements = archived(tmp_path, "measurement")
    verdicts = archived(tmp_path, "qc_result")
    assert archived(tmp_path, "measurement_label") == [label, accuracy_label]
    seen = insertions(readings)
    assert len(seen) >= 3
    # Exactly one measurement per insertion, from its first reading in to its first reading out.
    assert [(m["start_ns"], m["removal_ns"]) for m in measurements] == seen
    for measurement in measurements:
        validate("measurement", measurement)
        assert measurement["end"] == "removed" and measurement["nuclide"] == "Cs-137"
        assert measurement["n"] >= 10 and measurement["activity_bq"] == pytest.approx(CHECK_BQ, rel=0.01)
    # Each insertion of the check source on its own setting opened one daily check (no verdict per poll):
    # its background judged once, and without a baseline it ends incomplete asking for one. Constancy is
    # never judged against the certificate; the accuracy label is, once, against the same certified source.
    backgrounds = [v for v in verdicts if v["test"] == "background"]
    assert [v["inputs"]["measurement_id"] for v in backgrounds] == [m["msg_id"] for m in measurements]
    assert not [v for v in verdicts if v["test"] == "constancy"]
    ends = [p for p in archived(tmp_path, "qc_procedure") if p["status"] != "started"]
    assert [p["measurements"] for p in ends] == [[m["msg_id"]] for m in measurements]
    assert {p["status"] for p in ends} == {"incomplete"} and all("baseline" in p["detail"] for p in ends)
    [annual] = [v for v in verdicts if v["test"] == "accuracy"]
    assert (annual["verdict"], annual["inputs"]["measurement_id"]) == ("pass", second["msg_id"])
    assert len(verdicts) == len(measurements) + 1 and len(readings) > 10 * len(verdicts)
    assert all(m["procedure_id"] for m in measurements)
    assert bus.payloads("/measurement")[: len(measurements)] == measurements


async def test_a_source_left_in_the_chamber_is_measured_once(tmp_path: Path) -> None:
    simulator = Vik202Simulator(scripted_chamber(0.5, None))
    host = TcpHost(simulator)
    url = await host.start()
    config = lab_config(tmp_path, url, broker=None, dwell_s=0.5)
    service = ControllerService(config)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        deadline = time.monotonic() + 30
        while not ((tmp_path / "history.sqlite3").is_file() and archived(tmp_path, "measurement")):
            assert time.monotonic() < deadline, "no measurement"
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)  # four dwell times more with the source still in
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await host.stop()
    [measurement] = archived(tmp_path, "measurement")
    assert (measurement["end"], measurement["removal_ns"]) == ("dwell", None)
    validate("measurement", measurement)
    readings = archived(tmp_path, "reading")
    assert readings[-1]["activity_bq"] == pytest.approx(CHECK_BQ, rel=0.01)  # still in when the controller stopped
    assert sum(1 for r in readings if r["time_ns"] > measurement["settle_ns"] + S) > 20
