"""The QC schedule (controller/qc/schedule.py) and its two-phase stage, on hand-built records.

Times are written out in UTC with the site's offset worked out here: Europe/Berlin is UTC+1 in
winter and UTC+2 in summer; in 2026 summer time starts on Sunday 29 March at 01:00 UTC, so that
local day is 23 hours long.
"""

from __future__ import annotations

import tomllib
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from hotlab.controller.archive import HistoryArchive
from hotlab.controller.config_table import ConfigError, ConfigTable
from hotlab.controller.messages import Message, elution_message, elution_msg_id
from hotlab.controller.qc import calibrator_rules
from hotlab.controller.qc.limits import load_limits
from hotlab.controller.qc.schedule import ScheduleConfig
from hotlab.controller.qc.schedule_stage import ScheduleStage
from hotlab.drivers.records import ElutionRecord

SITE = "lab"
CAL, STATION = "cal-1", "hotcell-1"
GEN = "GE68-001"
H = 3600 * 10**9
DAY = 24 * H


def utc(text: str) -> int:
    """Epoch ns of an ISO time written with Z."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int(moment.timestamp()) * 10**9


def msg_id() -> str:
    return uuid.uuid4().hex


def config(**schedule: Any) -> ScheduleConfig:
    table = {"timezone": "Europe/Berlin", "daily_deadline": "08:00"} | schedule
    return ScheduleConfig.from_table(ConfigTable(table, "qc.schedule"))


def stage(**schedule: Any) -> ScheduleStage:
    return ScheduleStage(SITE, config(**schedule), {CAL: STATION}, [GEN])


def procedure(start_ns: int, end_ns: int, verdict: str, status: str = "complete") -> Message:
    payload = {
        "msg_id": msg_id(),
        "time_ns": end_ns,
        "site": SITE,
        "station": STATION,
        "device": CAL,
        "procedure_id": msg_id(),
        "procedure": "daily_constancy",
        "status": status,
        "started_ns": start_ns,
        "ended_ns": end_ns,
        "verdict": verdict,
    }
    return Message("qc_procedure", "t", payload)


def result(test: str, verdict: str, time_ns: int, device: str = CAL, **inputs: Any) -> Message:
    payload = {"msg_id": msg_id(), "time_ns": time_ns, "site": SITE, "station": STATION, "device": device}
    return Message("qc_result", "t", payload | {"test": test, "verdict": verdict, "inputs": inputs})


def measurement(time_ns: int, procedure_id: str | None = None) -> Message:
    payload = {"msg_id": msg_id(), "time_ns": time_ns, "site": SITE, "station": STATION, "device": CAL}
    if procedure_id is not None:
        payload["procedure_id"] = procedure_id
    return Message("measurement", "t", payload)


def reading(time_ns: int) -> Message:
    payload = {"msg_id": msg_id(), "time_ns": time_ns, "site": SITE, "station": STATION, "device": CAL}
    return Message("reading", "t", payload | {"activity_bq": 1.0e3, "quality": "good"})


def elution(end_ns: int) -> Message:
    payload = {"msg_id": msg_id(), "time_ns": end_ns, "site": SITE, "station": "elution-1", "generator": GEN}
    return Message("elution", "t", payload | {"end_ns": end_ns})


def committed(s: ScheduleStage, *messages: Message) -> list[Message]:
    outcome = s.process(*messages)
    s.apply(outcome)
    return list(outcome.messages)


def item(s: ScheduleStage, name: str, now_ns: int) -> Any:
    return next(status for status in s.current(now_ns) if status.item == name)


# -- config -------------------------------------------------------------------------------


def test_defaults_name_their_source_and_site_values_name_the_key() -> None:
    default = ScheduleConfig.from_table(None)
    assert default.timezone.key == "UTC" and default.linearity_interval_days == 91.0
    assert "35.50(b)(3)" in default.sources["linearity_interval_days"]
    assert "35.50(b)(2)" in default.sources["accuracy_interval_days"]
    assert "could not be checked" in default.sources["ge68_delay_h"]
    site = config(linearity_interval_days=30)
    assert site.sources["linearity_interval_days"] == "site config qc.schedule.linearity_interval_days"


@pytest.mark.parametrize(
    ("table", "complaint"),
    [
        ({"timezone": "Mars/Olympus"}, "qc.schedule.timezone"),
        ({"daily_deadline": "8 am"}, "qc.schedule.daily_deadline"),
        ({"ge68_policy": "monthly"}, "qc.schedule.ge68_policy"),
        ({"linearity_interval_days": 0}, "qc.schedule.linearity_interval_days"),
        ({"devices": {CAL: {"installed": "last spring"}}}, "qc.schedule.devices.cal-1.installed"),
        ({"devices": {CAL: {"instaled": "2026-01-01"}}}, "qc.schedule.devices.cal-1.instaled"),
        ({"daily_dedline": "08:00"}, "qc.schedule.daily_dedline"),
    ],
)
def test_config_errors_name_the_key(table: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint.replace(".", r"\.")):
        ScheduleConfig.from_table(ConfigTable(table, "qc.schedule"))


# -- daily items --------------------------------------------------------------------------


def test_daily_items_follow_the_local_day_across_a_dst_change() -> None:
    s = stage()
    # Saturday 28 March 2026, winter time (UTC+1): QC done at 07:10 local = 06:10Z.
    committed(s, procedure(utc("2026-03-28T06:00:00Z"), utc("2026-03-28T06:10:00Z"), "pass"))
    before_midnight = utc("2026-03-28T22:59:00Z")  # 23:59 local on the 28th
    constancy = item(s, "daily_constancy", before_midnight)
    assert constancy.state == "done"
    # Due again at local midnight of the 29th = 23:00Z on the 28th (still UTC+1 then) ...
    assert constancy.due_ns == utc("2026-03-28T23:00:00Z")
    # ... and overdue at 08:00 local on the 29th, which is summer time (UTC+2): 06:00Z.
    assert constancy.overdue_ns == utc("2026-03-29T06:00:00Z")
    after_midnight = item(s, "daily_constancy", utc("2026-03-28T23:00:00Z"))
    assert (after_midnight.state, after_midnight.due_ns) == ("due", utc("2026-03-28T23:00:00Z"))
    assert item(s, "background", utc("2026-03-29T05:59:00Z")).state == "due"
    assert item(s, "background", utc("2026-03-29T06:00:00Z")).state == "overdue"
    # The 29th has 23 hours: the next midnight (UTC+2) is 22:00Z on the 29th.
    committed(s, procedure(utc("2026-03-29T06:30:00Z"), utc("2026-03-29T06:40:00Z"), "warn"))
    done = item(s, "daily_constancy", utc("2026-03-29T12:00:00Z"))
    assert (done.state, done.last_verdict, done.due_ns) == ("done", "warn", utc("2026-03-29T22:00:00Z"))


def test_a_patient_measurement_before_qc_makes_it_overdue_and_is_marked() -> None:
    s = stage()
    seven = utc("2026-06-10T05:00:00Z")  # 07:00 local (UTC+2), before the 08:00 deadline
    out = committed(s, measurement(seven - H, procedure_id=uuid.uuid4().hex), measurement(seven))
    qc_measurement, patient = out[0], next(m for m in out[1:] if m.kind == "measurement")
    assert "qc_state" not in qc_measurement.payload
    assert patient.payload["qc_state"] == "overdue"
    statuses = [m for m in out if m.kind == "qc_status" and m.payload["item"] == "daily_constancy"]
    assert statuses[-1].payload["state"] == "overdue" and statuses[-1].payload["alarm"] is True
    assert statuses[-1].payload["overdue_ns"] == seven
    assert out.index(statuses[-1]) > out.index(patient)  # placed after the message that changed it
    # The daily check then clears it, and later readings carry nothing.
    committed(s, procedure(seven + H, seven + H + 600 * 10**9, "pass"))
    later = committed(s, reading(seven + 2 * H))
    assert "qc_state" not in later[0].payload


def test_the_deadline_alone_makes_it_overdue_through_tick_and_readings_carry_it() -> None:
    s = stage()
    committed(s, reading(utc("2026-06-10T04:00:00Z")))  # 06:00 local: due, not overdue
    first = s.tick(utc("2026-06-10T04:00:01Z"))  # the items no message touched yet: published once
    assert {m.payload["item"] for m in first.messages} == {"linearity", "accuracy", "geometry"}
    s.apply(first)
    assert s.tick(utc("2026-06-10T05:59:59Z")).messages == ()
    ticked = s.tick(utc("2026-06-10T06:00:00Z"))  # 08:00 local
    overdue = {m.payload["item"]: m.payload["state"] for m in ticked.messages}
    assert overdue["daily_constancy"] == overdue["background"] == "overdue"
    s.apply(ticked)
    assert s.tick(utc("2026-06-10T06:00:01Z")).messages == ()  # published once
    marked = committed(s, reading(utc("2026-06-10T06:05:00Z")))
    assert marked[0].payload["qc_state"] == "overdue"


def test_failed_stays_failed_across_days_until_a_later_pass() -> None:
    s = stage()
    day1 = utc("2026-06-10T05:00:00Z")
    committed(s, procedure(day1, day1 + 600 * 10**9, "fail"))
    assert item(s, "daily_constancy", day1 + 2 * DAY).state == "failed"
    assert committed(s, reading(day1 + DAY))[0].payload["qc_state"] == "failed"
    committed(s, procedure(day1 + DAY + H, day1 + DAY + 2 * H, "pass"))
    assert item(s, "daily_constancy", day1 + DAY + 3 * H).state == "done"


def test_a_failing_constancy_fails_the_day_even_if_its_procedure_never_completes() -> None:
    """Cs-137 judged -30 %, then the procedure timed out: the item stayed merely due, doses got no qc_state."""
    s = stage()
    start = utc("2026-06-10T05:00:00Z")  # 07:00 in Berlin, before the 08:00 deadline
    committed(s, result("constancy", "fail", start + 120 * 10**9, setting="Cs-137"))
    committed(s, procedure(start, start + 1800 * 10**9, None, status="incomplete"))  # type: ignore[arg-type]
    assert item(s, "daily_constancy", start + 1900 * 10**9).state == "failed"
    assert committed(s, reading(start + 1900 * 10**9))[0].payload["qc_state"] == "failed"


def test_a_station_clock_running_ahead_does_not_make_todays_qc_overdue() -> None:
    """The schedule's clock followed an elution stamped by a station 2 days ahead: today's items turned overdue."""
    s = stage()
    now = utc("2026-06-10T04:00:00Z")  # 06:00 in Berlin, two hours before the deadline
    committed(s, reading(now), elution(now + 2 * DAY + 4 * H))  # 10:00 in Berlin, two days on
    ticked = s.tick(now + 60 * 10**9)  # the controller's clock, a minute later
    s.apply(ticked)
    daily = {
        m.payload["item"]: m.payload["state"]
        for m in ticked.statuses
        if m.payload["item"] in ("daily_constancy", "background")
    }
    assert set(daily.values()) <= {"due"}, daily
    assert item(s, "daily_constancy", now + 60 * 10**9).state == "due"


def test_a_dose_prescribed_for_tomorrow_does_not_move_the_schedule_to_tomorrow() -> None:
    """A dosage verdict is timed at the administration: one for 10:00 tomorrow made tomorrow's QC overdue tonight."""
    s = stage()
    tonight = utc("2026-06-10T21:30:00Z")  # 23:30 in Berlin
    committed(s, reading(tonight), result("dosage", "pass", tonight + 10 * H + 30 * 60 * 10**9))
    ticked = s.tick(tonight + 60 * 10**9)
    assert not [
        m for m in ticked.statuses if m.payload["state"] == "overdue" and m.payload["item"] == "daily_constancy"
    ]


