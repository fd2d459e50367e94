"""Elution station driver against the Modbus simulator on real transports (TCP, RTU over TCP, RTU on a pty)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes

from hotlab.controller.config import ModbusRtuTransport, ModbusTcpTransport, parse_config
from hotlab.controller.messages import elution_message
from hotlab.drivers.counter_store import DeliveredElution, MemoryCounterStore, SqliteCounterStore
from hotlab.drivers.elution_station import (
    CommandOutcomeUnknown,
    CommandRefused,
    ElutionStationDriver,
    NotAuthorised,
    StationPoll,
)
from hotlab.drivers.modbus_links import ModbusRtuLink, ModbusTcpLink
from hotlab.drivers.modbus_words import WordOrder, float32_to_registers
from hotlab.drivers.records import DeviceDisconnected, DeviceRefused, DeviceTimeout, ElutionRecord, FrameError
from hotlab.drivers.station_registers import (
    HOLDING_REGISTERS,
    INPUT_REGISTERS,
    CommandCode,
    CommandResult,
    DiscreteInput,
    FaultCode,
    StationState,
    decode_status,
    encode_command,
    encode_status,
)
from hotlab.physics.decay import generator_daughter_activity
from hotlab.physics.utc_time import NS_PER_S
from hotlab.simulators.elution_station import ElutionStationSimulator, StationClock, StationModel
from hotlab.simulators.generator_physics import GeneratorColumn, get_profile

#: Station clock speed-up: an 8 s priming + 20 s elution takes 0.28 s of test time.
FAST = 100.0
WAIT_S = 15.0
DAY_NS = 86_400 * NS_PER_S
#: Column age at the test: a Ge-68 generator lasts about a year, a Mo-99 one about two weeks.
CAL_AGE_DAYS = {"ge68": 40, "mo99": 1}
WHO = {"user": "r.curie", "reason": "morning QC elution"}
CMD_SEQ = HOLDING_REGISTERS["cmd_seq"].address

Make = Callable[..., Awaitable[tuple[ElutionStationSimulator, ElutionStationDriver]]]


def ir(name: str) -> int:
    """The address of input register `name`."""
    return INPUT_REGISTERS[name].address


def make_model(generator: str = "ge68", acceleration: float = FAST) -> StationModel:
    clock = StationClock(acceleration)
    now_s = clock.now_ns() // NS_PER_S
    profile = get_profile(generator)
    column = GeneratorColumn(
        profile,
        generator_id=f"{generator.upper()}-T-17",
        parent_cal_bq=profile.nominal_cal_bq,
        cal_time_ns=(now_s - CAL_AGE_DAYS[generator] * 86_400) * NS_PER_S,
        last_elution_ns=(now_s - 5 * 3_600) * NS_PER_S,
        elution_count=0,
    )
    return StationModel(column, clock)


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    """Start a simulator on the given transport and a driver pointed at it; everything is closed afterwards."""
    started: list[tuple[ElutionStationSimulator, ElutionStationDriver]] = []

    async def factory(
        transport: str = "tcp",
        *,
        model: StationModel | None = None,
        word_order: WordOrder = WordOrder.ABCD,
        counter_store=None,
        timeout_s: float = 2.0,
    ) -> tuple[ElutionStationSimulator, ElutionStationDriver]:
        sim = ElutionStationSimulator(model or make_model(), device_id=7, word_order=word_order)
        if transport == "tcp":
            host, port = await sim.start_tcp()
            link: ModbusTcpLink | ModbusRtuLink = ModbusTcpLink(host, port, device_id=7, word_order=word_order.value)
        elif transport == "rtu-tcp":
            host, port = await sim.start_tcp(rtu_framing=True)
            link = ModbusRtuLink(f"socket://{host}:{port}", device_id=7, word_order=word_order.value)
        else:
            link = ModbusRtuLink(await sim.start_rtu_pty(), baudrate=115200, device_id=7, word_order=word_order.value)
        driver = ElutionStationDriver(
            "hotcell-2",
            link,
            counter_store=counter_store or MemoryCounterStore(),
            timeout_s=timeout_s,
            backoff_initial_s=0.05,
            backoff_max_s=0.2,
        )
        started.append((sim, driver))
        return sim, driver

    yield factory
    for sim, driver in started:
        await driver.close()
        await sim.stop()


async def poll_until(driver: ElutionStationDriver, done: Callable[[StationPoll], bool]) -> list[StationPoll]:
    """Poll until `done`, marking each finished record delivered as the controller does after its
    outbox commit; disconnects on the way are retried. Returns every successful poll."""
    polls: list[StationPoll] = []
    async with asyncio.timeout(WAIT_S):
        while True:
            try:
                poll = await driver.poll()
            except DeviceDisconnected:
                await asyncio.sleep(0.05)
                continue
            for record in poll.finished:
                await driver.mark_delivered(record)
            polls.append(poll)
            if done(poll):
                return polls
            await asyncio.sleep(0.005)


def finished(polls: list[StationPoll]):
    return [record for poll in polls for record in poll.finished]


@pytest.mark.parametrize(
    ("transport", "generator"), [("tcp", "ge68"), ("rtu-tcp", "ge68"), ("rtu-pty", "ge68"), ("tcp", "mo99")]
)
async def test_elution_end_to_end_yields_one_record_with_bateman_activity(
    make: Make, transport: str, generator: str
) -> None:
    sim, driver = await make(transport, model=make_model(generator))
    column = sim.model.column
    profile = column.profile
    first = await driver.poll()
    assert first.state is StationState.IDLE and first.finished == []
    assert first.status.generator_id == f"{generator.upper()}-T-17"
    assert (first.status.parent_nuclide, first.status.daughter_nuclide) == (profile.parent, profile.daughter)
    assert first.status.cal_time_ns == column.cal_time_ns
    last_elution_ns, residual, count = column.last_elution_ns, column.residual_daughter_bq, column.elution_count

    outcome = await driver.start_elution(5.0, **WHO)
    assert (outcome.action, outcome.user, outcome.reason) == ("elution.start", "r.curie", "morning QC elution")
    assert outcome.old_state is StationState.IDLE
    # The state read with the acknowledgement: priming, unless this machine was slow enough to miss it.
    assert outcome.new_state in {StationState.PRIMING, StationState.ELUTING, StationState.DONE}
    assert outcome.parameters == {"volume_ml": 5.0}

    polls = await poll_until(driver, lambda p: p.state is StationState.DONE)
    polls += await poll_until(driver, lambda p: True)  # one more: the record must not come again
    records = finished(polls)
    assert len(records) == 1
    record = records[0]
    assert (record.station, record.generator_id, record.counter) == ("hotcell-2", f"{generator.upper()}-T-17", 1)
    assert record.volume_ml == 5.0
    assert record.line_dose_rate_usv_h == pytest.approx(profile.line_dose_rate_usv_h(record.activity_bq), rel=1e-6)
    assert record.duration_s == pytest.approx(5.0 / profile.flow_ml_per_s, abs=0.002)
    available = float(
        generator_daughter_activity(
            column.parent_cal_bq,
            column.cal_time_ns,
            profile.parent,
            profile.daughter,
            last_elution_ns,
            record.end_ns,
            residual,
        )
    )
    expected_yield = profile.elution_yield((record.end_ns - column.cal_time_ns) / NS_PER_S, count)
    assert record.activity_bq == pytest.approx(available * expected_yield, rel=1e-6)
    # The station's own breakthrough measurement reaches the record and the message.
    age_s = (record.end_ns - column.cal_time_ns) / NS_PER_S
    assert record.parent_bq == pytest.approx(record.activity_bq * profile.breakthrough_fraction(age_s), rel=1e-5)
    breakthrough_pct = elution_message("lab", record).payload["breakthrough_pct"]
    assert breakthrough_pct == pytest.approx(100 * profile.breakthrough_fraction(age_s), rel=1e-5)


async def test_states_valves_and_dose_rate_follow_the_elution(make: Make) -> None:
    sim, driver = await make("tcp", model=make_model(acceleration=16.0))  # priming 0.5 s, eluting 1.25 s
    await driver.start_elution(5.0, **WHO)
    polls = await poll_until(driver, lambda p: p.state is StationState.DONE)
    by_state = {p.state: p.status for p in polls}
    priming, eluting = by_state[StationState.PRIMING], by_state[StationState.ELUTING]
    assert priming.output_on(DiscreteInput.VALVE_WASTE) and priming.output_on(DiscreteInput.PUMP)
    assert not priming.output_on(DiscreteInput.VALVE_PRODUCT)
    assert eluting.output_on(DiscreteInput.VALVE_PRODUCT) and not eluting.output_on(DiscreteInput.VALVE_WASTE)
    assert eluting.line_dose_rate_usv_h > 10 * sim.model.profile.background_usv_h
    assert by_state[StationState.DONE].outputs == 0


@pytest.mark.parametrize("order", list(WordOrder))
async def test_every_word_order_decodes_the_same_values(make: Make, order: WordOrder) -> None:
    sim, driver = await make("tcp", word_order=order)
    status = (await driver.poll()).status
    assert status.cal_activity_bq == pytest.approx(sim.model.column.parent_cal_bq, rel=1e-7)
    assert status.generator_id == "GE68-T-17"
    assert status.clock_ns > status.cal_time_ns


async def test_delivered_once_across_dropped_connections(make: Make) -> None:
    sim, driver = await make("tcp")
    await driver.start_elution(5.0, **WHO)
    sim.drop_connections()  # mid-priming
    polls = await poll_until(driver, lambda p: p.state is StationState.DONE)
    sim.drop_connections()  # after the record was handed over
    with pytest.raises(DeviceDisconnected):
        for _ in range(50):  # the client notices the closed socket on its next request at the latest
            await driver.poll()
            await asyncio.sleep(0.01)
    polls += await poll_until(driver, lambda p: True)
    records = finished(polls)
    assert [r.counter for r in records] == [1]


async def test_delivered_once_across_a_controller_restart(make: Make, tmp_path: Path) -> None:
    store_path = tmp_path / "state" / "hotcell-2.last_counter"
    model = make_model()
    sim, driver = await make("tcp", model=model, counter_store=SqliteCounterStore(store_path))
    await driver.start_elution(5.0, **WHO)
    first = finished(await poll_until(driver, lambda p: bool(p.finished)))
    await driver.close()

    # A new driver (a restarted controller) with the same store sees the elution already emitted.
    restarted = ElutionStationDriver("hotcell-2", driver.link, last_counter_path=store_path, timeout_s=2.0)
    try:
        assert (await restarted.poll()).finished == []
        await restarted.start_elution(5.0, **WHO)
        second = finished(await poll_until(restarted, lambda p: p.state is StationState.DONE))
        second += finished(await poll_until(restarted, lambda p: True))
    finally:
        await restarted.close()
    assert [r.counter for r in first] == [1]
    assert [r.counter for r in second] == [2]
    assert [r.counter_reset for r in first + second] == [None, None]
    assert SqliteCounterStore(store_path).last_delivered("hotcell-2", "GE68-T-17") == DeliveredElution(
        2, second[0].end_ns, "SIM-0001", model.counter_epoch_ns
    )


async def test_start_is_refused_while_priming_or_eluting(make: Make) -> None:
    sim, driver = await make("tcp", model=make_model(acceleration=20.0))  # priming 0.4 s, eluting 1 s
    await driver.start_elution(5.0, **WHO)
    sim.set_stuck()  # hold it in priming, however slow this machine is today
    with pytest.raises(CommandRefused, match="station is priming") as refused:
        await driver.start_elution(5.0, **WHO)
    assert refused.value.state is StationState.PRIMING
    sim.set_stuck(False)
    await poll_until(driver, lambda p: p.state is StationState.ELUTING)
    sim.set_stuck()  # a station whose state machine hangs mid-elution
    with pytest.raises(CommandRefused, match="station is eluting"):
        await driver.start_elution(5.0, **WHO)
    outcome = await driver.abort(user="r.curie", reason="station hung")
    assert outcome.old_state is StationState.ELUTING and outcome.new_state is StationState.DONE


async def test_start_is_refused_in_fault_until_acknowledged(make: Make) -> None:
    sim, driver = await make("tcp")
    sim.raise_fault(FaultCode.OVERPRESSURE)
    poll = await driver.poll()
    assert poll.state is StationState.FAULT and poll.status.fault_code == FaultCode.OVERPRESSURE
    assert poll.status.output_on(DiscreteInput.FAULT)
    with pytest.raises(CommandRefused, match=r"station is fault \(fault code 1\)"):
        await driver.start_elution(5.0, **WHO)
    with pytest.raises(CommandRefused, match="allowed only when eluting or priming"):
        await driver.abort(**WHO)
    ack = await driver.acknowledge_fault(user="r.curie", reason="pressure line cleared")
    assert (ack.action, ack.old_state, ack.new_state) == ("fault.acknowledge", StationState.FAULT, StationState.IDLE)
    assert (await driver.start_elution(5.0, **WHO)).new_state in {StationState.PRIMING, StationState.ELUTING}


@pytest.mark.parametrize(
    ("who", "message"),
    [({}, "no user"), ({"user": "  ", "reason": "x"}, "no user"), ({"user": "r.curie"}, "no reason")],
)
async def test_commands_without_authorisation_never_reach_the_station(make: Make, who: dict, message: str) -> None:
    sim, driver = await make("tcp")
    before = sim.requests_seen
    with pytest.raises(NotAuthorised, match=message):
        await driver.start_elution(5.0, **who)
    with pytest.raises(NotAuthorised):
        await driver.acknowledge_fault(**who)
    assert sim.requests_seen == before
    assert sim.model.state is StationState.IDLE


async def test_station_refuses_a_volume_outside_its_range(make: Make) -> None:
    sim, driver = await make("tcp")
    with pytest.raises(CommandRefused, match="volume 50 mL outside"):
        await driver.start_elution(50.0, **WHO)
    assert sim.model.state is StationState.IDLE


async def test_station_checks_state_itself_and_ignores_a_repeated_sequence(make: Make) -> None:
    """A client that skips the driver's checks still cannot start twice; a retried write runs once."""
    sim, driver = await make("tcp", model=make_model(acceleration=1.0))
    status = await driver.poll()
    port = driver.link.port  # type: ignore[attr-defined]
    raw = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2.0)
    await raw.connect()
    try:
        command = encode_command(41, CommandCode.START, 5.0, WordOrder.ABCD)
        await raw.write_registers(CMD_SEQ, command, device_id=7)
        await raw.write_registers(CMD_SEQ, command, device_id=7)  # a Modbus-level retry
        assert sim.model.cmd_result is CommandResult.ACCEPTED and sim.model.cmd_ack_seq == 41
        await raw.write_registers(CMD_SEQ, encode_command(42, CommandCode.START, 5.0, WordOrder.ABCD), device_id=7)
        assert sim.model.cmd_result is CommandResult.REFUSED_STATE and sim.model.cmd_ack_seq == 42
        await raw.write_registers(CMD_SEQ, [43, 99, 0, 0], device_id=7)
        assert sim.model.cmd_result is CommandResult.UNKNOWN_COMMAND
    finally:
        raw.close()
    assert status.status.cmd_ack_seq == 0
    assert sim.model.state is StationState.PRIMING


