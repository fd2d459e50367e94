"""The panel's live state: one MQTT subscriber feeding the demo's `LabView`, and a change signal for the pages.

The panel is a consumer of the bus like any other (docs/mqtt.md): it shows what the controller
committed and published, never its private memory. `LabView.apply` already de-duplicates on
msg_id and ignores topics it does not show, so a change is counted only when it applied
something; the pages wait on `wait_for_change` instead of polling. aiomqtt 2.x does not
reconnect by itself: `run` reconnects after any loss, with the lab's TLS and credentials
(a lab whose broker needs them would otherwise show nothing).
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import aiomqtt

from hotlab.controller.config import LabConfig, MqttConfig
from hotlab.controller.lab.demo import LabView, ViewInputError
from hotlab.controller.sinks.mqtt import tls_parameters

log = logging.getLogger("hotlab.web")

#: How long to wait before connecting again after the broker was lost or refused us.
RECONNECT_S = 1.0


class LiveFeed:
    """The lab's latest state and a version number that grows with every change a page would show."""

    def __init__(self, site: str, mqtt: MqttConfig) -> None:
        self.mqtt = mqtt
        self.view = LabView(site=site, broker=f"{mqtt.host}:{mqtt.port}", acceleration=1.0)
        self.version = 0
        self._changed = asyncio.Event()

    @classmethod
    def for_lab(cls, config: LabConfig, mqtt: MqttConfig) -> LiveFeed:
        """The feed of `config`'s lab from broker `mqtt`, read under the panel's own identity ([web])."""
        return cls(config.site, config.web.broker(mqtt))

    def apply(self, topic: str, payload: bytes | str) -> None:
        """One message from the bus; a message the view cannot show is logged and counted, never fatal."""
        before = self.view.counts.total()
        try:
            self.view.apply(topic, payload)
        except ViewInputError as exc:
            self.view.rejected += 1
            log.warning("web panel: %s", exc)
            return
        except Exception:  # a payload no check foresaw (nesting too deep, say) must not end the subscription
            self.view.rejected += 1
            log.exception("web panel: message on %s not shown", topic)
            return
        if self.view.counts.total() != before:
            self._bump()

    async def wait_for_change(self, seen: int, timeout_s: float) -> int:
        """The version once it differs from `seen`, or the current one after `timeout_s`."""
        if self.version == seen:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except TimeoutError:
                pass
        return self.version

    async def run(self, *, subscribed: asyncio.Event | None = None) -> None:
        """Stay subscribed to hotlab/<site>/# until cancelled."""
        topic = f"hotlab/{self.view.site}/#"
        identifier = f"hotlab-web-{uuid.uuid4().hex[:8]}"
        while True:
            try:
                async with broker_client(self.mqtt, identifier) as client:
                    await client.subscribe(topic, qos=1)
                    self._set_connection(True, "")
                    if subscribed is not None:
                        subscribed.set()
                    async for message in client.messages:
                        self.apply(str(message.topic), message.payload)
            except aiomqtt.MqttError as exc:
                self._set_connection(False, str(exc))
                await asyncio.sleep(RECONNECT_S)

    def _set_connection(self, connected: bool, error: str) -> None:
        if (self.view.connected, self.view.broker_error) != (connected, error):
            self.view.connected, self.view.broker_error = connected, error
            self._bump()

    def _bump(self) -> None:
        """Wake every waiting page: each waits on the event of its time, then a fresh one takes its place."""
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()


def broker_client(mqtt: MqttConfig, identifier: str) -> aiomqtt.Client:
    """A client of the lab's broker as `mqtt` describes it (TLS, credentials), for each of the panel's connections."""
    tls = mqtt.tls
    return aiomqtt.Client(
        mqtt.host,
        mqtt.port,
        identifier=identifier,
        username=mqtt.username,
        password=mqtt.password.reveal() if mqtt.password is not None else None,
        tls_params=tls_parameters(tls),
        tls_insecure=tls.insecure_skip_hostname_check if tls is not None else None,
        keepalive=mqtt.keepalive_s,
        timeout=mqtt.connect_timeout_s,
    )
