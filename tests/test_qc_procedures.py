"""QC procedures in the engine: baselines, daily constancy per setting, Ge-68 follow-up, linearity (decay and
sleeves), geometry, Ga-68 identity, timeouts.

Expected values come from the decay law written out here: A(t) = A0 * 2**(-dt / T_half), with the
half-lives of hotlab.physics.nuclides (the check source is Cs-137 whatever the setting).
"""

from __future__ import annotations

import math
import statistics
import tomllib
from pathlib import Path
from typing import Any

import pytest

from hotlab.controller.archive import HistoryArchive
from hotlab.controller.messages import MeasurementValues, Message, elution_message, elution_msg_id, measurement_message
from hotlab.controller.qc.engine import QcConfig, QcEngine, QcOutcome, parse_time_ns
from hotlab.controller.qc.procedures import Procedure, new_procedure_id
from hotlab.drivers.records import ElutionRecord
from hotlab.physics.nuclides import get_nuclide

S = 1_000_000_000
DAY_S = 86_400
CS137_T = get_nuclide("Cs-137").half_life_s
CONFIG = tomllib.loads("""
procedure_timeout_min = 30

[sources.CS-1]
nuclide = "Cs-137"
activity = "7.4 MBq"
reference_time = 2020-01-01T00:00:00Z

[devices.cal]
check_source = "CS-1"
settings = ["99mTc", "F18"]
linearity_low_bq = "1 MBq"
minimum_detectable_bq = 2.0

[devices.cal.sleeves]  # activity / reading in the sleeve, in the order they are read
s1 = 10.0
s2 = 100.0

[generators.GA-1]
parent = "Ge-68"
activity = "1.85 GBq"
calibration_time = 2026-01-01T00:00:00Z
""")
T0 = parse_time_ns("2026-03-02T07:00:00Z", "t0")
#: What this chamber reads for the Cs-137 check source on each setting (the setting's calibration factor).
READS = {"Cs-137": 7.0e6, "Tc-99m": 9.1e6, "F-18": 5.2e6}


def engine() -> QcEngine:
    return QcEngine("lab", QcConfig.from_mapping(CONFIG))


def measured(
    activity_bq: float,
    settle_ns: int,
    setting: str,
    *,
    end: str = "setting_changed",
    background_bq: float = 1.0e3,
    start_ns: int | None = None,
    background_readings: tuple[float, ...] = (),
) -> Message:
    values = MeasurementValues(
        "cal",
        setting,
        activity_bq,
        activity_bq * 1e-3,
        5,
        background_bq,
        settle_ns - 5 * S if start_ns is None else start_ns,
        settle_ns,
        settle_ns + S if end == "removed" else None,
        end,  # type: ignore[arg-type]
        ("a" * 32, "b" * 32),
        background_readings or (background_bq,),  # as the detector gives it: the readings the mean is of
    )
    return measurement_message("lab", "hot", values)


def commit(qc: QcEngine, *messages: Message) -> QcOutcome:
    outcome = qc.process(*messages)
    qc.apply(outcome)
    return outcome


def started(kind: str, at_ns: int, role: str = "qc_officer", **subject: Any) -> Message:
    """A start record as the start_qc command commits it (controller/qc/procedure_commands.py)."""
    settings = {"daily_constancy": ("Cs-137", "Tc-99m", "F-18"), "baseline": ("Cs-137", "Tc-99m", "F-18")}
    procedure = Procedure(
        procedure_id=new_procedure_id(),
        kind=kind,
        site="lab",
        station="hot",
        device="cal",
        started_by={"user": "alice", "role": role},
        started_ns=at_ns,
        settings=settings.get(kind, (subject.pop("setting", "Ga-68"),)),
        reason="acceptance",
        **subject,
    )
    return procedure.started_message()


def of(outcome: QcOutcome, kind: str) -> list[dict[str, Any]]:
    return [m.payload for m in outcome.messages if m.kind == kind]


def take_baselines(qc: QcEngine, at_ns: int) -> QcOutcome:
    """A QC officer's baseline: the source goes in on Cs-137, the setting is switched to Tc-99m, then F-18."""
    commit(qc, started("baseline", at_ns, source_id="CS-1"))
    return commit(
        qc,
        measured(READS["Cs-137"], at_ns + 60 * S, "Cs-137"),
        measured(READS["Tc-99m"], at_ns + 90 * S, "Tc-99m", start_ns=at_ns + 61 * S),
        measured(READS["F-18"], at_ns + 120 * S, "F-18", start_ns=at_ns + 91 * S, end="dwell"),
    )


