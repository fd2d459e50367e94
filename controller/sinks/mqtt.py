"""The MQTT sink: publish the outbox in order, acknowledge only what the broker acknowledged.

One aiomqtt Client (aiomqtt 2.x has no automatic reconnect) is entered again and again by
a reconnect loop with exponential backoff and full jitter. Per connection:

1. subscribe to the command topics when a command router is attached (below), then
   publish the retained controller status "online" (the Last Will, set at CONNECT, turns
   it into "offline" if the controller dies or the network drops: MQTT 3.1.1 §3.1.2.5);
2. publish `outbox.pending_json("mqtt")` in `seq` order with QoS 1, keeping up to
   `inflight_window` PUBLISHes unacknowledged at once for throughput; paho sends them in
   the order they were issued, and the broker keeps per-client order (MQTT 3.1.1 §4.6).
   The payload is the JSON text the outbox stored, sent as it is (parsing and encoding it
   again changed nothing and cost CPU per message). A commit calls `notify`; while the
   publisher keeps up, the outbox answers its next read from memory (what that commit
   stored), and after a reconnect or a gap from the database. These data publishes are
   not awaited one by one: `PahoPublisher` (sinks/aiomqtt_paho.py, the only code that
   touches aiomqtt's private attributes) hands them to aiomqtt's paho client and reports
   each PUBACK by message id, because aiomqtt's own `publish` costs a task, a `wait_for`
   and a scan of all pending calls per message, a large share of the controller's CPU per
   reading (docs/benchmarks.md). aiomqtt still owns the connection; a PUBACK later than
   `publish_timeout_s` ends the connection, as an aiomqtt publish timeout did;
3. `ack` the outbox only for the longest prefix whose PUBACKs arrived, so a crash or an
   outage resends from the first unacknowledged message, never skipping one. The acks are
   written by a background `_OutboxAcker`, all that arrived meanwhile in one transaction,
   so the publisher never waits for the disk between windows; every ack of a connection is
   written before the next connection reads the outbox again (no extra repeats).

Delivery is therefore at-least-once: a message whose PUBACK was lost is sent again, and
consumers de-duplicate on the payload's `msg_id` (see docs/mqtt.md).

Device statuses are published retained so a dashboard that subscribes later still sees
each device's last state, and so are a calibrator's suspect-readings alarm (its current state,
on hotlab/<site>/<station>/<device>/alarm) and the audit anchor (the head of the audit trail,
controller/audit_anchor.py) so `hotlab audit verify` can read the newest one at any time; so
are each QC schedule item's state (qc_status, one topic per item: what is due now) and each
constancy baseline (qc_baseline, one topic per calibrator setting: what today's check compares
with); readings, elutions and QC results are not retained (a late subscriber must not mistake an
old reading for a live one).

Control commands (controller/commands.py) arrive on the same client: with a router attached,
each connection subscribes to the command topics (QoS 1; the session is clean, so this is
repeated on every reconnect and commands sent while the controller was away are not
queued up to run later) and hands every received message to the router. Replies are
published through this client too, concurrently with the outbox publishes: they do not
pass through the outbox, so they never reorder or delay the data path's sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import sqlite3
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiomqtt

from hotlab.backoff import Backoff
from hotlab.controller.config import MqttConfig, TlsConfig
from hotlab.controller.messages import SCHEMA_VERSION, controller_topic, iso_utc
from hotlab.controller.outbox import AsyncOutbox, StoredPayload
from hotlab.controller.sinks.aiomqtt_paho import PahoPublisher, retain_as_published

log = logging.getLogger(__name__)

SINK = "mqtt"
QOS_DATA = 1
#: Kinds whose last message is the current state, published retained (module docstring).
RETAINED_KINDS = frozenset({"device_status", "controller_alarm", "audit_anchor", "qc_status", "qc_baseline"})


def controller_status_payload(
    site: str, client_id: str, state: str, reason: str, time_ns: int | None = None, **extra: Any
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "schema": f"hotlab.controller_status/{SCHEMA_VERSION}",
        "site": site,
        "client_id": client_id,
        "state": state,
        "reason": reason,
    }
    if time_ns is not None:
        payload |= {"time_ns": int(time_ns), "time": iso_utc(time_ns)}
    return payload | extra


class CommandRouter(Protocol):
    """Receives command messages (hotlab.controller.commands.CommandHandler)."""

    topic_filter: str

    async def submit(self, topic: str, payload: bytes, retain: bool) -> None: ...


def tls_parameters(tls: TlsConfig | None) -> aiomqtt.TLSParameters | None:
    """aiomqtt's TLS settings for [mqtt.tls]: the broker's certificate is always verified."""
    if tls is None:
        return None
    return aiomqtt.TLSParameters(
        ca_certs=str(tls.ca_file) if tls.ca_file else None,
        certfile=str(tls.cert_file) if tls.cert_file else None,
        keyfile=str(tls.key_file) if tls.key_file else None,
        cert_reqs=ssl.CERT_REQUIRED,
    )


def _encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8")


@dataclass(slots=True)
class _InFlight:
    """One outbox message published and not yet acknowledged by the broker."""

    seq: int
    deadline: float  # time.monotonic() after which its missing PUBACK ends the connection
    topic: str = ""
    acked: bool = False
    #: The broker's reason for not taking it (an MQTT 5 PUBACK reason code >= 0x80), if it refused.
    refused: str | None = None


class MqttSink:
    """Publishes the outbox's "mqtt" deliveries; `run()` until `drain()` is called."""

    def __init__(
        self,
        config: MqttConfig,
        site: str,
        outbox: AsyncOutbox,
        *,
        backoff: Backoff | None = None,
        publish_timeout_s: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.site = site
        self.outbox = outbox
        self.backoff = backoff or Backoff()
        self.publish_timeout_s = publish_timeout_s
        self._rng = rng or random.Random()
        self.status_topic = controller_topic(site, "status")
        self.alarm_topic = controller_topic(site, "alarm")
        #: Retained `mqtt_refused` alarm: raised when the broker refuses an outbox message, cleared
        #: once it takes it. A topic of its own, so it does not overwrite the outbox alarm.
        self.refused_alarm_topic = controller_topic(site, "mqtt_alarm")
        self.published = 0
        self.connections = 0
        #: Outbox failures (e.g. a full disk) since the last ack that could be written: each one
        #: ends a session, and the reconnection backs off further, so a disk that stays full does
        #: not make the sink resend its backlog every fraction of a second.
        self._outbox_failures = 0
        self.connected = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._drain_deadline: float | None = None
        self._alarm: dict[str, Any] | None = None
        self._alarm_sent: dict[str, Any] | None = None
        self._refused_alarm: dict[str, Any] | None = None
        self._refused_alarm_sent: dict[str, Any] | None = None
        #: The outbox seq of the refused message the raised `mqtt_refused` alarm is about.
        self._refused_seq: int | None = None
        self._commands: CommandRouter | None = None
        #: The outbox messages of this connection awaiting a PUBACK, by paho message id.
        self._awaiting_puback: dict[int, _InFlight] = {}
        #: Resolved by whatever the connected publisher waits for: a commit, a PUBACK, an alarm, a
        #: drain, the end of the connection. One future per turn of its loop, not a task per turn.
        self._turn: asyncio.Future[None] | None = None
        #: Set by a commit: the outbox may hold messages this connection has not read yet. Most
        #: turns are PUBACKs, and without this each one would cost an outbox read.
        self._unread = True
        self._client = self._make_client()
        #: The data path's publishes, on the same client (module docstring, step 2).
        self._publisher = PahoPublisher(self._client)
        self._publisher.on_puback(self._on_puback)

    def route_commands(self, router: CommandRouter) -> None:
        """Subscribe to `router.topic_filter` on every connection and hand it each message received."""
        self._commands = router

    async def publish_reply(self, topic: str, payload: dict[str, Any]) -> bool:
        """Publish a command reply (QoS 1, not retained); False if not connected or not acknowledged."""
        if not self.connected.is_set():
            return False
        try:
            await self._client.publish(
                topic, _encode(payload), qos=QOS_DATA, retain=False, timeout=self.publish_timeout_s
            )
        except aiomqtt.MqttError as exc:
            log.warning("mqtt: reply on %s not published: %s", topic, exc)
            return False
        return True

    def notify(self) -> None:
        """New messages were committed: wake the publisher.

        Its next read continues where it is (`after_seq`), so the outbox answers it from
        memory while the publisher keeps up (controller/recent_commits.py).
        """
        self._unread = True
        self._wake()

    def set_alarm(self, payload: dict[str, Any]) -> None:
        """Publish (retained) this controller alarm state as soon as connected."""
        self._alarm = payload
        self._wake()

    def drain(self, timeout_s: float) -> None:
        """Ask `run()` to finish: send the backlog for at most `timeout_s`, then go offline cleanly."""
        self._drain_deadline = time.monotonic() + timeout_s
        self._unread = True
        self._wake()

    def _wake(self, _done: object = None) -> None:
        self._wakeup.set()
        turn = self._turn
        if turn is not None and not turn.done():
            turn.set_result(None)

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def _time_left(self) -> float:
        return math.inf if self._drain_deadline is None else self._drain_deadline - time.monotonic()

    def _make_client(self) -> aiomqtt.Client:
        cfg = self.config
        will = aiomqtt.Will(
            self.status_topic,
            _encode(controller_status_payload(self.site, cfg.client_id, "offline", "connection lost (last will)")),
            qos=QOS_DATA,
            retain=True,
        )
        return aiomqtt.Client(
            cfg.host,
            cfg.port,
            username=cfg.username,
            password=cfg.password.reveal() if cfg.password is not None else None,
            identifier=cfg.client_id,
            will=will,
            # MQTT 5 for retain-as-published on the command subscription (see `_session`).
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=True,  # the outbox, not the broker session, is our memory of what is unsent
            keepalive=cfg.keepalive_s,
            timeout=cfg.connect_timeout_s,
            # Unlimited in paho: the sink's own window (`inflight_window`) bounds the data publishes,
            # and with a limit set paho re-scans every message it holds on each PUBACK.
            max_inflight_messages=0,
            tls_params=tls_parameters(cfg.tls),
            tls_insecure=cfg.tls.insecure_skip_hostname_check if cfg.tls is not None else None,
            logger=logging.getLogger("hotlab.paho"),
        )

    def _on_puback(self, mid: int, refusal: str | None) -> None:
        """The broker acknowledged `mid` (or refused it): mark it if it is one of ours, and wake the publisher."""
        entry = self._awaiting_puback.pop(mid, None)
        if entry is None:
            return  # a status, alarm or reply publish: aiomqtt's own publish waits for it
        if refusal is None:
            entry.acked = True
        else:
            entry.refused = refusal
        self._wake()

    async def run(self) -> None:
        """Connect, publish, reconnect on failure; return after `drain()` once done or out of time."""
        attempt = 0
        while True:
            if self.draining and self._time_left() <= 0:
                log.warning("mqtt: drain time over while disconnected; backlog stays in the outbox")
                return
            try:
                async with self._client as client:
                    self.connections += 1
                    attempt = 0
                    self.connected.set()
                    log.info(
                        "mqtt: connected to %s:%d as %s", self.config.host, self.config.port, self.config.client_id
                    )
                    try:
                        await self._session(client)
                    except sqlite3.Error as exc:
                        if not self.draining:
                            raise
                        # Shutting down: another session would fail the same way; go offline now.
                        log.error(
                            "mqtt: the outbox failed while draining (%s: %s); the rest stays in the outbox",
                            type(exc).__name__,
                            exc,
                        )
                    await self._go_offline(client)
                    return
            except aiomqtt.MqttError as exc:
                self._outbox_failures = 0  # the outbox was not what failed
                log.warning(
                    "mqtt: %s:%d unavailable (%s); messages stay in the outbox", self.config.host, self.config.port, exc
                )
            except sqlite3.Error as exc:  # e.g. a full disk: the acks cannot be written
                self._outbox_failures += 1
                attempt = max(attempt, self._outbox_failures)
                log.error(
                    "mqtt: the outbox failed (%s: %s); reconnecting, and what was not acknowledged in the "
                    "outbox is sent again",
                    type(exc).__name__,
                    exc,
                )
            self.connected.clear()
            self._alarm_sent = None
            self._refused_alarm_sent = None
            delay = min(self.backoff.delay(attempt, self._rng), max(0.0, self._time_left()))
            attempt += 1
            await self._sleep_unless_draining(delay)

    async def _sleep_unless_draining(self, delay: float) -> None:
        """Back off, but wake early if a drain starts (so shutdown stays prompt)."""
        self._wakeup.clear()
        if self.draining:
            await asyncio.sleep(delay)
            return
        try:
            await asyncio.wait_for(self._wait_for_drain(), timeout=delay)
        except TimeoutError:
            pass

    async def _wait_for_drain(self) -> None:
        while not self.draining:
            await self._wakeup.wait()
            self._wakeup.clear()

    async def _session(self, client: aiomqtt.Client) -> None:
        online = controller_status_payload(
            self.site, self.config.client_id, "online", "connected", time.time_ns(), pid=os.getpid()
        )
        if self._commands is not None:
            # Before "online": a client that sees the controller online can send commands at once.
            # Retain-as-published: MQTT 3.1.1 clears the retain flag on delivery to a connected
            # subscriber, so a command retained while we are online would look live and run.
            await client.subscribe(self._commands.topic_filter, options=retain_as_published(QOS_DATA))
        await client.publish(self.status_topic, _encode(online), qos=QOS_DATA, retain=True)
        watcher = asyncio.ensure_future(self._receive(client))
        watcher.add_done_callback(self._wake)
        acker = _OutboxAcker(self.outbox, self._count_published, on_failure=self._wake)
        inflight: deque[_InFlight] = deque()
        self._awaiting_puback.clear()
        last_issued = 0
        self._unread = True  # a new connection resends everything unacknowledged
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._turn = turn = loop.create_future()
                await self._publish_alarm(client)
                room = self.config.inflight_window - len(inflight)
                if room > 0 and self._unread and self._time_left() > 0:
                    self._unread = False  # a commit during the read sets it again
                    batch = await self.outbox.pending_json(SINK, limit=room, after_seq=last_issued)
                    if len(batch) == room:
                        self._unread = True  # the window was the limit: there may be more
                    if batch:
                        self._publish_batch(batch, inflight)
                        last_issued = batch[-1].seq
                if not inflight and self.draining:
                    return
                if self._time_left() <= 0:
                    log.warning(
                        "mqtt: drain time over with %d message(s) in flight; they stay in the outbox", len(inflight)
                    )
                    return
                if not turn.done() and not watcher.done():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._wait_timeout(inflight)):
                            await turn
                if watcher.done():
                    watcher.result()  # raises the disconnect as MqttError
                acker.raise_if_failed()
                if self._ack_prefix(inflight, acker):
                    continue  # publish the cleared mqtt_refused alarm first
                if refused := next((entry for entry in inflight if entry.refused), None):
                    # Never acknowledged to the outbox: the message stays there and is sent again
                    # on the next connection, after the backoff, until the broker takes it. It
                    # holds back every later message (acks are by prefix): raise the alarm.
                    await self._raise_refused_alarm(client, refused)
                    raise aiomqtt.MqttError(f"the broker refused outbox message {refused.seq}: {refused.refused}")
                if inflight and time.monotonic() >= inflight[0].deadline:
                    raise aiomqtt.MqttError(
                        f"no PUBACK for outbox message {inflight[0].seq} within {self.publish_timeout_s:g} s"
                    )
        finally:
            self._turn = None
            self._awaiting_puback.clear()
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await acker.close()

    def _publish_batch(self, batch: list[StoredPayload], inflight: deque[_InFlight]) -> None:
        """Publish `batch` in order (QoS 1) without awaiting, and track each one's PUBACK."""
        deadline = time.monotonic() + self.publish_timeout_s
        for stored in batch:
            mid = self._publisher.publish(
                stored.topic, stored.payload_json, qos=QOS_DATA, retain=stored.kind in RETAINED_KINDS
            )
            entry = _InFlight(stored.seq, deadline, stored.topic)
            self._awaiting_puback[mid] = entry
            inflight.append(entry)

    def _wait_timeout(self, inflight: deque[_InFlight]) -> float | None:
        """Until the drain deadline or the oldest PUBACK's deadline, whichever comes first."""
        timeout = self._time_left()
        if inflight:
            timeout = min(timeout, inflight[0].deadline - time.monotonic())
        return None if math.isinf(timeout) else max(0.0, timeout)

    def _count_published(self, count: int) -> None:
        self.published += count
        self._outbox_failures = 0

    def _ack_prefix(self, inflight: deque[_InFlight], acker: _OutboxAcker) -> bool:
        """Acknowledge the acked prefix; True if that clears the `mqtt_refused` alarm."""
        acked: list[int] = []
        while inflight and inflight[0].acked:
            acked.append(inflight.popleft().seq)
        acker.add(acked)
        if self._refused_seq is None or self._refused_seq not in acked:
            return False
        self._refused_seq = None
        alarm = dict(self._refused_alarm or {})
        now = time.time_ns()
        alarm.update(active=False, time_ns=now, time=iso_utc(now))
        self._refused_alarm = alarm
        log.warning("mqtt: refused-publish alarm cleared: the broker took %s", alarm.get("topic"))
        return True

    async def _raise_refused_alarm(self, client: aiomqtt.Client, refused: _InFlight) -> None:
        """Raise (retained) the `mqtt_refused` alarm for `refused`, unless it is raised for it already."""
        current = self._refused_alarm
        if not (
            current is not None
            and current["active"]
            and current["outbox_seq"] == refused.seq
            and current["reason"] == refused.refused
        ):
            now = time.time_ns()
            self._refused_seq = refused.seq
            self._refused_alarm = {
                "schema": f"hotlab.controller_alarm/{SCHEMA_VERSION}",
                "site": self.site,
                "alarm": "mqtt_refused",
                "active": True,
                "topic": refused.topic,
                "reason": refused.refused,
                "outbox_seq": refused.seq,
                "time_ns": now,
                "time": iso_utc(now),
            }
            log.error(
                "MQTT REFUSED ALARM: the broker refused outbox message %d on %s (%s); it and every later "
                "message stay in the outbox until the broker takes it",
                refused.seq,
                refused.topic,
                refused.refused,
            )
        try:
            await self._publish_alarm(client)
        except aiomqtt.MqttError as exc:
            log.warning("mqtt: refused-publish alarm not published (%s); sent again on the next connection", exc)

    async def _receive(self, client: aiomqtt.Client) -> None:
        """Route commands; this loop is also how a lost connection surfaces (aiomqtt only tells waiters).

        `submit` waits while the command handler is saturated, so a flood of commands slows this
        loop (aiomqtt buffers meanwhile) instead of growing an unbounded backlog of tasks.
        """
        async for message in client.messages:
            if self._commands is None:
                continue
            raw = message.payload
            payload = (
                bytes(raw) if isinstance(raw, (bytes, bytearray)) else str(raw if raw is not None else "").encode()
            )
            try:
                await self._commands.submit(str(message.topic), payload, bool(message.retain))
            except Exception:  # a router bug must not be mistaken for a lost connection
                log.exception("mqtt: command router failed on %s", message.topic)

    async def _publish_alarm(self, client: aiomqtt.Client) -> None:
        if self._alarm is not None and self._alarm is not self._alarm_sent:
            alarm = self._alarm
            await client.publish(
                self.alarm_topic, _encode(alarm), qos=QOS_DATA, retain=True, timeout=self.publish_timeout_s
            )
            self._alarm_sent = alarm
        if self._refused_alarm is not None and self._refused_alarm is not self._refused_alarm_sent:
            refused = self._refused_alarm
            await client.publish(
                self.refused_alarm_topic,
                _encode(refused),
                qos=QOS_DATA,
                retain=True,
                timeout=self.publish_timeout_s,
            )
            self._refused_alarm_sent = refused

    async def _go_offline(self, client: aiomqtt.Client) -> None:
        try:
            backlog: int | None = await self.outbox.pending_count(SINK)
        except sqlite3.Error as exc:
            log.error("mqtt: backlog unknown (%s: %s); going offline without it", type(exc).__name__, exc)
            backlog = None
        extra = {} if backlog is None else {"backlog": backlog}
        offline = controller_status_payload(
            self.site, self.config.client_id, "offline", "shutdown", time.time_ns(), **extra
        )
        try:
            await client.publish(
                self.status_topic, _encode(offline), qos=QOS_DATA, retain=True, timeout=min(self.publish_timeout_s, 5.0)
            )
        except aiomqtt.MqttError as exc:
            log.warning("mqtt: could not publish offline status (%s); the broker will send the last will", exc)
        left = "an unknown number of" if backlog is None else backlog
        log.info("mqtt: stopped with %s message(s) left in the outbox", left)


