"""Command parsing, authorisation and the [[command_sender]] / [commands] config, without a broker.

Signatures and the migration from tokens are in tests/test_signed_commands.py; the end-to-end
behaviour (real Mosquitto, real Modbus station simulator) in tests/test_commands_service.py.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import json
import logging
import secrets
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hotlab.controller.audit import AuditLog, AuditRecord, iter_records
from hotlab.controller.commands import (
    MAX_PAYLOAD_BYTES,
    Actor,
    Authoriser,
    Claim,
    Command,
    CommandHandler,
    CommandTarget,
    MalformedCommand,
    SignedEnvelope,
    Unauthorised,
    command_topic_filter,
    parse_command,
    parse_topic,
    read_envelope,
    role_key,
)
from hotlab.controller.config import (
    DEFAULT_MIN_ROLE,
    CommandSenderConfig,
    ConfigError,
    DeviceConfig,
    ModbusTcpTransport,
    Secret,
    SerialTransport,
    parse_config,
)
from hotlab.controller.measurement_labels import LabelRefused
from hotlab.controller.users import Credentials, UserStore
from hotlab.drivers.elution_station import CommandOutcome
from hotlab.drivers.station_registers import StationState

SCHEMAS = Path(__file__).resolve().parent.parent / "controller" / "schemas"
STATION = DeviceConfig("gen-1", "elution-1", "elution_station", ModbusTcpTransport("127.0.0.1"))
CALIBRATOR = DeviceConfig("cal-1", "hotcell-1", "vik202", SerialTransport("/dev/ttyUSB0"))
PANEL_KEY = secrets.token_bytes(32)
OTHER_KEY = secrets.token_bytes(32)
SENDERS = (
    CommandSenderConfig("panel", Secret(PANEL_KEY.hex(), "test")),
    CommandSenderConfig("admin-tool", Secret(OTHER_KEY.hex(), "test")),
)
#: The accounts of the `accounts` store: carol the admin who added the others, alice a QC officer, bob an operator.
PASSWORDS = {"carol": "carol-password-0123456789", "alice": "alice-password-0123456789", "bob": "bob-password-012345"}


def now_iso() -> str:
    """Commands built here are issued now, as a console would; the handler's clock is the real one."""
    return datetime.now(UTC).isoformat()


def command(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema": "hotlab.command/2",
        "request_id": "req-1",
        "user": "alice",
        "reason": "morning Ga-68 elution for DOTATATE",
        "issued_at": now_iso(),
        "args": {"volume_ml": 5.0},
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not ...}


def encode(body: Any) -> bytes:
    return json.dumps(body).encode()


def signature(topic: str, text: str, key: bytes = PANEL_KEY) -> str:
    """docs/mqtt.md: HMAC-SHA256 over "hotlab.signed_command/1\n" + topic + "\n" + command text, hex."""
    message = b"hotlab.signed_command/1\n" + topic.encode() + b"\n" + text.encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def signed(topic: str, body: Any, *, sender: str = "panel", key: bytes = PANEL_KEY) -> bytes:
    """The payload a sender publishes: `body` (or a text as is) inside a signed envelope, built from the spec."""
    text = body if isinstance(body, str) else json.dumps(body)
    envelope = {"schema": "hotlab.signed_command/1", "sender": sender, "command": text}
    return encode(envelope | {"signature": signature(topic, text, key)})


@pytest.fixture(scope="module")
def accounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UserStore]:
    """A real user store with PASSWORDS' accounts (its own audit trail, apart from the handlers')."""
    directory = tmp_path_factory.mktemp("accounts")
    with UserStore(directory / "users.sqlite3", AuditLog(directory / "accounts.jsonl")) as store:
        store.add_user("carol", "Carol Admin", "admin", PASSWORDS["carol"], admin=None)
        admin = Credentials("carol", PASSWORDS["carol"])
        store.add_user("alice", "Alice QC", "qc_officer", PASSWORDS["alice"], admin=admin)
        store.add_user("bob", "Bob Operator", "operator", PASSWORDS["bob"], admin=admin)
        yield store


