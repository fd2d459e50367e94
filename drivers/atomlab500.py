"""Biodex Atomlab 500 dose calibrator: ASCII commands at 19200 8N1 (manual, appendix G).

Public (Atomlab 500/500Plus operation manual, "Serial Communications Interface"):
19200 baud, no parity, 1 stop bit; commands are ASCII, at most 7 letters, ended by CR, a
parameter separated by a space or comma; every reply is ASCII ended by CR LF; a format error
or an out-of-range parameter answers an error message; `^C` (0x03) sends the latest activity
reading without a CR (kept for Atomlab 100/200 compatibility); `ISO` selects the isotope.

ASSUMPTIONS (the report layout is described under the manual's DS command, which is not
public; each is a constructor option):
- the activity report is `<isotope> <value> <unit>`, e.g. `Tc99m 740.0 MBq`, the isotope
  spelled without a hyphen, the unit one of Bq/kBq/MBq/GBq/uCi/mCi/Ci;
- `ISO <isotope>` answers `ISO <isotope>` naming the isotope now selected;
- an error message starts with `ERR`;
- no checksum.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from hotlab.drivers.records import DeviceRefused, FrameError, Reading
from hotlab.drivers.serial_link import (
    DisplayedActivity,
    SerialDevice,
    SerialSettings,
    as_bytes,
    exclusive,
    is_printable_ascii,
)
from hotlab.physics.nuclides import UnknownNuclideError, normalize_name
from hotlab.physics.units import UnitError, canonical_unit

READ_LATEST = b"\x03"
MAX_COMMAND_LETTERS = 7

_REPORT = re.compile(rb"^([A-Za-z]{1,2}-?\d{1,3}m?) +(-?(?:\d+\.?\d*|\.\d+)) +([A-Za-z]{1,4})$")
_ISO_REPLY = re.compile(rb"^ISO[ ,]+([A-Za-z]{1,2}-?\d{1,3}m?)$")
_ERROR_PREFIX = b"ERR"


def parse_line(frame: bytes, terminator: bytes = b"\r\n") -> bytes:
    """Strip the terminator; reject lines that are not printable ASCII."""
    if not frame.endswith(terminator):
        raise FrameError("Atomlab reply without CR LF", frame)
    line = frame[: len(frame) - len(terminator)].strip(b" ")
    if not is_printable_ascii(line):
        raise FrameError("Atomlab reply empty or not printable ASCII", frame)
    return line


def is_error_line(line: bytes) -> bool:
    return line.upper().startswith(_ERROR_PREFIX)


def _nuclide(token: bytes, line: bytes) -> str:
    try:
        return normalize_name(token.decode("ascii"))
    except ValueError as exc:
        raise FrameError(f"Atomlab isotope unreadable ({exc})", line) from None


def parse_report(line: bytes) -> DisplayedActivity:
    match = _REPORT.match(line)
    if match is None:
        raise FrameError("Atomlab report is not '<isotope> <value> <unit>'", line)
    value = float(match.group(2))
    if not math.isfinite(value):
        raise FrameError("Atomlab activity out of range", line)
    try:
        unit = canonical_unit(match.group(3).decode("ascii"))
    except UnitError as exc:
        raise FrameError(f"Atomlab unit unreadable ({exc})", line) from None
    return DisplayedActivity(nuclide=_nuclide(match.group(1), line), value=value, unit=unit)


def parse_iso_reply(line: bytes) -> str:
    match = _ISO_REPLY.match(line)
    if match is None:
        raise FrameError("Atomlab ISO reply is not 'ISO <isotope>'", line)
    return _nuclide(match.group(1), line)


def wire_name(nuclide: str) -> str:
    """Display spelling: `Tc-99m` -> `Tc99m`."""
    return normalize_name(nuclide).replace("-", "")


def format_command(command: str, parameter: str | None = None) -> bytes:
    """A command line as the manual prescribes: <= 7 letters, optional parameter, CR."""
    if not command.isalpha() or len(command) > MAX_COMMAND_LETTERS:
        raise ValueError(f"Atomlab commands are 1-{MAX_COMMAND_LETTERS} letters, got {command!r}")
    text = command if parameter is None else f"{command} {parameter}"
    return text.encode("ascii") + b"\r"


class Atomlab500Driver(SerialDevice):
    """Reads activity with `^C` and selects the isotope with `ISO` on an Atomlab 500."""

    default_settings = SerialSettings(baudrate=19200)

    def __init__(
        self,
        url: str,
        device: str,
        *,
        timeout_s: float = 2.0,
        settings: SerialSettings | Mapping[str, Any] | None = None,
        max_identical_readings: int | None = None,
        read_command: bytes | str = READ_LATEST,
        terminator: bytes | str = b"\r\n",
    ) -> None:
        super().__init__(
            url, device, timeout_s=timeout_s, settings=settings, max_identical_readings=max_identical_readings
        )
        self._read_command = as_bytes(read_command)
        self._terminator = as_bytes(terminator)

    @exclusive
    async def read(self) -> Reading:
        frame, line = await self._exchange(self._read_command)
        report = parse_report(line)
        return self._reading(report, frame, line)

    @exclusive
    async def select_nuclide(self, name: str) -> None:
        """Send `ISO <isotope>` and check the device names the same isotope back."""
        try:
            wanted = normalize_name(name)
        except UnknownNuclideError as exc:
            raise DeviceRefused(str(exc)) from exc
        _, line = await self._exchange(format_command("ISO", wire_name(wanted)))
        selected = parse_iso_reply(line)
        if selected != wanted:
            raise DeviceRefused(f"Atomlab selected {selected} after being asked for {wanted}")

    async def _exchange(self, command: bytes) -> tuple[bytes, bytes]:
        await self._ensure_open()
        self.link.discard_input()
        self.link.write(command)
        frame = await self.link.read_until(self._terminator, self.timeout_s)
        line = parse_line(frame, self._terminator)
        if is_error_line(line):
            raise DeviceRefused(f"Atomlab refused {command!r}: {line.decode('ascii')}")
        return frame, line
