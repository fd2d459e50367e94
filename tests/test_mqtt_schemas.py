"""The JSON Schemas in controller/schemas describe exactly what the builders in controller/messages.py emit."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from hotlab.controller.messages import (
    MeasurementValues,
    audit_anchor_message,
    device_status_message,
    elution_message,
    measurement_label_message,
    measurement_message,
    qc_message,
    reading_message,
    suspect_alarm_message,
)
from hotlab.controller.sinks.mqtt import controller_status_payload
from hotlab.drivers.records import ElutionRecord, Reading

SCHEMAS = Path(__file__).resolve().parent.parent / "controller" / "schemas"


def validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{kind}.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def examples() -> dict[str, dict[str, Any]]:
    now = time.time_ns()
    reading = Reading("cal-1", "Tc-99m", 7.4e8, 20.0, "mCi", now, b"Tc99m 20.00 mCi\r\n", {"factor": 236.0})
    flipped = Reading(
        "cal-1", "Tc-99m", 7.4e19, 7.4e19, "Bq", now, b">7.4000E+19\r\n", quality="suspect", quality_reason="range"
    )
    record = ElutionRecord("elution-1", "GE68-001", "Ge-68", "Ga-68", 12, 1.1e9, 5.0, now - 60 * 10**9, now)
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
        "qc_result": qc_message(
            "lab",
            "hotcell-1",
            "cal-1",
            test="constancy",
            verdict="warn",
            measured=1.06,
            expected=1.0,
            deviation_pct=6.0,
            limit="warn 5 %, fail 10 %",
            limit_source="AAPM TG-181",
            inputs={"reference_bq": 1.0},
        ).payload,
        "device_status": device_status_message("lab", "hotcell-1", "cal-1", up=True, latency_ms=12.5, errors=0).payload,
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
    "qc_result": "qc_result",
    "device_status": "device_status",
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
        ("qc_result", lambda p: p.update(verdict="ok")),
        ("device_status", lambda p: p.update(surprise=1)),
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