def test_a_valid_start_elution_parses_and_matches_the_published_schema() -> None:
    body = command(issued_at="2026-11-20T13:00:00.5+01:00")
    parsed = parse_command(encode(body), "start_elution", STATION)
    issued_ns = int(datetime(2026, 11, 20, 12, 0, 0, 500_000, tzinfo=UTC).timestamp()) * 10**9 + 500_000_000
    assert parsed == Command(
        "req-1", "alice", "morning Ga-68 elution for DOTATATE", "start_elution", {"volume_ml": 5.0}, issued_ns
    )
    schema = json.loads((SCHEMAS / "command.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(body, schema)
    jsonschema.validate(body["args"], schema["$defs"]["start_elution"])


def test_a_signed_envelope_is_read_strictly_and_matches_the_published_schema() -> None:
    topic = "hotlab/lab/elution-1/gen-1/cmd/start_elution"
    body = command()
    payload = signed(topic, body)
    envelope = read_envelope(payload)
    assert isinstance(envelope, SignedEnvelope) and envelope.sender == "panel"
    assert json.loads(envelope.command) == body and envelope.signature == signature(topic, envelope.command)
    schema = json.loads((SCHEMAS / "signed_command.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(json.loads(payload), schema)


def test_select_nuclide_canonicalises_the_name() -> None:
    parsed = parse_command(encode(command(args={"nuclide": "tc99m"})), "select_nuclide", CALIBRATOR)
    assert parsed.args == {"nuclide": "Tc-99m"}


def test_label_measurement_parses_and_matches_the_published_schema() -> None:
    args = {"measurement_id": "40c6d9045a5c5bdf83b536450e3c6f25", "label": "  patient dose 2026-0412 "}
    body = command(args=args)
    parsed = parse_command(encode(body), "label_measurement", CALIBRATOR)
    assert parsed.args == {"measurement_id": args["measurement_id"], "label": "patient dose 2026-0412"}
    schema = json.loads((SCHEMAS / "command.json").read_text())
    jsonschema.validate(body, schema)
    jsonschema.validate(body["args"], schema["$defs"]["label_measurement"])
    dosage = args | {"prescribed_activity": "370 MBq", "administration_time": "2026-12-04T10:00:00+01:00"}
    parsed = parse_command(encode(command(args=dosage)), "label_measurement", CALIBRATOR)
    assert (parsed.args["prescribed_bq"], parsed.args["administration_ns"]) == (370e6, 1_796_374_800 * 10**9)
    jsonschema.validate(dosage, schema["$defs"]["label_measurement"])
    accuracy = args | {"reference_source": "CO-57-REF"}
    assert parse_command(encode(command(args=accuracy)), "label_measurement", CALIBRATOR).args["reference_source"] == (
        "CO-57-REF"
    )
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(dosage | accuracy, schema["$defs"]["label_measurement"])


@pytest.mark.parametrize(
    ("payload", "action", "device", "message"),
    [
        (b"\xff\xfe", "start_elution", STATION, "not UTF-8 (byte 0)"),
        (b"[1, 2]", "start_elution", STATION, "must be a JSON object, got array"),
        (b'{"schema": 1, "schema": 2}', "start_elution", STATION, "key 'schema' appears twice"),
        (b'{"args": {"volume_ml": NaN}}', "start_elution", STATION, "NaN, which is not JSON"),
        (b"{", "start_elution", STATION, "payload is not JSON"),
        (b"[" * 4000, "start_elution", STATION, "payload nests too deeply"),
        (b"x" * (MAX_PAYLOAD_BYTES + 1), "start_elution", STATION, f"at most {MAX_PAYLOAD_BYTES}"),
        (encode(command(reason=...)), "start_elution", STATION, "missing key(s): reason"),
        (encode(command(extra=1)), "start_elution", STATION, "unknown key(s): extra"),
        (encode(command(schema="hotlab.command/1")), "start_elution", STATION, "schema must be 'hotlab.command/2'"),
        (encode(command(token="a-token-in-a-command")), "start_elution", STATION, "unknown key(s): token"),
        (encode(command(request_id="a b")), "start_elution", STATION, "request_id must be"),
        (encode(command(user="../root")), "start_elution", STATION, "user must be a user name"),
        (encode(command(reason="   ")), "start_elution", STATION, "reason must say why"),
        (encode(command(reason="ok\u0000")), "start_elution", STATION, "control characters"),
        (encode(command(user="\ud800")), "start_elution", STATION, "lone surrogate escape"),
        (encode(command(reason="why \udfff")), "start_elution", STATION, "lone surrogate escape"),
        (encode(command(args={"volume_ml": 5.0, "\udc80": 1})), "start_elution", STATION, "lone surrogate escape"),
        (encode(command(args=[])), "start_elution", STATION, "args must be a JSON object, got array"),
        (encode(command(args={})), "start_elution", STATION, "must be exactly: volume_ml; got: none"),
        (encode(command(args={"volume_ml": "5"})), "start_elution", STATION, "got string"),
        (encode(command(args={"volume_ml": True})), "start_elution", STATION, "got boolean"),
        (encode(command(args={"volume_ml": 0})), "start_elution", STATION, "> 0 and <= 50 mL, got 0"),
        (encode(command(args={"volume_ml": 1e300})), "start_elution", STATION, "<= 50 mL"),
        (encode(command(args={"volume_ml": 5})), "abort", STATION, "args of abort must be exactly: none"),
        (encode(command(args={"nuclide": "Xx-999"})), "select_nuclide", CALIBRATOR, "args.nuclide"),
        (encode(command()), "select_nuclide", STATION, "'select_nuclide' is not a command for gen-1"),
        (encode(command()), "start_elution", CALIBRATOR, "allowed: select_nuclide, label_measurement"),
        (encode(command()), "label_measurement", STATION, "'label_measurement' is not a command for gen-1"),
        (
            encode(command(args={"measurement_id": "ABC", "label": "x"})),
            "label_measurement",
            CALIBRATOR,
            "args.measurement_id must be a measurement's msg_id: 32 lower-case hex digits",
        ),
        (
            encode(command(args={"measurement_id": "0" * 32, "label": "  "})),
            "label_measurement",
            CALIBRATOR,
            "args.label must be text without control characters",
        ),
        (
            encode(command(args={"measurement_id": "0" * 32, "label": "a\tb"})),
            "label_measurement",
            CALIBRATOR,
            "args.label must be text without control characters",
        ),
        (
            encode(command(args={"measurement_id": "0" * 32, "label": "x" * 201})),
            "label_measurement",
            CALIBRATOR,
            "args.label has 201 characters; at most 200",
        ),
        (
            encode(command(args={"measurement_id": "0" * 32})),
            "label_measurement",
            CALIBRATOR,
            "must be one of: label, measurement_id | label, measurement_id, reference_source | "
            "administration_time, label, measurement_id, prescribed_activity; got: measurement_id",
        ),
        (
            encode(
                command(
                    args={
                        "measurement_id": "0" * 32,
                        "label": "x",
                        "prescribed_activity": -1,
                        "administration_time": "x",
                    }
                )
            ),
            "label_measurement",
            CALIBRATOR,
            "args.prescribed_activity must be a positive activity",
        ),
        (
            encode(
                command(
                    args={
                        "measurement_id": "0" * 32,
                        "label": "x",
                        "prescribed_activity": "370 MBq",
                        "administration_time": "10:00",
                    }
                )
            ),
            "label_measurement",
            CALIBRATOR,
            "args.administration_time must be an ISO 8601 time with Z or an offset",
        ),
        (
            encode(
                command(
                    args={
                        "measurement_id": "0" * 32,
                        "label": "x",
                        "prescribed_activity": "370 MBq",
                        "administration_time": "2026-12-04",
                    }
                )
            ),
            "label_measurement",
            CALIBRATOR,
            "args.administration_time must be a date and time with Z or an offset, got the date '2026-12-04'",
        ),
        (encode(command()), "reboot", STATION, "'reboot' is not a command"),
    ],
)
def test_malformed_commands_are_refused_with_the_precise_reason(
    payload: bytes, action: str, device: DeviceConfig, message: str
) -> None:
    with pytest.raises(MalformedCommand) as raised:
        parse_command(payload, action, device)
    assert message in str(raised.value)


#: Unicode controls, format characters and separators (categories Cc, Cf, Zl, Zp).
INVISIBLE = ["\u202e", "\u2066", "\u200b", "\ufeff", "\x85", "\x9b", "\u2028", "\u2029", "\U000e0041"]


@pytest.mark.parametrize("char", INVISIBLE)
def test_labels_reasons_and_sources_refuse_unicode_controls_and_format_characters(char: str) -> None:
    plain = {"measurement_id": "0" * 32, "label": "batch 12"}
    with pytest.raises(MalformedCommand, match="args.label must be text without control characters"):
        parse_command(encode(command(args=plain | {"label": f"dose{char}21"})), "label_measurement", CALIBRATOR)
    with pytest.raises(MalformedCommand, match="reason must not contain control characters"):
        parse_command(encode(command(reason=f"because{char} reasons")), "start_elution", STATION)
    with pytest.raises(MalformedCommand, match="args.reference_source must be text without control characters"):
        parse_command(
            encode(command(args=plain | {"reference_source": f"CO-57{char}"})), "label_measurement", CALIBRATOR
        )
    # Non-ASCII text that is not a control is still fine.
    parsed = parse_command(
        encode(command(args=plain | {"label": "Dosis Müller 6 µSv"})), "label_measurement", CALIBRATOR
    )
    assert parsed.args["label"] == "Dosis Müller 6 µSv"


def test_the_schema_refuses_every_basic_plane_character_the_parser_refuses() -> None:
    import unicodedata

    schema = json.loads((SCHEMAS / "command.json").read_text())
    label = schema["$defs"]["label_measurement"]["properties"]["label"]
    refused = [chr(c) for c in range(0x10000) if unicodedata.category(chr(c)) in {"Cc", "Cf", "Zl", "Zp"}]
    assert "\u202e" in refused and "\x85" in refused
    for char in refused:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(f"a{char}b", label)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(f"a{char}b", schema["properties"]["reason"])
    jsonschema.validate("Dosis Müller 6 µSv", label)


SIGNED_TOPIC = "hotlab/lab/elution-1/gen-1/cmd/start_elution"
GOOD_TEXT = json.dumps(command())


@pytest.mark.parametrize(
    ("envelope", "message"),
    [
        ({"schema": "hotlab.command/2"}, "schema must be 'hotlab.signed_command/1' (a hotlab.command/2 travels inside"),
        ({"sender": "panel", "command": GOOD_TEXT, "signature": "0" * 64}, "missing key(s): schema"),
        (
            {"schema": "hotlab.signed_command/1", "sender": "panel", "command": GOOD_TEXT},
            "missing key(s): signature",
        ),
        (
            {
                "schema": "hotlab.signed_command/1",
                "sender": "panel",
                "command": GOOD_TEXT,
                "signature": "0" * 64,
                "x": 1,
            },
            "unknown key(s): x",
        ),
        (
            {"schema": "hotlab.signed_command/1", "sender": "../panel", "command": GOOD_TEXT, "signature": "0" * 64},
            "sender must be a [[command_sender]] name",
        ),
        (
            {
                "schema": "hotlab.signed_command/1",
                "sender": "panel",
                "command": {"user": "alice"},
                "signature": "0" * 64,
            },
            "command must be a non-empty string, got object",
        ),
        (
            {"schema": "hotlab.signed_command/1", "sender": "panel", "command": GOOD_TEXT, "signature": "A" * 64},
            "signature must be 64 lower-case hex digits",
        ),
        (
            {"schema": "hotlab.signed_command/1", "sender": "panel", "command": GOOD_TEXT, "signature": "0" * 65},
            "signature has 65 characters; at most 64",
        ),
    ],
)
def test_a_malformed_envelope_is_refused_with_the_precise_reason(envelope: dict[str, Any], message: str) -> None:
    with pytest.raises(MalformedCommand) as raised:
        read_envelope(encode(envelope))
    assert message in str(raised.value)


#: Text that may hold lone surrogates: json.dumps writes them as "\ud800" escapes, which JSON allows.
TEXT = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=20)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=5),
    max_leaves=20,
)
#: Envelopes that are nearly right: each key present or not, with a right-ish or random value.
NEAR_MISS = st.fixed_dictionaries(
    {},
    optional={
        "schema": st.sampled_from(["hotlab.command/1", "hotlab.command/2"]) | JSON,
        "request_id": st.sampled_from(["r-1", "", "x" * 65]) | JSON,
        "user": st.sampled_from(["alice", "mallory", ""]) | JSON,
        "reason": st.sampled_from(["because", " "]) | JSON,
        "issued_at": st.builds(now_iso) | st.sampled_from(["2026-11-20T12:00", "yesterday"]) | JSON,
        "args": st.fixed_dictionaries({}, optional={"volume_ml": st.floats() | JSON, "nuclide": JSON}) | JSON,
    },
)


#: Signed envelopes that are nearly right, around nearly right commands.
NEAR_MISS_ENVELOPE = st.fixed_dictionaries(
    {},
    optional={
        "schema": st.sampled_from(["hotlab.signed_command/1", "hotlab.command/2"]) | JSON,
        "sender": st.sampled_from(["panel", "", "x" * 65]) | JSON,
        "command": NEAR_MISS.map(json.dumps) | TEXT | JSON,
        "signature": st.sampled_from(["0" * 64, "0" * 63]) | JSON,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=st.binary(max_size=300) | JSON.map(encode) | NEAR_MISS.map(encode),
    action=st.sampled_from(["start_elution", "abort", "acknowledge_fault", "select_nuclide", "x"]),
    device=st.sampled_from([STATION, CALIBRATOR]),
)
def test_any_command_text_parses_or_raises_a_typed_refusal(payload: bytes, action: str, device: DeviceConfig) -> None:
    try:
        parsed = parse_command(payload, action, device)
    except MalformedCommand as exc:
        assert str(exc)
    else:
        assert parsed.action == action and parsed.reason.strip()
    Claim.read(payload)  # the lenient audit reader never raises either


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=300) | JSON.map(encode) | NEAR_MISS_ENVELOPE.map(encode))
def test_any_envelope_reads_or_raises_a_typed_refusal(payload: bytes) -> None:
    try:
        envelope = read_envelope(payload)
    except MalformedCommand as exc:
        assert str(exc)
    else:
        assert isinstance(envelope, dict) or len(envelope.signature) == 64
    Claim.read(payload)


