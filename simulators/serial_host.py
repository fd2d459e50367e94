"""Serve a simulated serial instrument on a pseudo-terminal or on TCP.

A pty is a real tty: the driver opens it with pyserial exactly like `/dev/ttyUSB0`, with
termios, raw mode and all. TCP is what a serial device server (Moxa NPort, Lantronix) offers
and what pyserial reaches with `socket://host:port`; in its RFC 2217 mode (`rfc2217://`) the
same server also takes the port settings over Telnet (`Rfc2217Host`). All run on the asyncio
loop: the pty master fd is watched with `loop.add_reader`, TCP uses asyncio streams; nothing
blocks.

The pty is published through a symlink whose path never changes. Pulling the cable
(`hang_up`) closes the pty, so the client's next read fails like a removed USB adapter, and
a fresh pty is put behind the same symlink, so the client reconnects by reopening the path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import shutil
import tempfile
import tty
from abc import ABC, abstractmethod
from typing import Protocol

import serial
import serial.rfc2217

from hotlab.simulators.faults import FaultInjector, send_reply


class ByteChannel(ABC):
    """One connection between a simulated instrument and its host."""

    def __init__(self) -> None:
        self.closed = False

    @abstractmethod
    async def read(self) -> bytes:
        """Next received bytes; b"" once the connection is gone."""

    @abstractmethod
    def write(self, data: bytes) -> None: ...

    @abstractmethod
    def hang_up(self) -> None:
        """Drop the connection, as a pulled cable does."""


class DeviceModel(Protocol):
    """A simulated instrument: serves one connection until `channel.read()` returns b""."""

    async def serve(self, channel: ByteChannel) -> None: ...


class RequestReplyDevice(ABC):
    """An instrument that only speaks when spoken to.

    Subclasses split requests out of the receive buffer (`take_request`) and answer them
    (`reply_to`); replies go out through the fault injector.
    """

    #: Bytes without a complete request after which the buffer is treated as noise and dropped.
    max_request_bytes = 64

    def __init__(self, faults: FaultInjector) -> None:
        self.faults = faults

    @abstractmethod
    def take_request(self, buffer: bytearray) -> bytes | None:
        """Remove and return the next complete request from `buffer`, or None if incomplete."""

    @abstractmethod
    def reply_to(self, request: bytes) -> bytes:
        """The reply frame for `request`."""

    async def serve(self, channel: ByteChannel) -> None:
        buffer = bytearray()
        while not channel.closed:
            data = await channel.read()
            if not data:
                return
            buffer += data
            while not channel.closed and (request := self.take_request(buffer)) is not None:
                await send_reply(channel, self.reply_to(request), self.faults)
            if len(buffer) > self.max_request_bytes:
                buffer.clear()


class _StreamChannel(ByteChannel):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__()
        self._reader = reader
        self._writer = writer

    async def read(self) -> bytes:
        if self.closed:
            return b""
        try:
            return await self._reader.read(4096)
        except ConnectionError:
            return b""

    def write(self, data: bytes) -> None:
        if not self.closed and not self._writer.is_closing():
            self._writer.write(data)

    def hang_up(self) -> None:
        self.closed = True
        self._writer.close()


class _Rfc2217Channel(_StreamChannel):
    """A TCP connection speaking RFC 2217: Telnet with the COM-PORT option.

    pyserial's `PortManager` is the server half of the protocol: it strips the Telnet
    negotiation from what arrives (answering it), applies the client's port settings to
    `port` (a loopback port that only records them: the instrument here is simulated), and
    escapes what the instrument sends (a data byte 0xFF is doubled on the wire).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: serial.SerialBase) -> None:
        super().__init__(reader, writer)
        self.manager = serial.rfc2217.PortManager(port, _Wire(self))

    async def read(self) -> bytes:
        while data := await super().read():
            payload = b"".join(self.manager.filter(data))
            if payload:
                return payload
        return b""

    def write(self, data: bytes) -> None:
        super().write(b"".join(self.manager.escape(data)))

    def send_telnet(self, data: bytes) -> None:
        super().write(data)


class _Wire:
    """The `connection` PortManager writes its Telnet answers to: the raw stream, unescaped."""

    def __init__(self, channel: _Rfc2217Channel) -> None:
        self._channel = channel

    def write(self, data: bytes) -> None:
        self._channel.send_telnet(data)


