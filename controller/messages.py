"""The schema-versioned messages that leave the controller, one builder per kind.

A message is built once, committed to the outbox, and then rendered by each sink:
MQTT publishes `payload` as JSON on `topic`; InfluxDB turns the same payload into a point
(measurement = kind). Keeping one envelope for both sinks is what lets a restart resend
exactly what was read, and lets a consumer de-duplicate on `msg_id`.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from hotlab.drivers.records import ElutionRecord, Reading

Kind = Literal["reading", "elution", "qc_result", "device_status", "audit_anchor"]
SCHEMA_VERSION = 1
TOPIC_ROOT = "hotlab"


@dataclass(frozen=True, slots=True)
class Message:
    kind: Kind
    topic: str
    payload: dict[str, Any]

    @property
    def msg_id(self) -> str:
        return str(self.payload["msg_id"])


def iso_utc(time_ns: int) -> str:
    """RFC 3339 UTC with microseconds, for people and JSON consumers; `time_ns` stays authoritative.

    Every message carries one, so the date part is formatted once per second (cached) and
    the microseconds are cut from the integer, not rounded through a float.
    """
    seconds, nanoseconds = divmod(time_ns, 1_000_000_000)
    return f"{_utc_second(seconds)}.{nanoseconds // 1000:06d}Z"


@functools.lru_cache(maxsize=256)
def _utc_second(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).replace(tzinfo=None).isoformat(timespec="seconds")


#: Namespace for name-based (uuid5) message ids. Fixed forever: changing it would give replayed
#: events new ids and defeat de-duplication against what is already archived.
MSG_ID_NAMESPACE = uuid.UUID("6207ae0a-4f7b-503f-bbb3-b13cde316529")


def elution_msg_id(station: str, generator_id: str, counter: int) -> str:
    """The msg_id of one elution, the same every time it is built.

    The station driver hands an elution over again until the controller confirms delivery, so
    a crash between outbox commit and confirmation replays it; with a name-based id the replay
    is the same message (the history archive drops a known msg_id, InfluxDB overwrites the same
    series and timestamp). The name is JSON so no separator inside a name can collide.
    """
    name = json.dumps(["elution", station, generator_id, int(counter)])
    return uuid.uuid5(MSG_ID_NAMESPACE, name).hex


def _envelope(kind: Kind, time_ns: int, msg_id: str | None = None) -> dict[str, Any]:
    return {
        "schema": f"hotlab.{kind}/{SCHEMA_VERSION}",
        "msg_id": msg_id if msg_id is not None else uuid.uuid4().hex,
        "time_ns": int(time_ns),
        "time": iso_utc(time_ns),
    }


def device_topic(site: str, station: str, device: str, leaf: str) -> str:
    return f"{TOPIC_ROOT}/{site}/{station}/{device}/{leaf}"


def controller_topic(site: str, leaf: str) -> str:
    """hotlab/<site>/controller/<leaf>: the controller's own status, alarms and audit anchor."""
    return f"{TOPIC_ROOT}/{site}/controller/{leaf}"


def reading_message(site: str, station: str, reading: Reading) -> Message:
    payload = _envelope("reading", reading.timestamp_ns) | {
        "site": site,
        "station": station,
        "device": reading.device,
        "nuclide": reading.nuclide,
        "activity_bq": float(reading.activity_bq),
        "raw_value": float(reading.raw_value),
        "unit": reading.unit,
        "raw_frame": reading.raw_frame.decode("latin-1"),
    }
    if reading.extra:
        payload["extra"] = dict(reading.extra)
    return Message("reading", device_topic(site, station, reading.device, "reading"), payload)


def elution_message(
    site: str,
    record: ElutionRecord,
    *,
    yield_pct: float | None = None,
    breakthrough_pct: float | None = None,
    msg_id: str | None = None,
) -> Message:
    """An elution; pass `msg_id=elution_msg_id(...)` so a replayed elution is recognisably the same.

    Without an explicit `breakthrough_pct`, it comes from the station's own eluate measurement:
    parent activity / daughter activity in the eluate, in percent. Both refer to the same instant,
    the end of elution (docs/elution-station-registers.md), so no decay correction applies.
    """
    if breakthrough_pct is None and record.parent_bq is not None and record.activity_bq > 0:
        breakthrough_pct = record.parent_bq / record.activity_bq * 100.0
    payload = _envelope("elution", record.end_ns, msg_id) | {
        "site": site,
        "station": record.station,
        "generator": record.generator_id,
        "parent": record.parent_nuclide,
        "nuclide": record.daughter_nuclide,
        "counter": int(record.counter),
        "activity_bq": float(record.activity_bq),
        "volume_ml": float(record.volume_ml),
        "start_ns": int(record.start_ns),
        "end_ns": int(record.end_ns),
        "duration_s": float(record.duration_s),
        "yield_pct": None if yield_pct is None else float(yield_pct),
        "breakthrough_pct": None if breakthrough_pct is None else float(breakthrough_pct),
    }
    return Message("elution", f"{TOPIC_ROOT}/{site}/{record.station}/elution", payload)


def qc_message(
    site: str,
    station: str,
    device: str,
    *,
    test: str,
    verdict: str,
    measured: float,
    expected: float,
    deviation_pct: float,
    limit: str,
    limit_source: str,
    inputs: dict[str, Any],
    time_ns: int | None = None,
) -> Message:
    """A QC verdict; `inputs` holds everything needed to recompute it later."""
    payload = _envelope("qc_result", time_ns if time_ns is not None else time.time_ns()) | {
        "site": site,
        "station": station,
        "device": device,
        "test": test,
        "verdict": verdict,
        "measured": float(measured),
        "expected": float(expected),
        "deviation_pct": float(deviation_pct),
        "limit": limit,
        "limit_source": limit_source,
        "inputs": inputs,
    }
    return Message("qc_result", device_topic(site, station, device, "qc"), payload)


def device_status_message(
    site: str,
    station: str,
    device: str,
    *,
    up: bool,
    latency_ms: float | None,
    errors: int,
    detail: str = "",
    time_ns: int | None = None,
) -> Message:
    payload = _envelope("device_status", time_ns if time_ns is not None else time.time_ns()) | {
        "site": site,
        "station": station,
        "device": device,
        "up": bool(up),
        "latency_ms": None if latency_ms is None else float(latency_ms),
        "errors": int(errors),
        "detail": detail,
    }
    return Message("device_status", device_topic(site, station, device, "status"), payload)


def audit_anchor_message(site: str, *, trail: str, trail_id: str, seq: int, hash_hex: str, time_ns: int) -> Message:
    """The head of the audit trail after an append: record `seq` of the trail `trail_id` exists and has `hash_hex`.

    `trail_id` is the hash of the trail's first record (its identity wherever a copy of it lies),
    `trail` the path the controller writes it to, `time_ns` the head record's own time. The
    msg_id is name-based, so an anchor replayed from the outbox is recognisably the same message.
    controller/audit_anchor.py says why anchors exist; `hotlab audit verify` reads them back.
    """
    name = json.dumps(["audit_anchor", trail_id, int(seq), hash_hex])
    payload = _envelope("audit_anchor", time_ns, uuid.uuid5(MSG_ID_NAMESPACE, name).hex) | {
        "site": site,
        "trail": trail,
        "trail_id": trail_id,
        "seq": int(seq),
        "hash": hash_hex,
    }
    return Message("audit_anchor", controller_topic(site, "audit"), payload)