async def test_a_command_the_station_never_acknowledges_is_refused_as_unconfirmed(make: Make) -> None:
    sim, driver = await make("tcp")
    driver.confirm_timeout_s = 0.3
    sim.ignore_commands()
    with pytest.raises(CommandRefused, match="not confirmed: station did not acknowledge command 1 within 0.3 s"):
        await driver.start_elution(5.0, **WHO)
    assert sim.model.state is StationState.IDLE


async def test_exception_response_becomes_device_refused(make: Make) -> None:
    sim, driver = await make("tcp")
    sim.inject_exception(ExcCodes.DEVICE_BUSY)
    with pytest.raises(DeviceRefused, match=r"Modbus exception 6 \(DEVICE_BUSY\)"):
        await driver.poll()
    assert (await driver.poll()).state is StationState.IDLE


@pytest.mark.parametrize("transport", ["tcp", "rtu-pty"])
async def test_no_reply_becomes_device_timeout_and_the_next_poll_works(make: Make, transport: str) -> None:
    sim, driver = await make(transport, timeout_s=0.3)
    sim.inject_silence(1)
    with pytest.raises(DeviceTimeout, match="no reply"):
        await driver.poll()
    assert (await driver.poll()).state is StationState.IDLE


async def test_unreachable_station_is_disconnected_with_backoff(make: Make) -> None:
    sim, driver = await make("tcp")
    await sim.stop()
    with pytest.raises(DeviceDisconnected, match="cannot connect"):
        await driver.poll()
    with pytest.raises(DeviceDisconnected, match="next attempt in"):
        await driver.poll()


