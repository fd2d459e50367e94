"""Archive retention: raw readings past the window become per-minute summaries, status repeats go, records stay.

Expected summaries are computed here from the readings the test made (grouping, min, mean, max,
counting), never read back from the code under test.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from hotlab.controller import archive_retention
from hotlab.controller.archive import HistoryArchive, ReadingSummary, TimeRange
from hotlab.controller.archive_retention import HOUR_NS, MINUTE_NS, raw_cutoff_ns, retain
from hotlab.controller.config import RetentionConfig
from hotlab.controller.messages import (
    MeasurementValues,
    Message,
    archive_retention_message,
    audit_anchor_message,
    device_status_message,
    elution_message,
    measurement_label_message,
    measurement_message,
    qc_baseline_message,
    qc_procedure_message,
    reading_message,
    suspect_alarm_message,
)
from hotlab.controller.outbox import AsyncOutbox, Outbox
from hotlab.controller.qc.limits import DEFAULT_LIMITS
from hotlab.controller.qc.result import QcResult
from hotlab.controller.qc.schedule import ItemStatus
from hotlab.controller.qc.schedule_stage import qc_status_message
from hotlab.controller.sinks.history import run_history_sink
from hotlab.drivers.records import ElutionRecord, Reading
from tests.schema_check import malformed_on_purpose, validator_for
from tests.test_history import NOV_1, until

ROOT = Path(__file__).resolve().parents[1]
S = 1_000_000_000
SITE, STATION = "hotlab-a", "hot-cell-1"
#: Far beyond any test's rows: every row is "archived before" it.
LATER = 2**62


def reading(device: str, t: int, bq: float, *, nuclide: str | None = "Tc-99m", suspect: bool = False) -> Message:
    quality, reason = ("suspect", "outside the range") if suspect else ("good", None)
    frame = f">{bq:.4E}\r\n".encode()
    return reading_message(
        SITE, STATION, Reading(device, nuclide, bq, bq, "Bq", t, frame, quality=quality, quality_reason=reason)
    )


def readings_of(devices: Iterable[str], start_ns: int, end_ns: int, step_s: int, seed: int = 1) -> list[Message]:
    """Readings every `step_s` (not a divisor of a minute, so minutes hold different counts); about one in
    eleven suspect with a value far out of range, a setting change every 40 minutes, a minute of only suspects."""
    rng = random.Random(seed)
    out = []
    for device in devices:
        for t in range(start_ns, end_ns, step_s * S):
            minute = (t - start_ns) // MINUTE_NS
            nuclide = "Tc-99m" if (t - start_ns) // (40 * MINUTE_NS) % 2 == 0 else "F-18"
            suspect = minute == 7 or rng.random() < 1 / 11
            bq = 7.4e19 if suspect else rng.uniform(1e3, 5e9)
            out.append(reading(device, t, bq, nuclide=nuclide, suspect=suspect))
    return out


def expected_summaries(messages: Iterable[Message], before_ns: int) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """(device, minute, site, station, nuclide) -> (n good, suspect, min, mean, max) of the readings before `before_ns`."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for message in messages:
        p = message.payload
        if message.kind == "reading" and p["time_ns"] < before_ns:
            minute = p["time_ns"] - p["time_ns"] % (60 * S)
            groups[(p["device"], minute, p["site"], p["station"], p.get("nuclide"))].append(p)
    out = {}
    for key, payloads in groups.items():
        good = [p["activity_bq"] for p in payloads if p.get("quality", "good") != "suspect"]
        suspect = len(payloads) - len(good)
        if good:
            out[key] = (len(good), suspect, min(good), statistics.fmean(good), max(good))
        else:
            out[key] = (0, suspect, None, None, None)
    return out


def summarised(archive: HistoryArchive, devices: Iterable[str]) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    out = {}
    for device in devices:
        for s in archive.summaries(device):
            out[(s.device, s.minute_ns, s.site, s.station, s.nuclide)] = (s.n, s.suspect, s.min_bq, s.mean_bq, s.max_bq)
    return out


