"""Ctrl-C interrupts a start that hangs, and stops a running service gracefully (controller/stop_signals.py).

Each case runs in a child process, so that the signal reaches a real event loop's handler and
a broken handler cannot interrupt the test run itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

HUNG_START = """
import asyncio
from controller.stop_signals import StopSignals

async def main():
    signals = StopSignals()
    with signals.interruptible_start():
        print("starting", flush=True)
        try:
            await asyncio.Event().wait()  # a start that never finishes
        finally:
            print("cleaning up", flush=True)
    await asyncio.sleep(0.01)  # the task is not left cancelled
    print("ended quietly, stop", signals.stop.is_set(), flush=True)

asyncio.run(main())
"""

RUNNING = """
import asyncio
from controller.stop_signals import StopSignals

async def main():
    signals = StopSignals()
    signals.running()
    print("starting", flush=True)
    await signals.stop.wait()
    print("stopped gracefully, interrupted start:", signals.interrupted_start, flush=True)

asyncio.run(main())
"""


def signalled(script: str, signum: int) -> tuple[int, str]:
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "starting"
        process.send_signal(signum)
        out, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_interrupts_a_start_that_hangs(signum: int) -> None:
    returncode, out = signalled(HUNG_START, signum)
    assert returncode == 0
    assert out.splitlines() == ["cleaning up", "ended quietly, stop True"]


def test_a_signal_only_sets_stop_once_running() -> None:
    returncode, out = signalled(RUNNING, signal.SIGINT)
    assert returncode == 0
    assert out.strip() == "stopped gracefully, interrupted start: False"
