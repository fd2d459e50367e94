"""Fault injection for simulated instruments, switchable while the simulator runs.

A fault fires on a reply when it is armed for a number of replies (`arm`, what tests use to
hit exactly the next reply), enabled until disabled (`enable`), or drawn at a rate from a
seeded RNG (`set_rate`, what the CLI uses for a flaky-cable soak). The kinds cover what a
serial line and a tired instrument actually do: line noise, lost and late replies, a pulled
cable, a display frozen on one value, a corrupted checksum, and a bit flipped in a digit, which
a protocol without a checksum cannot see (the controller's plausibility check has to).
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections.abc import Callable
from typing import Protocol, TypeVar

T = TypeVar("T")


class Fault(enum.StrEnum):
    GARBAGE = "garbage"  # line noise before the reply
    DROP = "drop"  # the reply never comes
    LATE = "late"  # the reply comes after `late_s`
    DISCONNECT = "disconnect"  # the cable is pulled (TCP closed, pty hung up)
    STUCK = "stuck"  # the value stops changing
    BAD_CHECKSUM = "bad_checksum"  # one checksum bit flipped (protocols with a checksum)
    BIT_FLIP = "bit_flip"  # the lowest bit of one digit flipped: still a valid number, a different value


class Channel(Protocol):
    """The bit of a serial host that fault delivery needs."""

    def write(self, data: bytes) -> None: ...

    def hang_up(self) -> None: ...


class FaultInjector:
    """Decides, reply by reply, which faults fire."""

    def __init__(self, *, seed: int = 0, late_s: float = 3.0, garbage_bytes: int = 12) -> None:
        self.late_s = late_s
        self.garbage_bytes = garbage_bytes
        self._rng = random.Random(seed)
        self._armed: dict[Fault, int] = {}
        self._enabled: set[Fault] = set()
        self._rates: dict[Fault, float] = {}
        self._held: object | None = None

    def arm(self, fault: Fault, times: int = 1) -> None:
        """Make `fault` fire on the next `times` replies."""
        if times < 1:
            raise ValueError(f"times must be >= 1, got {times}")
        self._armed[fault] = self._armed.get(fault, 0) + times

    def enable(self, fault: Fault) -> None:
        self._enabled.add(fault)

    def disable(self, fault: Fault) -> None:
        self._enabled.discard(fault)
        self._armed.pop(fault, None)
        self._rates.pop(fault, None)

    def set_rate(self, fault: Fault, probability: float) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"a fault rate is a probability in [0, 1], got {probability}")
        self._rates[fault] = probability

    def clear(self) -> None:
        self._armed.clear()
        self._enabled.clear()
        self._rates.clear()
        self._held = None

    def fires(self, fault: Fault) -> bool:
        """True if `fault` applies to the reply being made now (consumes one armed shot)."""
        armed = self._armed.get(fault, 0)
        if armed:
            if armed == 1:
                del self._armed[fault]
            else:
                self._armed[fault] = armed - 1
            return True
        if fault in self._enabled:
            return True
        rate = self._rates.get(fault, 0.0)
        return rate > 0.0 and self._rng.random() < rate

    def hold(self, fresh: Callable[[], T]) -> T:
        """The value to report: the previous one while STUCK fires, else a fresh one."""
        if self._held is not None and self.fires(Fault.STUCK):
            return self._held  # type: ignore[return-value]
        value = fresh()
        self._held = value
        return value

    def flip_digit(self, frame: bytes) -> bytes:
        """`frame` with the lowest bit of one of its digits flipped (0<->1, 8<->9, ...).

        A digit stays a digit, so the frame still parses: `>7.4000E+09` may become `>7.4000E+08`
        or `>7.4000E+19`, as in a line error that flips one bit. A frame without digits is kept.
        """
        digits = [index for index, byte in enumerate(frame) if 0x30 <= byte <= 0x39]
        if not digits:
            return frame
        index = self._rng.choice(digits)
        return frame[:index] + bytes([frame[index] ^ 0x01]) + frame[index + 1 :]

    def garbage(self) -> bytes:
        """Line noise: bytes 0x80-0xFF, as a baud-rate mismatch or a ground loop produces.

        High bytes are never a terminator or a printable character, so the frame they land
        in is always rejected; it cannot pass for a valid reading by chance.
        """
        return bytes(self._rng.randrange(0x80, 0x100) for _ in range(self.garbage_bytes))


async def send_reply(channel: Channel, frame: bytes, faults: FaultInjector) -> None:
    """Write `frame` through the transport faults: disconnect, drop, late, bit flip, garbage."""
    if faults.fires(Fault.DISCONNECT):
        channel.hang_up()
        return
    if faults.fires(Fault.DROP):
        return
    if faults.fires(Fault.LATE):
        await asyncio.sleep(faults.late_s)
    if faults.fires(Fault.BIT_FLIP):
        frame = faults.flip_digit(frame)
    if faults.fires(Fault.GARBAGE):
        frame = faults.garbage() + frame
    channel.write(frame)


def parse_fault_spec(spec: str) -> tuple[Fault, float]:
    """`drop:0.1` -> (Fault.DROP, 0.1); a bare name means always. For the CLI."""
    name, _, rate_text = spec.partition(":")
    try:
        fault = Fault(name.strip().lower())
    except ValueError:
        known = ", ".join(f.value for f in Fault)
        raise ValueError(f"unknown fault {name!r}; known: {known}") from None
    try:
        rate = float(rate_text) if rate_text else 1.0
    except ValueError:
        raise ValueError(f"fault rate in {spec!r} is not a number") from None
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"fault rate in {spec!r} must be in [0, 1]")
    return fault, rate