def test_a_baseline_procedure_stores_one_baseline_per_setting_with_who_took_it() -> None:
    qc = engine()
    outcome = take_baselines(qc, T0)
    baselines = of(outcome, "qc_baseline")
    assert [(b["setting"], b["activity_bq"]) for b in baselines] == [
        (s, READS[s]) for s in ("Cs-137", "Tc-99m", "F-18")
    ]
    for baseline in baselines:
        assert baseline["taken_by"] == {"user": "alice", "role": "qc_officer"} and baseline["reason"] == "acceptance"
        assert (baseline["source_nuclide"], baseline["half_life_s"]) == ("Cs-137", CS137_T)
    [end] = [p for p in of(outcome, "qc_procedure")]
    assert (end["status"], end["verdict"]) == ("complete", "pass")  # the background of the first step
    assert [r.payload["test"] for r in outcome.results] == ["background"]
    assert all(m["procedure_id"] == end["procedure_id"] for m in of(outcome, "measurement"))
    assert qc.baseline("cal", "CS-1", "Tc-99m") is not None


def test_daily_constancy_is_judged_per_setting_against_the_decay_corrected_baseline() -> None:
    qc = engine()
    take_baselines(qc, T0)
    day = T0 + 100 * DAY_S * S
    today = {"Cs-137": 6.95e6, "Tc-99m": 9.6e6, "F-18": 4.2e6}
    outcome = commit(
        qc,
        measured(today["Cs-137"], day, "Cs-137"),  # recognised: the check source on its own setting
        measured(today["Tc-99m"], day + 30 * S, "Tc-99m", start_ns=day + S),
        measured(today["F-18"], day + 60 * S, "F-18", start_ns=day + 31 * S, end="removed"),
    )
    start, end = of(outcome, "qc_procedure")
    assert (start["status"], start["started_by"], end["status"]) == ("started", None, "complete")
    constancy = [r.payload for r in outcome.results if r.payload["test"] == "constancy"]
    assert [c["inputs"]["setting"] for c in constancy] == ["Cs-137", "Tc-99m", "F-18"]
    for result, (setting, baseline_ns) in zip(constancy, [("Cs-137", 60), ("Tc-99m", 90), ("F-18", 120)]):
        dt_s = (result["time_ns"] - (T0 + baseline_ns * S)) / S
        expected = READS[setting] * 2 ** (-dt_s / CS137_T)
        assert result["expected"] == pytest.approx(expected, rel=1e-12)
        assert result["deviation_pct"] == pytest.approx((today[setting] / expected - 1) * 100, rel=1e-9)
        assert result["inputs"]["baseline_taken_by"] == {"user": "alice", "role": "qc_officer"}
        assert result["procedure_id"] == end["procedure_id"]
    # Tc-99m +5.5 % -> warn (5-10 %); F-18 -19 % -> fail; the procedure's verdict is the worst.
    assert [c["verdict"] for c in constancy] == ["pass", "warn", "fail"] and end["verdict"] == "fail"
    assert end["results"] == [r.msg_id for r in outcome.results]


def test_a_check_source_measurement_on_the_tc99m_setting_is_judged_not_rejected() -> None:
    qc = engine()
    take_baselines(qc, T0)
    later = T0 + DAY_S * S
    commit(qc, started("daily_constancy", later, role="operator", source_id="CS-1"))
    outcome = commit(qc, measured(READS["Tc-99m"], later + 60 * S, "Tc-99m", end="removed"))
    assert outcome.rejected == 0
    assert [
        (r.payload["test"], r.payload["inputs"]["setting"]) for r in outcome.results if r.payload["test"] == "constancy"
    ] == [("constancy", "Tc-99m")]


