"""The schema-versioned messages that leave the controller, one builder per kind.

A message is built once, committed to the outbox, and then rendered by each sink:
MQTT publishes `payload` as JSON on `topic`; InfluxDB turns the same payload into a point
(measurement = kind). Keeping one envelope for both sinks is what lets a restart resend
exactly what was read, and lets a consumer de-duplicate on `msg_id`.
"""

from __future__ import annotations

import functools
import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from hotlab.drivers.records import ElutionRecord, Reading
from hotlab.drivers.station_registers import StationState
from hotlab.physics.utc_time import NS_PER_S, format_utc_ns

Kind = Literal[
    "reading",
    "measurement",
    "measurement_label",
    "elution",
    "qc_result",
    "device_status",
    "controller_alarm",
    "audit_anchor",
    "qc_baseline",
    "qc_procedure",
    "qc_status",
    "archive_retention",
]
SCHEMA_VERSION = 1
#: An elution station's states as device_status names them (drivers/station_registers.py StationState).
STATION_STATES = tuple(state.name.lower() for state in StationState)
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
    seconds, nanoseconds = divmod(time_ns, NS_PER_S)
    return f"{_utc_second(seconds)}.{nanoseconds // 1000:06d}Z"


@functools.lru_cache(maxsize=256)
def _utc_second(seconds: int) -> str:
    return format_utc_ns(seconds * NS_PER_S).removesuffix("Z")


#: Namespace for name-based (uuid5) message ids. Fixed forever: changing it would give replayed
#: events new ids and defeat de-duplication against what is already archived.
MSG_ID_NAMESPACE = uuid.UUID("6207ae0a-4f7b-503f-bbb3-b13cde316529")


def elution_msg_id(record: ElutionRecord) -> str:
    """The msg_id of one elution, the same every time it is built.

    The station driver hands an elution over again until the controller confirms delivery, so
    a crash between outbox commit and confirmation replays it; with a name-based id the replay
    is the same message (the history archive drops a known msg_id, InfluxDB overwrites the same
    series and timestamp). The name is the elution's whole identity (drivers/records.py): a count
    that starts again (a restarted, serviced or replaced station) repeats counters, and the
    elution after it must not take the id of an earlier one, or the archive and every consumer
    would drop it as a repeat. The name is JSON so no separator inside a name can collide.
    """
    name = json.dumps(
        [
            "elution",
            record.station,
            record.generator_id,
            record.station_serial,
            record.counter_epoch_ns,
            int(record.counter),
            int(record.end_ns),
        ]
    )
    return uuid.uuid5(MSG_ID_NAMESPACE, name).hex


def envelope(kind: Kind, time_ns: int, msg_id: str | None = None) -> dict[str, Any]:
    """The keys every message starts with: schema, msg_id (random unless given), time_ns and time."""
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
    """A reading as read, with its quality; `quality_reason` only when it is suspect (controller/checked_source.py)."""
    payload = envelope("reading", reading.timestamp_ns) | {
        "site": site,
        "station": station,
        "device": reading.device,
        "nuclide": reading.nuclide,
        "activity_bq": float(reading.activity_bq),
        "raw_value": float(reading.raw_value),
        "unit": reading.unit,
        "raw_frame": reading.raw_frame.decode("latin-1"),
        "quality": reading.quality,
    }
    if reading.quality == "suspect":
        payload["quality_reason"] = reading.quality_reason or "no reason recorded"
    if reading.extra:
        payload["extra"] = dict(reading.extra)
    return Message("reading", device_topic(site, station, reading.device, "reading"), payload)


def measurement_msg_id(site: str, device: str, start_ns: int) -> str:
    """The msg_id of the measurement of `device` that started at `start_ns`, the same every time it is built.

    The measurement detector (controller/measurements.py) rebuilds its state after a restart by
    replaying committed readings; a measurement it finds again there is the same message.
    """
    return uuid.uuid5(MSG_ID_NAMESPACE, json.dumps(["measurement", site, device, int(start_ns)])).hex


@dataclass(frozen=True, slots=True)
class MeasurementValues:
    """What the measurement detector found for one source in one calibrator (times in UTC epoch ns)."""

    device: str
    nuclide: str | None
    activity_bq: float
    sd_bq: float
    n: int
    background_bq: float
    start_ns: int
    settle_ns: int
    removal_ns: int | None
    end: Literal["removed", "dwell", "changed", "setting_changed"]
    reading_ids: tuple[str, ...]
    #: The empty-chamber readings `background_bq` is the mean of: their spread sets a detectable level.
    background_readings: tuple[float, ...] = ()


