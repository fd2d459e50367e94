"""InfluxDB 1.x retention and downsampling against a real influxd: what the sink provisions, what the
continuous queries make of the readings, readings older than their policy, and a user who may not provision."""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from hotlab.controller.messages import Message, device_status_message, reading_message
from hotlab.controller.outbox import AsyncOutbox, Outbox
from hotlab.controller.sinks.influx import InfluxConfig, InfluxSink
from hotlab.drivers.records import Reading
from tests import influx_service
from tests.influx_service import InfluxService

pytestmark = pytest.mark.integration

influx_server = influx_service.influx_server  # the shared fixture, used by name below

MINUTE_NS = 60 * 10**9
DAY_NS = 86_400 * 10**9
SITE, STATION = "uhb", "hotlab-1"


def _reading(device: str, activity_bq: float, time_ns: int, quality: str = "good") -> Message:
    reason = None if quality == "good" else "outside the instrument's range"
    reading = Reading(device, "Tc-99m", activity_bq, activity_bq / 1e6, "MBq", time_ns, quality=quality,
                      quality_reason=reason)  # fmt: skip
    return reading_message(SITE, STATION, reading)


def _status(time_ns: int) -> Message:
    return device_status_message(SITE, STATION, "crc-1", up=True, latency_ms=9.0, errors=0, time_ns=time_ns)


@asynccontextmanager
async def running_sink(settings: dict[str, Any], tmp_path: Path) -> AsyncIterator[tuple[InfluxSink, AsyncOutbox]]:
    outbox = AsyncOutbox(Outbox(tmp_path / "outbox.sqlite3", sinks=("influx",)))
    sink = InfluxSink(InfluxConfig.from_mapping(settings | {"flush_interval_s": 0.05, "retry_initial_s": 0.05}), outbox)
    task = asyncio.create_task(sink.run())
    try:
        yield sink, outbox
    finally:
        sink.stop()
        await asyncio.wait_for(task, 30)
        await outbox.close()


