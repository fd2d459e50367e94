"""A real Mosquitto for tests: free loopback port, generated config, stop/kill/restart on the same port.

Use the fixture by importing it into a test module (pytest picks up imported fixtures):

    from tests.mosquitto_service import mosquitto  # noqa: F401

    def test_something(mosquitto):
        url = (mosquitto.host, mosquitto.port)
        mosquitto.stop(); mosquitto.start()   # graceful restart, same port, sessions kept
        mosquitto.kill(); mosquitto.start()   # crash restart

Or build one directly with `MosquittoBroker(users={"u": "p"}, tls=TlsListener(...))` inside a
`with` block, or `AclMosquittoBroker(users=..., acl_file=...)` for a broker that also applies an
ACL file. Tests are skipped (not failed) when the mosquitto binary is not installed.
The process manager itself lives in controller/lab/embedded_broker.py because `hotlab run`
uses the same code to give newcomers a broker.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import aiomqtt
import pytest

from hotlab.controller.lab.embedded_broker import (
    MosquittoBroker,
    TlsListener,
    free_tcp_port,
    mosquitto_binary,
)

__all__ = [
    "AclMosquittoBroker",
    "MosquittoBroker",
    "MqttCollector",
    "TlsListener",
    "free_tcp_port",
    "mosquitto",
    "require_mosquitto",
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
