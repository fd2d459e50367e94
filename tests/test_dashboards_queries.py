"""Every dashboard query, run against a real influxd after a simulated three-day lab run written by InfluxSink.

The run is physics-backed so the panels show plausible shapes: generator elutions follow Bateman
ingrowth of the daughter since the previous elution, the constancy check source decays with its
half-life, doses decay from the eluate they were drawn from. Half-lives are ENSDF values (NNDC).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hotlab.controller.messages import (
    MeasurementValues,
    Message,
    device_status_message,
    elution_message,
    measurement_message,
    qc_message,
    reading_message,
    suspect_alarm_message,
)
from hotlab.controller.outbox import AsyncOutbox, Outbox
from hotlab.controller.qc.schedule import ItemStatus, State
from hotlab.controller.qc.schedule_stage import qc_status_message
from hotlab.controller.sinks.influx import InfluxConfig, InfluxSink
from hotlab.drivers.records import ElutionRecord, Reading
from hotlab.physics.units import from_bq
from tests import influx_service
from tests.influx_service import InfluxService

pytestmark = pytest.mark.integration

influx_server = influx_service.influx_server  # the shared fixture, used by name below

DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"
HOUR_NS = 3_600 * 10**9
MINUTE_NS = 60 * 10**9
RUN_START_NS = 1_793_577_600 * 10**9  # 2026-11-02T00:00:00Z
RUN_DAYS = 3
SITE = "uhb"
INTERVAL = "10m"  # what Grafana would pick for $__interval over 3 days at ~400 px

# Half-lives, ENSDF via NNDC NuDat: Mo-99 65.924(6) h, Tc-99m 6.0067(10) h, Ge-68 270.95(16) d,
# Ga-68 67.71(8) min, Cs-137 30.08(9) y.
T_HALF_S = {
    "Mo-99": 65.924 * 3600,
    "Tc-99m": 6.0067 * 3600,
    "Ge-68": 270.95 * 86400,
    "Ga-68": 67.71 * 60,
    "Cs-137": 30.08 * 365.25 * 86400,
}
# Fraction of parent decays that feed the daughter: Mo-99 -> Tc-99m ~0.876 (ENSDF A=99: the rest of the
# beta decay bypasses the 142.7 keV isomer); Ge-68 -> Ga-68 is 100 % electron capture.
BRANCHING = {"Mo-99": 0.876, "Ge-68": 1.0}


def decay_constant(nuclide: str) -> float:
    return math.log(2) / T_HALF_S[nuclide]


def decayed(activity_bq: float, nuclide: str, dt_s: float) -> float:
    """A(t) = A0 * 2^(-dt / T1/2)."""
    return activity_bq * 2.0 ** (-dt_s / T_HALF_S[nuclide])


def daughter_ingrown(parent_bq: float, parent: str, daughter: str, dt_s: float) -> float:
    """Daughter activity dt after a complete elution (Bateman, daughter starting at zero)."""
    lp, ld = decay_constant(parent), decay_constant(daughter)
    return BRANCHING[parent] * parent_bq * ld / (ld - lp) * (math.exp(-lp * dt_s) - math.exp(-ld * dt_s))


@dataclass(frozen=True)
class Station:
    name: str
    calibrator: str
    eluter: str
    generator: str
    parent: str
    daughter: str
    parent_bq_at_start: float
    elution_hours: tuple[int, ...]
    elution_efficiency: float
    display_unit: str
    breakthrough_pct: float


STATIONS = (
    Station("hotlab-1", "crc-55tr", "eluter-1", "ult-2291", "Mo-99", "Tc-99m", 40e9, (6, 13), 0.92, "mCi", 0.002),
    Station(
        "pet-1", "capintec-crc", "eluter-2", "gallia-07", "Ge-68", "Ga-68", 1.85e9, (8, 11, 14), 0.70, "MBq", 0.0003
    ),
)
CHECK_SOURCE_BQ = 7.4e6  # Cs-137 constancy source, reference activity at RUN_START_NS
INJECTED_QC = {("crc-55tr", 1): -6.4, ("capintec-crc", 2): 11.2}  # (device, day) -> deviation %: a warn, a fail
OUTAGE = (
    "capintec-crc",
    RUN_START_NS + 24 * HOUR_NS + 10 * HOUR_NS,
    RUN_START_NS + 24 * HOUR_NS + 10 * HOUR_NS + 30 * MINUTE_NS,
)
#: A bad serial line on day 2: the calibrator's frames lose a bit now and then; the controller marks those
#: readings suspect and raises the suspect-readings alarm for the hour, then clears it.
FLAKY = ("crc-55tr", RUN_START_NS + 2 * 24 * HOUR_NS + 9 * HOUR_NS, 6)


def verdict_for(deviation_pct: float) -> str:
    return "pass" if abs(deviation_pct) <= 5 else "warn" if abs(deviation_pct) <= 10 else "fail"


def _qc(
    station: Station, test: str, measured: float, expected: float, time_ns: int, source: str, detail: str
) -> Message:
    """A qc_result shaped like the QC engine's (QcResult.to_message): the envelope plus limit numbers and unit."""
    deviation = 100 * (measured - expected) / expected
    verdict = verdict_for(deviation)
    base = qc_message(
        SITE,
        station.name,
        station.calibrator,
        test=test,
        verdict=verdict,
        measured=measured,
        expected=expected,
        deviation_pct=deviation,
        limit="pass |dev| <= 5 %, warn <= 10 %, fail > 10 %",
        limit_source=source,
        inputs={},
        time_ns=time_ns,
    )
    extra = {
        "alarm": verdict != "pass",
        "unit": "Bq",
        "value_judged": deviation,
        "detail": detail,
        "limit_values": {"kind": "tolerance", "unit": "%", "warn": 5.0, "fail": 10.0},
    }
    return Message(base.kind, base.topic, base.payload | extra)


