"""Reads answered from memory (controller/recent_commits.py): the same answers as the database, or none.

Memory is only a shortcut for a sink that is caught up: every message is in the outbox first,
and a read that memory cannot answer exactly (a gap, a backlog, a commit made elsewhere) must
go to the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from hotlab.controller.archive import HistoryArchive
from hotlab.controller.messages import Message, device_status_message, elution_message, reading_message
from hotlab.controller.outbox import AsyncOutbox, Outbox, StoredMessage, StoredPayload
from hotlab.controller.qc.limits import DEFAULT_LIMITS
from hotlab.controller.qc.result import QcResult
from hotlab.controller.recent_commits import RecentCommits
from hotlab.controller.sinks.history import run_history_sink
from hotlab.controller.sinks.influx_points import message_to_line
from hotlab.drivers.records import ElutionRecord, Reading

SINKS = ("mqtt", "influx", "history")


class CountingOutbox(Outbox):
    """The real outbox, counting reads that reach the database."""

    database_reads = 0

    def pending(self, sink: str, limit: int = 500, after_seq: int = 0) -> list[StoredMessage]:
        self.database_reads += 1
        return super().pending(sink, limit, after_seq)

    def pending_json(self, sink: str, limit: int = 500, after_seq: int = 0) -> list[StoredPayload]:
        self.database_reads += 1
        return super().pending_json(sink, limit, after_seq)


@contextlib.asynccontextmanager
async def counted_outbox(path: Path) -> AsyncIterator[tuple[CountingOutbox, AsyncOutbox]]:
    """The database (counting its reads) and the AsyncOutbox over it, closed afterwards."""
    database = CountingOutbox(path, sinks=SINKS)
    outbox = AsyncOutbox(database)
    try:
        yield database, outbox
    finally:
        await outbox.close()


def reading(n: int) -> Message:
    return reading_message(
        "site",
        "hotcell-1",
        Reading("cal-1", "Ga-68", n * 1e6, n * 1e6, "Bq", 1_700_000_000 + n, extra={"calibration_factor": 193.0}),
    )


def every_kind() -> list[Message]:
    """One message from each builder, with the values the QC engine puts in `inputs` (floats, tuples, nesting)."""
    elution = ElutionRecord(
        station="hotcell-1",
        generator_id="GEN-7",
        parent_nuclide="Ge-68",
        daughter_nuclide="Ga-68",
        counter=12,
        activity_bq=1.1e9,
        volume_ml=5.0,
        start_ns=1_700_000_000_000_000_000,
        end_ns=1_700_000_060_000_000_000,
        parent_bq=11.0,
    )
    return [
        reading(1),
        elution_message("site", elution, yield_pct=71.5),
        QcResult(
            test="accuracy",
            verdict="warn",
            measured=1.04e9,
            expected=1e9,
            deviation_pct=4.0,
            unit="Bq",
            limit=DEFAULT_LIMITS["accuracy"],
            value_judged=4.0,
            time_ns=1_700_000_000_000_000_123,
            inputs={"half_life_s": 4062.6, "window": (1, 2), "nested": {"ok": True, "none": None}},
        ).to_message("site", "hotcell-1", "cal-1"),
        device_status_message(
            "site",
            "hotcell-1",
            "cal-1",
            up=True,
            latency_ms=3.5,
            errors=0,
            detail="",
            time_ns=1_700_000_000_000_000_456,
        ),
    ]


async def test_a_caught_up_read_gets_the_committed_messages_without_a_database_read(tmp_path: Path) -> None:
    async with counted_outbox(tmp_path / "o.sqlite3") as (database, outbox):
        first = [reading(n) for n in range(5)]
        seqs = await outbox.put_many(first)
        got = await outbox.pending("influx", limit=100, after_seq=seqs[0] - 1)
        assert [s.seq for s in got] == seqs
        assert all(s.message is m for s, m in zip(got, first))  # the committed objects: no JSON parsed
        second = [reading(n) for n in range(5, 8)]
        more = await outbox.put_many(second)
        assert [s.seq for s in await outbox.pending("influx", limit=2, after_seq=seqs[-1])] == more[:2]
        assert [s.seq for s in await outbox.pending_json("mqtt", limit=100, after_seq=seqs[-1])] == more
        assert database.database_reads == 0 and outbox.reads_from_memory == 3


async def test_memory_answers_exactly_as_the_database_would(tmp_path: Path) -> None:
    async with counted_outbox(tmp_path / "o.sqlite3") as (database, outbox):
        messages = every_kind()
        seqs = await outbox.put_many(messages)
        from_memory = await outbox.pending("influx", limit=100, after_seq=seqs[0] - 1)
        json_from_memory = await outbox.pending_json("mqtt", limit=100, after_seq=seqs[0] - 1)
        assert outbox.reads_from_memory == 2
        assert json_from_memory == database.pending_json("mqtt", limit=100)
        from_database = database.pending("influx", limit=100)
        for memory, stored in zip(from_memory, from_database, strict=True):
            assert (memory.seq, memory.message.kind, memory.message.topic) == (
                stored.seq,
                stored.message.kind,
                stored.message.topic,
            )
            # What the bulk sinks make of it: the InfluxDB line and the archived JSON.
            assert message_to_line(memory.message) == message_to_line(stored.message)
            assert json.dumps(memory.message.payload) == json.dumps(stored.message.payload)


async def test_a_commit_made_elsewhere_sends_the_reader_to_the_database(tmp_path: Path) -> None:
    async with counted_outbox(tmp_path / "o.sqlite3") as (database, outbox):
        first = await outbox.put_many([reading(n) for n in range(3)])
        behind_its_back = await asyncio.to_thread(database.put_many, [reading(n) for n in range(3, 5)])
        after = await outbox.put_many([reading(n) for n in range(5, 9)])
        got = await outbox.pending("history", limit=100, after_seq=first[-1])
        assert [s.seq for s in got] == behind_its_back + after  # the gap is filled, nothing skipped
        # Memory holds what comes before the gap, but answering with only that would make a
        # reader that got less than its limit believe it had everything.
        got = await outbox.pending_json("mqtt", limit=100, after_seq=first[0] - 1)
        assert [s.seq for s in got] == first + behind_its_back + after
        assert database.database_reads == 2 and outbox.reads_from_memory == 0


def test_memory_stops_at_a_gap_and_at_the_limit() -> None:
    @dataclass
    class Item:
        seq: int

    recent: RecentCommits[Item] = RecentCommits(limit=10)
    recent.add([Item(s) for s in (4, 5, 6, 9, 10)])
    assert recent.take(2, 100) is None  # 3 is missing: only the database has it
    assert [i.seq for i in recent.take(3, 2) or []] == [4, 5]  # the limit comes before the gap
    assert recent.take(5, 100) is None  # 7 and 8 are missing: the database answers 6, 7, 8, 9, 10 at once
    assert recent.take(6, 100) is None
    assert [i.seq for i in recent.take(8, 100) or []] == [9, 10]
    recent.add([Item(s) for s in range(11, 22)])  # more than the limit: a sink this far behind reads the database
    recent.add([Item(22)])
    assert len(recent) == 0  # and memory stays empty while that sink is not reading
    assert recent.take(10, 100) is None
    recent.add([Item(23)])  # it reads again: memory fills again
    assert len(recent) == 1


async def test_the_history_sink_archives_a_live_stream_from_memory(tmp_path: Path) -> None:
    database = CountingOutbox(tmp_path / "o.sqlite3", sinks=("history",))
    outbox = AsyncOutbox(database)
    archive = HistoryArchive(tmp_path / "history.sqlite3")
    stop = asyncio.Event()
    sink = asyncio.create_task(run_history_sink(outbox, archive, stop, batch_size=50, idle_poll_s=0.01))
    try:
        sent: list[Message] = []
        for start in range(0, 400, 20):
            batch = [reading(n) for n in range(start, start + 20)]
            await outbox.put_many(batch)
            sent += batch
            await asyncio.sleep(0.002)
        await asyncio.to_thread(database.put_many, extra := [reading(n) for n in range(400, 405)])
        sent += extra
        while await outbox.pending_count("history"):
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.wait_for(sink, 10)
        await outbox.close()
    archived = [p["msg_id"] for p in archive.query("reading")]
    archive.close()
    assert sorted(archived) == sorted(m.msg_id for m in sent) and len(archived) == 405
    assert outbox.reads_from_memory >= 8  # most of the 20 commits came from memory
