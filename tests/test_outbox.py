"""The durable outbox: per-sink delivery, order, bounds, and survival of a kill -9."""

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path

import pytest

from hotlab.controller.messages import Message, reading_message
from hotlab.controller.outbox import AsyncOutbox, GroupCommit, Outbox, OutboxFull, StoredPayload
from hotlab.drivers.records import Reading


def make_message(n: int) -> Message:
    return reading_message("site", "station", Reading("cal", "Cs-137", float(n), float(n), "Bq", n))


def test_messages_come_back_in_order_per_sink(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite3", sinks=("mqtt", "influx"))
    seqs = outbox.put_many([make_message(n) for n in range(10)])
    assert seqs == sorted(seqs)
    assert [m.message.payload["activity_bq"] for m in outbox.pending("mqtt")] == [float(n) for n in range(10)]
    assert [m.seq for m in outbox.pending("influx", limit=3)] == seqs[:3]
    assert [m.seq for m in outbox.pending("mqtt", after_seq=seqs[7])] == seqs[8:]


def test_a_batch_larger_than_one_insert_statement_is_stored_whole(tmp_path: Path) -> None:
    """put_many inserts in multi-row chunks; every message must get its seq and a delivery per sink."""
    outbox = Outbox(tmp_path / "o.sqlite3", sinks=("mqtt", "influx", "history"))
    first = outbox.put_many([make_message(n) for n in range(3)])
    seqs = outbox.put_many([make_message(n) for n in range(1234)])
    assert seqs == list(range(first[-1] + 1, first[-1] + 1235))
    assert outbox.put_many([]) == []
    for sink in ("mqtt", "influx", "history"):
        pending = outbox.pending(sink, limit=5000)
        assert [m.seq for m in pending] == first + seqs
        assert [m.message.payload["activity_bq"] for m in pending[3:]] == [float(n) for n in range(1234)]
    outbox.ack("mqtt", seqs)
    outbox.ack("influx", seqs + first)
    assert outbox.usage().pending_messages == 1237  # history still needs every one
    outbox.ack("history", seqs)
    assert outbox.usage().pending_messages == 3
    assert [m.seq for m in outbox.pending("mqtt")] == first and outbox.pending("influx") == []


def test_pending_json_is_the_stored_text_of_pending(tmp_path: Path) -> None:
    """The MQTT sink forwards this text unparsed: it must be the same message, in the same order."""
    outbox = Outbox(tmp_path / "o.sqlite3", sinks=("mqtt", "influx"))
    messages = [make_message(n) for n in range(5)]
    seqs = outbox.put_many(messages)
    outbox.ack("mqtt", seqs[:1])
    raw = outbox.pending_json("mqtt", limit=3)
    assert [r.seq for r in raw] == seqs[1:4]
    assert [(r.kind, r.topic) for r in raw] == [(m.kind, m.topic) for m in messages[1:4]]
    assert [json.loads(r.payload_json) for r in raw] == [m.payload for m in messages[1:4]]
    assert raw[0].payload_json == json.dumps(messages[1].payload, separators=(",", ":"), allow_nan=False)
    assert [r.seq for r in outbox.pending_json("influx", after_seq=seqs[3])] == seqs[4:]
    with pytest.raises(ValueError, match="unknown sink"):
        outbox.pending_json("nowhere")


def test_a_message_lives_until_every_sink_acked_it(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite3", sinks=("mqtt", "influx"))
    seqs = outbox.put_many([make_message(n) for n in range(4)])
    outbox.ack("mqtt", seqs)
    assert outbox.pending("mqtt") == []
    assert outbox.usage().pending_messages == 4
    outbox.ack("influx", seqs[:2])
    assert outbox.usage().pending_messages == 2
    assert [m.seq for m in outbox.pending("influx")] == seqs[2:]
    outbox.ack("influx", seqs[2:])
    assert outbox.usage().pending_messages == 0
    assert outbox.usage().payload_bytes == 0


def test_the_bound_refuses_new_messages_instead_of_dropping_old_ones(tmp_path: Path) -> None:
    probe = Outbox(tmp_path / "probe.sqlite3", sinks=("mqtt",))
    probe.put(make_message(1))
    one = probe.usage().payload_bytes
    outbox = Outbox(tmp_path / "o.sqlite3", sinks=("mqtt",), max_bytes=int(one * 3.5))
    outbox.put_many([make_message(n) for n in range(3)])
    with pytest.raises(OutboxFull, match="refusing 1 message"):
        outbox.put(make_message(99))
    assert outbox.usage().pending_messages == 3
    assert outbox.usage().fraction == pytest.approx(3 / 3.5, rel=0.05)
    outbox.ack("mqtt", [outbox.pending("mqtt")[0].seq])
    outbox.put(make_message(99))


def test_unknown_sink_is_a_clear_error(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite3", sinks=("mqtt",))
    with pytest.raises(ValueError, match="unknown sink 'influx'; this outbox serves mqtt"):
        outbox.pending("influx")


def test_state_survives_reopening_with_the_same_sequence(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    first = Outbox(path, sinks=("mqtt",))
    seqs = first.put_many([make_message(n) for n in range(5)])
    first.ack("mqtt", seqs[:2])
    first.close()
    second = Outbox(path, sinks=("mqtt",))
    assert [m.seq for m in second.pending("mqtt")] == seqs[2:]
    assert second.put(make_message(5)) > seqs[-1]
    assert second.usage().payload_bytes > 0


async def test_async_outbox_runs_off_the_event_loop(tmp_path: Path) -> None:
    outbox = AsyncOutbox(Outbox(tmp_path / "o.sqlite3", sinks=("mqtt",)))
    loop_thread = asyncio.get_running_loop()
    seqs = await asyncio.gather(*(outbox.put(make_message(n)) for n in range(20)))
    assert sorted(seqs) == list(seqs)
    assert await outbox.pending_count("mqtt") == 20
    await outbox.ack("mqtt", seqs)
    assert (await outbox.usage()).pending_messages == 0
    assert loop_thread.is_running()
    await outbox.close()


WRITER = textwrap.dedent(
    """
    import sys
    from hotlab.controller.outbox import Outbox
    from hotlab.controller.messages import reading_message
    from hotlab.drivers.records import Reading
    outbox = Outbox(sys.argv[1], sinks=("mqtt",))
    n = 0
    while True:
        outbox.put(reading_message("s", "st", Reading("cal", "F-18", float(n), float(n), "Bq", n)))
        print(n, flush=True)
        n += 1
    """
)


def test_every_committed_message_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1]
    )
    assert writer.stdout is not None
    committed = -1
    deadline = time.monotonic() + 30
    while committed < 200 and time.monotonic() < deadline:
        committed = int(writer.stdout.readline())
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    stored = [
        row[0]
        for row in sqlite3.connect(path).execute(
            "SELECT json_extract(payload, '$.activity_bq') FROM message ORDER BY seq"
        )
    ]
    assert committed >= 200
    assert stored[: committed + 1] == [float(n) for n in range(committed + 1)]


class CountingOutbox(Outbox):
    """A real outbox that counts its write transactions and can hold them at a gate (in the outbox thread)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.transactions = 0
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def put_many_stored(self, messages: Iterable[Message]) -> list[StoredPayload]:
        self.entered.set()
        self.gate.wait(30)
        self.transactions += 1
        return super().put_many_stored(messages)


def stored_values(path: Path) -> list[float]:
    """What a fresh connection sees on disk: only committed transactions."""
    with closing(sqlite3.connect(path)) as db:
        return [row[0] for row in db.execute("SELECT json_extract(payload, '$.activity_bq') FROM message ORDER BY seq")]


async def test_group_commit_puts_concurrent_producers_into_few_transactions(tmp_path: Path) -> None:
    sync = CountingOutbox(tmp_path / "o.sqlite3", sinks=("mqtt",))
    outbox = AsyncOutbox(sync)
    group = GroupCommit(outbox.put_many, max_messages=1000)

    async def producer(p: int) -> None:
        for k in range(5):  # like a device: the next reading only after the last one is stored
            await group.submit([make_message(p * 100 + k), make_message(p * 100 + 50 + k)])

    await asyncio.gather(*(producer(p) for p in range(40)))
    await outbox.close()
    values = stored_values(tmp_path / "o.sqlite3")
    assert sorted(values) == sorted(float(p * 100 + k + d) for p in range(40) for k in range(5) for d in (0, 50))
    for p in range(40):  # each producer's messages stay together and in its order
        mine = [v for v in values if p * 100 <= v < p * 100 + 100]
        assert mine == [float(p * 100 + k + d) for k in range(5) for d in (0, 50)]
    # 200 submissions; one transaction each without grouping. Each round of 40 waits for at most one commit.
    assert sync.transactions == group.batches
    assert sync.transactions <= 20, sync.transactions


async def test_a_producer_returns_only_after_its_batch_is_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    sync = CountingOutbox(path, sinks=("mqtt",))
    outbox = AsyncOutbox(sync)
    group = GroupCommit(outbox.put_many)
    sync.gate.clear()  # the first commit is held in the outbox thread, as if fsync were slow
    first = asyncio.create_task(group.submit([make_message(1)]))
    assert await asyncio.to_thread(sync.entered.wait, 10)
    others = [asyncio.create_task(group.submit([make_message(n)])) for n in (2, 3, 4)]
    await asyncio.sleep(0.2)
    assert not first.done() and not any(task.done() for task in others)
    assert stored_values(path) == []
    sync.gate.set()
    await first
    assert 1.0 in stored_values(path)
    await asyncio.gather(*others)
    assert stored_values(path) == [1.0, 2.0, 3.0, 4.0]
    assert sync.transactions == 2  # the three that waited went in together
    await outbox.close()


async def test_outbox_full_reaches_only_the_producer_whose_messages_do_not_fit(tmp_path: Path) -> None:
    probe = Outbox(tmp_path / "probe.sqlite3", sinks=("mqtt",))
    probe.put(make_message(1))
    one = probe.usage().payload_bytes
    sync = CountingOutbox(tmp_path / "o.sqlite3", sinks=("mqtt",), max_bytes=int(one * 3.5))
    outbox = AsyncOutbox(sync)
    group = GroupCommit(outbox.put_many)
    results = await asyncio.gather(
        group.submit([make_message(1), make_message(2)]),
        group.submit([make_message(3), make_message(4)]),
        return_exceptions=True,
    )
    assert results[0] is None
    assert isinstance(results[1], OutboxFull)
    assert stored_values(tmp_path / "o.sqlite3") == [1.0, 2.0]
    assert sync.transactions == 3  # together (refused), then each alone
    await outbox.close()


GROUP_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from hotlab.controller.outbox import AsyncOutbox, GroupCommit, Outbox
    from hotlab.controller.messages import reading_message
    from hotlab.drivers.records import Reading

    async def main():
        outbox = AsyncOutbox(Outbox(sys.argv[1], sinks=("mqtt",)))
        group = GroupCommit(outbox.put_many)

        async def device(d):
            n = 0
            while True:
                value = d * 1_000_000 + n
                await group.submit([reading_message("s", "st", Reading("cal", "F-18", float(value), 1.0, "Bq", n))])
                print(value, flush=True)  # acknowledged: from now on it must survive
                n += 1

        await asyncio.gather(*(device(d) for d in range(20)))

    asyncio.run(main())
    """
)


def test_every_acknowledged_group_commit_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    writer = subprocess.Popen(
        [sys.executable, "-c", GROUP_WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert writer.stdout is not None
    acknowledged: list[float] = []
    deadline = time.monotonic() + 30
    while len(acknowledged) < 1000 and time.monotonic() < deadline:
        acknowledged.append(float(writer.stdout.readline()))
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    writer.stdout.close()
    stored = stored_values(path)
    assert len(acknowledged) >= 1000
    assert set(acknowledged) <= set(stored)
    for d in range(20):  # per device: stored in order, and nothing acknowledged is missing from its prefix
        mine = [v for v in stored if d * 1_000_000 <= v < (d + 1) * 1_000_000]
        assert mine == [float(d * 1_000_000 + n) for n in range(len(mine))]


def test_sync_to_disk_leaves_no_ack_only_in_the_unsynced_wal(tmp_path: Path) -> None:
    """Acks are committed without an fsync; after `sync_to_disk` every WAL frame is checkpointed into the
    database file, which SQLite does only after syncing the WAL: nothing acked waits on a later fsync."""
    outbox = Outbox(tmp_path / "o.sqlite3", sinks=("history",))
    try:
        seqs = outbox.put_many([make_message(n) for n in range(5)])
        outbox.ack("history", seqs)
        outbox.sync_to_disk()
        with closing(sqlite3.connect(tmp_path / "o.sqlite3")) as other:
            busy, frames, checkpointed = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert busy == 0 and frames == checkpointed
        assert outbox.pending("history") == []
    finally:
        outbox.close()
