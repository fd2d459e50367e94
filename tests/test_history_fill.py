"""`hotlab demo --history-days N`: months of the demo lab's life made by its real simulators, QC and sinks.

One month is filled once (the demo's own lab: its simulators, a real mosquitto for the QC officer's
console, the demo's accounts and audit trail) and then read back from the archive, checked against
the lab's routine and against physics computed here; `hotlab report` is run over it. Further tests fill
their own lab: into InfluxDB (a real influxd), and the live controller continuing from the history.
"""

from __future__ import annotations

import asyncio
import math
import re
import secrets
import statistics
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest

from hotlab.controller.archive import HistoryArchive, TimeRange
from hotlab.controller.audit import KEY_FILE_ENV, load_hmac_key
from hotlab.controller.cli.demo import DEMO_LAB
from hotlab.controller.config import LabConfig
from hotlab.controller.lab.demo_review import demo_signer
from hotlab.controller.lab.history_fill import HistorySummary, fill_history
from hotlab.controller.lab.history_pipeline import HistoryRefused
from hotlab.controller.lab.simulated_lab import SimLab, simulated_lab, station_mo99_breakthrough
from hotlab.controller.qc.stage import qc_stage_for
from hotlab.controller.service import ControllerService
from hotlab.errors import InputError
from hotlab.physics.nuclides import get_nuclide
from hotlab.physics.utc_time import parse_utc_ns
from tests.cli_process import run_hotlab
from tests.influx_service import InfluxService, influx_database, influx_server  # noqa: F401
from tests.mosquitto_service import require_mosquitto

pytestmark = pytest.mark.integration

DAYS = 30
NS_PER_S = 1_000_000_000
HOUR_NS = 3600 * NS_PER_S
DAY_NS = 24 * HOUR_NS
#: The demo lab's day is UTC (it sets no [qc.schedule] timezone); the daily check is at 07:00 (the plan's routine).
DAILY_CHECK = time(7, 0)


@dataclass(frozen=True)
class FilledLab:
    config: LabConfig
    summary: HistorySummary
    state_dir: Path
    key_file: Path

    @property
    def archive(self) -> Path:
        assert self.config.history_path is not None
        return self.config.history_path


async def _fill(
    state_dir: Path, lab: SimLab, days: int, influx: dict[str, Any] | None = None
) -> tuple[LabConfig, HistorySummary]:
    """The demo's start-up up to its controller (controller/cli/demo.py), then the history."""
    key = _audit_key(state_dir)
    audit_path = state_dir / "audit.jsonl"
    sign = await asyncio.to_thread(demo_signer, state_dir, audit_path, state_dir / "history.sqlite3", key)
    async with simulated_lab(state_dir, lab, influx=influx, audit_path=audit_path, sign=sign) as config:
        summary = await fill_history(config, lab, days)
    return config, summary