def test_a_failed_background_inside_the_procedure_fails_background_only() -> None:
    s = stage()
    start = utc("2026-06-10T05:00:00Z")
    committed(
        s,
        result("background", "fail", start + 60 * 10**9),
        procedure(start, start + 600 * 10**9, "fail"),
    )
    now = start + H
    assert item(s, "background", now).state == "failed"
    assert item(s, "daily_constancy", now).state == "failed"  # the procedure's verdict is its worst result
    committed(s, result("background", "pass", start + 2 * H), procedure(start + 2 * H, start + 3 * H, "pass"))
    assert item(s, "background", start + 4 * H).state == "done"


def test_a_standalone_background_check_does_or_fails_the_daily_background_item() -> None:
    s = stage()
    at = utc("2026-06-10T05:00:00Z")  # 07:00 local (UTC+2), no daily procedure
    committed(s, result("background", "pass", at))
    background = item(s, "background", at + H)
    assert (background.state, background.last_done_ns) == ("done", at)
    assert item(s, "daily_constancy", at + H - 1).state == "due"  # still to do until 08:00 local (06:00Z)
    # Done for that local day only: local midnight of 11 June is 22:00Z on the 10th.
    assert item(s, "background", utc("2026-06-10T21:59:59Z")).state == "done"
    assert item(s, "background", utc("2026-06-10T22:00:00Z")).state == "due"
    committed(s, result("background", "fail", at + 2 * H))
    assert item(s, "background", at + 2 * H).state == "failed"
    assert committed(s, reading(at + 2 * H + 1))[0].payload["qc_state"] == "failed"
    committed(s, result("background", "pass", at + 3 * H))
    assert item(s, "background", at + 3 * H).state == "done"


