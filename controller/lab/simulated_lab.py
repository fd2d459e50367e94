"""A simulated hot lab: real simulators on real transports, and the config that points at them.

`hotlab run` (no --config) and `hotlab demo` both start one. Each instrument is the physics
simulator from simulators/ speaking its real wire protocol:

* dose calibrators on pseudo-terminals (real ttys) or on TCP as a serial device server would
  serve them, in raw mode (socket://) or in RFC 2217 mode (rfc2217://, port settings included),
  each used by a simulated radiopharmacist on a routine (`SimLab.chamber_empty_s`/`chamber_loaded_s`):
  the chamber stays empty a few seconds, then holds the calibrator's dose (or its check source)
  a few seconds, and again, so every cycle is one measurement (controller/measurements.py) and, on
  the check source's calibrator, one constancy verdict;
* generator elution stations as real Modbus TCP servers whose clock runs `acceleration` times
  faster than the wall clock, each with a simulated operator who starts elutions on a schedule
  (in station time, so a faster clock means more elutions per wall-clock minute). With a broker,
  the operator works as an operator console does: a `start_elution` command over MQTT in the
  operator's name, signed with the console's [[command_sender]] key, which the controller
  authenticates, authorises against the operator's account, audits and sends to the station over
  Modbus (docs/mqtt.md, Commands). Without one, the operator presses start on the station's front panel;
* the system `mosquitto` on a free loopback port (controller/embedded_broker.py) unless a broker
  is given; without mosquitto, local-only mode (everything waits in the outbox);
* with `private_influxd`, the system `influxd` (1.x) on a free loopback port
  (controller/lab/private_influxd.py) and the lab's [influx] pointing at it; without influxd, no
  InfluxDB (said so at start).

The lab's user store holds the demo accounts (controller/lab/demo_review.py), and its config a
[[command_sender]] per console plus one for the web panel (`[web] sender = "panel"`), each key a
new random one in a private file of the work directory: no token is in any payload.

The lab is described by a `SimLab` (RUN_LAB for `hotlab run`, DEMO_LAB for `hotlab demo`); the QC
configuration it yields assigns the check source to its calibrator and declares the generators with
the same calibration as the simulated columns, so constancy and yield verdicts are judged against
the physics that produced the readings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import aiomqtt

from hotlab.controller.audit import load_hmac_key
from hotlab.controller.command_signing import command_body, signed_payload
from hotlab.controller.config import LabConfig, SerialTransport, parse_config
from hotlab.controller.lab.demo_review import DEMO_ACCOUNTS, OPERATOR_USER, QC_OFFICER_USER, demo_accounts
from hotlab.controller.lab.embedded_broker import write_file
from hotlab.controller.lab.private_broker import PrivateBroker
from hotlab.controller.lab.private_influxd import ADMIN_USER, InfluxdUnavailable, PrivateInfluxd
from hotlab.controller.lab.qc_officer import QcOfficer, Sign
from hotlab.controller.messages import MSG_ID_NAMESPACE, Message, iso_utc, reading_message
from hotlab.drivers.modbus_links import describe_link
from hotlab.drivers.records import Reading
from hotlab.physics.utc_time import NS_PER_S

if TYPE_CHECKING:
    from hotlab.simulators.source import IonChamber

log = logging.getLogger("hotlab.simulated_lab")

SECONDS_PER_DAY = 86_400
#: `[device.plausibility]` of the QC officer's calibrator: its simulated electrometer reads to 0.1 Bq, so an
#: empty chamber is at most 100 Bq instead of the 37 kBq default, and the Ge-68 left in a 48 h old eluate
#: (a few hundred Bq) is a measurement. A real dose calibrator does not read that low: a lab measures
#: Ge-68 breakthrough in a well counter, or with a larger part of the eluate (docs/qc.md).
LOW_LEVEL_CHAMBER = {"background_bq": 100.0, "noise_floor_bq": 20.0}
#: How often the lab's calibrators are polled (and how often the VDC-404 streams a line): several
#: readings settle a measurement within the few seconds a source spends in the chamber.
CALIBRATOR_POLL_S = 0.5
#: The [[command_sender]]s of the simulated lab: its two consoles, and the web panel (`[web] sender`).
OPERATOR_CONSOLE = "operator-console"
QC_CONSOLE = "qc-console"
PANEL_SENDER = "panel"


#: The clock-offset limit of the simulated lab's stations, whose time runs fast on purpose: ten years.
SIMULATED_CLOCK_LIMIT_S = 10 * 365 * 86_400.0


@dataclass(frozen=True, slots=True)
class SimCalibrator:
    """A dose calibrator simulator set to `nuclide`, in which a dose of `activity_bq` (at start) of it is read
    again and again (the check source instead, on the calibrator it is assigned to)."""

    name: str
    family: str
    station: str
    nuclide: str
    activity_bq: float
    host: Literal["pty", "tcp", "rfc2217"]


@dataclass(frozen=True, slots=True)
class SimGenerator:
    """A generator on a simulated elution station, and the operator's elution schedule (station time)."""

    device: str
    station: str
    profile: str  # hotlab.simulators.generator_physics.PROFILES key: "ge68" or "mo99"
    generator_id: str
    calibration_bq: float
    column_age_days: float
    elution_every_s: float
    volume_ml: float
    #: The station's clock starts this many hours behind the wall clock (and catches up at its speed), so
    #: its first elutions are old enough for a Ge-68 follow-up (>= 48 h) while the demo runs.
    clock_behind_h: float = 0.0


