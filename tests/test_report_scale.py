"""The report over months of a busy lab: memory that does not grow with the period, every failure and procedure
listed, per-day counts that add up, and the clock of every time named.

The history comes from the benchmark's generator (bench/lab_history.py): one calibrator's daily constancy
procedures (about 2 % warn, 0.5 % fail), weekly linearity, a Ga-68 and a Mo-99 generator, signatures.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import tracemalloc
from collections import Counter
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from hotlab.controller.archive import HistoryArchive, TimeRange
from hotlab.controller.audit import KEY_FILE_ENV, load_hmac_key
from hotlab.controller.report import build_figures, collect, write_html

DAYS = 160
NS_PER_S = 1_000_000_000


def _generator() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "bench" / "lab_history.py"
    spec = importlib.util.spec_from_file_location("lab_history", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lab_history"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    folder = tmp_path_factory.mktemp("busy-lab")
    made = _generator().generate(folder, DAYS, calibrators=1)
    return folder, made


class Rows(HTMLParser):
    """The rows of each section: (class, data-msg-id or None, attributes, cell texts)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.section = ""
        self.rows: dict[str, list[tuple[str, dict[str, str | None], list[str]]]] = {}
        self.headers: dict[str, list[str]] = {}
        self._cell: list[str] | None = None
        self._in_th = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self.section = a.get("id") or ""
        elif tag == "tr" and ("data-msg-id" in a or "data-bucket" in a):
            self.rows.setdefault(self.section, []).append((a.get("class") or "", a, []))
        elif tag == "td" and self.section in self.rows:
            self._cell = []
        elif tag == "th":
            self._in_th = True
            self.headers.setdefault(self.section, []).append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self.section in self.rows:
            self.rows[self.section][-1][2].append("".join(self._cell))
            self._cell = None
        if tag == "th":
            self._in_th = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._in_th:
            self.headers[self.section][-1] += data


def _report(folder: Path, period: TimeRange, out: Path, *, figures: bool = True) -> None:
    key = load_hmac_key({KEY_FILE_ENV: str(folder / "audit.key")})
    with HistoryArchive(folder / "history.sqlite3", read_only=True) as archive:
        data = collect(archive, period, folder / "audit.jsonl", audit_key=key)
    with data, out.open("w", encoding="utf-8") as file:
        write_html(data, file, build_figures(data) if figures else [])


def _parsed(path: Path) -> Rows:
    rows = Rows()
    rows.feed(path.read_text(encoding="utf-8"))
    return rows


def _period(made: Any, days: int) -> TimeRange:
    return TimeRange(made.end_ns - days * 86_400 * NS_PER_S, made.end_ns)