class TcpHost:
    """Serve a device model to TCP clients (`socket://host:port`)."""

    scheme = "socket"

    #: How long `stop()` lets sessions end after hanging up before cancelling them.
    stop_grace_s = 2.0

    def __init__(self, model: DeviceModel, host: str = "127.0.0.1", port: int = 0) -> None:
        self.model = model
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._sessions: dict[asyncio.Task[None], _StreamChannel] = {}

    @property
    def clients(self) -> int:
        """Connections being served now."""
        return len(self._sessions)

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("TcpHost is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{self.scheme}://{host}:{port}"

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve_client, self._host, self._port)
        return self.url

    async def stop(self) -> None:
        """Stop listening, hang up every client and wait for their sessions to end."""
        if self._server is None:
            return
        self._server.close()
        for channel in self._sessions.values():
            channel.hang_up()
        if self._sessions:
            _, stragglers = await asyncio.wait(self._sessions, timeout=self.stop_grace_s)
            for task in stragglers:
                task.cancel()
        await self._server.wait_closed()
        self._server = None

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        channel = self._channel(reader, writer)
        self._sessions[task] = channel
        try:
            await self.model.serve(channel)
        finally:
            self._sessions.pop(task, None)
            channel.hang_up()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _channel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _StreamChannel:
        return _StreamChannel(reader, writer)


class Rfc2217Host(TcpHost):
    """Serve a device model as a serial device server in RFC 2217 mode (`rfc2217://host:port`).

    `port_settings` holds what the last client set (baud rate, data bits, parity, stop bits),
    as the device server would apply it to its serial line.
    """

    scheme = "rfc2217"

    def __init__(self, model: DeviceModel, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(model, host, port)
        self.port_settings: serial.SerialBase = serial.serial_for_url("loop://")

    def _channel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _StreamChannel:
        return _Rfc2217Channel(reader, writer, self.port_settings)


class _PtyChannel(ByteChannel):
    """The master side of one pty; the simulator keeps the slave open so clients may come and go."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.master_fd, self._slave_fd = pty.openpty()
        tty.setraw(self._slave_fd)  # no echo, no CR/LF translation, 8-bit clean
        os.set_blocking(self.master_fd, False)
        self.slave_path = os.ttyname(self._slave_fd)
        self._loop = loop
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        loop.add_reader(self.master_fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self.master_fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._queue.put_nowait(data)

    async def read(self) -> bytes:
        if self.closed:
            return b""
        return await self._queue.get()

    def write(self, data: bytes) -> None:
        """Write to the line; with nobody listening and the tty queue full, bytes are lost, as on a wire."""
        if self.closed:
            return
        with contextlib.suppress(BlockingIOError):
            os.write(self.master_fd, data)

    def hang_up(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self.master_fd)
        os.close(self.master_fd)
        os.close(self._slave_fd)
        self._queue.put_nowait(b"")


class PtyHost:
    """Serve a device model on a pty published at a stable symlink path."""

    def __init__(self, model: DeviceModel, link_path: str | None = None) -> None:
        self.model = model
        self._own_dir = None if link_path else tempfile.mkdtemp(prefix="hotlab-pty-")
        self.path = link_path or os.path.join(self._own_dir or "", "tty")
        self._task: asyncio.Task[None] | None = None
        self._channel: _PtyChannel | None = None
        self._ready = asyncio.Event()

    async def start(self) -> str:
        """Open the first pty and return the path to publish; OSError if no pty can be made."""
        if os.path.lexists(self.path) and not os.path.islink(self.path):
            raise FileExistsError(f"{self.path} exists and is not a symlink; refusing to replace it")
        self._task = asyncio.create_task(self._run(), name=f"pty-host {self.path}")
        ready = asyncio.create_task(self._ready.wait())
        await asyncio.wait({self._task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not self._ready.is_set():
            await self._task  # raises what stopped the host before its first pty was up
        ready.cancel()
        return self.path

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._channel is not None:
            self._channel.hang_up()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        if self._own_dir:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    @property
    def slave_path(self) -> str:
        """The /dev/pts/N the symlink points at now (changes after every hang-up)."""
        if self._channel is None:
            raise RuntimeError("PtyHost is not started")
        return self._channel.slave_path

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            channel = _PtyChannel(loop)
            self._channel = channel
            self._publish(channel.slave_path)
            self._ready.set()
            try:
                await self.model.serve(channel)
            finally:
                channel.hang_up()

    def _publish(self, target: str) -> None:
        """Point the symlink at `target` atomically (rename over the old link)."""
        staging = f"{self.path}.new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        os.symlink(target, staging)
        os.replace(staging, self.path)
