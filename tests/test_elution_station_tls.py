"""MODBUS/TCP Security: the station and the controller each prove themselves with a certificate.

Plain Modbus has no authentication, so anyone who reaches port 502 can start an elution. Over
TLS with client certificates (port 802), the simulated station takes requests only from a
client whose certificate its CA signed, and the driver talks only to a station whose
certificate it can verify. The certificates are made here, per test session, with the openssl
command (EC P-256 keys: quick to generate).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTlsClient
from pymodbus.exceptions import ModbusException

from hotlab.drivers.elution_station import ElutionStationDriver
from hotlab.drivers.modbus_links import ModbusTcpLink, ModbusTlsLink, describe_link, modbus_tls_context
from hotlab.drivers.records import DeviceDisconnected, DeviceTimeout
from hotlab.drivers.station_registers import INPUT_REGISTERS, StationState
from hotlab.simulators.elution_station import ElutionStationSimulator
from tests.test_elution_station import WHO, finished, make_model, poll_until
from tests.test_elution_station_cli import start_cli, stop_cli

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl command not installed")

DEVICE_ID = 7


@dataclass(frozen=True)
class Pki:
    """Two certificate authorities: the site's, which signed the station and the controller, and a stranger's."""

    ca: Path
    station_cert: Path
    station_key: Path
    controller_cert: Path
    controller_key: Path
    other_ca: Path
    stranger_cert: Path
    stranger_key: Path


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)


def _authority(directory: Path, name: str) -> None:
    _openssl(
        directory,
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN=hotlab test {name}"),
    )


def _certificate(directory: Path, name: str, authority: str, extensions: str) -> tuple[Path, Path]:
    """A key and a certificate for `name`, signed by `authority`, with these X.509v3 extensions."""
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        directory,
        *("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}"),
    )
    _openssl(
        directory,
        *("x509", "-req", "-in", f"{name}.csr", "-CA", f"{authority}.crt", "-CAkey", f"{authority}.key"),
        *("-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext"),
    )
    return directory / f"{name}.crt", directory / f"{name}.key"


_LEAF = (
    "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    _authority(directory, "site-ca")
    _authority(directory, "other-ca")
    station = _certificate(
        directory, "station", "site-ca", _LEAF + "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n"
    )
    controller = _certificate(directory, "controller", "site-ca", _LEAF + "extendedKeyUsage=clientAuth\n")
    stranger = _certificate(directory, "stranger", "other-ca", _LEAF + "extendedKeyUsage=clientAuth\n")
    return Pki(directory / "site-ca.crt", *station, *controller, directory / "other-ca.crt", *stranger)


@pytest.fixture
async def station(pki: Pki) -> AsyncIterator[tuple[ElutionStationSimulator, int]]:
    """A simulated station serving MODBUS/TCP Security only, on a free port."""
    sim = ElutionStationSimulator(make_model(), device_id=DEVICE_ID)
    _host, port = await sim.start_tls(
        "127.0.0.1", 0, ca_file=pki.ca, cert_file=pki.station_cert, key_file=pki.station_key
    )
    yield sim, port
    await sim.stop()


def tls_link(port: int, ca: Path, cert: Path, key: Path) -> ModbusTlsLink:
    return ModbusTlsLink("127.0.0.1", ca_file=ca, cert_file=cert, key_file=key, port=port, device_id=DEVICE_ID)


async def first_poll_fails(link: ModbusTlsLink | ModbusTcpLink) -> str:
    """Poll once through a new driver; the poll must fail. Returns why."""
    driver = ElutionStationDriver("hotcell-2", link, timeout_s=1.0)
    try:
        with pytest.raises((DeviceDisconnected, DeviceTimeout)) as failed:
            await driver.poll()
    finally:
        await driver.close()
    return str(failed.value)


async def test_a_controller_with_a_certificate_of_the_site_ca_reads_and_commands(
    station: tuple[ElutionStationSimulator, int], pki: Pki
) -> None:
    sim, port = station
    link = tls_link(port, pki.ca, pki.controller_cert, pki.controller_key)
    assert describe_link(link) == f"modbus tls 127.0.0.1:{port}"
    driver = ElutionStationDriver("hotcell-2", link, timeout_s=2.0)
    try:
        first = await driver.poll()
        assert first.state is StationState.IDLE and first.status.serial == sim.model.identity.serial
        outcome = await driver.start_elution(5.0, **WHO)
        assert outcome.old_state is StationState.IDLE and sim.model.cmd_ack_seq == outcome.sequence == 1
        records = finished(await poll_until(driver, lambda p: p.state is StationState.DONE))
    finally:
        await driver.close()
    assert [r.counter for r in records] == [1]
    assert records[0].activity_bq == pytest.approx(sim.model.last.outcome.daughter_bq, rel=1e-6)


async def test_a_client_without_a_certificate_is_refused(
    station: tuple[ElutionStationSimulator, int], pki: Pki
) -> None:
    sim, port = station
    context = ssl.create_default_context(cafile=pki.ca)  # trusts the station, but shows nothing itself
    client = AsyncModbusTlsClient("127.0.0.1", port=port, sslctx=context, timeout=1.0, retries=0, reconnect_delay=0)
    try:
        if await client.connect():  # TLS 1.3: the station checks the client after the handshake
            with pytest.raises(ModbusException):
                await client.read_input_registers(0, count=INPUT_REGISTERS.count, device_id=DEVICE_ID)
    finally:
        client.close()
    assert sim.requests_seen == 0


async def test_a_certificate_from_another_ca_is_refused(station: tuple[ElutionStationSimulator, int], pki: Pki) -> None:
    sim, port = station
    await first_poll_fails(tls_link(port, pki.ca, pki.stranger_cert, pki.stranger_key))
    assert sim.requests_seen == 0 and sim.model.state is StationState.IDLE


async def test_the_driver_refuses_a_station_it_cannot_verify(
    station: tuple[ElutionStationSimulator, int], pki: Pki
) -> None:
    """Authentication goes both ways: a station (or an impostor) with a certificate of another CA gets nothing."""
    sim, port = station
    why = await first_poll_fails(tls_link(port, pki.other_ca, pki.controller_cert, pki.controller_key))
    assert f"cannot connect to modbus tls 127.0.0.1:{port}" in why
    assert sim.requests_seen == 0


async def test_plain_modbus_tcp_to_the_tls_port_gets_nothing(station: tuple[ElutionStationSimulator, int]) -> None:
    sim, port = station
    await first_poll_fails(ModbusTcpLink("127.0.0.1", port, device_id=DEVICE_ID))
    assert sim.requests_seen == 0


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("mbpoll") is None, reason="mbpoll binary not installed")
async def test_mbpoll_cannot_start_an_elution_on_the_tls_port(station: tuple[ElutionStationSimulator, int]) -> None:
    """What the review did on port 502 (press "start" with a generic tool) fails on the TLS port."""
    sim, port = station
    process = await asyncio.create_subprocess_exec(
        *("mbpoll", "-m", "tcp", "-p", str(port), "-a", str(DEVICE_ID), "-0", "-t", "0", "-r", "0"),
        *("-o", "1", "127.0.0.1", "1"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        await process.communicate()
    assert process.returncode != 0
    assert sim.requests_seen == 0 and sim.model.state is StationState.IDLE


@pytest.mark.parametrize("side", ["client", "server"])
def test_both_sides_ask_for_tls_1_2_or_later_and_the_other_sides_certificate(pki: Pki, side: str) -> None:
    """MODBUS/TCP Security: TLS 1.2 or later, and each side authenticated by its X.509 certificate."""
    context = modbus_tls_context(side, pki.ca, pki.station_cert, pki.station_key)  # type: ignore[arg-type]
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert context.check_hostname is (side == "client")  # the station is checked against the host it was asked for


async def test_the_cli_serves_tls_to_the_driver_and_wants_all_three_files(pki: Pki) -> None:
    process, banner = await start_cli(
        *("--tls", "127.0.0.1:0", "--device-id", str(DEVICE_ID)),
        *("--ca-file", str(pki.ca), "--cert-file", str(pki.station_cert), "--key-file", str(pki.station_key)),
    )
    try:
        match = re.search(r"serving MODBUS/TCP Security \(TLS\) on 127\.0\.0\.1:(\d+)", banner)
        assert match, banner
        link = tls_link(int(match.group(1)), pki.ca, pki.controller_cert, pki.controller_key)
        driver = ElutionStationDriver("cli-test", link, timeout_s=3.0)
        try:
            assert (await driver.poll()).state is StationState.IDLE
        finally:
            await driver.close()
    finally:
        assert await stop_cli(process) == 0
    incomplete = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "hotlab.controller.cli", "simulate", "station", "--tls", "127.0.0.1:0"),
        *("--ca-file", str(pki.ca)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        _, stderr = await incomplete.communicate()
    assert incomplete.returncode == 2 and "--tls goes with --ca-file, --cert-file and --key-file" in stderr.decode()
