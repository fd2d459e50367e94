"""The one place that reaches past aiomqtt 2.x's public API, into the paho client it drives.

Why: the MQTT sink keeps up to `inflight_window` QoS 1 PUBLISHes of the outbox in flight.
aiomqtt's `publish` awaits each PUBACK on its own (a task, a `wait_for` and a scan of all
pending calls per message, a large share of the controller's CPU per reading:
docs/benchmarks.md), so the sink hands those publishes to paho without waiting and learns of
their PUBACKs from paho's `on_publish`. aiomqtt 2.x has no public API for either, so this
relies on three things that are not part of it:

* `aiomqtt.Client._client` is the `paho.mqtt.client.Client` that aiomqtt drives, one for the
  aiomqtt client's lifetime, reused on every connection;
* that paho client's `on_publish` is aiomqtt's own handler (it completes aiomqtt's awaited
  publishes), set once in `aiomqtt.Client.__init__`, so a handler chained after it stays in
  place across connections;
* aiomqtt selects paho's callback API version 2, which fixes `on_publish`'s signature.

`private_api_problems` says which of them no longer holds, and `PahoPublisher` refuses a
client for which any fails: an aiomqtt release that changed them would otherwise surface
as PUBACKs that never arrive, every connection ending in a publish timeout and resending.
tests/test_mqtt_aiomqtt_private_api.py checks them on a real client and broker. aiomqtt
itself still owns the connection: connect, subscribe, receive, its own awaited publishes.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any, cast

import aiomqtt
import paho.mqtt.client as paho

from hotlab.errors import HotlabError


class AiomqttPrivateApiChanged(HotlabError):
    """The installed aiomqtt no longer has the private attributes the MQTT sink relies on."""


def aiomqtt_version() -> str:
    return importlib.metadata.version("aiomqtt")


def private_api_problems(client: aiomqtt.Client) -> list[str]:
    """What this module relies on and `client` no longer offers, each naming the attribute; empty if all holds."""
    paho_client = getattr(client, "_client", None)
    if not isinstance(paho_client, paho.Client):
        return [f"aiomqtt.Client._client is {type(paho_client).__name__}, not a paho.mqtt.client.Client"]
    problems = []
    if paho_client.callback_api_version != paho.CallbackAPIVersion.VERSION2:
        problems.append(
            f"aiomqtt.Client._client.callback_api_version is {paho_client.callback_api_version!r}, not VERSION2"
        )
    handler = paho_client.on_publish
    if not callable(handler) or getattr(handler, "__self__", None) is not client:
        problems.append(
            f"aiomqtt.Client._client.on_publish is {handler!r}, not a method of the aiomqtt client set by its __init__"
        )
    return problems


class PahoPublisher:
    """Publishes on an aiomqtt client's paho client without awaiting, and reports each PUBACK.

    Created once per aiomqtt client, before its first connection; the client itself stays
    in use for everything else.
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        problems = private_api_problems(client)
        if problems:
            raise AiomqttPrivateApiChanged(
                f"aiomqtt {aiomqtt_version()} changed what the MQTT sink relies on "
                f"(hotlab.controller.sinks.aiomqtt_paho): {'; '.join(problems)}"
            )
        self._paho: paho.Client = client._client
        # Version 2 callbacks, checked above: the union paho declares narrows to that one.
        self._aiomqtt_on_publish = cast("paho.CallbackOnPublish_v2", self._paho.on_publish)

    def on_puback(self, callback: Callable[[int, str | None], None]) -> None:
        """Call `callback(mid, refusal)` on each PUBACK (a QoS 0 publish: once written), after aiomqtt's own handler.

        `refusal` is None when the broker took the message, else the MQTT 5 reason it gave for not
        taking it (a reason code of 0x80 or more, e.g. "Not authorized" or "Quota exceeded"): such
        a PUBACK completes the exchange but the message was not delivered. It runs on the event
        loop's thread (aiomqtt reads the socket there), for every publish of the client: also
        those aiomqtt's `publish` awaits, whose message ids the caller never saw. A second call
        replaces the first callback.
        """
        aiomqtt_on_publish = self._aiomqtt_on_publish

        def on_publish(
            paho_client: paho.Client, userdata: Any, mid: int, reason_code: paho.ReasonCode, properties: paho.Properties
        ) -> None:
            aiomqtt_on_publish(paho_client, userdata, mid, reason_code, properties)
            callback(mid, f"{reason_code} (0x{reason_code.value:02x})" if reason_code.is_failure else None)

        self._paho.on_publish = on_publish

    def publish(self, topic: str, payload: str | bytes, *, qos: int, retain: bool) -> int:
        """Queue one PUBLISH on the open connection and return its message id, without awaiting the PUBACK.

        paho sends PUBLISHes in the order of these calls. Raises `aiomqtt.MqttCodeError` when
        paho refuses it (e.g. not connected), as aiomqtt's own `publish` does.
        """
        info = self._paho.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, f"could not publish on {topic}")
        return info.mid


def retain_as_published(qos: int) -> paho.SubscribeOptions:
    """MQTT 5 subscription options that keep a PUBLISH's retain flag as its sender set it.

    aiomqtt's `subscribe` takes paho's options type; it is built here so that paho stays behind
    this module. MQTT 3.1.1 (and MQTT 5 without this option) clears the flag on delivery to a
    connected subscriber, so a retained command would look like a live one.
    """
    return paho.SubscribeOptions(qos=qos, retainAsPublished=True)