def simulated_lab_run(rng: random.Random) -> list[Message]:
    messages: list[Message] = []
    for station in STATIONS:
        messages += _elutions_and_doses(station, rng)
        messages += _calibrator_qc(station, rng)
    messages += _flaky_line()
    messages += _device_statuses(rng)
    return sorted(messages, key=lambda m: m.payload["time_ns"])


def _reading(station: Station, nuclide: str, activity_bq: float, time_ns: int, reason: str | None = None) -> Message:
    unit = station.display_unit
    raw = round(from_bq(activity_bq, unit), 3)
    frame = f"{raw:.3f} {unit} {nuclide}\r\n".encode()
    quality = "good" if reason is None else "suspect"
    reading = Reading(
        station.calibrator, nuclide, activity_bq, raw, unit, time_ns, frame, quality=quality, quality_reason=reason
    )
    return reading_message(SITE, station.name, reading)


def _measurement(station: Station, nuclide: str, plateau: list[Message], removal_ns: int) -> Message:
    """The controller's measurement of a settled plateau (no decay over a few seconds for the long-lived sources here)."""
    values = [float(m.payload["activity_bq"]) for m in plateau]
    times = [int(m.payload["time_ns"]) for m in plateau]
    return measurement_message(
        SITE,
        station.name,
        MeasurementValues(
            station.calibrator,
            nuclide,
            statistics.fmean(values),
            statistics.stdev(values),
            len(values),
            1.2e3,
            times[0],
            times[4],
            removal_ns,
            "removed",
            tuple(m.msg_id for m in plateau),
        ),
    )


def _flaky_line() -> list[Message]:
    device, start_ns, suspect = FLAKY
    [station] = [s for s in STATIONS if s.calibrator == device]
    out: list[Message] = []
    for index in range(suspect):
        time_ns = start_ns + index * 5 * MINUTE_NS
        out.append(_reading(station, "Tc-99m", 7.4e19, time_ns, "7.4e+07 TBq is outside the crc15r range"))
        out.append(_reading(station, "Tc-99m", 7.4e9, time_ns + 10**9))  # the re-read
    for active, time_ns in ((True, start_ns + 10 * MINUTE_NS), (False, start_ns + 70 * MINUTE_NS)):
        out.append(
            suspect_alarm_message(
                SITE,
                station.name,
                device,
                active=active,
                recent_suspect=3 if active else 0,
                window=10,
                threshold=0.2,
                total=3 if active else suspect,
                reason="7.4e+07 TBq is outside the crc15r range",
                time_ns=time_ns,
            )
        )
    return out