def test_the_claim_of_a_bad_payload_names_who_and_why_for_the_audit() -> None:
    assert Claim.read(encode(command(args="nonsense"))) == Claim("alice", "morning Ga-68 elution for DOTATATE", "req-1")
    assert Claim.read(b"\xff") == Claim("unknown", "(no reason given)", None)
    assert Claim.read(encode({"user": 7, "request_id": "bad id"})) == Claim("unknown", "(no reason given)", None)
    # Lone surrogates cannot be written to the trail as UTF-8: the claim drops them, keeps the rest.
    assert Claim.read(encode(command(user="\ud800", reason="x\udfff"))) == Claim(
        "unknown", "(no reason given)", "req-1"
    )
    # A signed command's claim: the sender from the envelope, the rest from the command text inside.
    topic = "hotlab/lab/elution-1/gen-1/cmd/abort"
    assert Claim.read(signed(topic, command(args="nonsense"), key=OTHER_KEY)) == Claim(
        "alice", "morning Ga-68 elution for DOTATATE", "req-1", "panel"
    )
    assert Claim.read(signed(topic, "not json", sender="../x")) == Claim("unknown", "(no reason given)", None, None)


def test_topics() -> None:
    assert command_topic_filter("lab") == "hotlab/lab/+/+/cmd/+"
    assert parse_topic("lab", "hotlab/lab/elution-1/gen-1/cmd/abort") == ("elution-1", "gen-1", "abort")
    with pytest.raises(MalformedCommand, match="is not hotlab/lab/<station>/<device>/cmd/<action>"):
        parse_topic("lab", "hotlab/other/elution-1/gen-1/cmd/abort")