#: Acks are written once this many wait, or `ACK_DELAY_S` after the first of them arrived.
#: They share the outbox's one write thread with the devices' commits, so small frequent ack
#: transactions would make those commits queue behind them. A later ack only means a larger
#: resend after a crash.
ACK_BATCH = 500
ACK_DELAY_S = 0.1


class _OutboxAcker:
    """Writes the sink's outbox acks in the background, many in one transaction.

    An ack is a write transaction; awaiting each one before publishing more would put a disk
    commit (queued behind the devices' commits) between every two windows, and one per PUBACK
    would cost a transaction per message at low rates. Delaying an ack is safe: until it is
    written the message merely counts as unsent, so a crash resends it (at-least-once,
    de-duplicated on `msg_id`). `close()` writes what is left.
    """

    def __init__(self, outbox: AsyncOutbox, on_acked: Callable[[int], None], *, on_failure: Callable[[], None]) -> None:
        self._outbox = outbox
        self._on_acked = on_acked
        self._on_failure = on_failure
        self._waiting: list[int] = []
        self._writer: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def add(self, seqs: list[int]) -> None:
        if not seqs:
            return
        self.raise_if_failed()
        self._waiting.extend(seqs)
        if len(self._waiting) >= ACK_BATCH:
            self._start()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(ACK_DELAY_S, self._start)

    def raise_if_failed(self) -> None:
        """Re-raise a failed ack write in the publisher (the session ends; the next one resends)."""
        error = self._failure()
        if error is not None:
            self._writer = None
            raise error

    def _failure(self) -> BaseException | None:
        writer = self._writer
        if writer is None or not writer.done() or writer.cancelled():
            return None
        return writer.exception()

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # A failed writer stays until the publisher has seen its error (raise_if_failed).
        if self._writer is None or (self._writer.done() and self._failure() is None):
            self._writer = asyncio.create_task(self._write(), name="mqtt-outbox-ack")
            self._writer.add_done_callback(self._tell_failure)

    def _tell_failure(self, writer: asyncio.Task[None]) -> None:
        """Wake the publisher, which may be idle, so that it sees the failure (`raise_if_failed`) now."""
        if not writer.cancelled() and writer.exception() is not None:
            self._on_failure()

    async def _write(self) -> None:
        while self._waiting:
            seqs, self._waiting = self._waiting, []
            try:
                await self._outbox.ack(SINK, seqs)
            except BaseException:
                self._waiting[:0] = seqs  # still to be written: close() tries once more
                raise
            self._on_acked(len(seqs))

    async def close(self) -> None:
        """Write every ack added so far (also after a failed publish: those PUBACKs did arrive)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writer is not None:
            await asyncio.shield(asyncio.gather(self._writer, return_exceptions=True))
        if self._waiting:
            await self._write()