def test_qc_state_is_judged_at_the_readings_own_time() -> None:
    s = stage()
    deadline = utc("2026-06-10T06:00:00Z")  # 08:00 local (UTC+2)
    s.apply(s.tick(deadline))  # the clock has passed the deadline ...
    early = committed(s, reading(deadline - 60 * 10**9), measurement(deadline - 30 * 10**9, uuid.uuid4().hex))
    assert [m.payload.get("qc_state") for m in early if m.kind != "qc_status"] == [None, None]  # ... these had not
    assert committed(s, reading(deadline + 60 * 10**9))[0].payload["qc_state"] == "overdue"


# -- interval items -----------------------------------------------------------------------


def test_quarterly_linearity_is_done_then_due_then_overdue() -> None:
    s = stage(linearity_interval_days=91, linearity_grace_days=7)
    done_at = utc("2026-01-05T10:00:00Z")
    committed(s, result("linearity", "pass", done_at))
    due, overdue = done_at + 91 * DAY, done_at + 98 * DAY
    assert item(s, "linearity", due - 1).state == "done"
    status = item(s, "linearity", due)
    assert (status.state, status.due_ns, status.overdue_ns, status.last_done_ns) == ("due", due, overdue, done_at)
    assert item(s, "linearity", overdue).state == "overdue"
    committed(s, result("linearity", "fail", overdue + DAY))
    assert item(s, "linearity", overdue + DAY).state == "failed"


