"""Veenstra/Comecer VIK-202 dose calibrator: ASCII `!` commands at 9600 8N1.

Public: the command set `!R` (activity in Bq), `!Fnnn` (select calibration factor nnn, e.g.
236 Tc-99m, 762 F-18, 587 Cs-137), `!BON`/`!BOFF` (background subtraction), `!Z` (autozero),
`!GQ` (chamber current), `!GV` (firmware version), and replies that start with `>` (`>OK`).

ASSUMPTIONS (not in public documents; the terminators are constructor options):
- commands end with CR (`command_terminator`), replies end with CR LF (`reply_terminator`);
- `!R` answers `>` and the activity in Bq as a decimal or E-notation number, `>7.4000E+08`;
- `!F` with no digits answers the selected factor, `>F236`;
- `!GQ` answers the chamber current in ampere, `>1.2345E-11`;
- a refused or unknown command answers `>ERR` optionally followed by a reason;
- the frame carries no checksum.
The wire does not name the nuclide, only the calibration factor, so the driver maps factors
to nuclides with `factors` (defaults: the three factor numbers quoted above; add the rest from
the factor list printed in the device's manual or on its label). `read()` asks `!F` before
every `!R`, so a factor changed on the front panel is never booked under the old nuclide.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Mapping
from typing import Any

from hotlab.drivers.records import DeviceRefused, DeviceTimeout, FrameError, Reading
from hotlab.drivers.serial_link import SerialDevice, SerialSettings, as_bytes, exclusive, is_printable_ascii
from hotlab.physics.nuclides import UnknownNuclideError, normalize_name

#: Calibration factor numbers quoted for the VIK-202 (nuclide -> factor).
DEFAULT_FACTORS: dict[str, int] = {"Tc-99m": 236, "F-18": 762, "Cs-137": 587}

REPLY_PREFIX = b">"
_NUMBER = re.compile(rb"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d{1,3})?$")
_FACTOR_REPLY = re.compile(rb"^F(\d{1,3})$")
_ERROR = b"ERR"
_OK = re.compile(rb"^OK$")
_ANY = re.compile(rb"")


def parse_reply(frame: bytes, terminator: bytes = b"\r\n") -> bytes:
    """Strip prefix and terminator from one reply frame and return its payload.

    Raises FrameError for anything that is not `>` + printable ASCII + terminator.
    """
    if not frame.endswith(terminator):
        raise FrameError("VIK-202 reply without terminator", frame)
    body = frame[: len(frame) - len(terminator)]
    if not body.startswith(REPLY_PREFIX):
        raise FrameError("VIK-202 reply does not start with '>'", frame)
    payload = body[len(REPLY_PREFIX) :]
    if not is_printable_ascii(payload):
        raise FrameError("VIK-202 reply payload empty or not printable ASCII", frame)
    return payload


def is_error_payload(payload: bytes) -> bool:
    return payload == _ERROR or payload.startswith(_ERROR + b" ")


def parse_number(payload: bytes) -> float:
    """A finite decimal or E-notation number (activity in Bq, current in A)."""
    if not _NUMBER.match(payload):
        raise FrameError("VIK-202 payload is not a number", payload)
    value = float(payload)
    if not math.isfinite(value):
        raise FrameError("VIK-202 number out of range", payload)
    return value


def parse_factor(payload: bytes) -> int:
    match = _FACTOR_REPLY.match(payload)
    if match is None:
        raise FrameError("VIK-202 factor reply is not 'F' and up to three digits", payload)
    return int(match.group(1))


def _reply_kind(command: bytes) -> re.Pattern[bytes]:
    """What a reply to `command` looks like, to tell it from a late reply to another command."""
    if command in (b"!R", b"!GQ"):
        return _NUMBER
    if command == b"!F":
        return _FACTOR_REPLY
    if command == b"!GV":
        return _ANY
    return _OK


class Vik202Driver(SerialDevice):
    """Reads activity (Bq) and switches calibration factors on a VIK-202."""

    default_settings = SerialSettings(baudrate=9600)

    def __init__(
        self,
        url: str,
        device: str,
        *,
        timeout_s: float = 2.0,
        settings: SerialSettings | Mapping[str, Any] | None = None,
        max_identical_readings: int | None = None,
        factors: Mapping[str, int] | None = None,
        command_terminator: bytes | str = b"\r",
        reply_terminator: bytes | str = b"\r\n",
    ) -> None:
        super().__init__(
            url, device, timeout_s=timeout_s, settings=settings, max_identical_readings=max_identical_readings
        )
        table = DEFAULT_FACTORS if factors is None else factors
        self._factor_by_nuclide = {normalize_name(name): int(factor) for name, factor in table.items()}
        self._nuclide_by_factor = {factor: name for name, factor in self._factor_by_nuclide.items()}
        self._command_terminator = as_bytes(command_terminator)
        self._reply_terminator = as_bytes(reply_terminator)
        self.factor: int | None = None

    @property
    def nuclide(self) -> str | None:
        """Nuclide of the selected factor, or None if the factor is not in the table."""
        return None if self.factor is None else self._nuclide_by_factor.get(self.factor)

    async def _after_connect(self) -> None:
        self.factor = parse_factor(await self._command(b"!F"))

    @exclusive
    async def read(self) -> Reading:
        """Ask the selected factor, then the activity: the factor may change on the front panel."""
        self.factor = parse_factor(await self._command(b"!F"))
        frame, payload = await self._exchange(b"!R")
        activity_bq = parse_number(payload)
        self._check_not_frozen(payload)
        extra: dict[str, float | str] = {} if self.factor is None else {"calibration_factor": float(self.factor)}
        return Reading(
            device=self.device,
            nuclide=self.nuclide,
            activity_bq=activity_bq,
            raw_value=activity_bq,
            unit="Bq",
            timestamp_ns=time.time_ns(),
            raw_frame=frame,
            extra=extra,
        )

    @exclusive
    async def select_nuclide(self, name: str) -> None:
        """Select the calibration factor for `name`, then read it back to confirm."""
        try:
            nuclide = normalize_name(name)
        except UnknownNuclideError as exc:
            raise DeviceRefused(str(exc)) from exc
        factor = self._factor_by_nuclide.get(nuclide)
        if factor is None:
            known = ", ".join(sorted(self._factor_by_nuclide))
            raise DeviceRefused(f"no VIK-202 calibration factor configured for {nuclide}; configured: {known}")
        await self._set_factor(factor)

    @exclusive
    async def set_factor(self, factor: int) -> None:
        await self._set_factor(factor)

    async def _set_factor(self, factor: int) -> None:
        if not 0 <= factor <= 999:
            raise DeviceRefused(f"VIK-202 calibration factors have three digits, got {factor}")
        await self._command(b"!F%03d" % factor)
        confirmed = parse_factor(await self._command(b"!F"))
        self.factor = confirmed
        if confirmed != factor:
            raise DeviceRefused(f"VIK-202 kept factor {confirmed} after being asked for {factor}")

    @exclusive
    async def set_background_subtraction(self, enabled: bool) -> None:
        await self._command(b"!BON" if enabled else b"!BOFF")

    @exclusive
    async def autozero(self) -> None:
        await self._command(b"!Z")

    @exclusive
    async def chamber_current_a(self) -> float:
        return parse_number(await self._command(b"!GQ"))

    @exclusive
    async def version(self) -> str:
        return (await self._command(b"!GV")).decode("ascii")

    async def _command(self, command: bytes) -> bytes:
        return (await self._exchange(command))[1]

    async def _exchange(self, command: bytes) -> tuple[bytes, bytes]:
        """Send one command and return its reply frame and payload; `>ERR` becomes DeviceRefused.

        A well-formed reply of another kind (`>F236` while waiting for an activity) is the
        late answer to an earlier, timed-out request: it is skipped, within the same timeout.
        """
        await self._ensure_open()
        self.link.discard_input()
        self.link.write(command + self._command_terminator)
        expected = _reply_kind(command)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while (remaining := deadline - loop.time()) > 0:
            frame = await self.link.read_until(self._reply_terminator, remaining)
            payload = parse_reply(frame, self._reply_terminator)
            if is_error_payload(payload):
                raise DeviceRefused(f"VIK-202 refused {command!r}: {payload.decode('ascii')}")
            if expected.match(payload):
                return frame, payload
        raise DeviceTimeout(f"no reply to {command!r} from {self.url} within {self.timeout_s} s")
