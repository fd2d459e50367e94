"""Generator QC across restarts and failed commits: the verdict must not depend on either.

The reviewer's case: a Ga-68 elution 1 h after the previous one, true yield 80 %, was judged
~47 % (fail) after a restart, because the restarted engine only knew the config's stale
`last_elution` and took the column to be in equilibrium with nothing left on it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from hotlab.controller.archive import HistoryArchive
from hotlab.controller.messages import Message, elution_message, elution_msg_id, reading_message
from hotlab.controller.outbox import Outbox
from hotlab.controller.qc.engine import QcConfig, QcEngine, QcOutcome, parse_time_ns
from hotlab.controller.qc.generator_rules import available_activity
from hotlab.drivers.records import ElutionRecord, Reading
from tests.schema_check import malformed_on_purpose

HOUR_NS = 3_600_000_000_000
DAY_NS = 24 * HOUR_NS
START_NS = parse_time_ns("2026-03-01T00:00:00Z", "test")

CONFIG = tomllib.loads("""
trend_min_points = 5

[generators.GA-1]
parent = "Ge-68"
activity = "1.85 GBq"
calibration_time = 2026-01-01T00:00:00Z
last_elution = 2026-02-28T00:00:00Z   # the stale seed a restart used to fall back to

[devices.calib1]
minimum_detectable_bq = 1.0  # Bq: the detectable level of a Ge-68 re-measurement with one background value
""")


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


def ge68_reading(counter: int, at_ns: int, activity_bq: float = 10.0) -> Message:
    extra = {"qc": "ge68_breakthrough", "generator": "GA-1", "elution_counter": counter, "background_bq": 0.0}
    return reading_message(
        "lab1", "hotcell", Reading("calib1", "Ga-68", activity_bq, activity_bq, "Bq", at_ns, b"", extra)
    )


def new_engine() -> QcEngine:
    return QcEngine("lab1", QcConfig.from_mapping(CONFIG))


def commit(engine: QcEngine, archive: HistoryArchive, *messages: Message) -> QcOutcome:
    """The controller's order: judge, store, and only then let the engine advance."""
    outcome = engine.process(*messages)
    archive.add_many(outcome.messages)
    engine.apply(outcome)
    return outcome


def verdicts(outcome: QcOutcome) -> list[tuple[str, str, float, float, float]]:
    """What a verdict says, without its msg_id (new on every call)."""
    return [
        (
            m.payload["test"],
            m.payload["verdict"],
            m.payload["measured"],
            m.payload["expected"],
            m.payload["value_judged"],
        )
        for m in outcome.results
    ]


def eighty_percent_one_hour_later() -> tuple[Message, Message]:
    """Elution 1 at START (1.2 GBq), elution 2 one hour later eluting 80 % of what the Bateman model has on the column."""
    spec = QcConfig.from_mapping(CONFIG).generators["GA-1"]
    seed_ns = parse_time_ns("2026-02-28T00:00:00Z", "seed")
    available_1 = available_activity(spec, START_NS, seed_ns)
    available_2 = available_activity(spec, START_NS + HOUR_NS, START_NS, available_1 - 1.2e9)
    return elution(1, 1.2e9, START_NS), elution(2, 0.8 * available_2, START_NS + HOUR_NS)


def test_restart_gives_the_same_verdict_as_no_restart(tmp_path: Path) -> None:
    first, second = eighty_percent_one_hour_later()
    with HistoryArchive(tmp_path / "uninterrupted.sqlite") as archive:
        uninterrupted = new_engine()
        commit(uninterrupted, archive, first)
        expected = commit(uninterrupted, archive, second)
    assert expected.results[0].payload["value_judged"] == pytest.approx(80.0, rel=1e-9)
    assert expected.results[0].payload["verdict"] == "pass"

    with HistoryArchive(tmp_path / "restarted.sqlite") as archive:
        commit(new_engine(), archive, first)
        restarted = new_engine()  # the controller restarts here
        assert restarted.restore(archive) == 1
        after_restart = commit(restarted, archive, second)
    assert verdicts(after_restart) == verdicts(expected)
    assert after_restart.results[0].payload["inputs"]["last_elution"] == "2026-03-01T00:00:00.000000Z"

    # Without restore the engine is back to the reviewer's false fail (the stale seed, no residual).
    forgetful = new_engine().process(second)
    assert forgetful.results[0].payload["verdict"] == "fail"
    assert forgetful.results[0].payload["value_judged"] == pytest.approx(47.3, abs=0.1)


