"""MQTT control commands end to end: real Mosquitto, the real controller service, a real Modbus station simulator.

Every attempt must be answered, audited (hash chain intact, `hotlab audit verify` passes) and
must leave the station alone unless it was authorised; polling must carry on throughout. Commands
are signed by the sender "panel" for people with accounts in the lab's user store.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import jsonschema
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hotlab.controller.audit import AuditLog, AuditRecord, iter_records
from hotlab.controller.cli.main import main as hotlab
from hotlab.controller.command_signing import signed_payload
from hotlab.controller.config import parse_config
from hotlab.controller.service import ControllerService
from hotlab.controller.users import Credentials, UserStore
from hotlab.drivers.station_registers import FaultCode, StationState
from hotlab.simulators.calibrator_vik202 import Vik202Simulator
from hotlab.simulators.elution_station import (
    ElutionStationSimulator,
    StationClock,
    StationIdentity,
    StationModel,
)
from hotlab.simulators.generator_physics import GeneratorColumn, get_profile
from hotlab.simulators.serial_host import PtyHost
from hotlab.simulators.source import make_chamber
from tests.fault_tally import tally
from tests.mosquitto_service import MosquittoBroker, mosquitto  # noqa: F401 - fixture

SITE = "cmdlab"
TOPIC = f"hotlab/{SITE}/elution-1/gen-1/cmd"
PANEL_KEY = secrets.token_bytes(32)
OTHER_KEY = secrets.token_bytes(32)
PASSWORD = "a-password-of-20-chars"
REPLY_SCHEMA = json.loads(
    (Path(__file__).resolve().parent.parent / "controller" / "schemas" / "command_reply.json").read_text()
)
REPLY_VALIDATOR = jsonschema.Draft202012Validator(REPLY_SCHEMA, format_checker=jsonschema.FormatChecker())


def station_model() -> StationModel:
    now = time.time_ns()
    column = GeneratorColumn(
        get_profile("ge68"),
        generator_id="GE68-CMD-1",
        parent_cal_bq=1.85e9,
        cal_time_ns=now - 30 * 86400 * 10**9,
        last_elution_ns=now - 86400 * 10**9,
    )
    # A slow clock: priming (8 s of station time) lasts minutes, so the state cannot change under a test.
    return StationModel(column, StationClock(acceleration=0.05), StationIdentity())


def command(
    user: str,
    action_args: dict[str, Any],
    *,
    request_id: str | None = None,
    reason: str = "test of the command path",
    issued_at: datetime | None = None,
) -> dict[str, Any]:
    """A `hotlab.command/2`; `Requester.send` signs it for the topic it goes to."""
    return {
        "schema": "hotlab.command/2",
        "request_id": request_id or uuid.uuid4().hex,
        "user": user,
        "reason": reason,
        "issued_at": (issued_at or datetime.now(UTC)).isoformat(),
        "args": action_args,
    }


def sign(topic: str, body: dict[str, Any], *, sender: str = "panel", key: bytes = PANEL_KEY) -> bytes:
    return signed_payload(topic, body, sender=sender, key=key)


def add_accounts(state_dir: Path) -> None:
    """alice (qc_officer) and bob (operator) in the store the controller reads: [users] default, beside the
    trail. Their creation is audited in a trail of its own, so the lab's trail holds only commands."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with UserStore(state_dir / "users.sqlite3", AuditLog(state_dir.parent / "accounts.jsonl")) as store:
        if store.user("carol") is not None:
            return
        store.add_user("carol", "Carol Admin", "admin", PASSWORD, admin=None)
        admin = Credentials("carol", PASSWORD)
        store.add_user("alice", "Alice QC", "qc_officer", PASSWORD, admin=admin)
        store.add_user("bob", "Bob Operator", "operator", PASSWORD, admin=admin)


