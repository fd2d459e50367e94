"""A disk that really fills up under the outbox and the history archive, then has room again.

The outbox's own bound (tests/test_mqtt_delivery.py::test_full_outbox_holds_device_data_and_raises_alarm)
normally stops the controller long before the disk is full. This is the case it cannot prevent:
something else fills the disk. The outbox and the archive live on a real, tiny filesystem (a
tmpfs mounted for the test, so the error is the kernel's ENOSPC as SQLite sees it); a filler
file takes the last free byte while a real VIK-202 is read through the real driver. The
controller must hold what it read, say so (in the log, and in the retained outbox alarm on
MQTT, which does not go through the outbox), pause that device, and once the filler is gone
clear the alarm and deliver every reading produced, each once and in order, to MQTT and to
the archive.

Mounting needs root (CI runs as root); elsewhere the test is skipped and says why.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotlab.simulators.faults import FaultInjector
from hotlab.simulators.serial_host import TcpHost
from tests.cli_process import run_hotlab
from tests.mosquitto_service import MosquittoBroker, MqttCollector, mosquitto, require_mosquitto  # noqa: F401
from tests.test_faults_devices import assert_zero_loss, frame_times, lab_config, running_lab, vik202

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DISK_BYTES = 8 * 1024 * 1024


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of DISK_BYTES at tmp_path/disk, unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES},mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the filesystem has no byte left; return it."""
    filler = disk / "filler"
    chunk = b"\0" * 65536
    with filler.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    for size in (4096, 1):  # the last partial chunk
        with filler.open("ab", buffering=0) as out:
            try:
                while True:
                    out.write(b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return filler


def alarms(collector: MqttCollector) -> list[dict[str, Any]]:
    return collector.payloads("/controller/alarm", "controller_alarm")


async def test_disk_full_holds_the_readings_and_delivers_them_all_once_there_is_room(
    tiny_disk: Path, mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    host = TcpHost(vik202(4, FaultInjector(seed=4)))
    url = await host.start()
    config = lab_config(tiny_disk, mosquitto, {"cal-disk": url})  # outbox, archive and state on the tiny disk
    assert config.outbox.path.parent == tiny_disk
    try:
        async with MqttCollector(mosquitto.host, mosquitto.port) as collector:
            async with running_lab(config) as lab:
                await collector.wait_for(lambda: len(frame_times(collector, "cal-disk")) >= 20, what="20 readings")
                filler = await asyncio.to_thread(fill, tiny_disk)
                await collector.wait_for(
                    lambda: "OUTBOX UNAVAILABLE" in caplog.text,
                    timeout=60,
                    what="the controller to report the full disk",
                )
                # The device statuses go through the full outbox too; the retained alarm does not.
                await collector.wait_for(
                    lambda: any(
                        a["commit_failing"] and "disk is full" in a["commit_error"] and a["active"]
                        for a in alarms(collector)
                    ),
                    what="an active outbox alarm naming the full disk",
                )
                # The reading in hand is held and its commit retried, not dropped and not replaced by a new one.
                await collector.wait_for(lambda: "commit attempt 2 failed" in caplog.text, what="a retried commit")
                held_at = lab.produced("cal-disk")
                await collector.wait_for(lambda: "commit attempt 3 failed" in caplog.text, what="another retry")
                # Not read meanwhile, unless a commit got through in between (a disk this full can let one pass).
                assert lab.produced("cal-disk") == held_at or "commit works again" in caplog.text
                filler.unlink()
                await collector.wait_for(
                    lambda: lab.produced("cal-disk") >= held_at + 20,
                    timeout=60,
                    what="readings after the disk has room again",
                )
                await collector.wait_for(lambda: not alarms(collector)[-1]["active"], what="the alarm cleared")
                assert alarms(collector)[-1]["commit_error"] is None
                assert alarms(collector)[-1]["unavailable_events"] >= 1
                await lab.shutdown()
            produced = await assert_zero_loss(lab, collector, "cal-disk")
    finally:
        await host.stop()
    assert len(produced) >= 40
    assert "disk is full" in caplog.text  # SQLite's own words reach the log
    assert "Traceback" not in caplog.text


def hotlab_run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_hotlab("run", "--no-web", "--duration", "3", *args, cwd=cwd, timeout_s=60)


def test_starting_on_a_full_disk_is_one_clear_line(tiny_disk: Path) -> None:
    fill(tiny_disk)
    config = tiny_disk.parent / "lab.toml"
    config.write_text(
        f'[site]\nname = "full"\n[outbox]\npath = "{tiny_disk / "outbox.sqlite3"}"\n'
        '[[device]]\nname = "cal"\nstation = "s1"\nfamily = "vik202"\n'
        'transport = "socket://127.0.0.1:9"\n',
        encoding="utf-8",
    )
    result = hotlab_run(tiny_disk.parent, "--config", str(config))
    assert result.returncode == 1
    assert (
        f"hotlab run: cannot write the outbox lock {tiny_disk / 'outbox.sqlite3.lock'}: No space left on device"
        in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_the_simulated_lab_on_a_full_disk_names_the_file(tiny_disk: Path) -> None:
    require_mosquitto()
    fill(tiny_disk)
    result = hotlab_run(tiny_disk)
    assert result.returncode == 1
    assert "hotlab run: [Errno 28] No space left on device: 'var/simulated-lab/" in result.stderr
    assert "Traceback" not in result.stderr