@dataclass(frozen=True, slots=True)
class CheckSource:
    """A long-lived check source read in one calibrator, for the daily constancy test."""

    source_id: str
    device: str
    nuclide: str
    activity_bq: float


@dataclass(frozen=True, slots=True)
class SimLab:
    site: str
    calibrators: tuple[SimCalibrator, ...]
    generators: tuple[SimGenerator, ...]
    check_source: CheckSource | None
    #: Elution stations' clock speed-up; calibrators decay at `calibrator_acceleration`.
    acceleration: float
    calibrator_acceleration: float = 1.0
    #: The radiopharmacist's routine at every calibrator, in wall-clock seconds (whatever the
    #: acceleration): the chamber is empty this long, then holds its source this long, and again.
    #: The first empty spell lets the controller see the empty chamber before the first insertion.
    chamber_empty_s: float = 3.0
    chamber_loaded_s: float = 4.0
    #: With a broker, a simulated QC officer (controller/lab/qc_officer.py) loads the check source's
    #: calibrator by hand instead of the routine: a baseline, the daily check, a Ge-68 follow-up, a review.
    qc_officer: bool = False


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """An existing MQTT broker to use instead of the private mosquitto."""

    host: str
    port: int


#: The database of the lab's private influxd.
PRIVATE_INFLUX_DATABASE = "hotlab"


#: `hotlab run` without a config: one calibrator per family and a Ge-68/Ga-68 station eluted
#: every 30 s of wall time (15 min of station time at 30x).
RUN_LAB = SimLab(
    site="simulated-lab",
    calibrators=(
        SimCalibrator("vik202-sim", "vik202", "hotcell-1", "Tc-99m", 7.4e9, "pty"),
        SimCalibrator("crc15r-sim", "crc15r", "dispensing", "F-18", 3.7e9, "tcp"),
        SimCalibrator("vdc404-sim", "vdc404", "qc-lab", "Cs-137", 7.4e6, "pty"),
        SimCalibrator("atomlab500-sim", "atomlab500", "qc-lab", "Tc-99m", 1.1e9, "rfc2217"),
    ),
    generators=(
        # 1.85 GBq (50 mCi) Ge-68: a common clinical generator size.
        SimGenerator("ga68-generator-sim", "elution-1", "ge68", "GE68-SIM-001", 1.85e9, 30.0, 900.0, 5.0),
    ),
    check_source=CheckSource("cs137-check", "vdc404-sim", "Cs-137", 7.4e6),
    acceleration=30.0,
)