def test_restore_brings_back_trend_history_eluates_and_unarchived_messages(tmp_path: Path) -> None:
    # Six daily elutions with a falling yield; the restart happens after the 4th, and the 4th has
    # not reached the archive yet: it is still waiting in the outbox for the history sink.
    stream = [elution(n, (1.2 - 0.05 * n) * 1e9, START_NS + n * DAY_NS) for n in range(1, 7)]
    later = [*stream[4:], ge68_reading(1, START_NS + 4 * DAY_NS)]
    with HistoryArchive(tmp_path / "a.sqlite") as archive:
        uninterrupted = new_engine()
        for message in stream[:4]:
            commit(uninterrupted, archive, message)
        expected = [verdicts(commit(uninterrupted, archive, message)) for message in later]
    assert [len(v) for v in expected] == [2, 2, 1]  # yield + trend from the 5th elution on; the Ge-68 verdict

    outbox = Outbox(tmp_path / "outbox.sqlite", sinks=["history"])
    try:
        with HistoryArchive(tmp_path / "b.sqlite") as archive:
            before_restart = new_engine()
            for message in stream[:3]:
                commit(before_restart, archive, message)
            fourth = before_restart.process(stream[3])
            outbox.put_many(fourth.messages)  # committed, crash before the history sink archived it
            restarted = new_engine()
            restored = restarted.restore(archive, [stored.message for stored in outbox.pending("history")])
            assert restored == 4
            after_restart = [verdicts(commit(restarted, archive, message)) for message in later]
    finally:
        outbox.close()
    assert after_restart == expected


def test_reprocessing_after_a_failed_commit_gives_the_same_results() -> None:
    first, second = eighty_percent_one_hour_later()
    engine = new_engine()
    engine.apply(engine.process(first))
    attempt = engine.process(second)
    # The outbox commit of `attempt` fails: it is never applied, and the retry is judged again, identically.
    retry = engine.process(second)
    assert verdicts(retry) == verdicts(attempt) and retry.results
    assert retry.replacements[second.msg_id].payload == attempt.replacements[second.msg_id].payload
    engine.apply(retry)
    # Once committed, the same elution is a re-delivery: committed as it came, no second verdict.
    assert engine.process(second).messages == (second,)
    # Applying an outcome twice (or a stale one) cannot move the state backwards.
    engine.apply(attempt)
    third = elution(3, 1.0e9, START_NS + 3 * HOUR_NS)
    assert engine.process(third).results[0].payload["inputs"]["last_elution"] == "2026-03-01T01:00:00.000000Z"


def test_a_batch_is_judged_in_order_like_separate_commits() -> None:
    first, second = eighty_percent_one_hour_later()
    one_by_one = new_engine()
    outcome_1 = one_by_one.process(first)
    one_by_one.apply(outcome_1)
    outcome_2 = one_by_one.process(second)
    batch = new_engine().process(first, second)
    assert verdicts(batch) == verdicts(outcome_1) + verdicts(outcome_2)
    assert [m.msg_id for m in batch.messages if m.kind == "elution"] == [first.msg_id, second.msg_id]
    assert set(batch.replacements) == {first.msg_id, second.msg_id}


def test_restore_skips_archived_elutions_it_cannot_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first, second = eighty_percent_one_hour_later()
    broken = malformed_on_purpose(
        Message("elution", first.topic, first.payload | {"msg_id": "broken", "counter": "three", "time_ns": 1})
    )
    with HistoryArchive(tmp_path / "h.sqlite") as archive:
        commit(new_engine(), archive, first)
        archive.add_many([broken])
        restarted = new_engine()
        assert restarted.restore(archive) == 1
    assert "1 archived elution(s) of GA-1 lack counter/end_ns/activity_bq; skipped" in caplog.text
    assert restarted.process(second).results[0].payload["value_judged"] == pytest.approx(80.0, rel=1e-9)


def test_after_a_restart_the_elution_of_a_new_count_is_judged(tmp_path: Path) -> None:
    """The station's counter started again while the controller was down: its elution 1 is new, not a repeat."""
    first, _ = eighty_percent_one_hour_later()
    new_count = elution(1, 1.0e9, START_NS + DAY_NS, counter_reset="counter epoch changed; counter 1 -> 1")
    with HistoryArchive(tmp_path / "h.sqlite") as archive:
        commit(new_engine(), archive, first)
        restarted = new_engine()
        assert restarted.restore(archive) == 1
        judged = commit(restarted, archive, new_count)
        assert [r.payload["test"] for r in judged.results] == ["elution_yield"]
        assert judged.results[0].payload["inputs"]["last_elution"] == "2026-03-01T00:00:00.000000Z"
        assert [e["yield_pct"] is not None for e in archive.query("elution", site="lab1")] == [True, True]


def test_restore_follows_time_not_counters_across_a_counter_restart(tmp_path: Path) -> None:
    old_count = [elution(n, 1.1e9, START_NS + (n - 5) * DAY_NS) for n in (5, 6)]
    new_count = elution(1, 1.0e9, START_NS + 2 * DAY_NS, counter_reset="counter went back; counter 6 -> 1")
    with HistoryArchive(tmp_path / "h.sqlite") as archive:
        before = new_engine()
        for message in [*old_count, new_count]:
            assert commit(before, archive, message).results
        restarted = new_engine()
        assert restarted.restore(archive) == 3
        # The last elution is the new count's elution 1 (the latest), so elution 2 follows it.
        after = commit(restarted, archive, elution(2, 1.0e9, START_NS + 3 * DAY_NS)).results
    assert after and after[0].payload["inputs"]["last_elution"] == "2026-03-03T00:00:00.000000Z"
