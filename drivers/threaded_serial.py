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
None after `close()`). That is three threads per port (pyserial's, the reader, the writer):
right for the few instruments behind an RFC 2217 server, not meant for hundreds.

pyserial's thread parses the device server's Telnet, and malformed Telnet makes it raise;
Python would print that traceback to stderr, outside the log, so the port class here catches
it and logs one line instead (`Rfc2217Port`). The port is lost either way: pyserial's `read`
fails once its thread has ended, which closes this transport like any other failure.

That thread runs pyserial's private `Serial._telnet_read_loop`, which `Rfc2217Port` overrides.
A pyserial release without it would leave the override silently unused, so importing this
module checks that it is there (`pyserial_private_api_problem`) and refuses, naming pyserial's
version, if it is not; tests/test_rfc2217_garbage.py checks it on the installed pyserial.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import serial
import serial.rfc2217

from hotlab.errors import HotlabError

log = logging.getLogger(__name__)

#: How long a blocking read waits before it looks at whether the transport was closed.
_READ_POLL_S = 0.1

#: The opens of these ports (and the close of a port opened after its caller gave up): off the
#: loop's default executor, which a few slow device servers (pyserial waits up to 5 s to connect,
#: then 3 s per negotiation) would otherwise fill.
_OPENER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hotlab-serial-open")


class PyserialPrivateApiChanged(HotlabError):
    """The installed pyserial no longer has the private method `Rfc2217Port` overrides."""


def pyserial_private_api_problem(port_class: type = serial.rfc2217.Serial) -> str | None:
    """What `Rfc2217Port` relies on and `port_class` (pyserial's RFC 2217 client) lacks, or None if all holds."""
    reader = getattr(port_class, "_telnet_read_loop", None)
    if callable(reader):
        return None
    return (
        f"pyserial {serial.VERSION}: serial.rfc2217.Serial._telnet_read_loop is {reader!r}, not a method; "
        "hotlab.drivers.threaded_serial.Rfc2217Port overrides it to log malformed Telnet: adapt it to this pyserial"
    )


if (_problem := pyserial_private_api_problem()) is not None:
    raise PyserialPrivateApiChanged(_problem)


class Rfc2217Port(serial.rfc2217.Serial):  # type: ignore[misc]  # pyserial has no type hints
    """pyserial's RFC 2217 client, whose Telnet reader thread ends with one log line instead of a traceback."""

    def _telnet_read_loop(self) -> None:
        try:
            super()._telnet_read_loop()
        except Exception as exc:  # whatever the parser tripped on, the connection is over
            log.warning(
                "%s: the device server sent malformed Telnet (%s: %s); the connection is lost",
                self.portstr,
                type(exc).__name__,
                exc,
            )


class ThreadedSerialTransport(asyncio.Transport):
    """One open pyserial port, read by a thread of its own; see the module docstring."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol, port: serial.SerialBase) -> None:
        super().__init__(extra={"serial": port})
        self._loop = loop
        self._protocol = protocol
        self._port = port
        self._closing = False
        self._lost = False
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hotlab-serial-write")
        self._reader = threading.Thread(target=self._read_forever, name=f"hotlab-serial-read {port.port}", daemon=True)

    @classmethod
    async def open(
        cls, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol, url: str, **settings: Any
    ) -> ThreadedSerialTransport:
        """Open an `rfc2217://` URL in a thread (RFC 2217 negotiates first) and start reading it.

        If the caller stops waiting (its timeout), the open still finishes in its thread; the
        port is then closed there, not left connected: many device servers take one client.
        """
        opening = _OPENER.submit(Rfc2217Port, url, timeout=_READ_POLL_S, write_timeout=None, **settings)
        try:
            port = await asyncio.wrap_future(opening, loop=loop)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_if_opened)
            raise
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
        """Close the port after the writes already queued; `connection_lost` comes once it is closed."""
        if self._closing:
            return
        self._closing = True
        self._writer.submit(self._close_port)
        self._writer.shutdown(wait=False)

    def abort(self) -> None:
        self.close()

    def _read_forever(self) -> None:
        """Hand what arrives to the loop until closed; a failure of the port ends the connection."""
        try:
            while not self._closing:
                data = self._port.read(self._port.in_waiting or 1)
                if data and not self._post(self._protocol.data_received, data):
                    break  # the loop is gone: nobody reads any more
        except Exception as exc:
            if not self._closing:
                self._post(self._connection_lost, exc)
                return
        if not self._closing:  # the loop closed under us: let go of the port
            self._closing = True
            self._close_port_quietly()

    def _write_done(self, future: Any) -> None:
        error = future.exception()
        if error is not None and not self._closing:
            self._post(self._connection_lost, error)

    def _close_port(self) -> None:
        """On the writer thread, after the queued writes: close, then tell the protocol."""
        self._close_port_quietly()
        self._post(self._connection_lost, None)

    def _close_port_quietly(self) -> None:
        with contextlib.suppress(Exception):  # closing a port that already failed may fail again
            self._port.close()

    def _post(self, callback: Any, *args: Any) -> bool:
        """Run `callback(*args)` on the loop; False if the loop is closed."""
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            return False
        return True

    def _connection_lost(self, error: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self.close()  # after a failure: close the port too (its connection_lost is then ignored)
        self._protocol.connection_lost(error)


def _close_if_opened(opening: Any) -> None:
    """Done-callback of an open nobody waits for any more: close the port it opened, if it did."""
    if opening.cancelled() or opening.exception() is not None:
        return
    with contextlib.suppress(Exception):
        opening.result().close()
