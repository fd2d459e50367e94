"""Where a Modbus device is and how to reach it: TCP, TCP with TLS, or RTU on a tty or through a serial device server.

Why here and not in a driver: hotlab.controller.config builds these links as a station's
transport, and the driver only turns one into a pymodbus client, so both depend on this small
module rather than the controller's configuration on the driver.

Modbus itself has no authentication: whoever reaches a station's port 502 can command it.
`ModbusTlsLink` is MODBUS/TCP Security (Modbus Organization, "MODBUS/TCP Security" protocol
specification): the same requests inside TLS 1.2 or later on port 802, where the station and
the client each prove who they are with an X.509 certificate signed by a CA the other trusts.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias, TypedDict

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient, AsyncModbusTlsClient
from pymodbus.framer import FramerType

#: The port MODBUS/TCP Security assigns (IANA "mbap-s").
MODBUS_TLS_PORT = 802


@dataclass(frozen=True, slots=True)
class ModbusTcpLink:
    host: str
    port: int = 502
    device_id: int = 1
    word_order: str = "ABCD"
    kind: Literal["modbus_tcp"] = "modbus_tcp"


@dataclass(frozen=True, slots=True)
class ModbusTlsLink:
    """MODBUS/TCP Security: `ca_file` verifies the station (its certificate must name `host`),
    `cert_file` and `key_file` are the controller's own certificate, which the station checks."""

    host: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    port: int = MODBUS_TLS_PORT
    device_id: int = 1
    word_order: str = "ABCD"
    kind: Literal["modbus_tls"] = "modbus_tls"


@dataclass(frozen=True, slots=True)
class ModbusRtuLink:
    """RTU framing on a serial URL: a tty path, or socket://host:port (RTU through a TCP device server)."""

    url: str
    baudrate: int = 19200
    device_id: int = 1
    word_order: str = "ABCD"
    kind: Literal["modbus_rtu"] = "modbus_rtu"


#: A link description; `kind` tells them apart.
ModbusLink: TypeAlias = ModbusTcpLink | ModbusTlsLink | ModbusRtuLink
ModbusClient: TypeAlias = AsyncModbusTcpClient | AsyncModbusSerialClient


class _ClientOptions(TypedDict):
    timeout: float
    retries: int
    reconnect_delay: float
    trace_connect: Callable[[bool], None] | None


def modbus_tls_context(
    side: Literal["client", "server"], ca_file: Path | str, cert_file: Path | str, key_file: Path | str
) -> ssl.SSLContext:
    """TLS as MODBUS/TCP Security asks for it, for either end: TLS 1.2 or later, and mutual authentication.

    Each side presents `cert_file` (with `key_file`) and accepts only a peer whose certificate
    `ca_file` verifies; the client also checks that the station's certificate names the host it
    connected to. The files are read now, so a renewed certificate takes effect at the next connection.
    """
    purpose = ssl.Purpose.SERVER_AUTH if side == "client" else ssl.Purpose.CLIENT_AUTH
    context = ssl.create_default_context(purpose, cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(str(cert_file), str(key_file))
    return context


async def make_client(
    link: ModbusLink, timeout_s: float, on_connection_change: Callable[[bool], None] | None = None
) -> ModbusClient:
    """A pymodbus client for `link`, with pymodbus' own retries and reconnects off: the driver owns both.

    A TLS link's CA, certificate and key are read on a worker thread, so a slow disk or network
    file system never stalls the event loop; the client itself is built on the loop, which
    pymodbus requires. Raises OSError (ssl.SSLError included) when they cannot be loaded.
    """
    common = _ClientOptions(timeout=timeout_s, retries=0, reconnect_delay=0, trace_connect=on_connection_change)
    if link.kind == "modbus_tcp":
        return AsyncModbusTcpClient(link.host, port=link.port, framer=FramerType.SOCKET, **common)
    if link.kind == "modbus_tls":
        context = await asyncio.to_thread(modbus_tls_context, "client", link.ca_file, link.cert_file, link.key_file)
        return AsyncModbusTlsClient(link.host, port=link.port, sslctx=context, framer=FramerType.TLS, **common)
    if link.kind != "modbus_rtu":
        raise ValueError(f"an elution station needs a Modbus link, not {link.kind!r}")
    if link.url.startswith("socket://"):
        host, _, port = link.url.removeprefix("socket://").rpartition(":")
        return AsyncModbusTcpClient(host, port=int(port), framer=FramerType.RTU, **common)
    return AsyncModbusSerialClient(link.url, framer=FramerType.RTU, baudrate=link.baudrate, **common)


def describe_link(link: ModbusLink) -> str:
    """The link as error messages name it: 'modbus tcp host:port', 'modbus tls host:port' or 'modbus rtu URL'."""
    if link.kind == "modbus_tcp":
        return f"modbus tcp {link.host}:{link.port}"
    if link.kind == "modbus_tls":
        return f"modbus tls {link.host}:{link.port}"
    return f"modbus rtu {link.url}"