def test_linearity_by_shielded_sleeves_does_the_quarterly_linearity_item() -> None:
    """A sleeve result (test linearity_sleeve) left the linearity item due: the schedule knew only the decay method."""
    s = stage(linearity_interval_days=91, linearity_grace_days=7)
    done_at = utc("2026-03-02T09:00:00Z")
    committed(s, result("linearity_sleeve", "pass", done_at))
    assert item(s, "linearity", done_at + 90 * DAY).state == "done"
    assert item(s, "linearity", done_at + 91 * DAY).state == "due"
    committed(s, result("linearity_sleeve", "fail", done_at + 92 * DAY))
    assert item(s, "linearity", done_at + 92 * DAY).state == "failed"


def test_never_done_intervals_are_due_at_installation_and_geometry_after_repair() -> None:
    installed, repaired = "2026-01-15", "2026-05-04"
    s = stage(
        devices={CAL: {"installed": installed, "repaired": repaired}},
        linearity_grace_days=7,
        accuracy_grace_days=30,
        geometry_grace_days=7,
    )
    # Local midnights: 15 January is UTC+1, 4 May is UTC+2.
    installed_ns, repaired_ns = utc("2026-01-14T23:00:00Z"), utc("2026-05-03T22:00:00Z")
    # Former 10 CFR 35.50(b)(2),(3): accuracy and linearity "upon installation and at least
    # annually / quarterly thereafter": never done, both are due at installation, not a period later.
    accuracy = item(s, "accuracy", installed_ns + DAY)
    assert (accuracy.state, accuracy.due_ns, accuracy.overdue_ns) == ("due", installed_ns, installed_ns + 30 * DAY)
    assert accuracy.last_done_ns is None
    linearity = item(s, "linearity", installed_ns + 7 * DAY)
    assert (linearity.state, linearity.due_ns, linearity.overdue_ns) == (
        "overdue",
        installed_ns,
        installed_ns + 7 * DAY,
    )
    # Once done, the interval counts from the test: accuracy on 1 February 10:00Z, due a year later.
    accuracy_done = utc("2026-02-01T10:00:00Z")
    committed(s, result("accuracy", "pass", accuracy_done))
    accuracy = item(s, "accuracy", accuracy_done + DAY)
    assert (accuracy.state, accuracy.due_ns) == ("done", utc("2027-02-01T10:00:00Z"))
    geometry = item(s, "geometry", repaired_ns + 8 * DAY)
    assert (geometry.state, geometry.due_ns, geometry.overdue_ns) == ("overdue", repaired_ns, repaired_ns + 7 * DAY)
    committed(s, result("geometry", "pass", repaired_ns + 9 * DAY))
    assert item(s, "geometry", repaired_ns + 9 * DAY).state == "done"