async def until(predicate: Callable[[], Awaitable[bool] | bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll `predicate` (there is no event for "drained" or "provisioned") every 20 ms."""
    deadline = time.monotonic() + timeout_s
    while not await _value(predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def drained(outbox: AsyncOutbox) -> None:
    async def empty() -> bool:
        return await outbox.pending_count("influx") == 0

    await until(empty, "the outbox to drain")


def _unique_database() -> str:
    return f"hotlab_ret_{time.time_ns() % 10**12}"


def _policies(server: InfluxService, database: str) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in server.rows(f'SHOW RETENTION POLICIES ON "{database}"', database)}


def _continuous_queries(server: InfluxService, database: str) -> dict[str, str]:
    series = server.query("SHOW CONTINUOUS QUERIES")[0].get("series", [])
    return {row[0]: row[1] for serie in series if serie["name"] == database for row in serie.get("values", [])}


async def test_the_sink_provisions_the_database_its_policies_and_continuous_queries_idempotently(
    influx_server: InfluxService, tmp_path: Path
) -> None:
    database = _unique_database()  # not created: the sink's admin user creates it
    settings = influx_server.sink_settings(database) | {"raw_days": 7}
    async with running_sink(settings, tmp_path / "first") as (sink, _outbox):
        await until(lambda: sink.downsampling is not None, "provisioning")
    policies = _policies(influx_server, database)
    assert policies["raw"]["duration"] == "168h0m0s" and not policies["raw"]["default"]  # 7 x 24 h
    assert policies["autogen"]["default"]  # records and summaries stay in the database's default policy
    queries = _continuous_queries(influx_server, database)
    assert set(queries) == {"hotlab_reading_1m", "hotlab_suspect_1m"}
    assert all("RESAMPLE EVERY 1m FOR 1h" in text and f"{database}.raw.reading" in text for text in queries.values())

    # A second start with another raw_days changes the policy's duration and replaces the queries (no duplicates).
    async with running_sink(settings | {"raw_days": 14}, tmp_path / "second") as (sink, _outbox):
        await until(lambda: sink.downsampling is not None, "provisioning again")
    assert _policies(influx_server, database)["raw"]["duration"] == "336h0m0s"
    assert _continuous_queries(influx_server, database) == queries


async def test_the_continuous_query_makes_each_minutes_min_mean_max_and_counts(
    influx_server: InfluxService, tmp_path: Path
) -> None:
    """The readings go to the raw policy; the queries influxd stores, run over their minutes, give the summary.

    The test server runs no continuous queries on its own schedule, so the stored SELECT is run here as influxd
    would run it for those minutes. The readings are 10 minutes old: within the queries' look-back, so the sink
    leaves their summary to them.
    """
    database = influx_server.create_database()
    start_ns = (time.time_ns() - 10 * MINUTE_NS) // MINUTE_NS * MINUTE_NS
    good = {
        ("crc-1", start_ns): [7.40e9, 7.41e9, 7.39e9],
        ("crc-1", start_ns + MINUTE_NS): [7.38e9, 7.37e9],
        ("vdc-2", start_ns): [3.70e6],
    }
    messages = [
        _reading(device, value, minute + 10**9 * (index + 1))
        for (device, minute), values in good.items()
        for index, value in enumerate(values)
    ]
    messages += [_reading("crc-1", 7.4e19, start_ns + 30 * 10**9, "suspect"), _status(start_ns)]
    async with running_sink(influx_server.sink_settings(database), tmp_path) as (sink, outbox):
        await outbox.put_many(messages)
        await drained(outbox)
    assert (sink.stats.written, sink.stats.rejected, sink.stats.expired) == (len(messages), 0, 0)
    assert influx_server.rows('SELECT count("activity_bq") FROM "raw"."reading"', database)[0]["count"] == 7
    assert influx_server.series('SELECT * FROM "reading"', database) == []  # nothing raw in the default policy
    assert influx_server.series('SELECT * FROM "reading_1m"', database) == []  # left to the continuous queries
    assert len(influx_server.rows('SELECT "up" FROM "device_status"', database)) == 1

    window = f"time >= {start_ns} AND time < {start_ns + 2 * MINUTE_NS} AND "
    for text in _continuous_queries(influx_server, database).values():
        select = re.search(r"BEGIN (SELECT .*) END", text)
        assert select is not None, text
        influx_server.query(select[1].replace(" WHERE ", f" WHERE {window}", 1), database)
    rows = influx_server.rows('SELECT * FROM "reading_1m" GROUP BY "device", "nuclide", "site", "station"', database)
    summary = {(row["device"], row["time"]): row for row in rows}
    assert set(summary) == set(good)
    for key, values in good.items():
        row = summary[key]
        assert (row["activity_bq_min"], row["activity_bq_max"], row["good_readings"]) == (
            min(values),
            max(values),
            len(values),
        )
        assert row["activity_bq_mean"] == pytest.approx(statistics.fmean(values), rel=1e-12)
        assert (row["site"], row["station"], row["nuclide"]) == (SITE, STATION, "Tc-99m")  # the tags survive
    assert summary[("crc-1", start_ns)]["suspect_readings"] == 1  # counted, never in min/mean/max
    assert summary[("crc-1", start_ns + MINUTE_NS)]["suspect_readings"] is None


async def test_readings_older_than_the_raw_policy_are_expired_and_late_ones_are_summarised_by_the_sink(
    influx_server: InfluxService, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A backlog after a long outage: readings beyond raw_days are not kept (counted, not refused), the others
    are, and since the continuous queries looked past them the sink makes their summary itself."""
    database = influx_server.create_database()
    now_ns = time.time_ns()
    too_old = [_reading("crc-1", 1e9 + i, now_ns - 3 * DAY_NS - i * 10**9) for i in range(4)]
    late_minute = (now_ns - 5 * 3600 * 10**9) // MINUTE_NS * MINUTE_NS  # 5 h: past the queries' 1 h look-back
    late = [_reading("crc-1", value, late_minute + (i + 1) * 10**9) for i, value in enumerate((2e9, 4e9))]
    old_status = _status(now_ns - 3 * DAY_NS)  # a record: kept whatever its age
    with caplog.at_level(logging.INFO, logger="hotlab.controller.sinks.influx"):
        async with running_sink(influx_server.sink_settings(database) | {"raw_days": 2}, tmp_path) as (sink, outbox):
            await outbox.put_many([*too_old, *late, old_status])
            await drained(outbox)
    assert (sink.stats.written, sink.stats.expired, sink.stats.rejected) == (3, 4, 0)
    assert sink.stats.last_error == "" and not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert influx_server.rows('SELECT count("activity_bq") FROM "raw"."reading"', database)[0]["count"] == 2
    assert len(influx_server.rows('SELECT "up" FROM "device_status"', database)) == 1
    [summary] = influx_server.rows('SELECT * FROM "reading_1m"', database)
    assert (summary["time"], summary["good_readings"], summary["activity_bq_mean"]) == (late_minute, 2, 3e9)
    assert "4 older than their retention policy" in sink.stats.detail()


async def test_a_user_who_may_not_provision_is_told_what_an_admin_runs_and_writing_goes_on(
    influx_server: InfluxService, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    database = influx_server.create_database()
    influx_server.query(f'CREATE RETENTION POLICY "raw" ON "{database}" DURATION 30d REPLICATION 1')
    influx_server.query("CREATE USER \"writer\" WITH PASSWORD 'w-secret'")
    influx_server.query(f'GRANT WRITE ON "{database}" TO "writer"')
    settings = {"url": influx_server.url, "username": "writer", "password": "w-secret", "database": database}
    message = _reading("crc-1", 7.4e9, time.time_ns())
    with caplog.at_level(logging.WARNING, logger="hotlab.controller.sinks.influx"):
        async with running_sink(settings, tmp_path) as (sink, outbox):
            await outbox.put(message)
            await drained(outbox)
    [warning] = [r.getMessage() for r in caplog.records if "may not provision" in r.getMessage()]
    assert "requires admin privilege" in warning
    assert f'CREATE CONTINUOUS QUERY "hotlab_reading_1m" ON "{database}"' in warning  # what the admin runs
    assert sink.downsampling is None and sink.stats.written == 1
    assert influx_server.rows('SELECT "msg_id" FROM "raw"."reading"', database)[0]["msg_id"] == message.msg_id


async def test_the_v2_path_sends_readings_to_the_raw_bucket_and_the_rest_to_the_bucket(
    influx_server: InfluxService, tmp_path: Path
) -> None:
    """2.x/3.x (here 1.8's v2 API through the test bridge, bucket "db/rp"): `raw_bucket` takes the readings."""
    database = influx_server.create_database()
    influx_server.query(f'CREATE RETENTION POLICY "raw" ON "{database}" DURATION 30d REPLICATION 1')
    settings = influx_server.v2_settings(database) | {"raw_bucket": f"{database}/raw"}
    now_ns = time.time_ns()
    async with running_sink(settings, tmp_path) as (sink, outbox):
        await outbox.put_many([_reading("crc-1", 7.4e9, now_ns), _status(now_ns)])
        await drained(outbox)
    assert sink.stats.written == 2 and sink.downsampling is None  # a 2.x task downsamples there (docs)
    assert len(influx_server.rows('SELECT "activity_bq" FROM "raw"."reading"', database)) == 1
    assert len(influx_server.rows('SELECT "up" FROM "autogen"."device_status"', database)) == 1


async def _value(result: Awaitable[bool] | bool) -> bool:
    return await result if inspect.isawaitable(result) else result
