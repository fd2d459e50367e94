"""Benchmark: history archive bytes per device-day at 1 Hz, before and after the raw window, and retention's cost.

    .venv/bin/python bench/archive_size.py [--days 1] [--seed 1]

One dose calibrator polled at 1 Hz for `--days` days, and one elution station beside it, archived as the
history sink archives (`HistoryArchive.add_many`, batches of 500). Then one retention pass with the
cutoff after the last day (controller/archive_retention.py `retain`: chunks of a device-hour or 2000
readings, freed pages given back). Printed: bytes per device-day before and after the window, the projection per device-year after it
(target <= 100 MB), where the bytes are (SQLite's dbstat), and the time the pass takes per device-day.
Baseline in the same run: the time to archive that day, so the ratio retention/archiving is what to compare
between machines.

The day is built here, not by `hotlab demo --history-days` (controller/lab/history_fill.py): that fill
polls the calibrator only around its planned measurements (EMPTY_S and LOADED_S of each), not all day.
The messages are the controller's own builders with the payloads the demo's calibrators produce (VIK-202
frames with their calibration factor; the QC calibrator's `qc_state`). A calibrator's day: a reading every
second, the chamber mostly empty (background of a few kBq), a source in it 40 times for 3 minutes, one
reading in 500 suspect, a status every 60 s (`status_interval_s` default), one measurement per source,
constancy at 07:00 with its procedure and qc_status changes, two audit anchors. A station's day: a status
every 60 s and at each state change, six elutions.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from hotlab.controller.archive import HistoryArchive
from hotlab.controller.archive_retention import DAY_NS, retain
from hotlab.controller.messages import (
    MeasurementValues,
    Message,
    audit_anchor_message,
    device_status_message,
    elution_message,
    measurement_message,
    qc_procedure_message,
    reading_message,
)
from hotlab.controller.qc.limits import DEFAULT_LIMITS
from hotlab.controller.qc.result import QcResult
from hotlab.controller.qc.schedule import ItemStatus
from hotlab.controller.qc.schedule_stage import qc_status_message
from hotlab.drivers.records import ElutionRecord, Reading

S = 1_000_000_000
SITE = "hotlab-demo"
START_NS = 1_793_491_200_000_000_000  # 2026-11-01T00:00:00Z
BATCH = 500
TARGET_BYTES_PER_YEAR = 100e6


def calibrator_day(day: int, rng: random.Random) -> Iterator[Message]:
    """One dose calibrator's messages of one day at 1 Hz, in time order."""
    device, station = "hotcell-calibrator", "hotcell-1"
    day_ns = START_NS + day * DAY_NS
    loads = sorted(rng.sample(range(6 * 3600, 20 * 3600, 60), 40))  # 40 sources between 06:00 and 20:00
    loaded: dict[int, float] = {}
    for start in loads:
        activity = 10 ** rng.uniform(7, 10)
        for second in range(start, start + 180):
            loaded[second] = activity
    ids: list[str] = []
    suspect_total = 0
    for second in range(86_400):
        t = day_ns + second * S
        bq = loaded.get(second, 0.0) * rng.gauss(1, 0.002) + rng.gauss(3e3, 5e2)
        suspect = rng.random() < 1 / 500
        suspect_total += suspect
        reading = Reading(
            device, "Tc-99m", 7.4e19 if suspect else bq, 7.4e19 if suspect else bq, "Bq", t,
            f">{7.4e19 if suspect else bq:.4E}\r\n".encode(), {"calibration_factor": 236.0},
            quality="suspect" if suspect else "good", quality_reason="outside the range" if suspect else None,
        )  # fmt: skip
        message = reading_message(SITE, station, reading)
        message.payload["qc_state"] = "done"
        yield message
        if second in loaded:
            ids.append(message.msg_id)
        elif ids:  # the source came out: its measurement
            yield measurement_message(
                SITE, station,
                MeasurementValues(device, "Tc-99m", loaded[second - 1], loaded[second - 1] * 0.002, len(ids), 3e3,
                                  t - 180 * S, t - 170 * S, t, "removed", tuple(ids[:10] + ids[-10:])),
            )  # fmt: skip
            ids = []
        if second % 60 == 0:
            yield device_status_message(
                SITE, station, device, up=True, latency_ms=rng.uniform(20, 40), errors=0, detail="ok", time_ns=t,
                suspect_readings=suspect_total, suspect_fraction=rng.choice([0.0, 0.0, 0.02]),
            )  # fmt: skip
        if second == 7 * 3600:
            yield from _daily_constancy(device, station, t)


def _daily_constancy(device: str, station: str, t: int) -> list[Message]:
    result = QcResult(
        test="constancy", verdict="pass", measured=7.1e6, expected=7.0e6, deviation_pct=1.4, unit="Bq",
        limit=DEFAULT_LIMITS["constancy"], value_judged=1.4, time_ns=t, inputs={"source": "CS-137-A"},
    ).to_message(SITE, station, device)  # fmt: skip
    procedure = qc_procedure_message(
        SITE, station, device, procedure_id="a" * 32, procedure="daily_constancy", status="complete",
        started_by={"user": "demo-qc-officer", "role": "qc_officer"}, started_ns=t - 300 * S, ended_ns=t,
        source_id="CS-137-A", elution_id=None, generator=None, reason=None, settings=["Cs-137"], verdict="pass",
        results=[result.msg_id], measurements=["b" * 32], detail="constancy judged on 1 setting(s)",
    )  # fmt: skip
    statuses = [
        qc_status_message(
            SITE,
            ItemStatus(
                device, station, item, test, state, t, t + 3600 * S, t, "pass", result.msg_id, None, "done today"
            ),
            t,
        )  # fmt: skip
        for item, test, state in (("daily_constancy", "constancy", "done"), ("background", "background", "done"))
    ]
    anchors = [
        audit_anchor_message(
            SITE, trail="/var/lib/hotlab/audit.jsonl", trail_id="c" * 64, seq=seq, hash_hex="d" * 64, time_ns=t
        )  # fmt: skip
        for seq in (1, 2)
    ]
    return [result, procedure, *statuses, *anchors]


