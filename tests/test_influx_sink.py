"""InfluxSink against a real influxd: round trip of every kind, batching, outage, rejection, no blocking,
and a sink task that survives outbox errors and its own bugs."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from hotlab.controller.messages import (
    Message,
    device_status_message,
    elution_message,
    reading_message,
)
from hotlab.controller.outbox import AsyncOutbox, Outbox
from hotlab.controller.qc.limits import DEFAULT_LIMITS
from hotlab.controller.qc.result import QcResult
from hotlab.controller.sinks.influx import InfluxConfig, InfluxSink
from hotlab.drivers.records import ElutionRecord, Reading
from tests import influx_service
from tests.influx_service import InfluxService
from tests.schema_check import malformed_on_purpose

pytestmark = pytest.mark.integration

influx_database = influx_service.influx_database  # the shared fixture, used by name below
influx_server = influx_service.influx_server  # the shared fixture, used by name below

T0 = 1_764_000_000_123_456_789  # 2025-11-24T16:00:00.123456789Z: ns precision must survive the trip
SITE, STATION = "uhb", "hotlab-1"


def _reading(i: int, device: str = "crc-55tr", nuclide: str | None = "Tc-99m") -> Message:
    reading = Reading(
        device=device,
        nuclide=nuclide,
        activity_bq=7.4e8 + i,
        raw_value=20.0 + i / 1000,
        unit="mCi",
        timestamp_ns=T0 + i * 1_000_000,
        raw_frame=b"A=20.000 mCi\r\n",
    )
    return reading_message(SITE, STATION, reading)


def _every_kind() -> list[Message]:
    elution = ElutionRecord(
        station=STATION,
        generator_id="ult-2291",
        parent_nuclide="Mo-99",
        daughter_nuclide="Tc-99m",
        counter=17,
        activity_bq=1.85e10,
        volume_ml=5.0,
        start_ns=T0 - 120_000_000_000,
        end_ns=T0 + 7,
    )
    return [
        _reading(0),
        _reading(1, device="capintec", nuclide=None),
        elution_message(SITE, elution, yield_pct=93.5, breakthrough_pct=None),
        QcResult(
            test="constancy",
            verdict="fail",
            measured=3.4e6,
            expected=3.7e6,
            deviation_pct=-8.108,
            unit="Bq",
            limit=DEFAULT_LIMITS["constancy"],
            value_judged=-8.108,
            time_ns=T0 + 11,
        ).to_message(SITE, STATION, "crc-55tr"),
        device_status_message(
            SITE, STATION, "crc-55tr", up=False, latency_ms=None, errors=3, detail="timeout", time_ns=T0 + 13
        ),
    ]


@pytest.fixture
def outbox_path() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="hotlab-outbox-"))
    yield root / "outbox.sqlite"
    shutil.rmtree(root, ignore_errors=True)


@asynccontextmanager
async def running_sink(config: InfluxConfig, outbox: AsyncOutbox) -> AsyncIterator[InfluxSink]:
    sink = InfluxSink(config, outbox)
    task = asyncio.create_task(sink.run())
    try:
        yield sink
    finally:
        sink.stop()
        await asyncio.wait_for(task, 30)


async def wait_until(predicate, timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll an async predicate: the outbox offers no event for "drained", so look every 20 ms."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


async def drained(outbox: AsyncOutbox, timeout_s: float = 30.0) -> None:
    async def empty() -> bool:
        return await outbox.pending_count("influx") == 0

    await wait_until(empty, timeout_s, "the outbox to drain")


def stored_in(measurement: str) -> str:
    """Where a measurement's points are: raw readings in the "raw" retention policy, the rest in the default one."""
    return f'"raw"."{measurement}"' if measurement == "reading" else f'"{measurement}"'


def native(service: InfluxService, database: str) -> dict:
    """1.x settings whose raw policy keeps this module's readings: T0 is older than the default 30 days."""
    return service.sink_settings(database) | {"raw_days": 36_500}


