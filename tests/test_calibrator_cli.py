"""`hotlab simulate calibrator` as a user runs it: a separate process, stopped with Ctrl-C."""

from __future__ import annotations

import asyncio
import pathlib
import signal
import sys

import pytest

from hotlab.controller.cli.main import main
from hotlab.drivers.calibrator import create_calibrator

REPO = pathlib.Path(__file__).resolve().parents[1]


async def _run_simulator(*args: str, ignore_sigint: bool = False) -> tuple[asyncio.subprocess.Process, str]:
    """Start the simulator CLI; `ignore_sigint` starts it as a shell starts a background job."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hotlab.controller.cli",
        "simulate",
        "calibrator",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None,
    )
    assert process.stdout is not None
    first_line = await asyncio.wait_for(process.stdout.readline(), 30)
    if not first_line:
        assert process.stderr is not None
        raise AssertionError((await process.stderr.read()).decode())
    return process, first_line.decode().strip()


async def _stop(process: asyncio.subprocess.Process, signum: int) -> int:
    """Send `signum` and return the exit code; a simulator that ignores it is killed, not left behind."""
    process.send_signal(signum)
    try:
        return await asyncio.wait_for(process.wait(), 30)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"the simulator did not stop on signal {signum} within 30 s") from None


@pytest.mark.parametrize(
    ("args", "nuclide", "activity_bq"),
    [
        (["--model", "atomlab500", "--tcp", "127.0.0.1:0", "--nuclide", "F-18", "--activity", "2GBq"], "F-18", 2e9),
        (["--model", "vik202", "--pty", "--activity", "20 mCi", "--fault", "garbage:0"], "Tc-99m", 7.4e8),
        (["--model", "crc15r", "--rfc2217", "127.0.0.1:0", "--nuclide", "F-18", "--activity", "1GBq"], "F-18", 1e9),
    ],
    ids=["atomlab500-tcp", "vik202-pty", "crc15r-rfc2217"],
)
async def test_simulator_process_serves_until_ctrl_c(args: list[str], nuclide: str, activity_bq: float) -> None:
    process, where = await _run_simulator(*args)
    try:
        if "--pty" in args:
            assert pathlib.Path(where).exists()
        else:
            assert where.startswith("socket://127.0.0.1:" if "--tcp" in args else "rfc2217://127.0.0.1:")
        async with create_calibrator(args[1], where, "cli-test", timeout_s=10) as driver:
            reading = await driver.read()
        assert reading.nuclide == nuclide
        assert reading.activity_bq == pytest.approx(activity_bq, rel=0.02)
    finally:
        returncode = await _stop(process, signal.SIGINT)
    assert returncode == 0
    if "--pty" in args:
        assert not pathlib.Path(where).exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
async def test_simulator_stops_on_signal_even_when_started_with_sigint_ignored(signum: int) -> None:
    process, _ = await _run_simulator("--model", "vik202", "--tcp", "127.0.0.1:0", ignore_sigint=True)
    assert await _stop(process, signum) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "vik202", "--tcp", "127.0.0.1:0", "--nuclide", "Qq-12"], "cannot read nuclide name"),
        (["--model", "crc15r", "--tcp", "127.0.0.1:0", "--activity", "5 furlongs"], "unknown activity unit"),
        (["--model", "vdc404", "--pty", "--fault", "melt:0.1"], "unknown fault 'melt'"),
        (["--model", "crc15r", "--tcp", "127.0.0.1:0", "--nuclide", "I-131"], "no chamber response configured"),
        (["--model", "vik202", "--tcp", "localhost"], "--tcp wants HOST:PORT"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", "calibrator", *args]) == 2
    assert message in capsys.readouterr().err


def test_pty_link_never_replaces_an_existing_file(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    assert main(["simulate", "calibrator", "--model", "vik202", "--pty", str(precious)]) == 1
    assert "is not a symlink; refusing to replace it" in capsys.readouterr().err
    assert precious.read_text() == "keep me"