async def test_missing_serial_port_is_disconnected() -> None:
    driver = ElutionStationDriver("hotcell-2", ModbusRtuLink("/dev/hotlab-no-such-tty"), timeout_s=0.5)
    with pytest.raises(DeviceDisconnected, match="cannot connect to modbus rtu /dev/hotlab-no-such-tty"):
        await driver.poll()
    await driver.close()


async def test_the_config_builds_the_drivers_own_link(make: Make) -> None:
    """One link description for config and driver: a validated [[device]] transport drives a station as it is."""
    _sim, driver = await make("tcp")
    link = driver.link
    assert ModbusTcpTransport is ModbusTcpLink and ModbusRtuTransport is ModbusRtuLink
    config = parse_config(
        {
            "site": {"name": "lab"},
            "device": [
                {
                    "name": "gen-1",
                    "station": "hotcell-2",
                    "family": "elution_station",
                    "transport": {"modbus": "tcp", "host": link.host, "port": link.port, "device_id": 7},
                }
            ],
        }
    )  # type: ignore[attr-defined]
    transport = config.devices[0].transport
    assert isinstance(transport, ModbusTcpLink)
    other = ElutionStationDriver("hotcell-2", transport, timeout_s=1.0)
    try:
        assert (await other.poll()).status.model == "HL-ES100"
    finally:
        await other.close()


