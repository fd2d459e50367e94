"""`hotlab broker-config`: every config it writes starts a real mosquitto, and the broker is closed as it says.

mosquitto stops at start on an unknown or misspelled option, so each variant is started. The site
broker is then checked from outside, as a client would meet it: TLS only, no anonymous client, each
user's password the one typed into the generated make-passwords.sh, a reader's command refused by
the ACL and never delivered, the controller kept to its own site. What the bridge sends is checked
against docs/mqtt.md's topic table, not against the generator's own list.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import paho.mqtt.client as paho
import pytest

from hotlab.controller.cli.main import main as hotlab
from hotlab.controller.deploy.mosquitto_site import MQTT_TLS_PORT, SITE_USERS, site_acl
from tests.mosquitto_service import (
    ConfiguredMosquitto,
    NumberedPublisher,
    answer_prompts,
    free_tcp_port,
    require_mosquitto,
    start_configured,
)
from tests.test_mqtt_tls import make_certificates

REPO = Path(__file__).resolve().parent.parent
SITE = "site-b"
#: MQTT 5.0 §3.4.2.1, PUBACK reason codes: 0x87 "Not authorized".
NOT_AUTHORIZED = 0x87


def generate(tmp_path: Path, *extra: str, port: int = MQTT_TLS_PORT) -> Path:
    """Run `hotlab broker-config` for a listener on 127.0.0.1:`port`; the output directory."""
    pki = tmp_path / "pki"
    if not pki.exists():
        pki.mkdir()
        make_certificates(pki)
    out = tmp_path / "out"
    code = hotlab(
        [
            "broker-config",
            *("--site", SITE, "--out", str(out), "--listen", f"127.0.0.1:{port}"),
            *("--certfile", str(pki / "server.crt"), "--keyfile", str(pki / "server.key")),
            *("--persistence-dir", str(out), "--log-file", str(out / "mosquitto.log"), "--run-as", "root"),
            *[argument.replace("{ca}", str(pki / "ca.crt")) for argument in extra],
        ]
    )
    assert code == 0
    return out


@contextlib.contextmanager
def running(tmp_path: Path, *extra: str) -> Iterator[tuple[ConfiguredMosquitto, dict[str, str]]]:
    """mosquitto on a generated config, with the passwords typed into make-passwords.sh."""
    require_mosquitto()
    out = generate(tmp_path, *extra)
    passwords = {user.name: f"{user.name}-password-0123" for user in SITE_USERS}
    answer_prompts(["sh", "make-passwords.sh"], out, [p for password in passwords.values() for p in (password,) * 2])
    broker = start_configured(lambda port: generate(tmp_path, *extra, port=port) / "mosquitto.conf", out)
    try:
        yield broker, passwords
    finally:
        broker.close()


def bridge_options(tmp_path: Path) -> list[str]:
    (tmp_path / "bridge.password").write_text("bridge-secret-0123\n")
    return [
        *("--central", f"127.0.0.1:{free_tcp_port()}", "--central-cafile", "{ca}"),
        *("--bridge-password-file", str(tmp_path / "bridge.password")),
    ]


@pytest.mark.integration
@pytest.mark.parametrize("variant", ["site only", "bridged", "client certificates"])
def test_every_generated_config_starts_mosquitto(tmp_path: Path, variant: str) -> None:
    extra = {"site only": [], "bridged": bridge_options(tmp_path), "client certificates": ["--client-cafile", "{ca}"]}
    with running(tmp_path, *extra[variant]) as (broker, _passwords):
        log = broker.log_path.read_text()
        assert "running" in log and "Error: " not in log.split("running")[0], log


@pytest.mark.integration
async def test_with_a_client_ca_a_client_needs_a_certificate_besides_its_password(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    with running(tmp_path, "--client-cafile", "{ca}") as (broker, passwords):
        options = {"username": "dashboard", "password": passwords["dashboard"], "timeout": 2}
        # The test CA's server certificate has no key-usage limits, so it serves as a client certificate of that CA.
        certificate = {"certfile": str(pki / "server.crt"), "keyfile": str(pki / "server.key")}
        with_certificate = aiomqtt.TLSParameters(ca_certs=str(pki / "ca.crt"), **certificate)
        async with aiomqtt.Client(broker.host, broker.port, tls_params=with_certificate, **options):  # type: ignore[arg-type]
            pass
        without = aiomqtt.TLSParameters(ca_certs=str(pki / "ca.crt"))
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(broker.host, broker.port, tls_params=without, **options):  # type: ignore[arg-type]
                pass


@pytest.mark.integration
async def test_the_site_broker_admits_only_its_users_over_tls_and_the_acl_holds(tmp_path: Path) -> None:
    tls = aiomqtt.TLSParameters(ca_certs=str(tmp_path / "pki" / "ca.crt"))
    host = "127.0.0.1"

    def client(user: str | None, password: str | None = None, **options: object) -> aiomqtt.Client:
        return aiomqtt.Client(host, port, username=user, password=password, **{"timeout": 5, **options})  # type: ignore[arg-type]

    with running(tmp_path, *bridge_options(tmp_path)) as (broker, passwords):
        port = broker.port
        for user, password in passwords.items():  # each password typed into the script lets its user in
            async with client(user, password, tls_params=tls):
                pass
        for refused in (
            client(None, tls_params=tls),  # anonymous
            client("dashboard", "not-the-password", tls_params=tls),
            client("dashboard", passwords["dashboard"], timeout=1),  # no TLS: the listener speaks nothing else
        ):
            with pytest.raises(aiomqtt.MqttError):
                async with refused:
                    pass

        commands = f"hotlab/{SITE}/+/+/cmd/+"
        command_topic = f"hotlab/{SITE}/elution-1/gen-1/cmd/start_elution"
        received: list[bytes] = []
        async with client("hotlab-controller", passwords["hotlab-controller"], tls_params=tls) as controller:
            await controller.subscribe(commands, qos=1)

            async def listen() -> None:
                async for message in controller.messages:
                    received.append(bytes(message.payload))  # type: ignore[arg-type]

            listener = asyncio.create_task(listen())
            try:
                reader_options = {"username": "dashboard", "password": passwords["dashboard"], "tls_params": tls}
                async with NumberedPublisher(
                    host, port, [(command_topic, False)], client_id="reader", **reader_options
                ) as reader:
                    forged = reader.publish_next()
                    await reader.settled()
                assert [(msg_id, re.search(r"0x([0-9a-f]{2})", why)[1]) for msg_id, why in reader.refused] == [  # type: ignore[index]
                    (forged, f"{NOT_AUTHORIZED:02x}")
                ]
                panel_options = {"username": "hotlab-panel", "password": passwords["hotlab-panel"], "tls_params": tls}
                async with NumberedPublisher(
                    host, port, [(command_topic, False)], client_id="panel", **panel_options
                ) as panel:
                    sent = panel.publish_next()
                    await panel.settled()
                async with asyncio.timeout(5):
                    while not received:
                        await asyncio.sleep(0.02)
                # The broker handled the reader's command before the panel's: delivered, it would have come first.
                assert len(received) == 1 and sent.encode() in received[0] and forged.encode() not in received[0]

                other_site = {
                    "username": "hotlab-controller",
                    "password": passwords["hotlab-controller"],
                    "tls_params": tls,
                }
                async with NumberedPublisher(
                    host,
                    port,
                    [("hotlab/other-site/s/d/reading", False), (f"hotlab/{SITE}/s/d/reading", False)],
                    client_id="ctl",
                    **other_site,
                ) as publisher:
                    elsewhere, own = publisher.publish_next(), publisher.publish_next()
                    await publisher.settled()
                assert [msg_id for msg_id, _ in publisher.refused] == [elsewhere] and publisher.acked == [own]
            finally:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)


def _documented_topics() -> list[str]:
    """Every topic of docs/mqtt.md's Topics table, with its placeholders filled in."""
    text = (REPO / "docs" / "mqtt.md").read_text()
    table = text.split("## Topics", 1)[1].split("\n## ", 1)[0]
    topics = re.findall(r"^\| `(hotlab/[^`]+)`", table, re.M)
    names = {"<site>": SITE, "<station>": "hotcell-1", "<device>": "calibrator-1", "<action>": "start_elution"}
    names |= {"<setting>": "cs-137", "<item>": "daily_constancy"}
    filled = []
    for topic in topics:
        for placeholder, name in names.items():
            topic = topic.replace(placeholder, name)
        assert "<" not in topic, topic
        filled.append(topic)
    return filled


