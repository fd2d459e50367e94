"""The streaming engine: a stream of measurement/reading/elution messages in, the expected verdicts out."""

from __future__ import annotations

import json
import logging
import math
import tomllib
from dataclasses import replace
from datetime import datetime
from typing import Any

import pytest

from hotlab.controller.messages import (
    MeasurementValues,
    Message,
    elution_message,
    elution_msg_id,
    measurement_label_message,
    measurement_message,
    reading_message,
)
from hotlab.controller.qc.engine import QcConfig, QcEngine, QcOutcome, parse_time_ns
from hotlab.controller.qc.limits import QcConfigError
from hotlab.drivers.records import ElutionRecord, Reading
from hotlab.physics.nuclides import get_nuclide

HOUR_NS = 3_600_000_000_000
DAY_NS = 24 * HOUR_NS

CONFIG = """
trend_horizon_days = 30
trend_min_points = 5

[limits.constancy]
warn = 4.0

[sources.CS-137-A]
nuclide = "Cs137"
activity = "200 uCi"
reference_time = 2016-01-01T00:00:00Z
certificate = "NIST-traceable 1234"

[sources.CO-57-REF]
nuclide = "57Co"
activity = "185 MBq"
reference_time = "2025-06-01T00:00:00Z"

[devices.calib1]
check_source = "CS-137-A"
minimum_detectable_bq = 1.0  # Bq: the detectable level of a Ge-68 re-measurement with one background value

[generators.GA-1]
parent = "Ge-68"
activity = "1.85 GBq"
calibration_time = 2026-01-01T00:00:00Z
"""


def ns(text: str) -> int:
    return parse_time_ns(text, "test")


@pytest.fixture
def engine() -> QcEngine:
    return QcEngine("lab1", QcConfig.from_mapping(tomllib.loads(CONFIG)))


def reading(
    activity_bq: float, when: str, nuclide: str | None = "Cs-137", device: str = "calib1", **extra: float | str
) -> object:
    record = Reading(device, nuclide, activity_bq, activity_bq / 1e6, "MBq", ns(when), b"frame", dict(extra))
    return reading_message("lab1", "hotcell", record)


def measurement(activity_bq: float, when: str, nuclide: str | None = "Cs-137", device: str = "calib1") -> object:
    """A settled measurement of 5 readings with a 0.1 % spread, settled at `when`."""
    settle_ns = ns(when)
    values = MeasurementValues(
        device,
        nuclide,
        activity_bq,
        activity_bq * 1e-3,
        5,
        0.0,
        settle_ns - 10**10,
        settle_ns,
        None,
        "dwell",
        ("0" * 32,) * 5,
    )
    return measurement_message("lab1", "hotcell", values)


def elution(counter: int, activity_bq: float, end_ns: int, counter_reset: str | None = None) -> Message:
    record = ElutionRecord(
        "gastation",
        "GA-1",
        "Ge-68",
        "Ga-68",
        counter,
        activity_bq,
        5.0,
        end_ns - 300 * 10**9,
        end_ns,
        counter_reset=counter_reset,
    )
    return elution_message("lab1", record, msg_id=elution_msg_id(record))


def test_config_from_toml(engine: QcEngine) -> None:
    config = engine.config
    assert config.sources["CS-137-A"].reference_bq == pytest.approx(7.4e6)  # 200 uCi = 7.4 MBq
    assert config.sources["CS-137-A"].nuclide.name == "Cs-137"
    assert config.generators["GA-1"].daughter.name == "Ga-68"
    assert config.limits["constancy"].warn == 4.0


def judge(engine: QcEngine, *messages: object) -> QcOutcome:
    """Process, "commit" (nothing to store here) and apply, as the controller does."""
    outcome = engine.process(*messages)
    engine.apply(outcome)
    return outcome


def test_a_check_source_measurement_opens_a_daily_check_not_a_certificate_verdict(engine: QcEngine) -> None:
    """Constancy is judged against this chamber's baseline, never the certificate: without one the check is incomplete."""
    message = measurement(6.2e6, "2026-01-01T00:00:00Z")
    outcome = judge(engine, message)
    started, replaced, background, ended = outcome.messages
    assert (started.kind, started.payload["status"], started.payload["started_by"]) == ("qc_procedure", "started", None)
    assert replaced.msg_id == message.msg_id and replaced.payload["procedure_id"] == started.payload["procedure_id"]
    assert [r.payload["test"] for r in outcome.results] == ["background"]
    assert "constancy" not in [r.payload["test"] for r in outcome.results]
    assert (ended.payload["status"], ended.payload["procedure_id"]) == ("incomplete", started.payload["procedure_id"])
    assert "no constancy baseline of source CS-137-A on the Cs-137 setting" in ended.payload["detail"]
    assert "start_qc procedure baseline" in ended.payload["detail"]


