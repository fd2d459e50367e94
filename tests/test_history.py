"""History archive and sink: idempotent, nothing lost across restarts (including kill -9), queryable."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hotlab.backoff import Backoff
from hotlab.controller.archive import HistoryArchive, HistoryQueryError, TimeRange
from hotlab.controller.messages import Message, device_status_message, elution_message, reading_message
from hotlab.controller.outbox import AsyncOutbox, Outbox
from hotlab.controller.qc.limits import DEFAULT_LIMITS
from hotlab.controller.qc.result import QcResult
from hotlab.controller.sinks.history import run_history_sink
from hotlab.drivers.records import ElutionRecord, Reading
from tests.schema_check import malformed_on_purpose

ROOT = Path(__file__).resolve().parents[1]
DAY_NS = 86_400_000_000_000
NOV_1 = 1_793_491_200_000_000_000  # 2026-11-01T00:00:00Z
SINKS = ("mqtt", "history")


def sample_messages(n: int, start_ns: int = NOV_1) -> list[Message]:
    """A mix of every kind, one every ~10 minutes from `start_ns`."""
    out: list[Message] = []
    for i in range(n):
        t = start_ns + i * 600_000_000_000
        match i % 4:
            case 0:
                out.append(
                    reading_message(
                        "hotlab-a",
                        "hot-cell-1",
                        Reading("crc-1", "Tc-99m", 7.4e8 + i, 20.0, "mCi", t, b"A 20.00 mCi\r"),
                    )
                )
            case 1:
                out.append(
                    elution_message(
                        "hotlab-a",
                        ElutionRecord(
                            "hot-cell-1", "gen-GE-1", "Ge-68", "Ga-68", i, 1.1e9, 5.0, t - 120_000_000_000, t
                        ),
                        yield_pct=71.0,
                    )
                )
            case 2:
                out.append(
                    QcResult(
                        test="constancy",
                        verdict="warn" if i % 8 == 6 else "pass",
                        measured=7.1e6,
                        expected=7.0e6,
                        deviation_pct=1.43,
                        unit="Bq",
                        limit=DEFAULT_LIMITS["constancy"],
                        value_judged=1.43,
                        time_ns=t,
                        inputs={"source": "CS-137-A"},
                    ).to_message("hotlab-a", "hot-cell-1", "crc-1")
                )
            case 3:
                out.append(
                    device_status_message(
                        "hotlab-a", "hot-cell-1", "crc-1", up=True, latency_ms=12.0, errors=0, time_ns=t
                    )
                )
    return out


async def until(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll a condition that has no event to await (the outbox has no notifications)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def test_add_many_is_idempotent_on_msg_id(tmp_path: Path) -> None:
    messages = sample_messages(20)
    with HistoryArchive(tmp_path / "history.sqlite") as archive:
        assert archive.add_many(messages) == 20
        assert archive.add_many(messages[5:15]) == 0
        later = sample_messages(4, start_ns=NOV_1 + 20 * 600_000_000_000)  # new records, after the first 20
        assert archive.add_many(messages + later) == 4
        assert archive.count() == 24
    with HistoryArchive(tmp_path / "history.sqlite") as reopened:
        assert reopened.count() == 24
        mode = reopened._db.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"


def test_queries_filter_by_kind_time_and_indexed_columns(tmp_path: Path) -> None:
    messages = sample_messages(40)
    other = QcResult(
        test="linearity",
        verdict="fail",
        measured=1.0,
        expected=1.1,
        deviation_pct=-9.1,
        unit="Bq",
        limit=DEFAULT_LIMITS["linearity"],
        value_judged=-9.1,
        time_ns=NOV_1 + DAY_NS,
    ).to_message("hotlab-b", "lab-2", "crc-9")
    with HistoryArchive(tmp_path / "history.sqlite") as archive:
        archive.add_many(messages + [other])
        first_three_hours = TimeRange(NOV_1, NOV_1 + 3 * 3_600_000_000_000)
        readings = archive.query("reading", first_three_hours)
        assert [r["time_ns"] for r in readings] == [
            m.payload["time_ns"]
            for m in messages
            if m.kind == "reading" and m.payload["time_ns"] < first_three_hours.end_ns
        ]
        assert all(r["device"] == "crc-1" for r in readings)
        assert len(archive.query("qc_result", test="constancy")) == 10
        assert len(archive.query("qc_result", test="constancy", verdict="warn")) == 5
        assert archive.query("qc_result", site="hotlab-b")[0]["msg_id"] == other.msg_id
        assert len(archive.query("elution", device="gen-GE-1")) == 10  # elutions index the generator as device
        assert len(archive.query("reading", limit=3)) == 3
        assert archive.distinct("device", "qc_result") == ["crc-1", "crc-9"]
        assert archive.distinct("test", "qc_result") == ["constancy", "linearity"]
        with pytest.raises(HistoryQueryError):
            archive.distinct("payload", "qc_result")
        with pytest.raises(HistoryQueryError):
            archive.query("reading", limit=0)


def test_time_range_parsing() -> None:
    november = TimeRange.from_text("2026-11-01", "2026-11-30")
    assert november.start_ns == NOV_1
    assert november.end_ns == NOV_1 + 30 * DAY_NS  # the --to day is included whole
    assert TimeRange.from_text("2026-11-01T06:30:00Z", None).start_ns == NOV_1 + 6.5 * 3_600_000_000_000
    assert TimeRange.from_text(None, None).start_ns == 0
    with pytest.raises(HistoryQueryError, match="cannot read the start"):
        TimeRange.from_text("first of november", "2026-11-30")
    with pytest.raises(HistoryQueryError, match="before"):
        TimeRange.from_text("2026-11-30", "2026-11-01")


def test_time_range_reads_times_like_every_other_hotlab_input() -> None:
    """Same rules as hotlab.physics.utc_time.parse_utc_ns: offsets honoured, ns kept, naive refused."""
    assert TimeRange.from_text("2026-11-01T01:00:00+01:00", None).start_ns == NOV_1
    assert TimeRange.from_text(None, "2026-11-01T00:00:00.000000001Z").end_ns == NOV_1 + 1  # a date-time end is exact
    with pytest.raises(HistoryQueryError, match="no timezone"):  # was silently taken as UTC
        TimeRange.from_text("2026-11-01T06:30:00", None)
    with pytest.raises(HistoryQueryError, match="cannot read the end"):
        TimeRange.from_text(None, "2026-11-31")


async def test_sink_archives_everything_then_acks(tmp_path: Path) -> None:
    outbox = AsyncOutbox(Outbox(tmp_path / "outbox.sqlite", SINKS))
    archive = HistoryArchive(tmp_path / "history.sqlite")
    messages = sample_messages(120)
    await outbox.put_many(messages)
    stop = asyncio.Event()
    task = asyncio.create_task(run_history_sink(outbox, archive, stop, batch_size=25, idle_poll_s=0.05))
    await until(lambda: outbox.sync.pending_count("history") == 0)
    late = sample_messages(5, start_ns=NOV_1 + DAY_NS)
    await outbox.put_many(late)  # arrives while the sink idles
    await until(lambda: archive.count() == 125)
    stop.set()
    assert await asyncio.wait_for(task, 30) == 125
    assert await outbox.pending_count("mqtt") == 125  # the other sink's deliveries are untouched
    stored = {
        p["msg_id"]: p for kind in ("reading", "elution", "qc_result", "device_status") for p in archive.query(kind)
    }
    assert stored == {m.msg_id: m.payload for m in messages + late}
    archive.close()
    await outbox.close()


async def test_replayed_batch_after_crash_before_ack_is_not_duplicated(tmp_path: Path) -> None:
    messages = sample_messages(30)
    outbox = Outbox(tmp_path / "outbox.sqlite", SINKS)
    outbox.put_many(messages)
    archive = HistoryArchive(tmp_path / "history.sqlite")
    # The first run archived a batch and died before acknowledging it.
    archive.add_many([s.message for s in outbox.pending("history", 10)])
    archive.close()
    outbox.close()

    outbox2 = AsyncOutbox(Outbox(tmp_path / "outbox.sqlite", SINKS))
    archive2 = HistoryArchive(tmp_path / "history.sqlite")
    stop = asyncio.Event()
    task = asyncio.create_task(run_history_sink(outbox2, archive2, stop, idle_poll_s=0.05))
    await until(lambda: outbox2.sync.pending_count("history") == 0)
    stop.set()
    assert await asyncio.wait_for(task, 30) == 20
    assert archive2.count() == 30
    archive2.close()
    await outbox2.close()


_SINK_SCRIPT = """
import asyncio, sys
from hotlab.controller.archive import HistoryArchive
from hotlab.controller.sinks.history import run_history_sink
from hotlab.controller.outbox import AsyncOutbox, Outbox

