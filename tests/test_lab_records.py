"""`hotlab report` and `hotlab audit verify` find, without being told, what `hotlab run` and
`hotlab demo` wrote in the same folder, and the report never pairs an archive with another lab's
trail; a file that is not an archive and an inverted range are one-line errors with exit 2, and
times in errors are ISO 8601, not raw nanoseconds."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hotlab.controller.archive import HistoryArchive
from hotlab.controller.audit import AuditLog
from hotlab.controller.cli.main import main as hotlab
from tests.cli_process import run_hotlab
from tests.mosquitto_service import require_mosquitto

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
TODAY = datetime.now(UTC).date().isoformat()


@pytest.mark.integration
def test_report_and_audit_find_what_the_demo_wrote(tmp_path: Path) -> None:
    require_mosquitto()
    demo = run_hotlab(
        "demo", "--no-web", "--headless", "--duration", "8", "--acceleration", "200", cwd=tmp_path, timeout_s=120
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    report = run_hotlab("report", "--from", TODAY, "--to", TODAY, "--out", "report.html", cwd=tmp_path, timeout_s=120)
    assert report.returncode == 0, report.stderr
    html = (tmp_path / "report.html").read_text()
    assert "GE68-DEMO-001" in html  # the demo's generator: the report read the demo's archive
    verify = run_hotlab("audit", "verify", cwd=tmp_path, timeout_s=60)
    assert verify.returncode == 0, verify.stderr
    assert "var/demo/audit.jsonl" in verify.stdout + verify.stderr


@pytest.mark.integration
def test_report_finds_what_the_simulated_lab_wrote_and_says_which_lab_when_there_are_two(tmp_path: Path) -> None:
    require_mosquitto()
    # QC judges measurements, not polls: the check source goes into vdc404-sim 3 s after the lab starts
    # and comes out 4 s later (controller/lab/simulated_lab.py), which publishes its measurement.
    run = run_hotlab("run", "--no-web", "--duration", "10", cwd=tmp_path, timeout_s=90)
    assert run.returncode == 0, run.stderr[-3000:]
    report = run_hotlab("report", "--from", TODAY, "--to", TODAY, cwd=tmp_path, timeout_s=120)
    assert report.returncode == 0, report.stderr
    assert "vdc404-sim" in (tmp_path / "report.html").read_text()  # its check-source measurement was judged

    demo_archive = tmp_path / "var" / "demo" / "history.sqlite3"
    demo_archive.parent.mkdir(parents=True)
    demo_archive.write_bytes((tmp_path / "var" / "simulated-lab" / "history.sqlite3").read_bytes())  # newer
    again = run_hotlab("report", "--from", TODAY, "--to", TODAY, cwd=tmp_path, timeout_s=120)
    assert again.returncode == 0, again.stderr
    assert "reading var/demo/history.sqlite3, the demo (`hotlab demo`), the newest of 2 found here" in again.stderr


def test_a_file_that_is_not_an_archive_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_sqlite = tmp_path / "notes.txt"
    not_sqlite.write_text("not a database\n" * 100)
    assert hotlab(["report", "--from", TODAY, "--to", TODAY, "--archive", str(not_sqlite)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{not_sqlite} is not a hotlab history archive" in err


def test_an_inverted_range_names_its_bounds_in_iso_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = tmp_path / "history.sqlite3"
    assert hotlab(["report", "--from", "2026-11-30T12:00Z", "--to", "2026-11-01", "--archive", str(archive)]) == 2
    err = capsys.readouterr().err
    assert "2026-11-30T12:00:00" in err and "2026-11-02T00:00:00" in err  # a bare end date includes that day
    assert not re.search(r"\d{15,}", err), err  # no raw nanoseconds


def test_a_dosage_before_its_assay_names_both_times_in_iso(capsys: pytest.CaptureFixture[str]) -> None:
    code = hotlab(
        ["qc", "dosage", "--nuclide", "F-18", "--measured", "370MBq", "--at", "2026-11-20T12:00Z",
         "--prescribed", "370MBq", "--administration", "2026-11-20T11:00Z"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(ISO.findall(err)) == 2 and not re.search(r"\d{15,}", err), err


def _trail(path: Path, entries: int) -> None:
    log = AuditLog(path)
    for n in range(entries):
        log.append(actor="alice", action="qc.manual_entry", target="cal-1", reason=f"entry {n}")


def test_the_report_pairs_an_archive_only_with_its_own_labs_trail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HOTLAB_AUDIT_LOG", raising=False)
    monkeypatch.delenv("HOTLAB_HISTORY", raising=False)
    HistoryArchive("var/demo/history.sqlite3").close()
    _trail(Path("var/demo/audit.jsonl"), 1)
    _trail(Path("var/simulated-lab/state/audit.jsonl"), 2)  # written last: the newest trail here

    # The demo's archive, named another way: still the demo's trail, not the newest one.
    named_otherwise = str(tmp_path / "var" / "demo" / ".." / "demo" / "history.sqlite3")
    assert hotlab(["report", "--from", TODAY, "--to", TODAY, "--archive", named_otherwise]) == 0
    assert "1 audited action(s)" in capsys.readouterr().out
    assert "var/demo/audit.jsonl" in Path("report.html").read_text()

    # An archive of no known lab (an inspector's copy): no other lab's trail is paired with it.
    copy = tmp_path / "inspection" / "history.sqlite3"
    HistoryArchive(copy).close()
    assert hotlab(["report", "--from", TODAY, "--to", TODAY, "--archive", str(copy)]) == 2
    assert f"no audit trail known for the archive {copy}: give --audit PATH" in capsys.readouterr().err
    assert (
        hotlab(["report", "--from", TODAY, "--to", TODAY, "--archive", str(copy), "--audit", "var/demo/audit.jsonl"])
        == 0
    )
