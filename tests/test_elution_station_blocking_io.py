"""The elution-station driver does its disk I/O on worker threads, never on the event loop.

A controller polls every device from one loop: a TLS link's CA, certificate and key read at each
reconnect, or the delivered-counter store created (file and table) at start-up, would stall every
other device while the disk (or a network file system) answers.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from hotlab.controller.config import DeviceConfig
from hotlab.controller.sources import StationSource
from hotlab.drivers import elution_station, modbus_links
from hotlab.drivers.counter_store import SqliteCounterStore
from hotlab.drivers.elution_station import ElutionStationDriver
from hotlab.drivers.modbus_links import ModbusTcpLink, ModbusTlsLink
from hotlab.drivers.records import DeviceDisconnected
from tests.test_elution_station import WHO, Make, make, poll_until  # noqa: F401  (make: fixture)


async def test_a_tls_links_certificate_files_are_read_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop_thread = threading.get_ident()
    readers: list[int] = []

    def unreadable(*args: object) -> None:
        readers.append(threading.get_ident())
        raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "ca.crt"))

    monkeypatch.setattr(modbus_links, "modbus_tls_context", unreadable)
    link = ModbusTlsLink("127.0.0.1", tmp_path / "ca.crt", tmp_path / "c.crt", tmp_path / "c.key", port=1)
    driver = ElutionStationDriver("hotcell-2", link, timeout_s=0.5)
    with pytest.raises(DeviceDisconnected, match="No such file or directory"):
        await driver.connect()
    assert readers and loop_thread not in readers


async def test_the_counter_store_is_created_on_a_worker_thread_when_first_needed(
    make: Make,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state_dir = tmp_path / "state"
    device = DeviceConfig(name="gen-1", station="hotcell-2", family="elution_station", transport=ModbusTcpLink("h", 1))
    StationSource(device, state_dir)
    assert not state_dir.exists(), "building the source (on the loop, at start-up) must not touch the disk"

    loop_thread = threading.get_ident()
    openers: list[int] = []

    class RecordingStore(SqliteCounterStore):
        def __init__(self, path: Path | str) -> None:
            openers.append(threading.get_ident())
            super().__init__(path)

    monkeypatch.setattr(elution_station, "SqliteCounterStore", RecordingStore)
    _sim, simulated = await make("tcp")
    driver = ElutionStationDriver("hotcell-2", simulated.link, last_counter_path=state_dir / "gen-1.last_counter")
    try:
        await driver.start_elution(5.0, **WHO)
        await poll_until(driver, lambda poll: bool(poll.finished))  # marks it delivered: the store is needed
    finally:
        await driver.close()
    assert openers and loop_thread not in openers
    assert (state_dir / "gen-1.last_counter").is_file()
