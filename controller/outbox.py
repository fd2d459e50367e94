"""Durable store-and-forward queue: a message is on disk before any sink sees it.

SQLite in WAL mode. Each message gets one pending delivery row per sink (e.g. "mqtt",
"influx"); a sink deletes its row only after its peer acknowledged the message, and the
message itself goes once no sink still needs it. A restart or a kill -9 therefore resends
exactly what was not acknowledged, in insertion order (`seq`).

`synchronous=FULL` makes every `put_many` survive power loss, not just a process crash; writes
are batched (`put_many`, and `GroupCommit` across producers) so the fsync cost is paid per
batch, not per reading. Acks skip the fsync: losing one to a power cut only means a resend.

The queue is bounded: `put` raises `OutboxFull` past `max_bytes` rather than silently
dropping anything, and `usage()` lets the controller raise an alarm well before that.
All methods are synchronous; `AsyncOutbox` runs them on dedicated threads (writes, the bulk
sinks' reads, the MQTT sink's reads) so the event loop never waits on disk, and answers a
sink's read of what its own commits just stored from memory (controller/recent_commits.py).

Reads (`pending`, `pending_count`, `usage`) use their own connection, and `pending_json` (the
MQTT sink, whose reads set the readings' latency) another: WAL lets them see the last commit
while a write is in progress, so a sink looking for work never queues behind the devices'
commits, and MQTT never queues behind InfluxDB's or the archive's batches of hundreds.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from hotlab.controller.messages import Kind, Message
from hotlab.controller.recent_commits import RecentCommits
from hotlab.errors import HotlabError

T = TypeVar("T")

#: Rows per multi-row INSERT (4 parameters each, well under SQLite's 32766). A commit makes a
#: handful of SQLite calls, not one per row: each call gives up the GIL and must take it back
#: from the event loop.
_ROWS_PER_INSERT = 500

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


class OutboxFull(HotlabError, RuntimeError):
    """The outbox reached its byte bound; the message was not stored."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    seq: int
    message: Message


