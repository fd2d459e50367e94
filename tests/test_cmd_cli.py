"""`hotlab cmd` end to end, and the broker ACL of examples/mosquitto.acl.

A real Mosquitto applying the shipped ACL file, with a password per broker user; the real
controller service on a real Modbus station simulator, connected as `hotlab-controller`;
`hotlab cmd` as a child process with an admin's config (`hotlab-admin`, the `admin-tool` sender).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest

from hotlab.controller.audit import AuditLog, AuditRecord, iter_records
from hotlab.controller.cli.main import main as hotlab
from hotlab.controller.command_signing import command_body, signed_payload
from hotlab.controller.config import load_config
from hotlab.controller.lab.embedded_broker import write_file
from hotlab.controller.service import ControllerService
from hotlab.controller.users import Credentials, UserStore
from hotlab.drivers.station_registers import StationState
from hotlab.simulators.elution_station import ElutionStationSimulator, StationModel
from tests.cli_process import run_hotlab
from tests.mosquitto_service import AclMosquittoBroker, MqttCollector, require_mosquitto
from tests.test_commands_service import station_model

ACL = Path(__file__).resolve().parent.parent / "examples" / "mosquitto.acl"
SITE = "cmdcli"
TOPIC = f"hotlab/{SITE}/elution-1/gen-1/cmd"
#: The broker users of examples/mosquitto.acl, each with its own password.
BROKER_USERS = {
    name: secrets.token_hex(12) for name in ("hotlab-controller", "hotlab-panel", "hotlab-admin", "dashboard")
}
PASSWORDS = {"carol": "carol-password-0123456789", "alice": "alice-password-0123456789", "bob": "bob-password-0123456"}
PANEL_KEY = secrets.token_bytes(32)
ADMIN_TOOL_KEY = secrets.token_bytes(32)
AUDIT_KEY = secrets.token_hex(32)


def lab_toml(port: int, broker: AclMosquittoBroker, user: str, senders: tuple[str, ...]) -> str:
    """A lab config; the controller's and the admin's differ only in their broker user and the senders they hold."""
    lines = [
        f'[site]\nname = "{SITE}"\n',
        '[[device]]\nname = "gen-1"\nstation = "elution-1"\nfamily = "elution_station"\npoll_interval_s = 0.05',
        f'transport = {{ modbus = "tcp", host = "127.0.0.1", port = {port} }}\n',
        '[outbox]\npath = "outbox.sqlite3"\n[history]\nenabled = false',
        '[service]\nstate_dir = "state"\ndrain_timeout_s = 2.0\nbackoff_initial_s = 0.1\nbackoff_max_s = 1.0\n',
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nclient_id = "ctl-{uuid.uuid4().hex[:8]}"',
        f'username = "{user}"\npassword_env = "TEST_MQTT_{user.upper().replace("-", "_")}"\n',
        '[commands.min_role]\nstart_elution = "qc_officer"\n',
    ]
    lines += [f'[[command_sender]]\nname = "{name}"\nkey_file = "{name}.key"\n' for name in senders]
    return "\n".join(lines)


@dataclass
class Lab:
    directory: Path
    service: ControllerService
    model: StationModel
    broker: AclMosquittoBroker
    dashboard: MqttCollector

    @property
    def audit_path(self) -> Path:
        return self.directory / "state" / "audit.jsonl"

    def records(self) -> list[AuditRecord]:
        return list(iter_records(self.audit_path))

    def command_records(self) -> list[AuditRecord]:
        return [r for r in self.records() if isinstance(r.new_value, dict) and "request_id" in r.new_value]

    async def cmd(self, *args: str) -> tuple[int, str, str]:
        done = await asyncio.to_thread(
            run_hotlab, "cmd", "--config", str(self.directory / "admin.toml"), *args, cwd=self.directory, timeout_s=60
        )
        return done.returncode, done.stdout, done.stderr


def add_accounts(state_dir: Path) -> None:
    """carol (admin), alice (qc_officer), bob (operator): the lab's accounts, their creation in the lab's trail."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with UserStore(state_dir / "users.sqlite3", AuditLog(state_dir / "audit.jsonl", key=AUDIT_KEY.encode())) as store:
        store.add_user("carol", "Carol Admin", "admin", PASSWORDS["carol"], admin=None)
        admin = Credentials("carol", PASSWORDS["carol"])
        store.add_user("alice", "Alice QC", "qc_officer", PASSWORDS["alice"], admin=admin)
        store.add_user("bob", "Bob Operator", "operator", PASSWORDS["bob"], admin=admin)