def test_status_block_round_trips_and_rejects_garbage() -> None:
    model = make_model("mo99")
    status = model.status()
    for order in WordOrder:
        decoded = decode_status(encode_status(status, order), order)
        assert decoded.parent_nuclide == "Mo-99" and decoded.daughter_nuclide == "Tc-99m"
        assert decoded.state is status.state and decoded.elution_counter == status.elution_counter
        assert decoded.clock_ns == status.clock_ns // 1_000_000 * 1_000_000
    regs = encode_status(status, WordOrder.ABCD)
    with pytest.raises(FrameError, match="unknown station state 9"):
        decode_status(regs[: ir("state")] + [9] + regs[ir("state") + 1 :], WordOrder.ABCD)
    with pytest.raises(FrameError, match="map version 1, driver speaks 2"):  # a station without the epoch
        decode_status([1] + regs[1:], WordOrder.ABCD)
    with pytest.raises(FrameError, match=f"expected {INPUT_REGISTERS.count}"):
        decode_status(regs[:10], WordOrder.ABCD)


async def test_elutions_missed_while_away_yield_only_the_last_and_a_warning(make: Make, caplog) -> None:
    """The station keeps one elution; two finished unseen means one record (the last) and a logged gap."""
    sim, driver = await make("tcp")
    await driver.start_elution(5.0, **WHO)
    assert [r.counter for r in finished(await poll_until(driver, lambda p: bool(p.finished)))] == [1]
    for _ in range(2):  # operated from the panel while the controller was away
        assert sim.model.execute(CommandCode.START, 5.0) is CommandResult.ACCEPTED
        async with asyncio.timeout(WAIT_S):
            while sim.model.state is not StationState.DONE:
                await asyncio.sleep(0.01)
                sim.model.advance()
    with caplog.at_level("WARNING", logger="hotlab.drivers.elution_station"):
        poll = await driver.poll()
    assert [r.counter for r in poll.finished] == [3]
    assert poll.finished[0].activity_bq == pytest.approx(sim.model.last.outcome.daughter_bq, rel=1e-6)
    assert "jumped from 1 to 3" in caplog.text and "1 elution(s) in between" in caplog.text