def test_forty_polls_and_one_measurement_give_one_verdict_per_setting_not_one_per_poll() -> None:
    from hotlab.controller.messages import reading_message
    from hotlab.drivers.records import Reading

    qc = engine()
    take_baselines(qc, T0)
    day = T0 + DAY_S * S
    polls = [
        reading_message("lab", "hot", Reading("cal", "Cs-137", READS["Cs-137"], 7.0, "MBq", day + n * S, b"f"))
        for n in range(40)
    ]
    outcome = commit(qc, *polls, measured(READS["Cs-137"], day + 40 * S, "Cs-137", start_ns=day))
    assert [r.payload["test"] for r in outcome.results] == ["background", "constancy"]


def test_a_patient_dose_during_a_daily_check_is_not_taken_as_a_step() -> None:
    qc = engine()
    take_baselines(qc, T0)
    day = T0 + DAY_S * S
    commit(qc, started("daily_constancy", day, role="operator", source_id="CS-1"))
    first = commit(qc, measured(READS["Cs-137"], day + 30 * S, "Cs-137", end="removed"))
    assert [r.payload["test"] for r in first.results] == ["background", "constancy"]
    from hotlab.controller.messages import reading_message
    from hotlab.drivers.records import Reading

    empty = reading_message("lab", "hot", Reading("cal", "Tc-99m", 0.0, 0.0, "MBq", day + 40 * S, b"f"))
    dose = measured(550e6, day + 60 * S, "Tc-99m", end="removed")  # a patient dose, far outside the band
    outcome = commit(qc, empty, dose)
    assert outcome.messages == (empty, dose) and outcome.results == ()
    # The check source back in on Tc-99m, within the band of its baseline: taken.
    back = commit(qc, measured(READS["Tc-99m"], day + 120 * S, "Tc-99m", end="removed"))
    assert back.replacements and [r.payload["inputs"]["setting"] for r in back.results] == ["Tc-99m"]


def test_a_setting_without_a_baseline_ends_the_check_incomplete_and_says_to_take_one() -> None:
    qc = engine()
    outcome = commit(qc, measured(READS["Cs-137"], T0, "Cs-137"))
    [_start, end] = of(outcome, "qc_procedure")
    assert end["status"] == "incomplete" and "a QC officer takes one" in end["detail"] and end["verdict"] is None


def test_a_procedure_not_finished_in_time_ends_incomplete_once() -> None:
    qc = engine()
    take_baselines(qc, T0)
    day = T0 + DAY_S * S
    commit(qc, measured(READS["Cs-137"], day, "Cs-137"))  # recognised; Tc-99m and F-18 never follow
    assert qc.tick(day + 29 * 60 * S).messages == ()
    late = qc.tick(day + 31 * 60 * S)
    [ended] = late.messages
    assert ended.payload["status"] == "incomplete" and "no result for: Tc-99m, F-18" in ended.payload["detail"]
    committed = commit(qc, *late.messages)  # the service commits the tick's records through the QC stage
    qc.apply(late)
    assert committed.messages[0].msg_id == ended.msg_id and qc.open_procedures("cal") == []
    # The same end record again (a tick that lost the race) is dropped, not committed a second time.
    assert commit(qc, ended).messages == ()


def test_end_qc_aborts_the_open_check() -> None:
    qc = engine()
    start = started("daily_constancy", T0, role="operator", source_id="CS-1")
    commit(qc, start)
    [procedure] = qc.open_procedures("cal")
    abort = procedure.end_message("aborted", T0 + 60 * S, "ended by bob (operator): wrong source")
    [record] = commit(qc, abort).messages
    assert (record.payload["status"], record.payload["verdict"]) == ("aborted", None)
    assert qc.open_procedures("cal") == []


def elution(counter: int, activity_bq: float, end_ns: int) -> Message:
    record = ElutionRecord("gastation", "GA-1", "Ge-68", "Ga-68", counter, activity_bq, 5.0, end_ns - 300 * S, end_ns)
    return elution_message("lab", record, msg_id=elution_msg_id(record))


