"""Message envelopes: schema version, unique ids, topics per DESIGN.md, JSON-safe payloads."""

import json

import pytest

from hotlab.controller.messages import (
    MeasurementValues,
    device_status_message,
    elution_message,
    elution_msg_id,
    iso_utc,
    measurement_label_message,
    measurement_message,
    measurement_msg_id,
    qc_message,
    reading_message,
    suspect_alarm_message,
)
from hotlab.drivers.records import ElutionRecord, Reading

T0 = 1_795_000_000_000_000_000


def test_reading_message_topic_and_payload() -> None:
    reading = Reading("cal-1", "Tc-99m", 7.4e8, 20.0, "mCi", T0, b"Tc99m: 20.0 mCi\r\n")
    message = reading_message("lab-a", "hotcell-1", reading)
    assert message.topic == "hotlab/lab-a/hotcell-1/cal-1/reading"
    assert message.payload["schema"] == "hotlab.reading/1"
    assert message.payload["activity_bq"] == 7.4e8
    assert message.payload["raw_frame"] == "Tc99m: 20.0 mCi\r\n"
    assert message.payload["time"] == iso_utc(T0)
    json.dumps(message.payload, allow_nan=False)


def test_every_message_gets_its_own_id() -> None:
    reading = Reading("cal-1", "F-18", 1e9, 1e9, "Bq", T0)
    ids = {reading_message("s", "st", reading).msg_id for _ in range(1000)}
    assert len(ids) == 1000


def test_elution_qc_and_status_topics() -> None:
    record = ElutionRecord("ga-station", "GEN-1", "Ge-68", "Ga-68", 7, 1.1e9, 5.0, T0, T0 + 90 * 10**9)
    elution = elution_message("lab-a", record, yield_pct=71.2)
    assert elution.topic == "hotlab/lab-a/ga-station/elution"
    assert elution.payload["duration_s"] == 90.0
    assert elution.payload["breakthrough_pct"] is None
    qc = qc_message(
        "lab-a",
        "hotcell-1",
        "cal-1",
        test="constancy",
        verdict="pass",
        measured=1.0,
        expected=1.0,
        deviation_pct=0.0,
        limit="±5 % warn, ±10 % fail",
        limit_source="AAPM TG-181",
        inputs={"source": "Cs-137"},
    )
    assert qc.topic == "hotlab/lab-a/hotcell-1/cal-1/qc"
    status = device_status_message("lab-a", "hotcell-1", "cal-1", up=False, latency_ms=None, errors=3)
    assert status.topic == "hotlab/lab-a/hotcell-1/cal-1/status"
    assert status.payload["up"] is False


def test_iso_utc_is_rfc3339_z() -> None:
    assert iso_utc(0) == "1970-01-01T00:00:00.000000Z"


def test_elution_msg_id_is_stable_per_elution_and_distinct_between_them() -> None:
    same = {elution_msg_id("ga-station", "GEN-1", 7) for _ in range(3)}
    assert len(same) == 1
    others = {
        elution_msg_id("ga-station", "GEN-1", 8),
        elution_msg_id("ga-station", "GEN-2", 7),
        elution_msg_id("tc-station", "GEN-1", 7),
        elution_msg_id("ga-station/GEN-1", "", 7),  # separators inside names cannot collide
    }
    assert len(others) == 4 and not same & others
    assert elution_msg_id("ga-station", "GEN-1", 7) == "27dbc1a3c8c857878665714cb9bc4bf6"  # fixed forever


def test_a_replayed_elution_keeps_its_msg_id() -> None:
    record = ElutionRecord("ga-station", "GEN-1", "Ge-68", "Ga-68", 7, 1.1e9, 5.0, T0, T0 + 90 * 10**9)
    msg_id = elution_msg_id(record.station, record.generator_id, record.counter)
    first, replay = (elution_message("lab-a", record, msg_id=msg_id) for _ in range(2))
    assert first.msg_id == replay.msg_id == msg_id
    assert first.payload == replay.payload
    assert elution_message("lab-a", record).msg_id != elution_message("lab-a", record).msg_id


