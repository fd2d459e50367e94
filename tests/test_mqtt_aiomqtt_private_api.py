"""The aiomqtt private attributes the MQTT sink relies on, checked on a real client and broker.

aiomqtt is pinned to >=2.5,<3, but these attributes are not its API and may change in any
release: hotlab.controller.sinks.aiomqtt_paho lists them. If one of these tests fails after an
aiomqtt upgrade, its message names the attribute and the installed aiomqtt version; the
sink's data path (publish without awaiting, PUBACK by message id) has to be adapted there
before that version may be used.
"""

from __future__ import annotations

import asyncio
import re

import aiomqtt
import pytest

from hotlab.controller.sinks.aiomqtt_paho import (
    AiomqttPrivateApiChanged,
    PahoPublisher,
    aiomqtt_version,
    private_api_problems,
)
from tests.mosquitto_service import MosquittoBroker, mosquitto  # noqa: F401

MESSAGES_PER_CONNECTION = 20


def changed(what: str) -> str:
    return f"aiomqtt {aiomqtt_version()} (pinned >=2.5,<3): {what}; see hotlab.controller.sinks.aiomqtt_paho"


async def test_a_real_client_has_the_private_attributes_the_sink_relies_on() -> None:
    problems = private_api_problems(aiomqtt.Client("127.0.0.1", 1883))
    assert not problems, changed("; ".join(problems))


async def test_a_changed_attribute_is_refused_by_name_and_aiomqtt_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a user would see at start-up, instead of publish timeouts on every connection."""
    client = aiomqtt.Client("127.0.0.1", 1883)
    monkeypatch.setattr(client._client, "on_publish", None)  # as if aiomqtt set its handler elsewhere
    with pytest.raises(
        AiomqttPrivateApiChanged, match=rf"aiomqtt {re.escape(aiomqtt_version())} .*_client\.on_publish is None"
    ):
        PahoPublisher(client)
    monkeypatch.delattr(client, "_client")
    with pytest.raises(
        AiomqttPrivateApiChanged, match=rf"aiomqtt {re.escape(aiomqtt_version())} .*Client\._client is NoneType"
    ):
        PahoPublisher(client)


@pytest.mark.integration
async def test_unawaited_publishes_are_acknowledged_in_order_on_every_connection(mosquitto: MosquittoBroker) -> None:
    """Two connections of one client, as the sink's reconnect loop makes them.

    Per connection: the PUBACKs of publishes through paho reach the chained callback, aiomqtt's
    own awaited publish still completes (its handler runs first), and the broker forwards the
    messages in the order of the calls.
    """
    client = aiomqtt.Client(
        mosquitto.host,
        mosquitto.port,
        identifier="hotlab-private-api",
        timeout=5,
        protocol=aiomqtt.ProtocolVersion.V5,  # as the sink connects
    )
    publisher = PahoPublisher(client)
    acked: list[int] = []
    changes = asyncio.Event()

    def on_puback(mid: int, refusal: str | None) -> None:
        assert refusal is None
        acked.append(mid)
        changes.set()

    publisher.on_puback(on_puback)
    for connection in (1, 2):
        topic = f"hotlab-test/private-api/{connection}"
        async with client:
            await client.subscribe(f"{topic}/#", qos=1)
            mids = [
                publisher.publish(f"{topic}/data", b"%d" % n, qos=1, retain=False)
                for n in range(MESSAGES_PER_CONNECTION)
            ]
            await _wait_for_pubacks(mids, acked, changes, connection)
            try:
                await client.publish(f"{topic}/awaited", b"awaited", qos=1, timeout=5)
            except aiomqtt.MqttError as exc:
                pytest.fail(
                    changed(
                        f"aiomqtt's own publish no longer completes once Client._client.on_publish is chained ({exc})"
                    )
                )
            payloads = await _received(client, MESSAGES_PER_CONNECTION + 1)
        assert payloads == [b"%d" % n for n in range(MESSAGES_PER_CONNECTION)] + [b"awaited"]


async def _wait_for_pubacks(mids: list[int], acked: list[int], changes: asyncio.Event, connection: int) -> None:
    try:
        async with asyncio.timeout(10):
            while not set(mids) <= set(acked):
                changes.clear()
                await changes.wait()
    except TimeoutError:
        missing = len(set(mids) - set(acked))
        pytest.fail(
            changed(
                f"connection {connection}: {missing} PUBACK(s) never reached the handler chained on "
                "Client._client.on_publish (aiomqtt replaced its paho client's on_publish, or no longer calls it)"
            )
        )


async def _received(client: aiomqtt.Client, count: int) -> list[bytes]:
    payloads: list[bytes] = []
    async with asyncio.timeout(10):
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            payloads.append(message.payload)
            if len(payloads) == count:
                break
    return payloads