async def test_a_record_comes_back_until_marked_delivered(make: Make, tmp_path: Path) -> None:
    """The controller may die between poll() and its outbox commit: the record must come again."""
    store_path = tmp_path / "hotcell-2.last_counter"
    _sim, driver = await make("tcp", counter_store=SqliteCounterStore(store_path))
    await driver.start_elution(5.0, **WHO)
    async with asyncio.timeout(WAIT_S):
        while (first := await driver.poll()).finished == []:
            await asyncio.sleep(0.01)
    second = await driver.poll()
    assert second.finished == first.finished and [r.counter for r in first.finished] == [1]

    link = driver.link
    not_yet_marked = ElutionStationDriver("hotcell-2", link, last_counter_path=store_path, timeout_s=2.0)
    try:  # a restart before delivery was confirmed replays the record
        assert (await not_yet_marked.poll()).finished == first.finished
    finally:
        await not_yet_marked.close()

    await driver.mark_delivered(first.finished[0])
    assert (await driver.poll()).finished == []
    assert (await driver.poll()).finished == []
    assert SqliteCounterStore(store_path).last_delivered("hotcell-2", "GE68-T-17").counter == 1

    after_mark = ElutionStationDriver("hotcell-2", link, last_counter_path=store_path, timeout_s=2.0)
    try:  # a restart after delivery does not
        assert (await after_mark.poll()).finished == []
    finally:
        await after_mark.close()


