"""`hotlab run` with no config: the simulated lab works out of the box, with or without Mosquitto."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import controller.embedded_broker
from controller.config import SerialTransport
from controller.run_cli import simulated_lab
from tests.mosquitto_service import require_mosquitto

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent


def test_simulated_lab_runs_every_device_and_drains(tmp_path: Path) -> None:
    require_mosquitto()
    result = subprocess.run([sys.executable, "-m", "controller.cli", "run", "--duration", "4"], check=False, cwd=tmp_path,
                            capture_output=True, text=True, timeout=90, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
    assert re.search(r"MQTT broker: private mosquitto on 127\.0\.0\.1:\d+", log)
    for device in ("vik202-sim", "crc15r-sim", "vdc404-sim", "atomlab500-sim", "ga68-generator-sim"):
        assert f"device {device}: online" in log, log[-3000:]
    assert "stopped; 0 message(s) kept in the outbox" in log
    assert (tmp_path / "var" / "simulated-lab" / "outbox.sqlite3").is_file()
    assert "Traceback" not in log


async def test_without_mosquitto_the_simulated_lab_is_local_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(controller.embedded_broker, "mosquitto_binary", lambda: None)
    async with simulated_lab(tmp_path) as config:
        assert config.mqtt is None
        assert len(config.devices) == 5 and config.outbox.path == tmp_path.resolve() / "outbox.sqlite3"
        schemes = {d.transport.url.partition("://")[0] for d in config.devices
                   if isinstance(d.transport, SerialTransport)}
        assert {"socket", "rfc2217"} <= schemes and any(s.startswith("/") for s in schemes)  # and a tty
    assert "LOCAL-ONLY mode" in capsys.readouterr().err
