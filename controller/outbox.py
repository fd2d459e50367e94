"""Durable store-and-forward queue: a message is on disk before any sink sees it.

SQLite in WAL mode. Each message gets one pending delivery row per sink (e.g. "mqtt",
"influx"); a sink deletes its row only after its peer acknowledged the message, and the
message itself goes once no sink still needs it. A restart or a kill -9 therefore resends
exactly what was not acknowledged, in insertion order (`seq`).

`synchronous=FULL` makes every commit survive power loss, not just a process crash; writes
are batched by callers (`put_many`) so the fsync cost is paid per batch, not per reading.

The queue is bounded: `put` raises `OutboxFull` past `max_bytes` rather than silently
dropping anything, and `usage()` lets the controller raise an alarm well before that.
All methods are synchronous; `AsyncOutbox` runs them on one dedicated thread so the event
loop never waits on disk.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from controller.messages import Message

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS message (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    kind     TEXT NOT NULL,
    topic    TEXT NOT NULL,
    payload  TEXT NOT NULL,
    bytes    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS delivery (
    sink TEXT NOT NULL,
    seq  INTEGER NOT NULL REFERENCES message(seq) ON DELETE CASCADE,
    PRIMARY KEY (sink, seq)
) WITHOUT ROWID;
-- ack's "no sink still needs it" check looks delivery up by seq alone; without this index each
-- acked message scans the whole backlog (ack of 1000 with 20000 pending: 8.4 s -> 0.04 s).
CREATE INDEX IF NOT EXISTS delivery_by_seq ON delivery(seq);
"""


class OutboxFull(RuntimeError):
    """The outbox reached its byte bound; the message was not stored."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    seq: int
    message: Message


@dataclass(frozen=True, slots=True)
class OutboxUsage:
    pending_messages: int
    payload_bytes: int
    max_bytes: int

    @property
    def fraction(self) -> float:
        return self.payload_bytes / self.max_bytes if self.max_bytes else 0.0


class Outbox:
    """The synchronous queue. Thread-safe; meant to be driven through `AsyncOutbox`."""

    def __init__(self, path: str | Path, sinks: Sequence[str], max_bytes: int = 512 * 1024 * 1024) -> None:
        if not sinks:
            raise ValueError("an outbox needs at least one sink")
        self.path = Path(path)
        self.sinks = tuple(sinks)
        self.max_bytes = max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._payload_bytes = self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM message").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def put(self, message: Message) -> int:
        return self.put_many([message])[0]

    def put_many(self, messages: Iterable[Message]) -> list[int]:
        """Commit messages atomically, one pending delivery per sink; return their sequence numbers."""
        rows = [(m.kind, m.topic, json.dumps(m.payload, separators=(",", ":"), allow_nan=False)) for m in messages]
        added = sum(len(payload) for _, _, payload in rows)
        with self._lock:
            if self._payload_bytes + added > self.max_bytes:
                raise OutboxFull(
                    f"outbox {self.path} holds {self._payload_bytes} of {self.max_bytes} bytes; "
                    f"refusing {len(rows)} message(s) until a sink catches up"
                )
            seqs: list[int] = []
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for kind, topic, payload in rows:
                    cur = self._db.execute(
                        "INSERT INTO message (kind, topic, payload, bytes) VALUES (?, ?, ?, ?)",
                        (kind, topic, payload, len(payload)),
                    )
                    seq = cur.lastrowid
                    assert seq is not None  # an INSERT on a rowid table always sets it
                    self._db.executemany("INSERT INTO delivery (sink, seq) VALUES (?, ?)", [(s, seq) for s in self.sinks])
                    seqs.append(seq)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._payload_bytes += added
            return seqs

    def pending(self, sink: str, limit: int = 500, after_seq: int = 0) -> list[StoredMessage]:
        """The oldest messages `sink` has not acknowledged, in order, with `seq > after_seq`."""
        self._check_sink(sink)
        with self._lock:
            rows = self._db.execute(
                "SELECT m.seq, m.kind, m.topic, m.payload FROM delivery d JOIN message m ON m.seq = d.seq "
                "WHERE d.sink = ? AND d.seq > ? ORDER BY d.seq LIMIT ?",
                (sink, after_seq, limit),
            ).fetchall()
        return [StoredMessage(seq, Message(kind, topic, json.loads(payload))) for seq, kind, topic, payload in rows]

    def ack(self, sink: str, seqs: Iterable[int]) -> None:
        """Mark messages delivered to `sink`; delete the ones no sink needs any more."""
        self._check_sink(sink)
        seq_list = [(sink, int(s)) for s in seqs]
        if not seq_list:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("DELETE FROM delivery WHERE sink = ? AND seq = ?", seq_list)
                freed = self._db.execute(
                    "SELECT COALESCE(SUM(bytes), 0) FROM message m WHERE m.seq IN (%s) "
                    "AND NOT EXISTS (SELECT 1 FROM delivery d WHERE d.seq = m.seq)" % ",".join("?" * len(seq_list)),
                    [s for _, s in seq_list],
                ).fetchone()[0]
                self._db.execute(
                    "DELETE FROM message WHERE seq IN (%s) AND NOT EXISTS (SELECT 1 FROM delivery d WHERE d.seq = message.seq)"
                    % ",".join("?" * len(seq_list)),
                    [s for _, s in seq_list],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._payload_bytes -= freed

    def pending_count(self, sink: str) -> int:
        self._check_sink(sink)
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM delivery WHERE sink = ?", (sink,)).fetchone()[0])

    def usage(self) -> OutboxUsage:
        with self._lock:
            count = int(self._db.execute("SELECT COUNT(*) FROM message").fetchone()[0])
            return OutboxUsage(count, self._payload_bytes, self.max_bytes)

    def _check_sink(self, sink: str) -> None:
        if sink not in self.sinks:
            raise ValueError(f"unknown sink {sink!r}; this outbox serves {', '.join(self.sinks)}")


class AsyncOutbox:
    """`Outbox` for asyncio code: every call runs on one private thread, in submission order."""

    def __init__(self, outbox: Outbox) -> None:
        self.sync = outbox
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hotlab-outbox")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def put(self, message: Message) -> int:
        return await self._run(self.sync.put, message)

    async def put_many(self, messages: Sequence[Message]) -> list[int]:
        return await self._run(self.sync.put_many, list(messages))

    async def pending(self, sink: str, limit: int = 500, after_seq: int = 0) -> list[StoredMessage]:
        return await self._run(self.sync.pending, sink, limit, after_seq)

    async def ack(self, sink: str, seqs: Sequence[int]) -> None:
        await self._run(self.sync.ack, sink, list(seqs))

    async def pending_count(self, sink: str) -> int:
        return await self._run(self.sync.pending_count, sink)

    async def usage(self) -> OutboxUsage:
        return await self._run(self.sync.usage)

    async def close(self) -> None:
        await self._run(self.sync.close)
        self._executor.shutdown(wait=False)
