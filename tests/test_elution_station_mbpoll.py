"""An outside Modbus master (the mbpoll binary) reads and drives the simulated station.

mbpoll is a different Modbus implementation (libmodbus), so this checks the register map on
the wire, not just our own encoder against our own decoder. `-0` makes mbpoll use PDU
addresses (0-based), the same numbers as docs/elution-station-registers.md.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import AsyncIterator

import pytest

from hotlab.drivers.modbus_words import WordOrder, registers_to_string
from hotlab.drivers.station_registers import (
    DISCRETE_INPUTS,
    INPUT_REGISTERS,
    NUCLIDE_NUMBERS,
    REGISTER_MAP_VERSION,
    DiscreteInput,
    StationState,
)
from hotlab.physics.utc_time import NS_PER_S
from hotlab.simulators.elution_station import ElutionStationSimulator, StationClock, StationModel
from hotlab.simulators.generator_physics import GeneratorColumn, get_profile

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("mbpoll") is None, reason="mbpoll binary not installed"),
]

VALUE_LINE = re.compile(r"^\[(\d+)\]:\s+(\S+)", re.MULTILINE)


def ir(name: str) -> int:
    """The address of input register `name`."""
    return INPUT_REGISTERS[name].address


def words(values: dict[int, str], name: str) -> list[int]:
    """The words of input register `name` in mbpoll's output."""
    register = INPUT_REGISTERS[name]
    return [int(values[address]) for address in range(register.address, register.end)]


def make_simulator(order: WordOrder) -> ElutionStationSimulator:
    clock = StationClock(1.0)  # real time: a started elution stays in priming for 8 s
    now_s = clock.now_ns() // NS_PER_S
    column = GeneratorColumn(
        get_profile("ge68"),
        generator_id="GE68-MB-01",
        parent_cal_bq=1.85e9,
        cal_time_ns=(now_s - 10 * 86_400) * NS_PER_S,
        last_elution_ns=(now_s - 3_600) * NS_PER_S,
    )
    return ElutionStationSimulator(StationModel(column, clock), device_id=3, word_order=order)


@pytest.fixture
async def station_abcd() -> AsyncIterator[tuple[ElutionStationSimulator, int]]:
    sim = make_simulator(WordOrder.ABCD)
    _, port = await sim.start_tcp()
    yield sim, port
    await sim.stop()


async def mbpoll(*args: str) -> dict[int, str]:
    """Run mbpoll without blocking the loop (the simulator answers on this same loop); returns {address: text}."""
    process = await asyncio.create_subprocess_exec(
        "mbpoll",
        "-1",
        "-0",
        "-o",
        "5",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(20):
        stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode() + stdout.decode()
    return {int(address): value for address, value in VALUE_LINE.findall(stdout.decode())}


def tcp(port: int, *args: str) -> tuple[str, ...]:
    return ("-m", "tcp", "-p", str(port), "-a", "3", *args, "127.0.0.1")


async def test_mbpoll_reads_the_input_register_block(station_abcd) -> None:
    sim, port = station_abcd
    values = await mbpoll(*tcp(port, "-t", "3", "-r", "0", "-c", str(INPUT_REGISTERS.count)))
    assert sorted(values) == list(range(INPUT_REGISTERS.count))
    regs = [int(values[a]) for a in range(INPUT_REGISTERS.count)]
    assert regs[ir("map_version")] == REGISTER_MAP_VERSION
    assert regs[ir("state")] == StationState.IDLE
    assert (
        regs[ir("parent_nuclide")] == NUCLIDE_NUMBERS["Ge-68"]
        and regs[ir("daughter_nuclide")] == NUCLIDE_NUMBERS["Ga-68"]
    )
    assert registers_to_string(words(values, "generator_id")) == "GE68-MB-01"
    assert registers_to_string(words(values, "model")) == sim.model.identity.model


async def test_mbpoll_float_big_endian_matches_the_calibration_activity(station_abcd) -> None:
    sim, port = station_abcd
    values = await mbpoll(*tcp(port, "-B", "-t", "3:float", "-r", str(ir("cal_activity_bq")), "-c", "1"))
    assert float(values[ir("cal_activity_bq")]) == pytest.approx(1.85e9, rel=1e-5)
    counter = await mbpoll(*tcp(port, "-B", "-t", "3:int", "-r", str(ir("cal_time_ns")), "-c", "1"))
    assert int(counter[ir("cal_time_ns")]) == sim.model.column.cal_time_ns // NS_PER_S


async def test_mbpoll_default_word_order_is_cdab() -> None:
    sim = make_simulator(WordOrder.CDAB)
    _, port = await sim.start_tcp()
    try:
        values = await mbpoll(*tcp(port, "-t", "3:float", "-r", str(ir("cal_activity_bq")), "-c", "1"))
    finally:
        await sim.stop()
    assert float(values[ir("cal_activity_bq")]) == pytest.approx(1.85e9, rel=1e-5)


async def test_mbpoll_starts_an_elution_with_the_panel_coil(station_abcd) -> None:
    sim, port = station_abcd
    await mbpoll(*tcp(port, "-B", "-t", "4:float", "-r", "2"), "4.5")
    await mbpoll(*tcp(port, "-t", "0", "-r", "0"), "1")
    assert sim.model.state is StationState.PRIMING
    assert sim.model.requested_volume_ml == 4.5
    coils = await mbpoll(*tcp(port, "-t", "0", "-r", "0", "-c", "3"))
    assert coils == {0: "0", 1: "0", 2: "0"}  # momentary: reads back off
    inputs = await mbpoll(*tcp(port, "-t", "1", "-r", "0", "-c", str(DISCRETE_INPUTS.count)))
    assert inputs[DiscreteInput.PUMP] == "1" and inputs[DiscreteInput.FAULT] == "0"


async def test_mbpoll_reads_rtu_on_the_pty() -> None:
    sim = make_simulator(WordOrder.ABCD)
    path = await sim.start_rtu_pty()
    try:
        values = await mbpoll(
            "-m", "rtu", "-b", "19200", "-P", "none", "-a", "3", "-t", "3", "-r", "0", "-c", "10", path
        )
    finally:
        await sim.stop()
    assert int(values[ir("map_version")]) == REGISTER_MAP_VERSION
    assert registers_to_string(words(values, "model")) == "HL-ES100"