# --------------------------------------------------------------------------- authorisation and config


def lab(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {"site": {"name": "lab"}, "outbox": {"path": "outbox.sqlite3"}, **extra}


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("K_PANEL", PANEL_KEY.hex())
    monkeypatch.setenv("K_TOOL", OTHER_KEY.hex())


def test_senders_web_and_min_roles_are_loaded(tmp_path: Path, keys: None, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tool.key").write_text(OTHER_KEY.hex() + "\n")
    monkeypatch.setenv("MQTT_PASSWORD", "broker-password")
    config = parse_config(
        lab(
            tmp_path,
            command_sender=[{"name": "panel", "key_env": "K_PANEL"}, {"name": "admin-tool", "key_file": "tool.key"}],
            web={"sender": "panel"},
            mqtt={"username": "hotlab-controller", "password_env": "MQTT_PASSWORD"},
            commands={"audit_path": "trail/audit.jsonl", "min_role": {"acknowledge_fault": "qc_officer"}},
        ),
        base_dir=tmp_path,
    )
    assert [sender.name for sender in config.senders] == ["panel", "admin-tool"]
    assert config.senders[0].key_bytes() == PANEL_KEY and config.senders[1].key_bytes() == OTHER_KEY
    panel = config.command_sender("panel")
    assert panel is not None and panel.key_bytes() == PANEL_KEY and config.command_sender("nobody") is None
    assert PANEL_KEY.hex() not in repr(config) and OTHER_KEY.hex() not in repr(config)
    # The panel's broker identity is [mqtt]'s unless [web] gives its own.
    assert config.web.sender == "panel" and config.web.mqtt_username == "hotlab-controller"
    assert config.web.mqtt_password is not None and config.web.mqtt_password.reveal() == "broker-password"
    assert config.operators == () and config.commands.accept_token_commands is False
    assert config.commands.resolved_audit_path(tmp_path / "var") == tmp_path / "trail" / "audit.jsonl"
    assert config.commands.min_role == {
        "start_elution": "operator",
        "abort": "operator",
        "acknowledge_fault": "qc_officer",
        "select_nuclide": "operator",
        "label_measurement": "operator",
        "label_accuracy": "qc_officer",
        "label_dosage": "operator",
        "start_qc": "operator",
        "qc_baseline": "qc_officer",
    }
    monkeypatch.setenv("PANEL_MQTT_PASSWORD", "panel-password")
    own = parse_config(
        lab(
            tmp_path,
            command_sender=[{"name": "panel", "key_env": "K_PANEL"}],
            web={"sender": "panel", "mqtt_username": "hotlab-panel", "mqtt_password_env": "PANEL_MQTT_PASSWORD"},
            mqtt={"username": "hotlab-controller", "password_env": "MQTT_PASSWORD"},
        ),
        base_dir=tmp_path,
    )
    assert own.web.mqtt_username == "hotlab-panel" and own.web.mqtt_password is not None
    assert own.web.mqtt_password.reveal() == "panel-password"
    default = parse_config(lab(tmp_path), base_dir=tmp_path)
    assert default.senders == () and default.web.sender is None and default.web.mqtt_username is None
    assert default.commands.resolved_audit_path(default.service.state_dir) == tmp_path / "var" / "audit.jsonl"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"command_sender": [{"name": "panel", "key": PANEL_KEY.hex()}]},
            "command_sender[0].key: secrets are not accepted inline",
        ),
        ({"command_sender": [{"name": "panel"}]}, "command_sender[0]: needs key_env or key_file"),
        (
            {"command_sender": [{"name": "panel", "key_env": "K_SHORT"}]},
            "command_sender[0].key_env: the key from $K_SHORT has 16 bytes; at least 32 are needed",
        ),
        (
            {"command_sender": [{"name": "panel", "key_env": "K_ODD"}]},
            "command_sender[0].key_env: the key from $K_ODD is not hex text",
        ),
        (
            {"command_sender": [{"name": "panel", "key_env": "K_NOT_HEX"}]},
            "command_sender[0].key_env: the key from $K_NOT_HEX is not hex text",
        ),
        (
            {"command_sender": [{"name": "panel", "key_env": "K_PANEL"}, {"name": "panel", "key_env": "K_TOOL"}]},
            "command_sender[1].name: duplicate command sender 'panel'",
        ),
        (
            {"command_sender": [{"name": "panel", "key_env": "K_PANEL"}, {"name": "tool", "key_env": "K_PANEL_UPPER"}]},
            "command_sender[1].key_env: the key from $K_PANEL_UPPER is also the key of sender 'panel'",
        ),
        (
            {"command_sender": [{"name": "a/b", "key_env": "K_PANEL"}]},
            "command_sender[0].name: 'a/b'",
        ),
        (
            {"command_sender": [{"name": "panel", "key_env": "K_PANEL"}], "web": {"sender": "nobody"}},
            "web.sender: no [[command_sender]] is named 'nobody'; configured: panel",
        ),
        ({"web": {"mqtt_password_env": "K_PANEL"}}, "web.mqtt_username: is required"),
        ({"web": {"port": 8080}}, "web.port: unknown key"),
        (
            {"operator": [{"name": "alice", "role": "operator", "token_env": "K_PANEL"}]},
            "operator[0]: tokens in command payloads are no longer accepted (every subscriber can read them): "
            "give each sender a [[command_sender]] key and sign commands, see docs/mqtt.md#migrating-from-tokens",
        ),
        ({"commands": {"min_role": {"start_elution": "superuser"}}}, "commands.min_role.start_elution: 'superuser'"),
        ({"commands": {"min_role": {"reboot": "admin"}}}, "commands.min_role.reboot: unknown key"),
        ({"commands": {"audit": "x"}}, "did you mean 'audit_path'"),
        ({"commands": {"accept_token_commands": "yes"}}, "commands.accept_token_commands"),
    ],
)
def test_bad_sender_web_or_command_config_is_refused_precisely(
    tmp_path: Path, keys: None, monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any], message: str
) -> None:
    monkeypatch.setenv("K_SHORT", "ab" * 16)
    monkeypatch.setenv("K_ODD", PANEL_KEY.hex() + "a")
    monkeypatch.setenv("K_NOT_HEX", "zz" * 32)
    monkeypatch.setenv("K_PANEL_UPPER", PANEL_KEY.hex().upper())
    with pytest.raises(ConfigError) as raised:
        parse_config(lab(tmp_path, **extra), base_dir=tmp_path)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    for secret in (PANEL_KEY.hex(), "ab" * 16, "zz" * 32):
        assert secret not in str(raised.value)