def station_day(day: int, rng: random.Random) -> Iterator[Message]:
    """One elution station's messages of one day polled at 1 Hz: statuses (it has no readings) and elutions."""
    device, station = "ga68-station", "radiochemistry"
    day_ns = START_NS + day * DAY_NS
    elutions = {7 * 3600 + 2 * 3600 * k: k for k in range(6)}
    state = "idle"
    for second in range(86_400):
        t = day_ns + second * S
        changed = False
        for start, k in elutions.items():
            new = {0: "priming", 20: "eluting", 140: "done", 200: "idle"}.get(second - start)
            if new is not None:
                state, changed = new, True
                if new == "done":
                    record = ElutionRecord(station, "GE68-DEMO-001", "Ge-68", "Ga-68", day * 6 + k + 1,
                                           1.1e9 * rng.uniform(0.9, 1.0), 5.0, t - 140 * S, t)  # fmt: skip
                    yield elution_message(SITE, record, yield_pct=rng.uniform(60, 70))
        if changed or second % 60 == 0:
            yield device_status_message(
                SITE, station, device, up=True, latency_ms=rng.uniform(2, 8), errors=0, detail="ok", time_ns=t,
                station_state=state, fault_code=None,
            )  # fmt: skip


def archive_days(archive: HistoryArchive, days: int, seed: int, device: str) -> float:
    """Archive `days` device-days in batches as the sink does; the seconds it took."""
    rng = random.Random(seed)
    spent = 0.0
    for day in range(days):
        messages = list(calibrator_day(day, rng) if device == "calibrator" else station_day(day, rng))
        started = time.perf_counter()
        for first in range(0, len(messages), BATCH):
            archive.add_many(messages[first : first + BATCH])
        spent += time.perf_counter() - started
    return spent


def table_bytes(archive: HistoryArchive) -> dict[str, int]:
    """Bytes per table and index, those of more than one page."""
    rows = archive.select(
        "SELECT name, SUM(pgsize) FROM dbstat GROUP BY name HAVING SUM(pgsize) > (SELECT page_size FROM pragma_page_size) "
        "ORDER BY 2 DESC"
    )
    return {str(name): int(size) for name, size in rows}


def measure(device: str, days: int, seed: int, workdir: Path) -> dict[str, float]:
    with HistoryArchive(workdir / f"{device}.sqlite3") as archive:
        empty = archive.size_bytes()
        archive_s = archive_days(archive, days, seed, device)
        before = archive.size_bytes() - empty
        messages = archive.count()
        started = time.perf_counter()
        done = retain(archive, START_NS + days * DAY_NS, archived_before_ns=time.time_ns())
        retention_s = time.perf_counter() - started
        after = archive.size_bytes() - empty
        tables = table_bytes(archive)
        kept = archive.count()
    per_day_before, per_day_after = before / days, after / days
    print(f"{device}, {days} day(s) at 1 Hz: {messages:,} messages archived in {archive_s:.2f} s")
    print(
        f"  before the window ends: {per_day_before / 1e6:.2f} MB per device-day ({per_day_before * 365 / 1e9:.0f} GB a year)"
    )
    print(
        f"  after retention: {per_day_after / 1e3:.0f} kB per device-day, {kept:,} rows kept "
        f"({done.readings:,} readings -> {done.minutes:,} minute rows, {done.statuses:,} statuses dropped); "
        f"after/before {per_day_after / per_day_before:.4f}"
    )
    print(
        "  where the bytes are after it: "
        + ", ".join(f"{name} {size / 1e3:.0f} kB" for name, size in tables.items() if size > 4096)
    )
    per_year = per_day_after * 365
    print(
        f"  projected per device-year after the window: {per_year / 1e6:.1f} MB "
        f"(target <= {TARGET_BYTES_PER_YEAR / 1e6:.0f} MB: {'met' if per_year <= TARGET_BYTES_PER_YEAR else 'MISSED'})"
    )
    print(
        f"  retention pass: {retention_s / days:.2f} s per device-day in {done.chunks / days:.0f} chunks "
        f"({retention_s / done.chunks * 1e3 if done.chunks else 0:.1f} ms per chunk); "
        f"baseline, archiving that day: {archive_s / days:.2f} s; retention/archiving {retention_s / archive_s:.2f}"
    )
    return {"per_year": per_year}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=1, help="device-days to archive (default 1)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.days < 1:
        parser.error("--days must be at least 1")
    with tempfile.TemporaryDirectory(prefix="hotlab-archive-size-") as workdir:
        results = [measure(device, args.days, args.seed, Path(workdir)) for device in ("calibrator", "station")]
    return 0 if all(r["per_year"] <= TARGET_BYTES_PER_YEAR for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