def fast_config(settings: dict, **overrides) -> InfluxConfig:
    return InfluxConfig.from_mapping(
        settings | {"flush_interval_s": 0.05, "retry_initial_s": 0.05, "retry_max_s": 0.3} | overrides
    )


async def test_every_kind_round_trips_with_tags_fields_and_ns_time(
    influx_server: InfluxService, influx_database: str, outbox_path: Path
) -> None:
    outbox = AsyncOutbox(Outbox(outbox_path, sinks=("influx",)))
    messages = _every_kind()
    await outbox.put_many(messages)
    async with running_sink(fast_config(native(influx_server, influx_database)), outbox) as sink:
        await drained(outbox)
    assert sink.stats.written == len(messages) and sink.stats.rejected == 0

    def only(measurement: str, where: str = "") -> list[dict]:
        return influx_server.rows(f"SELECT * FROM {stored_in(measurement)} {where}", influx_database)

    readings = {row["device"]: row for row in only("reading")}
    assert readings["crc-55tr"] == {
        "time": T0,
        "site": SITE,
        "station": STATION,
        "device": "crc-55tr",
        "nuclide": "Tc-99m",
        "activity_bq": 7.4e8,
        "raw_value": 20.0,
        "unit": "mCi",
        "quality": "good",  # a field, so a dashboard can filter suspect readings out (docs/influxdb.md)
        "msg_id": messages[0].msg_id,
    }
    assert readings["capintec"]["nuclide"] is None  # a missing nuclide is no tag, not an empty one
    assert readings["capintec"]["time"] == T0 + 1_000_000

    [elution] = only("elution")
    assert elution["time"] == T0 + 7
    assert (elution["generator"], elution["parent"], elution["nuclide"]) == ("ult-2291", "Mo-99", "Tc-99m")
    assert elution["counter"] == 17 and elution["duration_s"] == pytest.approx(120.000000007)
    assert elution["yield_pct"] == 93.5 and "breakthrough_pct" not in elution  # None: no field at all

    [qc] = only("qc_result")
    assert (qc["test"], qc["verdict"], qc["verdict_code"]) == ("constancy", "fail", 2)
    assert qc["deviation_pct"] == -8.108 and qc["limit"] == DEFAULT_LIMITS["constancy"].text and qc["time"] == T0 + 11

    [status] = only("device_status")
    assert (status["up"], status["errors"], status["detail"]) == (0, 3, "timeout") and "latency_ms" not in status

    field_types = influx_server.rows('SHOW FIELD KEYS FROM "elution"', influx_database)
    assert {row["fieldKey"]: row["fieldType"] for row in field_types}["counter"] == "float"
    await outbox.close()


async def test_resending_a_message_is_idempotent(
    influx_server: InfluxService, influx_database: str, outbox_path: Path
) -> None:
    outbox = AsyncOutbox(Outbox(outbox_path, sinks=("influx",)))
    messages = _every_kind()
    await outbox.put_many(messages + messages)  # as after a crash between write and ack
    async with running_sink(fast_config(native(influx_server, influx_database)), outbox):
        await drained(outbox)
    for measurement in ("reading", "elution", "qc_result", "device_status"):
        counted = influx_server.rows(f'SELECT count("msg_id") FROM {stored_in(measurement)}', influx_database)
        expected = sum(m.kind == measurement for m in messages)
        assert counted[0]["count"] == expected, measurement
    await outbox.close()


async def test_a_full_backlog_goes_out_in_batches_of_batch_size(
    influx_server: InfluxService, influx_database: str, outbox_path: Path
) -> None:
    outbox = AsyncOutbox(Outbox(outbox_path, sinks=("influx",)))
    await outbox.put_many([_reading(i) for i in range(2500)])
    config = fast_config(native(influx_server, influx_database), batch_size=1000)
    async with running_sink(config, outbox) as sink:
        await drained(outbox)
    assert sink.stats.requests == 3 and sink.stats.written == 2500
    assert influx_server.rows('SELECT count("activity_bq") FROM "raw"."reading"', influx_database)[0]["count"] == 2500
    await outbox.close()


