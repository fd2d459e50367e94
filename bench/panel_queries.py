"""The archive reads of each web panel page, over three years of a busy lab against one month of it, p50/p99.

Each page's reads are the functions the page calls on its worker thread, with the archive the
page opens: the QC page (`read_qc_page`: schedule, one page of results, filters, charts), the review
page's archive part (`awaiting_review` and the signatures shown, `read_review`), and the device pages'
`overview.archived` reads (a calibrator's day of procedures, measurements and results, a station's
14 days of elutions and yields). The audit page reads the trail, not the archive, and is not measured.
The baseline is the same reads over one month of the same lab, generated in the same run
(bench/lab_history.py): a page whose cost does not grow with the archive has a ratio near 1.

    .venv/bin/python bench/panel_queries.py            # 1095 and 30 days, 30 visits per page
    .venv/bin/python bench/panel_queries.py --days 365 --visits 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lab_history import CALIBRATOR_STATION, DAY_NS, DEFAULT_END_NS, GA_STATION, SETTINGS, SITE, generate

from hotlab.controller.archive import TimeRange
from hotlab.controller.config import LabConfig, parse_config
from hotlab.controller.messages import iso_utc
from hotlab.controller.web.overview import archived
from hotlab.controller.web.records_qc import ResultFilter, read_qc_page
from hotlab.controller.web.records_query import Period
from hotlab.controller.web.records_review import ReviewFilter, read_review

TARGET_P99_MS = 200.0
#: The time of the visits: an hour after the generated history ends.
NOW_NS = DEFAULT_END_NS + 3_600_000_000_000


def lab_config(folder: Path, calibrators: int) -> LabConfig:
    devices = [
        {"name": f"crc-{i + 1}", "station": CALIBRATOR_STATION, "family": "vik202", "transport": "/dev/null"}
        for i in range(calibrators)
    ]
    qc = {
        "sources": {
            "cs137-check": {"nuclide": "Cs-137", "activity": "7.4 MBq", "reference_time": "2021-12-01T00:00:00Z"}
        },
        "devices": {d["name"]: {"check_source": "cs137-check", "settings": list(SETTINGS[1:])} for d in devices},
        "generators": {
            f"GE68-{year}": {"parent": "Ge-68", "activity": "1.85 GBq", "calibration_time": f"{year}-01-01T00:00:00Z"}
            for year in range(2020, 2027)
        },
        "schedule": {"timezone": "UTC"},
    }
    data = {"site": {"name": SITE}, "history": {"path": str(folder / "history.sqlite3")}, "device": devices, "qc": qc}
    return parse_config(data)


def pages(folder: Path, config: LabConfig) -> dict[str, Callable[[], Any]]:
    archive = folder / "history.sqlite3"
    month = TimeRange(NOW_NS - 30 * DAY_NS, NOW_NS)
    wanted = ResultFilter(None, None, None, Period(month, iso_utc(month.start_ns)[:10], ""))
    day_ago, fortnight_ago = NOW_NS - DAY_NS, NOW_NS - 14 * DAY_NS
    year = iso_utc(NOW_NS)[:4]

    def calibrator() -> None:
        for kind in ("qc_procedure", "measurement", "measurement_label", "qc_result"):
            archived(archive, kind, day_ago, device="crc-1")

    def station() -> None:
        archived(archive, "elution", fortnight_ago, station=GA_STATION)
        archived(archive, "qc_result", fortnight_ago, device=f"GE68-{year}", test="elution_yield")

    return {
        "qc": lambda: read_qc_page(config, archive, wanted, None, NOW_NS),
        "review": lambda: read_review(
            archive,
            folder / "audit.jsonl",
            None,
            ReviewFilter(None, None, None),
            awaiting_page=0,
            signed_page=0,
            just_signed=None,
        ),
        "calibrator": calibrator,
        "station": station,
    }


def measure(page: Callable[[], Any], visits: int) -> tuple[float, float]:
    page()  # the first visit warms SQLite's page cache, as a running panel's would be
    times = []
    for _ in range(visits):
        began = time.perf_counter()
        page()
        times.append((time.perf_counter() - began) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=1095)
    parser.add_argument("--baseline-days", type=int, default=30)
    parser.add_argument("--visits", type=int, default=30)
    parser.add_argument("--calibrators", type=int, default=4)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hotlab-panel-bench-") as tmp:
        results = {}
        for days in (args.baseline_days, args.days):
            folder = Path(tmp) / f"{days}d"
            made = generate(folder, days, calibrators=args.calibrators)
            print(f"{days} days: {sum(made.kinds.values())} messages, generated in {made.seconds:.1f} s")
            config = lab_config(folder, args.calibrators)
            results[days] = {name: measure(page, args.visits) for name, page in pages(folder, config).items()}
    print(f"\n{'page':<12}{'p50 ' + str(args.baseline_days) + ' d':>14}{'p50 ' + str(args.days) + ' d':>14}"
          f"{'p99 ' + str(args.days) + ' d':>14}{'ratio p50':>11}  target p99 <= {TARGET_P99_MS:.0f} ms")  # fmt: skip
    ok = True
    for name, (p50, p99) in results[args.days].items():
        base = results[args.baseline_days][name][0]
        ok = ok and p99 <= TARGET_P99_MS
        print(
            f"{name:<12}{base:>11.1f} ms{p50:>11.1f} ms{p99:>11.1f} ms{p50 / base:>10.2f}x  {'ok' if p99 <= TARGET_P99_MS else 'OVER'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