@pytest.fixture
async def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Lab]:
    require_mosquitto()
    (tmp_path / "mosquitto").mkdir()
    broker = AclMosquittoBroker(workdir=tmp_path / "mosquitto", users=BROKER_USERS, acl_file=ACL)
    await asyncio.to_thread(broker.start)
    simulator = ElutionStationSimulator(station_model())
    _host, port = await simulator.start_tcp("127.0.0.1", 0)
    for user, password in BROKER_USERS.items():
        monkeypatch.setenv(f"TEST_MQTT_{user.upper().replace('-', '_')}", password)
    for user, password in PASSWORDS.items():
        monkeypatch.setenv(f"{user.upper()}_PASSWORD", password)
    monkeypatch.setenv("HOTLAB_AUDIT_KEY", AUDIT_KEY)
    monkeypatch.delenv("HOTLAB_AUDIT_KEY_FILE", raising=False)
    write_file(tmp_path / "panel.key", PANEL_KEY.hex() + "\n", private=True)
    write_file(tmp_path / "admin-tool.key", ADMIN_TOOL_KEY.hex() + "\n", private=True)
    write_file(tmp_path / "lab.toml", lab_toml(port, broker, "hotlab-controller", ("panel", "admin-tool")))
    write_file(tmp_path / "admin.toml", lab_toml(port, broker, "hotlab-admin", ("admin-tool",)))
    await asyncio.to_thread(add_accounts, tmp_path / "state")
    service = ControllerService(load_config(tmp_path / "lab.toml"))
    stop = asyncio.Event()
    reader = MqttCollector(
        broker.host, broker.port, "hotlab/#", "dashboard-1", username="dashboard", password=BROKER_USERS["dashboard"]
    )
    try:
        async with reader:
            task = asyncio.create_task(service.run(stop))
            try:
                await reader.wait_for(
                    lambda: any(p.get("state") == "online" for p in reader.payloads("/controller/status")),
                    30,
                    "the controller online",
                )
                deadline = time.monotonic() + 30
                while not (service.supervisors.get("gen-1") and service.supervisors["gen-1"].up):
                    assert time.monotonic() < deadline, "station never came online"
                    await asyncio.sleep(0.05)
                yield Lab(tmp_path, service, simulator.model, broker, reader)
                assert not task.done(), "the service ended during the test"
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)
    finally:
        await simulator.stop()
        await asyncio.to_thread(broker.close)


async def test_hotlab_cmd_authenticates_signs_publishes_and_prints_the_executed_outcome(lab: Lab) -> None:
    code, out, err = await lab.cmd(
        "--sender", "admin-tool", "--user", "alice", "gen-1", "start_elution",
        "--reason", "Ga-68 for PSMA batch 12", "--arg", "volume_ml=5", "--password-env", "ALICE_PASSWORD",
    )  # fmt: skip
    assert code == 0, err
    [line] = out.splitlines()
    request_id = line.split("(request ")[1].split(",")[0]
    executed, requested = lab.command_records()[-1], lab.command_records()[-2]
    assert line == (
        f"executed: start_elution on elution-1/gen-1 for alice (request {request_id}, audit #{executed.seq}): "
        '{"state": "idle"} -> {"state": "priming", "sequence": 1}'
    )
    assert lab.model.state is StationState.PRIMING and lab.model.requested_volume_ml == 5.0
    for record, outcome in ((requested, "requested"), (executed, "executed")):
        assert (record.actor, record.action, record.reason) == ("alice", "elution.start", "Ga-68 for PSMA batch 12")
        assert record.new_value["outcome"] == outcome and record.new_value["request_id"] == request_id
        assert record.new_value["sender"] == "admin-tool" and record.new_value["role"] == "qc_officer"
        assert record.new_value["args"] == {"volume_ml": 5.0}
    assert hotlab(["audit", "verify", "--path", str(lab.audit_path)]) == 0


