"""Message -> line-protocol mapping and [influx] config validation (no server needed)."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotlab.controller.messages import (
    MeasurementValues,
    Message,
    audit_anchor_message,
    counter_reset_alarm_message,
    device_status_message,
    elution_message,
    elution_msg_id,
    measurement_label_message,
    measurement_message,
    qc_message,
    reading_message,
    suspect_alarm_message,
)
from hotlab.controller.sinks.influx import InfluxConfig, InfluxConfigError
from hotlab.controller.sinks.influx_points import PointError, message_to_line
from hotlab.drivers.records import ElutionRecord, Reading

T0 = 1_764_000_000_000_000_001


_SERIES_KEY = re.compile(r"^((?:[^ \\]|\\.)*) (.*) (\d+)$")
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^,]+)(?:,|$)')


def _fields(line: str) -> dict[str, str]:
    """The field set of a line: name -> raw value text (strings keep their quotes)."""
    match = _SERIES_KEY.match(line)
    assert match, line
    return dict(_FIELD.findall(match.group(2)))


def _qc(verdict: str) -> Message:
    return qc_message(
        "s",
        "st",
        "d",
        test="constancy",
        verdict=verdict,
        measured=1.0,
        expected=1.0,
        deviation_pct=0.0,
        limit="5%",
        limit_source="AAPM-181",
        inputs={},
        time_ns=T0,
    )


def test_reading_line_has_identity_tags_float_fields_and_ns_time() -> None:
    reading = Reading("crc 55,tr", "F-18", 3.7e8, 10.0, "mCi", T0, b"raw")
    line = message_to_line(reading_message("site=a", "st", reading))
    message_id = line.split('msg_id="')[1].split('"')[0]
    assert line == (
        f"reading,device=crc\\ 55\\,tr,nuclide=F-18,site=site\\=a,station=st "
        f'activity_bq=370000000,msg_id="{message_id}",quality="good",raw_value=10,unit="mCi" {T0}'
    )


def test_a_suspect_reading_stays_in_its_series_with_quality_and_reason_as_fields() -> None:
    good = Reading("cal-1", "Tc-99m", 7.4e9, 7.4e9, "Bq", T0, b">7.4000E+09")
    flipped = Reading(
        "cal-1",
        "Tc-99m",
        7.4e19,
        7.4e19,
        "Bq",
        T0 + 1,
        b">7.4000E+19",
        quality="suspect",
        quality_reason='out "of" range',
    )
    good_line, flipped_line = (message_to_line(reading_message("s", "st", r)) for r in (good, flipped))
    assert good_line.split(" ")[0] == flipped_line.split(" ")[0]  # the same series: quality is not a tag
    fields = _fields(flipped_line)
    assert fields["quality"] == '"suspect"' and fields["quality_reason"] == '"out \\"of\\" range"'
    assert "quality_reason" not in _fields(good_line)


def test_measurement_label_alarm_and_calibrator_status_points() -> None:
    values = MeasurementValues(
        "cal-1", "Cs-137", 7.4e6, 3.1e3, 12, 1.5e3, T0 - 9 * 10**9, T0, None, "dwell", ("a" * 32,) * 12
    )
    measurement = measurement_message("s", "st", values)
    line = message_to_line(measurement)
    assert line.startswith("measurement,device=cal-1,nuclide=Cs-137,site=s,station=st ") and line.endswith(f" {T0}")
    assert _fields(line) == {
        "activity_bq": "7400000",
        "sd_bq": "3100",
        "n": "12",
        "background_bq": "1500",
        "end": '"dwell"',
        "msg_id": f'"{measurement.msg_id}"',
    }
    label = measurement_label_message(
        "s",
        "st",
        "cal-1",
        measurement=measurement.payload,
        label="batch 12",
        user="alice",
        request_id="r1",
        time_ns=T0 + 5,
    )
    assert _fields(message_to_line(label)) == {
        "label": '"batch 12"',
        "measurement_id": f'"{measurement.msg_id}"',
        "user": '"alice"',
        "msg_id": f'"{label.msg_id}"',
    }
    alarm = suspect_alarm_message(
        "s", "st", "cal-1", active=True, recent_suspect=6, window=50, threshold=0.1, total=9, reason="x", time_ns=T0
    )
    alarm_line = message_to_line(alarm)
    assert alarm_line.startswith("controller_alarm,alarm=suspect_readings,device=cal-1,site=s,station=st ")
    assert _fields(alarm_line) | {"msg_id": ""} == {
        "active": "1",
        "suspect_recent": "6",
        "window": "50",
        "fraction": "0.12",
        "threshold": "0.1",
        "suspect_readings": "9",
        "reason": '"x"',
        "msg_id": "",
    }
    status = device_status_message(
        "s", "st", "cal-1", up=True, latency_ms=1.0, errors=0, suspect_readings=9, suspect_fraction=0.12, time_ns=T0
    )
    fields = _fields(message_to_line(status))
    assert (fields["suspect_readings"], fields["suspect_fraction"]) == ("9", "0.12")


def test_ints_and_bools_become_floats_and_none_fields_vanish() -> None:
    record = ElutionRecord("st", "gen", "Mo-99", "Tc-99m", 42, 1e10, 5.0, T0 - 10**9, T0)
    fields = _fields(message_to_line(elution_message("s", record, yield_pct=None, breakthrough_pct=0.001)))
    assert fields["counter"] == "42"  # no "i" suffix: an InfluxDB float, never an integer
    assert "yield_pct" not in fields and fields["breakthrough_pct"] == "0.001"
    status = _fields(
        message_to_line(device_status_message("s", "st", "d", up=True, latency_ms=None, errors=0, time_ns=T0))
    )
    assert (status["up"], status["errors"]) == ("1", "0") and "latency_ms" not in status and "detail" not in status


@pytest.mark.parametrize(("verdict", "code"), [("pass", "0"), ("warn", "1"), ("fail", "2"), ("error", None)])
def test_verdict_is_a_tag_and_a_graphable_code(verdict: str, code: str | None) -> None:
    line = message_to_line(_qc(verdict))
    assert f",verdict={verdict} " in line
    assert _fields(line).get("verdict_code") == code


def test_audit_anchor_is_one_series_per_trail_with_its_head() -> None:
    trail_id, head = "1" * 64, "2" * 64
    message = audit_anchor_message(
        "lab", trail="/var/audit.jsonl", trail_id=trail_id, seq=17, hash_hex=head, time_ns=T0
    )
    line = message_to_line(message)
    assert line.startswith(f"audit_anchor,site=lab,trail_id={trail_id} ") and line.endswith(f" {T0}")
    assert _fields(line) == {
        "hash": f'"{head}"',
        "msg_id": f'"{message.msg_id}"',
        "seq": "17",
        "trail": '"/var/audit.jsonl"',
    }


@pytest.mark.parametrize(
    ("kind", "payload", "complaint"),
    [
        ("alarm", {"msg_id": "m", "time_ns": T0}, "unknown kind 'alarm'"),
        ("reading", {"msg_id": "m", "time_ns": T0, "site": "s", "station": "st"}, "tag 'device'"),
        ("reading", {"msg_id": "m", "time_ns": "now", "site": "s", "station": "st", "device": "d"}, "time_ns"),
        (
            "reading",
            {"msg_id": "m", "time_ns": T0, "site": "s", "station": "st", "device": "d", "activity_bq": "12 MBq"},
            "field 'activity_bq' must be a number",
        ),
        ("reading", {"time_ns": T0, "site": "s", "station": "st", "device": "d", "activity_bq": 1.0}, "msg_id"),
        (
            "reading",
            {"msg_id": "m", "time_ns": T0, "site": "s", "station": "st", "device": "d", "activity_bq": 10**400},
            "field 'activity_bq' is out of float range",
        ),
    ],
)
def test_unmappable_messages_raise_a_clear_point_error(kind: str, payload: dict, complaint: str) -> None:
    with pytest.raises(PointError, match=complaint):
        message_to_line(Message(kind, "t", payload))  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    activity=st.floats(min_value=0, max_value=1e15, allow_nan=False),
    device=st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1, max_size=12).filter(
        lambda s: s.strip() != "" and "\\" not in s
    ),
)
def test_any_finite_activity_survives_line_protocol_exactly(activity: float, device: str) -> None:
    reading = Reading(device, "Tc-99m", activity, activity, "Bq", T0)
    line = message_to_line(reading_message("s", "st", reading))
    value = line.split(" activity_bq=")[1].split(",")[0] if " activity_bq=" in line else None
    assert value is not None and float(value) == activity and math.isfinite(float(value))


def test_config_from_mapping_accepts_the_1_8_compatibility_form() -> None:
    config = InfluxConfig.from_mapping(
        {"url": "http://db:8086", "token": "user:pw", "org": "-", "bucket": "hotlab/autogen", "batch_size": 200}
    )
    assert (config.batch_size, config.flush_interval_s, config.timeout_s) == (200, 1.0, 10.0)
    assert "user:pw" not in repr(config)  # secrets stay out of logs


@pytest.mark.parametrize(
    ("settings_", "complaint"),
    [
        (
            {"url": "http://x", "token": "t", "org": "o"},
            r"^influx: needs bucket \(InfluxDB 2\.x/3\.x\) or database \(InfluxDB 1\.x\)$",
        ),
        (
            {"url": "http://x", "token": "t", "org": "o", "bucket": "b", "batchsize": 5},
            r"^influx\.batchsize: unknown key \(did you mean 'batch_size'\?\)",
        ),
        ({"url": "x:8086", "token": "t", "org": "o", "bucket": "b"}, "http:// or https://"),
        (
            {"url": "http://x", "token": "t", "org": "o", "bucket": "b", "timeout_s": 0},
            r"^influx\.timeout_s: must be > 0, got 0$",
        ),
        (
            {"url": "http://x", "token": "t", "org": "o", "bucket": "b", "batch_size": "many"},
            r"^influx\.batch_size: must be an integer, got 'many' \(string\)$",
        ),
        (
            {"url": "http://x", "token": 5, "org": "o", "bucket": "b"},
            r"^influx\.token: must be a string, got 5 \(integer\)$",
        ),
        (
            {"url": "http://x", "token": "t", "org": "o", "bucket": "b", "batch_size": 2.5},
            r"^influx\.batch_size: must be an integer, got 2\.5 \(number\)$",
        ),
    ],
)
def test_bad_config_names_the_problem(settings_: dict, complaint: str) -> None:
    with pytest.raises(InfluxConfigError, match=complaint):
        InfluxConfig.from_mapping(settings_)


def test_a_qc_engine_result_keeps_its_limit_numbers_for_limit_lines() -> None:
    from hotlab.controller.qc.limits import DEFAULT_LIMITS
    from hotlab.controller.qc.result import judged

    result = judged(
        "constancy",
        DEFAULT_LIMITS["constancy"],
        measured=7.0e6,
        expected=7.4e6,
        unit="Bq",
        time_ns=T0,
        inputs={},
        detail="Cs-137 check source",
    )
    fields = _fields(message_to_line(result.to_message("s", "st", "crc")))
    assert (fields["limit_warn"], fields["limit_fail"], fields["verdict_code"]) == ("5", "10", "1")
    assert float(fields["value_judged"]) == pytest.approx(-5.405, abs=1e-3)
    assert fields["unit"] == '"Bq"' and fields["detail"] == '"Cs-137 check source"'
    assert fields["limit"] == '"pass |dev| <= 5 %, warn <= 10 %, fail > 10 %"'


def test_an_elution_counter_reset_alarm_keeps_its_generator_counter_and_elution() -> None:
    """Its generator, counter and elution were dropped: the point said only that some alarm was active."""
    record = ElutionRecord(
        "elution-1", "GE68-1", "Ge-68", "Ga-68", 1, 5e8, 5.0, T0 - 10**9, T0,
        station_serial="SN-1", counter_epoch_ns=T0 - 10**12, counter_reset="counter 7 -> 1",
    )  # fmt: skip
    elution_id = elution_msg_id(record)
    line = message_to_line(counter_reset_alarm_message("s", "gen-1", record, elution_id=elution_id))
    assert line.startswith("controller_alarm,alarm=elution_counter_reset,device=gen-1,generator=GE68-1,site=s,")
    fields = _fields(line)
    assert fields["active"] == "1" and fields["counter"] == "1"
    assert fields["elution_id"] == f'"{elution_id}"' and fields["reason"] == '"counter 7 -> 1"'


def test_every_message_kind_the_controller_stores_becomes_a_point() -> None:
    """qc_procedure and qc_baseline records had no point: the sink counted each as a rejected message."""
    from typing import get_args

    from hotlab.controller.messages import Kind
    from hotlab.controller.sinks.influx_points import SCHEMAS

    assert set(get_args(Kind)) == set(SCHEMAS)


def test_procedure_and_baseline_points_name_the_device_and_what_was_done() -> None:
    from hotlab.controller.messages import qc_baseline_message, qc_procedure_message

    procedure = qc_procedure_message(
        "s", "st", "crc", procedure_id="a" * 32, procedure="daily_constancy", status="complete",
        started_by={"user": "jdoe", "role": "operator"}, started_ns=T0 - 10**12, ended_ns=T0, source_id="CS-1",
        elution_id=None, generator=None, reason=None, settings=["Cs-137", "Tc-99m"], verdict="pass",
        results=["b" * 32], measurements=["c" * 32], detail="constancy judged on 2 setting(s)",
    )  # fmt: skip
    line = message_to_line(procedure)
    assert line.startswith("qc_procedure,device=crc,procedure=daily_constancy,site=s,station=st,status=complete ")
    assert line.endswith(f" {T0}")
    fields = _fields(line)
    assert fields["procedure_id"] == f'"{"a" * 32}"' and fields["verdict"] == '"pass"'
    baseline = qc_baseline_message(
        "s", "st", "crc", source_id="CS-1", setting="Tc-99m", activity_bq=6.5e6, baseline_ns=T0,
        measurement_id="c" * 32, procedure_id="a" * 32, taken_by={"user": "qco", "role": "qc_officer"},
        reason="acceptance", source_nuclide="Cs-137", half_life_s=9.49e8, half_life_source="NNDC",
    )  # fmt: skip
    line = message_to_line(baseline)
    assert line.startswith("qc_baseline,device=crc,setting=Tc-99m,site=s,station=st ")
    assert _fields(line)["activity_bq"] == "6500000"


def test_a_reading_taken_with_overdue_qc_says_so_in_its_point() -> None:
    """qc_state and the procedure a measurement or verdict belongs to were dropped on the way to InfluxDB."""
    reading = reading_message("s", "st", Reading("cal-1", "Tc-99m", 7.4e9, 7.4e9, "Bq", T0, b">7.4000E+09"))
    marked = Message("reading", reading.topic, reading.payload | {"qc_state": "overdue"})
    assert _fields(message_to_line(marked))["qc_state"] == '"overdue"'
    assert "qc_state" not in _fields(message_to_line(reading))
    verdict = _qc("pass")
    linked = Message("qc_result", verdict.topic, verdict.payload | {"procedure_id": "a" * 32})
    assert _fields(message_to_line(linked))["procedure_id"] == f'"{"a" * 32}"'