async def main():
    outbox = AsyncOutbox(Outbox(sys.argv[1], ("mqtt", "history")))
    await run_history_sink(outbox, HistoryArchive(sys.argv[2]), asyncio.Event(), batch_size=7, idle_poll_s=0.05)

asyncio.run(main())
"""


async def test_kill_9_mid_stream_loses_nothing(tmp_path: Path) -> None:
    outbox_path, archive_path = tmp_path / "outbox.sqlite", tmp_path / "history.sqlite"
    messages = sample_messages(400)
    with_outbox = Outbox(outbox_path, SINKS)
    with_outbox.put_many(messages)
    with_outbox.close()
    HistoryArchive(archive_path).close()

    proc = subprocess.Popen([sys.executable, "-c", _SINK_SCRIPT, str(outbox_path), str(archive_path)], cwd=ROOT)
    watcher = HistoryArchive(archive_path)
    try:
        await until(lambda: watcher.count() > 0 or proc.poll() is not None)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert watcher.count() > 0

    outbox = AsyncOutbox(Outbox(outbox_path, SINKS))
    stop = asyncio.Event()
    task = asyncio.create_task(run_history_sink(outbox, watcher, stop, idle_poll_s=0.05))
    await until(lambda: outbox.sync.pending_count("history") == 0)
    stop.set()
    await asyncio.wait_for(task, 30)
    ids = [row[0] for row in watcher._db.execute("SELECT msg_id FROM message")]
    assert sorted(ids) == sorted(m.msg_id for m in messages)
    watcher.close()
    await outbox.close()


async def test_unindexable_message_is_kept_aside_and_acked(tmp_path: Path) -> None:
    outbox = AsyncOutbox(Outbox(tmp_path / "outbox.sqlite", SINKS))
    archive = HistoryArchive(tmp_path / "history.sqlite")
    broken = malformed_on_purpose(Message("reading", "hotlab/x/y/z/reading", {"msg_id": "abc", "time_ns": "yesterday"}))
    await outbox.put_many([broken, *sample_messages(3)])
    stop = asyncio.Event()
    task = asyncio.create_task(run_history_sink(outbox, archive, stop, idle_poll_s=0.05))
    await until(lambda: outbox.sync.pending_count("history") == 0)
    stop.set()
    await asyncio.wait_for(task, 30)
    assert archive.count() == 3
    [(payload, reason)] = archive.rejected()
    assert '"yesterday"' in payload and "time_ns" in reason
    archive.close()
    await outbox.close()


async def test_sink_retries_while_the_archive_is_locked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outbox = AsyncOutbox(Outbox(tmp_path / "outbox.sqlite", SINKS))
    archive = HistoryArchive(tmp_path / "history.sqlite", busy_timeout_s=0.05)
    await outbox.put_many(sample_messages(10))
    blocker = sqlite3.connect(tmp_path / "history.sqlite", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    stop = asyncio.Event()
    with caplog.at_level(logging.ERROR, logger="hotlab.controller.sinks.history"):
        task = asyncio.create_task(run_history_sink(outbox, archive, stop, idle_poll_s=0.05, retry=Backoff(0.05, 0.05)))
        await until(lambda: any("retrying" in r.message for r in caplog.records))
        assert await outbox.pending_count("history") == 10  # nothing acked while nothing is archived
        blocker.execute("ROLLBACK")
        blocker.close()
        await until(lambda: outbox.sync.pending_count("history") == 0)
    stop.set()
    assert await asyncio.wait_for(task, 30) == 10
    assert not task.cancelled()
    archive.close()
    await outbox.close()


def test_read_only_archive_answers_queries_and_never_writes(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    with HistoryArchive(path) as archive:
        archive.add_many(sample_messages(8))
    with pytest.raises(FileNotFoundError, match="no history archive"):
        HistoryArchive(tmp_path / "missing.sqlite", read_only=True)
    assert not (tmp_path / "missing.sqlite").exists()
    with HistoryArchive(path, read_only=True) as copy:
        assert len(copy.query("qc_result", test="constancy")) == 2
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            copy.add_many(sample_messages(1))
        assert copy.count() == 8


def _suspect(time_ns: int) -> Message:
    reading = Reading(
        "crc-1", "Tc-99m", 7.4e19, 7.4e19, "Bq", time_ns, b">7.4000E+19", quality="suspect", quality_reason="range"
    )
    return reading_message("hotlab-a", "hot-cell-1", reading)


def test_readings_are_indexed_by_quality_and_any_message_is_found_by_msg_id(tmp_path: Path) -> None:
    messages = [*sample_messages(8), _suspect(NOV_1 + 1), _suspect(NOV_1 + 2)]
    with HistoryArchive(tmp_path / "history.sqlite") as archive:
        archive.add_many(messages)
        suspect = archive.query("reading", quality="suspect")
        assert [r["msg_id"] for r in suspect] == [messages[8].msg_id, messages[9].msg_id]
        assert len(archive.query("reading", quality="good")) == 2
        assert archive.distinct("quality", "reading") == ["good", "suspect"]
        assert archive.get(messages[1].msg_id) == messages[1].payload
        assert archive.get("0" * 32) is None


def test_an_archive_from_before_reading_quality_gets_the_column_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE message (msg_id TEXT PRIMARY KEY, kind TEXT NOT NULL, topic TEXT NOT NULL,
            time_ns INTEGER NOT NULL, site TEXT, station TEXT, device TEXT, test TEXT, verdict TEXT,
            payload TEXT NOT NULL, archived_ns INTEGER NOT NULL) WITHOUT ROWID;
        INSERT INTO message VALUES ('old-1', 'reading', 't', 1, 's', 'st', 'd', NULL, NULL,
            '{"msg_id": "old-1", "time_ns": 1, "activity_bq": 1.0}', 2);
        """
    )
    old.close()
    # The old row, read back below, is not a whole reading payload.
    malformed_on_purpose(Message("reading", "t", {"msg_id": "old-1", "time_ns": 1, "activity_bq": 1.0}))
    with HistoryArchive(path) as archive:
        archive.add_many([_suspect(NOV_1)])
        assert [r["msg_id"] for r in archive.query("reading")] == ["old-1", _suspect_id(archive)]
        assert len(archive.query("reading", quality="suspect")) == 1  # the old row was never checked: NULL


def _suspect_id(archive: HistoryArchive) -> str:
    return str(archive.query("reading", quality="suspect")[0]["msg_id"])