async def test_marking_is_idempotent_and_checks_the_station(tmp_path: Path) -> None:
    store = SqliteCounterStore(tmp_path / "c.db")
    driver = ElutionStationDriver("hotcell-2", ModbusTcpLink("127.0.0.1", 1), counter_store=store)
    record = {
        "generator_id": "GEN-A",
        "parent_nuclide": "Ge-68",
        "daughter_nuclide": "Ga-68",
        "activity_bq": 1e9,
        "volume_ml": 5.0,
        "start_ns": 0,
        "end_ns": 1,
    }
    await driver.mark_delivered(ElutionRecord("hotcell-2", counter=4, **record))
    await driver.mark_delivered(ElutionRecord("hotcell-2", counter=3, **record))  # a late, older one
    await driver.mark_delivered(ElutionRecord("hotcell-2", counter=4, **record))
    assert store.last_delivered("hotcell-2", "GEN-A") == DeliveredElution(4, 1)
    with pytest.raises(ValueError, match="station 'hotcell-9'"):
        await driver.mark_delivered(ElutionRecord("hotcell-9", counter=5, **record))
    assert store.last_delivered("hotcell-2", "GEN-A") == DeliveredElution(4, 1)


async def test_a_pending_record_logs_its_gap_once(make: Make, caplog) -> None:
    sim, driver = await make("tcp")
    await driver.start_elution(5.0, **WHO)
    await poll_until(driver, lambda p: bool(p.finished))
    for _ in range(2):
        assert sim.model.execute(CommandCode.START, 5.0) is CommandResult.ACCEPTED
        async with asyncio.timeout(WAIT_S):
            while sim.model.state is not StationState.DONE:
                await asyncio.sleep(0.01)
                sim.model.advance()
    with caplog.at_level("WARNING", logger="hotlab.drivers.elution_station"):
        polls = [await driver.poll() for _ in range(3)]
    assert [[r.counter for r in p.finished] for p in polls] == [[3], [3], [3]]
    assert caplog.text.count("jumped from 1 to 3") == 1


