"""The durable outbox: per-sink delivery, order, bounds, and survival of a kill -9."""

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from controller.messages import Message, reading_message
from controller.outbox import AsyncOutbox, Outbox, OutboxFull
from drivers.records import Reading


def make_message(n: int) -> Message:
    return reading_message("site", "station", Reading("cal", "Cs-137", float(n), float(n), "Bq", n))


def test_messages_come_back_in_order_per_sink(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite3", sinks=("mqtt", "influx"))
    seqs = outbox.put_many([make_message(n) for n in range(10)])
    assert seqs == sorted(seqs)
    assert [m.message.payload["activity_bq"] for m in outbox.pending("mqtt")] == [float(n) for n in range(10)]
    assert [m.seq for m in outbox.pending("influx", limit=3)] == seqs[:3]
    assert [m.seq for m in outbox.pending("mqtt", after_seq=seqs[7])] == seqs[8:]


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
    from controller.outbox import Outbox
    from controller.messages import reading_message
    from drivers.records import Reading
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
    stored = [row[0] for row in sqlite3.connect(path).execute("SELECT json_extract(payload, '$.activity_bq') FROM message ORDER BY seq")]
    assert committed >= 200
    assert stored[: committed + 1] == [float(n) for n in range(committed + 1)]
