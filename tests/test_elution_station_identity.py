"""An elution is identified by the station that counted it, not by its counter alone.

A station that is restarted without keeping its counter, serviced, replaced, or whose counter
rolls over counts from 0 again; those elutions must be recorded (and flagged), while the same
elution repeated after a controller restart must still not be.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import pytest

from hotlab.drivers.counter_store import DeliveredElution, MemoryCounterStore, SqliteCounterStore
from hotlab.drivers.elution_station import ElutionStationDriver
from hotlab.drivers.modbus_links import ModbusTcpLink
from hotlab.drivers.records import DeviceDisconnected, ElutionRecord
from hotlab.drivers.station_registers import CommandCode, CommandResult, StationState
from hotlab.physics.utc_time import NS_PER_S, format_utc_ns
from hotlab.simulators.elution_station import ElutionStationSimulator
from tests.test_elution_station import WAIT_S, Make, finished, make, poll_until  # noqa: F401  (make: fixture)

LOGGER = "hotlab.drivers.elution_station"
HOUR_NS = 3_600 * NS_PER_S
#: A last delivered elution: counter 5 of station SIM-1, counted since EPOCH.
EPOCH = 1_790_000_000 * NS_PER_S
END = EPOCH + 40 * HOUR_NS
LAST = DeliveredElution(5, END, "SIM-1", EPOCH)


async def elute_from_the_panel(sim: ElutionStationSimulator) -> None:
    """An elution started on the station itself, run to its end."""
    assert sim.model.execute(CommandCode.START, 5.0) is CommandResult.ACCEPTED
    async with asyncio.timeout(WAIT_S):
        while sim.model.state is not StationState.DONE:
            await asyncio.sleep(0.01)
            sim.model.advance()


async def deliver_next(driver: ElutionStationDriver) -> ElutionRecord:
    """Poll until an elution comes, marking it delivered as the controller does after its commit."""
    records = finished(await poll_until(driver, lambda p: bool(p.finished)))
    assert len(records) == 1, records
    return records[0]


async def test_a_station_restarted_with_its_counter_at_0_yields_both_elutions_the_second_flagged(
    make: Make, caplog
) -> None:
    sim, driver = await make("tcp")
    epoch_before = sim.model.counter_epoch_ns
    await elute_from_the_panel(sim)
    first = await deliver_next(driver)

    sim.power_cycle()
    epoch_after = sim.model.counter_epoch_ns
    assert sim.model.elution_counter == 0 and epoch_after > epoch_before
    await elute_from_the_panel(sim)
    with caplog.at_level("WARNING", logger=LOGGER):
        second = await deliver_next(driver)
        after = await poll_until(driver, lambda p: True)  # and only once

    assert (first.counter, first.station_serial, first.counter_epoch_ns) == (1, "SIM-0001", epoch_before)
    assert first.counter_reset is None
    assert (second.counter, second.station_serial, second.counter_epoch_ns) == (1, "SIM-0001", epoch_after)
    assert second.end_ns == sim.model.last.outcome.end_ns // 1_000_000 * 1_000_000  # the register's ms
    assert second.activity_bq == pytest.approx(sim.model.last.outcome.daughter_bq, rel=1e-6)
    cause = f"counter epoch changed from {format_utc_ns(epoch_before)} to {format_utc_ns(epoch_after)}"
    assert second.counter_reset == f"{cause}; counter 1 -> 1"
    assert finished(after) == []
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert cause in message and "GE68-T-17" in message and "hotcell-2" in message
    assert "last delivered: serial SIM-0001, counter 1" in message and "now: serial SIM-0001, counter 1" in message


async def test_a_restarted_controller_does_not_deliver_the_last_elution_again_after_a_reset(
    make: Make, tmp_path: Path
) -> None:
    store_path = tmp_path / "state" / "hotcell-2.last_counter"
    sim, driver = await make("tcp", counter_store=SqliteCounterStore(store_path))
    await elute_from_the_panel(sim)
    await deliver_next(driver)
    sim.power_cycle()
    await elute_from_the_panel(sim)
    second = await deliver_next(driver)
    assert second.counter_reset is not None
    await driver.close()

    # kill -9 after the commit and the mark: a new driver with the same store, the station unchanged.
    restarted = ElutionStationDriver("hotcell-2", driver.link, last_counter_path=store_path, timeout_s=2.0)
    try:
        polls = [await restarted.poll() for _ in range(3)]
    finally:
        await restarted.close()
    assert [p.finished for p in polls] == [[], [], []]
    stored = SqliteCounterStore(store_path).last_delivered("hotcell-2", "GE68-T-17")
    assert stored == DeliveredElution(1, second.end_ns, "SIM-0001", sim.model.counter_epoch_ns)


async def test_an_unmarked_reset_elution_comes_again_still_flagged(make: Make, tmp_path: Path) -> None:
    """A crash between poll and commit: the flagged elution is replayed, flag and all."""
    store_path = tmp_path / "hotcell-2.last_counter"
    sim, driver = await make("tcp", counter_store=SqliteCounterStore(store_path))
    await elute_from_the_panel(sim)
    await deliver_next(driver)
    sim.power_cycle()
    await elute_from_the_panel(sim)
    async with asyncio.timeout(WAIT_S):
        while True:  # polled, not marked: the connection dropped with the power cycle
            with contextlib.suppress(DeviceDisconnected):
                if pending := (await driver.poll()).finished:
                    break
            await asyncio.sleep(0.05)
    await driver.close()
    replaying = ElutionStationDriver("hotcell-2", driver.link, last_counter_path=store_path, timeout_s=2.0)
    try:
        replayed = (await replaying.poll()).finished
    finally:
        await replaying.close()
    assert replayed == pending and replayed[0].counter_reset is not None


@pytest.mark.parametrize(
    ("held", "reason"),
    [
        (LAST, None),  # the same elution again
        (DeliveredElution(6, END + HOUR_NS, "SIM-1", EPOCH), None),  # the next one
        (DeliveredElution(9, END + HOUR_NS, "SIM-1", EPOCH), None),  # a later one (a gap, not a restart)
        (DeliveredElution(1, END + HOUR_NS, "SIM-2", EPOCH), "station serial changed from 'SIM-1' to 'SIM-2'"),
        (
            DeliveredElution(1, END + HOUR_NS, "SIM-1", EPOCH + 2 * HOUR_NS),
            f"counter epoch changed from {format_utc_ns(EPOCH)} to {format_utc_ns(EPOCH + 2 * HOUR_NS)}",
        ),
        # A station that restarts its count but not its epoch: the counter or the end time tell.
        (DeliveredElution(2, END + HOUR_NS, "SIM-1", EPOCH), "counter went back"),
        (
            DeliveredElution(5, END + HOUR_NS, "SIM-1", EPOCH),
            f"counter 5 came again with end {format_utc_ns(END + HOUR_NS)}, not {format_utc_ns(END)}",
        ),
    ],
)
def test_what_makes_an_elution_start_a_new_count(held: DeliveredElution, reason: str | None) -> None:
    expected = None if reason is None else f"{reason}; counter 5 -> {held.counter}"
    assert held.restart_reason(LAST) == expected


@pytest.mark.parametrize(("counter", "restarted"), [(5, False), (6, False), (1, True)])
def test_a_mark_from_before_map_version_2_compares_the_counter_only(counter: int, restarted: bool) -> None:
    legacy = DeliveredElution(5)
    held = DeliveredElution(counter, END, "SIM-1", EPOCH)
    assert (held.restart_reason(legacy) is not None) is restarted


def test_the_store_keeps_a_mark_written_before_map_version_2(tmp_path: Path) -> None:
    """An upgraded controller must not replay the elution its old store already marked."""
    path = tmp_path / "gen-1.last_counter"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE last_elution (station TEXT NOT NULL, generator_id TEXT NOT NULL, counter INTEGER NOT NULL,"
            " updated_ns INTEGER NOT NULL, PRIMARY KEY (station, generator_id))"
        )
        db.execute("INSERT INTO last_elution VALUES ('hotcell-2', 'GEN-A', 12, 1)")
    store = SqliteCounterStore(path)
    assert store.last_delivered("hotcell-2", "GEN-A") == DeliveredElution(12)
    store.set_last_delivered("hotcell-2", "GEN-A", LAST)
    assert SqliteCounterStore(path).last_delivered("hotcell-2", "GEN-A") == LAST


@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
def test_stores_keep_the_whole_identity_per_station_and_generator(store_kind: str, tmp_path: Path) -> None:
    store = MemoryCounterStore() if store_kind == "memory" else SqliteCounterStore(tmp_path / "c.db")
    other = DeliveredElution(3, END, "SIM-9", EPOCH + HOUR_NS)
    store.set_last_delivered("s1", "GEN-A", LAST)
    store.set_last_delivered("s1", "GEN-B", other)
    assert store.last_delivered("s1", "GEN-A") == LAST
    assert store.last_delivered("s1", "GEN-B") == other
    assert store.last_delivered("s2", "GEN-A") is None


async def test_a_flagged_reset_moves_the_mark_back_and_a_late_older_mark_does_not(tmp_path: Path) -> None:
    store = SqliteCounterStore(tmp_path / "c.db")
    driver = ElutionStationDriver("hotcell-2", ModbusTcpLink("127.0.0.1", 1), counter_store=store)
    common = {"generator_id": "GEN-A", "parent_nuclide": "Ge-68", "daughter_nuclide": "Ga-68"}
    common |= {"activity_bq": 1e9, "volume_ml": 5.0, "start_ns": END - 30 * NS_PER_S, "station_serial": "SIM-1"}
    fifth = ElutionRecord("hotcell-2", counter=5, end_ns=END, counter_epoch_ns=EPOCH, **common)
    fourth = ElutionRecord("hotcell-2", counter=4, end_ns=END - HOUR_NS, counter_epoch_ns=EPOCH, **common)
    after_reset = ElutionRecord(
        "hotcell-2",
        counter=1,
        end_ns=END + HOUR_NS,
        counter_epoch_ns=EPOCH + HOUR_NS,
        counter_reset="counter epoch changed",
        **common,
    )
    await driver.mark_delivered(fifth)
    await driver.mark_delivered(fourth)  # late: the mark stays on the fifth
    assert store.last_delivered("hotcell-2", "GEN-A") == DeliveredElution(5, END, "SIM-1", EPOCH)
    await driver.mark_delivered(after_reset)
    assert store.last_delivered("hotcell-2", "GEN-A") == DeliveredElution(1, END + HOUR_NS, "SIM-1", EPOCH + HOUR_NS)