def assert_same_summaries(
    found: dict[tuple[Any, ...], tuple[Any, ...]], expected: dict[tuple[Any, ...], tuple[Any, ...]]
) -> None:
    assert found.keys() == expected.keys()
    for key, (n, suspect, low, mean, high) in expected.items():
        assert found[key][:3] == (n, suspect, low), key
        assert found[key][3] == (None if mean is None else pytest.approx(mean, rel=1e-12)), key
        assert found[key][4] == high, key


def test_summaries_are_min_mean_max_and_counts_of_the_readings_past_the_window(tmp_path: Path) -> None:
    messages = readings_of(["cal-1", "cal-2"], NOV_1, NOV_1 + 150 * MINUTE_NS, step_s=7)
    cutoff = NOV_1 + 2 * HOUR_NS
    with HistoryArchive(tmp_path / "history.sqlite3") as archive:
        archive.add_many(messages)
        done = retain(archive, cutoff, archived_before_ns=LATER)
        expected = expected_summaries(messages, cutoff)
        assert_same_summaries(summarised(archive, ["cal-1", "cal-2"]), expected)
        # The minute of only suspect readings: counted, and no value from them.
        assert expected[("cal-1", NOV_1 + 7 * MINUTE_NS, SITE, STATION, "Tc-99m")][0] == 0
        before = [m for m in messages if m.payload["time_ns"] < cutoff]
        assert (done.readings, done.minutes, done.complete) == (len(before), len(expected), True)
        assert done.chunks == 2 * 2  # two devices, two hours each
        raw = [p["msg_id"] for p in archive.query("reading")]
        assert raw == sorted((m.msg_id for m in messages if m.payload["time_ns"] >= cutoff), key=raw.index)
        assert len(raw) == len(messages) - len(before)


def test_the_cutoff_is_a_whole_minute_raw_days_back() -> None:
    now = NOV_1 + 30 * 86_400 * S + 59 * S + 123
    assert raw_cutoff_ns(now, 30) == NOV_1
    assert raw_cutoff_ns(now, 0.5) == NOV_1 + 29 * 86_400 * S + 12 * 3600 * S


