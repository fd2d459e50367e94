"""`hotlab run` with no config: the simulated lab works out of the box, with or without Mosquitto and influxd."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hotlab.controller.lab.embedded_broker
import hotlab.controller.lab.private_influxd
from hotlab.controller.archive import HistoryArchive
from hotlab.controller.cli.run import simulated_lab
from hotlab.controller.config import SerialTransport
from hotlab.controller.lab.private_influxd import influxd_binary
from tests.cli_process import run_hotlab
from tests.mosquitto_service import require_mosquitto

pytestmark = pytest.mark.integration


def test_simulated_lab_runs_every_device_and_drains(tmp_path: Path) -> None:
    require_mosquitto()
    result = run_hotlab("run", "--duration", "4", cwd=tmp_path, timeout_s=90)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
    assert re.search(r"MQTT broker: private mosquitto on 127\.0\.0\.1:\d+", log)
    for device in ("vik202-sim", "crc15r-sim", "vdc404-sim", "atomlab500-sim", "ga68-generator-sim"):
        assert f"device {device}: online" in log, log[-3000:]
    assert "stopped; 0 message(s) kept in the outbox" in log
    assert (tmp_path / "var" / "simulated-lab" / "outbox.sqlite3").is_file()
    assert "Traceback" not in log
    # Its station's clock runs fast on purpose: the offset is published, but no clock alarm is raised.
    with HistoryArchive(tmp_path / "var" / "simulated-lab" / "history.sqlite3", read_only=True) as archive:
        statuses = archive.query("device_status", device="ga68-generator-sim")
        alarms = [a for a in archive.query("controller_alarm") if a["alarm"] == "clock_offset" and a["active"]]
    assert any(s.get("clock_offset_s") is not None for s in statuses) and alarms == []
    if influxd_binary() is not None:
        assert re.search(r"InfluxDB: +private influxd on http://127\.0\.0\.1:\d+, database hotlab", log)
        # The summary: each sink delivered every message (the same count), nothing left, no warning.
        counts = {
            m[1]: (int(m[2]), int(m[3])) for m in re.finditer(r"^  (\w+) +(\d+) delivered, (\d+) left", log, re.M)
        }
        assert set(counts) == {"mqtt", "influx", "history"} and len(set(counts.values())) == 1, log[-2000:]
        assert counts["influx"][0] > 0 and counts["influx"][1] == 0
        assert "WARNING: the" not in log


def test_ctrl_c_in_a_terminal_drains_before_the_private_broker_stops(tmp_path: Path) -> None:
    """A terminal's Ctrl-C signals the whole foreground process group, the private broker included.

    The broker must still be there while the controller drains, and be gone once it has stopped.
    """
    require_mosquitto()
    log_path = tmp_path / "run.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "hotlab.controller.cli", "run"],
            cwd=tmp_path,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while not all(f"device {d}: online" in log_path.read_text() for d in ("vik202-sim", "vdc404-sim")):
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(1.0)  # readings flowing
        influxd_port = _readings_answer_the_printed_query(log_path)
        os.killpg(process.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    log = log_path.read_text()
    assert "stopped; 0 message(s) kept in the outbox" in log, log[-3000:]
    assert "unavailable" not in log, log[-3000:]
    port_match = re.search(r"MQTT broker: private mosquitto on 127\.0\.0\.1:(\d+)", log)
    assert port_match is not None
    with pytest.raises(ConnectionRefusedError):  # the controller stopped its broker on the way out
        socket.create_connection(("127.0.0.1", int(port_match[1])), timeout=5).close()
    if influxd_port is not None:
        with pytest.raises(ConnectionRefusedError):  # ... and its influxd, after draining into it
            socket.create_connection(("127.0.0.1", influxd_port), timeout=5).close()
        assert re.search(r"^  influx +[1-9]\d* delivered, 0 left in the outbox$", log, re.M), log[-3000:]


def _readings_answer_the_printed_query(log_path: Path) -> int | None:
    """Run the `query it:` command the lab printed until the private influxd reports readings; its port."""
    if influxd_binary() is None or shutil.which("curl") is None:
        return None
    match = re.search(r"query it: +(curl .*)$", log_path.read_text(), re.M)
    assert match is not None, log_path.read_text()[-3000:]
    deadline = time.monotonic() + 30
    while True:
        answer = subprocess.run(["bash", "-c", match[1]], capture_output=True, text=True, timeout=30).stdout
        series = json.loads(answer)["results"][0].get("series", [])
        if series:
            break
        assert time.monotonic() < deadline, answer
        time.sleep(0.5)
    assert {serie["name"] for serie in series} == {"reading"} and all(serie["values"][0][1] > 0 for serie in series)
    port = re.search(r"http://127\.0\.0\.1:(\d+)/query", match[1])
    assert port is not None
    return int(port[1])


async def test_without_mosquitto_the_simulated_lab_is_local_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(hotlab.controller.lab.embedded_broker, "mosquitto_binary", lambda: None)
    async with simulated_lab(tmp_path) as config:
        assert config.mqtt is None
        assert len(config.devices) == 5 and config.outbox.path == tmp_path.resolve() / "outbox.sqlite3"
        schemes = {
            d.transport.url.partition("://")[0] for d in config.devices if isinstance(d.transport, SerialTransport)
        }
        assert {"socket", "rfc2217"} <= schemes and any(s.startswith("/") for s in schemes)  # and a tty
    assert "LOCAL-ONLY mode" in capsys.readouterr().err


async def test_without_influxd_the_simulated_lab_says_it_runs_without_influxdb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(hotlab.controller.lab.embedded_broker, "mosquitto_binary", lambda: None)
    monkeypatch.setattr(hotlab.controller.lab.private_influxd, "influxd_binary", lambda: None)
    async with simulated_lab(tmp_path, private_influxd=True) as config:
        assert config.influx is None
    err = capsys.readouterr().err
    assert (
        "InfluxDB:    none (the influxd binary is not installed (apt install influxdb)) - running without InfluxDB"
        in err
    )