def _elutions_and_doses(station: Station, rng: random.Random) -> list[Message]:
    out: list[Message] = []
    last_elution_ns = RUN_START_NS - 24 * HOUR_NS  # the generator was fully eluted the day before
    counter = 40
    for day in range(RUN_DAYS):
        for hour in station.elution_hours:
            end_ns = RUN_START_NS + day * 24 * HOUR_NS + hour * HOUR_NS
            parent_at_last = decayed(station.parent_bq_at_start, station.parent, (last_elution_ns - RUN_START_NS) / 1e9)
            available = daughter_ingrown(
                parent_at_last, station.parent, station.daughter, (end_ns - last_elution_ns) / 1e9
            )
            efficiency = station.elution_efficiency * (1 - 0.01 * day) + rng.uniform(-0.02, 0.02)
            eluted = available * efficiency
            counter += 1
            record = ElutionRecord(
                station.name,
                station.generator,
                station.parent,
                station.daughter,
                counter,
                eluted,
                rng.choice((5.0, 5.0, 10.0)),
                end_ns - 90 * 10**9,
                end_ns,
            )
            out.append(
                elution_message(
                    SITE,
                    record,
                    yield_pct=100 * efficiency,
                    breakthrough_pct=station.breakthrough_pct * rng.uniform(0.5, 1.5),
                )
            )
            out.append(
                _reading(station, station.daughter, decayed(eluted, station.daughter, 300), end_ns + 5 * MINUTE_NS)
            )
            for dose in range(3):  # patient doses drawn from this eluate
                dt_s = (20 + 25 * dose) * 60
                fraction = rng.uniform(0.05, 0.2)
                out.append(
                    _reading(
                        station,
                        station.daughter,
                        fraction * decayed(eluted, station.daughter, dt_s),
                        end_ns + dt_s * 10**9,
                    )
                )
            last_elution_ns = end_ns
    return out


def _calibrator_qc(station: Station, rng: random.Random) -> list[Message]:
    out: list[Message] = []
    for day in range(RUN_DAYS):
        time_ns = RUN_START_NS + day * 24 * HOUR_NS + 7 * HOUR_NS + 30 * MINUTE_NS
        expected = decayed(CHECK_SOURCE_BQ, "Cs-137", (time_ns - RUN_START_NS) / 1e9)
        deviation = INJECTED_QC.get((station.calibrator, day), rng.uniform(-2.0, 2.0))
        measured = expected * (1 + deviation / 100)
        plateau = [
            _reading(station, "Cs-137", measured * (1 + rng.gauss(0, 0.002)), time_ns - (8 - k) * 2 * 10**9)
            for k in range(8)
        ]
        out += [*plateau, _measurement(station, "Cs-137", plateau, time_ns + 10**9)]
        out.append(
            _qc(
                station,
                "constancy",
                measured,
                expected,
                time_ns + 10**9,
                "AAPM Report 181 (TG-181, 2012)",
                "Cs-137 check source",
            )
        )
        # The schedule's daily item: due from midnight, then done, or failed by a failing check (10 %).
        midnight_ns = RUN_START_NS + day * 24 * HOUR_NS
        out.append(_daily_status(station, "due", midnight_ns, midnight_ns))
        out.append(_daily_status(station, "failed" if abs(deviation) > 10 else "done", midnight_ns, time_ns + 10**9))
    # A linearity test on day 1: the same Tc-99m vial measured every 6 h as it decays.
    vial_bq, start_ns = 30e9, RUN_START_NS + 6 * HOUR_NS
    for step in range(6):
        time_ns = start_ns + step * 6 * HOUR_NS
        expected = decayed(vial_bq, "Tc-99m", (time_ns - start_ns) / 1e9)
        measured = expected * (1 + rng.uniform(-1.5, 1.5) / 100)
        out.append(
            _qc(
                station,
                "linearity",
                measured,
                expected,
                time_ns,
                "AAPM Report 181 (TG-181, 2012)",
                f"decay method, step {step + 1} of 6",
            )
        )
    return out