def every_other_kind(t: int) -> list[Message]:
    """One record of each kind retention must never touch, all long past the window."""
    measurement = measurement_message(
        SITE,
        STATION,
        MeasurementValues("cal-1", "Tc-99m", 7.4e8, 1e6, 5, 1e3, t - 9 * S, t - 5 * S, t, "removed", ("a" * 32,) * 5),
    )
    elution = ElutionRecord(STATION, "GE68-001", "Ge-68", "Ga-68", 3, 1.1e9, 5.0, t - 60 * S, t)
    item = ItemStatus(
        "cal-1", STATION, "daily_constancy", "constancy", "due", t, t + HOUR_NS, None, None, None, None, "due today"
    )
    return [
        measurement,
        measurement_label_message(
            SITE,
            STATION,
            "cal-1",
            measurement=measurement.payload,
            label="dose 7",
            user="jdoe",
            request_id="r",
            time_ns=t,
        ),
        elution_message(SITE, elution, yield_pct=70.0),
        QcResult(
            test="constancy",
            verdict="pass",
            measured=7.1e6,
            expected=7.0e6,
            deviation_pct=1.4,
            unit="Bq",
            limit=DEFAULT_LIMITS["constancy"],
            value_judged=1.4,
            time_ns=t,
            inputs={"source": "CS-1"},
        ).to_message(SITE, STATION, "cal-1"),  # fmt: skip
        suspect_alarm_message(
            SITE,
            STATION,
            "cal-1",
            active=True,
            recent_suspect=6,
            window=50,
            threshold=0.1,
            total=9,
            reason="range",
            time_ns=t,
        ),  # fmt: skip
        audit_anchor_message(
            SITE,
            trail="/var/audit.jsonl",
            trail_id=hashlib.sha256(b"1").hexdigest(),
            seq=4,
            hash_hex=hashlib.sha256(b"4").hexdigest(),
            time_ns=t,
        ),  # fmt: skip
        qc_procedure_message(
            SITE,
            STATION,
            "cal-1",
            procedure_id="b" * 32,
            procedure="daily_constancy",
            status="complete",
            started_by=None,
            started_ns=t - HOUR_NS,
            ended_ns=t,
            source_id="CS-1",
            elution_id=None,
            generator=None,
            reason=None,
            settings=["Tc-99m"],
            verdict="pass",
            results=["c" * 32],
            measurements=["d" * 32],
            detail="ok",
        ),  # fmt: skip
        qc_baseline_message(
            SITE,
            STATION,
            "cal-1",
            source_id="CS-1",
            setting="Tc-99m",
            activity_bq=6.5e6,
            baseline_ns=t,
            measurement_id="d" * 32,
            procedure_id="b" * 32,
            taken_by={"user": "qco", "role": "qc_officer"},
            reason="acceptance",
            source_nuclide="Cs-137",
            half_life_s=9.49e8,
            half_life_source="NNDC",
        ),  # fmt: skip
        qc_status_message(SITE, item, t),
        archive_retention_message(
            SITE,
            raw_days=30,
            cutoff_ns=t,
            started_ns=t,
            time_ns=t,
            readings=1,
            minutes=1,
            statuses=0,
            chunks=1,
            complete=True,
            freed_bytes=0,
            archive_bytes=4096,
        ),  # fmt: skip
        # A kind this code does not know (a later version's, say) is kept too.
        malformed_on_purpose(
            Message("signature", f"hotlab/{SITE}/controller/signature", {"msg_id": "e" * 32, "time_ns": t})
        ),  # type: ignore[arg-type]
    ]


def test_every_record_but_raw_readings_and_status_repeats_is_kept_byte_for_byte(tmp_path: Path) -> None:
    records = every_other_kind(NOV_1 + 10 * MINUTE_NS)
    with HistoryArchive(tmp_path / "history.sqlite3") as archive:
        archive.add_many(records + readings_of(["cal-1"], NOV_1, NOV_1 + HOUR_NS, step_s=5))
        rows = "SELECT msg_id, kind, topic, time_ns, payload FROM message WHERE kind != 'reading' ORDER BY msg_id"
        kept = archive.select(rows)
        assert len(kept) == len(records)
        done = retain(archive, NOV_1 + 30 * 86_400 * S, archived_before_ns=LATER)
        assert done.readings == 720 and archive.count("reading") == 0
        assert archive.select(rows) == kept


def test_a_second_pass_counts_nothing_twice_and_late_readings_are_added_to_their_minute(tmp_path: Path) -> None:
    first = readings_of(["cal-1"], NOV_1, NOV_1 + HOUR_NS, step_s=7)
    cutoff = NOV_1 + HOUR_NS
    with HistoryArchive(tmp_path / "history.sqlite3") as archive:
        archive.add_many(first)
        retain(archive, cutoff, archived_before_ns=LATER)
        once = summarised(archive, ["cal-1"])
        again = retain(archive, cutoff, archived_before_ns=LATER)
        assert (again.readings, again.minutes, again.statuses, again.changed) == (0, 0, 0, False)
        assert summarised(archive, ["cal-1"]) == once
        # Readings of already summarised minutes that reach the archive only now (a long outage): merged.
        late = readings_of(["cal-1"], NOV_1 + 3 * S, NOV_1 + 20 * MINUTE_NS, step_s=11, seed=2)
        archive.add_many(late)
        merged = retain(archive, cutoff, archived_before_ns=LATER)
        assert merged.readings == len(late)
        assert_same_summaries(summarised(archive, ["cal-1"]), expected_summaries(first + late, cutoff))