def measurement_message(site: str, station: str, values: MeasurementValues) -> Message:
    """A settled measurement; `time_ns` is the settle time, to which `activity_bq` is decay-corrected."""

    def moment(time_ns: int | None) -> str | None:
        return None if time_ns is None else iso_utc(time_ns)

    msg_id = measurement_msg_id(site, values.device, values.start_ns)
    payload = envelope("measurement", values.settle_ns, msg_id) | {
        "site": site,
        "station": station,
        "device": values.device,
        "nuclide": values.nuclide,
        "activity_bq": float(values.activity_bq),
        "sd_bq": float(values.sd_bq),
        "n": int(values.n),
        "background_bq": float(values.background_bq),
        "background_readings": [float(value) for value in values.background_readings],
        "start_ns": int(values.start_ns),
        "start_time": iso_utc(values.start_ns),
        "settle_ns": int(values.settle_ns),
        "settle_time": iso_utc(values.settle_ns),
        "removal_ns": None if values.removal_ns is None else int(values.removal_ns),
        "removal_time": moment(values.removal_ns),
        "end": values.end,
        "reading_ids": list(values.reading_ids),
    }
    return Message("measurement", device_topic(site, station, values.device, "measurement"), payload)


def measurement_label_message(
    site: str,
    station: str,
    device: str,
    *,
    measurement: dict[str, Any],
    label: str,
    user: str,
    request_id: str,
    time_ns: int,
    reference_source: str | None = None,
    prescribed_bq: float | None = None,
    administration_ns: int | None = None,
) -> Message:
    """A label (sample, batch, patient dose id) attached to a published `measurement` payload by a command.

    It carries the measurement's id, setting, value and time, so a dose record reads on its own; the
    msg_id is name-based on (measurement, request id), so the record of one command is one message.
    With `reference_source` the measurement is an accuracy test of that certified source; with a
    prescription (`prescribed_bq`, `administration_ns`) a patient dosage: the QC engine judges both.
    """
    measurement_id = str(measurement["msg_id"])
    name = json.dumps(["measurement_label", measurement_id, request_id])
    payload = envelope("measurement_label", time_ns, uuid.uuid5(MSG_ID_NAMESPACE, name).hex) | {
        "site": site,
        "station": station,
        "device": device,
        "measurement_id": measurement_id,
        "label": label,
        "user": user,
        "request_id": request_id,
        "measurement": {
            "nuclide": measurement.get("nuclide"),
            "activity_bq": float(measurement["activity_bq"]),
            "time_ns": int(measurement["time_ns"]),
            "time": iso_utc(int(measurement["time_ns"])),
        },
    }
    if reference_source is not None:
        payload["reference_source"] = reference_source
    if prescribed_bq is not None and administration_ns is not None:
        payload |= {
            "prescribed_bq": float(prescribed_bq),
            "administration_ns": int(administration_ns),
            "administration_time": iso_utc(administration_ns),
        }
    return Message("measurement_label", device_topic(site, station, device, "label"), payload)


def suspect_alarm_message(
    site: str,
    station: str,
    device: str,
    *,
    active: bool,
    recent_suspect: int,
    window: int,
    threshold: float,
    total: int,
    reason: str | None,
    time_ns: int,
) -> Message:
    """The suspect-reading alarm of one calibrator raised or cleared (controller/suspect_alarm.py)."""
    payload = envelope("controller_alarm", time_ns) | {
        "site": site,
        "station": station,
        "device": device,
        "alarm": "suspect_readings",
        "active": bool(active),
        "suspect_recent": int(recent_suspect),
        "window": int(window),
        "fraction": recent_suspect / window if window else 0.0,
        "threshold": float(threshold),
        "suspect_readings": int(total),
        "reason": reason,
    }
    return Message("controller_alarm", device_topic(site, station, device, "alarm"), payload)


#: The clocks a message's times can come from (its `clock` map): the controller's own, or the elution station's.
CLOCKS = ("controller", "elution_station")
#: Every time of an elution is the station's: it stamps start and end, the message is timed at the end,
#: and the counter epoch is when the station's count last started.
ELUTION_CLOCK = {key: "elution_station" for key in ("time_ns", "start_ns", "end_ns", "counter_epoch_ns")}


