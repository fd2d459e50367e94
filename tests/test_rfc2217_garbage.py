"""A device server that sends malformed Telnet to an `rfc2217://` client: one log line, no traceback.

pyserial's RFC 2217 client parses the server's Telnet in a thread of its own; on malformed
Telnet (an IAC SE with no subnegotiation before it) that thread raises, and Python prints the
traceback to stderr, outside the log. Run in a fresh interpreter, so stderr is what the
service's log would get; pytest's own thread-exception hook would otherwise hide it.

The handler overrides a private method of pyserial; the last tests check that it exists.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import serial

from hotlab.drivers.threaded_serial import pyserial_private_api_problem

ROOT = Path(__file__).resolve().parents[1]

#: IAC SE without IAC SB: the reader thread's parser fails on it (pyserial 3.5: TypeError).
GARBAGE = b"\xff\xf0"

SCENARIO = """
import asyncio, logging, sys, threading, time
from hotlab.drivers.calibrator import create_calibrator
from hotlab.drivers.records import DriverError
from hotlab.simulators.serial_host import Rfc2217Host

logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
GARBAGE = {garbage!r}


class Garbler:
    # An RFC 2217 device server that answers the first request with malformed Telnet.
    async def serve(self, channel):
        if await channel.read():
            channel.send_telnet(GARBAGE)
        while await channel.read():
            pass


async def garbage_from_the_start():
    hung_up = asyncio.Event()

    async def serve(reader, writer):
        writer.write(GARBAGE + b"not telnet at all")
        await reader.read()  # until the client gives up negotiating and closes
        writer.close()
        hung_up.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, "rfc2217://127.0.0.1:%d" % server.sockets[0].getsockname()[1], hung_up


async def main(mode):
    if mode == "mid-session":
        host = Rfc2217Host(Garbler())
        url, server = await host.start(), host
    else:
        server, url, hung_up = await garbage_from_the_start()
    driver = create_calibrator("vik202", url, "cal-1", timeout_s=1.0)
    try:
        await driver.read()
    except DriverError as exc:
        print("driver:", type(exc).__name__)
    await driver.close()
    deadline = time.monotonic() + 15  # pyserial gives up negotiating after 3 s, then joins its reader
    while any(t.name.startswith("pySerial RFC 2217") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "reader thread still running"
        await asyncio.sleep(0.05)
    if mode == "mid-session":
        await server.stop()
    else:
        await asyncio.wait_for(hung_up.wait(), 15)
        server.close()


asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.parametrize("mode", ["mid-session", "from-the-start"])
def test_malformed_telnet_is_one_log_line_not_a_traceback(mode: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCENARIO.format(garbage=GARBAGE), mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Exception in thread" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("WARNING hotlab.drivers.threaded_serial: rfc2217://127.0.0.1:")
    assert "malformed Telnet" in lines[0] and "TypeError" in lines[0]
    assert done.stdout.startswith("driver: Device")  # DeviceDisconnected or DeviceTimeout: the port is lost


def test_the_installed_pyserial_has_the_reader_method_the_port_overrides() -> None:
    """If this fails after a pyserial upgrade, `Rfc2217Port` must be adapted before that version is used."""
    assert pyserial_private_api_problem() is None


def test_a_pyserial_without_the_reader_method_is_refused_at_import_naming_its_version() -> None:
    """In a fresh interpreter: the check runs when the module is first imported."""
    program = (
        "import serial.rfc2217\ndel serial.rfc2217.Serial._telnet_read_loop\nimport hotlab.drivers.threaded_serial\n"
    )
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert (
        f"PyserialPrivateApiChanged: pyserial {serial.VERSION}: serial.rfc2217.Serial._telnet_read_loop is None"
        in done.stderr
    )