def test_an_interval_test_before_installation_does_not_count() -> None:
    s = stage(devices={CAL: {"installed": "2026-01-15"}}, linearity_grace_days=7)
    installed_ns = utc("2026-01-14T23:00:00Z")  # local midnight of 15 January, UTC+1
    before = utc("2026-01-10T10:00:00Z")  # tests before installation, e.g. at the vendor's
    committed(s, result("linearity", "pass", before), result("accuracy", "fail", before))
    linearity = item(s, "linearity", installed_ns + DAY)
    assert (linearity.state, linearity.due_ns) == ("due", installed_ns)
    assert item(s, "accuracy", installed_ns + DAY).state == "due"


def test_a_bare_installation_date_is_midnight_in_the_site_zone() -> None:
    # Pacific/Auckland keeps daylight time (NZDT, UTC+13) in January: local midnight of
    # 15 January 2026 is 11:00Z on 14 January, a different UTC date.
    table = tomllib.loads('timezone = "Pacific/Auckland"\n[devices.cal-1]\ninstalled = 2026-01-15\n')
    toml_date = ScheduleConfig.from_table(ConfigTable(table, "qc.schedule"))
    text_date = ScheduleConfig.from_table(
        ConfigTable({"timezone": "Pacific/Auckland", "devices": {CAL: {"installed": "2026-01-15"}}}, "qc.schedule")
    )
    assert toml_date.devices[CAL].installed_ns == text_date.devices[CAL].installed_ns == utc("2026-01-14T11:00:00Z")
    s = ScheduleStage(SITE, toml_date, {CAL: STATION}, [])
    assert item(s, "geometry", utc("2026-01-14T12:00:00Z")).due_ns == utc("2026-01-14T11:00:00Z")


# -- Ge-68 follow-ups ---------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "expected"), [("every", 4), ("first_of_day", 3), ("weekly", 2)])
def test_ge68_policy_selects_elutions(policy: str, expected: int) -> None:
    s = stage(ge68_policy=policy)
    # Mon 1 June 2026 08:00 and 14:00 local, Tue 2 June, Mon 8 June (next ISO week).
    ends = ["2026-06-01T06:00:00Z", "2026-06-01T12:00:00Z", "2026-06-02T06:00:00Z", "2026-06-08T06:00:00Z"]
    committed(s, *(elution(utc(end)) for end in ends))
    follow_ups = [st for st in s.current(utc("2026-06-08T07:00:00Z")) if st.test == "ge68_breakthrough"]
    assert len(follow_ups) == expected