def test_ge68_follow_up_subtracts_the_background_and_refuses_a_measurement_too_early() -> None:
    from hotlab.physics.decay import daughter_activity

    qc = engine()
    eoe = parse_time_ns("2026-03-01T00:00:00Z", "eoe")
    eluted = elution(1, 1.2e9, eoe)
    commit(qc, eluted)
    early = eoe + 24 * 3600 * S
    commit(qc, started("ge68_breakthrough", early, role="operator", elution_id=eluted.msg_id, generator="GA-1"))
    [too_early] = of(commit(qc, measured(50.0, early + 60 * S, "Ga-68", end="removed")), "qc_procedure")
    assert too_early["status"] == "incomplete" and "48 h" in too_early["detail"]
    later = eoe + 72 * 3600 * S
    commit(qc, started("ge68_breakthrough", later, role="operator", elution_id=eluted.msg_id, generator="GA-1"))
    outcome = commit(qc, measured(60.0, later + 60 * S, "Ga-68", end="removed", background_bq=10.0))
    [result] = outcome.results
    inputs = result.payload["inputs"]
    assert (inputs["elution_id"], inputs["generator"]) == (eluted.msg_id, "GA-1")
    # Ge0 = (reading - background - Ga0 * 2^(-t/T_Ga)) / (Ga-68 grown from 1 Bq Ge-68 in t), as % of Ga0.
    ga68, ge68 = get_nuclide("Ga-68"), get_nuclide("Ge-68")
    t_s = 72 * 3600 + 60
    leftover = 1.2e9 * 2 ** (-t_s / ga68.half_life_s)
    per_bq = float(daughter_activity(1.0, ge68, ga68, t_s))
    assert result.payload["measured"] == pytest.approx((60.0 - 10.0 - leftover) / per_bq / 1.2e9 * 100, rel=1e-6)
    assert of(outcome, "qc_procedure")[0]["status"] == "complete"


def test_ge68_follow_up_of_an_aliquot_is_scaled_to_the_whole_eluate_and_skips_a_ga68_dose() -> None:
    """A procedure measured a 10 % aliquot as if it were the whole eluate (10x too low: a fail passed), and took
    whatever Ga-68 measurement came next (a patient dose was judged as breakthrough)."""
    from hotlab.physics.decay import daughter_activity

    qc = engine()
    eoe = parse_time_ns("2026-03-01T00:00:00Z", "eoe")
    eluted = elution(1, 1.0e9, eoe)
    commit(qc, eluted)
    later = eoe + 72 * 3600 * S
    commit(
        qc,
        started(
            "ge68_breakthrough",
            later,
            role="operator",
            elution_id=eluted.msg_id,
            generator="GA-1",
            aliquot_fraction=0.1,
        ),
    )
    dose = commit(qc, measured(150e6, later + 30 * S, "Ga-68", end="removed", background_bq=10.0))
    assert dose.results == () and not dose.replacements  # 150 MBq: no kept eluate reads that much
    outcome = commit(qc, measured(1010.0, later + 60 * S, "Ga-68", end="removed", background_bq=10.0))
    [result] = outcome.results
    # 1000 Bq net (Ge-68 seen through its Ga-68) in 10 % of the eluate: 1e4 Bq in the whole, which held Ge-68
    # 1e4 / f(t) at EOE (f: Ga-68 grown from 1 Bq Ge-68 in t, 0.9925 after 72 h), of 1 GBq Ga-68.
    t_s = 72 * 3600 + 60
    per_bq = float(daughter_activity(1.0, get_nuclide("Ge-68"), get_nuclide("Ga-68"), t_s))
    assert result.payload["measured"] == pytest.approx(1000.0 / 0.1 / per_bq / 1.0e9 * 100, rel=1e-6)
    assert result.payload["verdict"] == "fail"  # 1.0076e-3 % > 0.001 %: read as the whole eluate, 1.0e-4 % passed


def test_linearity_collects_a_decaying_vial_until_the_low_end_and_ignores_other_doses() -> None:
    tc = get_nuclide("Tc-99m")
    qc = engine()
    commit(qc, started("linearity", T0, role="qc_officer", setting="Tc-99m"))
    a0, hours = 30e9, (0, 12, 24, 48, 96)
    series = [
        measured(a0 * 2 ** (-h * 3600 / tc.half_life_s), T0 + h * 3600 * S, "Tc-99m", end="removed") for h in hours
    ]
    outcomes = [commit(qc, m) for m in series[:2]]
    dose = commit(qc, measured(740e6, T0 + 13 * 3600 * S, "Tc-99m", end="removed"))
    assert dose.results == () and not dose.replacements
    outcomes += [commit(qc, m) for m in series[2:]]
    [result] = outcomes[-1].results
    assert (result.payload["test"], result.payload["verdict"]) == ("linearity", "pass")
    assert abs(result.payload["deviation_pct"]) < 1e-9  # a perfectly linear chamber
    assert (
        of(outcomes[-1], "qc_procedure")[-1]["status"] == "complete"
    )  # 30 GBq * 2^(-96 h / 6.0067 h) = 464 kBq <= 1 MBq