def test_memory_does_not_grow_with_the_period(lab: tuple[Path, Any], tmp_path: Path) -> None:
    """Peak Python memory of a report over 4N days against N days (both long enough to be summarised).

    Loading the period's records, as the report did, costs at least their JSON text per record (a dict
    of a payload is larger than its text): the extra 3N days of QC results, procedures and elutions. The
    report may grow by a small part of that (its per-bucket counts), not by it. Without the figures, which
    read at most MAX_POINTS values or MAX_BUCKETS aggregates each (and take seconds under tracemalloc).
    """
    folder, made = lab
    short, long = _period(made, DAYS // 4), _period(made, DAYS)  # both longer than LIST_ALL_DAYS: one layout
    with HistoryArchive(folder / "history.sqlite3", read_only=True) as archive:
        ((extra_bytes,),) = archive.select(
            "SELECT SUM(LENGTH(payload)) FROM message WHERE kind IN ('qc_result', 'qc_procedure', 'elution') "
            "AND time_ns >= ? AND time_ns < ?",
            [long.start_ns, short.start_ns],
        )
    peaks = []
    for period in (short, long):
        tracemalloc.start()
        _report(folder, period, tmp_path / "report.html")
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    growth = peaks[1] - peaks[0]
    assert extra_bytes > 1_000_000  # the loading report would grow by more than a megabyte
    assert growth < 0.25 * extra_bytes, f"peak {peaks[0]} -> {peaks[1]} bytes for {extra_bytes} bytes more records"


def test_a_long_report_lists_every_failure_and_every_procedure_and_counts_the_rest(
    lab: tuple[Path, Any], tmp_path: Path
) -> None:
    folder, made = lab
    period = _period(made, DAYS)  # longer than a month: passes are counted per week, not listed
    out = tmp_path / "report.html"
    _report(folder, period, out)
    rows = _parsed(out)
    with HistoryArchive(folder / "history.sqlite3", read_only=True) as archive:
        results = archive.query("qc_result", period)
        records = archive.query("qc_procedure", period)
    not_passed = {r["msg_id"] for r in results if r["verdict"] != "pass"}
    assert len(not_passed) >= 3
    assert {a["data-msg-id"] for _, a, _ in rows.rows["deviations"]} == not_passed
    last_of: dict[str, str] = {}
    for record in records:  # oldest first: the end record of a procedure replaces its start
        last_of[record["procedure_id"]] = record["msg_id"]
    listed = [a["data-msg-id"] for _, a, _ in rows.rows["procedures"]]
    assert sorted(listed) == sorted(last_of.values())
    assert "verdicts" not in rows.rows  # passing results are not listed one by one ...
    weekly = rows.rows["counts"]
    assert sum(int(cells[3]) for _, _, cells in weekly) == sum(
        r["verdict"] == "pass" for r in results
    )  # ... but counted


def test_per_day_counts_are_the_results_of_each_day(lab: tuple[Path, Any], tmp_path: Path) -> None:
    folder, made = lab
    period = _period(made, 20)
    out = tmp_path / "report.html"
    _report(folder, period, out)
    with HistoryArchive(folder / "history.sqlite3", read_only=True) as archive:
        results = archive.query("qc_result", period)
    expected = Counter(
        (datetime.fromtimestamp(r["time_ns"] / NS_PER_S, UTC).date().isoformat(), r["device"], r["test"], r["verdict"])
        for r in results
    )
    found: Counter[tuple[str, str, str, str]] = Counter()
    for _, attrs, cells in _parsed(out).rows["counts"]:
        for verdict, cell in zip(("pass", "warn", "fail"), cells[3:6]):
            if int(cell):
                found[(str(attrs["data-bucket"]), str(attrs["data-device"]), str(attrs["data-test"]), verdict)] = int(
                    cell
                )
    assert found == expected
    assert len({day for day, *_ in expected}) == 20


def test_every_time_names_its_clock(lab: tuple[Path, Any], tmp_path: Path) -> None:
    """Elution times and the results judged at an elution's end come from the station's clock; calibrator
    results, procedures, signatures and audited actions from the controller's; the legend says so."""
    folder, made = lab
    out = tmp_path / "report.html"
    _report(folder, _period(made, 7), out)
    rows = _parsed(out)
    text = out.read_text(encoding="utf-8")
    assert re.search(r'<section id="clocks"><h2>Clocks</h2>.*station clock.*controller clock', text) or re.search(
        r'<section id="clocks"><h2>Clocks</h2>.*controller clock.*station clock', text
    )
    assert rows.headers["elutions"][:2] == ["start (UTC, station clock)", "end (UTC, station clock)"]
    assert rows.headers["procedures"][0] == "started (UTC, controller clock)"
    assert "time (UTC, controller clock)" in rows.headers["audit"]
    clock_of = {cells[2].split("/")[-1] + " " + cells[3]: cells[1] for _, _, cells in rows.rows["verdicts"]}
    assert {clock for what, clock in clock_of.items() if " elution_yield" in what} == {"station clock"}
    assert {clock for what, clock in clock_of.items() if what.endswith(" constancy")} == {"controller clock"}
