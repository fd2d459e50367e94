"""A megabyte "line" with no terminator, on every calibrator driver, over a pty and over TCP.

A serial device server with the wrong baud rate, a device dumping its memory, or a cable
picking up noise can send far more than any frame the protocol allows. The driver must:

* raise a typed error (FrameError), never anything else, and never hang past its timeout;
* hold at most a bounded amount of that garbage in memory (it is dropped, not accumulated),
  also when it arrives between polls, while no read is pending;
* read normally again once the flood is over, without being reconstructed.

The flood goes through the real simulator's connection (`FloodingModel` wraps it), so the
driver sees it on the same pty / socket as the device's normal replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from hotlab.drivers.calibrator import create_calibrator
from hotlab.drivers.records import DriverError, FrameError
from hotlab.drivers.serial_link import _ReceiveBuffer
from hotlab.simulators.calibrator_cli import CALIBRATOR_SIMULATORS
from hotlab.simulators.faults import FaultInjector
from hotlab.simulators.serial_host import ByteChannel, DeviceModel, PtyHost, TcpHost
from hotlab.simulators.source import IonChamber, make_chamber

FAMILIES = ("vik202", "crc15r", "vdc404", "atomlab500")
FLOOD_BYTES = 1024 * 1024
#: Printable, so it passes for the start of a frame; no CR or LF, so no frame ever ends.
FLOOD_BYTE = b"7"
TIMEOUT_S = 1.0
#: SerialLink caps its receive buffer at 4 x max_frame_bytes (256), keeping the newest bytes,
#: whether or not a read is pending. A buffer that kept the flood, or one transport read of it
#: (up to 256 KiB on TCP), fails this.
MAX_BUFFERED_BYTES = 4 * 256


class _FloodingChannel(ByteChannel):
    """Passes the device's traffic through; `flood()` puts a megabyte on the line before the next reply.

    Writes go through one pump task so the order on the wire is kept; on a pty the pump
    writes the master fd as the slave drains (a pty holds only a few KiB), on TCP the
    stream buffers it.
    """

    def __init__(self, inner: ByteChannel) -> None:
        super().__init__()
        self.inner = inner
        self.armed = 0
        #: Bytes handed to the line so far; the driver has seen everything once it received as many.
        self.sent = 0
        self.flood_sent = asyncio.Event()
        self._pending = bytearray()
        self._wake = asyncio.Event()
        self._pump = asyncio.create_task(self._run_pump())

    async def read(self) -> bytes:
        return await self.inner.read()

    def flood_now(self) -> None:
        """Unsolicited: the megabyte arrives while nobody asked for anything."""
        self.flood_sent.clear()
        self._pending += FLOOD_BYTE * FLOOD_BYTES
        self._wake.set()

    def write(self, data: bytes) -> None:
        if self.armed:
            self.armed -= 1
            self._pending += FLOOD_BYTE * FLOOD_BYTES
        self._pending += data
        self._wake.set()

    def hang_up(self) -> None:
        self.closed = True
        self._pump.cancel()
        self.inner.hang_up()

    async def _run_pump(self) -> None:
        master_fd: int | None = getattr(self.inner, "master_fd", None)
        while not self.inner.closed:
            await self._wake.wait()
            self._wake.clear()
            while self._pending and not self.inner.closed:
                chunk = bytes(self._pending[:65536])
                if master_fd is None:
                    self.inner.write(chunk)
                    sent = len(chunk)
                else:
                    try:
                        sent = os.write(master_fd, chunk)
                    except BlockingIOError:
                        await asyncio.sleep(0.001)  # the slave side has not read yet
                        continue
                del self._pending[:sent]
                self.sent += sent
                await asyncio.sleep(0)
            if len(self._pending) == 0 and self.armed == 0:
                self.flood_sent.set()


class FloodingModel:
    """Wraps a simulator; `arm()` makes its next reply (or streamed line) come after a megabyte of garbage."""

    def __init__(self, inner: DeviceModel) -> None:
        self.inner = inner
        self.channel: _FloodingChannel | None = None
        self.connected = asyncio.Event()

    async def serve(self, channel: ByteChannel) -> None:
        self.channel = _FloodingChannel(channel)
        self.connected.set()
        try:
            await self.inner.serve(self.channel)
        finally:
            self.channel.hang_up()

    def arm(self) -> None:
        assert self.channel is not None
        self.channel.flood_sent.clear()
        self.channel.armed += 1


@dataclass
class BufferStats:
    """What the driver's receive buffer went through: its largest size and all bytes that arrived."""

    peak: int = 0
    received: int = 0