async def test_hotlab_cmd_refuses_a_wrong_password_before_signing_and_reports_refusals(lab: Lab) -> None:
    before = len(lab.command_records())
    code, out, err = await lab.cmd(
        "--sender", "admin-tool", "--user", "alice", "gen-1", "start_elution",
        "--reason", "r", "--arg", "volume_ml=5", "--password-env", "BOB_PASSWORD",
    )  # fmt: skip
    assert (code, out) == (1, "") and "hotlab cmd: error: unknown user or wrong password for 'alice'" in err
    failure = lab.records()[-1]
    assert (failure.actor, failure.action) == ("alice", "user.auth_failed")
    assert "signing start_elution on gen-1 with hotlab cmd" in failure.reason
    assert len(lab.command_records()) == before and lab.model.cmd_ack_seq == 0, "nothing was signed or sent"

    code, out, err = await lab.cmd(
        "--sender", "admin-tool", "--user", "bob", "gen-1", "start_elution",
        "--reason", "r", "--args-json", '{"volume_ml": 5}', "--password-env", "BOB_PASSWORD",
    )  # fmt: skip
    assert code == 1, err
    assert out.startswith("unauthorised: start_elution on elution-1/gen-1 for bob (request ")
    assert out.rstrip().endswith("role operator of 'bob' may not run start_elution; it needs qc_officer or higher")
    assert lab.model.cmd_ack_seq == 0

    for bad, problem in (
        (["gen-9", "abort"], "no device 'gen-9' in this lab; devices: gen-1"),
        (["gen-1", "reboot"], "the controller would refuse this command: 'reboot' is not a command for gen-1"),
        (["gen-1", "start_elution", "--arg", "volume=5"], "args of start_elution must be exactly: volume_ml"),
        (["gen-1", "abort", "--arg", "x"], "--arg 'x' is not KEY=VALUE"),
    ):
        code, out, err = await lab.cmd(
            "--sender", "admin-tool", "--user", "bob", *bad, "--reason", "r", "--password-env", "BOB_PASSWORD"
        )
        assert (code, out) == (2, "") and problem in err, (bad, err)
    code, _out, err = await lab.cmd("--sender", "panel", "--user", "bob", "gen-1", "abort", "--reason", "r")
    assert code == 2 and "--sender 'panel' is not a [[command_sender]] of this lab; configured: admin-tool" in err


async def test_the_acl_lets_only_the_panel_and_admin_tools_publish_commands(lab: Lab) -> None:
    """A reader (or the controller's own user) publishing a correctly signed command: the broker drops it."""
    topic = f"{TOPIC}/start_elution"

    def signed(request_id: str) -> bytes:
        body = command_body(user="alice", reason="ACL test", args={"volume_ml": 5.0}, request_id=request_id)
        return signed_payload(topic, body, sender="panel", key=PANEL_KEY)

    for user in ("dashboard", "hotlab-controller"):
        async with aiomqtt.Client(
            lab.broker.host, lab.broker.port, identifier=f"{user}-x", username=user, password=BROKER_USERS[user]
        ) as client:
            await client.publish(topic, signed(f"from-{user}"), qos=1)  # PUBACKed: the broker decided
    async with aiomqtt.Client(
        lab.broker.host, lab.broker.port, identifier="panel-1", username="hotlab-panel",
        password=BROKER_USERS["hotlab-panel"],
    ) as panel:  # fmt: skip
        await panel.subscribe(f"{topic}/reply", qos=1)
        await panel.publish(topic, signed("from-the-panel"), qos=1)
        async with asyncio.timeout(30):
            reply = json.loads(bytes((await anext(aiter(panel.messages))).payload))  # type: ignore[arg-type]
    # Had either earlier command reached the controller, it would have run first and this one been refused.
    assert (reply["request_id"], reply["outcome"]) == ("from-the-panel", "executed"), reply
    assert lab.model.cmd_ack_seq == 1 and lab.service.commands is not None and lab.service.commands.handled == 1
    assert {r.new_value["request_id"] for r in lab.command_records()} == {"from-the-panel"}
    # The reader sees the reply, the status and the audit anchor of the last record (the controller's writes
    # pass the ACL, the outbox behind them flows), and never a command.
    last = lab.records()[-1]
    await lab.dashboard.wait_for(
        lambda: any(a["seq"] == last.seq for a in lab.dashboard.payloads("/controller/audit")), 30, "the anchor"
    )
    topics = [topic for topic, _payload, _retained in lab.dashboard.messages]
    assert any(t.endswith("/gen-1/status") for t in topics) and f"{topic}/reply" in topics
    assert not [t for t in topics if t.split("/")[4:5] == ["cmd"] and not t.endswith("/reply")], topics
