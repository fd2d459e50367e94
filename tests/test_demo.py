"""`hotlab demo`: the whole simulated lab end to end (real simulators, real mosquitto), and its live view.

The two subprocess tests run the real command; the rest check the view and the Mo-99 processor
from fixed messages, so a rendering or physics mistake fails without a lab running.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest
from rich.console import Console

from hotlab.controller.archive import HistoryArchive
from hotlab.controller.audit import iter_records, verify_chain
from hotlab.controller.cli.demo import DEMO_LAB
from hotlab.controller.cli.main import main as hotlab
from hotlab.controller.lab.demo import LabView, ViewInputError, render, snapshot_svg
from hotlab.controller.lab.private_influxd import influxd_binary
from hotlab.controller.lab.simulated_lab import station_mo99_breakthrough
from hotlab.controller.messages import (
    MeasurementValues,
    Message,
    counter_reset_alarm_message,
    device_status_message,
    elution_message,
    elution_msg_id,
    measurement_label_message,
    measurement_message,
    qc_message,
    reading_message,
    suspect_alarm_message,
)
from hotlab.controller.qc.engine import QcEngine
from hotlab.drivers.records import ElutionRecord, Reading
from tests.influx_service import running_influxd
from tests.mosquitto_service import require_mosquitto

REPO = Path(__file__).resolve().parent.parent
SITE = DEMO_LAB.site
T0 = 1_795_000_000_000_000_000


def _hotlab(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """In a process group of its own, so that a failed test can kill the demo's private broker with it."""
    return subprocess.Popen(
        [sys.executable, "-m", "hotlab.controller.cli", *args],
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env={**(os.environ if env is None else env), "COLUMNS": "150"},
    )


