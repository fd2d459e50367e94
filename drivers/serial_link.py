"""An async serial port opened by URL, and the base every serial instrument driver builds on.

Hot-lab instruments hang off RS-232, often through a USB adapter (`/dev/ttyUSB0`) or a
serial device server on the network (`socket://host:port`, `rfc2217://host:port`).
pyserial's `serial_for_url` opens ttys, and serial_asyncio_fast turns the port into an
asyncio transport so no read ever blocks the event loop; `socket://` is a plain TCP
connection of the event loop; `rfc2217://` (Telnet with the COM-PORT option, which also
carries the port settings to the device server) is pyserial's own client, read by a thread
(drivers/threaded_serial.py).

The link keeps its own receive buffer instead of an `asyncio.StreamReader` because the
drivers must throw away stale input, which a stream reader does not offer: garbage and late
replies before a new request, and lines a streaming device sent while nobody was reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar, cast

import serial
import serial_asyncio_fast

from hotlab.drivers.deadlines import SharedDeadlines
from hotlab.drivers.records import DeviceDisconnected, DeviceTimeout, DriverError, FrameError, Reading
from hotlab.drivers.threaded_serial import ThreadedSerialTransport
from hotlab.physics.units import to_bq

#: How long `close()` waits for the transport to confirm it let go of the port.
_CLOSE_GRACE_S = 2.0

_P = ParamSpec("_P")
_R = TypeVar("_R")
_Device = TypeVar("_Device", bound="SerialDevice")


class FrozenValueError(DriverError):
    """The device sent the same payload more often in a row than its noise makes plausible.

    An ionisation chamber's electrometer always shows some noise; a value that never moves
    means frozen firmware or a display latched on hold, and must not be logged as a fresh
    measurement.
    """


@dataclass(frozen=True, slots=True)
class SerialSettings:
    """Line settings; ignored by `socket://` links, where the device server owns them."""

    baudrate: int
    bytesize: int = serial.EIGHTBITS
    parity: str = serial.PARITY_NONE
    stopbits: float = serial.STOPBITS_ONE

    @classmethod
    def coerce(cls, value: SerialSettings | Mapping[str, Any]) -> SerialSettings:
        """Accept a `[device.options.settings]` table from a config file as well."""
        if isinstance(value, SerialSettings):
            return value
        try:
            return cls(**value)
        except TypeError as exc:
            raise ValueError(
                f"serial settings {dict(value)!r}: {exc}; keys: baudrate, bytesize, parity, stopbits"
            ) from None


_PRINTABLE_ASCII = re.compile(rb"[\x20-\x7e]+")


def is_printable_ascii(data: bytes) -> bool:
    """True for a non-empty run of printable ASCII (0x20-0x7E), the payload of every family's frames.

    A regex, not a per-byte loop: it runs on every reply the controller reads.
    """
    return _PRINTABLE_ASCII.fullmatch(data) is not None


def as_bytes(value: bytes | str) -> bytes:
    """A terminator or command from code (bytes) or from a config file (str, e.g. "\\r\\n")."""
    return value if isinstance(value, bytes) else value.encode("latin-1")


class _ReceiveBuffer(asyncio.Protocol):
    """Collects received bytes and wakes whoever waits for more.

    The buffer is capped at `limit` bytes, keeping the newest: bytes can arrive while no read
    is pending (a device babbling between polls, a serial server replaying garbage), and
    without a cap they would be held in full. Anything older than the cap cannot belong to a
    valid frame, which is at most a quarter of it; the overlong check in `read_until` still
    reports the garbage as a FrameError.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.lost = False
        self.lost_reason: BaseException | None = None
        self._changed = asyncio.Event()
        self._lost_event = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > self.limit:
            del self.data[: len(self.data) - self.limit]
        self._changed.set()

    def eof_received(self) -> bool:
        self._mark_lost(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._mark_lost(exc)
        self._lost_event.set()

    def _mark_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self.lost_reason = self.lost_reason or exc
        self._changed.set()

    async def changed(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    async def wait_lost(self) -> None:
        await self._lost_event.wait()


class SerialLink:
    """One serial port, by URL, with framing helpers that resynchronise after garbage."""

    def __init__(self, url: str, settings: SerialSettings, *, max_frame_bytes: int = 256) -> None:
        self.url = url
        self.settings = settings
        self.max_frame_bytes = max_frame_bytes
        self._transport: asyncio.BaseTransport | None = None
        self._rx: _ReceiveBuffer | None = None
        #: Every exchange waits under a timeout that almost never expires: one timer for all of them.
        self._deadlines = SharedDeadlines()

    @property
    def is_open(self) -> bool:
        return self._transport is not None and self._rx is not None and not self._rx.lost

    async def open(self, timeout_s: float) -> None:
        """Open the port; any failure becomes DeviceDisconnected naming the URL and the cause."""
        await self.close()
        rx = _ReceiveBuffer(limit=4 * self.max_frame_bytes)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                transport = await self._connect(loop, rx)
        except TimeoutError:
            raise DeviceDisconnected(f"opening {self.url} took longer than {timeout_s} s") from None
        except (serial.SerialException, OSError, ValueError) as exc:
            raise DeviceDisconnected(f"cannot open {self.url}: {exc}") from exc
        self._transport, self._rx = transport, rx

    async def _connect(self, loop: asyncio.AbstractEventLoop, rx: _ReceiveBuffer) -> asyncio.BaseTransport:
        """A transport for the URL: a plain TCP connection for `socket://`, pyserial's RFC 2217
        client read by a thread for `rfc2217://`, serial_asyncio_fast for the rest (ttys).

        A serial device server (`socket://host:port`) is a TCP peer, so its transport comes from
        the loop itself: pyserial-asyncio-fast does the same, but then patches the transport in
        a way only the standard loop's transports allow (not uvloop's; controller/event_loop.py).
        """
        scheme, _, _ = self.url.partition("://")
        line = asdict(self.settings)  # baudrate, bytesize, parity, stopbits: pyserial's own keywords
        if scheme == "rfc2217":
            return await ThreadedSerialTransport.open(loop, rx, self.url, **line)
        if scheme == "socket":
            parts = urllib.parse.urlsplit(self.url)
            if parts.hostname is None or parts.port is None:
                raise ValueError(f"expected socket://HOST:PORT, got {self.url!r}")
            transport, _ = await loop.create_connection(lambda: rx, parts.hostname, parts.port)
            return transport
        transport, _ = await serial_asyncio_fast.create_serial_connection(loop, lambda: rx, self.url, **line)
        return transport

    async def close(self) -> None:
        transport, rx = self._transport, self._rx
        self._transport = self._rx = None
        if transport is None or rx is None:
            return
        transport.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_GRACE_S):
                await rx.wait_lost()

    def discard_input(self) -> bytes:
        """Drop everything received so far (stale or garbage) and return it for diagnostics."""
        rx = self._require_open()
        stale = bytes(rx.data)
        rx.data.clear()
        return stale

    def write(self, data: bytes) -> None:
        self._require_open()
        # Duck-typed: uvloop's transports do not derive from asyncio.WriteTransport.
        cast(asyncio.WriteTransport, self._transport).write(data)

    async def read_until(self, terminator: bytes, timeout_s: float) -> bytes:
        """Return the next frame up to and including `terminator`.

        A frame longer than `max_frame_bytes` is garbage: it is thrown away (so the next
        call starts clean) and reported as a FrameError.
        """
        rx = self._require_open()
        try:
            async with self._deadlines.timeout(timeout_s):
                while True:
                    end = rx.data.find(terminator)
                    if end >= 0:
                        frame = bytes(rx.data[: end + len(terminator)])
                        del rx.data[: end + len(terminator)]
                        if len(frame) > self.max_frame_bytes:
                            raise FrameError(f"frame longer than {self.max_frame_bytes} bytes", frame[-64:])
                        return frame
                    self._reject_overlong(rx)
                    self._raise_if_lost(rx)
                    await rx.changed()
        except TimeoutError:
            raise DeviceTimeout(f"no reply ending in {terminator!r} from {self.url} within {timeout_s} s") from None

    def _require_open(self) -> _ReceiveBuffer:
        rx = self._rx
        if self._transport is None or rx is None:
            raise DeviceDisconnected(f"{self.url} is not open")
        self._raise_if_lost(rx)
        return rx

    def _raise_if_lost(self, rx: _ReceiveBuffer) -> None:
        if rx.lost:
            reason = f": {rx.lost_reason}" if rx.lost_reason else ""
            raise DeviceDisconnected(f"{self.url} closed{reason}")

    def _reject_overlong(self, rx: _ReceiveBuffer) -> None:
        if len(rx.data) > self.max_frame_bytes:
            garbage = bytes(rx.data)
            rx.data.clear()
            raise FrameError(f"frame longer than {self.max_frame_bytes} bytes, no terminator yet", garbage[:64])


@dataclass(frozen=True, slots=True)
class DisplayedActivity:
    """What a calibrator's display showed, as parsed from its frame; becquerel derived from it.

    Kept separate from `Reading` so the pure parsers can be fuzzed without a device, time or frame.
    """

    nuclide: str
    value: float
    unit: str

    @property
    def activity_bq(self) -> float:
        return to_bq(self.value, self.unit)


class SerialDevice:
    """Base of a driver for one instrument on one serial link.

    It owns the connection life cycle that every family shares: open by URL, reopen
    transparently on the next request after the link dropped (so a supervisor simply
    retries), close, and use as an async context manager. Subclasses add the protocol.
    """

    #: Line settings from the device's manual; a subclass sets its own.
    default_settings: ClassVar[SerialSettings] = SerialSettings(baudrate=9600)
    #: True for devices that send unprompted: the caller reads back to back instead of polling.
    streaming: ClassVar[bool] = False

    def __init__(
        self,
        url: str,
        device: str,
        *,
        timeout_s: float = 2.0,
        settings: SerialSettings | Mapping[str, Any] | None = None,
        max_identical_readings: int | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if max_identical_readings is not None and max_identical_readings < 1:
            raise ValueError(f"max_identical_readings must be >= 1, got {max_identical_readings}")
        self.url = url
        self.device = device
        self.timeout_s = timeout_s
        self.link = SerialLink(url, SerialSettings.coerce(settings) if settings else self.default_settings)
        self._max_identical = max_identical_readings
        self._last_payload: bytes | None = None
        self._identical_count = 0
        self._io_lock = asyncio.Lock()

    async def connect(self) -> None:
        """Open the link and run the family's hello (e.g. ask which nuclide is selected)."""
        await self.link.open(self.timeout_s)
        try:
            await self._after_connect()
        except BaseException:
            await self.link.close()
            raise

    async def close(self) -> None:
        await self.link.close()

    async def __aenter__(self) -> SerialDevice:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _after_connect(self) -> None:
        """Hook for a family's handshake; the default has none."""

    async def _ensure_open(self) -> None:
        if not self.link.is_open:
            await self.connect()

    def _reading(self, shown: DisplayedActivity, frame: bytes, payload: bytes) -> Reading:
        """The Reading for a parsed display, once the frozen-value check on `payload` passed."""
        self._check_not_frozen(payload)
        return Reading(
            device=self.device,
            nuclide=shown.nuclide,
            activity_bq=shown.activity_bq,
            raw_value=shown.value,
            unit=shown.unit,
            timestamp_ns=time.time_ns(),
            raw_frame=frame,
        )

    def _check_not_frozen(self, payload: bytes) -> None:
        """Raise FrozenValueError once a payload repeats more than the configured count."""
        if self._max_identical is None:
            return
        if payload == self._last_payload:
            self._identical_count += 1
        else:
            self._last_payload, self._identical_count = payload, 1
        if self._identical_count > self._max_identical:
            raise FrozenValueError(
                f"{self.device}: the same reading {payload!r} arrived {self._identical_count} times in a row"
            )


def exclusive(
    method: Callable[Concatenate[_Device, _P], Coroutine[Any, Any, _R]],
) -> Callable[Concatenate[_Device, _P], Coroutine[Any, Any, _R]]:
    """One operation at a time per device.

    A supervisor polling `read()` and an operator command calling `select_nuclide()` share
    one serial line; without this their requests and replies would interleave and each
    would parse the other's answer. Decorated methods must not call each other.
    """

    @functools.wraps(method)
    async def locked(self: _Device, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        async with self._io_lock:
            return await method(self, *args, **kwargs)

    return locked