def test_polls_are_not_qc_measurements_are(engine: QcEngine) -> None:
    """One procedure per insertion, not one verdict per poll: a raw reading on the check source setting is not judged."""
    polls = [reading(6.2e6 + n, f"2026-01-01T00:00:0{n}Z") for n in range(5)]
    assert judge(engine, *polls).results == ()
    outcome = judge(engine, *polls, measurement(6.2e6, "2026-01-01T00:00:05Z"))
    assert [m.kind for m in outcome.messages].count("qc_procedure") == 2 and len(outcome.results) == 1


def test_patient_measurements_are_not_qc(engine: QcEngine) -> None:
    patient = measurement(370e6, "2026-01-01T09:00:00Z", nuclide="F-18")
    assert judge(engine, patient).messages == (patient,)
    assert judge(engine, measurement(6.2e6, "2026-01-01T00:00:00Z", device="calib2")).results == ()
    assert judge(engine, measurement(6.2e6, "2026-01-01T00:00:00Z", nuclide=None)).results == ()


def test_a_suspect_tagged_reading_is_never_judged(engine: QcEngine) -> None:
    tagged = Reading(
        "calib1",
        "Tc-99m",
        400e3,
        0.4,
        "MBq",
        ns("2026-01-01T07:00:00Z"),
        b"frame",
        {"qc": "background"},
        quality="suspect",
        quality_reason="outside the range",
    )
    message = reading_message("lab1", "hotcell", tagged)
    outcome = judge(engine, message)
    assert outcome.messages == (message,) and outcome.results == () and outcome.rejected == 0


def label(measured: Any, text: str = "sample", **qc: Any) -> Any:
    """A label record for `measured` (a measurement message), as the label_measurement command commits it."""
    return measurement_label_message(
        "lab1",
        "hotcell",
        str(measured.payload["device"]),
        measurement=measured.payload,
        label=text,
        user="alice",
        request_id="r1",
        time_ns=int(measured.payload["time_ns"]) + 60 * 10**9,
        **qc,
    )


def test_labelled_measurements_are_accuracy_and_dosage_checks(engine: QcEngine) -> None:
    co57 = measurement(118e6, "2025-11-25T00:00:00Z", nuclide="Co-57")
    assert judge(engine, co57).results == ()  # not the check source: a measurement like any other
    accuracy_label = label(co57, "annual accuracy", reference_source="CO-57-REF")
    [accuracy] = judge(engine, accuracy_label).results
    assert accuracy.payload["test"] == "accuracy" and accuracy.payload["verdict"] == "pass"
    assert accuracy.payload["inputs"]["measurement_id"] == co57.msg_id
    assert accuracy.payload["inputs"]["label"] == "annual accuracy"
    dose = measurement(550e6, "2026-03-01T08:00:00Z", nuclide="F-18")
    [dosage] = judge(
        engine, label(dose, "patient 0412", prescribed_bq=370e6, administration_ns=ns("2026-03-01T09:00:00Z"))
    ).results
    # 550 MBq F-18 at 08:00 is 550 * 2^(-60/109.77) = 376.55 MBq at 09:00: +1.77 % of the 370 MBq prescribed.
    assert (dosage.payload["test"], dosage.payload["verdict"]) == ("dosage", "pass")
    assert dosage.payload["deviation_pct"] == pytest.approx(1.7698, abs=1e-3)
    assert judge(engine, label(dose, "just a name")).results == ()


