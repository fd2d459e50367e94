"""The real elution station driver under the service: one elution is stored once, across polls and restarts."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import jsonschema

from hotlab.controller.archive import HistoryArchive
from hotlab.controller.config import LabConfig, parse_config
from hotlab.controller.messages import elution_msg_id, iso_utc
from hotlab.controller.outbox import Outbox
from hotlab.controller.qc.stage import qc_stage_for
from hotlab.controller.service import ControllerService
from hotlab.drivers.records import ElutionRecord
from hotlab.drivers.station_registers import NS_PER_S, CommandCode
from hotlab.simulators.elution_station import (
    ElutionStationSimulator,
    StationClock,
    StationIdentity,
    StationModel,
)
from hotlab.simulators.generator_physics import GeneratorColumn, get_profile
from tests.fault_tally import tally

SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "controller" / "schemas" / "elution.json").read_text())


NOW_NS = time.time_ns()
CAL_NS, LAST_ELUTION_NS = NOW_NS - 30 * 86400 * NS_PER_S, NOW_NS - 86400 * NS_PER_S
CAL_BQ = 1.85e9


def station_model() -> StationModel:
    column = GeneratorColumn(
        get_profile("ge68"),
        generator_id="GE68-TEST-7",
        parent_cal_bq=CAL_BQ,
        cal_time_ns=CAL_NS,
        last_elution_ns=LAST_ELUTION_NS,
    )
    return StationModel(column, StationClock(acceleration=500.0), StationIdentity())


def service(config: LabConfig) -> ControllerService:
    """With the real QC engine as the commit stage, as `hotlab run` wires it."""
    return ControllerService(config, stage=qc_stage_for(config))


def config(tmp_path: Path, port: int, *, history: bool = False) -> LabConfig:
    return parse_config(
        {
            "site": {"name": "station-lab"},
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
            "service": {"state_dir": "state"},
            "history": {"enabled": history, "path": "history.sqlite3"},
            "qc": {
                "generators": {
                    "GE68-TEST-7": {
                        "parent": "Ge-68",
                        "activity": f"{CAL_BQ} Bq",
                        "calibration_time": iso_utc(CAL_NS),
                        "last_elution": iso_utc(LAST_ELUTION_NS),
                    }
                }
            },
        },
        base_dir=tmp_path,
    )


def as_delivered(model: StationModel, elution: dict[str, Any]) -> ElutionRecord:
    """The ElutionRecord the driver delivered for this stored elution of the simulated station (its identity)."""
    return ElutionRecord(
        "elution-1",
        "GE68-TEST-7",
        "Ge-68",
        "Ga-68",
        model.elution_counter,
        elution["activity_bq"],
        elution["volume_ml"],
        elution["start_ns"],
        elution["end_ns"],
        station_serial="SIM-0001",
        counter_epoch_ns=model.counter_epoch_ns,
    )


def stored(tmp_path: Path) -> list[dict[str, Any]]:
    outbox = Outbox(tmp_path / "outbox.sqlite3", ["mqtt"])
    try:
        # The simulated station's clock runs fast (accelerated time), so its clock alarm is raised: not the point here.
        return [
            s.message.payload
            for s in outbox.pending("mqtt", limit=10_000)
            if s.message.kind != "device_status" and s.message.payload.get("alarm") != "clock_offset"
        ]
    finally:
        outbox.close()


def elution_rows(tmp_path: Path) -> int:
    """Elutions committed so far, read beside the running service (WAL allows a concurrent reader)."""
    try:
        with sqlite3.connect(tmp_path / "outbox.sqlite3") as db:
            return int(db.execute("SELECT COUNT(*) FROM message WHERE kind = 'elution'").fetchone()[0])
    except sqlite3.OperationalError:  # not created yet
        return 0


async def run_for(service: ControllerService, until: object, settle_s: float) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    deadline = time.monotonic() + 20
    while not until():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)
    await asyncio.sleep(settle_s)  # more polls of the same station state: they must not add anything
    stop.set()
    await asyncio.wait_for(task, 20)


async def test_an_elution_is_stored_exactly_once_across_polls_and_restarts(tmp_path: Path) -> None:
    model = station_model()
    simulator = ElutionStationSimulator(model)
    _host, port = await simulator.start_tcp("127.0.0.1", 0)
    try:
        first = service(config(tmp_path, port))
        model.execute(CommandCode.START, 5.0)
        await run_for(first, lambda: elution_rows(tmp_path) >= 1, settle_s=0.5)
        second = service(config(tmp_path, port))
        await run_for(second, lambda: second.supervisors and second.supervisors["gen-1"].up, settle_s=0.5)
    finally:
        await simulator.stop()

    messages = stored(tmp_path)
    elutions = [m for m in messages if m["schema"] == "hotlab.elution/1"]
    assert len(elutions) == 1, elutions
    elution = elutions[0]
    jsonschema.validate(elution, SCHEMA)
    assert elution["msg_id"] == elution_msg_id(as_delivered(model, elution))
    assert (elution["station_serial"], elution["counter_epoch_ns"], elution["counter_reset"]) == (
        "SIM-0001",
        model.counter_epoch_ns,
        None,
    )
    assert elution["generator"] == "GE68-TEST-7" and elution["parent"] == "Ge-68" and elution["nuclide"] == "Ga-68"
    assert elution["volume_ml"] == 5.0 and elution["activity_bq"] > 0
    # The QC engine judged it in the same commit: the elution carries its yield, the verdict follows it.
    assert messages[0] is elution
    verdict = next(m for m in messages if m["schema"] == "hotlab.qc_result/1")
    assert verdict["test"] == "elution_yield" and verdict["time_ns"] == elution["time_ns"]
    assert verdict["inputs"]["generator"] == "GE68-TEST-7" and verdict["verdict"] in ("pass", "warn", "fail")
    assert elution["yield_pct"] is not None and 50.0 < elution["yield_pct"] < 100.0


async def test_every_elution_is_archived_when_the_station_restarts_between_two_controller_runs(
    tmp_path: Path,
) -> None:
    """Two controller runs on one state directory, the station power-cycled in between (its counter at 0)."""
    model = station_model()
    simulator = ElutionStationSimulator(model)
    _host, port = await simulator.start_tcp("127.0.0.1", 0)
    try:
        first = service(config(tmp_path, port, history=True))
        model.execute(CommandCode.START, 5.0)
        await run_for(first, lambda: elution_rows(tmp_path) >= 1, settle_s=0.5)
        simulator.power_cycle()
        model.execute(CommandCode.START, 5.0)
        second = service(config(tmp_path, port, history=True))
        await run_for(second, lambda: elution_rows(tmp_path) >= 2, settle_s=0.5)
    finally:
        await simulator.stop()

    executed = model.column.elution_count
    assert executed == 2 and model.elution_counter == 1
    stored_ends = [m["end_ns"] for m in stored(tmp_path) if m["schema"] == "hotlab.elution/1"]
    assert len(stored_ends) == executed == len(set(stored_ends))
    with HistoryArchive(tmp_path / "history.sqlite3", read_only=True) as archive:
        archived = archive.query("elution", site="station-lab")
    assert sorted(e["end_ns"] for e in archived) == sorted(stored_ends)
    # Both are QC-judged: the second is the first of a new count, not a re-delivery of the first.
    assert all(e["yield_pct"] is not None for e in archived)
    before, after = sorted(archived, key=lambda e: e["end_ns"])
    assert after["msg_id"] == elution_msg_id(as_delivered(model, after))
    assert before["counter"] == after["counter"] == 1 and before["msg_id"] != after["msg_id"]
    assert before["counter_reset"] is None and after["counter_reset"] is not None
    assert after["counter_epoch_ns"] == model.counter_epoch_ns != before["counter_epoch_ns"]
    # ...and the station's retained alarm says what happened, committed with that elution.
    alarms = [m for m in stored(tmp_path) if m.get("alarm") == "elution_counter_reset"]
    # (The first elution after a start clears it: the controller cannot know it is not raised.)
    assert [(a["active"], a["elution_id"]) for a in alarms] == [(False, before["msg_id"]), (True, after["msg_id"])]
    assert alarms[-1]["reason"] == after["counter_reset"] and "counter epoch changed" in alarms[-1]["reason"]
    tally(
        "elutions across a station restart and a controller restart",
        executed=executed,
        archived=len(archived),
        counter_resets_alarmed=sum(a["active"] for a in alarms),
    )