def _daily_status(station: Station, state: State, due_ns: int, time_ns: int) -> Message:
    item = ItemStatus(
        station.calibrator, station.name, "daily_constancy", "constancy", state, due_ns, due_ns + 8 * HOUR_NS,
        time_ns if state == "done" else None, None, None, None, f"daily constancy {state}",
    )  # fmt: skip
    return qc_status_message(SITE, item, time_ns)


def _device_statuses(rng: random.Random) -> list[Message]:
    out: list[Message] = []
    devices = [(s.name, d) for s in STATIONS for d in (s.calibrator, s.eluter)]
    errors = dict.fromkeys(devices, 0)
    calibrators = {s.calibrator for s in STATIONS}
    for tick in range(RUN_DAYS * 24 * 12):  # every 5 minutes
        time_ns = RUN_START_NS + tick * 5 * MINUTE_NS
        for station, device in devices:
            down = device == OUTAGE[0] and OUTAGE[1] <= time_ns < OUTAGE[2]
            errors[(station, device)] += 1 if down else 0
            suspect = (FLAKY[2] if time_ns >= FLAKY[1] + HOUR_NS else 0) if device == FLAKY[0] else 0
            out.append(
                device_status_message(
                    SITE,
                    station,
                    device,
                    up=not down,
                    latency_ms=None if down else rng.uniform(15, 60),
                    errors=errors[(station, device)],
                    detail="no reply within 2.0 s" if down else "",
                    time_ns=time_ns,
                    suspect_readings=suspect if device in calibrators else None,
                    suspect_fraction=0.0 if device in calibrators else None,
                )
            )
    return out


@dataclass(frozen=True)
class LabRun:
    database: str
    messages: list[Message]
    time_filter: str


async def _write_through_sink(service: InfluxService, database: str, messages: list[Message], path: Path) -> None:
    outbox = AsyncOutbox(Outbox(path, sinks=("influx",)))
    await outbox.put_many(messages)
    # The run is from November 2026, so a raw policy of the default 30 days might refuse it: keep it for a century.
    settings = service.sink_settings(database) | {"flush_interval_s": 0.05, "raw_days": 36_500}
    config = InfluxConfig.from_mapping(settings)
    sink = InfluxSink(config, outbox)
    task = asyncio.create_task(sink.run())
    deadline = time.monotonic() + 60
    while await outbox.pending_count("influx"):
        assert time.monotonic() < deadline, "the sink did not drain the simulated run within 60 s"
        await asyncio.sleep(0.05)
    sink.stop()
    await task
    await outbox.close()
    assert sink.stats.rejected == 0


@pytest.fixture(scope="module")
def lab_run(influx_server: InfluxService) -> Iterator[LabRun]:
    root = Path(tempfile.mkdtemp(prefix="hotlab-labrun-"))
    try:
        database = influx_server.create_database()
        messages = simulated_lab_run(random.Random(20261102))
        asyncio.run(_write_through_sink(influx_server, database, messages, root / "outbox.sqlite"))
        start_ms = RUN_START_NS // 10**6
        end_ms = start_ms + RUN_DAYS * 24 * 3_600_000
        yield LabRun(database, messages, f"time >= {start_ms}ms and time <= {end_ms}ms")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _dashboards() -> dict[str, dict[str, Any]]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def _panel_targets() -> list[Any]:
    return [
        pytest.param(
            name,
            f"{panel['title']}/{target['refId']}",
            target["query"],
            id=f"{name}:{panel['title']}/{target['refId']}",
        )
        for name, dashboard in _dashboards().items()
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]


def _grafana_regex_value(values: list[str]) -> str:
    """How Grafana renders a multi-value ("All") variable inside /^$var$/: an escaped alternation."""
    return "(" + "|".join(re.sub(r"([\\/.*+?^${}()|\[\]-])", r"\\\1", value) for value in values) + ")"


