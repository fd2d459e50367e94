"""QC procedures in the engine: baselines, daily constancy per setting, Ge-68 follow-up, linearity, timeouts.

Expected values come from the decay law written out here: A(t) = A0 * 2**(-dt / T_half), with the
half-lives of hotlab.physics.nuclides (the check source is Cs-137 whatever the setting).
"""

from __future__ import annotations

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