def test_rows_archived_after_the_sink_last_caught_up_are_left_raw(tmp_path: Path) -> None:
    """The outbox may still replay them: summarised now, a replay would be archived and counted again."""
    messages = readings_of(["cal-1"], NOV_1, NOV_1 + HOUR_NS, step_s=10)
    with HistoryArchive(tmp_path / "history.sqlite3") as archive:
        caught_up = time.time_ns()
        archive.add_many(messages)
        done = retain(archive, NOV_1 + HOUR_NS, archived_before_ns=caught_up)
        assert (done.readings, archive.count("reading"), list(archive.summaries("cal-1"))) == (0, len(messages), [])
        assert retain(archive, NOV_1 + HOUR_NS, archived_before_ns=time.time_ns()).readings == len(messages)


def status(
    t: int, *, up: bool = True, detail: str = "ok", errors: int = 0, state: str | None = None, **more: Any
) -> Message:
    built = device_status_message(
        SITE, STATION, "st-1", up=up, latency_ms=random.uniform(1, 9) if up else None, errors=errors,
        detail=detail, time_ns=t, station_state=state if up else None, fault_code=None,
    )  # fmt: skip
    return Message("device_status", built.topic, built.payload | more)


def status_story() -> list[Message]:
    """A station's statuses once a minute for three hours: online, an elution, a clock alarm, down for half
    an hour (errors growing), back. Every minute except the state changes repeats the minute before."""
    out = []
    for minute in range(180):
        t = NOV_1 + minute * MINUTE_NS + 17 * S
        if minute == 0:
            out.append(status(t, detail="online", state="idle"))
        elif 40 <= minute < 42:
            out.append(status(t, state="eluting"))
        elif minute == 42:
            out.append(status(t, state="done"))
        elif 90 <= minute < 120:
            out.append(status(t, up=False, detail="ConnectionRefusedError: refused", errors=minute - 89))
        elif 60 <= minute < 65:  # the station's clock drifted out of bounds, then back (only the alarm counts)
            clock = {"clock_offset_s": 9.0 + minute, "clock_uncertainty_s": 0.01, "max_clock_offset_s": 5.0}
            out.append(status(t, state="idle", clock_alarm=True, **clock))
        elif minute == 120:
            out.append(status(t, detail="online", state="idle", errors=31))
        else:
            out.append(status(t, state="idle", errors=0 if minute < 90 else 31))
    return out


def state_of(message: Message) -> tuple[Any, ...]:
    """What a status says about the device, as docs/audit-and-report.md "Retention" defines a change."""
    p = message.payload
    return (
        p["site"], p["station"], p["up"], p["detail"], p.get("station_state"), p.get("fault_code"), p.get("clock_alarm")
    )  # fmt: skip


def kept_by_the_rule(statuses: list[Message], cutoff_ns: int) -> list[str]:
    """Everything in the window; before it, the first status of each run of one state and the last."""
    states = [state_of(m) for m in statuses]
    last = len(statuses) - 1
    return [
        m.msg_id
        for i, m in enumerate(statuses)
        if m.payload["time_ns"] >= cutoff_ns
        or i in (0, last)
        or states[i] not in (states[i - 1], states[i + 1])
        or states[i - 1] != states[i + 1]
    ]