def test_a_linearity_series_too_short_to_judge_ends_incomplete_instead_of_losing_its_last_step() -> None:
    """Three points reached the low end: the rule (3 to normalise + 1 to judge) refused, the step was lost, the
    series stayed open for ever."""
    tc = get_nuclide("Tc-99m")
    qc = engine()
    commit(qc, started("linearity", T0 - 600 * S, role="qc_officer", setting="Tc-99m"))
    a0, hours = 30e9, (0, 48, 96)  # 30 GBq -> 117 MBq -> 464 kBq: the third is below linearity_low_bq (1 MBq)
    outcomes = [
        commit(qc, measured(a0 * 2 ** (-h * 3600 / tc.half_life_s), T0 + h * 3600 * S, "Tc-99m", end="removed"))
        for h in hours
    ]
    last = outcomes[-1]
    assert last.rejected == 0 and last.replacements  # the third measurement is the series' third step
    [end] = of(last, "qc_procedure")
    assert end["status"] == "incomplete" and "needs 4" in end["detail"] and len(end["measurements"]) == 3
    assert qc.open_procedures("cal") == []


def test_restore_brings_back_baselines_and_the_open_procedure(tmp_path: Path) -> None:
    qc = engine()
    with HistoryArchive(tmp_path / "h.sqlite3") as archive:
        archive.add_many(take_baselines(qc, T0).messages)
        day = T0 + DAY_S * S
        archive.add_many(commit(qc, measured(READS["Cs-137"], day, "Cs-137")).messages)
        fresh = engine()
        fresh.restore(archive)
    assert fresh.baseline("cal", "CS-1", "F-18") == qc.baseline("cal", "CS-1", "F-18")
    [procedure] = fresh.open_procedures("cal")
    assert procedure.missing == ("Tc-99m", "F-18") and len(procedure.results) == 2
    outcome = commit(fresh, measured(READS["Tc-99m"], day + 60 * S, "Tc-99m", end="removed"))
    assert [r.payload["inputs"]["setting"] for r in outcome.results] == ["Tc-99m"]


TC99M_T = get_nuclide("Tc-99m").half_life_s
GA68_T = get_nuclide("Ga-68").half_life_s


def test_geometry_judges_each_container_against_the_reference_decay_corrected_to_its_time() -> None:
    """TG-181 / ANSI N42.13: the same activity in each geometry, corrected to the reference reading's time."""
    qc = engine()
    labels = ("vial 10 mL", "vial 20 mL", "syringe 3 mL")
    commit(qc, started("geometry", T0, role="operator", setting="Tc-99m", step_labels=labels))
    # 400 MBq in the reference vial; 10 min later the same activity reads 2 % high in 20 mL, 20 min later 7 % low
    # in a syringe: reading = 400 MBq * 2^(-dt / T) * (1 + deviation).
    reads = {600: 1.02, 1200: 0.93}
    steps = [measured(400e6, T0 + 60 * S, "Tc-99m", end="removed")] + [
        measured(400e6 * 2 ** (-dt / TC99M_T) * f, T0 + (60 + dt) * S, "Tc-99m", end="removed")
        for dt, f in reads.items()
    ]
    first = commit(qc, steps[0])
    # A patient dose (740 MBq, outside +-50 % of the reference) and a measurement on another setting are not steps.
    others = commit(
        qc,
        measured(740e6, T0 + 300 * S, "Tc-99m", end="removed"),
        measured(400e6, T0 + 400 * S, "F-18", end="removed"),
    )
    assert not others.replacements and others.results == ()
    last = commit(qc, *steps[1:])
    [result] = last.results
    payload = result.payload
    assert (payload["test"], payload["verdict"], payload["expected"]) == ("geometry", "warn", 400e6)
    deviations = payload["inputs"]["deviation_pct"]
    assert deviations["vial 20 mL"] == pytest.approx(2.0, rel=1e-9)
    assert deviations["syringe 3 mL"] == pytest.approx(-7.0, rel=1e-9) == payload["deviation_pct"]
    assert payload["inputs"]["correction_factors"]["syringe 3 mL"] == pytest.approx(1 / 0.93, rel=1e-9)
    assert payload["inputs"]["measurement_ids"] == {label: m.msg_id for label, m in zip(labels, steps)}
    [end] = of(last, "qc_procedure")
    assert (end["status"], end["verdict"], end["results"]) == ("complete", "warn", [result.msg_id])
    assert end["step_labels"] == list(labels) and end["measurements"] == [m.msg_id for m in steps]
    assert first.replacements and qc.open_procedures("cal") == []


