"""A serial port without a file descriptor to poll, as an asyncio transport: `rfc2217://`.

Why: serial_asyncio_fast watches the port's file descriptor with the event loop, which
works for ttys. pyserial's RFC 2217 client has none: it speaks Telnet over its own socket,
with its own thread answering the option negotiation, and hands the data over through a
queue. Watched as a descriptor, the port was reconfigured under that thread and the device
server dropped the connection (`rfc2217://` could not be opened at all).

So here the port is used as pyserial means it: blocking reads in one thread of this
transport, which hands what arrives to the protocol on the event loop
(`call_soon_threadsafe`); writes go, in order, to one writer thread, so a slow network
never blocks the loop; opening and closing run in a thread too. The protocol sees what
any transport gives it: `data_received`, then one `connection_lost` (with the error, or
None after `close()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import serial

#: How long a blocking read waits before it looks at whether the transport was closed.
_READ_POLL_S = 0.1


class ThreadedSerialTransport(asyncio.Transport):
    """One open pyserial port, read by a thread of its own; see the module docstring."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol, port: serial.SerialBase) -> None:
        super().__init__()
        self._loop = loop
        self._protocol = protocol
        self._port = port
        self._closing = False
        self._lost = False
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hotlab-serial-write")
        self._reader = threading.Thread(target=self._read_forever, name=f"hotlab-serial-read {port.port}",
                                        daemon=True)

    @classmethod
    async def open(cls, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol, url: str,
                   **settings: Any) -> ThreadedSerialTransport:
        """Open `url` with pyserial in a thread (RFC 2217 negotiates first) and start reading it."""
        port = await loop.run_in_executor(
            None, lambda: serial.serial_for_url(url, timeout=_READ_POLL_S, write_timeout=None, **settings))
        transport = cls(loop, protocol, port)
        protocol.connection_made(transport)
        transport._reader.start()
        return transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        future = self._writer.submit(self._port.write, bytes(data))
        future.add_done_callback(self._write_done)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._writer.submit(self._close_port)  # after the writes already queued
        self._writer.shutdown(wait=False)

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._port if name == "serial" else default

    def _read_forever(self) -> None:
        error: BaseException | None = None
        try:
            while not self._closing:
                data = self._port.read(self._port.in_waiting or 1)
                if data:
                    self._loop.call_soon_threadsafe(self._protocol.data_received, data)
        except (serial.SerialException, OSError, TypeError, AttributeError) as exc:
            # pyserial's RFC 2217 port, closed or dropped under a read, raises any of these.
            error = None if self._closing else exc
        with contextlib.suppress(RuntimeError):  # the loop is already closed: nobody to tell
            self._loop.call_soon_threadsafe(self._connection_lost, error)

    def _write_done(self, future: Any) -> None:
        error = future.exception()
        if error is not None and not self._closing:
            self._loop.call_soon_threadsafe(self._connection_lost, error)

    def _close_port(self) -> None:
        with contextlib.suppress(serial.SerialException, OSError):
            self._port.close()

    def _connection_lost(self, error: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        if not self._closing:
            self.close()
        self._protocol.connection_lost(error if isinstance(error, Exception) else None)
