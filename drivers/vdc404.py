"""Veenstra VDC-404 dose calibrator in "PC" mode: 9600 baud, the device streams, the host listens.

Public: with the RS-232 option set to "PC" the VDC-404 sends lines `<isotope>: <activity>
<unit>` unprompted, e.g. `Tc-99m: 740.0 MBq` (the isotope padded to a fixed width, as used by
public decay-calculator projects that read this output).

ASSUMPTIONS (each is a constructor option):
- lines end with CR LF (`terminator`); 8 data bits, no parity, one stop bit (`settings`);
- units are the ASCII spellings Bq/kBq/MBq/GBq/uCi/mCi/Ci;
- no checksum;
- nothing can be sent to the device in PC mode: `select_nuclide` raises DeviceRefused.

`read()` drops everything buffered and returns the next complete line, so a slow consumer
never logs a stale activity; if the dropped bytes ended mid-line, the rest of that line is
skipped too. A reading is therefore at most one streaming interval old, and `timeout_s`
must be longer than the device's interval.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from hotlab.drivers.records import DeviceRefused, FrameError, Reading
from hotlab.drivers.serial_link import DisplayedActivity, SerialDevice, SerialSettings, as_bytes, exclusive
from hotlab.physics.nuclides import normalize_name
from hotlab.physics.units import UnitError, canonical_unit

_LINE = re.compile(rb"^ *([A-Za-z]{1,2}-?\d{1,3}m?) *: *(-?(?:\d+\.?\d*|\.\d+)) +([A-Za-z]{1,4}) *$")


def parse_line(frame: bytes, terminator: bytes = b"\r\n") -> DisplayedActivity:
    """Decode one streamed line (terminator included) into nuclide, value and unit."""
    if not frame.endswith(terminator):
        raise FrameError("VDC-404 line without terminator", frame)
    match = _LINE.match(frame[: len(frame) - len(terminator)])
    if match is None:
        raise FrameError("VDC-404 line is not '<isotope>: <activity> <unit>'", frame)
    value = float(match.group(2))
    if not math.isfinite(value):
        raise FrameError("VDC-404 activity out of range", frame)
    try:
        unit = canonical_unit(match.group(3).decode("ascii"))
        nuclide = normalize_name(match.group(1).decode("ascii"))
    except (UnitError, ValueError) as exc:
        raise FrameError(f"VDC-404 line unreadable ({exc})", frame) from None
    return DisplayedActivity(nuclide=nuclide, value=value, unit=unit)


class Vdc404Driver(SerialDevice):
    """Listens to a VDC-404 streaming in PC mode."""

    default_settings = SerialSettings(baudrate=9600)
    streaming = True

    def __init__(
        self,
        url: str,
        device: str,
        *,
        timeout_s: float = 2.0,
        settings: SerialSettings | Mapping[str, Any] | None = None,
        max_identical_readings: int | None = None,
        terminator: bytes | str = b"\r\n",
    ) -> None:
        super().__init__(
            url, device, timeout_s=timeout_s, settings=settings, max_identical_readings=max_identical_readings
        )
        self._terminator = as_bytes(terminator)

    @exclusive
    async def read(self) -> Reading:
        await self._ensure_open()
        stale = self.link.discard_input()
        if stale and not stale.endswith(self._terminator):
            await self.link.read_until(self._terminator, self.timeout_s)  # tail of a cut line
        frame = await self.link.read_until(self._terminator, self.timeout_s)
        line = parse_line(frame, self._terminator)
        return self._reading(line, frame, frame)

    async def select_nuclide(self, name: str) -> None:
        """Always refused: in PC mode the VDC-404 only talks, it does not listen."""
        raise DeviceRefused(f"the VDC-404 in PC mode accepts no commands; select {name!r} on the device")