def test_a_geometry_test_not_finished_in_time_names_the_geometries_never_measured() -> None:
    qc = engine()
    labels = ("vial 10 mL", "vial 20 mL", "syringe 3 mL")
    commit(qc, started("geometry", T0, role="operator", setting="Tc-99m", step_labels=labels))
    commit(qc, measured(400e6, T0 + 60 * S, "Tc-99m", end="removed"))
    [ended] = qc.tick(T0 + 31 * 60 * S).messages
    assert ended.payload["status"] == "incomplete"
    assert "no result for: vial 20 mL, syringe 3 mL" in ended.payload["detail"]


def test_sleeve_linearity_reads_unshielded_then_each_configured_sleeve_and_judges_them() -> None:
    """Sleeve-corrected readings against the most attenuating sleeve (s2, the lowest chamber current)."""
    qc = engine()
    labels = ("unshielded", "s1", "s2")
    commit(qc, started("sleeve_linearity", T0 - 60 * S, role="operator", setting="Tc-99m", step_labels=labels))
    # 1 GBq in the chamber at T0. Unshielded it reads 7 % high (a chamber over-responding at the top); in s1
    # (factor 10) and s2 (factor 100) it reads what decay and the factor give: A * 2^(-dt / T) / factor.
    steps = [
        measured(1.07e9, T0, "Tc-99m", end="removed"),
        measured(1e9 * 2 ** (-60 / TC99M_T) / 10, T0 + 60 * S, "Tc-99m", end="removed"),
        measured(1e9 * 2 ** (-120 / TC99M_T) / 100, T0 + 120 * S, "Tc-99m", end="removed"),
    ]
    outcome = commit(qc, *steps)
    [result] = outcome.results
    payload = result.payload
    assert (payload["test"], payload["verdict"]) == ("linearity_sleeve", "fail")  # +7 % > +-5 %
    assert payload["expected"] == pytest.approx(1e9, rel=1e-12)
    assert payload["deviation_pct"] == pytest.approx(7.0, rel=1e-9)
    assert payload["inputs"]["sleeve_factors"] == {"s1": 10.0, "s2": 100.0}
    assert payload["inputs"]["deviation_pct"]["s1"] == pytest.approx(0.0, abs=1e-9)
    [end] = of(outcome, "qc_procedure")
    assert (end["status"], end["verdict"], end["step_labels"]) == ("complete", "fail", ["unshielded", "s1", "s2"])


def test_ga68_identity_takes_two_readings_of_the_sample_and_names_its_elution() -> None:
    """Ph. Eur. 2464: T = dt * ln 2 / ln(A1 / A2) within 62-74 min; 800 MBq halving in 68 min gives T = 68 min."""
    qc = engine()
    eluted = elution(1, 1.2e9, T0 - 600 * S)
    commit(qc, eluted)
    steps = ("first reading", "second reading")
    commit(
        qc,
        started("ga68_half_life", T0, role="operator", step_labels=steps, elution_id=eluted.msg_id, generator="GA-1"),
    )
    commit(qc, measured(800e6, T0 + 60 * S, "Ga-68", end="removed"))
    dose = commit(qc, measured(50e6, T0 + 1800 * S, "Ga-68", end="removed"))  # another sample: 50 MBq, not ~500
    assert not dose.replacements
    outcome = commit(qc, measured(400e6, T0 + 60 * S + 68 * 60 * S, "Ga-68", end="removed"))
    [result] = outcome.results
    payload = result.payload
    assert (payload["test"], payload["verdict"], payload["measured"]) == ("ga68_half_life", "pass", pytest.approx(68.0))
    assert payload["expected"] == pytest.approx(GA68_T / 60, rel=1e-12)
    assert (payload["inputs"]["elution_id"], payload["inputs"]["generator"]) == (eluted.msg_id, "GA-1")
    [end] = of(outcome, "qc_procedure")
    assert (end["status"], end["elution_id"]) == ("complete", eluted.msg_id)