def elution_message(
    site: str,
    record: ElutionRecord,
    *,
    yield_pct: float | None = None,
    breakthrough_pct: float | None = None,
    msg_id: str | None = None,
) -> Message:
    """An elution; pass `msg_id=elution_msg_id(record)` so a replayed elution is recognisably the same.

    It carries the station's identity (`station_serial`, `counter_epoch_ns`) and, when its count
    started again, `counter_reset` saying why, so a consumer can tell two elutions with the same
    counter apart and see where a count began anew. Its `clock` says that each of its times is the
    station's clock (`ELUTION_CLOCK`), which can be off the controller's by the offset its
    device_status carries (controller/device_clock.py).

    Without an explicit `breakthrough_pct`, it comes from the station's own eluate measurement:
    parent activity / daughter activity in the eluate, in percent. Both refer to the same instant,
    the end of elution (docs/elution-station-registers.md), so no decay correction applies.
    """
    if breakthrough_pct is None and record.parent_bq is not None and record.activity_bq > 0:
        breakthrough_pct = record.parent_bq / record.activity_bq * 100.0
    payload = envelope("elution", record.end_ns, msg_id) | {
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
        "station_serial": record.station_serial,
        "counter_epoch_ns": None if record.counter_epoch_ns is None else int(record.counter_epoch_ns),
        "counter_reset": record.counter_reset,
        "clock": dict(ELUTION_CLOCK),
    }
    return Message("elution", f"{TOPIC_ROOT}/{site}/{record.station}/elution", payload)


def counter_reset_alarm_message(site: str, device: str, record: ElutionRecord, *, elution_id: str) -> Message:
    """The elution-counter alarm of one station: raised by `record` if its count started again, else cleared.

    `record.counter_reset` says why the count started again (drivers/elution_station.py); the
    service commits this with the elution `elution_id` (controller/service.py). The msg_id is
    name-based on that elution and `time_ns` is its end, so an elution replayed after a crash
    brings the same alarm message again, not a second alarm.
    """
    active = record.counter_reset is not None
    name = json.dumps(["elution_counter_reset", elution_id, active])
    payload = envelope("controller_alarm", record.end_ns, uuid.uuid5(MSG_ID_NAMESPACE, name).hex) | {
        "site": site,
        "station": record.station,
        "device": device,
        "alarm": "elution_counter_reset",
        "active": active,
        "generator": record.generator_id,
        "counter": int(record.counter),
        "station_serial": record.station_serial,
        "counter_epoch_ns": None if record.counter_epoch_ns is None else int(record.counter_epoch_ns),
        "elution_id": elution_id,
        "reason": record.counter_reset,
        # Timed at the elution's end, as the station stamped it.
        "clock": {"time_ns": "elution_station", "counter_epoch_ns": "elution_station"},
    }
    return Message("controller_alarm", device_topic(site, record.station, device, "alarm"), payload)


def qc_message(
    site: str,
    station: str,
    device: str,
    *,
    test: str,
    verdict: str,
    measured: float,
    expected: float | None,
    deviation_pct: float | None,
    limit: str,
    limit_source: str,
    inputs: dict[str, Any],
    time_ns: int | None = None,
    procedure_id: str | None = None,
    msg_id: str | None = None,
) -> Message:
    """A QC verdict; `inputs` holds everything needed to recompute it later.

    `expected` and `deviation_pct` are None for a test with no expected value or whose limit does not
    judge a deviation (controller/qc/result.py QcResult says what each field means); `procedure_id`
    names the QC procedure the verdict belongs to, if any.
    """
    payload = envelope("qc_result", time_ns if time_ns is not None else time.time_ns(), msg_id) | {
        "site": site,
        "station": station,
        "device": device,
        "test": test,
        "verdict": verdict,
        "measured": float(measured),
        "expected": None if expected is None else float(expected),
        "deviation_pct": None if deviation_pct is None else float(deviation_pct),
        "limit": limit,
        "limit_source": limit_source,
        "inputs": inputs,
        "procedure_id": procedure_id,
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
    suspect_readings: int | None = None,
    suspect_fraction: float | None = None,
    station_state: str | None = None,
    fault_code: int | None = None,
    clock: ClockStatus | None = None,
) -> Message:
    """A device's state; calibrators add their suspect readings since start and the recent suspect fraction.

    An elution station that answers adds its own state (a lower-case `StationState` name) and, in
    fault, its fault code, so a panel shows a fault before anyone presses start (docs/mqtt.md), and
    its clock against the controller's (`clock`, controller/device_clock.py). The status's own time
    is the controller's.
    """
    if station_state is not None and station_state not in STATION_STATES:
        raise ValueError(f"station_state must be one of {', '.join(STATION_STATES)}; got {station_state!r}")
    if (fault_code is not None) != (station_state == "fault"):
        raise ValueError(
            f"a fault code goes with a station in fault and only then; got {station_state!r}, {fault_code!r}"
        )
    payload = envelope("device_status", time_ns if time_ns is not None else time.time_ns()) | {
        "site": site,
        "station": station,
        "device": device,
        "up": bool(up),
        "latency_ms": None if latency_ms is None else float(latency_ms),
        "errors": int(errors),
        "detail": detail,
    }
    if suspect_readings is not None:
        payload["suspect_readings"] = int(suspect_readings)
        payload["suspect_fraction"] = None if suspect_fraction is None else float(suspect_fraction)
    if station_state is not None:
        payload["station_state"] = station_state
        payload["fault_code"] = None if fault_code is None else int(fault_code)
    if clock is not None:
        payload |= {
            "clock_offset_s": float(clock.offset_s),
            "clock_uncertainty_s": float(clock.uncertainty_s),
            "max_clock_offset_s": float(clock.limit_s),
            "clock_alarm": bool(clock.alarm),
        }
    return Message("device_status", device_topic(site, station, device, "status"), payload)


