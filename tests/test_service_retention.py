"""The controller retains its archive as its config says: a `hotlab run` service, not a test driving the sink."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from hotlab.controller.archive import HistoryArchive
from hotlab.controller.config import parse_config
from tests.test_archive_retention import MINUTE_NS, assert_same_summaries, expected_summaries, readings_of, summarised
from tests.test_mqtt_delivery import Lab

DAY_NS = 86_400 * 10**9


async def test_a_running_controller_summarises_readings_past_raw_days_and_records_the_pass(tmp_path: Path) -> None:
    now = time.time_ns()
    old_start = now - 10 * DAY_NS - now % MINUTE_NS  # two hours of readings ten days ago, past a 7-day window
    old = readings_of(["cal-old"], old_start, old_start + 120 * MINUTE_NS, step_s=7)
    recent = readings_of(["cal-old"], now - 3_600 * 10**9, now - 60 * 10**9, step_s=7, seed=2)
    with HistoryArchive(tmp_path / "history.sqlite3") as archive:
        archive.add_many([*old, *recent])
    config = parse_config(
        {
            "site": {"name": "hotlab-a"},
            "device": [
                {"name": "cal-1", "station": "s1", "family": "vik202", "transport": "/dev/null", "poll_interval_s": 0.1}
            ],
            "outbox": {"path": "outbox.sqlite3"},
            "history": {"path": "history.sqlite3", "raw_days": 7},
        },
        base_dir=tmp_path,
    )

    async with Lab(config) as lab:

        def retained() -> bool:
            with HistoryArchive(tmp_path / "history.sqlite3", read_only=True) as archive:
                return archive.count("archive_retention") > 0

        deadline = time.monotonic() + 30
        while not await asyncio.to_thread(retained):
            assert time.monotonic() < deadline, "no retention pass was recorded within 30 s"
            await asyncio.sleep(0.2)
        await lab.shutdown()

    with HistoryArchive(tmp_path / "history.sqlite3", read_only=True) as archive:
        assert_same_summaries(summarised(archive, ["cal-old"]), expected_summaries(old, now))
        kept = {p["msg_id"] for p in archive.query("reading", device="cal-old")}
        (record,) = archive.query("archive_retention")
    assert kept == {m.payload["msg_id"] for m in recent}  # the last hour is inside the window: still raw
    assert record["readings"] == len(old) and record["raw_days"] == 7