@dataclass
class FloodRig:
    chamber: IonChamber
    model: FloodingModel
    driver: Any
    buffer: BufferStats


@contextlib.asynccontextmanager
async def flood_rig(family: str, transport: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FloodRig]:
    chamber = make_chamber("Tc-99m", 740e6, noise_rel=0.002, seed=3)
    model = FloodingModel(CALIBRATOR_SIMULATORS[family](chamber, FaultInjector(seed=3), interval_s=0.05))
    host: PtyHost | TcpHost = PtyHost(model) if transport == "pty" else TcpHost(model)
    url = await host.start()
    stats = BufferStats()
    original = _ReceiveBuffer.data_received

    def measuring(self: _ReceiveBuffer, data: bytes) -> None:
        original(self, data)
        stats.peak = max(stats.peak, len(self.data))
        stats.received += len(data)

    # Observation only: the real method runs; the wrapper records how large the buffer gets.
    monkeypatch.setattr(_ReceiveBuffer, "data_received", measuring)
    driver = create_calibrator(family, url, f"{family}-flooded", timeout_s=TIMEOUT_S)
    try:
        await driver.connect()
        await asyncio.wait_for(model.connected.wait(), 10)
        yield FloodRig(chamber, model, driver, stats)
    finally:
        await driver.close()
        await host.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["pty", "tcp"])
@pytest.mark.parametrize("family", FAMILIES)
async def test_a_megabyte_without_terminator_is_a_frame_error_with_bounded_memory_then_reads_resume(
    family: str, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with flood_rig(family, transport, monkeypatch) as rig:
        first = await rig.driver.read()
        assert first.activity_bq == pytest.approx(rig.chamber.expected_display_bq(), rel=0.02)
        rig.buffer.peak = 0

        rig.model.arm()
        errors: list[DriverError] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        reading = None
        # Until the flood has passed, each read may meet more of it; every failure must be typed.
        while reading is None or not rig.model.channel.flood_sent.is_set():  # type: ignore[union-attr]
            assert loop.time() < deadline, f"no clean reading 30 s after the flood; errors: {errors[-3:]}"
            try:
                reading = await asyncio.wait_for(rig.driver.read(), TIMEOUT_S * 3)
            except DriverError as exc:
                errors.append(exc)
                reading = None

        assert errors, "a megabyte without terminator must not pass silently"
        assert isinstance(errors[0], FrameError), f"first error {errors[0]!r} is not a FrameError"
        assert any("frame longer than 256 bytes" in str(e) for e in errors)
        assert all(len(str(e)) < 1000 for e in errors), "an error message must not carry the flood"
        assert rig.buffer.peak <= MAX_BUFFERED_BYTES, f"buffer grew to {rig.buffer.peak} bytes"
        assert reading.activity_bq == pytest.approx(rig.chamber.expected_display_bq(), rel=0.02)
        # Replies to the requests that failed during the flood were queued behind it, and one may
        # have been cut by the overlong check: stale bytes, as on a real line. Once they are all
        # in (the line is quiet), every read is clean again.
        channel = rig.model.channel
        assert channel is not None
        while rig.buffer.received < channel.sent:
            assert loop.time() < deadline, "the line never went quiet after the flood"
            await asyncio.sleep(0.01)
        for _ in range(3):
            again = await rig.driver.read()
            assert again.activity_bq == pytest.approx(rig.chamber.expected_display_bq(), rel=0.02)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["pty", "tcp"])
async def test_garbage_between_polls_is_not_held_in_full(transport: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with flood_rig("vik202", transport, monkeypatch) as rig:
        await rig.driver.read()
        channel = rig.model.channel
        assert channel is not None
        rig.buffer.peak = 0
        before = rig.buffer.received
        channel.flood_now()  # the supervisor is in its poll pause: no read is pending
        await asyncio.wait_for(channel.flood_sent.wait(), 30)
        deadline = asyncio.get_running_loop().time() + 10
        while rig.buffer.received - before < FLOOD_BYTES:
            assert asyncio.get_running_loop().time() < deadline, "the flood did not arrive"
            await asyncio.sleep(0.01)  # the last bytes are still in the socket / tty queue
        assert rig.buffer.peak <= MAX_BUFFERED_BYTES, f"buffer grew to {rig.buffer.peak} bytes"
        reading = await rig.driver.read()  # the next poll discards the stale garbage and works
        assert reading.activity_bq == pytest.approx(rig.chamber.expected_display_bq(), rel=0.02)
