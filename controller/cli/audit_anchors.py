"""Where `hotlab audit verify` finds the anchors of a trail: the history archive and the retained MQTT topic.

Why two sources: the archive usually sits on the controller host, beside the trail, so whoever
can cut the trail short may be able to edit the archive too; the broker (and InfluxDB) hold
the same anchors elsewhere. Each source is asked for every anchor of this trail (`TrailIdentity`:
those naming its first record, and those naming its path), and all of them are checked
(controller/anchor_check.py): the archive keeps every anchor ever committed, the broker retains
the newest one per site.

The broker is read as the lab's controller reaches it (`lab_broker`: [mqtt] host, port, TLS,
username and password of the lab config), or by hand (`--mqtt-host`, plain and anonymous).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from hotlab.controller.anchor_check import AuditAnchor
from hotlab.controller.archive import HistoryArchive, NotAnArchiveError
from hotlab.controller.audit import first_record_hash
from hotlab.controller.config import MqttConfig, load_mqtt_config
from hotlab.controller.config_table import ConfigError
from hotlab.controller.messages import controller_topic
from hotlab.controller.sinks.mqtt import tls_parameters

#: Every site's anchor topic: the trail's identity, not the site, says which anchors are its own.
ANCHOR_TOPIC_FILTER = controller_topic("+", "audit")
#: Retained messages follow the SUBACK at once; after the first, this much silence ends the wait.
QUIET_S = 0.5


@dataclass(frozen=True, slots=True)
class TrailIdentity:
    """Which anchors concern a trail: those naming the hash of its first record (`trail_id`, the same in
    every copy of the trail, wherever it lies; None if it has no readable first record) and those naming
    the path the controller writes it to (`trail`, resolved), which tell a trail replaced there."""

    trail: str
    trail_id: str | None

    @classmethod
    def of(cls, path: str | Path) -> TrailIdentity:
        return cls(str(Path(path).resolve()), first_record_hash(path))

    def matches(self, payload: dict[str, Any]) -> bool:
        return payload.get("trail") == self.trail or (
            self.trail_id is not None and payload.get("trail_id") == self.trail_id
        )


@dataclass(frozen=True, slots=True)
class Broker:
    """The broker to read the retained anchors from, and how long to wait for them."""

    mqtt: MqttConfig
    timeout_s: float

    @property
    def where(self) -> str:
        return f"MQTT {self.mqtt.host}:{self.mqtt.port}"


@dataclass(frozen=True, slots=True)
class AnchorSearch:
    """Every anchor found of the trail, and what each source gave, for the verdict to name."""

    anchors: tuple[AuditAnchor, ...]
    tried: tuple[str, ...]


def find_anchors(identity: TrailIdentity, *, archive: Path | None, broker: Broker | None) -> AnchorSearch:
    """Ask every source given for the anchors of the trail `identity`; a source that fails is reported, not fatal."""
    found: list[AuditAnchor] = []
    tried: list[str] = []
    for anchors, note in (
        _archived(identity, archive) if archive is not None else ([], "history archive: none known for this trail"),
        _retained(identity, broker) if broker is not None else ([], "MQTT: no broker given"),
    ):
        tried.append(note)
        found.extend(anchors)
    return AnchorSearch(tuple(_of_the_trails_site(found, identity)), tuple(tried))


def _of_the_trails_site(anchors: list[AuditAnchor], identity: TrailIdentity) -> list[AuditAnchor]:
    """Drop anchors that match only by path and come from another site than the trail's own.

    Two labs on one broker (or one central archive) may keep their trails at the same path; the
    trail's site is the one whose anchors name its first record. Unknown (an emptied trail), every
    anchor at the path is kept, so a replaced trail is still reported.
    """
    sites = {anchor.site for anchor in anchors if anchor.trail_id == identity.trail_id}
    if len(sites) != 1:
        return anchors
    (site,) = sites
    return [anchor for anchor in anchors if anchor.trail_id == identity.trail_id or anchor.site == site]


def lab_broker(config: Path) -> MqttConfig:
    """The broker of the lab config `config` as its controller reaches it ([mqtt], checked as the
    controller checks it). Raises ConfigError naming the file and key. Only host, port, credentials
    and TLS are used: the verifier connects with a client id of its own, never the controller's.
    """
    mqtt = load_mqtt_config(config)
    if mqtt is None:
        raise ConfigError(f"{config}: mqtt: is missing: --mqtt reads the lab's broker from it (or give --mqtt-host)")
    return mqtt


def _archived(identity: TrailIdentity, path: Path) -> tuple[list[AuditAnchor], str]:
    source = f"history archive {path}"
    try:
        with HistoryArchive(path, read_only=True) as archive:
            payloads = archive.query("audit_anchor")
    except FileNotFoundError:
        return [], f"{source}: not found"
    except (NotAnArchiveError, sqlite3.Error) as exc:
        return [], f"{source}: unreadable ({exc})"
    anchors = [
        anchor
        for payload in payloads
        if isinstance(payload, dict)
        and identity.matches(payload)
        and (anchor := AuditAnchor.from_payload(payload, source)) is not None
    ]
    return anchors, f"{source}: {_count(anchors)}"


def _retained(identity: TrailIdentity, broker: Broker) -> tuple[list[AuditAnchor], str]:
    try:
        received = asyncio.run(_read_retained(broker))
    except (aiomqtt.MqttError, OSError) as exc:
        return [], f"{broker.where}: unreachable ({exc})"
    anchors = [
        anchor
        for topic, payload in received
        if isinstance(payload, dict)
        and identity.matches(payload)
        and (anchor := AuditAnchor.from_payload(payload, f"{broker.where} {topic}")) is not None
    ]
    return anchors, f"{broker.where} {ANCHOR_TOPIC_FILTER}: {_count(anchors)}"


def _count(anchors: list[AuditAnchor]) -> str:
    if not anchors:
        return "no anchor of this trail"
    return f"{len(anchors)} anchor(s) of this trail, the newest #{max(anchor.seq for anchor in anchors)}"


async def _read_retained(broker: Broker) -> list[tuple[str, Any]]:
    """(topic, parsed payload) of what the broker holds on the anchor topics, within `broker.timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + broker.timeout_s
    received: list[tuple[str, Any]] = []
    async with _client(broker) as client:
        await client.subscribe(ANCHOR_TOPIC_FILTER, qos=1)
        wait = deadline - loop.time()
        while wait > 0:
            try:
                message = await asyncio.wait_for(anext(client.messages), wait)
            except TimeoutError:
                break
            received.append((str(message.topic), _json(message.payload)))
            wait = min(QUIET_S, deadline - loop.time())
    return received


def _client(broker: Broker) -> aiomqtt.Client:
    """A client with the lab's TLS and credentials, and a client id of its own (never the controller's)."""
    mqtt, tls = broker.mqtt, broker.mqtt.tls
    return aiomqtt.Client(
        mqtt.host,
        mqtt.port,
        username=mqtt.username,
        password=mqtt.password.reveal() if mqtt.password is not None else None,
        tls_params=tls_parameters(tls),
        tls_insecure=tls.insecure_skip_hostname_check if tls is not None else None,
        timeout=broker.timeout_s,
    )


def _json(raw: Any) -> Any:
    """The payload parsed, or None if it is not JSON (someone else's message on the topic)."""
    try:
        return json.loads(bytes(raw) if isinstance(raw, (bytes, bytearray)) else str(raw))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