class Requester:
    """An operator console: publishes a command (QoS 1) and waits for the reply on <topic>/reply."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.replies: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self.online = asyncio.Event()

    async def listen(self) -> None:
        async for message in self.client.messages:
            payload = json.loads(bytes(message.payload))  # type: ignore[arg-type]
            if str(message.topic).endswith("/controller/status"):
                if payload["state"] == "online":
                    self.online.set()
            else:
                await self.replies.put((str(message.topic), payload))

    async def send(self, topic: str, payload: bytes | dict[str, Any], *, retain: bool = False) -> dict[str, Any]:
        """Publish `payload` (a command body: signed by the panel for `topic` first) and wait for the reply."""
        raw = sign(topic, payload) if isinstance(payload, dict) else payload
        await self.client.publish(topic, raw, qos=1, retain=retain)
        return await self.reply_to(topic)

    async def reply_to(self, topic: str) -> dict[str, Any]:
        reply_topic, reply = await asyncio.wait_for(self.replies.get(), 30)
        assert reply_topic == f"{topic}/reply"
        REPLY_VALIDATOR.validate(reply)
        return reply


@dataclass
class Lab:
    service: ControllerService
    model: Any  # the simulator's device model: StationModel or Vik202Simulator
    requester: Requester
    audit_path: Path
    task: asyncio.Task[None]
    simulator: ElutionStationSimulator | None = None

    @property
    def polls(self) -> int:
        return next(iter(self.service.supervisors.values())).reads

    async def polling_goes_on(self) -> None:
        """Wait until the device is up and has been read again since this call (a reconnect resets `reads`)."""
        supervisor = next(iter(self.service.supervisors.values()))
        before = supervisor.reads
        deadline = time.monotonic() + 30
        while not (supervisor.up and supervisor.reads != before):
            assert time.monotonic() < deadline, "polling did not go on"
            await asyncio.sleep(0.02)

    def records(self) -> list[AuditRecord]:
        return list(iter_records(self.audit_path))

    def verify(self) -> int:
        return hotlab(["audit", "verify", "--path", str(self.audit_path)])


async def start_lab(
    tmp_path: Path,
    broker: MosquittoBroker,
    monkeypatch: pytest.MonkeyPatch,
    model: Any,
    device: dict[str, Any],
    retained_before_start: dict[str, Any] | None = None,
    commands: dict[str, Any] | None = None,
) -> AsyncIterator[Lab]:
    """The controller service with one device, running until the test is done; `commands` adds to [commands]."""
    monkeypatch.setenv("HOTLAB_TEST_KEY_PANEL", PANEL_KEY.hex())
    monkeypatch.setenv("HOTLAB_TEST_KEY_TOOL", OTHER_KEY.hex())
    await asyncio.to_thread(add_accounts, tmp_path / "state")
    monkeypatch.delenv("HOTLAB_AUDIT_KEY", raising=False)
    monkeypatch.delenv("HOTLAB_AUDIT_KEY_FILE", raising=False)
    config = parse_config(
        {
            "site": {"name": SITE},
            "device": [device],
            "outbox": {"path": "outbox.sqlite3"},
            "service": {"state_dir": "state", "backoff_initial_s": 0.1, "backoff_max_s": 1.0, "drain_timeout_s": 2.0},
            "history": {"enabled": False},
            "mqtt": {"host": broker.host, "port": broker.port, "client_id": f"ctl-{uuid.uuid4().hex[:8]}"},
            "command_sender": [
                {"name": "panel", "key_env": "HOTLAB_TEST_KEY_PANEL"},
                {"name": "admin-tool", "key_env": "HOTLAB_TEST_KEY_TOOL"},
            ],
            "commands": {"min_role": {"start_elution": "qc_officer"}, **(commands or {})},
        },
        base_dir=tmp_path,
    )
    service = ControllerService(config)
    stop = asyncio.Event()
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"console-{uuid.uuid4().hex[:8]}") as client:
        requester = Requester(client)
        await client.subscribe(f"hotlab/{SITE}/+/+/cmd/+/reply", qos=1)
        await client.subscribe(f"hotlab/{SITE}/controller/status", qos=1)
        listener = asyncio.create_task(requester.listen())
        if retained_before_start is not None:
            retained = sign(f"{TOPIC}/start_elution", retained_before_start)
            await client.publish(f"{TOPIC}/start_elution", retained, qos=1, retain=True)
        task = asyncio.create_task(service.run(stop))
        try:
            await asyncio.wait_for(requester.online.wait(), 30)
            deadline = time.monotonic() + 30
            while not (service.supervisors.get(device["name"]) and service.supervisors[device["name"]].up):
                assert time.monotonic() < deadline, "station never came online"
                await asyncio.sleep(0.05)
            yield Lab(service, model, requester, config.commands.resolved_audit_path(config.service.state_dir), task)
            assert not task.done(), "the service ended during the test"
        finally:
            if retained_before_start is not None:
                await client.publish(f"{TOPIC}/start_elution", b"", qos=1, retain=True)
            stop.set()
            await asyncio.wait_for(task, 30)
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)


async def station_lab(
    tmp_path: Path,
    broker: MosquittoBroker,
    monkeypatch: pytest.MonkeyPatch,
    retained_before_start: dict[str, Any] | None = None,
    commands: dict[str, Any] | None = None,
    **device_extra: Any,
) -> AsyncIterator[Lab]:
    model = station_model()
    simulator = ElutionStationSimulator(model)
    _host, port = await simulator.start_tcp("127.0.0.1", 0)
    device = {
        "name": "gen-1",
        "station": "elution-1",
        "family": "elution_station",
        "poll_interval_s": 0.05,
        "transport": {"modbus": "tcp", "host": "127.0.0.1", "port": port},
        **device_extra,
    }
    try:
        async for running in start_lab(tmp_path, broker, monkeypatch, model, device, retained_before_start, commands):
            running.simulator = simulator
            yield running
    finally:
        await simulator.stop()


@pytest.fixture
async def lab(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Lab]:
    async for running in station_lab(tmp_path, mosquitto, monkeypatch):
        yield running


async def test_authorised_commands_run_once_are_audited_and_refused_in_the_wrong_state(lab: Lab) -> None:
    send = lab.requester.send
    start = command("alice", {"volume_ml": 5.0}, request_id="start-1", reason="Ga-68 for PSMA batch 12")
    reply = await send(f"{TOPIC}/start_elution", start)
    assert reply["ok"] is True and reply["outcome"] == "executed" and reply["error"] is None, reply
    assert reply["old_value"] == {"state": "idle"} and reply["new_value"] == {"state": "priming", "sequence": 1}
    assert lab.model.state is StationState.PRIMING and lab.model.requested_volume_ml == 5.0

    again = await send(f"{TOPIC}/start_elution", start)  # a QoS 1 redelivery or a console retry
    assert again["duplicate"] is True and again["outcome"] == "executed" and again["new_value"] == reply["new_value"]
    assert lab.model.cmd_ack_seq == 1, "a repeated request_id must never run twice"

    busy = await send(f"{TOPIC}/start_elution", command("alice", {"volume_ml": 5.0}))
    assert busy["ok"] is False and busy["outcome"] == "refused"
    assert "elution.start refused: station is priming; allowed only when done or idle" in busy["error"] and busy[
        "old_value"
    ] == {"state": "priming"}

    stop = await send(f"{TOPIC}/abort", command("bob", {}, reason="wrong generator selected"))
    assert stop["outcome"] == "executed" and stop["old_value"] == {"state": "priming"}
    assert stop["new_value"]["state"] == "idle" and lab.model.state is StationState.IDLE

    nothing_to_ack = await send(f"{TOPIC}/acknowledge_fault", command("bob", {}))
    assert nothing_to_ack["outcome"] == "refused" and "allowed only when fault" in nothing_to_ack["error"]
    lab.model.raise_fault(FaultCode.OVERPRESSURE)
    ack = await send(f"{TOPIC}/acknowledge_fault", command("bob", {}, reason="kinked line replaced"))
    assert (
        ack["outcome"] == "executed" and ack["old_value"] == {"state": "fault"} and lab.model.state is StationState.IDLE
    )

    records = lab.records()
    assert [(r.actor, r.action, r.new_value["outcome"]) for r in records] == [
        ("alice", "elution.start", "requested"),
        ("alice", "elution.start", "executed"),
        ("alice", "elution.start", "duplicate"),
        ("alice", "elution.start", "requested"),
        ("alice", "elution.start", "refused"),
        ("bob", "elution.abort", "requested"),
        ("bob", "elution.abort", "executed"),
        ("bob", "fault.acknowledge", "requested"),
        ("bob", "fault.acknowledge", "refused"),
        ("bob", "fault.acknowledge", "requested"),
        ("bob", "fault.acknowledge", "executed"),
    ]
    intent, executed, duplicate = records[0], records[1], records[2]
    assert intent.target == executed.target == "elution-1/gen-1"
    assert intent.reason == executed.reason == "Ga-68 for PSMA batch 12"
    assert intent.new_value["args"] == {"volume_ml": 5.0} and intent.new_value["request_id"] == "start-1"
    assert executed.old_value == {"state": "idle"} and executed.new_value["result"] == {
        "state": "priming",
        "sequence": 1,
    }
    assert executed.new_value["authenticated"] is True and executed.new_value["role"] == "qc_officer"
    assert executed.new_value["sender"] == "panel"
    assert executed.seq == reply["audit_seq"]
    assert duplicate.new_value["first_audit_seq"] == executed.seq and duplicate.new_value["first_outcome"] == "executed"
    assert duplicate.seq == again["audit_seq"]
    assert records[4].new_value["error"] == busy["error"]
    assert PANEL_KEY.hex() not in lab.audit_path.read_text()
    assert lab.verify() == 0
    await lab.polling_goes_on()


async def test_a_request_id_reused_for_another_command_is_refused_and_the_station_keeps_priming(lab: Lab) -> None:
    send = lab.requester.send
    started = await send(f"{TOPIC}/start_elution", command("alice", {"volume_ml": 5.0}, request_id="shared-1"))
    assert started["outcome"] == "executed" and lab.model.state is StationState.PRIMING
    for user in ("alice", "bob"):
        abort = await send(f"{TOPIC}/abort", command(user, {}, request_id="shared-1"))
        assert abort["outcome"] == "malformed" and abort["duplicate"] is False, abort
        assert "request_id 'shared-1' already used for a different command" in abort["error"]
    assert lab.model.state is StationState.PRIMING and lab.model.cmd_ack_seq == 1, "the abort was never sent"
    assert [(r.actor, r.action, r.new_value["outcome"]) for r in lab.records()][-2:] == [
        ("alice", "elution.abort", "malformed"),
        ("bob", "elution.abort", "malformed"),
    ]
    assert lab.verify() == 0


async def test_a_request_id_resent_after_a_controller_restart_is_not_run_again(
    tmp_path: Path, mosquitto: MosquittoBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = command("alice", {"volume_ml": 5.0}, request_id="before-restart")
    first_run = station_lab(tmp_path, mosquitto, monkeypatch)
    try:
        before = await anext(first_run)
        assert (await before.requester.send(f"{TOPIC}/start_elution", start))["outcome"] == "executed"
    finally:
        assert await anext(first_run, None) is None  # runs the generator on: the service stops, frees its outbox

    second_run = station_lab(tmp_path, mosquitto, monkeypatch)  # same state dir, so the same audit trail
    try:
        after = await anext(second_run)
        again = await after.requester.send(f"{TOPIC}/start_elution", start)
        assert again["duplicate"] is True and again["outcome"] == "executed", again
        assert after.model.cmd_ack_seq == 0 and after.model.state is StationState.IDLE, "no second elution"
        assert after.verify() == 0
    finally:
        assert await anext(second_run, None) is None


async def test_a_command_retained_while_the_controller_listens_is_refused(lab: Lab) -> None:
    """MQTT 3.1.1 clears the retain flag on delivery to a connected subscriber: the controller asks
    for retain-as-published (MQTT 5), so it still sees the flag and refuses the command."""
    topic = f"{TOPIC}/start_elution"
    try:
        reply = await lab.requester.send(topic, command("alice", {"volume_ml": 5.0}), retain=True)
    finally:  # clear it from the broker; the empty retained message is itself answered as refused
        cleared = await lab.requester.send(topic, b"", retain=True)
    assert reply["outcome"] == "malformed" and "retained commands are refused" in reply["error"]
    assert cleared["outcome"] == "malformed"
    tally("commands replayed or left retained", retained_sent=1, retained_refused=1)
    assert lab.model.state is StationState.IDLE
    assert (await lab.requester.send(topic, command("alice", {"volume_ml": 5.0})))["outcome"] == "executed"


async def test_a_replayed_command_is_refused_as_expired_and_a_fresh_one_runs(lab: Lab) -> None:
    topic = f"{TOPIC}/start_elution"
    captured = command("alice", {"volume_ml": 5.0}, issued_at=datetime.now(UTC) - timedelta(seconds=45))
    replayed = await lab.requester.send(topic, captured)
    assert replayed["outcome"] == "expired" and "older than 30 s" in replayed["error"]
    tally("commands replayed or left retained", replayed_sent=1, replayed_refused=1)
    assert lab.model.state is StationState.IDLE
    assert (await lab.requester.send(topic, command("alice", {"volume_ml": 5.0})))["outcome"] == "executed"


@pytest.fixture
async def lab_with_max_age_5_s(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Lab]:
    async for running in station_lab(tmp_path, mosquitto, monkeypatch, commands={"max_age_s": 5}):
        yield running


async def test_the_configured_max_age_decides_which_commands_are_too_old(lab_with_max_age_5_s: Lab) -> None:
    """`[commands] max_age_s = 5`: 10 s old is expired (the default 30 s would run it), 3 s old runs."""
    lab, topic = lab_with_max_age_5_s, f"{TOPIC}/start_elution"
    stale = command("alice", {"volume_ml": 5.0}, issued_at=datetime.now(UTC) - timedelta(seconds=10))
    expired = await lab.requester.send(topic, stale)
    assert expired["outcome"] == "expired" and "older than 5 s" in expired["error"], expired
    assert lab.model.state is StationState.IDLE and lab.model.cmd_ack_seq == 0
    recent = command("alice", {"volume_ml": 5.0}, issued_at=datetime.now(UTC) - timedelta(seconds=3))
    assert (await lab.requester.send(topic, recent))["outcome"] == "executed"
    assert lab.model.state is StationState.PRIMING
    assert [r.new_value["outcome"] for r in lab.records()] == ["expired", "requested", "executed"]
    assert lab.verify() == 0


@pytest.fixture
async def lab_with_retained_command(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Lab]:
    retained = command("alice", {"volume_ml": 5.0}, reason="left retained by a misconfigured console")
    async for running in station_lab(tmp_path, mosquitto, monkeypatch, retained_before_start=retained):
        yield running


async def test_unauthorised_attempts_are_refused_audited_and_leave_the_station_alone(
    lab_with_retained_command: Lab,
) -> None:
    lab = lab_with_retained_command
    # The broker hands the retained command over as soon as the controller subscribes.
    replayed = await lab.requester.reply_to(f"{TOPIC}/start_elution")
    assert replayed["outcome"] == "malformed" and "retained commands are refused" in replayed["error"]

    topic = f"{TOPIC}/start_elution"
    token_command = command("alice", {"volume_ml": 5.0}) | {
        "schema": "hotlab.command/1",
        "token": "alice-token-7f3a9c2e",
    }
    attempts = {
        "wrong key": sign(topic, command("alice", {"volume_ml": 5.0}), key=OTHER_KEY),
        "signed for another topic": sign(f"{TOPIC}/abort", command("alice", {"volume_ml": 5.0})),
        "unknown sender": sign(topic, command("alice", {"volume_ml": 5.0}), sender="stranger"),
        "unknown user": sign(topic, command("mallory", {"volume_ml": 5.0})),
        "role not allowed": sign(topic, command("bob", {"volume_ml": 5.0})),
        "a token in the payload": json.dumps(token_command).encode(),
    }
    replies = {what: await lab.requester.send(topic, payload) for what, payload in attempts.items()}
    for what, reply in replies.items():
        assert reply["ok"] is False and reply["outcome"] == "unauthorised", (what, reply)
    for what in ("wrong key", "signed for another topic"):
        assert "the command from sender 'panel' is not authenticated" in replies[what]["error"]
    assert "the command from sender 'stranger' is not authenticated" in replies["unknown sender"]["error"]
    assert "user 'mallory' has no account" in replies["unknown user"]["error"]
    assert (
        "role operator of 'bob' may not run start_elution; it needs qc_officer" in replies["role not allowed"]["error"]
    )
    assert "tokens in payloads are no longer accepted" in replies["a token in the payload"]["error"]
    assert lab.model.state is StationState.IDLE and lab.model.cmd_ack_seq == 0, "nothing may reach the station"

    records = lab.records()
    assert [(r.actor, r.new_value["outcome"], r.new_value["authenticated"]) for r in records] == [
        ("alice", "malformed", False),
        ("alice", "unauthorised", False),
        ("alice", "unauthorised", False),
        ("alice", "unauthorised", False),
        ("mallory", "unauthorised", False),
        ("bob", "unauthorised", False),
        ("alice", "unauthorised", False),
    ]
    assert [r.new_value.get("sender") for r in records] == [
        "panel",
        "panel",
        "panel",
        "stranger",
        "panel",
        "panel",
        None,
    ]
    assert all(r.action == "elution.start" and r.target == "elution-1/gen-1" for r in records)
    assert "alice-token-7f3a9c2e" not in lab.audit_path.read_text()
    assert lab.verify() == 0


#: Text that may hold lone surrogates, which json.dumps sends as "\ud800" escapes (valid JSON, not Unicode).
TEXT = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=12)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
#: Nearly valid commands: old token commands, and the command text of signed envelopes
#: that are never signed with a key the controller knows (an accepted fuzz command would really elute).
NEAR_MISS = st.fixed_dictionaries(
    {},
    optional={
        "schema": st.sampled_from(["hotlab.command/1", "hotlab.command/2"]) | JSON,
        "request_id": st.just("fuzz-1") | JSON,
        "user": st.sampled_from(["alice", "bob", "mallory"]) | JSON,
        "token": st.sampled_from(["guess-guess-guess-guess", ""]) | JSON,
        "reason": st.just("fuzz") | JSON,
        "issued_at": st.just("2026-11-20T12:00Z") | JSON,
        "args": st.fixed_dictionaries({}, optional={"volume_ml": st.floats() | JSON, "nuclide": JSON}) | JSON,
    },
)
NEAR_MISS_SIGNED = st.fixed_dictionaries(
    {},
    optional={
        "schema": st.just("hotlab.signed_command/1") | JSON,
        "sender": st.sampled_from(["panel", "admin-tool", "stranger"]) | JSON,
        "command": NEAR_MISS.map(json.dumps) | JSON,
        "signature": st.text("0123456789abcdef", min_size=64, max_size=64) | JSON,
    },
)
PAYLOADS = (
    st.binary(max_size=200)
    | JSON.map(lambda v: json.dumps(v).encode())
    | NEAR_MISS.map(lambda v: json.dumps(v).encode())
    | NEAR_MISS_SIGNED.map(lambda v: json.dumps(v).encode())
)
TOPICS = st.sampled_from(
    [f"{TOPIC}/{action}" for action in ("start_elution", "abort", "acknowledge_fault", "select_nuclide", "reboot")]
    + [f"hotlab/{SITE}/elution-1/no-such-device/cmd/abort", f"hotlab/{SITE}/wrong-station/gen-1/cmd/abort"]
)


async def test_malformed_payloads_get_an_error_reply_and_polling_goes_on(lab: Lab) -> None:
    loop = asyncio.get_running_loop()
    sent: list[tuple[str, dict[str, Any]]] = []

    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(topic=TOPICS, payload=PAYLOADS)
    @example(topic=f"{TOPIC}/start_elution", payload=b"{" + b" " * 5000 + b"}")  # oversized
    @example(topic=f"{TOPIC}/abort", payload=b"")
    @example(  # not encodable: no reply before
        topic=f"{TOPIC}/abort",
        payload=json.dumps({"schema": "hotlab.command/1", "user": "bob", "token": "\ud800"}).encode(),
    )
    def fuzz(topic: str, payload: bytes) -> None:
        # Hypothesis drives from a worker thread; the service and the broker client run on the loop.
        reply = asyncio.run_coroutine_threadsafe(lab.requester.send(topic, payload), loop).result(60)
        sent.append((topic, reply))
        assert reply["ok"] is False and reply["outcome"] in ("malformed", "unauthorised"), reply
        assert reply["error"]

    reads_before = lab.polls
    await asyncio.to_thread(fuzz)
    oversized = [reply for _topic, reply in sent if "at most 4096 are accepted" in (reply["error"] or "")]
    assert oversized, "the oversized payload must be named as such"
    assert lab.model.cmd_ack_seq == 0 and lab.model.state is StationState.IDLE
    assert lab.polls > reads_before, "the station was polled while the fuzz ran"
    await lab.polling_goes_on()
    records = lab.records()
    assert len(records) == len(sent)
    assert [r.new_value["outcome"] for r in records] == [reply["outcome"] for _topic, reply in sent]
    assert lab.verify() == 0
    # ...and a real command still works afterwards.
    reply = await lab.requester.send(f"{TOPIC}/start_elution", command("alice", {"volume_ml": 2.0}))
    assert reply["outcome"] == "executed" and lab.model.state is StationState.PRIMING


async def test_commands_fail_closed_when_the_audit_trail_cannot_be_written(lab: Lab) -> None:
    lab.audit_path.parent.mkdir(parents=True, exist_ok=True)
    lab.audit_path.write_bytes(b'{"schema": "hotlab.audit/1", "seq": 1, "edited": "by hand"}\n')
    reply = await lab.requester.send(f"{TOPIC}/start_elution", command("alice", {"volume_ml": 5.0}))
    assert reply["outcome"] == "failed" and reply["audit_seq"] is None
    assert "audit trail unavailable (AuditLogCorrupt); command not executed" in reply["error"]
    assert lab.model.cmd_ack_seq == 0 and lab.model.state is StationState.IDLE


@pytest.fixture
async def hanging_station_lab(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Lab]:
    async for running in station_lab(
        tmp_path, mosquitto, monkeypatch, timeout_s=0.5, options={"confirm_timeout_s": 1.0}
    ):
        yield running


async def test_a_command_the_station_ran_but_never_confirmed_is_audited_as_unconfirmed(
    hanging_station_lab: Lab,
) -> None:
    lab = hanging_station_lab
    assert lab.simulator is not None
    lab.simulator.lose_command_replies(1, silent_after=1_000)  # the station acts, then its board hangs
    reply = await lab.requester.send(f"{TOPIC}/start_elution", command("alice", {"volume_ml": 5.0}))
    assert reply["outcome"] == "unconfirmed" and reply["ok"] is False, reply
    assert "unconfirmed" in reply["error"] and "check the station before retrying" in reply["error"]
    assert reply["old_value"] == {"state": "idle"} and reply["new_value"] == {"state": None, "sequence": 1}
    assert lab.model.state is not StationState.IDLE, "it did run: that is why 'unconfirmed' is not 'refused'"
    outcome = lab.records()[-1]
    assert outcome.new_value["outcome"] == "unconfirmed" and outcome.old_value == {"state": "idle"}
    lab.simulator.inject_silence(0)  # the board recovers: polling must pick up again by itself
    await lab.polling_goes_on()
    assert lab.verify() == 0


@pytest.fixture
async def calibrator_lab(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Lab]:
    model = Vik202Simulator(make_chamber("Tc-99m", 740e6, noise_rel=0.002, seed=3))
    host = PtyHost(model)
    url = await host.start()
    device = {"name": "cal-1", "station": "hotcell-1", "family": "vik202", "poll_interval_s": 0.05, "transport": url}
    try:
        async for running in start_lab(tmp_path, mosquitto, monkeypatch, model, device):
            yield running
    finally:
        await host.stop()


async def test_select_nuclide_switches_the_calibrator_over_its_tty_and_is_audited(calibrator_lab: Lab) -> None:
    lab = calibrator_lab
    topic = f"hotlab/{SITE}/hotcell-1/cal-1/cmd/select_nuclide"
    reply = await lab.requester.send(topic, command("bob", {"nuclide": "18F"}, reason="FDG dispensing"))
    assert reply["outcome"] == "executed", reply
    assert reply["old_value"] == {"nuclide": "Tc-99m"} and reply["new_value"] == {"nuclide": "F-18"}
    assert lab.model.factor == 762  # the VIK-202's F-18 calibration factor, set over the pty
    refused = await lab.requester.send(topic, command("bob", {"nuclide": "I-131"}))
    assert refused["outcome"] == "refused" and "no VIK-202 calibration factor configured for I-131" in refused["error"]
    assert lab.model.factor == 762
    wrong_family = await lab.requester.send(
        f"hotlab/{SITE}/hotcell-1/cal-1/cmd/start_elution", command("alice", {"volume_ml": 5.0})
    )
    assert wrong_family["outcome"] == "malformed" and "allowed: select_nuclide" in wrong_family["error"]
    records = lab.records()
    assert [(r.action, r.new_value["outcome"]) for r in records] == [
        ("calibrator.select_nuclide", "requested"),
        ("calibrator.select_nuclide", "executed"),
        ("calibrator.select_nuclide", "requested"),
        ("calibrator.select_nuclide", "refused"),
        ("elution.start", "malformed"),
    ]
    assert records[1].old_value == {"nuclide": "Tc-99m"} and records[1].new_value["result"] == {"nuclide": "F-18"}
    assert lab.verify() == 0
    await lab.polling_goes_on()