def attempt(user: str, action: str = "start_elution", args: dict[str, Any] | None = None) -> Command:
    return Command("r", user, "why", action, args or {}, time.time_ns())


async def test_a_label_is_authorised_by_what_it_asks_for(tmp_path: Path, accounts: UserStore) -> None:
    """An accuracy verdict needs label_accuracy (qc_officer by default), a dosage label_dosage."""
    plain = {"measurement_id": "a" * 32, "label": "batch 12"}
    accuracy = plain | {"reference_source": "CO-57-REF"}
    dosage = plain | {"prescribed_activity": "370 MBq", "administration_time": "2026-12-04T10:00:00Z"}

    def label(user: str, args: dict[str, Any]) -> Command:
        return parse_command(encode(command(args=args, user=user)), "label_measurement", CALIBRATOR)

    default = Authoriser(DEFAULT_MIN_ROLE, senders=SENDERS, accounts=accounts)
    for args in (plain, dosage, accuracy):
        assert await default.authorise_person(label("alice", args), "panel") == Actor("alice", "qc_officer", "panel")
    for args in (plain, dosage):
        assert (await default.authorise_person(label("bob", args), "panel")).name == "bob"
    with pytest.raises(Unauthorised) as raised:
        await default.authorise_person(label("bob", accuracy), "panel")
    assert "may not run label_measurement (label_accuracy); it needs qc_officer" in str(raised.value)

    config = parse_config(
        lab(tmp_path, commands={"min_role": {"label_dosage": "qc_officer", "label_accuracy": "operator"}}),
        base_dir=tmp_path,
    )
    configured = Authoriser(config.commands.min_role, senders=SENDERS, accounts=accounts)
    assert (await configured.authorise_person(label("bob", accuracy), "panel")).name == "bob"
    assert (await configured.authorise_person(label("bob", plain), "panel")).name == "bob"
    with pytest.raises(Unauthorised, match="label_dosage"):
        await configured.authorise_person(label("bob", dosage), "panel")


async def test_the_authoriser_needs_an_account_and_a_role_high_enough(accounts: UserStore) -> None:
    authoriser = Authoriser(DEFAULT_MIN_ROLE | {"start_elution": "qc_officer"}, senders=SENDERS, accounts=accounts)
    assert await authoriser.authorise_person(attempt("alice"), "admin-tool") == Actor(
        "alice", "qc_officer", "admin-tool"
    )
    assert (await authoriser.authorise_person(attempt("bob", "abort"), "panel")).role == "operator"
    for user, expected in [
        ("mallory", "user 'mallory' has no account in the lab's user store"),
        ("Alice", "user 'Alice' has no account"),
        ("bob", "role operator of 'bob' may not run start_elution; it needs qc_officer or higher"),
    ]:
        with pytest.raises(Unauthorised) as raised:
            await authoriser.authorise_person(attempt(user), "panel")
        assert expected in str(raised.value)


# --------------------------------------------------------------------------- the handler, on a real audit trail

CMD = "hotlab/lab/elution-1/gen-1/cmd"


