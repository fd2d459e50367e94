"""Where `hotlab audit verify` finds the newest anchor of a trail: the history archive and the retained MQTT topic.

Why two sources: the archive usually sits on the controller host, beside the trail, so whoever
can cut the trail short may be able to edit the archive too; the broker (and InfluxDB) hold
the same anchors elsewhere. Each source is asked for the anchors of this trail
(controller/audit.py `TrailIdentity`), and the one with the highest seq is used: anchors
only ever grow, so an older one proves less, never something different.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from hotlab.controller.archive import HistoryArchive, NotAnArchiveError
from hotlab.controller.audit import AuditAnchor, TrailIdentity
from hotlab.controller.messages import controller_topic

#: Every site's anchor topic: the trail's identity, not the site, says which anchors are its own.
ANCHOR_TOPIC_FILTER = controller_topic("+", "audit")
#: Retained messages follow the SUBACK at once; after the first, this much silence ends the wait.
QUIET_S = 0.5


@dataclass(frozen=True, slots=True)
class Broker:
    host: str
    port: int
    timeout_s: float


@dataclass(frozen=True, slots=True)
class AnchorSearch:
    """The newest anchor found (None if none), and what each source gave, for the verdict to name."""

    anchor: AuditAnchor | None
    tried: tuple[str, ...]


def find_anchor(identity: TrailIdentity, *, archive: Path | None, broker: Broker | None) -> AnchorSearch:
    """Ask every source given for the anchors of the trail `identity`; a source that fails is reported, not fatal."""
    found: list[AuditAnchor] = []
    tried: list[str] = []
    for anchor, note in (
        _archived(identity, archive) if archive is not None else (None, "history archive: none known for this trail"),
        _retained(identity, broker) if broker is not None else (None, "MQTT: no broker given"),
    ):
        tried.append(note)
        if anchor is not None:
            found.append(anchor)
    return AnchorSearch(max(found, key=lambda a: a.seq, default=None), tuple(tried))


def _archived(identity: TrailIdentity, path: Path) -> tuple[AuditAnchor | None, str]:
    source = f"history archive {path}"
    try:
        with HistoryArchive(path, read_only=True) as archive:
            payload = archive.latest_audit_anchor(identity.field, identity.value)
    except FileNotFoundError:
        return None, f"{source}: not found"
    except (NotAnArchiveError, sqlite3.Error) as exc:
        return None, f"{source}: unreadable ({exc})"
    anchor = AuditAnchor.from_payload(payload, source)
    return anchor, f"{source}: " + (f"#{anchor.seq}" if anchor is not None else "no anchor of this trail")


def _retained(identity: TrailIdentity, broker: Broker) -> tuple[AuditAnchor | None, str]:
    where = f"MQTT {broker.host}:{broker.port}"
    try:
        received = asyncio.run(_read_retained(broker))
    except (aiomqtt.MqttError, OSError) as exc:
        return None, f"{where}: unreachable ({exc})"
    anchors = [
        anchor
        for topic, payload in received
        if isinstance(payload, dict)
        and identity.matches(payload)
        and (anchor := AuditAnchor.from_payload(payload, f"{where} {topic}")) is not None
    ]
    best = max(anchors, key=lambda a: a.seq, default=None)
    return best, f"{where} {ANCHOR_TOPIC_FILTER}: " + (
        f"#{best.seq}" if best is not None else "no anchor of this trail"
    )


async def _read_retained(broker: Broker) -> list[tuple[str, Any]]:
    """(topic, parsed payload) of what the broker holds on the anchor topics, within `broker.timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + broker.timeout_s
    received: list[tuple[str, Any]] = []
    async with aiomqtt.Client(broker.host, broker.port, timeout=broker.timeout_s) as client:
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


def _json(raw: Any) -> Any:
    """The payload parsed, or None if it is not JSON (someone else's message on the topic)."""
    try:
        return json.loads(bytes(raw) if isinstance(raw, (bytes, bytearray)) else str(raw))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
