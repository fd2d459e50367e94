"""Measurement detection from synthetic reading streams whose settled mean and sd are computed here.

Each stream is a list of (seconds, Bq) readings of one calibrator; the expected values come from the
decay law A(t) = A0 * 2^(-t / T½) and `statistics`, with the library's half-lives (physics/nuclides.py).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import jsonschema
import pytest

from hotlab.controller.archive import HistoryArchive
from hotlab.controller.measurements import (
    READING_IDS_KEPT,
    DetectedDevice,
    MeasurementDetector,
    MeasurementSettings,
)
from hotlab.controller.messages import Message, reading_message
from hotlab.controller.plausibility import Plausibility, PlausibilityRules
from hotlab.drivers.records import Reading
from hotlab.physics.nuclides import get_nuclide

S = 1_000_000_000
T0 = 1_795_000_000 * S
SCHEMA = json.loads(
    (Path(__file__).resolve().parent.parent / "controller" / "schemas" / "measurement.json").read_text()
)
F18_HALF_LIFE_S = get_nuclide("F-18").half_life_s
CS137_HALF_LIFE_S = get_nuclide("Cs-137").half_life_s


def detector(settle_readings: int = 4, dwell_s: float = 60.0) -> MeasurementDetector:
    rules = PlausibilityRules("vik202", Plausibility.for_family("vik202"))
    return MeasurementDetector(
        "lab", [DetectedDevice("cal-1", "hotcell-1", rules, MeasurementSettings(settle_readings, dwell_s))]
    )


def readings(
    stream: list[tuple[float, float]], nuclide: str | None = "Cs-137", suspect: set[int] = frozenset()
) -> list[Message]:  # type: ignore[assignment]
    messages = []
    for index, (seconds, activity) in enumerate(stream):
        quality = "suspect" if index in suspect else "good"
        reading = Reading(
            "cal-1",
            nuclide,
            activity,
            activity,
            "Bq",
            T0 + int(seconds * S),
            b"frame",
            quality=quality,  # type: ignore[arg-type]
            quality_reason="flipped" if quality == "suspect" else None,
        )
        messages.append(reading_message("lab", "hotcell-1", reading))
    return messages


def run(found: MeasurementDetector, messages: list[Message]) -> list[dict[str, object]]:
    """Feed the messages one commit at a time, as the service does; return the measurement payloads."""
    out = []
    for message in messages:
        outcome = found.process([message])
        found.apply(outcome)
        out.extend(m.payload for m in outcome.measurements)
    for payload in out:
        jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker()).validate(payload)
    return out


def cs137(a0_bq: float, seconds: float) -> float:
    return a0_bq * 2.0 ** (-seconds / CS137_HALF_LIFE_S)


def test_a_dose_inserted_read_and_removed_is_one_measurement() -> None:
    background = [(0, 1.2e3), (2, -0.8e3), (4, 2.0e3)]
    rising = [(6, 3.1e6)]  # the vial on its way down: above background, not settled
    plateau = [(8, 7.41e6), (10, 7.39e6), (12, 7.40e6), (14, 7.43e6), (16, 7.38e6), (18, 7.42e6)]
    removed = [(20, 0.9e3), (22, 1.1e3)]
    messages = readings(background + rising + plateau + removed)
    [measurement] = run(detector(settle_readings=4), messages)
    # Settled at the 4th plateau reading (14 s): the window (8..14 s) holds four readings within 2 %.
    corrected = [cs137(bq, 14 - seconds) for seconds, bq in plateau]  # each carried to the settle time
    assert measurement["activity_bq"] == pytest.approx(statistics.fmean(corrected), rel=1e-12)
    assert measurement["sd_bq"] == pytest.approx(statistics.stdev(corrected), rel=1e-9)
    assert measurement["n"] == 6
    assert measurement["background_bq"] == pytest.approx(statistics.fmean([1.2e3, -0.8e3, 2.0e3]))
    assert measurement["background_readings"] == [1.2e3, -0.8e3, 2.0e3]  # the readings that mean is of
    assert (measurement["start_ns"], measurement["settle_ns"], measurement["removal_ns"]) == (
        T0 + 6 * S,
        T0 + 14 * S,
        T0 + 20 * S,
    )
    assert measurement["time_ns"] == measurement["settle_ns"] and measurement["end"] == "removed"
    assert measurement["nuclide"] == "Cs-137" and measurement["device"] == "cal-1"
    assert measurement["reading_ids"] == [m.msg_id for m in messages[4:10]]
    assert measurement["removal_time"] is not None


def test_the_settled_value_is_decay_corrected_to_the_settle_time() -> None:
    """F-18 read once a minute for 10 min: noise-free readings that follow the decay law exactly."""
    a0 = 400e6
    plateau = [(60.0 * k, a0 * 2.0 ** (-60.0 * k / F18_HALF_LIFE_S)) for k in range(1, 11)]
    stream = [(0.0, 0.0), *plateau, (700.0, 0.0)]
    [measurement] = run(detector(settle_readings=4, dwell_s=3600), readings(stream, nuclide="F-18"))
    settle_s = 240.0  # the 4th reading: 60..240 s lie within 2 % of their mean once decay-corrected
    assert measurement["settle_ns"] == T0 + int(settle_s * S)
    assert measurement["activity_bq"] == pytest.approx(a0 * 2.0 ** (-settle_s / F18_HALF_LIFE_S), rel=1e-9)
    assert measurement["sd_bq"] == pytest.approx(0.0, abs=1e-3) and measurement["n"] == 10


def test_a_check_source_left_in_is_published_once_after_its_dwell() -> None:
    stream = [(0, 0.0), (2, 0.0), *((4 + 2 * k, 7.4e6) for k in range(20)), (44, 0.0)]
    [measurement] = run(detector(settle_readings=4, dwell_s=10), readings(stream))
    # Settled at 10 s (readings 4..10 s); published with the reading 10 s later (20 s), source still in:
    # the mean of the 9 readings from 4 s to 20 s. Its removal at 44 s publishes nothing more.
    assert (measurement["settle_ns"], measurement["end"], measurement["removal_ns"]) == (T0 + 10 * S, "dwell", None)
    assert measurement["n"] == 9 and measurement["activity_bq"] == pytest.approx(cs137(7.4e6, 0.0), rel=1e-6)


def test_each_insertion_is_one_measurement_and_suspect_readings_are_skipped() -> None:
    stream: list[tuple[float, float]] = []
    for cycle in range(3):
        start = 30.0 * cycle
        stream += [(start + k, 0.0) for k in range(3)]
        stream += [(start + 3 + k, 5e8) for k in range(8)]
    stream.append((90.0, 0.0))
    # A flipped frame in the middle of each plateau (quality suspect): ignored, the plateau goes on.
    suspect = {3 + 4 + 11 * cycle for cycle in range(3)}
    messages = readings(stream, suspect=suspect)
    for index in suspect:
        messages[index].payload["activity_bq"] = 5e9
    found = run(detector(settle_readings=4), messages)
    assert [m["end"] for m in found] == ["removed"] * 3
    assert [m["n"] for m in found] == [7, 7, 7]  # 8 readings in, one of them suspect
    assert all(m["activity_bq"] == pytest.approx(cs137(5e8, 0.0), rel=1e-6) for m in found)
    assert len({m["msg_id"] for m in found}) == 3
    assert not {messages[i].msg_id for i in suspect} & {r for m in found for r in m["reading_ids"]}  # type: ignore[attr-defined]


def test_a_source_already_in_at_start_is_not_measured_until_it_comes_out() -> None:
    stream = [(k, 7.4e6) for k in range(10)] + [(10, 0.0)] + [(11 + k, 7.4e6) for k in range(6)] + [(17, 0.0)]
    found = run(detector(settle_readings=4), readings(stream))
    assert len(found) == 1 and found[0]["start_ns"] == T0 + 11 * S


def test_a_level_or_setting_change_ends_one_measurement_and_starts_the_next() -> None:
    stream = [(0, 0.0), *((1 + k, 7.4e9) for k in range(5)), *((6 + k, 3.0e9) for k in range(5)), (11, 0.0)]
    first, second = run(detector(settle_readings=4), readings(stream, nuclide="Tc-99m"))
    assert (first["end"], first["removal_ns"], first["n"]) == ("changed", None, 5)
    assert (second["end"], second["start_ns"], second["removal_ns"]) == ("removed", T0 + 6 * S, T0 + 11 * S)
    assert second["background_bq"] == 0.0  # the empty chamber before the first vial
    messages = readings([(0, 0.0), *((1 + k, 7.4e9) for k in range(5))], nuclide="Tc-99m")
    messages += readings([(6 + k, 2.29e9) for k in range(5)], nuclide="F-18") + readings([(11, 0.0)], nuclide="F-18")
    first, second = run(detector(settle_readings=4), messages)
    assert (first["end"], first["nuclide"], second["nuclide"], second["end"]) == (
        "setting_changed",
        "Tc-99m",
        "F-18",
        "removed",
    )


def test_a_source_removed_before_it_settled_is_not_a_measurement() -> None:
    stream = [(0, 0.0), (1, 2e9), (2, 5e9), (3, 7e9), (4, 0.0)]
    assert run(detector(settle_readings=4), readings(stream, nuclide="Tc-99m")) == []


def test_process_changes_nothing_until_apply_and_ids_are_name_based() -> None:
    stream = [(0, 0.0), *((1 + k, 7.4e6) for k in range(5)), (6, 0.0)]
    messages = readings(stream)
    found = detector(settle_readings=4)
    outcome = found.process(messages)
    [measurement] = outcome.measurements
    assert outcome.messages == (*messages, measurement)  # placed right after the reading that completed it
    again = found.process(messages)  # a failed commit is retried with the same messages: same result
    assert again.measurements == outcome.measurements
    found.apply(outcome)
    assert found.published(measurement.msg_id) == measurement.payload
    assert found.process(messages[-1:]).measurements == ()  # applied: the chamber is empty now
    assert run(detector(settle_readings=4), messages)[0]["msg_id"] == measurement.msg_id  # replayed: same id


def test_restore_replays_committed_readings_so_a_restart_publishes_the_same_measurement(tmp_path: Path) -> None:
    stream = [(0, 0.0), *((1 + k, 7.4e6) for k in range(8)), (9, 0.0)]
    messages = readings(stream)
    [expected] = run(detector(settle_readings=4), messages)
    # The controller stops after the 6th reading: 5 are archived, the 6th still waits in the outbox.
    with HistoryArchive(tmp_path / "history.sqlite3") as archive:
        archive.add_many(messages[:5])
        restarted = detector(settle_readings=4)
        assert restarted.restore(archive, messages[5:6], now_ns=T0 + 6 * S) == 6
    [found] = run(restarted, messages[6:])
    assert found == expected


def test_a_long_plateau_names_its_first_and_last_readings_and_counts_them_all() -> None:
    """A source left in for long: `n` counts every plateau reading, `reading_ids` stays bounded."""
    kept = READING_IDS_KEPT
    plateau_count = 2 * kept + 37
    stream = [(0, 0.0), *((1 + k, 7.4e6) for k in range(plateau_count)), (plateau_count + 1, 0.0)]
    messages = readings(stream)
    [measurement] = run(detector(settle_readings=4, dwell_s=3600), messages)
    plateau_ids = [m.msg_id for m in messages[1 : 1 + plateau_count]]
    assert measurement["n"] == plateau_count
    assert measurement["reading_ids"] == plateau_ids[:kept] + plateau_ids[-kept:]
    assert len(measurement["reading_ids"]) == SCHEMA["properties"]["reading_ids"]["maxItems"]


def test_restore_skips_malformed_readings_and_takes_a_reading_without_quality_as_good(tmp_path: Path) -> None:
    stream = [(0, 0.0), *((1 + k, 7.4e6) for k in range(8)), (9, 0.0)]
    messages = readings(stream)
    [expected] = run(detector(settle_readings=4), messages)
    template = messages[5]
    no_time = {k: v for k, v in template.payload.items() if k != "time_ns"} | {"msg_id": "b" * 32}
    bad_activity = template.payload | {"msg_id": "c" * 32, "activity_bq": "lots"}
    no_quality = {k: v for k, v in template.payload.items() if k != "quality"}
    pending = [
        Message("reading", template.topic, no_time),
        Message("reading", template.topic, bad_activity),
        Message("reading", template.topic, no_quality),
    ]
    with HistoryArchive(tmp_path / "history.sqlite3") as archive:
        archive.add_many(messages[:5])
        restarted = detector(settle_readings=4)
        # 5 archived + the one without a quality; the two malformed ones are skipped, not fatal.
        assert restarted.restore(archive, pending, now_ns=T0 + 6 * S) == 6
    [found] = run(restarted, messages[6:])
    assert found == expected