def _non_finite_words(order: WordOrder) -> dict[int, list[int]]:
    return {
        ir("eluate_activity_bq"): float32_to_registers(math.nan, order),
        ir("line_dose_rate_usv_h"): float32_to_registers(math.inf, order),
    }


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_codec_rejects_non_finite_floats(value: float) -> None:
    status = make_model().status()
    for order in WordOrder:
        regs = encode_status(status, order)
        regs[ir("eluate_parent_bq") : ir("eluate_parent_bq") + 2] = float32_to_registers(value, order)
        with pytest.raises(FrameError, match=f"non-finite float32 .* at input register {ir('eluate_parent_bq')}"):
            decode_status(regs, order)


async def test_station_serving_nan_is_a_frame_error_and_polling_goes_on(make: Make) -> None:
    sim, driver = await make("tcp", word_order=WordOrder.CDAB)
    sim.override_input_registers(_non_finite_words(WordOrder.CDAB))
    with pytest.raises(FrameError, match=f"non-finite float32 nan at input register {ir('eluate_activity_bq')}"):
        await driver.poll()
    sim.override_input_registers(
        {
            ir("eluate_activity_bq"): float32_to_registers(1e9, WordOrder.CDAB),
            ir("line_dose_rate_usv_h"): float32_to_registers(math.inf, WordOrder.CDAB),
        }
    )
    with pytest.raises(FrameError, match=f"non-finite float32 inf at input register {ir('line_dose_rate_usv_h')}"):
        await driver.poll()
    sim.override_input_registers({})
    assert (await driver.poll()).status.line_dose_rate_usv_h == pytest.approx(sim.model.profile.background_usv_h)


@pytest.mark.parametrize(("transport", "disconnect"), [("tcp", False), ("tcp", True), ("rtu-pty", False)])
async def test_a_lost_write_reply_is_confirmed_from_the_acknowledgement(
    make: Make, transport: str, disconnect: bool
) -> None:
    """The station ran the command but its reply never arrived: the driver must still confirm and report it."""
    sim, driver = await make(transport, timeout_s=1.0)  # the lost reply costs one timeout; no shorter under load
    sim.lose_command_replies(1, disconnect=disconnect)
    outcome = await driver.start_elution(5.0, **WHO)
    assert (outcome.action, outcome.user, outcome.sequence) == ("elution.start", "r.curie", 1)
    assert outcome.old_state is StationState.IDLE and outcome.new_state is not StationState.IDLE
    assert sim.model.cmd_ack_seq == 1 and sim.model.state is not StationState.IDLE


async def test_a_lost_write_reply_with_no_readable_ack_is_outcome_unknown(make: Make) -> None:
    sim, driver = await make("tcp", timeout_s=0.5)
    driver.confirm_timeout_s = 1.0
    sim.lose_command_replies(1, silent_after=1_000)  # the station acts, then hangs
    with pytest.raises(CommandOutcomeUnknown, match="elution.start by r.curie unconfirmed") as unknown:
        await driver.start_elution(5.0, **WHO)
    assert not isinstance(unknown.value, CommandRefused)  # "unconfirmed" must not be audited as "refused"
    exc = unknown.value
    assert (exc.action, exc.station, exc.user, exc.reason, exc.seq) == (
        "elution.start",
        "hotcell-2",
        "r.curie",
        "morning QC elution",
        1,
    )
    assert exc.old_state is StationState.IDLE and exc.parameters == {"volume_ml": 5.0}
    assert sim.model.state is not StationState.IDLE  # it did run: that is why it must be audited
    sim.inject_silence(0)
    assert (await poll_until(driver, lambda p: True))[0].status.cmd_ack_seq == 1