@contextlib.asynccontextmanager
async def simulated_lab(
    workdir: Path,
    lab: SimLab = RUN_LAB,
    *,
    broker: BrokerAddress | None = None,
    influx: Mapping[str, Any] | None = None,
    private_influxd: bool = False,
    audit_path: Path | None = None,
    sign: Sign | None = None,
    accepted: bool = False,
) -> AsyncIterator[LabConfig]:
    """Start the simulators (and a private broker unless `broker` is given); yield the config for them.

    `influx` is an [influx] table (controller/config.py) to add the InfluxDB sink; `private_influxd`
    starts the lab's own influxd instead, if it is installed;
    `audit_path` is where the controller audits control commands (default `<state_dir>/audit.jsonl`);
    `sign` is how the lab's QC officer signs the procedures they ran (`lab.qc_officer`; None: not signed);
    `accepted` says the calibrators' acceptance and baseline are already in the archive (a history fill,
    controller/lab/history_fill.py), so the QC officer does not take an acceptance baseline again.
    """
    from hotlab.controller.lab.embedded_broker import BrokerUnavailable

    workdir.mkdir(parents=True, exist_ok=True)
    async with contextlib.AsyncExitStack() as stack:
        mqtt: dict[str, Any] | None = None
        if broker is not None:
            mqtt = {"host": broker.host, "port": broker.port}
        else:
            private = PrivateBroker(workdir / "broker")
            starting = asyncio.ensure_future(asyncio.to_thread(private.start))
            stack.push_async_callback(_close_when_started, starting, private)
            try:
                await asyncio.shield(starting)  # a Ctrl-C now must not leave a broker started behind our back
                mqtt = {"host": private.host, "port": private.port}
                supervisor = asyncio.create_task(private.supervise(), name="private-broker")
                stack.push_async_callback(cancel_and_wait, supervisor)
            except BrokerUnavailable as exc:
                log.warning(
                    "no broker for the simulated lab (%s): LOCAL-ONLY mode, messages stay in %s",
                    exc,
                    workdir / "outbox.sqlite3",
                )
        influx_table = None if influx is None else dict(influx)
        influxd: PrivateInfluxd | None = None
        no_influx = ""
        if private_influxd:
            if influx is not None:
                raise ValueError("give either an [influx] table or private_influxd, not both")
            influxd = PrivateInfluxd(workdir / "influxd")
            starting = asyncio.ensure_future(asyncio.to_thread(influxd.start))
            stack.push_async_callback(_close_when_started, starting, influxd)
            try:
                await asyncio.shield(starting)  # as for the broker: never a server started behind our back
                influx_table = {
                    "url": influxd.url,
                    "username": ADMIN_USER,
                    "password_file": str(influxd.password_path.resolve()),
                    "database": PRIVATE_INFLUX_DATABASE,
                }
                supervisor = asyncio.create_task(influxd.supervise(), name="private-influxd")
                stack.push_async_callback(cancel_and_wait, supervisor)
            except InfluxdUnavailable as exc:
                log.warning("no InfluxDB for the simulated lab (%s): running without InfluxDB", exc)
                influxd, no_influx = None, str(exc)
        by_hand = lab.qc_officer and mqtt is not None and lab.check_source is not None
        chambers: dict[str, IonChamber] = {}
        devices = []
        for index, calibrator in enumerate(lab.calibrators):
            chamber = _chamber(calibrator, index, lab, by_hand=by_hand)
            chambers[calibrator.name] = chamber
            device = await _start_calibrator(stack, calibrator, chamber, index)
            if by_hand and lab.check_source is not None and calibrator.name == lab.check_source.device:
                device["plausibility"] = LOW_LEVEL_CHAMBER
            devices.append(device)
        now_ns = time.time_ns()
        senders: list[dict[str, str]] = []
        console = (
            None
            if mqtt is None
            else OperatorConsole(
                mqtt["host"],
                mqtt["port"],
                lab.site,
                OPERATOR_USER,
                OPERATOR_CONSOLE,
                await _new_sender(workdir, OPERATOR_CONSOLE, senders),
            )
        )
        generators: dict[str, Any] = {}
        for generator in lab.generators:
            station_ns = now_ns - int(generator.clock_behind_h * 3600 * NS_PER_S)
            cal_ns = station_ns - int(generator.column_age_days * SECONDS_PER_DAY * NS_PER_S)
            last_elution_ns = station_ns - SECONDS_PER_DAY * NS_PER_S  # the day before the station's clock starts
            address = await _start_station(
                stack, generator, cal_ns, last_elution_ns, lab.acceleration, console, station_ns
            )
            devices.append(
                {
                    "name": generator.device,
                    "station": generator.station,
                    "family": "elution_station",
                    "poll_interval_s": 1.0,
                    "transport": address,
                }
            )
            generators[generator.generator_id] = {
                "parent": _parent_nuclide(generator),
                "activity": f"{generator.calibration_bq} Bq",
                "calibration_time": iso_utc(cal_ns),
                "last_elution": iso_utc(last_elution_ns),
            }
        qc: dict[str, Any] = {"generators": generators}
        if lab.check_source is not None:
            source = lab.check_source
            qc["sources"] = {
                source.source_id: {
                    "nuclide": source.nuclide,
                    "activity": f"{source.activity_bq} Bq",
                    "reference_time": iso_utc(now_ns),
                    "certificate": "simulated",
                }
            }
            # A Ge-68 re-measurement subtracts one background value, so it needs the chamber's detectable
            # level: its empty-chamber level, where it has one (LOW_LEVEL_CHAMBER).
            device_qc: dict[str, Any] = {"check_source": source.source_id}
            if by_hand:
                device_qc["minimum_detectable_bq"] = LOW_LEVEL_CHAMBER["background_bq"]
            qc["devices"] = {source.device: device_qc}
        document: dict[str, Any] = {
            "site": {"name": lab.site},
            "device": devices,
            "outbox": {"path": "outbox.sqlite3"},
            "history": {"path": "history.sqlite3"},
            "service": {
                "state_dir": "state",
                "drain_timeout_s": 5.0,
                "status_interval_s": 30.0,
                # The stations' clocks run `acceleration` times fast by design: their offset is shown, not alarmed.
                "max_clock_offset_s": SIMULATED_CLOCK_LIMIT_S,
            },
            "qc": qc,
        }
        if mqtt is not None:
            document["mqtt"] = mqtt | {"client_id": f"hotlab-{lab.site}"}
        officer: QcOfficer | None = None
        if by_hand:
            assert mqtt is not None and lab.check_source is not None
            key = await _new_sender(workdir, QC_CONSOLE, senders)
            officer = _qc_officer(lab, lab.check_source, mqtt, chambers[lab.check_source.device], now_ns, key, sign)
            officer.baseline_first = not accepted
        await _new_sender(workdir, PANEL_SENDER, senders)
        document["command_sender"] = senders
        document["web"] = {"sender": PANEL_SENDER}
        if audit_path is not None:
            document["commands"] = {"audit_path": str(audit_path.resolve())}
        if influx_table is not None:
            document["influx"] = influx_table
        config = parse_config(document, file=f"<{lab.site}>", base_dir=workdir.resolve())
        accounts = config.users.resolved_path(config.commands.resolved_audit_path(config.service.state_dir))
        audit_key = await asyncio.to_thread(load_hmac_key)
        await asyncio.to_thread(
            demo_accounts, accounts, config.commands.resolved_audit_path(config.service.state_dir), audit_key
        )
        announce(
            config,
            lab,
            private_broker=broker is None,
            influxd=influxd,
            no_influx=no_influx,
            operator=None if console is None else console.user,
            officer=None if officer is None else officer.user,
            accounts=accounts,
        )
        if officer is not None:
            task = asyncio.create_task(officer.work(), name="simulated-qc-officer")
            stack.push_async_callback(cancel_and_wait, task)
        yield config