def _interpolate(query: str, run: LabRun, variables: dict[str, str]) -> str:
    query = query.replace("$timeFilter", run.time_filter).replace("$__interval", INTERVAL)
    for name in sorted(variables, key=len, reverse=True):
        query = query.replace(f"${name}", variables[name])
    assert not re.search(r"\$\{?\w", query), f"uninterpolated variable in {query}"
    return query


def _resolve_variables(dashboard: dict[str, Any], run: LabRun, server: InfluxService) -> dict[str, list[str]]:
    """Run each variable's query in order, as Grafana does, with the earlier ones set to "All"."""
    resolved: dict[str, list[str]] = {}
    for variable in dashboard["templating"]["list"]:
        query = _interpolate(variable["query"], run, {k: _grafana_regex_value(v) for k, v in resolved.items()})
        values = sorted({row["value"] for row in server.rows(query, run.database)})
        resolved[variable["name"]] = values
    return resolved


def test_the_whole_run_is_stored(lab_run: LabRun, influx_server: InfluxService) -> None:
    for kind in ("reading", "measurement", "elution", "qc_result", "device_status", "controller_alarm", "qc_status"):
        source = '"raw"."reading"' if kind == "reading" else f'"{kind}"'
        [row] = influx_server.rows(f'SELECT count("msg_id") FROM {source}', lab_run.database)
        assert row["count"] == sum(m.kind == kind for m in lab_run.messages), kind


@pytest.mark.parametrize("name", sorted(_dashboards()))
def test_variable_queries_find_the_lab(name: str, lab_run: LabRun, influx_server: InfluxService) -> None:
    resolved = _resolve_variables(_dashboards()[name], lab_run, influx_server)
    assert resolved["site"] == [SITE]
    assert resolved["station"] == sorted(s.name for s in STATIONS)
    if "device" in resolved:
        assert resolved["device"] == sorted(d for s in STATIONS for d in (s.calibrator, s.eluter))
    if "generator" in resolved:
        assert resolved["generator"] == sorted(s.generator for s in STATIONS)


@pytest.mark.parametrize(("name", "panel", "query"), _panel_targets())
def test_every_panel_query_returns_data(
    name: str, panel: str, query: str, lab_run: LabRun, influx_server: InfluxService
) -> None:
    resolved = _resolve_variables(_dashboards()[name], lab_run, influx_server)
    text = _interpolate(query, lab_run, {k: _grafana_regex_value(v) for k, v in resolved.items()})
    series = influx_server.series(text, lab_run.database)
    assert series, f"{name} / {panel}: no series for {text}"
    values = [v for serie in series for row in serie["values"] for v in row[1:] if v is not None]
    assert values, f"{name} / {panel}: only nulls for {text}"


def _panel_rows(name: str, title: str, run: LabRun, server: InfluxService) -> list[dict[str, Any]]:
    dashboard = _dashboards()[name]
    [panel] = [p for p in dashboard["panels"] if p["title"] == title]
    resolved = _resolve_variables(dashboard, run, server)
    query = _interpolate(panel["targets"][0]["query"], run, {k: _grafana_regex_value(v) for k, v in resolved.items()})
    return server.rows(query, run.database)


def test_alarm_panels_show_exactly_the_injected_faults(lab_run: LabRun, influx_server: InfluxService) -> None:
    qc_alarms = _panel_rows("alarms", "QC warnings and failures", lab_run, influx_server)
    assert sorted((r["device"], r["verdict"]) for r in qc_alarms) == [("capintec-crc", "fail"), ("crc-55tr", "warn")]
    offline = _panel_rows("alarms", "Offline events", lab_run, influx_server)
    assert {r["device"] for r in offline} == {OUTAGE[0]} and len(offline) == 6  # 30 min at one report per 5 min
    assert all(r["detail"] == "no reply within 2.0 s" for r in offline)
    online = _panel_rows("lab-overview", "Devices online", lab_run, influx_server)
    assert len(online) == 4 and all(r["last"] == 1 for r in online)  # the outage ended