def test_ge68_follow_up_is_due_48_h_after_elution_and_done_by_its_result() -> None:
    s = stage(ge68_grace_h=24)
    end = utc("2026-06-01T06:00:00Z")
    eluted = elution(end)
    out = committed(s, eluted)
    name = f"ge68_breakthrough/{eluted.msg_id}"
    created = next(m for m in out if m.kind == "qc_status")
    assert created.payload["item"] == name and created.payload["elution_id"] == eluted.msg_id
    assert created.topic == f"hotlab/{SITE}/elution-1/{GEN}/qc/status/{name}"
    status = item(s, name, end + 72 * H)
    assert (status.state, status.due_ns, status.overdue_ns) == ("overdue", end + 48 * H, end + 72 * H)
    committed(s, result("ge68_breakthrough", "pass", end + 73 * H, device=CAL, elution_id=eluted.msg_id))
    assert item(s, name, end + 73 * H).state == "done"


def test_a_ge68_result_measured_too_early_neither_does_nor_fails_the_follow_up() -> None:
    s = stage(ge68_delay_h=48, ge68_grace_h=24)
    end = utc("2026-06-01T06:00:00Z")
    eluted = elution(end)
    committed(s, eluted)
    name = f"ge68_breakthrough/{eluted.msg_id}"
    # 2 June 18:00Z is 36 h after the end of elution: too early for the >= 48 h re-measurement.
    too_early = utc("2026-06-02T18:00:00Z")
    committed(s, result("ge68_breakthrough", "pass", too_early, elution_id=eluted.msg_id))
    assert item(s, name, too_early + H).state == "due"
    committed(s, result("ge68_breakthrough", "fail", too_early + H, elution_id=eluted.msg_id))
    assert item(s, name, too_early + 2 * H).state == "due"
    # 3 June 06:00Z is exactly 48 h after 1 June 06:00Z: this one counts.
    in_time = utc("2026-06-03T06:00:00Z")
    committed(s, result("ge68_breakthrough", "pass", in_time, elution_id=eluted.msg_id))
    status = item(s, name, in_time)
    assert (status.state, status.due_ns, status.last_done_ns) == ("done", in_time, in_time)


def test_an_overdue_or_failed_ge68_follow_up_stays_listed_until_done() -> None:
    s = stage(ge68_policy="every", ge68_track_days=14, ge68_grace_h=24)
    missed, failed = elution(utc("2026-06-01T06:00:00Z")), elution(utc("2026-06-01T12:00:00Z"))
    committed(s, missed, failed)
    committed(s, result("ge68_breakthrough", "fail", utc("2026-06-03T12:00:00Z"), elution_id=failed.msg_id))
    # 21 June is 20 days after both elutions, beyond the 14-day tracking window.
    later = utc("2026-06-21T06:00:00Z")
    s.apply(s.tick(later))
    states = {st.elution_id: st.state for st in s.current(later) if st.test == "ge68_breakthrough"}
    assert states == {missed.msg_id: "overdue", failed.msg_id: "failed"}
    assert s.tick(later + H).messages == ()  # still listed, so nothing is published again
    # Done at last: published as done, and listed until 14 days after that result.
    done_at = later + H
    out = committed(s, result("ge68_breakthrough", "pass", done_at, elution_id=missed.msg_id))
    assert [m.payload["state"] for m in out if m.kind == "qc_status"] == ["done"]
    s.apply(s.tick(done_at + 14 * DAY - 1))
    assert item(s, f"ge68_breakthrough/{missed.msg_id}", done_at + 14 * DAY - 1).state == "done"
    s.apply(s.tick(done_at + 14 * DAY + 1))
    listed = [st.elution_id for st in s.current(done_at + 14 * DAY + 1) if st.test == "ge68_breakthrough"]
    assert listed == [failed.msg_id]