def test_the_bridge_sends_every_kind_docs_mqtt_lists_and_no_command_or_reply(tmp_path: Path) -> None:
    out = generate(tmp_path, *bridge_options(tmp_path))
    bridge = (out / "conf.d" / "hotlab-central.conf").read_text()
    directions = re.findall(r"^topic (\S+) (\w+) (\d)$", bridge, re.M)
    assert {(direction, qos) for _, direction, qos in directions} == {("out", "1")}
    patterns = [pattern for pattern, _, _ in directions]
    documented = _documented_topics()
    assert len(documented) >= 15  # the table as it stands: a shrinking parse would pass vacuously
    for topic in documented:
        bridged = any(paho.topic_matches_sub(pattern, topic) for pattern in patterns)
        assert bridged == ("/cmd/" not in topic), topic
    assert paho.topic_matches_sub(patterns[0], "hotlab/other-site/hotcell-1/calibrator-1/reading") is False


def test_the_bridge_password_is_only_in_the_owner_only_bridge_file(tmp_path: Path) -> None:
    out = generate(tmp_path, *bridge_options(tmp_path))
    bridge_file = out / "conf.d" / "hotlab-central.conf"
    assert stat.S_IMODE(bridge_file.stat().st_mode) == 0o600
    assert "remote_password bridge-secret-0123" in bridge_file.read_text().splitlines()
    for path in out.rglob("*"):
        if path.is_file() and path != bridge_file:
            assert "bridge-secret-0123" not in path.read_text(), path


def test_the_example_acl_is_the_generated_one_for_any_site() -> None:
    assert (REPO / "examples" / "mosquitto.acl").read_text() == site_acl("+"), (
        "regenerate: python -c 'from hotlab.controller.deploy.mosquitto_site import site_acl; "
        'print(site_acl("+"), end="")\' > examples/mosquitto.acl'
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--site", "a/b"], "site name 'a/b' is not valid"),
        (["--site", "a", "--central", "h:8883"], "--central needs --central-cafile"),
        (["--site", "a", "--central-cafile", "ca.crt"], "--central-cafile needs --central"),
        (["--site", "a", "--listen", "127.0.0.1:0"], "the port must be 1-65535"),
        (
            ["--site", "a", "--central", "h", "--central-cafile", "ca", "--bridge-password-file", "missing"],
            "cannot read the bridge password from missing",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    arguments: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    code = hotlab(["broker-config", "--out", "out", "--certfile", "c", "--keyfile", "k", *arguments])
    error = capsys.readouterr().err
    assert code == 2 and message in error and error.count("\n") == 1, error
    assert not (tmp_path / "out").exists()