async def _new_sender(workdir: Path, name: str, senders: list[dict[str, str]]) -> bytes:
    """A new [[command_sender]] `name` (appended to `senders`) whose random key is kept in a private file
    of `workdir`; its key."""
    text = secrets.token_hex(32)
    path = workdir / f"{name}.key"
    await asyncio.to_thread(write_file, path, text + "\n", private=True)
    senders.append({"name": name, "key_file": str(path.resolve())})
    return bytes.fromhex(text)


def _parent_nuclide(generator: SimGenerator) -> str:
    from hotlab.simulators.generator_physics import get_profile

    return get_profile(generator.profile).parent


def _qc_officer(
    lab: SimLab,
    check: CheckSource,
    mqtt: Mapping[str, Any],
    chamber: IonChamber,
    now_ns: int,
    key: bytes,
    sign: Sign | None,
) -> QcOfficer:
    from hotlab.physics.nuclides import get_nuclide
    from hotlab.simulators.source import Source

    station = next(c.station for c in lab.calibrators if c.name == check.device)
    ga68 = next((g.generator_id for g in lab.generators if g.profile == "ge68"), None)
    source = Source(get_nuclide(check.nuclide), check.activity_bq, chamber.clock.now_ns())
    return QcOfficer(
        mqtt["host"], mqtt["port"], lab.site, station, check.device, QC_OFFICER_USER, QC_CONSOLE, key,
        chamber, source, check.source_id, ga68, sign,
    )  # fmt: skip


