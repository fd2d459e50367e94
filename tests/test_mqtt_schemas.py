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
    audit_anchor_message,
    device_status_message,
    elution_message,
    qc_message,
    reading_message,
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
    record = ElutionRecord("elution-1", "GE68-001", "Ge-68", "Ga-68", 12, 1.1e9, 5.0, now - 60 * 10**9, now)
    return {
        "reading": reading_message("lab", "hotcell-1", reading).payload,
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


@pytest.mark.parametrize(
    "kind", ["reading", "elution", "qc_result", "device_status", "controller_status", "audit_anchor"]
)
def test_builders_match_their_schema(kind: str) -> None:
    validator(kind).validate(examples()[kind])


def test_last_will_has_no_time_but_is_valid() -> None:
    validator("controller_status").validate(controller_status_payload("lab", "ctl", "offline", "last will"))


@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        ("reading", lambda p: p.pop("msg_id")),
        ("reading", lambda p: p.update(activity_bq="740 MBq")),
        ("reading", lambda p: p.update(schema="hotlab.reading/2")),
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
        validator(kind).validate(payload)