def test_tagged_readings(engine: QcEngine) -> None:
    [bg] = judge(engine, reading(400e3, "2026-01-01T07:00:00Z", nuclide="Tc-99m", qc="background")).results
    assert (bg.payload["test"], bg.payload["verdict"]) == ("background", "fail")
    # 1.85 MBq Mo-99 / 37 GBq Tc-99m = 0.05 kBq/MBq at the assay (no administration time: judged then) -> pass.
    # The ratio grows as 2^(t (1/T_Tc - 1/T_Mo)); it reaches 0.15 after log2(3) / (1/T_Tc - 1/T_Mo).
    [mo] = judge(engine, reading(1.85e6, "2026-03-01T06:00:00Z", nuclide="Mo-99", qc="mo99", tc99m_bq=37e9)).results
    assert mo.payload["measured"] == pytest.approx(0.05) and mo.payload["verdict"] == "pass"
    t_tc, t_mo = get_nuclide("Tc-99m").half_life_s, get_nuclide("Mo-99").half_life_s
    reached_s = math.log2(0.15 / 0.05) / (1 / t_tc - 1 / t_mo)
    assert (mo.payload["limit_reached_ns"] - ns("2026-03-01T06:00:00Z")) / 1e9 == pytest.approx(reached_s, rel=1e-9)
    given = judge(
        engine,
        reading(
            1.85e6,
            "2026-03-01T06:00:00Z",
            nuclide="Mo-99",
            qc="mo99",
            tc99m_bq=37e9,
            administration_time="2026-03-01T14:00:00Z",
        ),
    ).results[0]
    expected = 0.05 * 2 ** (8 * 3600 * (1 / t_tc - 1 / t_mo))
    assert given.payload["measured"] == pytest.approx(expected, rel=1e-9) and given.payload["verdict"] == "pass"


def test_bad_input_is_logged_and_skipped(engine: QcEngine, caplog: pytest.LogCaptureFixture) -> None:
    tc99m = measurement(1e6, "2026-01-01T00:00:00Z", nuclide="Tc-99m")
    bad = [
        label(tc99m, reference_source="NOPE"),
        label(tc99m, reference_source="CS-137-A"),
        reading(1e6, "2026-01-01T00:00:00Z", qc="linearity"),
        reading(1e6, "2026-01-01T00:00:00Z", nuclide="F-18", qc="dosage"),
    ]
    with caplog.at_level(logging.WARNING):
        outcome = engine.process(*bad)
    # Rejected input is still committed as it was, without a verdict; the count reaches the engine on apply.
    assert outcome.messages == tuple(bad) and outcome.results == () and outcome.rejected == 4
    assert engine.rejected == 0
    engine.apply(outcome)
    assert engine.rejected == 4
    assert "unknown QC tag 'dosage'; known: background, mo99, ge68_breakthrough" in caplog.text
    assert "unknown source 'NOPE'" in caplog.text
    assert "taken on the Tc-99m setting, but source CS-137-A is Cs-137" in caplog.text
    assert "unknown QC tag 'linearity'" in caplog.text


def test_elution_stream_yield_residual_trend_and_breakthrough(engine: QcEngine) -> None:
    start = ns("2026-03-01T00:00:00Z")  # the equilibrium case of test_qc_generator
    first = elution(1, 1.2e9, start)
    out = judge(engine, first)
    # The elution is replaced by itself with yield_pct filled (same msg_id), followed by its verdict.
    replaced = out.replacements[first.msg_id]
    verdict = out.results[0]
    assert out.messages == (replaced, verdict)
    assert replaced.msg_id == first.msg_id and replaced.topic == first.topic
    assert first.payload["yield_pct"] is None  # the input message itself is left alone
    assert replaced.payload["yield_pct"] == pytest.approx(1.2e9 / 1.59110e9 * 100, rel=1e-4)  # 75.42 %, equilibrium
    assert verdict.payload["test"] == "elution_yield" and verdict.payload["verdict"] == "pass"
    assert verdict.topic == "hotlab/lab1/gastation/GA-1/qc"
    available = verdict.payload["expected"]
    # The second elution 3 h later sees the residual of the first (available - eluted) decayed by 2^(-180/67.83).
    second = judge(engine, elution(2, 1.0e9, start + 3 * HOUR_NS))
    inputs = second.results[0].payload["inputs"]
    assert inputs["residual_bq"] == pytest.approx(available - 1.2e9)
    assert inputs["last_elution"] == "2026-03-01T00:00:00.000000Z"
    # A re-delivered elution is not judged twice: it is committed as it came, with no verdict.
    again = elution(2, 1.0e9, start + 3 * HOUR_NS)
    assert judge(engine, again).messages == (again,)
    # Daily elutions with a falling yield: from the 5th elution on, a trend verdict follows.
    trends = []
    for day in range(1, 5):
        result = judge(engine, elution(2 + day, (1.1 - 0.05 * day) * 1e9, start + day * DAY_NS))
        trends.append(list(result.results[1:]))
    assert trends[:2] == [[], []] and trends[2] and trends[3]
    trend = trends[3][0].payload
    assert trend["test"] == "elution_yield_trend"
    assert trend["inputs"]["slope_pct_per_day"] < 0
    # Ge-68 re-measurement of elution 1, 72 h later, 10 Bq -> 1.0075e-6 % * (1 GBq / 1.2 GBq) -> pass.
    ge = judge(
        engine,
        reading(
            10.0,
            "2026-03-04T00:00:00Z",
            nuclide="Ga-68",
            device="calib1",
            qc="ge68_breakthrough",
            generator="GA-1",
            elution_counter=1,
            background_bq=0.0,
        ),
    ).results
    assert ge[0].payload["test"] == "ge68_breakthrough"
    assert ge[0].payload["measured"] == pytest.approx(1.00753e-6 / 1.2, rel=1e-4)
    assert json.dumps([m.payload for m in out.messages + second.messages + ge], allow_nan=False)