async def _start_calibrator(
    stack: contextlib.AsyncExitStack, calibrator: SimCalibrator, chamber: IonChamber, seed: int
) -> dict[str, Any]:
    from hotlab.simulators.calibrator_cli import CALIBRATOR_SIMULATORS
    from hotlab.simulators.faults import FaultInjector
    from hotlab.simulators.serial_host import PtyHost, Rfc2217Host, TcpHost

    model = CALIBRATOR_SIMULATORS[calibrator.family](chamber, FaultInjector(seed=seed), interval_s=CALIBRATOR_POLL_S)
    host = {"pty": PtyHost, "tcp": TcpHost, "rfc2217": Rfc2217Host}[calibrator.host](model)
    address = await host.start()
    stack.push_async_callback(host.stop)
    return {
        "name": calibrator.name,
        "station": calibrator.station,
        "family": calibrator.family,
        "transport": address,
        "poll_interval_s": CALIBRATOR_POLL_S,
        "timeout_s": 3.0,
    }


def _chamber(calibrator: SimCalibrator, seed: int, lab: SimLab, *, by_hand: bool) -> IonChamber:
    """The calibrator's chamber, empty at first, then loaded and emptied on the lab's routine.

    The source is the calibrator's dose, or the check source on the calibrator it is assigned to;
    one vial, decaying from the lab's start however often it goes in and out. With `by_hand` the
    check source's calibrator has no routine: the QC officer loads it (controller/lab/qc_officer.py).
    """
    from hotlab.controller.lab.qc_officer import ge68_responses
    from hotlab.physics.nuclides import get_nuclide
    from hotlab.simulators.source import DEFAULT_RESPONSE_A_PER_BQ, ChamberSchedule, IonChamber, SimClock, Source

    check = lab.check_source
    checked_here = check is not None and check.device == calibrator.name
    nuclide, activity_bq = (
        (check.nuclide, check.activity_bq)
        if check is not None and checked_here
        else (calibrator.nuclide, calibrator.activity_bq)
    )
    clock = SimClock(lab.calibrator_acceleration)
    if by_hand and checked_here:
        responses = ge68_responses(DEFAULT_RESPONSE_A_PER_BQ)
        return IonChamber(None, clock=clock, selected_nuclide=nuclide, seed=seed, responses=responses)
    start_ns = clock.now_ns()
    empty_ns, loaded_ns = (
        int(s * lab.calibrator_acceleration * NS_PER_S) for s in (lab.chamber_empty_s, lab.chamber_loaded_s)
    )
    source = Source(get_nuclide(nuclide), activity_bq, start_ns)
    schedule = ChamberSchedule(
        ((start_ns + empty_ns, source), (start_ns + empty_ns + loaded_ns, None)), repeat_every_ns=empty_ns + loaded_ns
    )
    return IonChamber(None, clock=clock, selected_nuclide=nuclide, seed=seed, schedule=schedule)


async def _start_station(
    stack: contextlib.AsyncExitStack,
    generator: SimGenerator,
    cal_ns: int,
    last_elution_ns: int,
    acceleration: float,
    console: OperatorConsole | None,
    station_ns: int,
) -> dict[str, Any]:
    """A generator station on Modbus TCP (its clock at `station_ns` now), and an operator who elutes on its schedule."""
    from hotlab.simulators.elution_station import (
        ElutionStationSimulator,
        StationClock,
        StationIdentity,
        StationModel,
    )
    from hotlab.simulators.generator_physics import GeneratorColumn, get_profile

    column = GeneratorColumn(
        get_profile(generator.profile),
        generator_id=generator.generator_id,
        parent_cal_bq=generator.calibration_bq,
        cal_time_ns=cal_ns,
        last_elution_ns=last_elution_ns,
    )
    model = StationModel(column, StationClock(acceleration, station_ns), StationIdentity(serial=generator.generator_id))
    simulator = ElutionStationSimulator(model)
    host, port = await simulator.start_tcp("127.0.0.1", 0)
    stack.push_async_callback(simulator.stop)
    period_s = generator.elution_every_s / acceleration
    work = (
        console.operate(generator, period_s)
        if console is not None
        else _press_start_on_front_panel(model, generator, period_s)
    )
    task = asyncio.create_task(work, name=f"simulated-operator-{generator.device}")
    stack.push_async_callback(cancel_and_wait, task)
    return {"modbus": "tcp", "host": host, "port": port, "device_id": 1, "word_order": "ABCD"}