def _audit_key(state_dir: Path) -> bytes:
    """A keyed audit trail's key, in `state_dir/audit.key` as the demo keeps its own (signatures need one)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "audit.key"
    path.write_text(secrets.token_hex(32) + "\n")
    key = load_hmac_key({KEY_FILE_ENV: str(path)})
    assert key is not None
    return key


@pytest.fixture(scope="module")
def month(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FilledLab]:
    require_mosquitto()
    state_dir = tmp_path_factory.mktemp("history") / "state"
    config, summary = asyncio.run(_fill(state_dir, DEMO_LAB, DAYS))
    yield FilledLab(config, summary, state_dir, state_dir / "audit.key")


def _records(path: Path, kind: str, **where: str) -> list[dict[str, Any]]:
    with HistoryArchive(path, read_only=True) as archive:
        return archive.query(kind, **where)


def _all_records(path: Path) -> list[dict[str, Any]]:
    kinds = ("reading", "measurement", "measurement_label", "elution", "qc_result", "qc_procedure", "qc_baseline",
             "qc_status", "controller_alarm", "device_status", "audit_anchor")  # fmt: skip
    with HistoryArchive(path, read_only=True) as archive:
        return [record for kind in kinds for record in archive.query(kind)]


def _day(time_ns: int) -> date:
    return datetime.fromtimestamp(time_ns / NS_PER_S, UTC).date()


def _at(day: date, at: time) -> int:
    return int(datetime.combine(day, at, tzinfo=UTC).timestamp()) * NS_PER_S


def test_every_record_is_in_the_window_once_and_as_committed(month: FilledLab) -> None:
    records = _all_records(month.archive)
    summary = month.summary
    assert summary.end_ns - summary.start_ns == DAYS * DAY_NS
    assert all(summary.start_ns <= r["time_ns"] <= summary.end_ns for r in records)
    ids = [r["msg_id"] for r in records]
    assert len(ids) == len(set(ids))
    # Nothing the fill committed was dropped as a duplicate msg_id on the way into the archive.
    assert Counter(r["schema"].split("/")[0].removeprefix("hotlab.") for r in records) == Counter(summary.kinds)
    with HistoryArchive(month.archive, read_only=True) as archive:
        assert archive.count() == sum(summary.kinds.values())
    readings = [r for r in records if r["schema"].startswith("hotlab.reading/")]
    assert readings and all(r["quality"] == "good" for r in readings)


def test_one_daily_check_a_day_a_slow_drift_and_exactly_one_failure(month: FilledLab) -> None:
    summary = month.summary
    constancy = sorted(_records(month.archive, "qc_result", test="constancy"), key=lambda r: r["time_ns"])
    days = [_day(r["time_ns"]) for r in constancy]
    last = _day(summary.end_ns)
    if _at(last, DAILY_CHECK) + 60 * NS_PER_S > summary.end_ns:
        last -= timedelta(days=1)
    expected_days = [
        summary.acceptance_day + timedelta(days=n) for n in range((last - summary.acceptance_day).days + 1)
    ]
    assert days == expected_days  # one result per day: the demo's check source is checked on its own setting only
    failures = [r for r in constancy if r["verdict"] == "fail"]
    assert len(failures) == 1 and len(constancy) - 1 == sum(r["verdict"] == "pass" for r in constancy)
    failure = failures[0]
    assert _day(failure["time_ns"]) == summary.failure_day and summary.failure_day.weekday() == 5  # a Saturday
    assert failure["deviation_pct"] < -10.0  # the constancy limit fails beyond +-10 % (docs/qc.md, S1)
    # The drift: each day's deviation from the baseline falls, by about the same amount a day.
    before = [r for r in constancy if r["time_ns"] < failure["time_ns"]]
    elapsed_days = [(r["time_ns"] - before[0]["time_ns"]) / DAY_NS for r in before]
    slope = statistics.linear_regression(elapsed_days, [r["deviation_pct"] for r in before]).slope
    assert slope < 0
    assert all(
        abs(r["deviation_pct"] - slope * d - before[0]["deviation_pct"]) < 0.5 for r, d in zip(before, elapsed_days)
    )


def test_the_repair_is_followed_by_a_baseline_and_a_geometry_test(month: FilledLab) -> None:
    failure = next(r for r in _records(month.archive, "qc_result", test="constancy") if r["verdict"] == "fail")
    ended = [p for p in _records(month.archive, "qc_procedure") if p["status"] == "complete"]
    baselines = sorted((p for p in ended if p["procedure"] == "baseline"), key=lambda p: p["started_ns"])
    assert len(baselines) == 2  # at acceptance, and after the repair
    after = baselines[1]
    assert failure["time_ns"] < after["started_ns"] < failure["time_ns"] + 12 * HOUR_NS
    assert "repair" in after["reason"] and after["started_by"] == {"user": "demo-qc-officer", "role": "qc_officer"}
    assert len(_records(month.archive, "qc_baseline")) == 2
    geometry = [p for p in ended if p["procedure"] == "geometry" and p["started_ns"] > after["started_ns"]]
    assert len(geometry) == 1 and geometry[0]["verdict"] == "pass"
    # Judged against the new baseline, the next morning's check is back near 0 %.
    next_check = min(
        (r for r in _records(month.archive, "qc_result", test="constancy") if r["time_ns"] > after["started_ns"]),
        key=lambda r: r["time_ns"],
    )
    assert next_check["verdict"] == "pass" and abs(next_check["deviation_pct"]) < 1.0


def test_a_linearity_series_every_week_that_ended_before_now(month: FilledLab) -> None:
    summary = month.summary
    # A series starts on Monday and is read until Friday 16:00 at the latest; only finished ones are in the history.
    mondays = [
        summary.acceptance_day + timedelta(days=n)
        for n in range(DAYS + 1)
        if (summary.acceptance_day + timedelta(days=n)).weekday() == 0
        and _at(summary.acceptance_day + timedelta(days=n + 4), time(17, 0)) < summary.end_ns
    ]
    results = sorted(_records(month.archive, "qc_result", test="linearity"), key=lambda r: r["time_ns"])
    assert [_day(r["inputs"]["points"][0]["time_ns"]) for r in results] == mondays
    assert len(mondays) in (math.floor(DAYS / 7) - 1, math.floor(DAYS / 7))
    for result in results:
        points = result["inputs"]["points"]
        assert result["verdict"] == "pass" and len(points) >= 3
        assert points[-1]["activity_bq"] <= 1.11e6 < points[-2]["activity_bq"]  # ends at linearity_low_bq (30 uCi)


def test_the_ga68_generator_yield_follows_bateman_and_declines_over_its_life(month: FilledLab) -> None:
    yields = sorted(
        (r for r in _records(month.archive, "qc_result", test="elution_yield") if r["inputs"]["parent"] == "Ge-68"),
        key=lambda r: r["time_ns"],
    )
    assert len({r["device"] for r in yields}) == 1 and len(yields) >= 15
    ge68, ga68 = get_nuclide("Ge-68"), get_nuclide("Ga-68")
    lambda_ge, lambda_ga = math.log(2) / ge68.half_life_s, math.log(2) / ga68.half_life_s
    after_weekend = [r for r in yields if r["inputs"]["since_last_elution_s"] > 48 * 3600]
    assert after_weekend
    for result in after_weekend:
        inputs = result["inputs"]
        age_s = (result["time_ns"] - parse_utc_ns(inputs["calibration_time"])) / NS_PER_S
        parent_bq = inputs["calibration_bq"] * math.exp(-lambda_ge * age_s)
        # Ingrowth over > 48 h (> 40 Ga-68 half-lives) is complete: transient equilibrium, A_Ga = A_Ge l_Ga/(l_Ga - l_Ge).
        available_bq = parent_bq * lambda_ga / (lambda_ga - lambda_ge)
        assert inputs["available_bq"] == pytest.approx(available_bq, rel=1e-6)
        assert result["value_judged"] == pytest.approx(100 * inputs["eluted_bq"] / available_bq, rel=1e-6)
    days = [(r["time_ns"] - yields[0]["time_ns"]) / DAY_NS for r in yields]
    slope = statistics.linear_regression(days, [r["value_judged"] for r in yields]).slope
    assert slope < 0  # %/day: the column loses yield with age and use
    assert all(55.0 < r["value_judged"] < 85.0 for r in yields)


def test_every_first_ga68_elution_of_a_day_is_followed_up_in_time_and_nothing_went_overdue(month: FilledLab) -> None:
    elutions = [e for e in _records(month.archive, "elution") if e["parent"] == "Ge-68"]
    first_of_day = {min((e for e in elutions if _day(e["end_ns"]) == d), key=lambda e: e["end_ns"])["msg_id"]: d
                    for d in {_day(e["end_ns"]) for e in elutions}}  # fmt: skip
    follow_ups = {r["inputs"]["elution_id"]: r for r in _records(month.archive, "qc_result", test="ge68_breakthrough")}
    assert set(follow_ups) == set(first_of_day)
    ends = {e["msg_id"]: e["end_ns"] for e in elutions}
    for elution_id, result in follow_ups.items():
        waited = result["time_ns"] - ends[elution_id]
        assert 48 * HOUR_NS <= waited < 72 * HOUR_NS and result["verdict"] == "pass"  # due at 48 h, overdue at 72 h
    states = Counter(s["state"] for s in _records(month.archive, "qc_status"))
    assert states["overdue"] == 0 and states["done"] > 0
    failed = [s for s in _records(month.archive, "qc_status") if s["state"] == "failed"]
    assert failed and {s["item"] for s in failed} == {"daily_constancy"}


def test_the_report_over_the_history_shows_its_results(month: FilledLab, tmp_path: Path) -> None:
    summary = month.summary
    period = TimeRange.from_text(summary.acceptance_day.isoformat(), _day(summary.end_ns).isoformat())
    with HistoryArchive(month.archive, read_only=True) as archive:
        results = archive.query("qc_result", period)
        elutions = archive.query("elution", period)
    out = tmp_path / "report.html"
    done = run_hotlab(
        "report", "--from", summary.acceptance_day.isoformat(), "--to", _day(summary.end_ns).isoformat(),
        "--archive", str(month.archive), "--audit", str(month.state_dir / "audit.jsonl"),
        "--audit-key-file", str(month.key_file), "--out", str(out),
        cwd=tmp_path, timeout_s=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"{len(results)} QC result(s), {len(elutions)} elution(s)" in done.stdout
    html = out.read_text(encoding="utf-8")
    for test in (
        "constancy",
        "linearity",
        "elution_yield",
        "ge68_breakthrough",
        "geometry",
        "accuracy",
        "mo99_breakthrough",
    ):
        assert test in html
    assert len(re.findall(r"\bFAIL\b", html, flags=re.IGNORECASE)) >= 1


async def test_a_second_fill_is_refused_and_adds_nothing(month: FilledLab) -> None:
    with HistoryArchive(month.archive, read_only=True) as archive:
        held = archive.count()
    with pytest.raises(HistoryRefused) as refused:
        await fill_history(month.config, DEMO_LAB, DAYS)
    assert "already holds" in str(refused.value) and "\n" not in str(refused.value)
    with HistoryArchive(month.archive, read_only=True) as archive:
        assert archive.count() == held


async def test_a_window_too_short_for_the_story_is_refused(month: FilledLab) -> None:
    with pytest.raises(InputError, match=r"--history-days must be from 14 to 365, got 3"):
        await fill_history(month.config, DEMO_LAB, 3)


def test_the_history_reaches_influxdb_too(tmp_path: Path, influx_server: InfluxService, influx_database: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    require_mosquitto()
    monkeypatch.setenv("TEST_INFLUX_PASSWORD", influx_server.password)
    influx = {
        "url": influx_server.v2_url,
        "username": influx_server.username,
        "password_env": "TEST_INFLUX_PASSWORD",
        "database": influx_database,
        "flush_interval_s": 0.2,
    }
    config, summary = asyncio.run(_fill(tmp_path / "state", DEMO_LAB, 14, influx))
    assert config.history_path is not None
    with HistoryArchive(config.history_path, read_only=True) as archive:
        results = archive.count("qc_result")
    assert results == sum(summary.results.values()) > 0
    counted = influx_server.rows('SELECT count("msg_id") FROM "qc_result"', influx_database)
    assert counted[0]["count"] == results


async def test_the_live_lab_continues_from_the_history(tmp_path: Path) -> None:
    """The live generators' first elutions are judged (not taken for re-deliveries), from the config's seeds."""
    require_mosquitto()
    lab = replace(DEMO_LAB, acceleration=600.0, calibrator_acceleration=600.0)
    state_dir = tmp_path / "state"
    key = _audit_key(state_dir)
    sign = await asyncio.to_thread(
        demo_signer, state_dir, state_dir / "audit.jsonl", state_dir / "history.sqlite3", key
    )
    async with simulated_lab(state_dir, lab, audit_path=state_dir / "audit.jsonl", sign=sign) as config:
        summary = await fill_history(config, lab, 14)
        service = ControllerService(
            config, processors=[station_mo99_breakthrough(config.site)], stage=qc_stage_for(config)
        )
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(12.0, stop.set)
        await service.run(stop)
    live = {g.generator_id for g in lab.generators}
    yields = [
        r for r in _records(state_dir / "history.sqlite3", "qc_result", test="elution_yield") if r["device"] in live
    ]
    assert {r["device"] for r in yields} == live
    assert all(60.0 < r["value_judged"] < 100.0 for r in yields)
    alarms = _records(state_dir / "history.sqlite3", "controller_alarm")
    assert not [a for a in alarms if a.get("alarm") == "elution_counter_reset" and a["active"]]
    assert all(r["time_ns"] <= summary.end_ns for r in _records(state_dir / "history.sqlite3", "qc_result")
               if r["device"] not in live and r["device"] != "qc-calibrator")  # fmt: skip
