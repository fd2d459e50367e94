"""Every calibrator driver against its simulator, over a real pty and over TCP (socket://).

Each fault the simulators inject must surface as the driver's typed error, and the very
next read must work again. Readings must agree with the simulated physics.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pathlib
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from hotlab.drivers.calibrator import CALIBRATOR_DRIVERS, CalibratorDriver, UnknownFamilyError, create_calibrator
from hotlab.drivers.records import (
    ChecksumError,
    DeviceDisconnected,
    DeviceRefused,
    DeviceTimeout,
    DriverError,
    FrameError,
    Reading,
)
from hotlab.drivers.serial_link import FrozenValueError, SerialLink, SerialSettings
from hotlab.physics.nuclides import get_nuclide
from hotlab.simulators.calibrator_cli import CALIBRATOR_SIMULATORS
from hotlab.simulators.faults import Fault, FaultInjector
from hotlab.simulators.serial_host import DeviceModel, PtyHost, Rfc2217Host, TcpHost
from hotlab.simulators.source import DEFAULT_RESPONSE_A_PER_BQ, IonChamber, make_chamber

FAMILIES = ("vik202", "crc15r", "vdc404", "atomlab500")
#: A tty, a serial device server in raw TCP mode, and one in RFC 2217 mode.
HOSTS: dict[str, type[PtyHost | TcpHost]] = {"pty": PtyHost, "tcp": TcpHost, "rfc2217": Rfc2217Host}
TRANSPORTS = tuple(HOSTS)
NOISE_REL = 0.002
#: A four-digit display rounds by at most half a unit in the last place, 5e-4 relative.
DISPLAY_REL = 5e-4
TOLERANCE_REL = 5 * NOISE_REL + DISPLAY_REL
#: The simulated VDC-404 streams this often in tests: short, yet many event-loop ticks long.
STREAM_INTERVAL_S = 0.05
TIMEOUT_S = 0.6
#: A late reply lands between one timeout and the next: 0.3 s margin either side.
LATE_S = 0.9


@dataclass
class Rig:
    chamber: IonChamber
    faults: FaultInjector
    model: Any
    url: str
    driver: Any


@contextlib.asynccontextmanager
async def calibrator_rig(family: str, transport: str, **driver_options: Any) -> AsyncIterator[Rig]:
    chamber = make_chamber("Tc-99m", 740e6, noise_rel=NOISE_REL, seed=7)
    faults = FaultInjector(seed=7, late_s=LATE_S)
    model: DeviceModel = CALIBRATOR_SIMULATORS[family](chamber, faults, interval_s=STREAM_INTERVAL_S)
    host = HOSTS[transport](model)
    url = await host.start()
    driver = create_calibrator(family, url, f"{family}-1", timeout_s=TIMEOUT_S, **driver_options)
    try:
        await driver.connect()
        yield Rig(chamber, faults, model, url, driver)
    finally:
        await driver.close()
        await host.stop()


def assert_matches_physics(reading: Reading, chamber: IonChamber) -> None:
    expected = chamber.expected_display_bq()
    assert reading.activity_bq == pytest.approx(expected, rel=TOLERANCE_REL)
    assert reading.nuclide == chamber.selected


@pytest.fixture(params=[(f, t) for f in FAMILIES for t in TRANSPORTS], ids=lambda p: f"{p[0]}-{p[1]}")
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    family, transport = request.param
    async with calibrator_rig(family, transport, max_identical_readings=2) as rig:
        yield rig


def test_registry_names_every_family_and_rejects_others() -> None:
    assert set(CALIBRATOR_DRIVERS) == set(FAMILIES) == set(CALIBRATOR_SIMULATORS)
    with pytest.raises(UnknownFamilyError, match="known: atomlab500, crc15r, vdc404, vik202"):
        create_calibrator("crc-25r", "socket://127.0.0.1:1", "x")


async def test_readings_follow_the_physics(rig: Rig) -> None:
    assert isinstance(rig.driver, CalibratorDriver)
    readings = [await rig.driver.read() for _ in range(5)]
    for reading in readings:
        assert_matches_physics(reading, rig.chamber)
        assert reading.device == rig.driver.device
        assert reading.raw_frame.endswith(b"\r\n")
    # Noise is on: five readings of a noisy electrometer are not all the same number.
    assert len({r.activity_bq for r in readings}) > 1
    assert readings[0].timestamp_ns <= readings[-1].timestamp_ns


async def test_reading_halves_after_one_half_life(rig: Rig) -> None:
    before = await rig.driver.read()
    rig.chamber.clock.advance(get_nuclide("Tc-99m").half_life_s)
    after = await rig.driver.read()
    assert after.activity_bq / before.activity_bq == pytest.approx(0.5, rel=2 * TOLERANCE_REL)
    assert_matches_physics(after, rig.chamber)


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (Fault.GARBAGE, FrameError),
        (Fault.DROP, DeviceTimeout),
        (Fault.LATE, DeviceTimeout),
        (Fault.DISCONNECT, DeviceDisconnected),
    ],
)
async def test_transport_fault_raises_typed_error_then_next_read_recovers(
    rig: Rig, fault: Fault, error: type[DriverError]
) -> None:
    await rig.driver.read()  # in step with the device (for the streaming VDC-404: just after a line)
    rig.faults.enable(fault)
    with pytest.raises(error):
        await rig.driver.read()
    rig.faults.disable(fault)
    assert_matches_physics(await rig.driver.read(), rig.chamber)


async def test_stuck_value_is_reported_then_next_read_recovers(rig: Rig) -> None:
    first = await rig.driver.read()
    rig.faults.enable(Fault.STUCK)
    repeat = await rig.driver.read()  # allowed: max_identical_readings=2
    assert repeat.raw_value == first.raw_value
    with pytest.raises(FrozenValueError):
        await rig.driver.read()
    rig.faults.disable(Fault.STUCK)
    assert_matches_physics(await rig.driver.read(), rig.chamber)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_crc15r_bad_checksum_raises_then_recovers(transport: str) -> None:
    async with calibrator_rig("crc15r", transport) as rig:
        rig.faults.arm(Fault.BAD_CHECKSUM)
        with pytest.raises(ChecksumError):
            await rig.driver.read()
        assert_matches_physics(await rig.driver.read(), rig.chamber)


def misread_factor(true_nuclide: str, selected: str) -> float:
    """Displayed / true activity when `selected` is dialled in for a `true_nuclide` source."""
    responses = DEFAULT_RESPONSE_A_PER_BQ
    return responses[true_nuclide] / responses[selected]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_vik202_factor_selection_round_trip(transport: str) -> None:
    async with calibrator_rig("vik202", transport) as rig:
        assert rig.driver.factor == 236 and rig.driver.nuclide == "Tc-99m"
        true_bq = rig.chamber.true_activity_bq()
        await rig.driver.select_nuclide("18F")
        assert rig.driver.factor == 762 and rig.model.factor == 762
        reading = await rig.driver.read()
        assert reading.nuclide == "F-18"
        assert reading.extra["calibration_factor"] == 762
        assert reading.activity_bq == pytest.approx(true_bq * misread_factor("Tc-99m", "F-18"), rel=TOLERANCE_REL)
        await rig.driver.select_nuclide("Tc-99m")
        assert (await rig.driver.read()).activity_bq == pytest.approx(true_bq, rel=TOLERANCE_REL)
        with pytest.raises(DeviceRefused, match="no VIK-202 calibration factor configured for I-131"):
            await rig.driver.select_nuclide("I-131")
        with pytest.raises(DeviceRefused, match="refused"):
            await rig.driver.set_factor(999)  # the simulated device answers >ERR
        assert rig.driver.factor == 236


async def test_vik202_notices_a_factor_dialled_on_the_front_panel() -> None:
    async with calibrator_rig("vik202", "pty") as rig:
        rig.model.select_on_panel(587)  # Cs-137
        reading = await rig.driver.read()
        assert reading.nuclide == "Cs-137" and rig.driver.factor == 587
        assert_matches_physics(reading, rig.chamber)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_vik202_background_autozero_current_and_version(transport: str) -> None:
    async with calibrator_rig("vik202", transport) as rig:
        await rig.driver.set_background_subtraction(False)
        raw = await rig.driver.read()
        background_bq = rig.chamber.background_a / DEFAULT_RESPONSE_A_PER_BQ["Tc-99m"]
        assert raw.activity_bq == pytest.approx(rig.chamber.true_activity_bq() + background_bq, rel=TOLERANCE_REL)
        await rig.driver.set_background_subtraction(True)
        await rig.driver.autozero()
        assert await rig.driver.chamber_current_a() == pytest.approx(rig.chamber.current_a(), rel=1e-4)
        assert (await rig.driver.version()).startswith("VIK-202")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_atomlab500_iso_round_trip(transport: str) -> None:
    async with calibrator_rig("atomlab500", transport) as rig:
        true_bq = rig.chamber.true_activity_bq()
        await rig.driver.select_nuclide("f18")
        reading = await rig.driver.read()
        assert reading.nuclide == "F-18" == rig.chamber.selected
        assert reading.activity_bq == pytest.approx(true_bq * misread_factor("Tc-99m", "F-18"), rel=TOLERANCE_REL)
        with pytest.raises(DeviceRefused, match="ERROR: BAD ISOTOPE"):
            await rig.driver.select_nuclide("I-131")  # valid nuclide, but no calibration in this chamber
        with pytest.raises(DeviceRefused, match="cannot read nuclide name"):
            await rig.driver.select_nuclide("not-a-nuclide")
        assert rig.chamber.selected == "F-18"


@pytest.mark.parametrize("family", ["crc15r", "vdc404"])
async def test_panel_only_devices_refuse_remote_selection_but_report_panel_choice(family: str) -> None:
    async with calibrator_rig(family, "tcp") as rig:
        with pytest.raises(DeviceRefused, match=r"front panel|on the device"):
            await rig.driver.select_nuclide("F-18")
        assert rig.chamber.selected == "Tc-99m"
        rig.model.select_on_panel("F-18")
        reading = await rig.driver.read()
        assert reading.nuclide == "F-18"
        assert_matches_physics(reading, rig.chamber)


@pytest.mark.parametrize("family", ["vik202", "atomlab500"])
async def test_concurrent_read_and_select_do_not_interleave_frames(family: str) -> None:
    async with calibrator_rig(family, "pty") as rig:
        results = await asyncio.gather(*(rig.driver.read() for _ in range(3)), rig.driver.select_nuclide("F-18"))
        for reading in results[:3]:
            assert reading.nuclide in ("Tc-99m", "F-18")
        reading = await rig.driver.read()
        assert reading.nuclide == "F-18"
        assert_matches_physics(reading, rig.chamber)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_overlong_garbage_is_dropped_and_reported(transport: str) -> None:
    async with calibrator_rig("vik202", transport) as rig:
        rig.faults.garbage_bytes = 400  # longer than a frame may be: no terminator in sight
        rig.faults.arm(Fault.GARBAGE)
        with pytest.raises(FrameError, match="frame longer than 256 bytes"):
            await rig.driver.read()
        assert_matches_physics(await rig.driver.read(), rig.chamber)


async def test_family_options_as_a_config_file_gives_them() -> None:
    """Strings for terminators and commands, a table for line settings: what TOML can hold."""
    options = {"read_command": "DS\r", "terminator": "\r\n", "settings": {"baudrate": 19200, "parity": "N"}}
    async with calibrator_rig("atomlab500", "pty", **options) as rig:
        assert rig.driver.link.settings.baudrate == 19200
        assert_matches_physics(await rig.driver.read(), rig.chamber)
    with pytest.raises(ValueError, match="keys: baudrate, bytesize, parity, stopbits"):
        create_calibrator("vik202", "socket://127.0.0.1:1", "x", settings={"baud": 9600})
    assert CALIBRATOR_DRIVERS["vdc404"].streaming and not CALIBRATOR_DRIVERS["vik202"].streaming


async def test_crc15r_checksum_check_can_be_switched_off() -> None:
    async with calibrator_rig("crc15r", "pty", checksum=False) as rig:
        rig.faults.arm(Fault.BAD_CHECKSUM)
        assert_matches_physics(await rig.driver.read(), rig.chamber)


async def test_unreachable_url_raises_device_disconnected() -> None:
    with pytest.raises(DeviceDisconnected, match="cannot open"):
        await create_calibrator("vik202", "/dev/hotlab-no-such-tty", "x", timeout_s=1).connect()
    driver = create_calibrator("atomlab500", "/dev/hotlab-no-such-tty", "x", timeout_s=1)
    with pytest.raises(DeviceDisconnected):
        await driver.read()  # read() opens the link itself


@pytest.mark.parametrize(
    ("family", "options", "line"),
    [
        ("crc15r", {}, (4800, 8, "N", 1)),  # the family's default line
        ("vik202", {"settings": {"baudrate": 19200, "parity": "E"}}, (19200, 8, "E", 1)),  # as configured
    ],
)
async def test_rfc2217_carries_the_port_settings_to_the_device_server(
    family: str, options: dict[str, Any], line: tuple[int, int, str, int]
) -> None:
    model = CALIBRATOR_SIMULATORS[family](make_chamber("Tc-99m", 740e6, seed=1), FaultInjector(seed=1))
    host = Rfc2217Host(model)
    url = await host.start()
    driver = create_calibrator(family, url, "cal-1", timeout_s=TIMEOUT_S, **options)
    try:
        await driver.connect()
        await driver.read()
        settings = host.port_settings
        assert (settings.baudrate, settings.bytesize, settings.parity, settings.stopbits) == line
    finally:
        await driver.close()
        await host.stop()
    with pytest.raises(DeviceDisconnected, match="cannot open rfc2217://"):  # the server is gone
        await create_calibrator(family, url, "cal-1", timeout_s=TIMEOUT_S).connect()


async def test_an_rfc2217_open_that_times_out_does_not_stay_connected() -> None:
    """The open goes on in its thread after the timeout; the port it opens is closed, not kept."""
    host = Rfc2217Host(CALIBRATOR_SIMULATORS["vik202"](make_chamber("Tc-99m", 740e6, seed=1), FaultInjector(seed=1)))
    url = await host.start()
    try:
        for _ in range(3):
            with pytest.raises(DeviceDisconnected, match="took longer"):
                await SerialLink(url, SerialSettings(9600)).open(0.001)  # the negotiation takes longer
        deadline = time.monotonic() + 15
        while not host.clients and time.monotonic() < deadline:  # the opens go on and connect
            await asyncio.sleep(0.01)
        assert host.clients > 0
        while host.clients and time.monotonic() < deadline:  # and each port is closed once it is open
            await asyncio.sleep(0.05)
        assert host.clients == 0
    finally:
        await host.stop()


async def test_drivers_share_one_event_loop_without_blocking_it() -> None:
    """Four devices on three kinds of port read concurrently, while a ticker shows the loop never stalls."""
    async with contextlib.AsyncExitStack() as stack:
        rigs = [
            await stack.enter_async_context(calibrator_rig(f, t))
            for f, t in zip(FAMILIES, ("rfc2217", "tcp", "pty", "rfc2217"), strict=True)
        ]
        ticks: list[float] = []

        async def ticker() -> None:
            loop = asyncio.get_running_loop()
            while True:
                ticks.append(loop.time())
                await asyncio.sleep(0.005)

        tick_task = asyncio.create_task(ticker())
        try:
            for _ in range(5):
                readings = await asyncio.gather(*(r.driver.read() for r in rigs))
                for reading, r in zip(readings, rigs, strict=True):
                    assert_matches_physics(reading, r.chamber)
        finally:
            tick_task.cancel()
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        assert gaps and max(gaps) < 0.5


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat not installed")
async def test_socat_as_outside_client_and_as_pty_bridge(tmp_path: pathlib.Path) -> None:
    """socat talks to the simulator as a foreign client, then bridges a pty to its TCP port."""
    async with calibrator_rig("vik202", "tcp") as rig:
        host_port = rig.url.removeprefix("socket://")
        client = await asyncio.create_subprocess_exec(
            "socat",
            "-t",
            "2",
            "-",
            f"TCP:{host_port}",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(b"!R\r")
        await client.stdin.drain()
        reply = await asyncio.wait_for(client.stdout.readuntil(b"\r\n"), 10)
        client.stdin.close()
        await asyncio.wait_for(client.wait(), 10)
        assert reply.startswith(b">") and float(reply[1:]) == pytest.approx(
            rig.chamber.expected_display_bq(), rel=TOLERANCE_REL
        )

        link = str(tmp_path / "socat-tty")
        bridge = await asyncio.create_subprocess_exec(
            "socat",
            f"PTY,link={link},raw,echo=0",
            f"TCP:{host_port}",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            await _wait_for_path(link, 10)
            async with create_calibrator("vik202", link, "via-socat", timeout_s=5) as driver:
                assert_matches_physics(await driver.read(), rig.chamber)
        finally:
            bridge.terminate()
            await bridge.wait()
        assert not os.path.exists(link)


async def _wait_for_path(path: str, timeout_s: float) -> None:
    """socat creates its pty link asynchronously and offers no event for it: poll briefly."""
    async with asyncio.timeout(timeout_s):
        while not os.path.exists(path):
            await asyncio.sleep(0.02)
