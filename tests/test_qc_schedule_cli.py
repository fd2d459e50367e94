"""`hotlab qc status` on a real SQLite history archive, and qc_status on the way out (schema, InfluxDB, MQTT)."""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path

import pytest

from hotlab.controller.archive import HistoryArchive
from hotlab.controller.cli.qc_status import register_status
from hotlab.controller.config_table import ConfigError
from hotlab.controller.messages import Message, elution_message, elution_msg_id, qc_procedure_message
from hotlab.controller.qc.limits import load_limits
from hotlab.controller.qc.result import judged
from hotlab.controller.sinks.influx_points import message_to_line
from hotlab.controller.sinks.mqtt import RETAINED_KINDS
from hotlab.drivers.records import ElutionRecord
from tests.schema_check import validator_for

H = 3600 * 10**9
DAY = 24 * H
#: Wednesday 10 June 2026, 05:00 UTC = 07:00 in Europe/Berlin (summer time, UTC+2).
T0 = 1_781_067_600 * 10**9

CONFIG = """
[site]
name = "lab"

[history]
path = "history.sqlite3"

[[device]]
name = "cal-1"
station = "hotcell-1"
family = "vik202"
transport = "/dev/null"

[qc.sources.cs137-check]
nuclide = "Cs-137"
activity = "7.40 MBq"
reference_time = "2025-01-15T12:00:00Z"

[qc.devices.cal-1]
check_source = "cs137-check"

[qc.generators.GE68-001]
parent = "Ge-68"
activity = "1.85 GBq"
calibration_time = "2026-05-01T12:00:00Z"

[qc.schedule]
timezone = "Europe/Berlin"
daily_deadline = "08:00"

[qc.schedule.devices.cal-1]
installed = "2026-01-15"
"""


def test_t0_is_what_the_docstring_says() -> None:
    assert T0 // 10**9 == 1_781_067_600  # 2026-06-10T05:00:00Z: 56 years, 14 leap days, 160 days, 5 h
    assert (365 * 56 + 14 + 160) * 86_400 + 5 * 3600 == 1_781_067_600


def run_status(tmp_path: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    parser = argparse.ArgumentParser(prog="hotlab qc")
    register_status(parser.add_subparsers(dest="qc_test", required=True))
    args = parser.parse_args(["status", "--config", str(tmp_path / "lab.toml"), *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


def build_archive(tmp_path: Path) -> str:
    """A daily check done yesterday, an accuracy pass, and an elution two days ago; returns the elution id."""
    (tmp_path / "lab.toml").write_text(CONFIG)
    procedure_id = uuid.uuid4().hex
    yesterday = T0 - DAY
    daily = qc_procedure_message(
        "lab",
        "hotcell-1",
        "cal-1",
        procedure_id=procedure_id,
        procedure="daily_constancy",
        status="complete",
        started_by=None,
        started_ns=yesterday,
        ended_ns=yesterday + 600 * 10**9,
        source_id="cs137-check",
        elution_id=None,
        generator=None,
        reason=None,
        settings=["Cs-137"],
        verdict="pass",
        results=[],
        measurements=[],
        detail="daily check",
    )
    accuracy = judged(
        "accuracy",
        load_limits()["accuracy"],
        measured=7.0e6,
        expected=7.0e6,
        unit="Bq",
        time_ns=T0 - 30 * DAY,
        inputs={},
        detail="accuracy",
    ).to_message("lab", "hotcell-1", "cal-1")
    record = ElutionRecord("elution-1", "GE68-001", "Ge-68", "Ga-68", 7, 1.1e9, 5.0, T0 - 50 * H, T0 - 49 * H)
    eluted = elution_message("lab", record, msg_id=elution_msg_id(record))
    with HistoryArchive(tmp_path / "history.sqlite3") as archive:
        archive.add_many([daily, accuracy, eluted])
    return eluted.msg_id


def test_status_from_the_archive_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # the table's full width
    elution_id = build_archive(tmp_path)
    payloads = json.loads(run_status(tmp_path, capsys, "--at", "2026-06-10T05:00:00Z", "--json"))
    state = {p["item"]: p for p in payloads}
    validator = validator_for("qc_status")
    assert validator is not None
    for payload in payloads:
        validator.validate(payload)
    # Done yesterday, not today: due since local midnight (22:00Z), overdue at 08:00 local (06:00Z).
    assert state["daily_constancy"]["state"] == "due"
    assert state["daily_constancy"]["due_ns"] == T0 - 7 * H
    assert state["daily_constancy"]["overdue_ns"] == T0 + H
    assert state["daily_constancy"]["last_done_ns"] == T0 - DAY + 600 * 10**9
    assert state["accuracy"]["state"] == "done" and state["accuracy"]["due_ns"] == T0 - 30 * DAY + 365 * DAY
    # The elution ended 49 h ago: its follow-up was due 1 h ago and is overdue after 24 h more.
    follow_up = state[f"ge68_breakthrough/{elution_id}"]
    assert (follow_up["state"], follow_up["due_ns"]) == ("due", T0 - H)
    later = json.loads(run_status(tmp_path, capsys, "--at", "2026-06-10T06:00:00Z", "--json"))
    assert {p["item"]: p["state"] for p in later}["daily_constancy"] == "overdue"
    table = run_status(tmp_path, capsys, "--at", "2026-06-10T05:00:00Z")
    assert "daily_constancy" in table and "2026-06-10 08:00 CEST" in table


def test_the_past_is_shown_as_it_was(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_archive(tmp_path)
    before = json.loads(run_status(tmp_path, capsys, "--at", "2026-06-09T04:00:00Z", "--json"))
    state = {p["item"]: p for p in before}
    assert state["daily_constancy"]["last_done_ns"] is None  # the check of the 9th came later that day


def test_a_bad_schedule_key_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "lab.toml").write_text(CONFIG.replace('daily_deadline = "08:00"', 'daily_deadline = "late"'))
    parser = argparse.ArgumentParser(prog="hotlab qc")
    register_status(parser.add_subparsers(dest="qc_test", required=True))
    args = parser.parse_args(["status", "--config", str(tmp_path / "lab.toml")])
    with pytest.raises(ConfigError, match=r"qc\.schedule\.daily_deadline"):
        args.func(args)


def test_qc_status_is_retained_and_one_influx_series_per_item(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert {"qc_status", "qc_baseline"} <= RETAINED_KINDS
    build_archive(tmp_path)
    payloads = json.loads(run_status(tmp_path, capsys, "--at", "2026-06-10T06:00:00Z", "--json"))
    overdue = next(p for p in payloads if p["item"] == "daily_constancy")
    line = message_to_line(Message("qc_status", "t", overdue))
    series, rest = line.split(" ", 1)
    fields, stamp = rest.rsplit(" ", 1)
    assert series == "qc_status,device=cal-1,item=daily_constancy,site=lab,station=hotcell-1,test=constancy"
    assert 'state="overdue"' in fields and "state_code=2" in fields and "alarm=1" in fields
    assert int(stamp) == overdue["time_ns"]
