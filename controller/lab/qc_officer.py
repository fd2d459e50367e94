"""The simulated QC officer of `hotlab demo`: a baseline, the daily check, a Ge-68 follow-up, a signature.

One person's morning at the QC lab's dose calibrator (a VDC-404, set on its front panel, so the
officer presses its nuclide key on the simulator) and at a console that speaks to the controller
over MQTT as a QC officer's console would: commands in the officer's name, signed with the
console's own [[command_sender]] key (controller/command_signing.py):

1. a constancy baseline of the check source (`start_qc` baseline, audited: the calibrator is new), unless
   the archive already holds it (`baseline_first` False after a history fill);
2. the daily check: the check source goes in and the controller recognises the daily constancy
   procedure by itself;
3. a Ge-68 breakthrough follow-up of the first Ga-68 elution that is at least 48 h old: the eluate
   kept aside is put in on the Ga-68 setting (`start_qc` ge68_breakthrough with the elution's id);
   after 48 h its Ga-68 is gone and what reads is the Ge-68 that came through, with its Ga-68 in
   equilibrium (the chamber sees Ge-68 through its daughter);
4. the review: the officer approves both procedures with a signature (`sign`, which checks the
   officer's password against the user store, controller/signatures.py).

Every step waits for what the controller published (its status, command replies, procedure end
records, elutions), so the script follows the controller rather than a timetable.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiomqtt

from hotlab.controller.command_signing import command_body, signed_payload
from hotlab.controller.messages import device_topic
from hotlab.errors import HotlabError
from hotlab.physics.decay import activity_at
from hotlab.physics.nuclides import get_nuclide
from hotlab.physics.utc_time import NS_PER_S

if TYPE_CHECKING:
    from hotlab.simulators.source import IonChamber, Source

log = logging.getLogger("hotlab.simulated_lab")

#: A Ge-68 follow-up needs the eluate to have stood this long (Ph. Eur. practice, docs/qc.md).
FOLLOW_UP_DELAY_NS = 48 * 3600 * NS_PER_S
#: How long the chamber stays empty before a source goes in: the controller sees the background.
EMPTY_S = 3.0
#: How long a source stays in: enough readings to settle; taking it out publishes the measurement.
LOADED_S = 5.0
#: Waiting for the controller longer than this means something is wrong: the officer says so and stops.
STEP_TIMEOUT_S = 120.0

Sign = Callable[[Sequence[str]], Awaitable[str]]


@dataclass(slots=True)
class _Seen:
    """What the officer's console has received: replies by request_id, procedure records, elutions."""

    online: bool = False
    replies: dict[str, dict[str, Any]] = field(default_factory=dict)
    procedures: list[dict[str, Any]] = field(default_factory=list)
    elutions: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class QcOfficer:
    """The officer at calibrator `device` (whose chamber they load by hand) with check source `source_id`."""

    host: str
    port: int
    site: str
    station: str
    device: str
    user: str
    #: The console's [[command_sender]] name and key.
    sender: str
    key: bytes = field(repr=False)
    chamber: IonChamber
    check_source: Source
    source_id: str
    ga68_generator: str | None
    sign: Sign | None
    #: A new calibrator's acceptance baseline first; False when the archive already holds the chamber's baseline.
    baseline_first: bool = True
    _seen: _Seen = field(default_factory=_Seen)

    async def work(self) -> None:
        """The morning's QC; logs and stops at the first step the controller does not answer."""
        try:
            async with aiomqtt.Client(
                self.host, self.port, identifier=f"hotlab-qc-console-{uuid.uuid4().hex[:8]}", keepalive=30
            ) as client:
                for topic in (
                    f"hotlab/{self.site}/controller/status",
                    self._topic("cmd/+/reply"),
                    self._topic("qc/procedure"),
                    f"hotlab/{self.site}/+/elution",
                ):
                    await client.subscribe(topic, qos=1)
                listener = asyncio.create_task(self._listen(client), name="qc-console")
                try:
                    await self._morning(client)
                finally:
                    listener.cancel()
                    await asyncio.gather(listener, return_exceptions=True)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            log.warning("simulated QC officer stopped: %s", exc)

    async def _morning(self, client: aiomqtt.Client) -> None:
        await self._until(lambda: self._seen.online, "the controller online")
        if self.baseline_first:
            baseline = await self._start(client, {"procedure": "baseline", "source": self.source_id}, "acceptance")
            await self._measure(self.check_source)
            await self._until(lambda: self._ended(baseline, None), "the baseline's end")
        await self._measure(self.check_source)  # the daily check: recognised, no command
        daily = await self._until(lambda: self._ended(None, "daily_constancy"), "the daily constancy check")
        signed = [daily["msg_id"]]
        follow_up = await self._follow_up(client)
        if follow_up is not None:
            signed.append(follow_up["msg_id"])
        if self.sign is None:
            return
        try:
            log.info("simulated QC officer: %s", await self.sign(signed))
        except HotlabError as exc:  # a refused signature is audited; the demo goes on without it
            log.warning("simulated QC officer: not signed: %s", exc)

    async def _follow_up(self, client: aiomqtt.Client) -> dict[str, Any] | None:
        """Measure the eluate of the first Ga-68 elution that has stood 48 h; None without a Ga-68 generator."""
        if self.ga68_generator is None:
            return None
        await self._until(
            lambda: any(e["end_ns"] <= time.time_ns() - FOLLOW_UP_DELAY_NS for e in self._seen.elutions),
            "a Ga-68 elution at least 48 h old",
        )
        elution = next(e for e in self._seen.elutions if e["end_ns"] <= time.time_ns() - FOLLOW_UP_DELAY_NS)
        self.chamber.select("Ga-68")  # the VDC-404's nuclide key: it takes no commands in PC mode
        started = await self._start(
            client, {"procedure": "ge68_breakthrough", "elution_id": elution["msg_id"]}, "Ge-68 follow-up"
        )
        await self._measure(_ge68_in_eluate(elution, self.chamber.clock.now_ns()))
        end = await self._until(lambda: self._ended(started, None), "the Ge-68 follow-up's end")
        self.chamber.select(self.check_source.nuclide.name)
        return end

    async def _measure(self, source: Source) -> None:
        """One measurement: the empty chamber, then `source` in for LOADED_S, then out again."""
        await asyncio.sleep(EMPTY_S)
        self.chamber.initial_source = source
        try:
            await asyncio.sleep(LOADED_S)
        finally:
            self.chamber.initial_source = None

    async def _start(self, client: aiomqtt.Client, args: dict[str, Any], reason: str) -> str:
        """Send start_qc (again while a procedure is still open on the calibrator); the new procedure_id."""
        topic = self._topic("cmd/start_qc")
        while True:
            command = command_body(user=self.user, reason=reason, args=args)
            await client.publish(topic, signed_payload(topic, command, sender=self.sender, key=self.key), qos=1)
            reply = await self._until(
                functools.partial(self._seen.replies.get, command["request_id"]), f"the reply to {args}"
            )
            if reply.get("ok"):
                return str(reply["new_value"]["procedure_id"])
            log.info("simulated QC officer: start_qc refused (%s); trying again", reply.get("error"))
            await asyncio.sleep(2.0)

    def _ended(self, procedure_id: str | None, kind: str | None) -> dict[str, Any] | None:
        return next(
            (
                p
                for p in self._seen.procedures
                if p["status"] != "started"
                and (procedure_id is None or p["procedure_id"] == procedure_id)
                and (kind is None or p["procedure"] == kind)
            ),
            None,
        )

    async def _until(self, found: Callable[[], Any], what: str) -> Any:
        """Wait until `found()` is truthy (re-checked on every message received) and return it."""
        async with asyncio.timeout(STEP_TIMEOUT_S):
            while not (value := found()):
                self._seen.changed.clear()
                await self._seen.changed.wait()
            return value

    async def _listen(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            try:
                body = json.loads(message.payload)
            except (TypeError, ValueError):
                continue
            topic = str(message.topic)
            if topic.endswith("/controller/status"):
                self._seen.online = body.get("state") == "online"
            elif topic.endswith("/reply"):
                self._seen.replies[str(body.get("request_id"))] = body
            elif topic.endswith("/qc/procedure"):
                self._seen.procedures.append(body)
            elif topic.endswith("/elution") and body.get("generator") == self.ga68_generator:
                self._seen.elutions.append(body)
            self._seen.changed.set()

    def _topic(self, leaf: str) -> str:
        return device_topic(self.site, self.station, self.device, leaf)


def _ge68_in_eluate(elution: dict[str, Any], chamber_now_ns: int) -> Source:
    """What the kept eluate holds now: its Ge-68 (the station's breakthrough figure at end of elution), decayed.

    The Ga-68 eluted with it has decayed away after 48 h (2^-42 of it is left); the Ge-68 feeds Ga-68 in
    equilibrium, which is what the chamber sees (its response to Ge-68 is Ga-68's, `ge68_responses`).
    """
    from hotlab.simulators.source import Source

    ge68 = get_nuclide("Ge-68")
    at_end_bq = float(elution["breakthrough_pct"] or 0.0) / 100.0 * float(elution["activity_bq"])
    now_bq = float(activity_at(at_end_bq, ge68, (time.time_ns() - int(elution["end_ns"])) / NS_PER_S))
    return Source(ge68, now_bq, chamber_now_ns)


def ge68_responses(responses: dict[str, float]) -> dict[str, float]:
    """`responses` plus Ge-68 in equilibrium, read through its Ga-68 (Ge-68's own X-rays neglected)."""
    return responses | {"Ge-68": responses["Ga-68"]}