async def _press_start_on_front_panel(model: Any, generator: SimGenerator, period_s: float) -> None:
    """Without a broker there is no command path: the operator starts the station by hand."""
    from hotlab.drivers.station_registers import CommandCode

    while True:
        await asyncio.sleep(period_s)
        model.execute(CommandCode.START, generator.volume_ml)


@dataclass(frozen=True, slots=True)
class OperatorConsole:
    """The simulated operator's console: MQTT `start_elution` commands in the operator's name, signed with
    the console's [[command_sender]] key."""

    host: str
    port: int
    site: str
    user: str
    sender: str
    key: bytes = field(repr=False)

    async def operate(self, generator: SimGenerator, period_s: float) -> None:
        """Every `period_s`, while the controller is online, ask it to elute; reconnect after a broker loss."""
        topic = f"hotlab/{self.site}/{generator.station}/{generator.device}/cmd/start_elution"
        online = asyncio.Event()
        while True:
            try:
                async with aiomqtt.Client(
                    self.host, self.port, identifier=f"hotlab-console-{uuid.uuid4().hex[:8]}", keepalive=30
                ) as client:
                    await client.subscribe(f"hotlab/{self.site}/controller/status", qos=1)
                    await client.subscribe(f"{topic}/reply", qos=1)
                    listener = asyncio.create_task(self._listen(client, online))
                    try:
                        while True:
                            await asyncio.sleep(period_s)
                            await online.wait()
                            await client.publish(topic, self._command(topic, generator), qos=1)
                    finally:
                        listener.cancel()
                        await asyncio.gather(listener, return_exceptions=True)
            except aiomqtt.MqttError as exc:
                online.clear()
                log.warning(
                    "simulated operator of %s: broker connection lost (%s); reconnecting", generator.device, exc
                )
                await asyncio.sleep(1.0)

    def _command(self, topic: str, generator: SimGenerator) -> bytes:
        command = command_body(
            user=self.user,
            reason=f"scheduled elution of {generator.generator_id}",
            args={"volume_ml": generator.volume_ml},
        )
        return signed_payload(topic, command, sender=self.sender, key=self.key)

    @staticmethod
    async def _listen(client: aiomqtt.Client, online: asyncio.Event) -> None:
        """Follow the controller's retained status, and say so when a command was not carried out."""
        async for message in client.messages:
            try:
                body = json.loads(message.payload)
            except (TypeError, ValueError):
                continue
            if str(message.topic).endswith("/controller/status"):
                (online.set if body.get("state") == "online" else online.clear)()
            elif not body.get("ok"):
                log.warning("simulated operator: %s %s: %s", body.get("outcome"), message.topic, body.get("error"))


async def _close_when_started(starting: asyncio.Future[Any], server: PrivateBroker | PrivateInfluxd) -> None:
    """Close a private server once its start has ended: a cancellation cannot stop the thread that starts it."""
    await asyncio.gather(starting, return_exceptions=True)
    await asyncio.to_thread(server.close)


