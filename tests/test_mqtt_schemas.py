"""The JSON Schemas in controller/schemas describe exactly what the builders emit, and the suite checks it.

The examples here cover each kind and each branch of a schema; tests/schema_check.py checks every
message any other test commits, archives or publishes, and the last tests here show that it does.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from hotlab.controller.archive import HistoryArchive
from hotlab.controller.messages import (
    ClockStatus,
    MeasurementValues,
    Message,
    audit_anchor_message,
    clock_offset_alarm_message,
    counter_reset_alarm_message,
    device_status_message,
    elution_message,
    measurement_label_message,
    measurement_message,
    reading_message,
    suspect_alarm_message,
)
from hotlab.controller.outbox import Outbox
from hotlab.controller.qc.generator_rules import ge68_breakthrough
from hotlab.controller.qc.limits import load_limits
from hotlab.controller.qc.result import judged
from hotlab.controller.qc.schedule import ItemStatus
from hotlab.controller.qc.schedule_stage import qc_status_message
from hotlab.controller.sinks import mqtt
from hotlab.controller.sinks.mqtt import controller_status_payload
from hotlab.drivers.records import ElutionRecord, Reading
from tests.schema_check import LOG, MessageLog, malformed_on_purpose, report, validator_for


def validator(kind: str) -> jsonschema.Draft202012Validator:
    found = validator_for(kind)
    assert found is not None, f"controller/schemas/{kind}.json is missing"
    return found


def examples() -> dict[str, dict[str, Any]]:
    now = time.time_ns()
    reading = Reading("cal-1", "Tc-99m", 7.4e8, 20.0, "mCi", now, b"Tc99m 20.00 mCi\r\n", {"factor": 236.0})
    flipped = Reading(
        "cal-1", "Tc-99m", 7.4e19, 7.4e19, "Bq", now, b">7.4000E+19\r\n", quality="suspect", quality_reason="range"
    )
    record = ElutionRecord("elution-1", "GE68-001", "Ge-68", "Ga-68", 12, 1.1e9, 5.0, now - 60 * 10**9, now)
    reset = ElutionRecord(
        "elution-1",
        "GE68-001",
        "Ge-68",
        "Ga-68",
        1,
        1.1e9,
        5.0,
        now - 60 * 10**9,
        now,
        station_serial="SN-4711",
        counter_epoch_ns=now - 3600 * 10**9,
        counter_reset="counter epoch changed; counter 12 -> 1",
    )
    measurement = measurement_message(
        "lab",
        "hotcell-1",
        MeasurementValues(
            "cal-1", "Tc-99m", 7.4e8, 1.1e6, 5, 1.2e3, now - 9 * 10**9, now - 5 * 10**9, now, "removed", ("a" * 32,) * 5
        ),
    ).payload
    return {
        "reading": reading_message("lab", "hotcell-1", reading).payload,
        "suspect_reading": reading_message("lab", "hotcell-1", flipped).payload,
        "measurement": measurement,
        "measurement_label": measurement_label_message(
            "lab",
            "hotcell-1",
            "cal-1",
            measurement=measurement,
            label="patient dose 2026-0412",
            user="alice",
            request_id="req-1",
            time_ns=now,
        ).payload,
        "dosage_label": measurement_label_message(
            "lab",
            "hotcell-1",
            "cal-1",
            measurement=measurement,
            label="patient dose 2026-0412",
            user="alice",
            request_id="req-2",
            time_ns=now,
            prescribed_bq=3.7e8,
            administration_ns=now + 3600 * 10**9,
        ).payload,
        "suspect_alarm": suspect_alarm_message(
            "lab",
            "hotcell-1",
            "cal-1",
            active=True,
            recent_suspect=12,
            window=50,
            threshold=0.1,
            total=40,
            reason="7.4e+07 TBq is outside the vik202 range",
            time_ns=now,
        ).payload,
        "calibrator_status": device_status_message(
            "lab", "hotcell-1", "cal-1", up=True, latency_ms=3.0, errors=0, suspect_readings=4, suspect_fraction=0.08
        ).payload,
        "elution": elution_message("lab", record, yield_pct=62.5).payload,
        "reset_elution": elution_message("lab", reset, yield_pct=62.5).payload,
        "counter_reset_alarm": counter_reset_alarm_message("lab", "gen-1", reset, elution_id="e" * 32).payload,
        "counter_alarm_cleared": counter_reset_alarm_message("lab", "gen-1", record, elution_id="f" * 32).payload,
        # A verdict as the QC engine commits it (QcResult.to_message adds alarm, unit, limit values).
        "qc_result": ge68_breakthrough(
            1.1e9, now - 72 * 3600 * 10**9, 10.0, now, load_limits()["ge68_breakthrough"], background_bq=[0.5, 0.7]
        )
        .to_message("lab", "hotcell-1", "cal-1")
        .payload,
        # A range limit: low and high instead of warn and fail.
        "range_qc_result": judged(
            "ga68_half_life",
            load_limits()["ga68_half_life"],
            measured=67.7,
            expected=67.83,
            unit="min",
            time_ns=now,
            inputs={"series": [[now, 1.0e9]]},
            value=67.7,
            detail="half-life 67.7 min",
        )
        .to_message("lab", "elution-1", "GE68-001")
        .payload,
        "device_status": device_status_message("lab", "hotcell-1", "cal-1", up=True, latency_ms=12.5, errors=0).payload,
        "station_status": device_status_message(
            "lab",
            "elution-1",
            "gen-1",
            up=True,
            latency_ms=4.0,
            errors=0,
            station_state="idle",
            clock=ClockStatus(90.0005, 0.0025, 10.0, True),
        ).payload,
        "clock_alarm": clock_offset_alarm_message(
            "lab", "elution-1", "gen-1", ClockStatus(90.0005, 0.0025, 10.0, True), measured_ns=now, time_ns=now
        ).payload,
        "clock_alarm_cleared": clock_offset_alarm_message(
            "lab", "elution-1", "gen-1", ClockStatus(-0.2, 0.0025, 10.0, False), measured_ns=now, time_ns=now
        ).payload,
        "qc_status": qc_status_message(
            "lab",
            ItemStatus(
                "GE68-001",
                "elution-1",
                "ge68_breakthrough/" + "e" * 32,
                "ge68_breakthrough",
                "overdue",
                now - 3600 * 10**9,
                now,
                None,
                None,
                None,
                "e" * 32,
                "Ge-68 follow-up of elution " + "e" * 32,
            ),
            now,
        ).payload,
        "marked_measurement": measurement | {"qc_state": "overdue", "procedure_id": None},
        "marked_reading": reading_message("lab", "hotcell-1", reading).payload | {"qc_state": "failed"},
        "controller_status": controller_status_payload("lab", "ctl", "online", "connected", now, pid=1),
        "audit_anchor": audit_anchor_message(
            "lab",
            trail="/var/lib/hotlab/audit.jsonl",
            trail_id=hashlib.sha256(b"first record").hexdigest(),
            seq=42,
            hash_hex=hashlib.sha256(b"record 42").hexdigest(),
            time_ns=now,
        ).payload,
    }


#: Example name -> the schema it must match.
SCHEMA_OF = {
    "reading": "reading",
    "suspect_reading": "reading",
    "measurement": "measurement",
    "measurement_label": "measurement_label",
    "dosage_label": "measurement_label",
    "elution": "elution",
    "reset_elution": "elution",
    "counter_reset_alarm": "controller_alarm",
    "counter_alarm_cleared": "controller_alarm",
    "qc_result": "qc_result",
    "range_qc_result": "qc_result",
    "device_status": "device_status",
    "station_status": "device_status",
    "clock_alarm": "controller_alarm",
    "clock_alarm_cleared": "controller_alarm",
    "qc_status": "qc_status",
    "marked_measurement": "measurement",
    "marked_reading": "reading",
    "calibrator_status": "device_status",
    "controller_status": "controller_status",
    "suspect_alarm": "controller_alarm",
    "audit_anchor": "audit_anchor",
}


@pytest.mark.parametrize("example", sorted(SCHEMA_OF))
def test_builders_match_their_schema(example: str) -> None:
    validator(SCHEMA_OF[example]).validate(examples()[example])


def test_the_outbox_alarm_payload_matches_the_controller_alarm_schema() -> None:
    """The other controller_alarm (published directly by the service, controller/service.py)."""
    now = time.time_ns()
    payload = {
        "schema": "hotlab.controller_alarm/1",
        "site": "lab",
        "alarm": "outbox_usage",
        "active": True,
        "commit_failing": False,
        "commit_error": None,
        "unavailable_events": 0,
        "fraction": 0.85,
        "warn_fraction": 0.8,
        "payload_bytes": 850,
        "max_bytes": 1000,
        "pending_messages": 12,
        "full_events": 0,
        "time_ns": now,
        "time": "2026-12-04T12:00:00.000000Z",
    }
    validator("controller_alarm").validate(payload)


def test_last_will_has_no_time_but_is_valid() -> None:
    validator("controller_status").validate(controller_status_payload("lab", "ctl", "offline", "last will"))


@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        ("reading", lambda p: p.pop("msg_id")),
        ("reading", lambda p: p.update(activity_bq="740 MBq")),
        ("reading", lambda p: p.update(schema="hotlab.reading/2")),
        ("reading", lambda p: p.pop("quality")),
        ("reading", lambda p: p.update(time="2026-13-04T12:00:00.000000Z")),
        ("reading", lambda p: p.update(quality_reason="a good reading has no reason")),
        ("suspect_reading", lambda p: p.pop("quality_reason")),
        ("suspect_reading", lambda p: p.update(quality="bad")),
        ("measurement", lambda p: p.update(n=1)),
        ("measurement", lambda p: p.update(end="gone")),
        ("measurement", lambda p: p.pop("removal_ns")),
        ("measurement_label", lambda p: p.update(measurement_id="not-an-id")),
        ("measurement_label", lambda p: p.update(label="")),
        ("dosage_label", lambda p: p.pop("administration_ns")),
        ("dosage_label", lambda p: p.update(reference_source="CS-1")),
        ("suspect_alarm", lambda p: p.pop("device")),
        ("suspect_alarm", lambda p: p.update(fraction=1.5)),
        ("calibrator_status", lambda p: p.pop("suspect_fraction")),
        ("elution", lambda p: p.update(counter=-1)),
        ("elution", lambda p: p.pop("counter_reset")),
        ("elution", lambda p: p.pop("clock")),
        ("elution", lambda p: p["clock"].update(end_ns="controller")),  # an elution's times are the station's
        ("elution", lambda p: p["clock"].pop("start_ns")),
        ("counter_reset_alarm", lambda p: p.update(clock={"time_ns": "controller", "counter_epoch_ns": "controller"})),
        ("station_status", lambda p: p.pop("clock_uncertainty_s")),  # the offset without its bound
        ("station_status", lambda p: p.update(clock_uncertainty_s=-0.001)),
        ("station_status", lambda p: p.update(max_clock_offset_s=0)),
        ("clock_alarm", lambda p: p.pop("measured_ns")),
        ("clock_alarm", lambda p: p.update(reason="clock off")),
        ("reset_elution", lambda p: p.update(counter_epoch_ns="yesterday")),
        ("reset_elution", lambda p: p.update(station_serial=4711)),
        ("qc_result", lambda p: p.update(verdict="ok")),
        ("qc_result", lambda p: p.pop("alarm")),
        ("qc_result", lambda p: p.update(alarm=not p["alarm"])),
        ("qc_result", lambda p: p.update(unit="mCi")),
        ("qc_result", lambda p: p.update(value_judged="6 %")),
        ("qc_result", lambda p: p.pop("detail")),
        ("qc_result", lambda p: p["limit_values"].update(kind="abs_pct")),
        ("qc_result", lambda p: p["limit_values"].pop("fail")),
        ("qc_result", lambda p: p["limit_values"].update(low=1.0)),
        ("range_qc_result", lambda p: p.update(alarm=not p["alarm"])),
        ("range_qc_result", lambda p: p["limit_values"].update(warn=70.0)),
        ("range_qc_result", lambda p: p["limit_values"].pop("high")),
        ("counter_reset_alarm", lambda p: p.update(reason=None)),
        ("counter_reset_alarm", lambda p: p.pop("elution_id")),
        ("counter_alarm_cleared", lambda p: p.update(reason="counter 12 -> 1")),
        ("device_status", lambda p: p.update(surprise=1)),
        ("qc_status", lambda p: p.update(alarm=False)),
        ("qc_status", lambda p: p.update(state="late")),
        ("qc_status", lambda p: p.update(item="ge68_breakthrough/elution-7")),
        ("marked_reading", lambda p: p.update(qc_state="done")),
        ("marked_measurement", lambda p: p.update(procedure_id="P-1")),
        ("controller_status", lambda p: p.update(state="sleeping")),
        ("audit_anchor", lambda p: p.update(seq=0)),
        ("audit_anchor", lambda p: p.update(hash="abc")),
        ("audit_anchor", lambda p: p.pop("trail_id")),
    ],
)
def test_schemas_reject_wrong_payloads(kind: str, mutate: Any) -> None:
    payload = examples()[kind]
    mutate(payload)
    with pytest.raises(jsonschema.ValidationError):
        validator(SCHEMA_OF[kind]).validate(payload)


def test_the_suite_checks_what_a_test_commits_and_publishes(tmp_path: Path) -> None:
    valid = examples()["qc_result"]
    topic = "hotlab/lab/hotcell-1/cal-1/qc"
    outbox = Outbox(tmp_path / "outbox.sqlite3", sinks=("mqtt",))
    unknown = Message("mystery", "hotlab/lab/x", {"msg_id": "m"})  # type: ignore[arg-type]
    outbox.put_many(iter([Message("qc_result", topic, valid), Message("qc_result", topic, valid | {"x": 1}), unknown]))
    outbox.close()
    mqtt._encode({"state": "online"})
    extra, no_schema, untagged = LOG.violations()  # taken: this test does not fail for them
    assert (extra.kind, extra.where, extra.path, extra.msg_id) == ("qc_result", "outbox", "$", valid["msg_id"])
    assert "('x' was unexpected)" in extra.error
    assert (no_schema.kind, no_schema.error) == ("mystery", "no schema schemas/mystery.json for this kind")
    assert (untagged.kind, untagged.where, untagged.path) == ("?", "MQTT", "$.schema")


def test_the_suite_checks_what_another_process_archived_where_a_test_reads_it(tmp_path: Path) -> None:
    anchor = Message("audit_anchor", "hotlab/lab/controller/audit", examples()["audit_anchor"] | {"seq": 0})
    with HistoryArchive(tmp_path / "history.sqlite3") as archive:
        HistoryArchive.add_many.__wrapped__(archive, [anchor])  # type: ignore[attr-defined]  # as `hotlab run` would
        archive.query("audit_anchor")
    [read] = LOG.violations()
    assert (read.kind, read.where, read.path) == ("audit_anchor", "archive read", "$.seq")
    assert read.error == "0 is less than the minimum of 1"


def test_what_this_process_archived_is_checked_once_when_written(tmp_path: Path) -> None:
    anchor = Message("audit_anchor", "hotlab/lab/controller/audit", examples()["audit_anchor"] | {"seq": 0})
    with HistoryArchive(tmp_path / "history.sqlite3") as archive:
        archive.add_many([anchor])
        archive.query("audit_anchor")
    assert [v.where for v in LOG.violations()] == ["archive"]


def test_a_message_malformed_on_purpose_passes_and_a_valid_one_cannot_be_marked(tmp_path: Path) -> None:
    topic = "hotlab/lab/hotcell-1/cal-1/status"
    status = examples()["device_status"]
    outbox = Outbox(tmp_path / "outbox.sqlite3", sinks=("mqtt",))
    outbox.put(malformed_on_purpose(Message("device_status", topic, status | {"errors": -1})))
    outbox.put(Message("device_status", topic, status | {"errors": -2}))
    outbox.close()
    [other] = LOG.violations()
    assert other.error == "-2 is less than the minimum of 0"
    with pytest.raises(AssertionError, match="matches its schema"):
        malformed_on_purpose(Message("device_status", topic, status))


def test_the_report_names_each_problem_once_with_its_count() -> None:
    log = MessageLog()
    broken = [examples()["device_status"] | {"errors": -1} for _ in range(3)]
    log.add(("device_status", "outbox", json.dumps(payload)) for payload in broken)
    log.add([("reading", "archive", json.dumps(examples()["reading"] | {"unit": 1}))])
    lines = report(log.violations()).splitlines()
    assert lines[0] == "4 message(s) do not match their schema (schemas/<kind>.json):"
    assert lines[1].startswith("  device_status at $.errors: -1 is less than the minimum of 0  [outbox; 3 message(s)")
    assert lines[2].startswith("  reading at $.unit: 1 is not of type 'string'  [archive; 1 message(s)")
