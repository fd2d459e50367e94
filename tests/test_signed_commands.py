"""Signed commands: the signature, what it refuses, the people it may run for, and the migration from tokens.

The signature is recomputed here from its definition (docs/mqtt.md, "Signed commands"):
HMAC-SHA256 (RFC 2104, FIPS 198-1) keyed with the sender's key, over the UTF-8 bytes of
"hotlab.signed_command/1\\n" + topic + "\\n" + command text, written as lower-case hex.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from hotlab.controller.audit import AuditLog, iter_records
from hotlab.controller.command_signing import (
    MAX_PAYLOAD_BYTES,
    MIN_KEY_BYTES,
    SIGNED_SCHEMA,
    command_body,
    sender_key,
    signature_matches,
    signed_payload,
)
from hotlab.controller.commands import TOKENS_REFUSED, Authoriser, CommandHandler, CommandTarget
from hotlab.controller.config import DEFAULT_MIN_ROLE, ConfigError, OperatorConfig, Secret, parse_config
from hotlab.controller.users import AccessDenied, Credentials, UserStore
from hotlab.physics.utc_time import parse_utc_ns
from tests.test_commands import (
    CMD,
    OTHER_KEY,
    PANEL_KEY,
    SENDERS,
    STATION,
    RecordingStation,
    command,
    encode,
    signed,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "mqtt.md"
ALICE_TOKEN = "alice-token-0123456789abcdef"
BOB_TOKEN = "bob-token-0123456789abcdef"
PASSWORD = "a-password-of-20-chars"


def spec_signature(key: bytes, topic: str, text: str) -> str:
    return hmac.new(key, f"hotlab.signed_command/1\n{topic}\n{text}".encode(), hashlib.sha256).hexdigest()


def test_a_signed_payload_carries_the_command_text_and_its_hmac_over_topic_and_text() -> None:
    topic = f"{CMD}/start_elution"
    body = command(reason="Ga-68 für PSMA")  # non-ASCII: the signed bytes are the text's UTF-8
    payload = json.loads(signed_payload(topic, body, sender="panel", key=PANEL_KEY))
    assert set(payload) == {"schema", "sender", "command", "signature"}
    assert payload["schema"] == SIGNED_SCHEMA == "hotlab.signed_command/1" and payload["sender"] == "panel"
    assert json.loads(payload["command"]) == body
    assert payload["signature"] == spec_signature(PANEL_KEY, topic, payload["command"])
    assert signature_matches(PANEL_KEY, topic, payload["command"], payload["signature"])
    assert not signature_matches(OTHER_KEY, topic, payload["command"], payload["signature"])
    assert not signature_matches(PANEL_KEY, f"{CMD}/abort", payload["command"], payload["signature"])
    assert not signature_matches(PANEL_KEY, topic, payload["command"], "\ud800" + payload["signature"][1:])


def test_the_worked_example_in_the_docs_is_right() -> None:
    """docs/mqtt.md shows a key, a topic, a command text and the signature of it: recompute it."""
    text = DOCS.read_text()
    found = {
        name: re.search(rf"^{name} *= *(.+)$", text, re.MULTILINE) for name in ("key", "topic", "command", "signature")
    }
    assert all(found.values()), found
    key, topic, command_text, claimed = (match.group(1).strip() for match in found.values() if match is not None)
    assert len(bytes.fromhex(key)) == MIN_KEY_BYTES
    assert claimed == spec_signature(bytes.fromhex(key), topic, command_text)
    # The payload shown beside it is that command and that signature.
    payload = re.search(r"^(\{\"schema\":\"hotlab.signed_command/1\".*\})$", text, re.MULTILINE)
    assert payload is not None
    assert json.loads(payload.group(1)) == {
        "schema": SIGNED_SCHEMA,
        "sender": "panel",
        "command": command_text,
        "signature": claimed,
    }


def test_command_body_makes_a_fresh_command_2_issued_now() -> None:
    before = time.time_ns()
    body = command_body(user="alice", reason="morning elution", args={"volume_ml": 5})
    after = time.time_ns()
    assert set(body) == {"schema", "request_id", "user", "reason", "issued_at", "args"}
    assert body["schema"] == "hotlab.command/2" and body["user"] == "alice" and body["args"] == {"volume_ml": 5}
    assert uuid.UUID(hex=body["request_id"]).version == 4
    assert before // 1000 <= parse_utc_ns(body["issued_at"]) // 1000 <= after // 1000
    assert command_body(user="a", reason="r", args={})["request_id"] != body["request_id"]
    given = command_body(user="alice", reason="r", args={}, request_id="req-7", issued_ns=0)
    assert given["request_id"] == "req-7" and parse_utc_ns(given["issued_at"]) == 0


def test_signing_refuses_a_short_key_and_a_command_the_controller_would_not_accept() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes, this one has 31"):
        signed_payload(f"{CMD}/abort", command(), sender="panel", key=PANEL_KEY[:31])
    with pytest.raises(ValueError, match=f"at most {MAX_PAYLOAD_BYTES}"):
        signed_payload(f"{CMD}/abort", command(reason="x" * MAX_PAYLOAD_BYTES), sender="panel", key=PANEL_KEY)
    assert sender_key(PANEL_KEY.hex().upper()) == PANEL_KEY
    for text, problem in (("ab" * 31, "has 31 bytes"), ("abc", "not hex text"), ("g" * 64, "not hex text")):
        with pytest.raises(ValueError, match=problem):
            sender_key(text)


# --------------------------------------------------------------------------- the handler refuses


@pytest.fixture
def accounts(tmp_path: Path) -> Iterator[UserStore]:
    """alice (operator), dave (operator, to be disabled), erin (operator, locked after 2 wrong passwords)."""
    with UserStore(tmp_path / "users.sqlite3", AuditLog(tmp_path / "accounts.jsonl"), max_failed_passwords=2) as store:
        store.add_user("carol", "Carol Admin", "admin", PASSWORD, admin=None)
        admin = Credentials("carol", PASSWORD)
        for name in ("alice", "dave", "erin"):
            store.add_user(name, name.title(), "operator", PASSWORD, admin=admin)
        yield store


class Lab:
    """A handler on a real audit trail and a real user store, with a station that records what reaches it."""

    def __init__(self, tmp_path: Path, authoriser: Authoriser) -> None:
        self.station = RecordingStation()
        self.trail = AuditLog(tmp_path / "audit.jsonl")
        self.replies: list[dict[str, Any]] = []
        target = CommandTarget(STATION, self.station, lambda: True)
        self.handler = CommandHandler("lab", authoriser, self.trail, self._publish, lambda name: target)

    async def _publish(self, topic: str, reply: dict[str, Any]) -> bool:
        self.replies.append(reply)
        return True

    async def send(self, action: str, payload: bytes) -> dict[str, Any]:
        return await self.handler.handle(f"{CMD}/{action}", payload)

    def records(self) -> list[tuple[str, str, dict[str, Any]]]:
        return [(r.actor, r.new_value["outcome"], r.new_value) for r in iter_records(self.trail.path)]


@pytest.fixture
def lab(tmp_path: Path, accounts: UserStore) -> Lab:
    return Lab(tmp_path, Authoriser(DEFAULT_MIN_ROLE, senders=SENDERS, accounts=accounts))


async def test_a_correctly_signed_command_runs_and_the_trail_names_the_person_and_the_sender(lab: Lab) -> None:
    topic = f"{CMD}/start_elution"
    reply = await lab.send("start_elution", signed(topic, command(), sender="admin-tool", key=OTHER_KEY))
    assert reply["outcome"] == "executed" and lab.station.calls == ["start_elution"]
    (actor, outcome, detail), (_, executed, _) = lab.records()
    assert (actor, outcome, executed) == ("alice", "requested", "executed")
    assert detail["authenticated"] is True and detail["sender"] == "admin-tool" and detail["role"] == "operator"


async def test_a_signature_over_another_topic_sender_key_or_text_is_refused_and_never_says_which(lab: Lab) -> None:
    start = f"{CMD}/start_elution"
    body = command()
    text = json.dumps(body)
    tampered = json.loads(signed(start, text))
    tampered["command"] = text.replace('"volume_ml": 5.0', '"volume_ml": 50.0')
    attempts = {
        "signed for abort": signed(f"{CMD}/abort", body),
        "signed for another device": signed("hotlab/lab/elution-2/gen-2/cmd/start_elution", body),
        "signed for another site": signed("hotlab/other/elution-1/gen-1/cmd/start_elution", body),
        "another sender's key": signed(start, body, sender="panel", key=OTHER_KEY),
        "a sender named as another": signed(start, body, sender="admin-tool", key=PANEL_KEY),
        "an unknown sender": signed(start, body, sender="stranger", key=PANEL_KEY),
        "tampered command text": encode(tampered),
    }
    for what, payload in attempts.items():
        reply = await lab.send("start_elution", payload)
        assert reply["outcome"] == "unauthorised" and reply["ok"] is False, (what, reply)
        sender = json.loads(payload)["sender"]
        assert reply["error"] == (
            f"the command from sender {sender!r} is not authenticated: unknown sender, or a signature that is "
            "not that sender's over this topic and command"
        ), what
    assert lab.station.calls == [], "nothing may reach the station"
    records = lab.records()
    assert [(actor, outcome) for actor, outcome, _ in records] == [("alice", "unauthorised")] * len(attempts)
    assert [detail["sender"] for _, _, detail in records] == [json.loads(p)["sender"] for p in attempts.values()]
    assert all(detail["authenticated"] is False for _, _, detail in records)


async def test_an_unsigned_command_is_malformed(lab: Lab) -> None:
    reply = await lab.send("start_elution", encode(command()))
    assert reply["outcome"] == "malformed" and "schema must be 'hotlab.signed_command/1'" in reply["error"]
    assert lab.station.calls == []


async def test_a_disabled_locked_or_unknown_person_is_refused_whoever_signs(lab: Lab, accounts: UserStore) -> None:
    accounts.disable("dave", admin=Credentials("carol", PASSWORD), reason="left the lab")
    for _ in range(2):  # max_failed_passwords = 2
        with pytest.raises(AccessDenied):
            accounts.authenticate(Credentials("erin", "not her password"), purpose="test")
    erin = accounts.user("erin")
    assert erin is not None and erin.locked_until_ns is not None
    until = datetime.fromtimestamp(erin.locked_until_ns // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    topic = f"{CMD}/abort"
    expected = {
        "dave": "the account 'dave' is disabled",
        "erin": f"the account 'erin' is locked until {until} UTC after failed password checks",
        "mallory": "user 'mallory' has no account in the lab's user store",
    }
    for user, error in expected.items():
        reply = await lab.send("abort", signed(topic, command(user=user, args={}, request_id=f"r-{user}")))
        assert (reply["outcome"], reply["error"]) == ("unauthorised", error)
    assert lab.station.calls == []
    assert [(actor, outcome, detail["sender"]) for actor, outcome, detail in lab.records()] == [
        ("dave", "unauthorised", "panel"),
        ("erin", "unauthorised", "panel"),
        ("mallory", "unauthorised", "panel"),
    ]
    assert (await lab.send("abort", signed(topic, command(args={}, request_id="r-alice"))))["outcome"] == "executed"


async def test_without_a_user_store_every_signed_command_fails_closed(tmp_path: Path) -> None:
    lab = Lab(tmp_path, Authoriser(DEFAULT_MIN_ROLE, senders=SENDERS, accounts=None))
    reply = await lab.send("abort", signed(f"{CMD}/abort", command(args={})))
    assert reply["outcome"] == "failed" and "user store could not be opened" in reply["error"]
    assert lab.station.calls == []


# --------------------------------------------------------------------------- migrating from tokens


def token_command(user: str = "alice", token: str | None = ALICE_TOKEN, **changes: Any) -> bytes:
    body = command(user=user, schema="hotlab.command/1", **changes)
    return encode(body if token is None else body | {"token": token})


OPERATORS = (
    OperatorConfig("alice", "operator", Secret(ALICE_TOKEN, "test")),
    OperatorConfig("bob", "operator", Secret(BOB_TOKEN, "test")),
)


async def test_a_token_command_is_refused_by_default_and_its_token_is_never_repeated(
    tmp_path: Path, accounts: UserStore, caplog: pytest.LogCaptureFixture
) -> None:
    lab = Lab(tmp_path, Authoriser(DEFAULT_MIN_ROLE, senders=SENDERS, accounts=accounts, operators=OPERATORS))
    reply = await lab.send("start_elution", token_command())
    assert reply["outcome"] == "unauthorised"
    assert reply["error"] == (
        "tokens in payloads are no longer accepted: sign commands, see docs/mqtt.md#migrating-from-tokens"
    )
    assert reply["error"] == TOKENS_REFUSED
    assert lab.station.calls == []
    [(actor, outcome, detail)] = lab.records()
    assert (actor, outcome, detail["authenticated"]) == ("alice", "unauthorised", False)
    for text in (lab.trail.path.read_text(), json.dumps(lab.replies), caplog.text):
        assert ALICE_TOKEN not in text


async def test_with_the_migration_switch_a_token_command_runs_with_a_warning_each_time(
    tmp_path: Path, accounts: UserStore, caplog: pytest.LogCaptureFixture
) -> None:
    authoriser = Authoriser(
        DEFAULT_MIN_ROLE, senders=SENDERS, accounts=accounts, operators=OPERATORS, accept_token_commands=True
    )
    lab = Lab(tmp_path, authoriser)
    caplog.set_level(logging.WARNING, logger="hotlab.controller.commands")
    first = await lab.send("start_elution", token_command(request_id="t1"))
    second = await lab.send("abort", token_command(user="bob", token=BOB_TOKEN, request_id="t2", args={}))
    assert (first["outcome"], second["outcome"]) == ("executed", "executed")
    assert lab.station.calls == ["start_elution", "abort"]
    warnings = [r.getMessage() for r in caplog.records if "carries a token in its payload" in r.getMessage()]
    assert len(warnings) == 2 and all("docs/mqtt.md#migrating-from-tokens" in w for w in warnings)
    refused = {
        "wrong token": await lab.send("abort", token_command(token=BOB_TOKEN, request_id="t3", args={})),
        "unknown user": await lab.send("abort", token_command(user="mallory", request_id="t4", args={})),
        "no token": await lab.send("abort", token_command(token=None, request_id="t5", args={})),
    }
    assert [reply["outcome"] for reply in refused.values()] == ["unauthorised"] * 3
    assert "not authenticated: unknown user or wrong token" in refused["wrong token"]["error"]
    assert "carries no token" in refused["no token"]["error"]
    executed = [detail for _, outcome, detail in lab.records() if outcome == "executed"]
    assert [detail["sender"] for detail in executed] == [None, None]  # no sender vouched: the token did
    # Signed commands still run beside them.
    signed_abort = signed(f"{CMD}/abort", command(args={}, request_id="s1"))
    assert (await lab.send("abort", signed_abort))["outcome"] == "executed"
    for text in (lab.trail.path.read_text(), json.dumps(lab.replies), caplog.text):
        assert ALICE_TOKEN not in text and BOB_TOKEN not in text


def test_operators_load_only_with_the_migration_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T_ALICE", ALICE_TOKEN)
    monkeypatch.setenv("T_BOB", BOB_TOKEN)
    monkeypatch.setenv("T_SHORT", "short")
    (tmp_path / "carol.token").write_text("carol-token-0123456789abcdef\n")
    operators = [
        {"name": "alice", "role": "qc_officer", "token_env": "T_ALICE"},
        {"name": "carol", "role": "admin", "token_file": "carol.token"},
    ]
    base = {"site": {"name": "lab"}, "outbox": {"path": "outbox.sqlite3"}}
    with pytest.raises(ConfigError, match=r"operator\[0\]: .*see docs/mqtt.md#migrating-from-tokens"):
        parse_config(base | {"operator": operators}, base_dir=tmp_path)
    migrating = base | {"commands": {"accept_token_commands": True}}
    config = parse_config(migrating | {"operator": operators}, base_dir=tmp_path)
    assert config.commands.accept_token_commands is True
    assert [(o.name, o.role) for o in config.operators] == [("alice", "qc_officer"), ("carol", "admin")]
    assert config.operators[1].token.reveal() == "carol-token-0123456789abcdef" and ALICE_TOKEN not in repr(config)
    for bad, message in (
        ([{"name": "alice", "role": "operator", "token": "inline-secret-123456"}], "secrets are not accepted inline"),
        ([{"name": "alice", "role": "root", "token_env": "T_ALICE"}], "'root' is not allowed"),
        ([{"name": "alice", "role": "operator"}], "operator[0]: needs token_env or token_file"),
        ([{"name": "alice", "role": "operator", "token_env": "T_SHORT"}], "has 5 characters; at least 16"),
        (
            [{"name": "alice", "role": "operator", "token_env": "T_ALICE"}] * 2,
            "duplicate operator 'alice'",
        ),
        (
            [
                {"name": "alice", "role": "operator", "token_env": "T_ALICE"},
                {"name": "bob", "role": "admin", "token_env": "T_ALICE"},
            ],
            "the same token as 'alice'",
        ),
    ):
        with pytest.raises(ConfigError) as raised:
            parse_config(migrating | {"operator": bad}, base_dir=tmp_path)
        assert message in str(raised.value) and ALICE_TOKEN not in str(raised.value)


# --------------------------------------------------------------------------- the simulated lab


async def test_the_simulated_lab_signs_its_consoles_commands_and_holds_no_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its operator's elutions run as demo-operator, vouched for by the operator console's key; the web
    panel gets a sender of its own; no [[operator]] token is anywhere."""
    from hotlab.controller.lab.simulated_lab import SimGenerator, SimLab, simulated_lab
    from hotlab.controller.service import ControllerService
    from tests.mosquitto_service import require_mosquitto

    require_mosquitto()
    monkeypatch.delenv("HOTLAB_AUDIT_KEY", raising=False)
    monkeypatch.delenv("HOTLAB_AUDIT_KEY_FILE", raising=False)
    # One Ge-68/Ga-68 station eluted every 30 s of station time at 30x: once a second.
    generator = SimGenerator("gen-sim", "elution-1", "ge68", "GE68-SIGNED-1", 1.85e9, 30.0, 30.0, 5.0)
    lab = SimLab(site="signed-lab", calibrators=(), generators=(generator,), check_source=None, acceleration=30.0)
    async with simulated_lab(tmp_path, lab) as config:
        assert config.operators == () and config.commands.accept_token_commands is False
        assert [sender.name for sender in config.senders] == ["operator-console", "panel"]
        assert config.web.sender == "panel" and config.command_sender("panel") is not None
        for sender in config.senders:
            key_file = tmp_path / f"{sender.name}.key"
            assert key_file.stat().st_mode & 0o777 == 0o600 and len(sender.key_bytes()) == 32
        audit = config.commands.resolved_audit_path(config.service.state_dir)
        store_path = config.users.resolved_path(audit)
        with UserStore(store_path, AuditLog(tmp_path / "unused.jsonl")) as store:
            accounts = {user.username: (user.role, user.status) for user in store.users()}
        assert accounts == {
            "demo-admin": ("admin", "active"),
            "demo-operator": ("operator", "active"),
            "demo-qc-officer": ("qc_officer", "active"),
        }
        assert all((store_path.parent / f"{name}.password").stat().st_mode & 0o777 == 0o600 for name in accounts)
        stop = asyncio.Event()
        service = ControllerService(config)
        task = asyncio.create_task(service.run(stop))
        try:
            async with asyncio.timeout(60):
                while not [
                    r
                    for r in (iter_records(audit) if audit.exists() else [])
                    if r.new_value.get("outcome") == "executed"
                ]:
                    await asyncio.sleep(0.2)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    executed = [r for r in iter_records(audit) if r.new_value.get("outcome") == "executed"]
    assert {(r.actor, r.action, r.new_value["sender"]) for r in executed} == {
        ("demo-operator", "elution.start", "operator-console")
    }
    assert not list(tmp_path.rglob("*.token"))
