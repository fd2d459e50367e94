"""Message envelopes: schema version, unique ids, topics per DESIGN.md, JSON-safe payloads."""

import json

import pytest

from hotlab.controller.messages import (
    MeasurementValues,
    counter_reset_alarm_message,
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


def station_elution(**identity: object) -> ElutionRecord:
    """Elution 7 of GEN-1 at ga-station, serial SN-1, counted since epoch T0; `identity` overrides fields."""
    fields: dict[str, object] = {
        "station": "ga-station",
        "generator_id": "GEN-1",
        "parent_nuclide": "Ge-68",
        "daughter_nuclide": "Ga-68",
        "counter": 7,
        "activity_bq": 1.1e9,
        "volume_ml": 5.0,
        "start_ns": T0,
        "end_ns": T0 + 90 * 10**9,
        "station_serial": "SN-1",
        "counter_epoch_ns": T0 - 86400 * 10**9,
    }
    return ElutionRecord(**(fields | identity))


def test_elution_msg_id_is_stable_per_elution_and_distinct_between_them() -> None:
    same = {elution_msg_id(station_elution()) for _ in range(3)}
    assert len(same) == 1
    # Its measured values and the reason for a counter restart are not part of the identity.
    assert elution_msg_id(station_elution(activity_bq=1.0, counter_reset="counter went back")) in same
    others = {
        elution_msg_id(station_elution(counter=8)),
        elution_msg_id(station_elution(generator_id="GEN-2")),
        elution_msg_id(station_elution(station="tc-station")),
        elution_msg_id(station_elution(station="ga-station/GEN-1", generator_id="")),  # separators cannot collide
        # The same counter again after the count started over: another elution, another id.
        elution_msg_id(station_elution(counter_epoch_ns=T0)),
        elution_msg_id(station_elution(station_serial="SN-2")),
        elution_msg_id(station_elution(end_ns=T0 + 91 * 10**9)),
        elution_msg_id(station_elution(station_serial=None, counter_epoch_ns=None)),
    }
    assert len(others) == 8 and not same & others
    assert elution_msg_id(station_elution()) == "961e69db129a5ce49492e65e19eea3f9"  # fixed forever


def test_a_replayed_elution_keeps_its_msg_id() -> None:
    record = station_elution()
    msg_id = elution_msg_id(record)
    first, replay = (elution_message("lab-a", record, msg_id=msg_id) for _ in range(2))
    assert first.msg_id == replay.msg_id == msg_id
    assert first.payload == replay.payload
    assert elution_message("lab-a", record).msg_id != elution_message("lab-a", record).msg_id


def test_an_elution_carries_the_stations_identity_and_why_its_count_started_again() -> None:
    payload = elution_message("lab-a", station_elution(counter=1, counter_reset="counter went back; 7 -> 1")).payload
    assert (payload["station_serial"], payload["counter_epoch_ns"]) == ("SN-1", T0 - 86400 * 10**9)
    assert payload["counter_reset"] == "counter went back; 7 -> 1"
    unknown = elution_message("lab-a", station_elution(station_serial=None, counter_epoch_ns=None)).payload
    assert unknown["station_serial"] is unknown["counter_epoch_ns"] is unknown["counter_reset"] is None


def test_the_counter_reset_alarm_is_the_same_message_for_a_replayed_elution() -> None:
    reset = station_elution(counter=1, counter_reset="counter went back; 7 -> 1")
    raised, replayed = (
        counter_reset_alarm_message("lab-a", "gen-1", reset, elution_id=elution_msg_id(reset)) for _ in range(2)
    )
    assert raised == replayed and raised.kind == "controller_alarm"
    assert raised.topic == "hotlab/lab-a/ga-station/gen-1/alarm"
    payload = raised.payload
    assert (payload["alarm"], payload["active"], payload["reason"]) == (
        "elution_counter_reset",
        True,
        "counter went back; 7 -> 1",
    )
    assert payload["elution_id"] == elution_msg_id(reset) and payload["time_ns"] == reset.end_ns
    follows = station_elution(counter=2, end_ns=T0 + 86400 * 10**9)
    cleared = counter_reset_alarm_message("lab-a", "gen-1", follows, elution_id=elution_msg_id(follows))
    assert cleared.payload["active"] is False and cleared.payload["reason"] is None
    assert cleared.msg_id != raised.msg_id


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