async def cancel_and_wait(task: asyncio.Task[None]) -> None:
    """Cancel `task` and wait for it, cancelling again if a cancellation was lost.

    On Python 3.11, `asyncio.wait_for` (which aiomqtt's connect uses) drops a cancellation
    that arrives as the awaited future completes; the operator task then went on running
    and the lab never finished shutting down (seen on a full disk, about 1 start in 8).
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    await asyncio.gather(task, return_exceptions=True)


def station_mo99_breakthrough(site: str) -> Callable[[Message], list[Message]]:
    """A service processor: the station's own eluate Mo-99 measurement becomes a `mo99` QC reading.

    The station measures the parent activity in each eluate (register ELUATE_PARENT,
    docs/elution-station-registers.md) and the elution message carries it as
    `breakthrough_pct`. The QC engine judges Mo-99 breakthrough (10 CFR 35.204(a)) from a
    reading tagged `qc = "mo99"` with the eluate's Tc-99m activity, so this turns the
    station's measurement into exactly that reading, at the end-of-elution instant both
    activities refer to. Its msg_id is derived from the elution's, so a re-delivered elution
    yields the same reading.
    """

    def derive(message: Message) -> list[Message]:
        payload = message.payload
        if message.kind != "elution" or payload.get("parent") != "Mo-99" or payload.get("breakthrough_pct") is None:
            return []
        tc99m_bq = float(payload["activity_bq"])
        mo99_bq = float(payload["breakthrough_pct"]) / 100.0 * tc99m_bq
        reading = Reading(
            device=str(payload["generator"]),
            nuclide="Mo-99",
            activity_bq=mo99_bq,
            raw_value=mo99_bq,
            unit="Bq",
            timestamp_ns=int(payload["end_ns"]),
            extra={"qc": "mo99", "tc99m_bq": tc99m_bq, "measured_by": "station eluate monitor"},
        )
        derived = reading_message(site, str(payload["station"]), reading)
        msg_id = uuid.uuid5(MSG_ID_NAMESPACE, json.dumps(["mo99", message.msg_id])).hex
        return [replace(derived, payload=derived.payload | {"msg_id": msg_id})]

    return derive


def _influx_lines(config: LabConfig, influxd: PrivateInfluxd | None, no_influx: str) -> list[str]:
    """Where the lab's InfluxDB is, and for its private influxd how to ask it what it holds."""
    influx = config.influx
    if influx is None:
        return [f"  InfluxDB:    none ({no_influx}) - running without InfluxDB"] if no_influx else []
    target = influx.target
    if influxd is None:
        where = f"database {target.database}" if target.database is not None else f"bucket {target.bucket}"
        return [f"  InfluxDB:    {influx.url} {where}"]
    query = 'SELECT count("activity_bq") FROM "raw"."reading" WHERE time > now() - 5m GROUP BY "device"'
    return [
        f"  InfluxDB:    private influxd on {influxd.url}, database {target.database} (raw readings "
        f"{target.raw_days} days, per-minute summaries and the records kept)",
        f"  query it:    curl -sG -u {ADMIN_USER}:$(cat {influxd.password_path.resolve()}) {influxd.url}/query "
        f"--data-urlencode db={target.database} --data-urlencode 'q={query}'",
    ]


def announce(
    config: LabConfig,
    lab: SimLab,
    *,
    private_broker: bool,
    influxd: PrivateInfluxd | None = None,
    no_influx: str = "",
    operator: str | None,
    officer: str | None,
    accounts: Path,
) -> None:
    """Tell the newcomer what runs where, and which embedded defaults are in use."""
    lines = ["", f"hotlab simulated lab ({config.site})", "  devices:"]
    for device in config.devices:
        transport = device.transport
        where = transport.url if isinstance(transport, SerialTransport) else describe_link(transport)
        lines.append(f"    {device.name:<20} {device.family:<16} {where}")
    lines.append(
        f"  chambers:    empty {lab.chamber_empty_s:g} s, then a dose (or the check source) for "
        f"{lab.chamber_loaded_s:g} s, again and again: one measurement each time"
        + ("" if officer is None else " (but the QC officer's)")
    )
    lines.append(
        f"  time:        elution stations run {lab.acceleration:g}x faster than the wall clock"
        + (f", calibrators {lab.calibrator_acceleration:g}x" if lab.calibrator_acceleration != 1 else "")
        + " (the stations' clock offset is shown, not alarmed)"
    )
    if config.mqtt is None:
        lines.append("  MQTT broker: none (mosquitto not installed) - LOCAL-ONLY mode, data stays in the outbox")
    else:
        kind = "private mosquitto" if private_broker else "your broker"
        lines += [
            f"  MQTT broker: {kind} on {config.mqtt.host}:{config.mqtt.port}",
            f"  watch it:    mosquitto_sub -h {config.mqtt.host} -p {config.mqtt.port} -t 'hotlab/#' -v",
        ]
    lines += _influx_lines(config, influxd, no_influx)
    lines += [
        f"  outbox:      {config.outbox.path}",
        f"  history:     {config.history_path}",
        f"  audit trail: {config.commands.resolved_audit_path(config.service.state_dir)}",
    ]
    names = ", ".join(username for username, _name, _role in DEMO_ACCOUNTS)
    lines.append(f"  accounts:    {names} in {accounts} (passwords in <username>.password beside it)")
    if operator is not None:
        lines.append(f"  operator:    {operator} (simulated) sends signed start_elution commands over MQTT")
    if officer is not None and lab.check_source is not None:
        lines.append(
            f"  QC officer:  {officer} (simulated) loads {lab.check_source.device} by hand: a constancy baseline, "
            "the daily check, a Ge-68 follow-up, then signs them"
        )
    lines += ["  stop with Ctrl-C", ""]
    print("\n".join(lines), file=sys.stderr, flush=True)