@pytest.mark.parametrize(
    ("parent_bq", "verdict"),
    [(5.0e3, "pass"), (2.0e4, "fail")],  # of 1 GBq Ga-68: 5e-4 % and 2e-3 %, against Ph. Eur. 2464's 0.001 %
)
def test_the_breakthrough_the_station_reports_is_judged(engine: QcEngine, parent_bq: float, verdict: str) -> None:
    end_ns = ns("2026-03-01T00:00:00Z")
    record = ElutionRecord("gastation", "GA-1", "Ge-68", "Ga-68", 1, 1.0e9, 5.0, end_ns - 300 * 10**9, end_ns)
    message = elution_message("lab1", replace(record, parent_bq=parent_bq), msg_id=elution_msg_id(record))
    station = [r.payload for r in judge(engine, message).results if r.payload["test"] == "ge68_breakthrough_station"]
    assert len(station) == 1
    assert station[0]["measured"] == pytest.approx(parent_bq / 1.0e9 * 100.0)
    assert station[0]["verdict"] == verdict and "2464" in station[0]["limit_source"]
    assert station[0]["inputs"]["elution_id"] == message.msg_id


def test_an_elution_after_the_stations_counter_started_again_is_judged(engine: QcEngine) -> None:
    start = ns("2026-03-01T00:00:00Z")
    judge(engine, elution(1, 1.2e9, start))
    judge(engine, elution(2, 1.1e9, start + DAY_NS))
    # The station restarted without keeping its count: elution 1 of the new count, a day later.
    restarted = elution(1, 1.0e9, start + 2 * DAY_NS, counter_reset="counter epoch changed; counter 2 -> 1")
    out = judge(engine, restarted)
    assert [r.payload["test"] for r in out.results][:1] == ["elution_yield"]
    assert out.replacements[restarted.msg_id].payload["yield_pct"] is not None
    assert out.results[0].payload["inputs"]["last_elution"] == "2026-03-02T00:00:00.000000Z"
    # Its replay (a crash before the driver was told) is the same message: not judged twice.
    assert judge(engine, restarted).messages == (restarted,)
    # The engine took the new count over: the next elution 2 follows the new elution 1.
    second = judge(engine, elution(2, 1.0e9, start + 3 * DAY_NS)).results
    assert second and second[0].payload["inputs"]["last_elution"] == "2026-03-03T00:00:00.000000Z"
    # A re-delivery without a counter restart is still recognised by its counter.
    assert judge(engine, elution(2, 1.0e9, start + 3 * DAY_NS + 1)).results == ()
    # A Ge-68 re-measurement of "elution 1" is of the new count's elution 1 (1.0 GBq), not an old one.
    ge = judge(
        engine,
        reading(
            10.0,
            "2026-03-06T00:00:00Z",
            nuclide="Ga-68",
            qc="ge68_breakthrough",
            generator="GA-1",
            elution_counter=1,
            background_bq=0.0,
        ),
    ).results
    assert ge[0].payload["inputs"]["ga68_eoe_bq"] == pytest.approx(1.0e9)
    assert ge[0].payload["inputs"]["end_of_elution"] == "2026-03-03T00:00:00.000000Z"


def test_elution_of_unconfigured_generator_is_passed_through(engine: QcEngine) -> None:
    record = ElutionRecord("tcstation", "TC-9", "Mo-99", "Tc-99m", 1, 5e9, 5.0, 0, 10**9)
    message = elution_message("lab1", record)
    outcome = judge(engine, message)
    assert outcome.messages == (message,) and outcome.rejected == 0 and engine.rejected == 0


