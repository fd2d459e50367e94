"""A real Mosquitto for tests: free loopback port, generated config, stop/kill/restart on the same port.

Use the fixture by importing it into a test module (pytest picks up imported fixtures):

    from tests.mosquitto_service import mosquitto  # noqa: F401

    def test_something(mosquitto):
        url = (mosquitto.host, mosquitto.port)
        mosquitto.stop(); mosquitto.start()   # graceful restart, same port, sessions kept
        mosquitto.kill(); mosquitto.start()   # crash restart

Or build one directly with `MosquittoBroker(users={"u": "p"}, tls=TlsListener(...))` inside a
`with` block, or `AclMosquittoBroker(users=..., acl_file=...)` for a broker that also applies an
ACL file, or `ConfiguredMosquitto(config_file=...)` for one that runs a config written elsewhere
(`hotlab broker-config`). `bridged_site(...)` starts a generated site broker bridged through a
`CuttableLink` to a central broker, and `NumberedPublisher` loads it. Tests are skipped (not
failed) when the mosquitto binary is not installed.
The process manager itself lives in controller/lab/embedded_broker.py because `hotlab run`
uses the same code to give newcomers a broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import secrets
import select
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import aiomqtt
import pytest

from hotlab.controller.deploy.mosquitto_site import (
    CENTRAL_ACL_NAME,
    CONF_NAME,
    PASSWORD_SCRIPT_NAME,
    SITE_USERS,
    Bridge,
    SiteBroker,
    write_site_broker,
)
from hotlab.controller.lab.embedded_broker import (
    BrokerUnavailable,
    MosquittoBroker,
    TlsListener,
    free_tcp_port,
    mosquitto_binary,
)
from hotlab.controller.sinks.aiomqtt_paho import PahoPublisher

__all__ = [
    "AclMosquittoBroker",
    "BridgedSite",
    "ConfiguredMosquitto",
    "CuttableLink",
    "MosquittoBroker",
    "MqttCollector",
    "NumberedPublisher",
    "SubscriberProcess",
    "TlsListener",
    "answer_prompts",
    "bridged_site",
    "free_tcp_port",
    "mosquitto",
    "require_mosquitto",
    "start_configured",
]


def require_mosquitto() -> None:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto binary not installed")


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A started, persistent, anonymous Mosquitto on 127.0.0.1; stopped and cleaned up after the test."""
    require_mosquitto()
    workdir = tmp_path / "mosquitto"
    workdir.mkdir()
    broker = MosquittoBroker(workdir=workdir)
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@dataclass
class AclMosquittoBroker(MosquittoBroker):
    """A MosquittoBroker that also applies `acl_file` (mosquitto.conf `acl_file`); give it `users` too,
    since an ACL names users (examples/mosquitto.acl)."""

    acl_file: Path | None = None

    def _write_config(self) -> Path:
        config = super()._write_config()
        if self.acl_file is not None:
            with config.open("a", encoding="utf-8") as lines:
                lines.write(f"acl_file {self.acl_file.resolve()}\n")
        return config


