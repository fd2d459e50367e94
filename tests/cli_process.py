"""Run `hotlab` (python -m hotlab.controller.cli) as a child process the way the tests need it.

`subprocess.run(timeout=...)` kills only the child it started: a `hotlab run` that hangs would
leave its private mosquitto behind, running. Here the child gets a process group of its own, and
a timeout kills the whole group before the test fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_hotlab(*args: str, cwd: Path, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """`hotlab ARGS` in `cwd`, with its output captured; the test fails if it takes longer than `timeout_s`."""
    command = [sys.executable, "-m", "hotlab.controller.cli", *args]
    process = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the private broker and anything else it started
        stdout, stderr = process.communicate()
        raise AssertionError(
            f"hotlab {' '.join(args)} did not finish within {timeout_s:g} s; its log ends with:\n{stderr[-3000:]}"
        ) from None
    finally:  # also after pytest's own timeout, or when hotlab ended but left a child behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