@pytest.mark.parametrize(
    ("toml_text", "message"),
    [
        ("[sources.X]\nnuclide='Cs-137'\nactivity='7.4 MBq'", "qc.sources.X.reference_time: is required but missing"),
        (
            "[sources.X]\nnuclide='Cs-999'\nactivity='7.4 MBq'\nreference_time=2020-01-01T00:00:00Z",
            "not in the library",
        ),
        (
            "[sources.X]\nnuclide='Cs-137'\nactivity='-7 MBq'\nreference_time=2020-01-01T00:00:00Z",
            "must not be negative",
        ),
        ("[sources.X]\nnuclide='Cs-137'\nactivity='7 MBq'\nreference_time=2020-01-01T00:00:00", "has no timezone"),
        ("[devices.calib1]\ncheck_source='Y'", "no source 'Y' under [qc.sources]"),
        (
            "[generators.G]\nparent='Cs-137'\nactivity='1 GBq'\ncalibration_time=2020-01-01T00:00:00Z",
            "qc.generators.G.parent: no elution-yield limit for daughter 'Ba-137m' of Cs-137",
        ),
        (
            "[sources.X]\nnuclide='Cs-137'\nactivity='7 MBq'\nreference_time=2020-01-01T00:00:00Z\nuncertainty_pct='3'",
            "qc.sources.X.uncertainty_pct: must be a finite number, got '3' (string)",
        ),
        ("trend_min_points = 2", "qc.trend_min_points: must be >= 3, got 2"),
        ("procedure_timeout_min = 0", "qc.procedure_timeout_min: must be > 0, got 0"),
        (
            "[sources.S]\nnuclide='Cs-137'\nactivity='7 MBq'\nreference_time=2020-01-01T00:00:00Z\n"
            "[devices.c]\ncheck_source='S'\nsettings=['Tc-99x']",
            "qc.devices.c.settings: cannot read nuclide name 'Tc-99x'",
        ),
        ("colour = 'red'", "qc.colour: unknown key"),
        (  # the parent's key path was missing from this message (issue 16)
            "[generators.G]\nparent='Zz-99'\nactivity='1 GBq'\ncalibration_time=2020-01-01T00:00:00Z",
            "qc.generators.G.parent: cannot read nuclide name 'Zz-99'",
        ),
    ],
)
def test_bad_config_is_rejected_clearly(toml_text: str, message: str) -> None:
    with pytest.raises(QcConfigError) as info:
        QcConfig.from_mapping(tomllib.loads(toml_text))
    assert message in str(info.value)


def test_parse_time_accepts_z_and_offsets() -> None:
    assert parse_time_ns("2026-01-01T01:00:00+01:00", "t") == ns("2026-01-01T00:00:00Z")
    assert parse_time_ns(datetime.fromisoformat("2026-01-01T00:00:00Z"), "t") == 1767225600 * 10**9


def test_the_sites_profile_and_schedule_are_part_of_its_qc_config() -> None:
    """`[qc] profile` and `[qc.schedule]` were refused as unknown keys by the controller's [qc]."""
    config = QcConfig.from_mapping({"profile": "ph-eur", "schedule": {"timezone": "Europe/Vienna"}})
    assert config.profile == "ph-eur" and "Ph. Eur." in config.limits["mo99_breakthrough"].source
    assert config.schedule.timezone.key == "Europe/Vienna"
    assert (
        "NRC" in QcConfig().limits["mo99_breakthrough"].source or "CFR" in QcConfig().limits["mo99_breakthrough"].source
    )
    with pytest.raises(QcConfigError, match=r"qc\.profile.*us-nrc"):
        QcConfig.from_mapping({"profile": "mars"})


def test_a_tagged_ge68_re_measurement_names_its_elution_and_does_the_schedules_follow_up(engine: QcEngine) -> None:
    """The result lacked inputs.elution_id, so the follow-up item of its elution stayed due for ever."""
    from hotlab.controller.qc.schedule import Schedule, ScheduleConfig, ScheduleFacts

    end_ns = ns("2026-03-01T00:00:00Z")
    eluted = elution(1, 1.2e9, end_ns)
    committed = judge(engine, eluted).messages
    remeasured = reading(
        10.0,
        "2026-03-04T00:00:00Z",
        nuclide="Ga-68",
        qc="ge68_breakthrough",
        generator="GA-1",
        elution_counter=1,
        background_bq=0.0,
    )
    [result] = judge(engine, remeasured).results
    assert (result.payload["inputs"]["elution_id"], result.payload["inputs"]["generator"]) == (eluted.msg_id, "GA-1")
    schedule = Schedule("lab1", ScheduleConfig(), {"calib1": "hotcell"}, {"GA-1"})
    facts = ScheduleFacts()
    for message in (*committed, result):
        schedule.fold(facts, message)
    [follow_up] = schedule.ge68_statuses(facts, ns("2026-03-04T01:00:00Z"))
    assert (follow_up.elution_id, follow_up.state, follow_up.last_record_id) == (eluted.msg_id, "done", result.msg_id)
