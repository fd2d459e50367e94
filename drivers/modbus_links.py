"""Where a Modbus device is and how to reach it: TCP, or RTU on a tty or through a serial device server.

Why here and not in a driver: hotlab.controller.config builds these links as a station's
transport, and the driver only turns one into a pymodbus client, so both depend on this small
module rather than the controller's configuration on the driver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeAlias, TypedDict

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.framer import FramerType


@dataclass(frozen=True, slots=True)
class ModbusTcpLink:
    host: str
    port: int = 502
    device_id: int = 1
    word_order: str = "ABCD"
    kind: Literal["modbus_tcp"] = "modbus_tcp"


@dataclass(frozen=True, slots=True)
class ModbusRtuLink:
    """RTU framing on a serial URL: a tty path, or socket://host:port (RTU through a TCP device server)."""

    url: str
    baudrate: int = 19200
    device_id: int = 1
    word_order: str = "ABCD"
    kind: Literal["modbus_rtu"] = "modbus_rtu"


#: A link description; `kind` tells the two apart.
ModbusLink: TypeAlias = ModbusTcpLink | ModbusRtuLink
ModbusClient: TypeAlias = AsyncModbusTcpClient | AsyncModbusSerialClient


class _ClientOptions(TypedDict):
    timeout: float
    retries: int
    reconnect_delay: float
    trace_connect: Callable[[bool], None] | None


def make_client(
    link: ModbusLink, timeout_s: float, on_connection_change: Callable[[bool], None] | None = None
) -> ModbusClient:
    """A pymodbus client for `link`, with pymodbus' own retries and reconnects off: the driver owns both."""
    common = _ClientOptions(timeout=timeout_s, retries=0, reconnect_delay=0, trace_connect=on_connection_change)
    if link.kind == "modbus_tcp":
        return AsyncModbusTcpClient(link.host, port=link.port, framer=FramerType.SOCKET, **common)
    if link.kind != "modbus_rtu":
        raise ValueError(f"an elution station needs a Modbus link, not {link.kind!r}")
    if link.url.startswith("socket://"):
        host, _, port = link.url.removeprefix("socket://").rpartition(":")
        return AsyncModbusTcpClient(host, port=int(port), framer=FramerType.RTU, **common)
    return AsyncModbusSerialClient(link.url, framer=FramerType.RTU, baudrate=link.baudrate, **common)


def describe_link(link: ModbusLink) -> str:
    """The link as error messages name it: 'modbus tcp host:port' or 'modbus rtu URL'."""
    if link.kind == "modbus_tcp":
        return f"modbus tcp {link.host}:{link.port}"
    return f"modbus rtu {link.url}"