def test_status_repeats_go_and_each_change_and_the_last_status_before_it_stay(tmp_path: Path) -> None:
    story = status_story()
    cutoff = NOV_1 + 150 * MINUTE_NS
    with HistoryArchive(tmp_path / "history.sqlite3") as archive:
        archive.add_many(story)
        done = retain(archive, cutoff, archived_before_ns=LATER)
        kept = [p["msg_id"] for p in archive.query("device_status")]
        assert kept == kept_by_the_rule(story, cutoff)
        assert done.statuses == len(story) - len(kept) and len(kept) < 50  # of 180
        changes = [state_of(m) for i, m in enumerate(story) if i == 0 or state_of(m) != state_of(story[i - 1])]
        kept_states = [state_of(Message("device_status", "", p)) for p in archive.query("device_status")]
        assert [s for i, s in enumerate(kept_states) if i == 0 or s != kept_states[i - 1]] == changes
        assert retain(archive, cutoff, archived_before_ns=LATER).statuses == 0
        # A later pass: the run in progress at the old cutoff keeps only its first and last status.
        left = [m for m in story if m.msg_id in set(kept)]
        later = retain(archive, NOV_1 + 180 * MINUTE_NS, archived_before_ns=LATER)
        assert [p["msg_id"] for p in archive.query("device_status")] == kept_by_the_rule(left, NOV_1 + 180 * MINUTE_NS)
        assert later.statuses == len(left) - archive.count("device_status") > 0


