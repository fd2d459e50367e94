"""The controller process's collector settings: applied once the service is up, never in other processes."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
from pathlib import Path

from hotlab.controller.gc_policy import SERVICE_THRESHOLDS
from hotlab.controller.service import ControllerService
from tests.test_service_supervisor import ScriptedSource, local_config

REPO = Path(__file__).resolve().parents[1]


def test_settling_freezes_the_survivors_and_raises_the_thresholds() -> None:
    # In a child process: freezing the test runner's objects would keep them from ever being collected.
    script = (
        "import gc\n"
        "from hotlab.controller.gc_policy import SERVICE_THRESHOLDS, settle_after_startup\n"
        "assert gc.get_threshold() == (700, 10, 10) and gc.get_freeze_count() == 0\n"
        "kept = [[i] for i in range(1000)]\n"
        "settle_after_startup()\n"
        "assert gc.get_threshold() == SERVICE_THRESHOLDS, gc.get_threshold()\n"
        "assert gc.get_freeze_count() > len(kept), gc.get_freeze_count()\n"
        "assert len(gc.get_objects()) < gc.get_freeze_count() / 10, len(gc.get_objects())\n"
        "a = []; a.append(a); del a\n"  # cycles are still collected
        "assert gc.collect() >= 1\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=60)


async def test_the_service_calls_on_started_once_its_devices_run(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    service: ControllerService

    def on_started() -> None:
        calls.append((len(service.supervisors), gc.get_freeze_count()))

    service = ControllerService(
        local_config(tmp_path), source_factory=lambda d: ScriptedSource(d.name, []), on_started=on_started
    )
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    for _ in range(200):
        if calls:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 20)
    assert calls == [(len(service.config.devices), 0)]  # once, after the devices; the test process stays unfrozen
    assert gc.get_threshold() != SERVICE_THRESHOLDS