class MqttCollector:
    """A persistent-session QoS 1 subscriber that records every message it gets, across broker restarts.

    Connect it before the traffic starts (`async with`); with `clean_session=False` the
    broker queues messages for it while it is disconnected and, with persistence, across a
    graceful broker restart. `messages` holds (topic, payload dict, retain flag) in arrival order.
    """

    def __init__(
        self, host: str, port: int, topic: str = "hotlab/#", client_id: str = "test-collector", **client_options: Any
    ) -> None:
        self.client_options = client_options  # e.g. tls_params, username, password
        self.host = host
        self.port = port
        self.topic = topic
        self.client_id = client_id
        self.messages: list[tuple[str, dict[str, Any], bool]] = []
        self.connected = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.connected.wait(), 20)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        client = aiomqtt.Client(
            self.host, self.port, identifier=self.client_id, clean_session=False, timeout=5, **self.client_options
        )
        while True:
            try:
                async with client:
                    await client.subscribe(self.topic, qos=1)
                    self.connected.set()
                    async for message in client.messages:
                        payload = json.loads(bytes(message.payload))  # type: ignore[arg-type]
                        self.messages.append((str(message.topic), payload, bool(message.retain)))
                        self._changed.set()
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.2)

    def payloads(self, topic_suffix: str = "", kind: str | None = None) -> list[dict[str, Any]]:
        return [
            p
            for t, p, _ in self.messages
            if t.endswith(topic_suffix) and (kind is None or p.get("schema", "").startswith(f"hotlab.{kind}/"))
        ]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0, what: str = "messages") -> None:
        """Wait (event-driven) until `predicate()` holds; fail with a clear message after `timeout`."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; got {len(self.messages)}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
            except TimeoutError:
                pass


@dataclass
class ConfiguredMosquitto(MosquittoBroker):
    """A MosquittoBroker that runs `config_file` as it is (e.g. one `hotlab broker-config` wrote).

    Give it the port the config listens on, and as `workdir` the directory the config logs to
    (`mosquitto.log` there), so that a failed start shows the log.
    """

    config_file: Path | None = None

    def _write_config(self) -> Path:
        assert self.config_file is not None and self.port, "ConfiguredMosquitto needs config_file and port"
        return self.config_file.resolve()


def start_configured(write_config: Callable[[int], Path], workdir: Path) -> ConfiguredMosquitto:
    """Start mosquitto on the config `write_config(port)` writes for a free port; another port if that one was taken.

    A port found free may be taken before mosquitto binds it (other tests run beside this one), and
    the port is written into the config, so a new port means a new config.
    """
    for attempt in range(3):
        port = free_tcp_port()
        broker = ConfiguredMosquitto(port=port, workdir=workdir, config_file=write_config(port))
        try:
            return broker.start()
        except BrokerUnavailable as exc:
            if "Address already in use" not in str(exc) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def answer_prompts(command: list[str], cwd: Path, answers: list[str], timeout_s: float = 20.0) -> str:
    """Run an interactive `command` on a pseudo-terminal, typing `answers` one per password prompt; its output.

    mosquitto_passwd reads passwords from the terminal, one prompt at a time: a pipe would hand the
    first of several invocations every line at once.
    """
    master, slave = pty.openpty()
    process = subprocess.Popen(command, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    output = b""
    typed = 0
    deadline = time.monotonic() + timeout_s
    try:
        while process.poll() is None or select.select([master], [], [], 0)[0]:
            if time.monotonic() > deadline:
                raise AssertionError(f"{command} still runs after {timeout_s:g} s: {output.decode(errors='replace')}")
            if select.select([master], [], [], 0.1)[0]:
                try:
                    output += os.read(master, 4096)
                except OSError:  # EIO: the last process holding the terminal ended
                    break
            while typed < output.count(b"assword:") and typed < len(answers):
                os.write(master, answers[typed].encode() + b"\n")
                typed += 1
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
        process.wait()
    if process.returncode != 0:
        raise AssertionError(f"{command} exited with {process.returncode}: {output.decode(errors='replace')}")
    return output.decode(errors="replace")


class CuttableLink:
    """A TCP relay between a bridge and its remote broker, cut and restored like a WAN link.

    `cut()`: bytes stop moving both ways on the open connections, with neither FIN nor RST, as when
    a line goes dark: each end notices only by its keepalive, and what was in flight is lost with
    the connection. New connections are reset at once (no route). `restore()`: the connections
    held through the cut are reset, as by a router or VPN gateway that lost their state, and new
    ones are relayed again.
    """

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self.accepted = 0
        self.refused = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._relays: set[_Relay] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for relay in list(self._relays):
            relay.reset()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def cut(self) -> None:
        self._flowing.clear()
        for relay in self._relays:
            relay.doomed = True

    def restore(self) -> None:
        for relay in [relay for relay in self._relays if relay.doomed]:
            relay.reset()
        self._flowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            if not self._flowing.is_set():
                self.refused += 1
                _reset(writer)
                return
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
            except OSError:
                _reset(writer)
                return
            self.accepted += 1
            relay = _Relay(writer, upstream_writer)
            self._relays.add(relay)
            try:
                await asyncio.gather(
                    self._pump(reader, upstream_writer, relay), self._pump(upstream_reader, writer, relay)
                )
            finally:
                self._relays.discard(relay)
                relay.reset()
        finally:
            self._handlers.discard(handler)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, relay: _Relay) -> None:
        try:
            while True:
                await self._flowing.wait()
                data = await source.read(65536)
                await self._flowing.wait()  # bytes read as the link went dark are lost with it
                if not data or relay.doomed:
                    return
                sink.write(data)
                await sink.drain()
        except (OSError, ConnectionError):
            return
        finally:
            relay.reset()


@dataclass(eq=False)
class _Relay:
    """One relayed connection: its two ends; `doomed` once it was open when the link was cut."""

    downstream: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    doomed: bool = False

    def reset(self) -> None:
        _reset(self.downstream)
        _reset(self.upstream)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), not a FIN: the peer learns at once that the connection is gone."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.fileno() >= 0:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class NumberedPublisher:
    """Publishes numbered messages, each with a new 32-hex-digit `msg_id`, at QoS 1 and MQTT 5.

    It publishes as the controller's MQTT sink does (controller/sinks/aiomqtt_paho.py: many
    PUBLISHes in flight, each PUBACK reported with its reason code), so `acked` holds the msg_ids
    the broker took and `refused` those it answered with a failure reason (MQTT 5.0 §3.4.2.1).
    `topics` are (topic, retain) pairs, used in turn; `body` holds fields every payload carries too.
    """

    def __init__(
        self,
        host: str,
        port: int,
        topics: list[tuple[str, bool]],
        *,
        client_id: str,
        body: dict[str, Any] | None = None,
        **client_options: Any,
    ) -> None:
        self.topics = topics
        self.body = body or {}
        self.client = aiomqtt.Client(
            host,
            port,
            identifier=client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            max_inflight_messages=100,
            timeout=10,
            **client_options,
        )
        self._publisher = PahoPublisher(self.client)
        self._publisher.on_puback(self._on_puback)
        self._pending: dict[int, str] = {}
        self.sent = 0
        self.acked: list[str] = []
        self.refused: list[tuple[str, str]] = []

    async def __aenter__(self) -> Self:
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.client.__aexit__(*exc)

    def publish_next(self) -> str:
        topic, retain = self.topics[self.sent % len(self.topics)]
        msg_id = uuid.uuid4().hex
        payload = json.dumps({**self.body, "msg_id": msg_id, "seq": self.sent, "time_ns": time.time_ns()})
        self._pending[self._publisher.publish(topic, payload, qos=1, retain=retain)] = msg_id
        self.sent += 1
        return msg_id

    async def run(self, rate_per_s: float, duration_s: float) -> None:
        """Publish at `rate_per_s` for `duration_s`, in steps of 10 ms."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        first = self.sent
        while (elapsed := loop.time() - start) < duration_s:
            while self.sent - first < elapsed * rate_per_s:
                self.publish_next()
            await asyncio.sleep(0.01)

    async def settled(self, timeout_s: float = 10.0) -> None:
        """Wait until every message published has its PUBACK."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._pending:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{len(self._pending)} of {self.sent} PUBACKs missing after {timeout_s:g} s")
            await asyncio.sleep(0.02)

    def _on_puback(self, mid: int, refusal: str | None) -> None:
        msg_id = self._pending.pop(mid, None)
        if msg_id is None:
            return
        if refusal is None:
            self.acked.append(msg_id)
        else:
            self.refused.append((msg_id, refusal))


#: The central broker's user that reads everything the sites send, and their links' state.
CENTRAL_READER = "central-reader"


@dataclass
class BridgedSite:
    """A site broker generated by `hotlab broker-config`, bridged through `link` to `central`."""

    config: SiteBroker
    broker: ConfiguredMosquitto
    central: AclMosquittoBroker
    link: CuttableLink
    cafile: Path
    #: Each site user's password, as typed into the generated make-passwords.sh.
    passwords: dict[str, str]
    central_password: str

    def site_client(self, user: str) -> dict[str, Any]:
        """aiomqtt.Client options (beside host and port) for `user` on the site broker: TLS and its password."""
        return {
            "username": user,
            "password": self.passwords[user],
            "tls_params": aiomqtt.TLSParameters(ca_certs=str(self.cafile)),
        }

    def central_client(self) -> dict[str, Any]:
        """The same for the central reader on the central broker."""
        return {
            "username": CENTRAL_READER,
            "password": self.central_password,
            "tls_params": aiomqtt.TLSParameters(ca_certs=str(self.cafile)),
        }

    def central_subscriber(self, client_id: str) -> SubscriberProcess:
        """The central reader subscribed to everything of this site (`async with` it to wait for its SUBACK)."""
        return SubscriberProcess(
            self.central.host,
            self.central.port,
            f"hotlab/{self.config.site}/#",
            client_id=client_id,
            cafile=self.cafile,
            username=CENTRAL_READER,
            password=self.central_password,
        )


@contextlib.asynccontextmanager
async def bridged_site(
    directory: Path,
    site: str,
    tls: TlsListener,
    *,
    keepalive_interval_s: int = 30,
    restart_timeout_s: tuple[int, int] = (5, 30),
) -> AsyncIterator[BridgedSite]:
    """Central broker (TLS, passwords, the generated central ACL), link, and the generated site broker.

    `tls` serves both brokers (a certificate for 127.0.0.1 of a test CA), and is the CA the bridge
    checks the central broker's certificate against, hostname included.
    """
    require_mosquitto()
    async with CuttableLink("127.0.0.1", 0) as link:  # aimed at the central broker once it runs
        out = directory / "site"
        bridge = Bridge(
            host="127.0.0.1",
            port=link.port,
            cafile=tls.cafile.resolve(),
            username=f"hotlab-bridge-{site}",
            password=secrets.token_hex(16),
            keepalive_interval_s=keepalive_interval_s,
            restart_timeout_s=restart_timeout_s,
        )

        def site_config(port: int) -> SiteBroker:
            return SiteBroker(
                site=site,
                certfile=tls.certfile.resolve(),
                keyfile=tls.keyfile.resolve(),
                listen_host="127.0.0.1",
                listen_port=port,
                bridge=bridge,
                install_dir=out.resolve(),
                persistence_dir=out.resolve(),
                log_file=out.resolve() / "mosquitto.log",
                run_as="root",  # no effect unless started as root, where "mosquitto" could not enter the test's directory
            )

        def write_site(port: int) -> Path:
            write_site_broker(site_config(port), out)
            return out / CONF_NAME

        write_site(0)  # for the password script and the central ACL; started below on a free port
        passwords = {user.name: secrets.token_hex(12) for user in SITE_USERS}
        answers = [answer for password in passwords.values() for answer in (password, password)]
        await asyncio.to_thread(answer_prompts, ["sh", PASSWORD_SCRIPT_NAME], out, answers)
        central_dir = directory / "central"
        central_dir.mkdir()
        central_acl = central_dir / "central.acl"
        reader_rules = f"user {CENTRAL_READER}\ntopic read hotlab/#\ntopic read $SYS/broker/connection/+/state\n"
        central_acl.write_text((out / CENTRAL_ACL_NAME).read_text() + "\n" + reader_rules)
        central_password = secrets.token_hex(12)
        central = AclMosquittoBroker(
            users={bridge.username: bridge.password, CENTRAL_READER: central_password},
            tls=tls,
            workdir=central_dir,
            acl_file=central_acl,
        )
        broker: ConfiguredMosquitto | None = None
        try:
            await asyncio.to_thread(central.start)
            link.target = (central.host, central.port)
            broker = await asyncio.to_thread(start_configured, write_site, out)
            yield BridgedSite(site_config(broker.port), broker, central, link, tls.cafile, passwords, central_password)
        finally:
            if broker is not None:
                await asyncio.to_thread(broker.close)
            await asyncio.to_thread(central.close)


class SubscriberProcess:
    """`mosquitto_sub` in a process of its own, QoS 1 with a persistent session, recording what arrives.

    Counting in another process costs the test's event loop nothing, so a backlog drains at the
    brokers' pace rather than at the pace of a Python client sharing the loop with the publisher.
    `arrivals` holds (time.monotonic() at arrival, msg_id) for each message, duplicates included.
    """

    def __init__(
        self, host: str, port: int, topic: str, *, client_id: str, cafile: Path, username: str, password: str
    ) -> None:
        self.arrivals: list[tuple[float, str]] = []
        self.subscribed = threading.Event()
        self._process = subprocess.Popen(
            [
                *("stdbuf", "-oL"),  # a line at a time into the pipe, -d's lines included
                "mosquitto_sub",
                *("-h", host, "-p", str(port), "--cafile", str(cafile), "-u", username, "-P", password),
                *("-i", client_id, "-c", "-q", "1", "-t", topic, "-F", "%p", "-d"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            if line.startswith("{"):
                self.arrivals.append((time.monotonic(), json.loads(line)["msg_id"]))
            elif "received SUBACK" in line:  # -d: the subscription is in place, so the session keeps what comes
                self.subscribed.set()

    async def __aenter__(self) -> Self:
        if not await asyncio.to_thread(self.subscribed.wait, 20):
            self.close()
            raise AssertionError("mosquitto_sub did not subscribe within 20 s")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def msg_ids(self) -> list[str]:
        return [msg_id for _, msg_id in list(self.arrivals)]

    async def wait_for(self, msg_ids: set[str], timeout_s: float) -> float:
        """Wait until every one of `msg_ids` arrived; return when the last of them first did."""
        deadline = time.monotonic() + timeout_s
        while True:
            first = {msg_id: at for at, msg_id in reversed(list(self.arrivals))}
            if msg_ids <= first.keys():
                return max((first[msg_id] for msg_id in msg_ids), default=time.monotonic())
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(msg_ids - first.keys())} messages did not arrive within {timeout_s:g} s")
            await asyncio.sleep(0.1)

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
        self._process.wait(10)
        self._thread.join(5)
