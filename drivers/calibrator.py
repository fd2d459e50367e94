"""What every dose-calibrator driver offers, and the registry that maps a family name to its driver.

The controller's configuration names a family ("vik202") and a serial URL; `create_calibrator`
turns that into a driver without the controller knowing any wire protocol. The shared
behaviour (open by URL, reopen after a drop, timeouts, context manager) lives in
`hotlab.drivers.serial_link.SerialDevice`, which each family subclasses; this module only states
the contract, so it imports the families and none of them imports it.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from hotlab.drivers.atomlab500 import Atomlab500Driver
from hotlab.drivers.crc15r import Crc15rDriver
from hotlab.drivers.records import Reading
from hotlab.drivers.vdc404 import Vdc404Driver
from hotlab.drivers.vik202 import Vik202Driver
from hotlab.errors import InputError


@runtime_checkable
class CalibratorDriver(Protocol):
    """A dose calibrator on one serial URL.

    `read()` returns activity in Bq with the nuclide the device is set to (None when the
    device cannot tell) and raises only `hotlab.drivers.records.DriverError` subclasses:
    DeviceTimeout, DeviceDisconnected (the next call reopens the link), FrameError /
    ChecksumError (the next call starts from a clean buffer) and DeviceRefused.
    `select_nuclide()` raises DeviceRefused where the device cannot be set remotely.
    """

    url: str
    device: str
    timeout_s: float

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def read(self) -> Reading: ...

    async def select_nuclide(self, name: str) -> None: ...

    async def __aenter__(self) -> Any: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


#: Family name (as written in configuration files) -> driver class.
CALIBRATOR_DRIVERS: dict[str, type[Vik202Driver | Crc15rDriver | Vdc404Driver | Atomlab500Driver]] = {
    "vik202": Vik202Driver,
    "crc15r": Crc15rDriver,
    "vdc404": Vdc404Driver,
    "atomlab500": Atomlab500Driver,
}


class UnknownFamilyError(InputError):
    """A calibrator family name that no driver implements."""


def create_calibrator(
    family: str, url: str, device: str, *, timeout_s: float = 2.0, **family_options: Any
) -> CalibratorDriver:
    """Build (not connect) the driver for `family`; options are passed to its constructor."""
    try:
        driver_class = CALIBRATOR_DRIVERS[family.strip().lower()]
    except KeyError:
        known = ", ".join(sorted(CALIBRATOR_DRIVERS))
        raise UnknownFamilyError(f"unknown calibrator family {family!r}; known: {known}") from None
    driver: CalibratorDriver = driver_class(url, device, timeout_s=timeout_s, **family_options)
    return driver