class RecordingStation:
    """The StationControl a handler drives, answering like a station; records what reached it.

    The real station over Modbus is in tests/test_commands_service.py; here the subject is what
    the handler lets through, so every call that arrives is a call that would reach the device.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.state = StationState.IDLE
        self.reached = asyncio.Event()
        self.hang = False

    async def _run(self, action: str, new_state: StationState, user: str, reason: str) -> CommandOutcome:
        self.calls.append(action)
        self.reached.set()
        if self.hang:
            await asyncio.Event().wait()  # a station that never answers: the command is cut off mid-way
        old, self.state = self.state, new_state
        return CommandOutcome(action, "elution-1", user, reason, 0, 0, len(self.calls), old, new_state)

    async def start_elution(self, volume_ml: float, *, user: str, reason: str) -> CommandOutcome:
        return await self._run("start_elution", StationState.PRIMING, user, reason)

    async def abort(self, *, user: str, reason: str) -> CommandOutcome:
        return await self._run("abort", StationState.IDLE, user, reason)

    async def acknowledge_fault(self, *, user: str, reason: str) -> CommandOutcome:
        return await self._run("acknowledge_fault", StationState.IDLE, user, reason)


class Console:
    """A handler on an audit trail with one station, and every reply it published; the panel signs."""

    def __init__(self, audit: AuditLog, accounts: UserStore, station: RecordingStation | None = None) -> None:
        self.audit = audit
        self.station = station or RecordingStation()
        self.online = True
        self.replies: list[dict[str, Any]] = []
        target = CommandTarget(STATION, self.station, lambda: self.online)
        self.handler = CommandHandler(
            "lab",
            Authoriser(DEFAULT_MIN_ROLE, senders=SENDERS, accounts=accounts),
            audit,
            self._publish,
            lambda name: target if name == "gen-1" else None,
        )

    async def _publish(self, topic: str, reply: dict[str, Any]) -> bool:
        assert topic.endswith("/reply")
        self.replies.append(reply)
        return True

    async def send(self, action: str, request_id: str, user: str = "alice", **changes: Any) -> dict[str, Any]:
        args = {"volume_ml": 5.0} if action == "start_elution" else {}
        body = command(request_id=request_id, user=user, args=args, **changes)
        topic = f"{CMD}/{action}"
        return await self.handler.handle(topic, signed(topic, body))

    def outcomes(self) -> list[tuple[str, str, str]]:
        return [(r.actor, r.action, r.new_value["outcome"]) for r in iter_records(self.audit.path)]


@pytest.fixture
def trail(tmp_path: Path) -> AuditLog:
    return AuditLog(tmp_path / "audit.jsonl")


async def test_a_reused_request_id_for_another_command_is_refused_not_answered(
    trail: AuditLog, accounts: UserStore
) -> None:
    console = Console(trail, accounts)
    started = await console.send("start_elution", "r1")
    assert started["outcome"] == "executed"
    abort = await console.send("abort", "r1")
    assert abort["outcome"] == "malformed" and abort["duplicate"] is False and abort["ok"] is False
    assert "request_id 'r1' already used for a different command" in abort["error"]
    assert console.station.calls == ["start_elution"], "the abort was neither sent nor may it be reported as done"
    stolen = await console.send("start_elution", "r1", user="bob")
    assert stolen["outcome"] == "malformed" and stolen["new_value"] is None, "bob must not get alice's result"
    same = await console.send("start_elution", "r1")
    assert same["duplicate"] is True and same["outcome"] == "executed" and same["new_value"] == started["new_value"]
    assert console.station.calls == ["start_elution"]
    assert console.outcomes() == [
        ("alice", "elution.start", "requested"),
        ("alice", "elution.start", "executed"),
        ("alice", "elution.abort", "malformed"),
        ("bob", "elution.start", "malformed"),
        ("alice", "elution.start", "duplicate"),
    ]


async def test_a_restarted_handler_remembers_request_ids_from_the_audit_trail(
    trail: AuditLog, accounts: UserStore
) -> None:
    before = Console(trail, accounts)
    assert (await before.send("start_elution", "r1"))["outcome"] == "executed"
    before.station.hang = True
    before.station.reached.clear()
    cut_off = asyncio.create_task(before.send("abort", "r2"))
    await asyncio.wait_for(before.station.reached.wait(), 30)
    cut_off.cancel()  # the controller dies after sending, before it learns or records the outcome
    await asyncio.gather(cut_off, return_exceptions=True)
    assert before.station.calls == ["start_elution", "abort"]

    after = Console(trail, accounts)
    again = await after.send("start_elution", "r1")
    assert again["duplicate"] is True and again["outcome"] == "executed" and again["new_value"]["sequence"] == 1
    assert [r.new_value.get("first_audit_seq") for r in iter_records(trail.path)][-1] == 2  # the executed record
    unknown = await after.send("abort", "r2")
    assert unknown["duplicate"] is True and unknown["outcome"] == "unconfirmed"
    assert "check it before sending a new request_id" in unknown["error"]
    reused = await after.send("abort", "r1")
    assert reused["outcome"] == "malformed" and "already used for a different command" in reused["error"]
    assert after.station.calls == [], "nothing may run twice across a restart"


async def test_refusals_that_never_reached_the_device_are_not_remembered(trail: AuditLog, accounts: UserStore) -> None:
    console = Console(trail, accounts)
    console.online = False
    offline = await console.send("start_elution", "r1")
    assert offline["outcome"] == "refused" and "offline" in offline["error"]
    console.online = True
    assert (await console.send("start_elution", "r1"))["outcome"] == "executed"

    good_trail = trail.path.read_bytes()
    trail.path.write_bytes(good_trail + b'{"edited": "by hand"}\n')
    failed = await console.send("acknowledge_fault", "r2")
    assert failed["outcome"] == "failed" and "audit trail unavailable" in failed["error"]
    trail.path.write_bytes(good_trail)
    assert (await console.send("acknowledge_fault", "r2"))["outcome"] == "executed"

    await console.handler.close()
    stopping = await console.send("abort", "r3")
    assert stopping["outcome"] == "refused" and "shutting down" in stopping["error"]
    restarted = Console(trail, accounts, console.station)  # the trail says "not sent": the restarted handler runs it
    assert (await restarted.send("abort", "r3"))["outcome"] == "executed"
    assert console.station.calls == ["start_elution", "acknowledge_fault", "abort"]


class RecordingCalibrator:
    """The CalibratorControl a handler drives: a nuclide switch and a label store that refuses unknown ids."""

    def __init__(self) -> None:
        self.labels: list[tuple[str, str, str, str]] = []

    async def select_nuclide(self, nuclide: str) -> tuple[str | None, str]:
        return "Tc-99m", nuclide

    async def label_measurement(self, measurement_id: str, label: str, *, user: str, request_id: str) -> dict[str, Any]:
        if measurement_id != "a" * 32:
            raise LabelRefused(f"no measurement {measurement_id} of cal-1 is known to this controller")
        self.labels.append((measurement_id, label, user, request_id))
        return {"measurement_id": measurement_id, "label": label, "record": "b" * 32}


async def test_a_label_is_audited_like_select_nuclide_and_needs_no_device_online(
    trail: AuditLog, accounts: UserStore
) -> None:
    calibrator = RecordingCalibrator()
    target = CommandTarget(CALIBRATOR, calibrator, lambda: False)  # the calibrator is offline
    authoriser = Authoriser(DEFAULT_MIN_ROLE, senders=SENDERS, accounts=accounts)
    handler = CommandHandler("lab", authoriser, trail, _accept_reply, lambda name: target)
    topic = "hotlab/lab/hotcell-1/cal-1/cmd"

    async def send(action: str, args: dict[str, Any], request_id: str) -> dict[str, Any]:
        return await handler.handle(
            f"{topic}/{action}", signed(f"{topic}/{action}", command(request_id=request_id, args=args))
        )

    labelled = await send("label_measurement", {"measurement_id": "a" * 32, "label": "batch 12"}, "l1")
    assert labelled["outcome"] == "executed" and labelled["old_value"] is None
    assert labelled["new_value"] == {"measurement_id": "a" * 32, "label": "batch 12", "record": "b" * 32}
    assert calibrator.labels == [("a" * 32, "batch 12", "alice", "l1")]
    again = await send("label_measurement", {"measurement_id": "a" * 32, "label": "batch 12"}, "l1")
    assert again["duplicate"] is True and len(calibrator.labels) == 1  # a re-sent request id never labels twice
    unknown = await send("label_measurement", {"measurement_id": "c" * 32, "label": "batch 12"}, "l2")
    assert unknown["outcome"] == "refused" and "no measurement cccc" in unknown["error"]
    offline = await send("select_nuclide", {"nuclide": "F-18"}, "n1")
    assert offline["outcome"] == "refused" and "offline" in offline["error"]
    records = list(iter_records(trail.path))
    assert [(r.action, r.new_value["outcome"]) for r in records] == [
        ("measurement.label", "requested"),
        ("measurement.label", "executed"),
        ("measurement.label", "duplicate"),
        ("measurement.label", "requested"),
        ("measurement.label", "refused"),
        ("calibrator.select_nuclide", "requested"),
        ("calibrator.select_nuclide", "refused"),
    ]
    assert records[1].new_value["result"]["label"] == "batch 12" and records[1].reason == command()["reason"]
    assert records[4].new_value["sent"] is False  # nothing was stored: a retry of l2 runs again


async def _accept_reply(topic: str, reply: dict[str, Any]) -> bool:
    return True


class FlakyAuditLog(AuditLog):
    """A trail on a disk that is full for the next `failures` appends (ENOSPC), then has room again."""

    def __init__(self, path: Path, failures: int) -> None:
        super().__init__(path)
        self.failures = failures

    def append(self, **entry: Any) -> AuditRecord:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().append(**entry)


async def test_abort_runs_when_its_intent_cannot_be_audited_and_is_audited_afterwards(
    tmp_path: Path, accounts: UserStore, caplog: pytest.LogCaptureFixture
) -> None:
    trail = FlakyAuditLog(tmp_path / "audit.jsonl", failures=1)
    console = Console(trail, accounts)
    start = await console.send("start_elution", "r1")
    assert start["outcome"] == "failed" and console.station.calls == [], "everything but abort fails closed"

    trail.failures = 2  # the intent record and the first try of the outcome record
    abort = await console.send("abort", "r2")
    assert abort["outcome"] == "executed" and console.station.calls == ["abort"]
    assert any(
        "abort on 'elution-1/gen-1' by alice runs WITHOUT its intent record" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR
    )
    [record] = list(iter_records(trail.path))
    assert abort["audit_seq"] == record.seq == 1
    assert record.action == "elution.abort" and record.new_value["outcome"] == "executed"
    assert record.new_value["intent_record"] == "not written (OSError)"


async def test_topic_levels_are_logged_quoted_so_a_newline_cannot_forge_a_log_line(
    trail: AuditLog, accounts: UserStore, caplog: pytest.LogCaptureFixture
) -> None:
    console = Console(trail, accounts)
    topic = f"{CMD}/abort\nINFO command abort executed"
    reply = await console.handler.handle(topic, signed(topic, command()))
    assert reply["outcome"] == "malformed"
    assert caplog.records and all("\n" not in r.getMessage() for r in caplog.records)


HANDLER_TOPICS = st.sampled_from(
    [f"{CMD}/{action}" for action in ("start_elution", "abort", "acknowledge_fault", "select_nuclide", "reboot")]
    + ["hotlab/lab/elution-1/other/cmd/abort", "hotlab/elsewhere/x/y/cmd/abort", "x"]
)
#: Mostly valid commands (the station is a recorder), so executions, duplicates, reused ids and malformed
#: values all occur; strings may carry lone surrogates. Each is signed for one of the topics, by a sender
#: with its key or the other's, so good and bad signatures occur too.
HANDLER_COMMANDS = (
    st.fixed_dictionaries(
        {
            "schema": st.just("hotlab.command/2"),
            "request_id": st.sampled_from(["r1", "r2", "r3"]),
            "user": st.sampled_from(["alice", "bob", "mallory"]) | TEXT,
            "reason": st.just("because") | TEXT,
            "issued_at": st.builds(now_iso),
            "args": st.sampled_from([{}, {"volume_ml": 5.0}]) | JSON,
        }
    )
    | NEAR_MISS
)
HANDLER_PAYLOADS = (
    st.builds(
        lambda topic, body, sender, key: signed(topic, body, sender=sender, key=key),
        HANDLER_TOPICS,
        HANDLER_COMMANDS,
        st.sampled_from(["panel", "admin-tool", "stranger"]),
        st.sampled_from([PANEL_KEY, OTHER_KEY]),
    )
    | NEAR_MISS_ENVELOPE.map(encode)
    | st.binary(max_size=100)
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(st.tuples(HANDLER_TOPICS, HANDLER_PAYLOADS, st.booleans()), min_size=1, max_size=4))
@example(messages=[(f"{CMD}/abort", signed(f"{CMD}/abort", command(args={}, user="\ud800")), False)])
@example(messages=[(f"{CMD}/abort", signed(f"{CMD}/abort", command(args={}, reason="why \udfff")), False)])
@example(messages=[(f"{CMD}/abort", encode({"schema": "hotlab.signed_command/1", "sender": "\ud800"}), False)])
def test_every_submitted_message_gets_exactly_one_reply_and_an_audit_record(
    accounts: UserStore, messages: list[tuple[str, bytes, bool]]
) -> None:
    async def run(directory: str) -> None:
        audit = AuditLog(Path(directory) / "audit.jsonl")
        for topic, payload, retain in messages:
            console = Console(audit, accounts)  # a fresh handler per message: each also recalls the trail
            records_before = len(list(iter_records(audit.path)))
            await console.handler.submit(topic, payload, retain)
            await console.handler.close()
            assert len(console.replies) == 1, (topic, payload)
            assert len(list(iter_records(audit.path))) > records_before, (topic, payload)

    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(run(directory))


async def test_odd_records_in_the_trail_do_not_stop_the_handler_from_recalling_it(
    trail: AuditLog, accounts: UserStore
) -> None:
    for odd in (
        {"authenticated": True, "request_id": "r1", "command": "abort", "outcome": ["executed"]},
        {"authenticated": True, "request_id": ["r1"], "command": "abort", "outcome": "executed"},
        {"authenticated": True, "request_id": "r1", "outcome": "executed"},
        "a note",
        None,
    ):
        trail.append(
            actor="hotlab", action="qc.manual_entry", target="elution-1/gen-1", reason="other records", new_value=odd
        )
    console = Console(trail, accounts)
    assert (await console.send("abort", "r1"))["outcome"] == "executed"
    assert console.station.calls == ["abort"]


def _iso_seconds_from_now(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


@pytest.mark.parametrize(
    ("offset_s", "why"),
    [(-31.0, "s ago; commands older than 30 s are not run"), (31.0, "s ahead of the controller's clock")],
)
async def test_a_command_issued_outside_the_window_is_refused_as_expired_and_audited(
    trail: AuditLog, accounts: UserStore, offset_s: float, why: str
) -> None:
    """A captured command replayed later, or one a broker queued for an offline client, must not run."""
    console = Console(trail, accounts)
    reply = await console.send("start_elution", "r-old", issued_at=_iso_seconds_from_now(offset_s))
    assert reply["outcome"] == "expired" and reply["ok"] is False
    assert why in reply["error"]
    assert console.station.calls == []
    assert console.outcomes() == [("alice", "elution.start", "expired")]
    fresh = await console.send("start_elution", "r-new", issued_at=_iso_seconds_from_now(-29.0))
    assert fresh["outcome"] == "executed" and console.station.calls == ["start_elution"]


async def test_the_window_is_configurable_and_a_resent_id_is_answered_at_any_age(
    trail: AuditLog, accounts: UserStore
) -> None:
    console = Console(trail, accounts)
    console.handler.max_age_s = 5.0
    assert (await console.send("start_elution", "r1", issued_at=_iso_seconds_from_now(-6.0)))["outcome"] == "expired"
    assert (await console.send("start_elution", "r2"))["outcome"] == "executed"
    # Re-sending r2 a minute later only repeats its answer: nothing runs, so its age does not matter.
    again = await console.send("start_elution", "r2", issued_at=_iso_seconds_from_now(-60.0))
    assert again["duplicate"] is True and again["outcome"] == "executed"
    assert console.station.calls == ["start_elution"]


@pytest.mark.parametrize("issued_at", ["2026-11-20T12:00", "2026-11-20", "yesterday", 1_796_000_000_000_000_000, None])
def test_issued_at_must_be_an_iso_time_with_an_offset(issued_at: Any) -> None:
    with pytest.raises(MalformedCommand, match="issued_at"):
        parse_command(encode(command(issued_at=issued_at)), "start_elution", STATION)


async def test_a_command_whose_window_closes_while_its_intent_is_audited_does_not_run(
    trail: AuditLog, accounts: UserStore
) -> None:
    """Fresh when it arrived, stale once the intent record was on disk: checked again before the device."""
    console = Console(trail, accounts)
    issued = datetime.now(UTC)
    readings_of_the_clock = iter([0.0, 31.0])  # seconds after issued_at: at arrival, then before sending

    def clock_ns() -> int:
        return int((issued.timestamp() + next(readings_of_the_clock, 31.0)) * 1e9)

    console.handler._clock_ns = clock_ns
    reply = await console.send("start_elution", "r-slow", issued_at=issued.isoformat())
    assert reply["outcome"] == "expired" and console.station.calls == []
    assert console.outcomes() == [("alice", "elution.start", "requested"), ("alice", "elution.start", "expired")]


async def test_start_qc_and_end_qc_are_parsed_strictly_and_a_baseline_needs_a_qc_officer(
    accounts: UserStore,
) -> None:
    """start_qc names a procedure and its one subject; a baseline is a QC officer's record (qc_baseline)."""

    def qc(action: str, user: str, args: dict[str, Any]) -> Command:
        return parse_command(encode(command(args=args, user=user)), action, CALIBRATOR)

    daily = qc("start_qc", "bob", {"procedure": "daily_constancy", "source": "CS-1"})
    baseline = qc("start_qc", "bob", {"procedure": "baseline", "source": "CS-1"})
    linearity = qc("start_qc", "alice", {"procedure": "linearity", "nuclide": "99mTc"})
    assert linearity.args == {"procedure": "linearity", "nuclide": "Tc-99m"}
    assert qc("end_qc", "bob", {}).args == {}
    authoriser = Authoriser(DEFAULT_MIN_ROLE, senders=SENDERS, accounts=accounts)
    assert (await authoriser.authorise_person(daily, "panel")).name == "bob"
    assert (await authoriser.authorise_person(qc("end_qc", "bob", {"procedure": "baseline"}), "panel")).name == "bob"
    assert (await authoriser.authorise_person(qc("start_qc", "alice", baseline.args), "panel")).name == "alice"
    with pytest.raises(Unauthorised, match=r"may not run start_qc \(qc_baseline\); it needs qc_officer"):
        await authoriser.authorise_person(baseline, "panel")
    for args, problem in (
        ({"procedure": "baseline"}, "start_qc of baseline needs args.source and nothing else; got: procedure"),
        ({"procedure": "daily_constancy", "elution_id": "a" * 32}, "start_qc of daily_constancy needs args.source"),
        ({"procedure": "ge68_breakthrough", "elution_id": "12"}, "args.elution_id must be an elution's msg_id"),
        ({"procedure": "constancy", "source": "X"}, "args.procedure must be one of"),
        ({"source": "X"}, "args.procedure is missing"),
        ({"procedure": "linearity", "nuclide": "Xx-1"}, "args.nuclide"),
    ):
        with pytest.raises(MalformedCommand, match=problem):
            qc("start_qc", "bob", args)


