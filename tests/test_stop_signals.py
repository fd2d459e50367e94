"""Ctrl-C interrupts a start that hangs, and stops a running service gracefully (controller/stop_signals.py).

Each case runs in a child process, so that the signal reaches a real event loop's handler and
a broken handler cannot interrupt the test run itself.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.cli_process import REPO

#: Each case is the body of `main()`, which runs on its own event loop with `signals = StopSignals()` made first.
PROGRAM = """\
import asyncio
from hotlab.controller.stop_signals import StopSignals

async def main():
    signals = StopSignals()
{case}
asyncio.run(main())
"""

HUNG_START = """\
    with signals.interruptible_start():
        print("starting", flush=True)
        try:
            await asyncio.Event().wait()  # a start that never finishes
        finally:
            print("cleaning up", flush=True)
    await asyncio.sleep(0.01)  # the task is not left cancelled
    print("ended quietly, stop", signals.stop.is_set(), flush=True)
"""

RUNNING = """\
    signals.running()
    print("starting", flush=True)
    await signals.stop.wait()
    print("stopped gracefully, interrupted start:", signals.interrupted_start, flush=True)
"""

SWALLOWING_START = """\
    with signals.interruptible_start():
        print("starting", flush=True)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            print("starting", flush=True)  # a library that loses the cancellation, and hangs on
        await asyncio.Event().wait()
    print("ended quietly", flush=True)
"""

FAILING_START = """\
    with signals.interruptible_start():
        try:
            raise OSError(28, "No space left on device", "operator.token")
        finally:
            print("starting", flush=True)  # cleaning up after the failure, which takes a while
            await asyncio.Event().wait()
"""


def signalled(case: str, *signums: int) -> tuple[int, str, str]:
    """Run `case`; each time it prints "starting", send it the next signal. Returns (code, stdout, stderr)."""
    process = subprocess.Popen(
        [sys.executable, "-c", PROGRAM.format(case=case)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        for signum in signums:
            assert process.stdout.readline().strip() == "starting"
            process.send_signal(signum)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, out, err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_interrupts_a_start_that_hangs(signum: int) -> None:
    returncode, out, _err = signalled(HUNG_START, signum)
    assert returncode == 0
    assert out.splitlines() == ["cleaning up", "ended quietly, stop True"]


def test_a_signal_only_sets_stop_once_running() -> None:
    returncode, out, _err = signalled(RUNNING, signal.SIGINT)
    assert returncode == 0
    assert out.strip() == "stopped gracefully, interrupted start: False"


def test_a_second_signal_ends_a_start_that_lost_the_first() -> None:
    returncode, out, _err = signalled(SWALLOWING_START, signal.SIGINT, signal.SIGINT)
    assert returncode == 0
    assert out.strip() == "ended quietly"


def test_a_signal_does_not_hide_the_error_a_start_was_failing_with() -> None:
    returncode, _out, err = signalled(FAILING_START, signal.SIGINT)
    assert returncode == 1
    assert "OSError: [Errno 28] No space left on device: 'operator.token'" in err
    assert "stopped by a signal while starting" not in err
