"""`hotlab report` over one month and over three years of a busy lab's history: wall time and peak RSS.

The history is made by bench/lab_history.py (four calibrators, two generators, signatures; no raw
readings, which the report does not read). Each report runs the real command in its own process
(`python -m hotlab.controller.cli report …`), so its peak RSS (`ru_maxrss` of that child, from `os.wait4`)
is the report's own. The baseline is the same command over the last month of the same archive, in the same
run: memory that does not grow with the period gives a three-year peak near the month's.

    .venv/bin/python bench/report_scale.py            # HTML, then HTML + PDF
    .venv/bin/python bench/report_scale.py --days 365
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lab_history import DAY_NS, generate

from hotlab.controller.messages import iso_utc

TARGET_S = 10.0


def run_report(folder: Path, start_ns: int, end_ns: int, *, pdf: bool) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, the command's last line) of one `hotlab report` in a child process."""
    out = folder / f"report-{start_ns}-{'pdf' if pdf else 'html'}.html"
    command = [sys.executable, "-m", "hotlab.controller.cli", "report", "--from", iso_utc(start_ns)[:10]]
    command += ["--to", iso_utc(end_ns - 1)[:10], "--archive", str(folder / "history.sqlite3")]
    command += ["--audit", str(folder / "audit.jsonl"), "--out", str(out)] + (["--pdf"] if pdf else [])
    environment = os.environ | {"HOTLAB_AUDIT_KEY_FILE": str(folder / "audit.key")}
    began = time.perf_counter()
    child = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = child.stdout.read(), child.stderr.read()  # type: ignore[union-attr]
    _pid, status, usage = os.wait4(child.pid, 0)  # this child's own rusage: its peak RSS alone
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - began
    peak_kib = usage.ru_maxrss
    if child.returncode != 0:
        raise SystemExit(f"hotlab report failed ({child.returncode}): {stderr.strip()}")
    done = stdout
    return seconds, peak_kib / 1024, done.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=1095)
    parser.add_argument("--calibrators", type=int, default=4)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hotlab-report-bench-") as tmp:
        folder = Path(tmp)
        made = generate(folder, args.days, calibrators=args.calibrators)
        size = (folder / "history.sqlite3").stat().st_size / 2**20
        print(
            f"{args.days} days generated in {made.seconds:.1f} s: {sum(made.kinds.values())} messages "
            f"({made.kinds.get('qc_result', 0)} QC results), archive {size:.0f} MiB, {made.audit_records} audit records"
        )
        periods = (("1 month", made.end_ns - 30 * DAY_NS), (f"{args.days} days", made.start_ns))
        rows = []
        for pdf in (False, True):
            for name, start_ns in periods:
                seconds, peak, said = run_report(folder, start_ns, made.end_ns, pdf=pdf)
                rows.append((name, "HTML + PDF" if pdf else "HTML", seconds, peak, said))
    print(f"\n{'period':<12}{'output':<12}{'wall':>9}{'peak RSS':>11}  (target: {TARGET_S:.0f} s over three years)")
    for name, output, seconds, peak, said in rows:
        print(f"{name:<12}{output:<12}{seconds:>8.1f}s{peak:>8.0f} MiB  {said}")
    month, years = rows[0], rows[1]
    print(f"\nthree years / one month, HTML: time {years[2] / month[2]:.1f}x, peak RSS {years[3] / month[3]:.2f}x")
    return 0 if years[2] <= TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