@dataclass(frozen=True, slots=True)
class ClockStatus:
    """A device's clock against the controller's, as its status and its clock alarm carry it.

    `offset_s` is device clock − controller clock, within ± `uncertainty_s`; `alarm` is whether the
    controller judges it beyond `limit_s` ([service] max_clock_offset_s, with hysteresis).
    """

    offset_s: float
    uncertainty_s: float
    limit_s: float
    alarm: bool

    @classmethod
    def of_status(cls, payload: dict[str, Any]) -> ClockStatus | None:
        """What a device_status payload says of the device's clock; None when it says nothing (a calibrator,
        a station that does not answer). A payload with part of it raises KeyError, TypeError or ValueError."""
        if payload.get("clock_offset_s") is None:
            return None
        fields = (payload["clock_offset_s"], payload["clock_uncertainty_s"], payload["max_clock_offset_s"])
        offset_s, uncertainty_s, limit_s = (float(value) for value in fields)
        if not all(math.isfinite(value) for value in (offset_s, uncertainty_s, limit_s)):
            raise ValueError("clock_offset_s")
        return cls(offset_s, uncertainty_s, limit_s, bool(payload["clock_alarm"]))


def clock_offset_alarm_message(
    site: str, station: str, device: str, clock: ClockStatus, *, measured_ns: int, time_ns: int
) -> Message:
    """The clock-offset alarm of one device raised or cleared (controller/device_clock.py).

    Retained on its own topic, `.../<device>/clock_alarm`, so it does not take the place of the
    device's other retained alarm (a station's elution counter reset on `.../<device>/alarm`).
    `measured_ns` is when the offset was measured, `time_ns` when the alarm changed: both on the
    controller's clock.
    """
    payload = envelope("controller_alarm", time_ns) | {
        "site": site,
        "station": station,
        "device": device,
        "alarm": "clock_offset",
        "active": bool(clock.alarm),
        "clock_offset_s": float(clock.offset_s),
        "clock_uncertainty_s": float(clock.uncertainty_s),
        "max_clock_offset_s": float(clock.limit_s),
        "measured_ns": int(measured_ns),
    }
    return Message("controller_alarm", device_topic(site, station, device, "clock_alarm"), payload)


def audit_anchor_message(site: str, *, trail: str, trail_id: str, seq: int, hash_hex: str, time_ns: int) -> Message:
    """The head of the audit trail after an append: record `seq` of the trail `trail_id` exists and has `hash_hex`.

    `trail_id` is the hash of the trail's first record (its identity wherever a copy of it lies),
    `trail` the path the controller writes it to, `time_ns` the head record's own time. The
    msg_id is name-based, so an anchor replayed from the outbox is recognisably the same message.
    controller/audit_anchor.py says why anchors exist; `hotlab audit verify` reads them back.
    """
    name = json.dumps(["audit_anchor", trail_id, int(seq), hash_hex])
    payload = envelope("audit_anchor", time_ns, uuid.uuid5(MSG_ID_NAMESPACE, name).hex) | {
        "site": site,
        "trail": trail,
        "trail_id": trail_id,
        "seq": int(seq),
        "hash": hash_hex,
    }
    return Message("audit_anchor", controller_topic(site, "audit"), payload)