@dataclass(frozen=True, slots=True)
class StoredPayload:
    """A pending message with its payload as the JSON text stored, not parsed.

    For a sink that forwards the payload unchanged (MQTT): the stored text is exactly what
    `json.dumps(payload, separators=(",", ":"))` gives, so parsing it and encoding it again
    would cost CPU per message and change nothing.
    """

    seq: int
    kind: str
    topic: str
    payload_json: str


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
        #: Reads only, on their own lock: a read never waits for a write transaction (WAL).
        self._read_lock = threading.Lock()
        self._reader = _read_only_connection(self.path)
        #: `pending_json`'s own connection: the MQTT sink's small, latency-bound reads do not
        #: queue behind the bulk sinks' reads of hundreds of rows.
        self._live_lock = threading.Lock()
        self._live_reader = _read_only_connection(self.path)
        self._sinks_json = json.dumps(self.sinks)

    def close(self) -> None:
        with self._read_lock:
            self._reader.close()
        with self._live_lock:
            self._live_reader.close()
        with self._lock:
            self._db.close()

    def put(self, message: Message) -> int:
        return self.put_many([message])[0]

    def put_many(self, messages: Iterable[Message]) -> list[int]:
        """Commit messages atomically, one pending delivery per sink; return their sequence numbers."""
        return [stored.seq for stored in self.put_many_stored(messages)]

    def put_many_stored(self, messages: Iterable[Message]) -> list[StoredPayload]:
        """As `put_many`, returning each message as stored: what `pending_json` would return for it."""
        rows = [(m.kind, m.topic, json.dumps(m.payload, separators=(",", ":"), allow_nan=False)) for m in messages]
        if not rows:
            return []
        added = sum(len(payload) for _, _, payload in rows)
        with self._lock:
            if self._payload_bytes + added > self.max_bytes:
                raise OutboxFull(
                    f"outbox {self.path} holds {self._payload_bytes} of {self.max_bytes} bytes; "
                    f"refusing {len(rows)} message(s) until a sink catches up"
                )
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for start in range(0, len(rows), _ROWS_PER_INSERT):
                    chunk = rows[start : start + _ROWS_PER_INSERT]
                    self._db.execute(
                        "INSERT INTO message (kind, topic, payload, bytes) VALUES "
                        + ",".join(["(?, ?, ?, ?)"] * len(chunk)),
                        [value for kind, topic, payload in chunk for value in (kind, topic, payload, len(payload))],
                    )
                # This transaction holds the only write lock, so AUTOINCREMENT numbered its rows
                # consecutively, ending at the last rowid inserted.
                last = self._db.execute("SELECT last_insert_rowid()").fetchone()[0]
                seqs = list(range(last - len(rows) + 1, last + 1))
                self._db.execute(
                    "INSERT INTO delivery (sink, seq) SELECT sink.value, m.seq FROM message AS m, json_each(?) AS sink "
                    "WHERE m.seq BETWEEN ? AND ?",
                    (self._sinks_json, seqs[0], seqs[-1]),
                )
                self._db.execute("COMMIT")
            except BaseException:
                rollback_unless_done(self._db)
                raise
            self._payload_bytes += added
            return [StoredPayload(seq, kind, topic, payload) for seq, (kind, topic, payload) in zip(seqs, rows)]

    def pending(self, sink: str, limit: int = 500, after_seq: int = 0) -> list[StoredMessage]:
        """The oldest messages `sink` has not acknowledged, in order, with `seq > after_seq`."""
        with self._read_lock:
            rows = self._pending_rows(self._reader, sink, limit, after_seq)
        # The kind was a Message's own when it was stored, so it is one of `Kind`.
        return [
            StoredMessage(seq, Message(cast(Kind, kind), topic, json.loads(payload)))
            for seq, kind, topic, payload in rows
        ]

    def pending_json(self, sink: str, limit: int = 500, after_seq: int = 0) -> list[StoredPayload]:
        """As `pending`, with each payload as its stored JSON text (no parsing), on its own connection."""
        with self._live_lock:
            return [StoredPayload(*row) for row in self._pending_rows(self._live_reader, sink, limit, after_seq)]

    def _pending_rows(
        self, reader: sqlite3.Connection, sink: str, limit: int, after_seq: int
    ) -> list[tuple[int, str, str, str]]:
        self._check_sink(sink)
        return reader.execute(
            "SELECT m.seq, m.kind, m.topic, m.payload FROM delivery d JOIN message m ON m.seq = d.seq "
            "WHERE d.sink = ? AND d.seq > ? ORDER BY d.seq LIMIT ?",
            (sink, after_seq, limit),
        ).fetchall()

    def sync_to_disk(self) -> None:
        """Make every committed transaction durable, acks included (they are committed without an fsync):
        a WAL checkpoint syncs the WAL first. For whoever acts on an ack in a way a replay cannot undo."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(FULL)").fetchall()

    def ack(self, sink: str, seqs: Iterable[int]) -> None:
        """Mark messages delivered to `sink`; delete the ones no sink needs any more."""
        self._check_sink(sink)
        seq_list = [int(s) for s in seqs]
        if not seq_list:
            return
        seqs_json = json.dumps(seq_list)
        with self._lock:
            # No fsync for an ack (WAL + synchronous=NORMAL): a crash of the process still keeps it,
            # and the power loss that could undo it only makes the sink send those messages again
            # (at-least-once). The next put_many's fsync makes it durable along with its own data.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "DELETE FROM delivery WHERE sink = ? AND seq IN (SELECT value FROM json_each(?))", (sink, seqs_json)
                )
                freed = self._db.execute(
                    "SELECT COALESCE(SUM(bytes), 0) FROM message m WHERE m.seq IN (SELECT value FROM json_each(?)) "
                    "AND NOT EXISTS (SELECT 1 FROM delivery d WHERE d.seq = m.seq)",
                    (seqs_json,),
                ).fetchone()[0]
                self._db.execute(
                    "DELETE FROM message WHERE seq IN (SELECT value FROM json_each(?)) "
                    "AND NOT EXISTS (SELECT 1 FROM delivery d WHERE d.seq = message.seq)",
                    (seqs_json,),
                )
                self._db.execute("COMMIT")
            except BaseException:
                rollback_unless_done(self._db)
                raise
            finally:
                self._db.execute("PRAGMA synchronous=FULL")
            self._payload_bytes -= freed

    def pending_count(self, sink: str) -> int:
        self._check_sink(sink)
        with self._read_lock:
            return int(self._reader.execute("SELECT COUNT(*) FROM delivery WHERE sink = ?", (sink,)).fetchone()[0])

    def usage(self) -> OutboxUsage:
        with self._read_lock:
            count = int(self._reader.execute("SELECT COUNT(*) FROM message").fetchone()[0])
        return OutboxUsage(count, self._payload_bytes, self.max_bytes)

    def _check_sink(self, sink: str) -> None:
        if sink not in self.sinks:
            raise ValueError(f"unknown sink {sink!r}; this outbox serves {', '.join(self.sinks)}")


def rollback_unless_done(db: sqlite3.Connection) -> None:
    """Roll back the open transaction, unless SQLite already has.

    On a full disk (SQLITE_FULL), and on I/O and memory errors, SQLite may roll the whole
    transaction back itself; a ROLLBACK then fails with "no transaction is active", and that
    error would replace the one that says what is wrong ("database or disk is full").
    """
    if db.in_transaction:
        db.execute("ROLLBACK")


def _read_only_connection(path: Path) -> sqlite3.Connection:
    reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    reader.execute("PRAGMA query_only=ON")
    return reader


@dataclass(frozen=True, slots=True)
class _Committed:
    """A message a commit of this process stored, as each kind of read would return it."""

    as_json: StoredPayload
    as_message: StoredMessage

    @property
    def seq(self) -> int:
        return self.as_json.seq


class AsyncOutbox:
    """`Outbox` for asyncio code: writes run on one private thread, in submission order; reads on others.

    Reads therefore do not wait behind writes, and a read submitted before a write has
    completed may not see it: await the write first (as every caller here does).
    `pending_json` (the MQTT sink's reads) has a thread of its own, like its connection.

    A read with `after_seq` that continues exactly where the commits of this `AsyncOutbox` went
    on is answered from memory, with what those commits stored (`pending` then returns the
    committed `Message` objects themselves, not a parse of their JSON, shared by every sink:
    a sink must not change a message it reads); any other read goes to the database.
    `reads_from_memory` counts the former, for tests and benchmarks.
    """

    def __init__(self, outbox: Outbox) -> None:
        self.sync = outbox
        self._writes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hotlab-outbox")
        self._reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hotlab-outbox-read")
        self._live_reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hotlab-outbox-live")
        self._recent: dict[str, RecentCommits[_Committed]] = {sink: RecentCommits() for sink in outbox.sinks}
        self.reads_from_memory = 0

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._writes, fn, *args)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._reads, fn, *args)

    async def _live_read(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._live_reads, fn, *args)

    async def put(self, message: Message) -> int:
        return (await self.put_many_stored([message]))[0].seq

    async def put_many(self, messages: Sequence[Message]) -> list[int]:
        return [stored.seq for stored in await self.put_many_stored(messages)]

    async def put_many_stored(self, messages: Sequence[Message]) -> list[StoredPayload]:
        batch = list(messages)
        stored = await self._write(self.sync.put_many_stored, batch)
        committed = [_Committed(s, StoredMessage(s.seq, m)) for s, m in zip(stored, batch)]
        for recent in self._recent.values():
            recent.add(committed)
        return stored

    async def pending(self, sink: str, limit: int = 500, after_seq: int = 0) -> list[StoredMessage]:
        recent = self._from_memory(sink, limit, after_seq)
        if recent is not None:
            return [committed.as_message for committed in recent]
        return await self._read(self.sync.pending, sink, limit, after_seq)

    async def pending_json(self, sink: str, limit: int = 500, after_seq: int = 0) -> list[StoredPayload]:
        recent = self._from_memory(sink, limit, after_seq)
        if recent is not None:
            return [committed.as_json for committed in recent]
        return await self._live_read(self.sync.pending_json, sink, limit, after_seq)

    def _from_memory(self, sink: str, limit: int, after_seq: int) -> list[_Committed] | None:
        recent = self._recent.get(sink)
        taken = None if recent is None else recent.take(after_seq, limit)
        if taken is not None:
            self.reads_from_memory += 1
        return taken

    async def ack(self, sink: str, seqs: Sequence[int]) -> None:
        await self._write(self.sync.ack, sink, list(seqs))

    async def sync_to_disk(self) -> None:
        await self._write(self.sync.sync_to_disk)

    async def pending_count(self, sink: str) -> int:
        return await self._read(self.sync.pending_count, sink)

    async def usage(self) -> OutboxUsage:
        return await self._read(self.sync.usage)

    async def close(self) -> None:
        await self._read(lambda: None)  # reads already submitted finish first
        await self._live_read(lambda: None)
        await self._write(self.sync.close)
        for executor in (self._writes, self._reads, self._live_reads):
            executor.shutdown(wait=False)


CommitBatch = Callable[[list[Message]], Awaitable[None]]


@dataclass(slots=True)
class _Submission:
    messages: list[Message]
    done: asyncio.Future[None]


class GroupCommit:
    """Group commit: what many producers hand over while a commit is running goes into the next one.

    With `synchronous=FULL` every transaction costs an fsync, so one transaction per device
    reading caps the controller near the disk's fsync rate, while a transaction of 100 messages
    costs hardly more than one of 1. Here one flusher task commits everything submitted so far in one `commit_batch`
    call, and meanwhile the next submissions queue up: the batch grows with the load, and an
    idle controller still commits a lone reading at once (no fixed delay).

    The contract for each producer is the one of a private `put_many`: `submit` returns only
    after the transaction that holds its messages committed, and raises what that commit
    raised. If a batch of several submissions fails (e.g. `OutboxFull`: the sum does not fit
    where each part might), every submission is retried alone, so only the producers whose
    own messages cannot be stored see the error, exactly as without grouping. Hence
    `commit_batch` must raise only when it committed nothing.
    """

    def __init__(self, commit_batch: CommitBatch, *, max_messages: int = 1000) -> None:
        if max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        self._commit_batch = commit_batch
        self.max_messages = max_messages
        self._queue: deque[_Submission] = deque()
        self._flusher: asyncio.Task[None] | None = None
        #: Transactions committed (or attempted) by `commit_batch`; for tests and benchmarks.
        self.batches = 0

    async def submit(self, messages: Sequence[Message]) -> None:
        """Commit `messages` in one transaction, together with whatever else is waiting; return once durable."""
        submission = _Submission(list(messages), asyncio.get_running_loop().create_future())
        self._queue.append(submission)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="outbox-group-commit")
        # Shielded: a cancelled producer must not cancel a commit that other producers share;
        # its messages may still be committed (as a cancelled put_many's could before).
        await asyncio.shield(submission.done)

    async def _flush(self) -> None:
        while self._queue:
            batch = self._take_batch()
            try:
                await self._commit(batch)
            except BaseException:  # cancelled (the loop is closing): nobody may wait forever
                for submission in batch + list(self._queue):
                    _settle(submission, RuntimeError("the outbox group commit was cancelled; not known to be stored"))
                self._queue.clear()
                raise

    def _take_batch(self) -> list[_Submission]:
        batch = [self._queue.popleft()]
        size = len(batch[0].messages)
        while self._queue and size + len(self._queue[0].messages) <= self.max_messages:
            submission = self._queue.popleft()
            batch.append(submission)
            size += len(submission.messages)
        return batch

    async def _commit(self, batch: list[_Submission]) -> None:
        try:
            self.batches += 1
            await self._commit_batch([m for submission in batch for m in submission.messages])
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0], exc)
                return
            for submission in batch:  # alone, so that each producer gets its own outcome
                try:
                    self.batches += 1
                    await self._commit_batch(submission.messages)
                except Exception as alone:
                    _settle(submission, alone)
                else:
                    _settle(submission, None)
            return
        for submission in batch:
            _settle(submission, None)


def _settle(submission: _Submission, error: Exception | None) -> None:
    if submission.done.done():
        return
    if error is None:
        submission.done.set_result(None)
    else:
        submission.done.set_exception(error)
