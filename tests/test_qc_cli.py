"""`hotlab qc ...`: verdict table, --json payloads, site limits, and exit 2 on bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from hotlab.controller.cli.main import main

CONSTANCY = [
    "qc",
    "constancy",
    "--nuclide",
    "Cs-137",
    "--reference",
    "7.4MBq",
    "--reference-date",
    "2016-01-01T00:00:00Z",
    "--at",
    "2026-01-01T00:00:00Z",
]


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> list[dict]:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_constancy_table_shows_verdict_and_source(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*CONSTANCY, "--measured", "6.2MBq"]) == 0
    out = capsys.readouterr().out
    assert "WARN" in out and "+5.500 %" in out and "5.877 MBq" in out
    assert "limit source: AAPM Report 181" in out


def test_constancy_json_mean_of_readings(capsys: pytest.CaptureFixture[str]) -> None:
    [payload] = run_json(capsys, *CONSTANCY, "--measured", "5.8MBq", "5.9MBq", "--device", "calib1")
    assert payload["test"] == "constancy" and payload["verdict"] == "pass"
    assert payload["measured"] == pytest.approx(5.85e6)
    assert payload["device"] == "calib1" and payload["schema"] == "hotlab.qc_result/1"
    assert payload["inputs"]["readings_bq"] == [5.8e6, 5.9e6]


def test_site_limits_from_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "lab.toml"
    config.write_text("[qc.limits.constancy]\nwarn = 1.0\nfail = 1.2\n", encoding="utf-8")
    [payload] = run_json(capsys, *CONSTANCY, "--measured", "5.8MBq", "--config", str(config))
    # -1.31 % is beyond the site's 1.2 % fail level.
    assert payload["verdict"] == "fail"
    assert payload["limit_values"]["fail"] == 1.2


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("qc = 1\n", "qc: must be a table, got 1 (integer)"),
        ("[qc]\nlimits = 'strict'\n", "qc.limits: must be a table, got 'strict' (string)"),
        ("[qc.limits.constancy]\nwarm = 1.0\n", "qc.limits.constancy.warm: unknown key (did you mean 'warn'?)"),
        ("[qc.limits.constency]\nwarn = 1.0\n", "qc.limits.constency: unknown test (did you mean 'constancy'?)"),
        ("[qc.limits\n", "not valid TOML"),
    ],
)
def test_config_errors_name_the_file_and_key_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, message: str
) -> None:
    """Read like every lab config: `qc = 1` was an AttributeError traceback, and no error named the file."""
    config = tmp_path / "lab.toml"
    config.write_text(toml, encoding="utf-8")
    assert main([*CONSTANCY, "--measured", "5.8MBq", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hotlab qc constancy: error: {config}: ") and err.count("\n") == 1, err
    assert message in err


def test_a_config_without_qc_limits_judges_by_the_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "lab.toml"
    config.write_text('[site]\nname = "lab"\n[qc]\nsources = {}\n', encoding="utf-8")  # the engine's keys are its own
    [payload] = run_json(capsys, *CONSTANCY, "--measured", "5.8MBq", "--config", str(config))
    assert payload["limit_values"]["fail"] == 10.0
    assert main([*CONSTANCY, "--measured", "5.8MBq", "--config", str(tmp_path / "missing.toml")]) == 2
    assert f"{tmp_path / 'missing.toml'}: cannot read config file" in capsys.readouterr().err


LINEARITY = [
    "qc",
    "linearity",
    "--nuclide",
    "Tc-99m",
    # One reading per half-life (6.0067 h = 6 h 0 min 24.12 s); the middle one 12 % high.
    "--reading",
    "2026-03-02T00:00:00Z=1000MBq",
    "--reading",
    "2026-03-02T06:00:24.120Z=560MBq",
    "--reading",
    "2026-03-02T12:00:48.240Z=250MBq",
]


def test_linearity_is_judged_against_the_known_half_life(capsys: pytest.CaptureFixture[str]) -> None:
    # Normalised at the last reading, 250 MBq: 500 MBq expected one half-life earlier, 1000 MBq two.
    [payload] = run_json(capsys, *LINEARITY, "--normalise-points", "1")
    assert payload["test"] == "linearity" and payload["verdict"] == "fail"
    assert [p["expected_bq"] for p in payload["inputs"]["points"]] == pytest.approx([1000e6, 500e6, 250e6], rel=1e-9)
    assert [p["deviation_pct"] for p in payload["inputs"]["points"]] == pytest.approx([0.0, 12.0, 0.0], abs=1e-9)
    assert payload["inputs"]["worst_point"] == 2 and payload["deviation_pct"] == pytest.approx(12.0, abs=1e-9)
    assert payload["inputs"]["normalisation"]["points"] == [3]
    assert payload["inputs"]["half_life_fit"]["judged"] is False
    assert main([*LINEARITY, "--normalise-points", "1"]) == 0
    out = capsys.readouterr().out
    for text in ("FAIL", "+12.00 %", "norm.", "worst", "fitted half-life (diagnostic, not judged)"):
        assert text in out, text


def test_linearity_refuses_a_normalisation_that_leaves_nothing_to_judge(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(LINEARITY) == 2  # the default normalisation, 3 readings, is the whole series
    err = capsys.readouterr().err
    assert err.startswith("hotlab qc linearity: error: the normalisation needs between 1 and 2 readings")


def test_elution_mo99_dosage(capsys: pytest.CaptureFixture[str]) -> None:
    [elution] = run_json(
        capsys,
        "qc",
        "elution",
        "--parent",
        "Ge-68",
        "--calibration",
        "1.85GBq",
        "--calibration-date",
        "2026-01-01T00:00:00Z",
        "--eluted",
        "1.2GBq",
        "--at",
        "2026-03-01T00:00:00Z",
    )
    assert elution["value_judged"] == pytest.approx(75.42, abs=0.01)
    [mo] = run_json(capsys, "qc", "mo99", "--mo99", "0 Bq", "--tc99m", "37GBq", "--at", "2026-03-01T06:00:00Z")
    assert mo["measured"] == 0.0 and mo["limit_reached_ns"] is None
    # 0.06 kBq/MBq at the assay: within the limit there (pass), which it reaches after
    # log2(0.15/0.06) / (1/6.0067 h - 1/65.9496 h) = 8.7361 h; administered 12 h later it is
    # 0.06 * 2^(12 h * 0.151318/h) = 0.21123 (fail).
    mo99 = ["qc", "mo99", "--mo99", "2.22MBq", "--tc99m", "37GBq", "--at", "2026-03-01T06:00:00Z"]
    [default] = run_json(capsys, *mo99)
    assert default["verdict"] == "pass" and default["inputs"]["judged_time"] == "2026-03-01T06:00:00.000000Z"
    assert (default["limit_reached_ns"] - default["time_ns"]) / 3.6e12 == pytest.approx(8.7361, abs=1e-4)
    [late] = run_json(capsys, *mo99, "--administration", "2026-03-01T18:00:00Z")
    assert late["verdict"] == "fail" and late["measured"] == pytest.approx(0.21123, abs=1e-5)
    [dose] = run_json(
        capsys,
        "qc",
        "dosage",
        "--nuclide",
        "F-18",
        "--measured",
        "430MBq",
        "--prescribed",
        "370MBq",
        "--at",
        "2026-03-01T08:00:00Z",
        "--administration",
        "2026-03-01T09:00:00Z",
    )
    assert dose["verdict"] == "fail" and dose["alarm"] is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*CONSTANCY, "--measured=-5.8MBq"], "activity must not be negative"),
        (
            [
                "qc",
                "constancy",
                "--nuclide",
                "Cs-137",
                "--reference",
                "7.4MBq",
                "--reference-date",
                "2026-01-01T00:00:00Z",
                "--at",
                "2025-01-01T00:00:00Z",
                "--measured",
                "7MBq",
            ],
            "is before reference date",
        ),
        (
            [
                "qc",
                "dosage",
                "--nuclide",
                "Fl-18",
                "--measured",
                "5MBq",
                "--prescribed",
                "5MBq",
                "--administration",
                "2026-03-01T09:00:00Z",
            ],
            "did you mean F-18",
        ),
        (
            [
                "qc",
                "breakthrough",
                "--eluate",
                "1GBq",
                "--end-of-elution",
                "2026-03-01T10:00:00Z",
                "--remeasured",
                "10Bq",
                "--background",
                "1Bq",
                "1.2Bq",
                "--at",
                "2026-03-02T10:00:00Z",
            ],
            "Ph. Eur. 2464 requires >= 48 h",
        ),
        ([*CONSTANCY, "--measured", "5.8"], "expected a number and a unit"),
        ([*CONSTANCY[:-1], "yesterday", "--measured", "5.8MBq"], "cannot read time 'yesterday'"),
        (
            [
                "qc",
                "elution",
                "--parent",
                "Cs-137",
                "--calibration",
                "1GBq",
                "--calibration-date",
                "2026-01-01T00:00:00Z",
                "--eluted",
                "1GBq",
            ],
            "no elution-yield limit",
        ),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_installed_entry_point_exit_code() -> None:
    # Through a real process, as a technician runs it: bad input is exit 2 with the reason on stderr.
    argv = [sys.executable, "-m", "hotlab.controller.cli", "qc", "mo99", "--mo99=-1MBq", "--tc99m", "37GBq"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2
    assert "hotlab qc mo99: error: --mo99" in done.stderr


def test_linearity_of_a_series_that_does_not_decay_prints_its_verdict_and_no_fit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The text output did arithmetic on a fitted half-life that a non-decaying series does not have."""
    flat = [*LINEARITY[: LINEARITY.index("--reading")]]
    rising = zip(("2026-03-02T00:00:00Z", "2026-03-02T06:00:24.120Z", "2026-03-02T12:00:48.240Z"), (240, 245, 250))
    for when, mbq in rising:  # a chamber reading up while the source decays: no half-life to fit
        flat += ["--reading", f"{when}={mbq}MBq"]
    assert main([*flat, "--normalise-points", "1"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" in out and "fitted half-life (diagnostic, not judged): none" in out


def test_mo99_prints_the_time_the_limit_is_reached_first(capsys: pytest.CaptureFixture[str]) -> None:
    # 0.05 kBq/MBq reaches 0.15 after log2(3) / (1/6.0067 h - 1/65.9496 h) = 10.4744 h = 10 h 28.5 min.
    assert main(["qc", "mo99", "--mo99", "1.85MBq", "--tc99m", "37GBq", "--at", "2026-03-01T06:00:00Z"]) == 0
    first = capsys.readouterr().out.lstrip().splitlines()[0]
    assert first.startswith("mo99_breakthrough: limit 0.15 kBq/MBq reached 2026-03-01T16:28")


def test_profile_flag_and_config_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 0.5 kBq/MBq: fails 10 CFR 35.204 (0.15), passes the Ph. Eur. 0.1 % (1.0 kBq/MBq).
    mo99 = ["qc", "mo99", "--mo99", "18.5MBq", "--tc99m", "37GBq", "--at", "2026-03-01T06:00:00Z"]
    [nrc] = run_json(capsys, *mo99)
    [eur] = run_json(capsys, *mo99, "--profile", "ph-eur")
    assert (nrc["verdict"], eur["verdict"]) == ("fail", "pass") and eur["limit_values"]["fail"] == 1.0
    config = tmp_path / "lab.toml"
    config.write_text('[qc]\nprofile = "ph-eur"\n', encoding="utf-8")
    [from_config] = run_json(capsys, *mo99, "--config", str(config))
    assert from_config["verdict"] == "pass"
    [flag_wins] = run_json(capsys, *mo99, "--config", str(config), "--profile", "us-nrc")
    assert flag_wins["verdict"] == "fail"
    config.write_text('[qc]\nprofile = "eu"\n', encoding="utf-8")
    assert main([*mo99, "--config", str(config)]) == 2
    assert "lab.toml: qc.profile: 'eu' is not allowed; allowed: us-nrc, ph-eur, chp" in capsys.readouterr().err


def test_lu177m_and_strontium_commands(capsys: pytest.CaptureFixture[str]) -> None:
    [lu] = run_json(capsys, "qc", "lu177m", "--lu177m", "1.48MBq", "--lu177", "7.4GBq", "--at", "2026-03-01T08:00:00Z")
    # 1.48 MBq / 7.4 GBq = 0.02 %; reaches 0.05 % after ln(2.5) / (ln2/6.6443 - ln2/160.44) days.
    days = math.log(2.5) / (math.log(2) / 6.6443 - math.log(2) / 160.44)
    assert lu["measured"] == pytest.approx(0.02) and lu["verdict"] == "pass"
    assert (lu["limit_reached_ns"] - lu["time_ns"]) / 86_400e9 == pytest.approx(days, rel=1e-9)
    sr = run_json(
        capsys,
        "qc",
        "sr82",
        "--rb82",
        "1.85GBq",
        "--end-of-elution",
        "2026-03-01T08:00:00Z",
        "--sr82",
        "20kBq",
        "--sr85",
        "150kBq",
        "--at",
        "2026-03-01T09:00:00Z",
    )
    assert [r["test"] for r in sr] == ["sr82_breakthrough", "sr85_breakthrough"]
    assert sr[0]["measured"] == pytest.approx(20 * 2 ** ((1 / 24) / 25.35) / 1850, rel=1e-9)


def test_ga68_half_life_geometry_and_sleeve_commands(capsys: pytest.CaptureFixture[str]) -> None:
    # Halving in 68 min: T = 68 min -> pass (62-74 min).
    [ga] = run_json(
        capsys,
        "qc",
        "ga68-half-life",
        "--first",
        "2026-03-01T08:00:00Z=800MBq",
        "--second",
        "2026-03-01T09:08:00Z=400MBq",
    )
    assert ga["measured"] == pytest.approx(68.0, rel=1e-12) and ga["verdict"] == "pass"
    # The same Tc-99m source 6.0067 h later in a syringe reads 8 % high once decay-corrected back.
    [geo] = run_json(
        capsys,
        "qc",
        "geometry",
        "--nuclide",
        "Tc-99m",
        "--reference",
        "vial-10mL@2026-03-01T08:00:00Z=400MBq",
        "--reading",
        "syringe-3mL@2026-03-01T14:00:24.120Z=216MBq",
    )
    assert geo["deviation_pct"] == pytest.approx(216 * 2 / 400 * 100 - 100, rel=1e-9) and geo["verdict"] == "warn"
    # Sleeve factors 10 and 100; sleeve-corrected readings 1000 and 1030 MBq against the most attenuating sleeve.
    [sleeve] = run_json(
        capsys,
        "qc",
        "sleeve",
        "--nuclide",
        "Tc-99m",
        "--factor",
        "s1=10",
        "--factor",
        "s2=100",
        "--unshielded",
        "2026-03-01T08:00:00Z=1030MBq",
        "--sleeve",
        "s1@2026-03-01T08:00:00Z=101MBq",
        "--sleeve",
        "s2@2026-03-01T08:00:00Z=10MBq",
    )
    assert sleeve["deviation_pct"] == pytest.approx(3.0, rel=1e-9) and sleeve["verdict"] == "pass"
    assert (
        main(
            [
                "qc",
                "sleeve",
                "--nuclide",
                "Tc-99m",
                "--factor",
                "s1=x",
                "--unshielded",
                "2026-03-01T08:00:00Z=1GBq",
                "--sleeve",
                "s1@2026-03-01T08:00:00Z=1MBq",
            ]
        )
        == 2
    )
    assert "expected LABEL=FACTOR" in capsys.readouterr().err