def test_an_unselected_elution_is_not_listed_after_its_weeks_first_is_forgotten() -> None:
    s = stage(ge68_policy="weekly", ge68_track_days=14)
    # Monday 1 June and Sunday 7 June 2026 are in the same ISO week (23): only the first is selected.
    first, second = elution(utc("2026-06-01T06:00:00Z")), elution(utc("2026-06-07T06:00:00Z"))
    committed(s, first, second)
    committed(s, result("ge68_breakthrough", "pass", utc("2026-06-03T07:00:00Z"), elution_id=first.msg_id))
    for day in range(10, 40, 3):  # the clock moves on, past the window of both, pruning as it goes
        now = utc("2026-06-01T06:00:00Z") + day * DAY
        s.apply(s.tick(now))
        assert [st.item for st in s.current(now) if st.test == "ge68_breakthrough" and st.state != "done"] == []


def test_restore_finds_old_undone_follow_ups_and_standalone_background_checks(tmp_path: Path) -> None:
    now = utc("2026-07-01T06:30:00Z")  # 08:30 local (UTC+2)
    end = now - 60 * DAY  # long before the tracking window and any look-back
    record = ElutionRecord("elution-1", GEN, "Ge-68", "Ga-68", 7, 1.1e9, 5.0, end - 600 * 10**9, end)
    old = elution_message(SITE, record, msg_id=elution_msg_id(record))
    # 5 Bq with the chamber empty at 07:30 local today, outside any procedure: a pass.
    background = calibrator_rules.background(5.0, now - H, load_limits()["background"]).to_message(SITE, STATION, CAL)
    assert background.payload["verdict"] == "pass"
    with HistoryArchive(tmp_path / "history.sqlite3") as archive:
        archive.add_many([old, background])
        s = stage(ge68_track_days=14)
        s.restore(archive, now_ns=now)
    follow_up = item(s, f"ge68_breakthrough/{old.msg_id}", now)
    assert follow_up.state == "overdue"
    assert item(s, "background", now).state == "done"


# -- two phases ---------------------------------------------------------------------------


def test_process_is_pure_and_apply_is_idempotent() -> None:
    s = stage()
    batch = (reading(utc("2026-06-10T07:00:00Z")), measurement(utc("2026-06-10T07:01:00Z")))
    first, second = s.process(*batch), s.process(*batch)
    assert first.messages == second.messages  # nothing changed in between: same statuses, same msg_ids
    assert s.current(utc("2026-06-10T07:02:00Z"))[0].state == "overdue"  # the deadline, not the batch
    s.apply(first)
    s.apply(first)
    third = s.process(reading(utc("2026-06-10T07:03:00Z")))
    assert [m.kind for m in third.messages] == ["reading"]  # nothing new to publish after the first apply


def test_published_statuses_come_back_as_published() -> None:
    s = stage()
    ticked = s.tick(utc("2026-06-10T07:00:00Z"))
    assert len(ticked.messages) == 5  # every calibrator item, none published before
    fresh = stage()
    fresh.apply(fresh.process(*ticked.messages))  # a tick's statuses committed through the normal path
    assert fresh.tick(utc("2026-06-10T07:00:00Z")).messages == ()


def test_only_calibrators_with_a_check_source_have_daily_qc() -> None:
    """A [qc.devices] entry without a check source got daily items it could never complete."""
    from hotlab.controller.qc.engine import QcConfig
    from hotlab.controller.qc.schedule_stage import schedule_stage_for

    qc = QcConfig.from_mapping(
        {
            "sources": {"CS": {"nuclide": "Cs-137", "activity": "7.4 MBq", "reference_time": "2020-01-01T00:00:00Z"}},
            "devices": {"checked": {"check_source": "CS"}, "dispensing": {"linearity_low_bq": "1 MBq"}},
        }
    )
    stage = schedule_stage_for("lab", qc, qc.schedule, {"checked": "qc-lab", "dispensing": "hotcell"})
    assert dict(stage.schedule.calibrators) == {"checked": "qc-lab"}