def test_two_half_life_readings_too_close_end_the_identity_test_incomplete_with_the_reason() -> None:
    qc = engine()
    commit(qc, started("ga68_half_life", T0, role="operator", step_labels=("first reading", "second reading")))
    commit(qc, measured(800e6, T0 + 60 * S, "Ga-68", end="removed"))
    # 5 min later the sample reads 800 MBq * 2^(-5 / 67.83): the same sample, but too soon to tell T from noise.
    outcome = commit(qc, measured(800e6 * 2 ** (-300 / GA68_T), T0 + 360 * S, "Ga-68", end="removed"))
    [end] = of(outcome, "qc_procedure")
    assert outcome.results == () and end["status"] == "incomplete" and end["verdict"] is None
    assert "the two half-life readings are 5.0 min apart; they must be at least 15 min apart" in end["detail"]


def test_a_geometry_test_open_at_a_restart_goes_on_with_its_geometries(tmp_path: Path) -> None:
    qc = engine()
    labels = ("vial 10 mL", "syringe 3 mL")
    with HistoryArchive(tmp_path / "h.sqlite3") as archive:
        archive.add_many(commit(qc, started("geometry", T0, setting="Tc-99m", step_labels=labels)).messages)
        archive.add_many(commit(qc, measured(400e6, T0 + 60 * S, "Tc-99m", end="removed")).messages)
        fresh = engine()
        fresh.restore(archive)
    [procedure] = fresh.open_procedures("cal")
    assert procedure.step_labels == labels and procedure.missing == ("syringe 3 mL",)
    outcome = commit(fresh, measured(400e6 * 2 ** (-600 / TC99M_T), T0 + 660 * S, "Tc-99m", end="removed"))
    [result] = outcome.results
    assert result.payload["deviation_pct"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    ("sleeves", "complaint"),
    [
        ({"unshielded": 1.0}, "sleeves.unshielded: is the reading without a sleeve"),
        ({"s1": 0.5}, r"sleeves.s1: a sleeve attenuates: its factor \(activity / reading in it\) is > 1, got 0.5"),
        ({"s1": "ten"}, "sleeves.s1: must be a finite number"),
        ({}, "devices.cal.sleeves: names no sleeve"),
    ],
)
def test_sleeve_factors_that_cannot_be_right_are_refused_by_the_config(sleeves: dict[str, Any], complaint: str) -> None:
    from hotlab.controller.config_table import ConfigError

    bad = CONFIG | {"devices": {"cal": CONFIG["devices"]["cal"] | {"sleeves": sleeves}}}
    with pytest.raises(ConfigError, match=complaint):
        QcConfig.from_mapping(bad)


def test_start_qc_sets_each_procedure_up_from_its_args_and_the_config_or_refuses_in_one_line() -> None:
    """The start record carries the steps the engine will wait for: the geometries given, the sleeves configured."""
    import asyncio

    from hotlab.controller.config import DeviceConfig, SerialTransport
    from hotlab.controller.qc.procedure_commands import ProcedureCommands, ProcedureRefused

    qc = QcEngine("lab", QcConfig.from_mapping(CONFIG | {"devices": {"cal": {}, "bare": {}}}))
    stored: list[Message] = []

    async def store(records: list[Message]) -> None:
        stored.extend(records)
        commit(qc, *records)

    commands = ProcedureCommands("lab", qc, store)

    def start(device: str, args: dict[str, Any]) -> dict[str, Any]:
        config = DeviceConfig(device, "hot", "vik202", SerialTransport("/dev/null"))
        reply = asyncio.run(commands.start(config, args, user="bob", role="operator", reason="quarterly QC"))
        return dict(stored[-1].payload) | {"reply": reply}

    def refused(device: str, args: dict[str, Any]) -> str:
        with pytest.raises(ProcedureRefused) as caught:
            start(device, args)
        assert "\n" not in str(caught.value)
        return str(caught.value)

    geometry = start("cal", {"procedure": "geometry", "nuclide": "Tc-99m", "geometries": ["vial 10 mL", "syringe"]})
    assert (geometry["settings"], geometry["step_labels"]) == (["Tc-99m"], ["vial 10 mL", "syringe"])
    assert "geometry procedure" in refused("cal", {"procedure": "ga68_half_life"})  # one check at a time
    assert refused("bare", {"procedure": "sleeve_linearity", "nuclide": "Tc-99m"}) == (
        "bare has no linearity sleeves: configure [qc.devices.bare.sleeves] label = factor "
        "(activity / reading in that sleeve)"
    )
    assert "no elution " + "e" * 32 in refused("bare", {"procedure": "ga68_half_life", "elution_id": "e" * 32})
    identity = start("bare", {"procedure": "ga68_half_life"})
    assert (identity["settings"], identity["step_labels"], identity["elution_id"]) == (
        ["Ga-68"],
        ["first reading", "second reading"],
        None,
    )
    with_sleeves = QcConfig.from_mapping(CONFIG)
    qc = QcEngine("lab", with_sleeves)
    commands = ProcedureCommands("lab", qc, store)
    sleeves = start("cal", {"procedure": "sleeve_linearity", "nuclide": "Tc-99m"})
    assert sleeves["step_labels"] == ["unshielded", "s1", "s2"]