async def test_start_qc_of_geometry_sleeves_and_ga68_identity_parse_and_match_the_schema(accounts: UserStore) -> None:
    """The geometries are listed reference first; sleeves come from the config; a half-life may name its elution."""
    schema = json.loads((SCHEMAS / "command.json").read_text())

    def parsed(args: dict[str, Any]) -> Command:
        return parse_command(encode(command(args=args, user="bob")), "start_qc", CALIBRATOR)

    def start(args: dict[str, Any]) -> dict[str, Any]:
        found = parsed(args).args
        jsonschema.validate(args, schema["$defs"]["start_qc"])
        return found

    geometry = {"procedure": "geometry", "nuclide": "99mTc", "geometries": [" vial 10 mL", "syringe 3 mL "]}
    sleeves = {"procedure": "sleeve_linearity", "nuclide": "Tc-99m"}
    identity = {"procedure": "ga68_half_life"}
    assert start(geometry) == {
        "procedure": "geometry",
        "nuclide": "Tc-99m",
        "geometries": ["vial 10 mL", "syringe 3 mL"],
    }
    assert start(sleeves) == sleeves
    assert start(identity) == identity
    assert start(identity | {"elution_id": "e" * 32}) == identity | {"elution_id": "e" * 32}
    kept = {"procedure": "ge68_breakthrough", "elution_id": "e" * 32, "aliquot_fraction": 0.1}
    assert start(kept) == kept  # the part of the eluate kept for the Ge-68 follow-up
    for fraction in (0, 1.5, True, "half"):
        with pytest.raises(MalformedCommand, match="args.aliquot_fraction must be the part of the eluate measured"):
            parsed(kept | {"aliquot_fraction": fraction})
    with pytest.raises(MalformedCommand, match="start_qc of ga68_half_life needs"):
        parsed(identity | {"aliquot_fraction": 0.5})
    # Each is an operator's start_qc, like a decay series: only a baseline is a QC officer's record.
    authoriser = Authoriser(DEFAULT_MIN_ROLE, senders=SENDERS, accounts=accounts)
    for args in (geometry, sleeves, identity):
        assert role_key(parsed(args)) == "start_qc"
        assert (await authoriser.authorise_person(parsed(args), "panel")).name == "bob"
    for args, problem in (
        ({"procedure": "geometry", "nuclide": "Tc-99m"}, "start_qc of geometry needs args.geometries, args.nuclide"),
        ({"procedure": "geometry", "nuclide": "Tc-99m", "geometries": ["vial"]}, "reference geometry and 1 to 12"),
        ({"procedure": "geometry", "nuclide": "Tc-99m", "geometries": "vial"}, "got string"),
        ({"procedure": "geometry", "nuclide": "Tc-99m", "geometries": [f"v{n}" for n in range(14)]}, "got 14 item"),
        ({"procedure": "geometry", "nuclide": "Tc-99m", "geometries": ["vial", " vial"]}, "'vial' is listed twice"),
        ({"procedure": "geometry", "nuclide": "Tc-99m", "geometries": ["vial", 3]}, r"geometries\[1\] must be"),
        ({"procedure": "geometry", "nuclide": "Tc-99m", "geometries": ["vial", "a\u202eb"]}, "control characters"),
        ({"procedure": "sleeve_linearity", "nuclide": "Tc-99m", "source": "X"}, "needs args.nuclide and nothing"),
        ({"procedure": "ga68_half_life", "nuclide": "Ga-68"}, r"no argument besides procedure \(args.elution_id"),
    ):
        with pytest.raises(MalformedCommand, match=problem):
            start(args)