def _expected_rows(messages: list[Message]) -> dict[tuple[str, int], int]:
    counts: dict[tuple[str, int], int] = defaultdict(int)
    for m in messages:
        counts[(m.payload["device"], m.payload["time_ns"] // MINUTE_NS * MINUTE_NS)] += 1
    return counts


def assert_each_minute_raw_or_summarised(archive: HistoryArchive, messages: list[Message]) -> set[tuple[str, int]]:
    """Each minute's readings are all still raw with no summary, or all summarised with none raw; the summarised minutes."""
    raw: dict[tuple[str, int], int] = defaultdict(int)
    for device, minute, count in archive.select(
        f"SELECT device, time_ns / {MINUTE_NS} * {MINUTE_NS}, COUNT(*) FROM message WHERE kind = 'reading' GROUP BY 1, 2"
    ):
        raw[(device, minute)] = count
    summary: dict[tuple[str, int], int] = defaultdict(int)
    for device, minute, count in archive.select(
        "SELECT device, minute_ns, SUM(n + suspect) FROM reading_summary GROUP BY 1, 2"
    ):
        summary[(device, minute)] = count
    for key, count in _expected_rows(messages).items():
        assert (raw.get(key, 0), summary.get(key, 0)) in ((count, 0), (0, count)), key
    return set(summary)


_RETAIN_SLOWLY = """
import sys, time
from hotlab.controller.archive import HistoryArchive
from hotlab.controller.archive_retention import retain

archive = HistoryArchive(sys.argv[1])
write = archive.write
def slowly(work):  # a pause after each committed chunk, so the kill lands between or inside chunks
    result = write(work)
    time.sleep(0.02)
    return result
archive.write = slowly
retain(archive, int(sys.argv[2]), archived_before_ns=2**62, chunk_ns=10 * 60 * 10**9)
"""


def test_kill_9_mid_pass_leaves_each_minute_raw_or_summarised_and_the_next_pass_finishes(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    messages = readings_of(["cal-1", "cal-2"], NOV_1, NOV_1 + 4 * HOUR_NS, step_s=13)
    cutoff = NOV_1 + 4 * HOUR_NS
    with HistoryArchive(path) as archive:
        archive.add_many(messages)
    proc = subprocess.Popen([sys.executable, "-c", _RETAIN_SLOWLY, str(path), str(cutoff)], cwd=ROOT)
    watcher = HistoryArchive(path, read_only=True)
    try:
        asyncio.run(
            until(lambda: watcher.select("SELECT COUNT(*) FROM reading_summary")[0][0] > 30 or proc.poll() is not None)
        )
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        watcher.close()
    assert proc.returncode == -signal.SIGKILL
    with HistoryArchive(path) as archive:
        summarised_minutes = assert_each_minute_raw_or_summarised(archive, messages)
        assert 0 < len(summarised_minutes) < len(_expected_rows(messages))  # killed mid-way
        retain(archive, cutoff, archived_before_ns=LATER)
        assert archive.count("reading") == 0
        assert_same_summaries(summarised(archive, ["cal-1", "cal-2"]), expected_summaries(messages, cutoff))


def test_a_chunk_that_fails_half_way_changes_nothing_and_the_pass_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages = readings_of(["cal-1"], NOV_1, NOV_1 + 5 * HOUR_NS, step_s=9)
    cutoff = NOV_1 + 5 * HOUR_NS
    calls = 0
    thin = archive_retention._repeated_statuses

    def failing_third(*args: Any) -> list[str]:  # after the chunk's summary and delete, before its commit
        nonlocal calls
        calls += 1
        if calls == 3:
            raise sqlite3.OperationalError("disk I/O error")
        return thin(*args)

    with HistoryArchive(tmp_path / "history.sqlite3") as archive:
        archive.add_many(messages)
        monkeypatch.setattr(archive_retention, "_repeated_statuses", failing_third)
        with pytest.raises(sqlite3.OperationalError):
            retain(archive, cutoff, archived_before_ns=LATER)
        done = assert_each_minute_raw_or_summarised(archive, messages)
        assert {minute for _, minute in done} == set(range(NOV_1, NOV_1 + 2 * HOUR_NS, MINUTE_NS))
        monkeypatch.undo()
        assert retain(archive, cutoff, archived_before_ns=LATER).chunks == 3
        assert_same_summaries(summarised(archive, ["cal-1"]), expected_summaries(messages, cutoff))


def test_a_stopped_pass_says_so_and_keeps_what_it_did(tmp_path: Path) -> None:
    messages = readings_of(["cal-1"], NOV_1, NOV_1 + 3 * HOUR_NS, step_s=30)
    stop = threading.Event()
    with HistoryArchive(tmp_path / "history.sqlite3") as archive:
        archive.add_many(messages)
        stop.set()
        stopped = retain(archive, NOV_1 + 3 * HOUR_NS, archived_before_ns=LATER, stop=stop)
        assert (stopped.complete, stopped.chunks, archive.count("reading")) == (False, 0, len(messages))


def _old_archive(path: Path, messages: list[Message]) -> None:
    """An archive as the previous version wrote it: no summary tables, auto_vacuum off."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(
        """
        CREATE TABLE message (msg_id TEXT PRIMARY KEY, kind TEXT NOT NULL, topic TEXT NOT NULL,
            time_ns INTEGER NOT NULL, site TEXT, station TEXT, device TEXT, test TEXT, verdict TEXT,
            payload TEXT NOT NULL, archived_ns INTEGER NOT NULL, quality TEXT) WITHOUT ROWID;
        CREATE INDEX message_kind_time ON message (kind, time_ns);
        CREATE INDEX message_device_time ON message (device, kind, time_ns);
        CREATE TABLE rejected (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, topic TEXT NOT NULL,
            payload TEXT NOT NULL, reason TEXT NOT NULL, archived_ns INTEGER NOT NULL);
        """
    )
    db.executemany(
        "INSERT INTO message VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?, 1, ?)",
        [
            (
                m.msg_id,
                m.kind,
                m.topic,
                m.payload["time_ns"],
                SITE,
                STATION,
                m.payload["device"],
                json.dumps(m.payload),
                m.payload["quality"],
            )
            for m in messages
        ],  # fmt: skip
    )
    db.close()


def test_an_archive_from_before_retention_opens_is_read_and_is_retained(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    messages = readings_of(["cal-1"], NOV_1, NOV_1 + 2 * HOUR_NS, step_s=3)
    _old_archive(path, messages)
    with HistoryArchive(path, read_only=True) as copy:
        assert list(copy.summaries("cal-1")) == []  # no summary table yet: nothing summarised
    with HistoryArchive(path) as archive:
        done = retain(archive, NOV_1 + 2 * HOUR_NS, archived_before_ns=LATER)
        assert_same_summaries(summarised(archive, ["cal-1"]), expected_summaries(messages, NOV_1 + 2 * HOUR_NS))
        assert archive.select("SELECT auto_vacuum FROM pragma_auto_vacuum") == [(0,)]
        # It cannot give pages back, but it fills them again before it grows.
        assert done.freed_bytes == 0
        pages = "SELECT (SELECT page_count FROM pragma_page_count), (SELECT freelist_count FROM pragma_freelist_count)"
        [(total, free)] = archive.select(pages)
        archive.add_many(readings_of(["cal-1"], NOV_1 + 2 * HOUR_NS, NOV_1 + 3 * HOUR_NS, step_s=6))
        [(total_after, free_after)] = archive.select(pages)
        assert total_after == total and 0 < free_after < free


def test_a_new_archive_gives_the_freed_pages_back(tmp_path: Path) -> None:
    with HistoryArchive(tmp_path / "history.sqlite3") as archive:
        archive.add_many(readings_of(["cal-1"], NOV_1, NOV_1 + 2 * HOUR_NS, step_s=2))
        before = archive.size_bytes()
        done = retain(archive, NOV_1 + 2 * HOUR_NS, archived_before_ns=LATER)
        assert archive.select("SELECT auto_vacuum FROM pragma_auto_vacuum") == [(2,)]  # incremental
        assert done.freed_bytes > 0 and archive.size_bytes() == done.archive_bytes
        assert archive.select("SELECT freelist_count FROM pragma_freelist_count") == [(0,)]
        assert archive.size_bytes() < before / 10


def test_summaries_stream_in_chunks_and_filter_by_period_and_site(tmp_path: Path) -> None:
    messages = readings_of(["cal-1"], NOV_1, NOV_1 + HOUR_NS, step_s=20)
    with HistoryArchive(tmp_path / "history.sqlite3") as archive:
        archive.add_many(messages)
        retain(archive, NOV_1 + HOUR_NS, archived_before_ns=LATER)
        whole = list(archive.summaries("cal-1"))
        assert [s.minute_ns for s in whole] == sorted(s.minute_ns for s in whole) and len(whole) >= 60
        assert list(archive.summaries("cal-1", chunk_size=7)) == whole
        part = TimeRange(NOV_1 + 10 * MINUTE_NS, NOV_1 + 20 * MINUTE_NS)
        assert list(archive.summaries("cal-1", part, chunk_size=3)) == [
            s for s in whole if 10 <= (s.minute_ns - NOV_1) // MINUTE_NS < 20
        ]
        assert list(archive.summaries("cal-1", site="elsewhere")) == []
        assert list(archive.summaries("cal-2")) == []
        assert isinstance(whole[0], ReadingSummary) and whole[0].site == SITE


async def test_the_sink_retains_in_the_background_keeps_archiving_and_records_each_pass(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hour = raw_cutoff_ns(time.time_ns(), 1.0) // HOUR_NS * HOUR_NS  # the last whole hour past the raw window
    old = readings_of(["cal-1", "cal-2", "cal-3"], hour - 24 * HOUR_NS, hour, step_s=30)
    with HistoryArchive(tmp_path / "history.sqlite3") as seeding:
        seeding.add_many(old)
    outbox = AsyncOutbox(Outbox(tmp_path / "outbox.sqlite3", ("mqtt", "history")))
    archive = HistoryArchive(tmp_path / "history.sqlite3")
    stop = asyncio.Event()
    with caplog.at_level(logging.INFO, logger="hotlab.controller.sinks.history"):
        sink = asyncio.create_task(
            run_history_sink(
                outbox,
                archive,
                stop,
                idle_poll_s=0.005,
                retention=RetentionConfig(raw_days=1.0, interval_s=3600),
                site=SITE,
            )
        )
        fresh: list[Message] = []

        def recorded() -> bool:
            return archive.count("archive_retention") > 0

        while not recorded():  # the lab goes on meanwhile: new readings every few milliseconds
            fresh.append(reading("cal-1", time.time_ns(), 1e6))
            await outbox.put(fresh[-1])
            await asyncio.sleep(0.003)
        await until(lambda: outbox.sync.pending_count("history") == 0)
        stop.set()
        await asyncio.wait_for(sink, 30)
    [record] = archive.query("archive_retention")
    assert record["readings"] == len(old) and record["chunks"] == 3 * 24 and record["complete"]
    assert record["site"] == SITE and record["raw_days"] == 1.0
    # Each batch the sink archived is one transaction with one archived_ns: several while the pass ran.
    [(transactions,)] = archive.select(
        "SELECT COUNT(DISTINCT archived_ns) FROM message WHERE archived_ns > ? AND archived_ns < ?",
        (record["started_ns"], record["time_ns"]),
    )
    assert transactions >= 3, "the sink could hardly archive while the pass ran: the lock was held throughout"
    assert archive.count("reading") == len(fresh)  # none of the fresh readings summarised
    assert await outbox.pending_count("mqtt") == len(fresh) + 1  # the record is published like any other
    [line] = [r.getMessage() for r in caplog.records if "retention" in r.getMessage()]
    assert f"{len(old)} raw reading(s) summarised" in line
    archive.close()
    await outbox.close()


async def test_the_sink_passes_again_each_interval_and_records_only_passes_that_changed_something(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = AsyncOutbox(Outbox(tmp_path / "outbox.sqlite3", ("history",)))
    archive = HistoryArchive(tmp_path / "history.sqlite3")
    stop = asyncio.Event()
    retention = RetentionConfig(raw_days=1.0, interval_s=1.0)
    with caplog.at_level(logging.INFO, logger="hotlab.controller.sinks.history"):
        sink = asyncio.create_task(
            run_history_sink(outbox, archive, stop, idle_poll_s=0.01, retention=retention, site=SITE)
        )
        await until(lambda: any("retention" in r.getMessage() for r in caplog.records))
        assert archive.count("archive_retention") == 0  # an empty archive: nothing done, nothing recorded
        old = reading("cal-1", time.time_ns() - 2 * 86_400 * S, 1e6)
        await outbox.put(old)
        await until(lambda: archive.count("archive_retention") == 1, timeout_s=10)
        stop.set()
        await asyncio.wait_for(sink, 30)
    assert archive.count("reading") == 0 and len(list(archive.summaries("cal-1"))) == 1
    with pytest.raises(ValueError, match="site"):
        await run_history_sink(outbox, archive, stop, retention=retention)
    archive.close()
    await outbox.close()


def test_the_record_schema_refuses_what_a_pass_cannot_have_done() -> None:
    validator = validator_for("archive_retention")
    assert validator is not None
    record = every_other_kind(NOV_1)[-2].payload
    validator.validate(record)
    for wrong in ({"readings": -1}, {"complete": "yes"}, {"raw_days": 0}, {"surprise": 1}):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(record | wrong)
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({k: v for k, v in record.items() if k != "cutoff_ns"})


def test_a_fast_polled_device_is_retained_in_chunks_of_bounded_size(tmp_path: Path) -> None:
    """At 2 Hz half an hour holds 3600 readings: one chunk holds CHUNK_READINGS of them at most, not the hour."""
    half_hour = NOV_1 + 30 * MINUTE_NS
    messages = readings_of(["cal-1"], NOV_1, half_hour, step_s=1) + readings_of(
        ["cal-1"], NOV_1 + S // 2, half_hour, step_s=1, seed=3
    )
    with HistoryArchive(tmp_path / "history.sqlite3") as archive:
        archive.add_many(messages)
        done = retain(archive, half_hour, archived_before_ns=LATER)
        assert done.chunks == -(-len(messages) // archive_retention.CHUNK_READINGS) == 2
        assert_same_summaries(summarised(archive, ["cal-1"]), expected_summaries(messages, half_hour))
