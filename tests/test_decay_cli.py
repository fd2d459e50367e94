"""`hotlab decay`: printed values checked against an independent calculation; bad input exits 2."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hotlab.controller.cli.decay import parse_duration
from hotlab.controller.cli.main import main
from hotlab.physics.nuclides import NUCLIDES

ROOT = Path(__file__).resolve().parents[1]


# Values are printed to 6 significant digits, so a correct one is within 5e-6 relative.
def _number_before(unit: str, line: str) -> float:
    match = re.search(rf"([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?) {re.escape(unit)}(?!\w)", line)
    assert match, f"no value in {unit} in {line!r}"
    return float(match.group(1))


def _line(output: str, label: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(label))


def test_lu177_example_prints_the_decayed_activity_factor_and_uncertainty(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["decay", "Lu-177", "7.4GBq", "--from", "2026-11-20T12:00Z", "--to", "2026-11-24T09:00Z", "--unit", "MBq"]
    )
    out = capsys.readouterr().out
    assert code == 0
    half_life_d = 6.6443  # ENSDF, independent of the library
    factor = 2.0 ** (-(93.0 / 24.0) / half_life_d)
    expected_mbq = 7400.0 * factor
    # sigma(A) = A ln2 dt u(T) / T^2 with u(T) = 0.0009 d
    sigma_mbq = expected_mbq * math.log(2) * (93.0 / 24.0) * 0.0009 / half_life_d**2
    corrected = _line(out, "corrected")
    assert _number_before("MBq", corrected) == pytest.approx(expected_mbq, rel=5e-6)
    assert float(re.search(r"± (\S+) MBq", corrected).group(1)) == pytest.approx(sigma_mbq, rel=0.05)
    assert "2026-11-24T09:00:00Z" in corrected
    assert _number_before("h", _line(out, "elapsed")) == pytest.approx(93.0)
    assert float(_line(out, "decay factor").split()[-1]) == pytest.approx(factor, abs=1e-6)


def test_offsets_and_curie_units_in_and_out(capsys: pytest.CaptureFixture[str]) -> None:
    # 10 mCi of F-18 at 11:00Z (12:00+01:00), corrected back one hour to 10:00Z.
    code = main(
        ["decay", "18F", "10 mCi", "--from", "2026-11-20T12:00+01:00", "--to", "2026-11-20T10:00Z", "--unit", "mCi"]
    )
    out = capsys.readouterr().out
    assert code == 0
    expected = 10.0 * 2.0 ** (60.0 / 109.77)
    assert _number_before("mCi", _line(out, "corrected")) == pytest.approx(expected, rel=5e-6)
    assert "back-correction" in out


def test_generator_reports_the_available_daughter(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "decay",
            "Mo-99",
            "20GBq",
            "--generator",
            "Tc-99m",
            "--since-elution",
            "23h",
            "--to",
            "2026-11-24T07:00Z",
            "--unit",
            "GBq",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    lam_p = math.log(2) / (2.7479 * 86400.0)  # DDEP 2.7479 (6) d
    lam_d = math.log(2) / (6.0067 * 3600.0)
    t = 23 * 3600.0
    # Bateman, parent at 20 GBq at the elution (no --from), no residual.
    expected = 0.8773 * lam_d / (lam_d - lam_p) * 20.0 * (math.exp(-lam_p * t) - math.exp(-lam_d * t))
    assert _number_before("GBq", _line(out, "available")) == pytest.approx(expected, rel=5e-6)
    assert "2026-11-23T08:00:00Z" in _line(out, "last elution")
    fraction = 100.0 * (1.0 - math.exp(-(lam_d - lam_p) * t))
    assert _number_before("%", _line(out, "equilibrium")) == pytest.approx(fraction, abs=0.01)


def test_a_bare_date_means_midnight_utc(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["decay", "F-18", "1GBq", "--from", "2026-11-20", "--to", "2026-11-20T01:49:46.2Z", "--unit", "MBq"])
    out = capsys.readouterr().out
    assert code == 0
    assert "at 2026-11-20T00:00:00Z" in _line(out, "activity")
    # 1 h 49 min 46.2 s = 6586.2 s is one ENSDF half-life of F-18 (109.77 min).
    assert _number_before("MBq", _line(out, "corrected")) == pytest.approx(500.0, rel=5e-6)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["decay", "Lu-178", "1GBq"], "did you mean Lu-177"),
        (["decay", "Lu-177", "1GBx"], "unknown activity unit"),
        (["decay", "Lu-177", "lots"], "cannot read activity"),
        (["decay", "Lu-177", "1GBq", "--unit", "furlong"], "unknown activity unit"),
        (["decay", "Lu-177", "1GBq", "--from", "2026-11-20T12:00"], "no timezone"),
        (["decay", "Lu-177", "1GBq", "--to", "next tuesday"], "cannot read time"),
        (["decay", "Mo-99", "1GBq", "--generator", "Tc-99m"], "needs --since-elution"),
        (["decay", "Mo-99", "1GBq", "--generator", "Tc-99m", "--since-elution", "a while"], "cannot read duration"),
        (["decay", "Ga-68", "1GBq", "--generator", "Ge-68", "--since-elution", "1h"], "not a daughter of Ga-68"),
        (["decay", "Lu-177", "1GBq", "--since-elution", "1h"], "only makes sense with --generator"),
    ],
)
def test_bad_input_exits_2_with_a_message_on_stderr(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""


@pytest.mark.parametrize("argv", [["10 GBq"], ["10", "GBq"], ["10GBq"]])
def test_the_activity_may_have_a_space_before_its_unit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """The error text suggests "200 mCi"; quoted or as two words, that form is read."""
    code = main(["decay", "F-18", *argv, "--from", "2026-11-20T00:00Z", "--to", "2026-11-20T01:49:46.2Z"])
    out = capsys.readouterr().out
    assert code == 0
    assert _number_before("GBq", _line(out, "activity")) == 10.0
    assert _number_before("GBq", _line(out, "corrected")) == pytest.approx(5.0, rel=5e-6)  # one half-life


@pytest.mark.parametrize("activity", ["-5GBq", "-5 GBq", "0 GBq", "-0.5mCi"])
def test_a_negative_or_zero_activity_is_refused_as_not_positive(
    activity: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["decay", "F-18", *activity.split()]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"hotlab decay: error: activity must be positive, got {activity!r}\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["1e400GBq"], "activity '1e400GBq' is too large"),
        # Fits a float, but the decay correction over a day overflows.
        (["1.7e308Bq", "--from", "2026-11-20T00:00Z", "--to", "2026-11-21T00:00Z"], "too large to decay-correct"),
    ],
)
def test_an_activity_out_of_range_is_one_line_on_stderr_and_exit_2(argv: list[str], message: str) -> None:
    """Not `inf TBq ± nan` with exit 0, nor a numpy warning: one line, as a shell user sees it."""
    done = subprocess.run(
        [sys.executable, "-m", "hotlab.controller.cli", "decay", "F-18", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("hotlab decay: error: ")
    assert message in done.stderr


@pytest.mark.parametrize(
    ("text", "seconds"), [("23h", 82800.0), ("90 min", 5400.0), ("1.5d", 129600.0), ("45s", 45.0), ("2M", 120.0)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


def test_installed_command_runs_as_a_process() -> None:
    """The real entry point, in a fresh interpreter: exit codes and streams as a shell sees them."""
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "hotlab.controller.cli",
            "decay",
            "Tc99m",
            "1000MBq",
            "--from",
            "2026-11-20T06:00Z",
            "--to",
            "2026-11-20T12:00:34.824Z",
            "--unit",
            "MBq",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    # 6 h 0 min 24.12 s is one DDEP half-life of Tc-99m (6.0067 h); the extra 10.7 s are 0.05 %.
    expected = 1000.0 * 2.0 ** (-(6 * 3600 + 34.824) / NUCLIDES["Tc-99m"].half_life_s)
    assert _number_before("MBq", _line(ok.stdout, "corrected")) == pytest.approx(expected, rel=5e-6)
    bad = subprocess.run(
        [sys.executable, "-m", "hotlab.controller.cli", "decay", "Zz-1", "1GBq"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "hotlab decay: error" in bad.stderr