@pytest.mark.integration
def test_headless_demo_produces_readings_elutions_verdicts_procedures_and_a_review(tmp_path: Path) -> None:
    require_mosquitto()
    # 200x: the Ga-68 station is eluted every 4.5 s and the Tc-99m station every 6 s of wall time, slow
    # enough for the 1 s station poll to see every elution even on a loaded machine. The QC officer's
    # three procedures take about 7 s each (an empty chamber, then the source in).
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTLAB_AUDIT_KEY")}
    process = _hotlab(
        "demo",
        "--no-web",
        "--headless",
        "--duration",
        "35",
        "--acceleration",
        "200",
        "--state-dir",
        "state",
        cwd=tmp_path,
        env=env,
    )
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert "MQTT broker: private mosquitto on 127.0.0.1:" in stderr  # the embedded defaults are announced
    assert "Traceback" not in stderr
    assert "hotlab demo summary" in stdout and "qc mo99_breakthrough" in stdout, stdout
    # Every sink the demo has got everything: the private influxd (when installed) as much as the broker.
    delivered = {
        m[1]: (int(m[2]), int(m[3])) for m in re.finditer(r"^  (\w+) +(\d+) delivered, (\d+) left", stdout, re.M)
    }
    sinks = {"mqtt", "history"} | ({"influx"} if influxd_binary() is not None else set())
    assert set(delivered) == sinks and all(done > 0 and left == 0 for done, left in delivered.values()), stdout

    with HistoryArchive(tmp_path / "state" / "history.sqlite3", read_only=True) as archive:
        readings = archive.query("reading")
        elutions = archive.query("elution")
        verdicts = archive.query("qc_result")
    assert {r["device"] for r in readings} >= {"hotcell-calibrator", "qc-calibrator"}
    by_generator = {g: [e for e in elutions if e["generator"] == g] for g in ("GE68-DEMO-001", "MO99-DEMO-001")}
    assert all(len(found) >= 2 for found in by_generator.values()), {g: len(e) for g, e in by_generator.items()}
    # Yields come from the simulator's column model and are judged by the QC engine against Bateman:
    # Ga-68 ~78.8 % (80 % fresh, 30 days old), Tc-99m ~93.6 % (94 % fresh, 2 days old).
    for generator, (low, high) in {"GE68-DEMO-001": (75.0, 80.0), "MO99-DEMO-001": (92.0, 94.0)}.items():
        assert all(low <= e["yield_pct"] <= high for e in by_generator[generator]), by_generator[generator]
    tests = {(v["test"], v["device"], v["verdict"]) for v in verdicts}
    assert ("constancy", "qc-calibrator", "pass") in tests
    assert ("elution_yield", "GE68-DEMO-001", "pass") in tests
    assert ("elution_yield", "MO99-DEMO-001", "pass") in tests  # above the 90 % default warn level
    assert ("mo99_breakthrough", "MO99-DEMO-001", "pass") in tests
    assert f"{len(elutions)} elutions" in stdout

    # The simulated operator elutes through the controller's command path: an authorised MQTT command,
    # audited before and after the station acknowledged it over Modbus.
    audit = tmp_path / "state" / "audit.jsonl"
    assert verify_chain(audit).ok
    executed = [r for r in iter_records(audit) if r.action == "elution.start" and r.new_value["outcome"] == "executed"]
    assert len(executed) >= len(elutions)
    assert {(r.actor, r.new_value["authenticated"]) for r in executed} == {("demo-operator", True)}

    # The QC officer's morning: a baseline by command, the daily check recognised from the check source, a
    # Ge-68 follow-up of an elution >= 48 h old, then both checks approved with a password-checked signature.
    with HistoryArchive(tmp_path / "state" / "history.sqlite3", read_only=True) as archive:
        ended = {p["procedure"]: p for p in archive.query("qc_procedure") if p["status"] != "started"}
        follow_up = archive.query("qc_result", test="ge68_breakthrough")
    assert {kind: p["status"] for kind, p in ended.items()} == {
        "baseline": "complete",
        "daily_constancy": "complete",
        "ge68_breakthrough": "complete",
    }, ended
    assert ended["daily_constancy"]["started_by"] is None and ended["daily_constancy"]["verdict"] == "pass"
    assert ended["baseline"]["started_by"] == {"user": "demo-qc-officer", "role": "qc_officer"}
    (breakthrough,) = follow_up
    elution = next(e for e in elutions if e["msg_id"] == breakthrough["inputs"]["elution_id"])
    assert breakthrough["time_ns"] - elution["end_ns"] >= 48 * 3600 * 10**9
    # The station measured the Ge-68 in the eluate at end of elution; 48 h later the chamber reads that Ge-68
    # (half-life 270.95 d) through its Ga-68, so the re-measurement gives back the station's own figure.
    assert breakthrough["measured"] == pytest.approx(elution["breakthrough_pct"], rel=0.02)
    signed = [r for r in iter_records(audit) if r.action == "record.signed"]
    assert [(r.actor, r.new_value["meaning"]) for r in signed] == [("demo-qc-officer", "approved")]
    signed_ids = {e["msg_id"] for e in signed[0].new_value["records"]}  # each procedure with its results
    assert {
        ended["daily_constancy"]["msg_id"],
        ended["ge68_breakthrough"]["msg_id"],
        breakthrough["msg_id"],
    } <= signed_ids
    assert "signed    approved by Demo QC Officer" in stdout
    # ... and the QC officer's report shows the procedures and the signature.
    day = elution["time"][:10]
    report = subprocess.run(
        [sys.executable, "-m", "hotlab.controller.cli", "report", "--from", day, "--to", "2100-01-01",
         "--archive", "state/history.sqlite3", "--audit", "state/audit.jsonl",
         "--audit-key-file", "state/audit.key", "--out", "report.html"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    html = (tmp_path / "report.html").read_text()
    assert f'data-msg-id="{ended["daily_constancy"]["msg_id"]}"' in html
    assert "Demo QC Officer" in html and "approved" in html


@pytest.mark.integration
def test_ctrl_c_stops_the_live_demo_cleanly_and_drains(tmp_path: Path) -> None:
    require_mosquitto()
    snapshot = tmp_path / "view.svg"
    process = _hotlab(
        "demo",
        "--no-web",
        "--acceleration",
        "300",
        "--state-dir",
        "state",
        "--log-level",
        "INFO",
        "--snapshot",
        str(snapshot),
        cwd=tmp_path,
    )
    running = threading.Event()
    stdout_lines: list[str] = []
    stderr_lines: list[str] = []

    def collect(stream: IO[str], lines: list[str]) -> None:
        for line in stream:
            lines.append(line)
            if line.startswith("demo running"):
                running.set()

    assert process.stdout is not None and process.stderr is not None
    readers = [
        threading.Thread(target=collect, args=(process.stdout, stdout_lines), daemon=True),
        threading.Thread(target=collect, args=(process.stderr, stderr_lines), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        assert running.wait(60), "".join(stderr_lines)[-3000:]
        _wait_for_archived_elution(tmp_path / "state" / "history.sqlite3")
        process.send_signal(signal.SIGINT)
        process.wait(60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    for reader in readers:
        reader.join(10)
    stdout, stderr = "".join(stdout_lines), "".join(stderr_lines)
    assert process.returncode == 0, (stdout + stderr)[-3000:]
    # In live mode the log shares the view's console (stdout), so it scrolls above the view.
    assert "stopped; 0 message(s) kept in the outbox" in stdout
    assert "Traceback" not in stdout + stderr
    assert "hotcell-calibrator" in stdout and "Elutions" in stdout  # the live view's last frame
    assert snapshot.read_text().startswith("<svg")


@pytest.mark.integration
def test_a_demo_whose_influxdb_refuses_the_password_says_so_and_exits_1(tmp_path: Path) -> None:
    """Pointed at a real influxd (1.x, written natively) with a wrong password, the demo must not end as if all
    was well: every write is refused and retried, and the summary and the exit code say the sink took nothing."""
    require_mosquitto()
    with running_influxd() as influx:
        database = influx.create_database()
        env = {**os.environ, "LAB_INFLUX_PASSWORD": "not-" + influx.password}
        process = _hotlab(
            "demo", "--no-web", "--headless", "--duration", "3", "--acceleration", "200", "--state-dir", "state",
            "--influx-url", influx.url, "--influx-database", database, "--influx-username", influx.username,
            "--influx-token-env", "LAB_INFLUX_PASSWORD",
            cwd=tmp_path, env=env,
        )  # fmt: skip
        stdout, stderr = process.communicate(timeout=120)
        stored = influx.series("SELECT count(*) FROM /.*/", database)
    assert process.returncode == 1, (stdout + stderr)[-3000:]
    assert "Traceback" not in stderr
    match = re.search(r"^  influx +0 delivered, (\d+) left in the outbox; last error: HTTP 401: (.*)$", stdout, re.M)
    assert match is not None and int(match[1]) > 0, stdout[-3000:]
    assert "WARNING: the influx sink never acknowledged anything" in stdout
    assert re.search(r"^hotlab demo: the influx sink never acknowledged anything \(last error: HTTP 401", stderr, re.M)
    assert re.search(r"^  history +[1-9]\d* delivered, 0 left", stdout, re.M)  # the rest of the demo ran
    assert stored == []  # nothing reached InfluxDB, and nothing was lost: it waits in the outbox


def _wait_for_archived_elution(path: Path, timeout_s: float = 60.0) -> None:
    """Poll the archive (there is no event to await across processes) until the first elution is stored."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file():
            with HistoryArchive(path, read_only=True) as archive:
                if archive.count("elution"):
                    return
        time.sleep(0.2)
    raise AssertionError(f"no elution archived in {path} within {timeout_s:g} s")


def _payload_bytes(message: Message) -> bytes:
    return json.dumps(message.payload).encode()


def _fixed_view() -> LabView:
    view = LabView(SITE, "127.0.0.1:1883", 60.0, connected=True)
    statuses = [
        ("hotcell-calibrator", "hotcell-1", True, 12.0, 0, ""),
        ("qc-calibrator", "qc-lab", True, 8.0, 3, "last error: checksum mismatch"),
        ("ga68-station", "radiochemistry", True, 5.0, 0, ""),
    ]
    for device, station, up, latency, errors, detail in statuses:
        message = device_status_message(
            SITE, station, device, up=up, latency_ms=latency, errors=errors, detail=detail, time_ns=T0
        )
        view.apply(message.topic, _payload_bytes(message))
    reading = reading_message(SITE, "hotcell-1", Reading("hotcell-calibrator", "Tc-99m", 7.4e9, 7.4, "GBq", T0))
    view.apply(reading.topic, _payload_bytes(reading))
    values = MeasurementValues(
        "qc-calibrator", "Cs-137", 7.4e6, 7.4e3, 9, 0.0, T0 - 6 * 10**9, T0 - 3 * 10**9, T0, "removed", ("a" * 32,) * 9
    )
    measurement = measurement_message(SITE, "qc-lab", values)
    view.apply(measurement.topic, _payload_bytes(measurement))
    label = measurement_label_message(
        SITE,
        "qc-lab",
        "qc-calibrator",
        measurement=measurement.payload,
        label="daily check CS-7",
        user="alice",
        request_id="r-1",
        time_ns=T0,
    )
    view.apply(label.topic, _payload_bytes(label))
    record = ElutionRecord(
        "radiochemistry", "GE68-DEMO-001", "Ge-68", "Ga-68", 7, 4.376e8, 5.0, T0, T0 + 28 * 10**9, parent_bq=4.4e2
    )
    elution = elution_message(SITE, record, yield_pct=78.8, msg_id=elution_msg_id(record))
    view.apply(elution.topic, _payload_bytes(elution))
    for device, test, verdict, value in (
        ("qc-calibrator", "constancy", "pass", 0.26),
        ("MO99-DEMO-001", "elution_yield", "warn", 89.4),
        ("GE68-DEMO-001", "ge68_breakthrough", "fail", 0.0021),
    ):
        result = qc_message(
            SITE,
            "lab",
            device,
            test=test,
            verdict=verdict,
            measured=1.0,
            expected=1.0,
            deviation_pct=0.0,
            limit="pass value >= 90 %",
            limit_source="test",
            inputs={},
            time_ns=T0,
        )
        payload = result.payload | {"value_judged": value, "limit_values": {"kind": "floor", "unit": "%"}}
        view.apply(result.topic, json.dumps(payload).encode())
    return view


def test_the_live_view_renders_devices_activities_elutions_and_coloured_verdicts() -> None:
    view = _fixed_view()
    console = Console(record=True, width=150, color_system="truecolor", force_terminal=True)
    console.print(render(view))
    text = console.export_text(clear=False)
    for expected in (
        "hotcell-calibrator",
        "qc-calibrator",
        "ga68-station",
        "online",
        "12 ms",
        "7.4 GBq",
        "Tc-99m",
        "GE68-DEMO-001",
        "437.6 MBq Ga-68",
        "78.8 %",
        "PASS",
        "WARN",
        "FAIL",
        "89.4 %",
        "constancy",
        "Measurements",
        "7.4 MBq",
        "0.10 %",
        "removed",
        "daily check CS-7",
    ):
        assert expected in text, expected
    assert "1 readings · 1 measurements · 1 elutions · QC verdicts: 1 pass, 1 warn, 1 fail" in text
    assert "ge68_breakthrough FAIL" in text  # warn and fail verdicts are also alarms
    ansi = console.export_text(styles=True)
    assert "\x1b[1;32mPASS" in ansi and "\x1b[1;33mWARN" in ansi and "\x1b[1;31mFAIL" in ansi
    assert snapshot_svg(view).startswith("<svg")


def test_suspect_readings_are_shown_marked_and_their_alarm_is_an_alarm() -> None:
    view = _fixed_view()
    flipped = Reading(
        "hotcell-calibrator", "Tc-99m", 7.4e19, 7.4e19, "Bq", T0 + 1, quality="suspect", quality_reason="range"
    )
    message = reading_message(SITE, "hotcell-1", flipped)
    view.apply(message.topic, _payload_bytes(message))
    status = device_status_message(
        SITE,
        "hotcell-1",
        "hotcell-calibrator",
        up=True,
        latency_ms=3.0,
        errors=0,
        suspect_readings=7,
        suspect_fraction=0.2,
    )
    view.apply(status.topic, _payload_bytes(status))
    alarm = suspect_alarm_message(
        SITE,
        "hotcell-1",
        "hotcell-calibrator",
        active=True,
        recent_suspect=10,
        window=50,
        threshold=0.1,
        total=7,
        reason="fell from 7.4 GBq to 740 MBq",
        time_ns=T0,
    )
    view.apply(alarm.topic, _payload_bytes(alarm))
    assert (
        view.alarms[-1].text == "hotcell-calibrator: 10 of the last 50 readings suspect (fell from 7.4 GBq to 740 MBq)"
    )
    assert view.devices["hotcell-calibrator"].suspect == 7
    console = Console(record=True, width=150, force_terminal=True)
    console.print(render(view))
    text = console.export_text()
    assert "7.4e+07 TBq ⚠" in text and "⚠ suspect" in text


def test_offline_devices_raise_an_alarm_but_a_clean_shutdown_does_not() -> None:
    view = _fixed_view()
    before = len(view.alarms)
    stopped = device_status_message(
        SITE, "hotcell-1", "hotcell-calibrator", up=False, latency_ms=None, errors=0, detail="controller stopped"
    )
    view.apply(stopped.topic, _payload_bytes(stopped))
    assert len(view.alarms) == before and not view.devices["hotcell-calibrator"].up
    lost = device_status_message(
        SITE, "qc-lab", "qc-calibrator", up=False, latency_ms=None, errors=4, detail="device timeout"
    )
    view.apply(lost.topic, _payload_bytes(lost))
    assert view.alarms[-1].text == "qc-calibrator offline: device timeout"
    view.apply(
        f"hotlab/{SITE}/controller/status",
        json.dumps({"schema": "hotlab.controller_status/1", "state": "offline", "reason": "shutdown"}),
    )
    assert view.alarms[-1].text == "qc-calibrator offline: device timeout"
    view.apply(
        f"hotlab/{SITE}/controller/status",
        json.dumps(
            {"schema": "hotlab.controller_status/1", "state": "offline", "reason": "connection lost (last will)"}
        ),
    )
    assert view.alarms[-1].text == "controller offline: connection lost (last will)"


def test_a_message_delivered_twice_is_shown_once_and_bad_input_is_a_typed_error() -> None:
    view = _fixed_view()
    reading = reading_message(SITE, "qc-lab", Reading("qc-calibrator", "Cs-137", 7.4e6, 7.4, "MBq", T0))
    view.apply(reading.topic, _payload_bytes(reading))
    view.apply(reading.topic, _payload_bytes(reading))  # at-least-once delivery: a resend
    assert view.counts["reading"] == 2  # the fixed view's one reading plus this one, not three
    with pytest.raises(ViewInputError, match="not JSON"):
        view.apply("hotlab/x/reading", b"\xff garbage")
    bad = reading.payload | {"msg_id": "f" * 32}
    del bad["activity_bq"]
    with pytest.raises(ViewInputError, match="activity_bq"):
        view.apply(reading.topic, json.dumps(bad))


def _tc99m_elution(breakthrough_bq: float) -> Message:
    record = ElutionRecord(
        "hotcell-1", "MO99-DEMO-001", "Mo-99", "Tc-99m", 3, 9.5e9, 10.0, T0, T0 + 25 * 10**9, parent_bq=breakthrough_bq
    )
    return elution_message(SITE, record, msg_id=elution_msg_id(record))


def test_the_station_mo99_measurement_becomes_a_judged_mo99_reading() -> None:
    derive = station_mo99_breakthrough(SITE)
    elution = _tc99m_elution(5.7e4)  # 6e-6 of the Tc-99m: 0.006 kBq/MBq at end of elution
    (reading,) = derive(elution)
    assert reading.kind == "reading" and reading.payload["nuclide"] == "Mo-99"
    assert reading.payload["activity_bq"] == pytest.approx(5.7e4)
    assert reading.payload["extra"]["tc99m_bq"] == pytest.approx(9.5e9)
    assert reading.payload["time_ns"] == elution.payload["end_ns"]
    assert derive(elution)[0].msg_id == reading.msg_id  # a re-delivered elution gives the same reading
    ga68 = elution_message(
        SITE, ElutionRecord("r", "GE68-DEMO-001", "Ge-68", "Ga-68", 1, 4e8, 5.0, T0, T0 + 1, parent_bq=4.0)
    )
    assert derive(ga68) == []

    engine = QcEngine(SITE)
    (verdict,) = engine.process(reading).messages[1:]
    # With no administration time it is judged at the assay: 5.7e4 Bq / 9.5e9 Bq = 0.006 kBq/MBq.
    assert verdict.payload["test"] == "mo99_breakthrough" and verdict.payload["verdict"] == "pass"
    assert verdict.payload["value_judged"] == pytest.approx(0.006)
    # The ratio grows as exp((ln2/T_Tc - ln2/T_Mo) t) (Tc-99m 6.0067 h, Mo-99 65.94 h): it reaches the
    # 0.15 kBq/MBq of 10 CFR 35.204(a) after ln(0.15 / 0.006) / (ln2/6.0067 h - ln2/65.94 h) = 30.7 h.
    growth_per_h = math.log(2) / 6.0067 - math.log(2) / 65.94
    expiry_h = math.log(0.15 / 0.006) / growth_per_h
    reached_h = (verdict.payload["limit_reached_ns"] - reading.payload["time_ns"]) / 3.6e12
    assert reached_h == pytest.approx(expiry_h, rel=2e-3)
    over = derive(_tc99m_elution(9.5e9 * 0.16e-3))[0]  # 0.16 kBq/MBq at the assay: over the limit already
    assert engine.process(over).messages[1].payload["verdict"] == "fail"


@pytest.mark.parametrize(
    "args",
    [
        ["--acceleration", "0"],
        ["--duration", "-1"],
        ["--mqtt-port", "70000"],
        ["--influx-url", "http://127.0.0.1:8086"],
        ["--web-port", "70000"],
        ["--history-days", "3"],
    ],
)
def test_bad_options_exit_2_with_a_message(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HOTLAB_INFLUX_TOKEN", raising=False)
    assert hotlab(["demo", *args]) == 2
    assert "hotlab demo: --" in capsys.readouterr().err


def test_the_influx_token_is_never_an_option_value(capsys: pytest.CaptureFixture[str]) -> None:
    # A token in the arguments is visible in ps, /proc/<pid>/cmdline and shell history.
    with pytest.raises(SystemExit) as exited:
        hotlab(["demo", "--influx-url", "http://127.0.0.1:8086", "--influx-token", "s3cret"])
    assert exited.value.code == 2 and "error: ambiguous option: --influx-token" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, problem",
    [
        (
            ["--influx-token-env", "HOTLAB_TEST_UNSET_TOKEN"],
            "--influx-token-env: environment variable 'HOTLAB_TEST_UNSET_TOKEN' is not set",
        ),
        (["--influx-token-file", "{empty}"], "--influx-token-file: file '{empty}' is empty"),
        (["--influx-token-file", "{missing}"], "--influx-token-file: cannot read '{missing}': No such file"),
    ],
)
def test_influx_token_sources_are_checked_before_anything_starts(
    options: list[str],
    problem: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HOTLAB_TEST_UNSET_TOKEN", raising=False)
    (tmp_path / "empty").write_text("\n")
    paths = {"empty": str(tmp_path / "empty"), "missing": str(tmp_path / "missing")}
    assert (
        hotlab(["demo", "--influx-url", "http://127.0.0.1:8086", *[option.format(**paths) for option in options]]) == 2
    )
    assert f"hotlab demo: {problem.format(**paths)}" in capsys.readouterr().err


def test_influx_token_options_reach_the_config_as_env_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hotlab.controller.cli.demo import _influx_token_source
    from hotlab.controller.cli.main import build_parser
    from hotlab.controller.config import parse_config

    token_file = tmp_path / "influx.token"
    token_file.write_text("hotlab:from-file\n")
    monkeypatch.setenv("HOTLAB_INFLUX_TOKEN", "from-default-env")
    monkeypatch.setenv("LAB_INFLUX_TOKEN", "from-named-env")
    url = ["demo", "--influx-url", "http://127.0.0.1:8086"]
    for options, expected in [
        ([], "from-default-env"),
        (["--influx-token-env", "LAB_INFLUX_TOKEN"], "from-named-env"),
        (["--influx-token-file", str(token_file)], "hotlab:from-file"),
    ]:
        args = build_parser().parse_args([*url, *options])
        table = {"url": args.influx_url, "org": "-", "bucket": "hotlab", **_influx_token_source(args)}
        assert expected not in repr(table)  # only where the secret is, never the secret
        config = parse_config({"site": {"name": "demo"}, "influx": table}, base_dir=tmp_path)
        assert config.influx is not None and config.influx.auth_token() == expected
    with pytest.raises(SystemExit):
        build_parser().parse_args([*url, "--influx-token-env", "X", "--influx-token-file", str(token_file)])


def test_influx_1x_options_make_a_database_table_with_the_users_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hotlab.controller.cli.demo import _influx_table
    from hotlab.controller.cli.main import build_parser
    from hotlab.controller.config import parse_config

    monkeypatch.setenv("LAB_INFLUX_PASSWORD", "pw")
    url = ["demo", "--influx-url", "http://127.0.0.1:8086", "--influx-database", "lab"]
    args = build_parser().parse_args([*url, "--influx-username", "ada", "--influx-token-env", "LAB_INFLUX_PASSWORD"])
    table = _influx_table(args)
    assert table == {
        "url": "http://127.0.0.1:8086",
        "database": "lab",
        "username": "ada",
        "password_env": "LAB_INFLUX_PASSWORD",
    }
    influx = parse_config({"site": {"name": "demo"}, "influx": table}, base_dir=tmp_path).influx
    assert influx is not None and influx.target.database == "lab" and influx.auth_token() == "ada:pw"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--influx-username", "ada"], "--influx-username needs --influx-database (InfluxDB 1.x)"),
        (
            ["--influx-database", "lab", "--influx-bucket", "b"],
            "give either --influx-database (InfluxDB 1.x) or --influx-bucket (2.x/3.x), not both",
        ),
    ],
)
def test_bad_influx_1x_options_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOTLAB_INFLUX_TOKEN", "pw")
    assert hotlab(["demo", "--influx-url", "http://127.0.0.1:8086", *args]) == 2
    assert capsys.readouterr().err == f"hotlab demo: {message}\n"
    monkeypatch.delenv("HOTLAB_INFLUX_TOKEN")
    assert hotlab(["demo", "--influx-database", "lab"]) == 2
    assert "need --influx-url" in capsys.readouterr().err


def test_an_elution_counter_reset_alarm_is_shown_as_an_alarm() -> None:
    """The view took every alarm that was not about suspect readings for an outbox alarm (KeyError 'fraction')."""
    view = _fixed_view()
    record = ElutionRecord(
        "elution-1", "GE68-DEMO-001", "Ge-68", "Ga-68", 1, 5e8, 5.0, T0 - 10**9, T0,
        station_serial="SIM-0001", counter_epoch_ns=T0 - 10**12, counter_reset="counter 7 -> 1",
    )  # fmt: skip
    alarm = counter_reset_alarm_message(SITE, "ga68-generator", record, elution_id=elution_msg_id(record))
    view.apply(alarm.topic, _payload_bytes(alarm))
    assert view.alarms[-1].text == "GE68-DEMO-001: elution counter started again (counter 7 -> 1)"


def test_the_live_view_shows_what_qc_is_due_and_the_procedures_and_alarms_once_when_overdue() -> None:
    from hotlab.controller.messages import qc_procedure_message
    from hotlab.controller.qc.schedule import ItemStatus
    from hotlab.controller.qc.schedule_stage import qc_status_message

    view = LabView(SITE, "127.0.0.1:1883", 60.0, connected=True)

    def status(state: str, time_ns: int) -> None:
        item = ItemStatus(
            "qc-calibrator", "qc-lab", "daily_constancy", "constancy", state, T0, T0 + 8 * 3600 * 10**9,  # type: ignore[arg-type]
            None, None, None, None, f"daily constancy {state}",
        )  # fmt: skip
        message = qc_status_message(SITE, item, time_ns)
        view.apply(message.topic, _payload_bytes(message))

    status("due", T0)
    status("overdue", T0 + 1)
    status("overdue", T0 + 2)  # the same state again (a restart republishes it): no second alarm
    procedure = qc_procedure_message(
        SITE, "qc-lab", "qc-calibrator", procedure_id="b" * 32, procedure="daily_constancy", status="complete",
        started_by=None, started_ns=T0, ended_ns=T0 + 60 * 10**9, source_id="cs137-check", elution_id=None,
        generator=None, reason=None, settings=["Cs-137"], verdict="pass", results=[], measurements=[],
        detail="constancy judged on 1 setting(s): Cs-137",
    )  # fmt: skip
    view.apply(procedure.topic, _payload_bytes(procedure))
    console = Console(record=True, width=150, color_system="truecolor", force_terminal=True)
    console.print(render(view))
    text = console.export_text()
    assert "QC due" in text and "daily_constancy" in text and "OVERDUE" in text
    assert "QC procedures" in text and "recognised" in text and "PASS" in text
    assert [a.text for a in view.alarms] == ["qc-calibrator: QC daily_constancy OVERDUE (daily constancy overdue)"]