def qc_procedure_message(
    site: str,
    station: str,
    device: str,
    *,
    procedure_id: str,
    procedure: str,
    status: str,
    started_by: dict[str, str] | None,
    started_ns: int,
    ended_ns: int | None,
    source_id: str | None,
    elution_id: str | None,
    generator: str | None,
    reason: str | None,
    settings: list[str],
    verdict: str | None,
    results: list[str],
    measurements: list[str],
    detail: str,
    msg_id: str | None = None,
    step_labels: list[str] | None = None,
    aliquot_fraction: float | None = None,
) -> Message:
    """A QC procedure started or ended (controller/qc/procedures.py); both records carry the same `procedure_id`.

    `step_labels` names the steps of a procedure that measures labelled steps in order (a geometry
    test's containers, a sleeve test's sleeves); `aliquot_fraction` the part of an eluate a Ge-68
    follow-up measures. Each is in the payload only when given.

    `time_ns` is the start for a "started" record and the end for the others; `started_by` is None
    when the procedure was recognised from a measurement rather than started by a command.
    """
    payload = envelope("qc_procedure", started_ns if ended_ns is None else ended_ns, msg_id) | {
        "site": site,
        "station": station,
        "device": device,
        "procedure_id": procedure_id,
        "procedure": procedure,
        "status": status,
        "started_by": None if started_by is None else dict(started_by),
        "started_ns": int(started_ns),
        "ended_ns": None if ended_ns is None else int(ended_ns),
        "source_id": source_id,
        "elution_id": elution_id,
        "generator": generator,
        "reason": reason,
        "settings": list(settings),
        "verdict": verdict,
        "results": list(results),
        "measurements": list(measurements),
        "detail": detail,
    }
    if step_labels:
        payload["step_labels"] = list(step_labels)
    if aliquot_fraction is not None:
        payload["aliquot_fraction"] = float(aliquot_fraction)
    return Message("qc_procedure", device_topic(site, station, device, "qc/procedure"), payload)


def qc_baseline_message(
    site: str,
    station: str,
    device: str,
    *,
    source_id: str,
    setting: str,
    activity_bq: float,
    baseline_ns: int,
    measurement_id: str,
    procedure_id: str,
    taken_by: dict[str, str],
    reason: str,
    source_nuclide: str,
    half_life_s: float,
    half_life_source: str,
) -> Message:
    """A constancy baseline (controller/qc/baselines.py): the chamber's reading of its check source on one setting.

    Retained per setting (hotlab/<site>/<station>/<device>/qc/baseline/<setting, lower case>): the
    newest one is the reference. The msg_id is name-based on the measurement it was taken from.
    """
    name = json.dumps(["qc_baseline", procedure_id, measurement_id])
    payload = envelope("qc_baseline", baseline_ns, uuid.uuid5(MSG_ID_NAMESPACE, name).hex) | {
        "site": site,
        "station": station,
        "device": device,
        "source_id": source_id,
        "setting": setting,
        "activity_bq": float(activity_bq),
        "baseline_ns": int(baseline_ns),
        "measurement_id": measurement_id,
        "procedure_id": procedure_id,
        "taken_by": dict(taken_by),
        "reason": reason,
        "source_nuclide": source_nuclide,
        "half_life_s": float(half_life_s),
        "half_life_source": half_life_source,
    }
    return Message("qc_baseline", device_topic(site, station, device, f"qc/baseline/{setting.lower()}"), payload)


def archive_retention_message(
    site: str,
    *,
    raw_days: float,
    cutoff_ns: int,
    started_ns: int,
    time_ns: int,
    readings: int,
    minutes: int,
    statuses: int,
    chunks: int,
    complete: bool,
    freed_bytes: int,
    archive_bytes: int,
) -> Message:
    """What one retention pass removed from the history archive (controller/archive_retention.py), and why.

    The archive keeps this record, so what was summarised and when stays on file beside the summaries.
    """
    payload = envelope("archive_retention", time_ns) | {
        "site": site,
        "raw_days": float(raw_days),
        "cutoff_ns": int(cutoff_ns),
        "cutoff_time": iso_utc(cutoff_ns),
        "started_ns": int(started_ns),
        "readings": int(readings),
        "minutes": int(minutes),
        "statuses": int(statuses),
        "chunks": int(chunks),
        "complete": bool(complete),
        "freed_bytes": int(freed_bytes),
        "archive_bytes": int(archive_bytes),
    }
    return Message("archive_retention", controller_topic(site, "archive/retention"), payload)
