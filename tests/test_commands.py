"""Command parsing, authorisation and the [[operator]] / [commands] config, without a broker.

The end-to-end behaviour (real Mosquitto, real Modbus station simulator) is in
tests/test_commands_service.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.commands import (
    MAX_PAYLOAD_BYTES,
    Authoriser,
    Claim,
    Command,
    MalformedCommand,
    Unauthorised,
    command_topic_filter,
    parse_command,
    parse_topic,
)
from controller.config import (
    ConfigError,
    DeviceConfig,
    ModbusTcpTransport,
    SerialTransport,
    parse_config,
)

SCHEMAS = Path(__file__).resolve().parent.parent / "controller" / "schemas"
STATION = DeviceConfig("gen-1", "elution-1", "elution_station", ModbusTcpTransport("127.0.0.1"))
CALIBRATOR = DeviceConfig("cal-1", "hotcell-1", "vik202", SerialTransport("/dev/ttyUSB0"))
ALICE_TOKEN = "alice-token-0123456789abcdef"
BOB_TOKEN = "bob-token-0123456789abcdef"


def command(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"schema": "hotlab.command/1", "request_id": "req-1", "user": "alice",
                            "token": ALICE_TOKEN, "reason": "morning Ga-68 elution for DOTATATE",
                            "args": {"volume_ml": 5.0}}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not ...}


def encode(body: Any) -> bytes:
    return json.dumps(body).encode()


def test_a_valid_start_elution_parses_and_matches_the_published_schema() -> None:
    body = command()
    parsed = parse_command(encode(body), "start_elution", STATION)
    assert parsed == Command("req-1", "alice", ALICE_TOKEN, "morning Ga-68 elution for DOTATATE", "start_elution",
                             {"volume_ml": 5.0})
    schema = json.loads((SCHEMAS / "command.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(body, schema)
    jsonschema.validate(body["args"], schema["$defs"]["start_elution"])


def test_select_nuclide_canonicalises_the_name() -> None:
    parsed = parse_command(encode(command(args={"nuclide": "tc99m"})), "select_nuclide", CALIBRATOR)
    assert parsed.args == {"nuclide": "Tc-99m"}


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
        (encode(command(schema="hotlab.command/2")), "start_elution", STATION, "schema must be 'hotlab.command/1'"),
        (encode(command(request_id="a b")), "start_elution", STATION, "request_id must be"),
        (encode(command(user="../root")), "start_elution", STATION, "user must be an operator name"),
        (encode(command(reason="   ")), "start_elution", STATION, "reason must say why"),
        (encode(command(reason="ok\u0000")), "start_elution", STATION, "control characters"),
        (encode(command(args=[])), "start_elution", STATION, "args must be a JSON object, got array"),
        (encode(command(args={})), "start_elution", STATION, "must be exactly: volume_ml; got: none"),
        (encode(command(args={"volume_ml": "5"})), "start_elution", STATION, "got string"),
        (encode(command(args={"volume_ml": True})), "start_elution", STATION, "got boolean"),
        (encode(command(args={"volume_ml": 0})), "start_elution", STATION, "> 0 and <= 50 mL, got 0"),
        (encode(command(args={"volume_ml": 1e300})), "start_elution", STATION, "<= 50 mL"),
        (encode(command(args={"volume_ml": 5})), "abort", STATION, "args of abort must be exactly: none"),
        (encode(command(args={"nuclide": "Xx-999"})), "select_nuclide", CALIBRATOR, "args.nuclide"),
        (encode(command()), "select_nuclide", STATION, "'select_nuclide' is not a command for gen-1"),
        (encode(command()), "start_elution", CALIBRATOR, "allowed: select_nuclide"),
        (encode(command()), "reboot", STATION, "'reboot' is not a command"),
    ],
)
def test_malformed_commands_are_refused_with_the_precise_reason(payload: bytes, action: str, device: DeviceConfig,
                                                                message: str) -> None:
    with pytest.raises(MalformedCommand) as raised:
        parse_command(payload, action, device)
    assert message in str(raised.value)


@pytest.mark.parametrize("token", [..., "", None])
def test_a_command_without_a_token_is_unauthorised_not_malformed(token: Any) -> None:
    with pytest.raises(Unauthorised, match="carries no token"):
        parse_command(encode(command(token=token)), "start_elution", STATION)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
#: Envelopes that are nearly right: each key present or not, with a right-ish or random value.
NEAR_MISS = st.fixed_dictionaries({}, optional={
    "schema": st.sampled_from(["hotlab.command/1", "hotlab.command/2"]) | JSON,
    "request_id": st.sampled_from(["r-1", "", "x" * 65]) | JSON,
    "user": st.sampled_from(["alice", "mallory", ""]) | JSON,
    "token": st.sampled_from([ALICE_TOKEN, "guess"]) | JSON,
    "reason": st.sampled_from(["because", " "]) | JSON,
    "args": st.fixed_dictionaries({}, optional={"volume_ml": st.floats() | JSON, "nuclide": JSON}) | JSON,
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=300) | JSON.map(encode) | NEAR_MISS.map(encode),
       action=st.sampled_from(["start_elution", "abort", "acknowledge_fault", "select_nuclide", "x"]),
       device=st.sampled_from([STATION, CALIBRATOR]))
def test_any_payload_parses_or_raises_a_typed_refusal(payload: bytes, action: str, device: DeviceConfig) -> None:
    try:
        parsed = parse_command(payload, action, device)
    except (MalformedCommand, Unauthorised) as exc:
        assert str(exc)
    else:
        assert parsed.action == action and parsed.reason.strip() and parsed.token
    Claim.read(payload)  # the lenient audit reader never raises either


def test_the_claim_of_a_bad_payload_names_who_and_why_for_the_audit() -> None:
    assert Claim.read(encode(command(args="nonsense"))) == Claim("alice", "morning Ga-68 elution for DOTATATE", "req-1")
    assert Claim.read(b"\xff") == Claim("unknown", "(no reason given)", None)
    assert Claim.read(encode({"user": 7, "request_id": "bad id"})) == Claim("unknown", "(no reason given)", None)


def test_topics() -> None:
    assert command_topic_filter("lab") == "hotlab/lab/+/+/cmd/+"
    assert parse_topic("lab", "hotlab/lab/elution-1/gen-1/cmd/abort") == ("elution-1", "gen-1", "abort")
    with pytest.raises(MalformedCommand, match="is not hotlab/lab/<station>/<device>/cmd/<action>"):
        parse_topic("lab", "hotlab/other/elution-1/gen-1/cmd/abort")


# --------------------------------------------------------------------------- authorisation and config


def lab(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {"site": {"name": "lab"}, "outbox": {"path": "outbox.sqlite3"}, **extra}


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T_ALICE", ALICE_TOKEN)
    monkeypatch.setenv("T_BOB", BOB_TOKEN)


def test_operators_and_min_roles_are_loaded(tmp_path: Path, tokens: None) -> None:
    (tmp_path / "carol.token").write_text("carol-token-0123456789abcdef\n")
    config = parse_config(lab(tmp_path, operator=[
        {"name": "alice", "role": "qc_officer", "token_env": "T_ALICE"},
        {"name": "bob", "role": "operator", "token_env": "T_BOB"},
        {"name": "carol", "role": "admin", "token_file": "carol.token"},
    ], commands={"audit_path": "trail/audit.jsonl", "min_role": {"acknowledge_fault": "qc_officer"}}),
        base_dir=tmp_path)
    assert [(o.name, o.role) for o in config.operators] == [("alice", "qc_officer"), ("bob", "operator"),
                                                             ("carol", "admin")]
    assert config.operators[2].token.reveal() == "carol-token-0123456789abcdef"
    assert ALICE_TOKEN not in repr(config)
    assert config.commands.resolved_audit_path(tmp_path / "var") == tmp_path / "trail" / "audit.jsonl"
    assert config.commands.min_role == {"start_elution": "operator", "abort": "operator",
                                        "acknowledge_fault": "qc_officer", "select_nuclide": "operator"}
    default = parse_config(lab(tmp_path), base_dir=tmp_path)
    assert default.operators == ()
    assert default.commands.resolved_audit_path(default.service.state_dir) == tmp_path / "var" / "audit.jsonl"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"operator": [{"name": "alice", "role": "operator", "token": "inline-secret-123456"}]},
         "operator[0].token: secrets are not accepted inline"),
        ({"operator": [{"name": "alice", "role": "root", "token_env": "T_ALICE"}]},
         "operator[0].role: 'root' is not allowed; allowed: operator, qc_officer, admin"),
        ({"operator": [{"name": "alice", "role": "operator"}]}, "operator[0]: needs token_env or token_file"),
        ({"operator": [{"name": "alice", "role": "operator", "token_env": "T_SHORT"}]},
         "operator[0].token_env: the token from $T_SHORT has 5 characters; at least 16"),
        ({"operator": [{"name": "alice", "role": "operator", "token_env": "T_ALICE"},
                       {"name": "alice", "role": "admin", "token_env": "T_BOB"}]}, "duplicate operator 'alice'"),
        ({"operator": [{"name": "alice", "role": "operator", "token_env": "T_ALICE"},
                       {"name": "bob", "role": "admin", "token_env": "T_ALICE"}]}, "the same token as 'alice'"),
        ({"commands": {"min_role": {"start_elution": "superuser"}}}, "commands.min_role.start_elution: 'superuser'"),
        ({"commands": {"min_role": {"reboot": "admin"}}}, "commands.min_role.reboot: unknown key"),
        ({"commands": {"audit": "x"}}, "did you mean 'audit_path'"),
    ],
)
def test_bad_operator_or_command_config_is_refused_precisely(tmp_path: Path, tokens: None,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             extra: dict[str, Any], message: str) -> None:
    monkeypatch.setenv("T_SHORT", "short")
    with pytest.raises(ConfigError) as raised:
        parse_config(lab(tmp_path, **extra), base_dir=tmp_path)
    assert message in str(raised.value)
    assert ALICE_TOKEN not in str(raised.value)


def test_authoriser_checks_user_token_and_role(tmp_path: Path, tokens: None) -> None:
    config = parse_config(lab(tmp_path, operator=[
        {"name": "alice", "role": "qc_officer", "token_env": "T_ALICE"},
        {"name": "bob", "role": "operator", "token_env": "T_BOB"},
    ], commands={"min_role": {"start_elution": "qc_officer"}}), base_dir=tmp_path)
    authoriser = Authoriser(config.operators, config.commands.min_role)

    def attempt(user: str, token: str, action: str = "start_elution") -> Command:
        return Command("r", user, token, "why", action, {})

    assert authoriser.authorise(attempt("alice", ALICE_TOKEN)).name == "alice"
    assert authoriser.authorise(attempt("bob", BOB_TOKEN, "abort")).role == "operator"
    for user, token, expected in [("alice", BOB_TOKEN, "not authenticated"), ("mallory", ALICE_TOKEN, "not authenticated"),
                                  ("alice", ALICE_TOKEN[:-1], "not authenticated"),
                                  ("bob", BOB_TOKEN, "role operator of 'bob' may not run start_elution; it needs qc_officer")]:
        with pytest.raises(Unauthorised) as raised:
            authoriser.authorise(attempt(user, token))
        assert expected in str(raised.value)
        assert token not in str(raised.value)