async def test_outage_mid_stream_loses_nothing_and_duplicates_nothing(outbox_path: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="hotlab-influxd-outage-"))
    try:
        with InfluxService(root) as service:
            database = service.create_database()
            outbox = AsyncOutbox(Outbox(outbox_path, sinks=("influx",)))
            total = 600
            config = fast_config(native(service, database), batch_size=50, timeout_s=2.0)
            async with running_sink(config, outbox) as sink:
                for i in range(total):
                    await outbox.put(_reading(i))
                    if i == total // 3:
                        await drained(outbox)
                        service.stop(kill=True)  # SIGKILL: only what influxd fsynced before its 204 survives
                    if i == 2 * total // 3:

                        async def failing() -> bool:
                            return sink.stats.failed_attempts >= 2

                        await wait_until(failing, what="the sink to notice the outage")
                        outage_error = sink.stats.last_error
                        assert await outbox.pending_count("influx") > 0  # held back, not dropped
                        service.start()  # same data dir, same bridge port (influxd keeps its ports if free)
                await drained(outbox, timeout_s=60)
            assert "refused" in outage_error.lower()  # the server was really gone, not answering with errors
            assert sink.stats.rejected == 0 and sink.stats.last_error == ""
            rows = service.rows('SELECT "msg_id" FROM "raw"."reading"', database)
            assert len(rows) == total
            assert len({row["msg_id"] for row in rows}) == total
            assert sorted(row["time"] for row in rows) == [T0 + i * 1_000_000 for i in range(total)]
            assert (await outbox.usage()).pending_messages == 0
            assert outbox.reads_from_memory > 0  # while caught up, the live stream did not come from the database
            await outbox.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _hold_port(port: int) -> socket.socket:
    """Take `port` as another program would: a live listener, which influxd cannot share."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", port))
    holder.listen(1)
    return holder


def test_a_restart_waits_for_its_briefly_held_port_and_keeps_it() -> None:
    root = Path(tempfile.mkdtemp(prefix="hotlab-influxd-restart-"))
    try:
        with InfluxService(root) as service:
            database = service.create_database()
            service.write_lines(database, [f"reading,device=a activity_bq=1.0 {T0}"])
            old_port = service.http_port
            service.stop()
            holder = _hold_port(old_port)
            release = threading.Timer(1.0, holder.close)  # e.g. a client's socket that lets go a moment later
            release.start()
            try:
                service.start()
            finally:
                release.join()
            assert service.http_port == old_port
            assert service.rows('SELECT "activity_bq" FROM "reading"', database)[0]["time"] == T0
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_a_restart_moves_influxd_off_a_port_taken_for_good_and_the_v2_sink_never_notices(
    outbox_path: Path,
) -> None:
    """The v2 write path (2.x/3.x, and 1.8+) through the bridge, whose port stays while influxd moves."""
    root = Path(tempfile.mkdtemp(prefix="hotlab-influxd-moved-"))
    holder: socket.socket | None = None
    try:
        with InfluxService(root) as service:
            database = service.create_database()
            outbox = AsyncOutbox(Outbox(outbox_path, sinks=("influx",)))
            async with running_sink(fast_config(service.v2_settings(database)), outbox) as sink:
                await outbox.put_many([_reading(i) for i in range(10)])
                await drained(outbox)
                old_port, bridge_port = service.http_port, service.bridge_port
                await asyncio.to_thread(service.stop)
                holder = _hold_port(old_port)
                await outbox.put_many([_reading(i) for i in range(10, 20)])
                await asyncio.to_thread(service.start)
                assert service.http_port != old_port and service.bridge_port == bridge_port
                await drained(outbox, timeout_s=60)
            assert sink.stats.written == 20 and sink.stats.rejected == 0
            assert service.rows('SELECT count("activity_bq") FROM "reading"', database)[0]["count"] == 20
            await outbox.close()
    finally:
        if holder is not None:
            holder.close()
        shutil.rmtree(root, ignore_errors=True)


async def test_a_point_the_server_refuses_is_dropped_alone_and_the_rest_is_written(
    influx_server: InfluxService, influx_database: str, outbox_path: Path
) -> None:
    # Another writer made device_status.up a string: our float "up" now conflicts (HTTP 400).
    influx_server.write_lines(influx_database, [f'device_status,device=x up="yes" {T0}'])
    outbox = AsyncOutbox(Outbox(outbox_path, sinks=("influx",)))
    readings = [_reading(i) for i in range(7)]
    status = device_status_message(SITE, STATION, "crc-55tr", up=True, latency_ms=12.0, errors=0, time_ns=T0)
    broken = malformed_on_purpose(
        Message(
            "reading",
            "hotlab/x",
            {"msg_id": "no-device", "time_ns": T0, "site": SITE, "station": STATION, "activity_bq": 1.0},
        )
    )
    await outbox.put_many(readings[:3] + [status, broken] + readings[3:])
    async with running_sink(fast_config(native(influx_server, influx_database)), outbox) as sink:
        await drained(outbox)
    assert sink.stats.rejected == 2 and sink.stats.written == 7
    assert influx_server.rows('SELECT count("activity_bq") FROM "raw"."reading"', influx_database)[0]["count"] == 7
    await outbox.close()


async def test_wrong_credentials_keep_the_backlog_and_say_why(
    influx_server: InfluxService, influx_database: str, outbox_path: Path
) -> None:
    outbox = AsyncOutbox(Outbox(outbox_path, sinks=("influx",)))
    await outbox.put_many(_every_kind())
    settings = native(influx_server, influx_database) | {"password": "wrong"}
    async with running_sink(fast_config(settings), outbox) as sink:

        async def failed_twice() -> bool:
            return sink.stats.failed_attempts >= 2

        await wait_until(failed_twice, what="two failed attempts")
    assert "HTTP 401" in sink.stats.last_error
    assert await outbox.pending_count("influx") == len(_every_kind())
    await outbox.close()


async def test_a_silent_server_neither_blocks_the_loop_nor_holds_an_attempt_past_timeout(outbox_path: Path) -> None:
    # A listener that accepts connections and never answers: the worst case for a blocking client.
    with socket.socket() as black_hole:
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(16)
        url = f"http://127.0.0.1:{black_hole.getsockname()[1]}"
        outbox = AsyncOutbox(Outbox(outbox_path, sinks=("influx",)))
        await outbox.put(_reading(0))
        config = fast_config({"url": url, "token": "t", "org": "o", "bucket": "b"}, timeout_s=1.0)
        ticks = 0
        started = time.monotonic()
        async with running_sink(config, outbox) as sink:

            async def failed_once() -> bool:
                nonlocal ticks
                ticks += 1
                return sink.stats.failed_attempts >= 1

            await wait_until(failed_once, timeout_s=10, what="the attempt to time out")
        elapsed = time.monotonic() - started
    assert elapsed < 10  # bounded by timeout_s (1 s), not by the silent server
    assert ticks >= 10  # the loop kept turning (every 20 ms, ~50 times) while the write waited
    assert "timed out" in sink.stats.last_error.lower()
    assert await outbox.pending_count("influx") == 1
    await outbox.close()


class FaultyOutbox(AsyncOutbox):
    """A real outbox whose next calls fail as a full disk, a lock or a bug would make them fail."""

    def __init__(self, outbox: Outbox) -> None:
        super().__init__(outbox)
        self.pending_faults: list[BaseException] = []
        self.ack_faults: list[BaseException] = []

    async def pending(self, sink: str, limit: int = 500, after_seq: int = 0):
        if self.pending_faults:
            raise self.pending_faults.pop(0)
        return await super().pending(sink, limit, after_seq)

    async def ack(self, sink: str, seqs) -> None:
        if self.ack_faults:
            raise self.ack_faults.pop(0)
        await super().ack(sink, seqs)


async def test_outbox_errors_are_retried_and_everything_is_still_delivered_once(
    influx_server: InfluxService, influx_database: str, outbox_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = FaultyOutbox(Outbox(outbox_path, sinks=("influx",)))
    outbox.pending_faults = [sqlite3.OperationalError("database is locked") for _ in range(3)]
    outbox.ack_faults = [sqlite3.OperationalError("disk I/O error")]  # after the write: the batch is resent
    messages = [_reading(i) for i in range(40)]
    await outbox.put_many(messages)
    with caplog.at_level(logging.ERROR, logger="hotlab.controller.sinks.influx"):
        async with running_sink(fast_config(native(influx_server, influx_database)), outbox) as sink:
            await drained(outbox)
    assert not outbox.pending_faults and not outbox.ack_faults
    assert sink.stats.failed_attempts == 4
    assert sink.stats.written == len(messages)  # the resent batch is counted once
    assert sink.stats.last_error == ""
    assert sum("outbox unusable" in record.getMessage() for record in caplog.records) == 4
    rows = influx_server.rows('SELECT "msg_id" FROM "raw"."reading"', influx_database)
    assert sorted(row["msg_id"] for row in rows) == sorted(m.msg_id for m in messages)
    await outbox.close()


async def test_a_real_sqlite_lock_on_the_outbox_delays_the_ack_but_loses_nothing(
    influx_server: InfluxService, influx_database: str, outbox_path: Path
) -> None:
    outbox = AsyncOutbox(Outbox(outbox_path, sinks=("influx",)))
    messages = _every_kind()
    await outbox.put_many(messages)
    other_process = sqlite3.connect(outbox_path, isolation_level=None)  # e.g. a backup tool holding a write lock
    other_process.execute("BEGIN IMMEDIATE")
    try:
        async with running_sink(fast_config(native(influx_server, influx_database)), outbox) as sink:

            async def ack_failed() -> bool:
                return "locked" in sink.stats.last_error

            await wait_until(ack_failed, timeout_s=60, what="the ack to hit sqlite's 5 s busy timeout")
            other_process.execute("COMMIT")
            await drained(outbox)
    finally:
        other_process.close()
    assert sink.stats.written == len(messages) and sink.stats.last_error == ""
    assert sink.stats.failed_attempts >= 1
    assert influx_server.rows('SELECT count("msg_id") FROM "raw"."reading"', influx_database)[0]["count"] == 2
    await outbox.close()


async def test_an_unexpected_error_is_logged_with_its_traceback_and_the_sink_carries_on(
    influx_server: InfluxService, influx_database: str, outbox_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = FaultyOutbox(Outbox(outbox_path, sinks=("influx",)))
    outbox.pending_faults = [RuntimeError("a bug in a sink's collaborator")]
    await outbox.put(_reading(0))
    with caplog.at_level(logging.ERROR, logger="hotlab.controller.sinks.influx"):
        async with running_sink(fast_config(native(influx_server, influx_database)), outbox) as sink:
            await drained(outbox)
    [record] = [r for r in caplog.records if "unexpected error" in r.getMessage()]
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError
    assert sink.stats.written == 1 and sink.stats.failed_attempts == 1 and sink.stats.last_error == ""
    await outbox.close()


async def test_cancelling_the_sink_still_ends_it_even_while_it_backs_off(outbox_path: Path) -> None:
    outbox = FaultyOutbox(Outbox(outbox_path, sinks=("influx",)))
    outbox.pending_faults = [sqlite3.OperationalError("database is locked") for _ in range(1000)]
    config = fast_config(
        {"url": "http://127.0.0.1:9", "token": "t", "org": "o", "bucket": "b"}, retry_initial_s=5.0, retry_max_s=30.0
    )
    sink = InfluxSink(config, outbox)
    task = asyncio.create_task(sink.run())

    async def backing_off() -> bool:
        return sink.stats.failed_attempts >= 1

    await wait_until(backing_off, what="the first outbox error")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)
    assert task.cancelled()
    await outbox.close()