def test_breakthrough_comes_from_the_stations_parent_measurement() -> None:
    # A Ge-68/Ga-68 eluate: 1.1 GBq Ga-68 with 5.5 kBq Ge-68 is 0.0005 % (Ph. Eur. 2464 limit 0.001 %).
    record = ElutionRecord("ga-station", "GEN-1", "Ge-68", "Ga-68", 7, 1.1e9, 5.0, T0, T0 + 1, parent_bq=5.5e3)
    payload = elution_message("lab-a", record).payload
    assert payload["breakthrough_pct"] == pytest.approx(5e-4)
    json.dumps(payload, allow_nan=False)
    # A caller's own value (e.g. a >= 48 h re-measurement) wins over the station's.
    assert elution_message("lab-a", record, breakthrough_pct=0.0002).payload["breakthrough_pct"] == 0.0002
    unknown = ElutionRecord("ga-station", "GEN-1", "Ge-68", "Ga-68", 7, 1.1e9, 5.0, T0, T0 + 1)
    assert elution_message("lab-a", unknown).payload["breakthrough_pct"] is None
    empty = ElutionRecord("ga-station", "GEN-1", "Ge-68", "Ga-68", 7, 0.0, 5.0, T0, T0 + 1, parent_bq=0.0)
    assert elution_message("lab-a", empty).payload["breakthrough_pct"] is None


def test_iso_utc_truncates_to_the_microsecond_and_handles_times_before_1970() -> None:
    assert iso_utc(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456Z"
    assert iso_utc(-1) == "1969-12-31T23:59:59.999999Z"


def test_a_reading_says_its_quality_and_only_a_suspect_one_why() -> None:
    good = reading_message("lab-a", "hotcell-1", Reading("cal-1", "Tc-99m", 7.4e9, 7.4e9, "Bq", T0))
    assert good.payload["quality"] == "good" and "quality_reason" not in good.payload
    flipped = Reading("cal-1", "Tc-99m", 7.4e19, 7.4e19, "Bq", T0, quality="suspect", quality_reason="out of range")
    payload = reading_message("lab-a", "hotcell-1", flipped).payload
    assert (payload["quality"], payload["quality_reason"]) == ("suspect", "out of range")


def test_measurements_and_labels_have_name_based_ids_and_their_topics() -> None:
    values = MeasurementValues(
        "cal-1", "Cs-137", 7.4e6, 7e3, 6, 0.0, T0, T0 + 5 * 10**9, None, "dwell", ("a" * 32,) * 6
    )
    first, replay = (measurement_message("lab-a", "qc-lab", values) for _ in range(2))
    assert first.msg_id == replay.msg_id == measurement_msg_id("lab-a", "cal-1", T0)
    assert measurement_msg_id("lab-a", "cal-1", T0) == "e8a138bb7d8858908dbc0cb1145c0b5e"  # fixed forever
    assert measurement_msg_id("lab-a", "cal-1", T0 + 1) != first.msg_id
    assert first.topic == "hotlab/lab-a/qc-lab/cal-1/measurement"
    assert first.payload["time_ns"] == T0 + 5 * 10**9 and first.payload["removal_time"] is None
    label = measurement_label_message(
        "lab-a", "qc-lab", "cal-1", measurement=first.payload, label="CS-7", user="alice", request_id="r1", time_ns=T0
    )
    assert label.topic == "hotlab/lab-a/qc-lab/cal-1/label" and label.payload["measurement_id"] == first.msg_id
    again = measurement_label_message(
        "lab-a", "qc-lab", "cal-1", measurement=first.payload, label="CS-7", user="alice", request_id="r1", time_ns=T0
    )
    assert again.msg_id == label.msg_id
    alarm = suspect_alarm_message(
        "lab-a",
        "qc-lab",
        "cal-1",
        active=True,
        recent_suspect=5,
        window=50,
        threshold=0.1,
        total=5,
        reason=None,
        time_ns=T0,
    )
    assert alarm.topic == "hotlab/lab-a/qc-lab/cal-1/alarm" and alarm.payload["fraction"] == 0.1
    json.dumps([first.payload, label.payload, alarm.payload], allow_nan=False)
