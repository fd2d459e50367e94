"""TLS (server certificate checked against our CA, hostname included) and username/password against Mosquitto."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
from pathlib import Path

import aiomqtt
import pytest

from hotlab.controller.config import parse_config
from tests.mosquitto_service import (
    MosquittoBroker,
    MqttCollector,
    TlsListener,
    require_mosquitto,
)
from tests.test_mqtt_delivery import Lab

pytestmark = pytest.mark.integration

USER, PASSWORD = "hotlab-ctl", "correct horse battery staple"
WRONG_PASSWORD = "not-the-password-7f3a"


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 (EC P-256 keys: fast to generate)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=30)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=hotlab test CA")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    )
    return directory / "ca.crt", directory / "server.crt", directory / "server.key"


def tls_config(tmp_path: Path, broker: MosquittoBroker, password: str, name: str):  # type: ignore[no-untyped-def]
    (tmp_path / f"{name}.password").write_text(password + "\n")
    return parse_config(
        {
            "site": {"name": "tls-lab"},
            "device": [
                {
                    "name": "cal-1",
                    "station": "s1",
                    "family": "vik202",
                    "transport": "/dev/null",
                    "poll_interval_s": 0.02,
                }
            ],
            "mqtt": {
                "host": broker.host,
                "port": broker.port,
                "client_id": f"ctl-{name}",
                "username": USER,
                "password_file": f"{name}.password",
                "tls": {"ca_file": "ca.crt"},
            },
            "outbox": {"path": f"{name}.sqlite3"},
            "service": {"backoff_initial_s": 0.1, "backoff_max_s": 0.5, "drain_timeout_s": 1.0},
            "history": {"enabled": False},
        },
        base_dir=tmp_path,
    )


async def test_tls_with_password_delivers_and_wrong_password_keeps_everything(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_mosquitto()
    caplog.set_level(logging.WARNING)
    ca, cert, key = make_certificates(tmp_path)
    broker = MosquittoBroker(
        users={USER: PASSWORD, "reader": "r"}, tls=TlsListener(ca, cert, key), workdir=tmp_path / "broker"
    )
    (tmp_path / "broker").mkdir()
    with broker:
        tls = aiomqtt.TLSParameters(ca_certs=str(ca))
        async with MqttCollector(
            broker.host, broker.port, tls_params=tls, username="reader", password="r"
        ) as collector:
            async with Lab(tls_config(tmp_path, broker, PASSWORD, "good")) as good:
                await collector.wait_for(lambda: len(collector.payloads("/reading")) >= 10, what="readings over TLS")
                await good.shutdown()

            await collector.wait_for(
                lambda: (
                    len({p["msg_id"] for p in collector.payloads("/reading")}) == len(good.sources["cal-1"].produced)
                ),
                what="all readings of the good run",
            )
            async with Lab(tls_config(tmp_path, broker, WRONG_PASSWORD, "bad")) as bad:
                while "Not authorized" not in caplog.text:
                    await asyncio.sleep(0.05)
                await bad.shutdown()
    assert bad.service.mqtt is not None and bad.service.mqtt.published == 0
    assert bad.service.committed > 0
    delivered = {p["msg_id"] for p in collector.payloads("/reading")}
    assert len(delivered) == len(good.sources["cal-1"].produced)  # nothing from the unauthorised run
    assert "drain time over while disconnected" in caplog.text  # kept on disk, exit bounded by drain_timeout_s
    assert PASSWORD not in caplog.text and WRONG_PASSWORD not in caplog.text