def test_the_per_minute_summary_is_each_minutes_good_readings_and_suspect_count(
    lab_run: LabRun, influx_server: InfluxService
) -> None:
    """The sink summarised the run's readings (written long after their time) with the continuous queries' SELECTs."""
    minutes: dict[tuple[str, int], list[float]] = {}
    suspect: dict[tuple[str, int], int] = {}
    for message in lab_run.messages:
        if message.kind != "reading":
            continue
        key = (message.payload["device"], message.payload["time_ns"] // MINUTE_NS * MINUTE_NS)
        if message.payload["quality"] == "good":
            minutes.setdefault(key, []).append(float(message.payload["activity_bq"]))
        else:
            suspect[key] = suspect.get(key, 0) + 1
    rows = influx_server.rows('SELECT * FROM "reading_1m" GROUP BY "device"', lab_run.database)
    good = {(r["device"], r["time"]): r for r in rows if r["good_readings"] is not None}
    assert set(good) == set(minutes)
    for key, values in minutes.items():
        row = good[key]
        assert (row["good_readings"], row["activity_bq_min"], row["activity_bq_max"]) == (
            len(values),
            min(values),
            max(values),
        )
        assert row["activity_bq_mean"] == pytest.approx(statistics.fmean(values), rel=1e-12)
    assert {(r["device"], r["time"]): r["suspect_readings"] for r in rows if r["suspect_readings"]} == suspect


def test_the_qc_schedule_panel_shows_each_items_latest_state(lab_run: LabRun, influx_server: InfluxService) -> None:
    """A constancy over 10 % on the last day failed that day's check (state 3); the other items are done (0)."""
    rows = _panel_rows("alarms", "QC schedule", lab_run, influx_server)
    states = {(r["device"], r["item"]): r["state"] for r in rows}
    last_day = RUN_DAYS - 1
    assert states == {
        (s.calibrator, "daily_constancy"): 3 if abs(INJECTED_QC.get((s.calibrator, last_day), 0.0)) > 10 else 0
        for s in STATIONS
    }


def test_quality_panels_show_exactly_the_suspect_readings_and_their_alarm(
    lab_run: LabRun, influx_server: InfluxService
) -> None:
    suspect = _panel_rows("alarms", "Suspect readings", lab_run, influx_server)
    assert len(suspect) == FLAKY[2] and {r["device"] for r in suspect} == {FLAKY[0]}
    assert all(r["activity_bq"] == 7.4e19 and "outside the crc15r range" in r["quality_reason"] for r in suspect)
    alarms = _panel_rows("alarms", "Suspect reading alarms", lab_run, influx_server)
    assert [(r["device"], r["active"]) for r in alarms] == [(FLAKY[0], 1), (FLAKY[0], 0)]
    [count] = _panel_rows("lab-overview", "Suspect readings", lab_run, influx_server)
    assert count["sum"] == FLAKY[2]
    latest = _panel_rows("lab-overview", "Latest activity per device", lab_run, influx_server)
    assert all(r["activity_bq"] < 1e12 for r in latest)  # the suspect 7.4e19 Bq is never "the latest activity"
    measurements = _panel_rows("calibrator-qc", "Measurements", lab_run, influx_server)
    assert len(measurements) == RUN_DAYS * len(STATIONS) and all(r["n"] == 8 for r in measurements)


def test_elution_panels_show_plausible_generator_physics(lab_run: LabRun, influx_server: InfluxService) -> None:
    yields = _panel_rows("elution-station", "Elution yield over generator life", lab_run, influx_server)
    assert len(yields) == RUN_DAYS * sum(len(s.elution_hours) for s in STATIONS)
    assert all(60 < r["yield_pct"] < 100 for r in yields)
    breakthrough = _panel_rows("elution-station", "Parent breakthrough", lab_run, influx_server)
    assert all(r["breakthrough_pct"] < 0.015 for r in breakthrough if r["parent"] == "Mo-99")
    last = {
        r["generator"]: r["last"]
        for r in _panel_rows("elution-station", "Last eluted activity", lab_run, influx_server)
    }
    # 14:00 elution on day 3 of a 40 GBq Mo-99 generator, 7 h after the morning elution: a few GBq of Tc-99m.
    assert 5e9 < last["ult-2291"] < 20e9
