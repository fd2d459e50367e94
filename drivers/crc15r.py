"""Capintec CRC-15R style dose calibrator: `@`-prefixed requests at 4800 baud, checksummed reply.

Public: 4800 baud; the host sends `@` followed by request letters; the reply carries the
nuclide name, a unit code (1 uCi, 2 mCi, 3 Ci, 4 kBq, 5 MBq, 6 GBq) and the activity.

ASSUMPTIONS (the exact layout is not public; each is a constructor option):
- the activity request is `@A` with no terminator (`request`);
- the reply is `A,<nuclide>,<unit code>,<value>*<HH>` + CR LF (`terminator`), e.g.
  `A,Tc99m,5,740.0*2B`, where the nuclide is spelled without a hyphen as on the display;
- HH is the sum of the bytes from `A` up to the last value character, modulo 256, as two
  upper-case hex digits; frames are verified unless `checksum=False`;
- a refused request answers `E,<reason>*<HH>`;
- 8 data bits, no parity, one stop bit (`settings`);
- the nuclide is chosen on the front panel only: `select_nuclide` raises DeviceRefused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from hotlab.drivers.records import ChecksumError, DeviceRefused, FrameError, Reading
from hotlab.drivers.serial_link import (
    DisplayedActivity,
    SerialDevice,
    SerialSettings,
    as_bytes,
    exclusive,
    is_printable_ascii,
)
from hotlab.physics.nuclides import normalize_name

#: Unit codes of the reply, as documented for the CRC-15R serial output.
UNIT_CODES: dict[int, str] = {1: "uCi", 2: "mCi", 3: "Ci", 4: "kBq", 5: "MBq", 6: "GBq"}
UNIT_CODE_BY_NAME: dict[str, int] = {unit: code for code, unit in UNIT_CODES.items()}

_REPORT = re.compile(rb"^A,([A-Za-z]{1,2}\d{1,3}m?),(\d),(-?(?:\d+\.?\d*|\.\d+))$")
_ERROR_PREFIX = b"E,"


def checksum(body: bytes) -> bytes:
    return b"%02X" % (sum(body) % 256)


def parse_frame(frame: bytes, *, terminator: bytes = b"\r\n", verify: bool = True) -> bytes:
    """Check terminator and checksum of one reply frame and return the body before `*`."""
    if not frame.endswith(terminator):
        raise FrameError("CRC-15R frame without terminator", frame)
    text = frame[: len(frame) - len(terminator)]
    body, star, received = text.rpartition(b"*")
    if not star or len(received) != 2 or not all(chr(c) in "0123456789ABCDEF" for c in received):
        raise FrameError("CRC-15R frame does not end in '*' and two hex digits", frame)
    if not is_printable_ascii(body):
        raise FrameError("CRC-15R frame body empty or not printable ASCII", frame)
    if verify and checksum(body) != received:
        raise ChecksumError(f"CRC-15R checksum {received.decode()} != computed {checksum(body).decode()}", frame)
    return body


def is_error_body(body: bytes) -> bool:
    return body.startswith(_ERROR_PREFIX)


def parse_report(body: bytes) -> DisplayedActivity:
    """Decode `A,<nuclide>,<unit code>,<value>` into a DisplayedActivity."""
    match = _REPORT.match(body)
    if match is None:
        raise FrameError("CRC-15R report is not 'A,<nuclide>,<unit code>,<value>'", body)
    unit = UNIT_CODES.get(int(match.group(2)))
    if unit is None:
        raise FrameError(f"CRC-15R unit code {match.group(2).decode()} is not one of 1-6", body)
    value = float(match.group(3))
    if not math.isfinite(value):
        raise FrameError("CRC-15R value out of range", body)
    try:
        nuclide = normalize_name(match.group(1).decode("ascii"))
    except ValueError as exc:
        raise FrameError(f"CRC-15R nuclide unreadable ({exc})", body) from None
    return DisplayedActivity(nuclide=nuclide, unit=unit, value=value)


def wire_name(nuclide: str) -> str:
    """Display spelling: `Tc-99m` -> `Tc99m`."""
    return normalize_name(nuclide).replace("-", "")


class Crc15rDriver(SerialDevice):
    """Reads activity, unit and nuclide from a CRC-15R style calibrator."""

    default_settings = SerialSettings(baudrate=4800)

    def __init__(
        self,
        url: str,
        device: str,
        *,
        timeout_s: float = 2.0,
        settings: SerialSettings | Mapping[str, Any] | None = None,
        max_identical_readings: int | None = None,
        request: bytes | str = b"@A",
        terminator: bytes | str = b"\r\n",
        checksum: bool = True,
    ) -> None:
        super().__init__(
            url, device, timeout_s=timeout_s, settings=settings, max_identical_readings=max_identical_readings
        )
        self._request = as_bytes(request)
        if not self._request.startswith(b"@"):
            raise ValueError(f"CRC-15R requests start with '@', got {request!r}")
        self._terminator = as_bytes(terminator)
        self._verify = checksum

    @exclusive
    async def read(self) -> Reading:
        await self._ensure_open()
        self.link.discard_input()
        self.link.write(self._request)
        frame = await self.link.read_until(self._terminator, self.timeout_s)
        body = parse_frame(frame, terminator=self._terminator, verify=self._verify)
        if is_error_body(body):
            raise DeviceRefused(f"CRC-15R refused {self._request!r}: {body.decode('ascii')}")
        report = parse_report(body)
        return self._reading(report, frame, body)

    async def select_nuclide(self, name: str) -> None:
        """Always refused: the CRC-15R serial output is read-only (assumption, see module doc)."""
        raise DeviceRefused(f"the CRC-15R selects nuclides on its front panel only; cannot select {name!r} remotely")
