"""The controller's event loop choice: uvloop by default, the standard loop on request, drivers on both."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest
import uvloop

from hotlab.controller.config import ConfigError, parse_config
from hotlab.controller.event_loop import loop_factory
from hotlab.drivers.records import DeviceDisconnected
from hotlab.drivers.serial_link import SerialLink, SerialSettings
from tests.test_calibrator_drivers import FAMILIES, TRANSPORTS, assert_matches_physics, calibrator_rig


def _service_config(service: dict[str, object]):  # type: ignore[no-untyped-def]
    return parse_config({"site": {"name": "lab"}, "service": service, "history": {"enabled": False}}, base_dir=None)


def test_uvloop_is_the_default_and_asyncio_can_be_chosen() -> None:
    assert _service_config({}).service.event_loop == "uvloop"
    assert _service_config({"event_loop": "asyncio"}).service.event_loop == "asyncio"
    with pytest.raises(ConfigError, match="'trio' is not allowed; allowed: uvloop, asyncio"):
        _service_config({"event_loop": "trio"})


def test_loop_factory_makes_the_named_loop() -> None:
    for name, loop_type in (("uvloop", uvloop.Loop), ("asyncio", asyncio.BaseEventLoop)):
        loop = loop_factory(name)()
        try:
            assert isinstance(loop, loop_type)
        finally:
            loop.close()
    with pytest.raises(ValueError, match="unknown event loop 'trio'"):
        loop_factory("trio")


def test_without_uvloop_the_standard_loop_runs_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    with caplog.at_level(logging.WARNING):
        factory = loop_factory("uvloop")
    assert factory is asyncio.new_event_loop
    assert "uvloop is not available" in caplog.text


@pytest.mark.parametrize(("family", "transport"), [(f, t) for f in FAMILIES for t in TRANSPORTS])
def test_every_driver_reads_on_uvloop(family: str, transport: str) -> None:
    """pty (pyserial-asyncio-fast transport) and socket:// (the loop's own TCP transport) on uvloop."""

    async def read_twice() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        async with calibrator_rig(family, transport) as rig:
            for _ in range(2):
                assert_matches_physics(await rig.driver.read(), rig.chamber)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(read_twice())


@pytest.mark.parametrize("url", ["socket://127.0.0.1", "socket://:4001", "socket://127.0.0.1:99999"])
async def test_a_socket_url_without_a_usable_port_is_a_clear_disconnect(url: str) -> None:
    link = SerialLink(url, SerialSettings(baudrate=9600))
    with pytest.raises(DeviceDisconnected, match="cannot open socket://"):
        await link.open(timeout_s=1.0)