def test_a_batch_judged_again_after_a_failed_commit_gives_the_same_records() -> None:
    """Results and procedure records had random msg_ids: judged again, the same verdict was a new record."""
    qc = engine()
    commit(qc, started("baseline", T0, source_id="CS-1"))
    batch = (
        measured(READS["Cs-137"], T0 + 60 * S, "Cs-137"),
        measured(READS["Tc-99m"], T0 + 90 * S, "Tc-99m", start_ns=T0 + 61 * S),
        measured(READS["F-18"], T0 + 120 * S, "F-18", start_ns=T0 + 91 * S, end="dwell"),
    )
    first, again = qc.process(*batch), qc.process(*batch)  # the first commit failed: nothing applied
    assert [m.payload for m in first.messages] == [m.payload for m in again.messages]
    assert {m.kind for m in first.messages} >= {"qc_result", "qc_procedure", "qc_baseline"}
    ticked = [qc.tick(T0 + 10**15).messages for _ in range(2)]
    assert ticked[0] == ticked[1]


def test_ge68_follow_up_takes_its_detectable_level_from_the_spread_of_the_measurements_background() -> None:
    """Only the mean background reached the rule, so a net reading inside the background's own noise counted as
    detected Ge-68 whenever it passed the configured floor (2 Bq here)."""
    qc = engine()
    eoe = parse_time_ns("2026-03-01T00:00:00Z", "eoe")
    eluted = elution(1, 1.2e9, eoe)
    commit(qc, eluted)
    later = eoe + 72 * 3600 * S
    commit(qc, started("ge68_breakthrough", later, role="operator", elution_id=eluted.msg_id, generator="GA-1"))
    empty = (8.0, 12.0, 10.0, 9.0, 11.0)  # mean 10 Bq, sd 1.58 Bq
    decision = 1.645 * statistics.stdev(empty) * math.sqrt(1 + 1 / len(empty))  # Currie L_C = 2.85 Bq
    outcome = commit(qc, measured(12.5, later + 60 * S, "Ga-68", end="removed", background_bq=10.0,
                                  background_readings=empty))  # fmt: skip
    [result] = outcome.results
    inputs = result.payload["inputs"]
    assert inputs["detected"] is False and inputs["background_readings"] == 5  # net 2.5 Bq < L_C
    assert inputs["detection_limit_bq"] == pytest.approx(2 * decision, rel=1e-9)


def test_a_timed_out_procedure_ends_at_its_deadline_whenever_the_tick_finds_it() -> None:
    """The end was stamped with the tick's time, so the same timeout decided twice gave two different records."""
    qc = engine()
    commit(qc, started("baseline", T0, source_id="CS-1"))
    deadline = T0 + 30 * 60 * S  # [qc] procedure_timeout_min = 30 in CONFIG
    first, later = qc.tick(deadline + 5 * S), qc.tick(deadline + 95 * S)
    assert first.messages == later.messages
    assert first.messages[0].payload["ended_ns"] == deadline
