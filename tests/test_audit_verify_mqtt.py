"""`hotlab audit verify --config lab.toml --mqtt` reads the retained anchor as the lab's controller reaches
its broker: with the TLS and the username/password of [mqtt], not with a plain anonymous client."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiomqtt
import pytest

from hotlab.controller.cli.main import main as hotlab
from tests.mosquitto_service import MosquittoBroker, TlsListener, require_mosquitto
from tests.test_audit_anchor import anchor_message, cut, write_trail
from tests.test_mqtt_tls import make_certificates

pytestmark = pytest.mark.integration

USER, PASSWORD = "hotlab-ctl", "correct horse battery staple"


def _lab_config(directory: Path, broker: MosquittoBroker, password_file: str = "mqtt.password") -> Path:
    (directory / "mqtt.password").write_text(PASSWORD + "\n")
    config = directory / "lab.toml"
    config.write_text(
        '[site]\nname = "lab"\n[service]\nstate_dir = "state"\n[history]\nenabled = false\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nclient_id = "ctl-1"\nusername = "{USER}"\n'
        f'password_file = "{password_file}"\n[mqtt.tls]\nca_file = "ca.crt"\n'
    )
    return config


async def _retain(broker: MosquittoBroker, ca: Path, topic: str, payload: dict[str, object]) -> None:
    tls = aiomqtt.TLSParameters(ca_certs=str(ca))
    async with aiomqtt.Client(broker.host, broker.port, username=USER, password=PASSWORD, tls_params=tls) as client:
        await client.publish(topic, json.dumps(payload), qos=1, retain=True)


def test_verify_reads_the_retained_anchor_with_the_labs_tls_and_credentials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    require_mosquitto()
    monkeypatch.delenv("HOTLAB_AUDIT_KEY", raising=False)
    monkeypatch.delenv("HOTLAB_AUDIT_KEY_FILE", raising=False)
    ca, cert, key = make_certificates(tmp_path)
    (tmp_path / "broker").mkdir()
    with MosquittoBroker(users={USER: PASSWORD}, tls=TlsListener(ca, cert, key), workdir=tmp_path / "broker") as broker:
        config = _lab_config(tmp_path, broker)
        trail = tmp_path / "state" / "audit.jsonl"
        records = write_trail(trail, 3)
        anchor = anchor_message(trail, records[0], records[-1])
        asyncio.run(_retain(broker, ca, anchor.topic, anchor.payload))
        cut(trail, 2)
        source = f"MQTT {broker.host}:{broker.port} {anchor.topic}"

        plain = ["audit", "verify", "--config", str(config), "--mqtt-host", broker.host]
        assert hotlab([*plain, "--mqtt-port", str(broker.port), "--mqtt-timeout", "2"]) == 0  # the defect
        assert "no anchor reachable" in capsys.readouterr().out

        assert hotlab(["audit", "verify", "--config", str(config), "--mqtt", "--require-anchor"]) == 1
        captured = capsys.readouterr()
        assert f"anchor used: #3 {records[-1].hash[:16]}… of {records[-1].time} from {source}" in captured.out
        assert "is TRUNCATED: 1 record(s) missing at its end" in captured.err


def test_mqtt_settings_errors_name_the_config_and_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "lab.toml"
    config.write_text('[site]\nname = "lab"\n[mqtt]\nhost = "127.0.0.1"\npassword_file = "absent"\n')
    write_trail(tmp_path / "var" / "audit.jsonl", 1)
    assert hotlab(["audit", "verify", "--config", str(config), "--mqtt"]) == 2
    assert f"hotlab audit verify: error: {config}: mqtt.password_file: cannot read" in capsys.readouterr().err
    assert hotlab(["audit", "verify", "--path", str(tmp_path / "var" / "audit.jsonl"), "--mqtt"]) == 2
    assert "--mqtt reads the broker from the lab config: give --config too" in capsys.readouterr().err
    config.write_text('[site]\nname = "lab"\n')
    assert hotlab(["audit", "verify", "--config", str(config), "--mqtt"]) == 2
    assert f"{config}: mqtt: is missing" in capsys.readouterr().err
