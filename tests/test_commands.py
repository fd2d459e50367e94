"""Command parsing, authorisation and the [[operator]] / [commands] config, without a broker.

The end-to-end behaviour (real Mosquitto, real Modbus station simulator) is in
tests/test_commands_service.py.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import tempfile
import time
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
    Authoriser,
    Claim,
    Command,
    CommandHandler,
    CommandTarget,
    MalformedCommand,
    Unauthorised,
    command_topic_filter,
    parse_command,
    parse_topic,
    role_key,
)
from hotlab.controller.config import (
    DEFAULT_MIN_ROLE,
    ConfigError,
    DeviceConfig,
    ModbusTcpTransport,
    OperatorConfig,
    Secret,
    SerialTransport,
    parse_config,
)
from hotlab.controller.measurement_labels import LabelRefused
from hotlab.drivers.elution_station import CommandOutcome
from hotlab.drivers.station_registers import StationState

SCHEMAS = Path(__file__).resolve().parent.parent / "controller" / "schemas"
STATION = DeviceConfig("gen-1", "elution-1", "elution_station", ModbusTcpTransport("127.0.0.1"))
CALIBRATOR = DeviceConfig("cal-1", "hotcell-1", "vik202", SerialTransport("/dev/ttyUSB0"))
ALICE_TOKEN = "alice-token-0123456789abcdef"
BOB_TOKEN = "bob-token-0123456789abcdef"


def now_iso() -> str:
    """Commands built here are issued now, as a console would; the handler's clock is the real one."""
    return datetime.now(UTC).isoformat()


def command(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema": "hotlab.command/1",
        "request_id": "req-1",
        "user": "alice",
        "token": ALICE_TOKEN,
        "reason": "morning Ga-68 elution for DOTATATE",
        "issued_at": now_iso(),
        "args": {"volume_ml": 5.0},
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not ...}


def encode(body: Any) -> bytes:
    return json.dumps(body).encode()


def test_a_valid_start_elution_parses_and_matches_the_published_schema() -> None:
    body = command(issued_at="2026-11-20T13:00:00.5+01:00")
    parsed = parse_command(encode(body), "start_elution", STATION)
    issued_ns = int(datetime(2026, 11, 20, 12, 0, 0, 500_000, tzinfo=UTC).timestamp()) * 10**9 + 500_000_000
    assert parsed == Command(
        "req-1",
        "alice",
        ALICE_TOKEN,
        "morning Ga-68 elution for DOTATATE",
        "start_elution",
        {"volume_ml": 5.0},
        issued_ns,
    )
    schema = json.loads((SCHEMAS / "command.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(body, schema)
    jsonschema.validate(body["args"], schema["$defs"]["start_elution"])


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
        (encode(command(schema="hotlab.command/2")), "start_elution", STATION, "schema must be 'hotlab.command/1'"),
        (encode(command(request_id="a b")), "start_elution", STATION, "request_id must be"),
        (encode(command(user="../root")), "start_elution", STATION, "user must be an operator name"),
        (encode(command(reason="   ")), "start_elution", STATION, "reason must say why"),
        (encode(command(reason="ok\u0000")), "start_elution", STATION, "control characters"),
        (encode(command(token="\ud800")), "start_elution", STATION, "lone surrogate escape"),
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


@pytest.mark.parametrize("token", [..., "", None])
def test_a_command_without_a_token_is_unauthorised_not_malformed(token: Any) -> None:
    with pytest.raises(Unauthorised, match="carries no token"):
        parse_command(encode(command(token=token)), "start_elution", STATION)


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
        "token": st.sampled_from([ALICE_TOKEN, "guess"]) | JSON,
        "reason": st.sampled_from(["because", " "]) | JSON,
        "issued_at": st.builds(now_iso) | st.sampled_from(["2026-11-20T12:00", "yesterday"]) | JSON,
        "args": st.fixed_dictionaries({}, optional={"volume_ml": st.floats() | JSON, "nuclide": JSON}) | JSON,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=st.binary(max_size=300) | JSON.map(encode) | NEAR_MISS.map(encode),
    action=st.sampled_from(["start_elution", "abort", "acknowledge_fault", "select_nuclide", "x"]),
    device=st.sampled_from([STATION, CALIBRATOR]),
)
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
    # Lone surrogates cannot be written to the trail as UTF-8: the claim drops them, keeps the rest.
    assert Claim.read(encode(command(user="\ud800", reason="x\udfff"))) == Claim(
        "unknown", "(no reason given)", "req-1"
    )


def test_the_repr_of_a_command_hides_its_token() -> None:
    parsed = parse_command(encode(command()), "start_elution", STATION)
    assert ALICE_TOKEN not in repr(parsed) and ALICE_TOKEN not in str(parsed)
    assert "req-1" in repr(parsed)


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
    config = parse_config(
        lab(
            tmp_path,
            operator=[
                {"name": "alice", "role": "qc_officer", "token_env": "T_ALICE"},
                {"name": "bob", "role": "operator", "token_env": "T_BOB"},
                {"name": "carol", "role": "admin", "token_file": "carol.token"},
            ],
            commands={"audit_path": "trail/audit.jsonl", "min_role": {"acknowledge_fault": "qc_officer"}},
        ),
        base_dir=tmp_path,
    )
    assert [(o.name, o.role) for o in config.operators] == [
        ("alice", "qc_officer"),
        ("bob", "operator"),
        ("carol", "admin"),
    ]
    assert config.operators[2].token.reveal() == "carol-token-0123456789abcdef"
    assert ALICE_TOKEN not in repr(config)
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
    default = parse_config(lab(tmp_path), base_dir=tmp_path)
    assert default.operators == ()
    assert default.commands.resolved_audit_path(default.service.state_dir) == tmp_path / "var" / "audit.jsonl"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"operator": [{"name": "alice", "role": "operator", "token": "inline-secret-123456"}]},
            "operator[0].token: secrets are not accepted inline",
        ),
        (
            {"operator": [{"name": "alice", "role": "root", "token_env": "T_ALICE"}]},
            "operator[0].role: 'root' is not allowed; allowed: operator, qc_officer, admin",
        ),
        ({"operator": [{"name": "alice", "role": "operator"}]}, "operator[0]: needs token_env or token_file"),
        (
            {"operator": [{"name": "alice", "role": "operator", "token_env": "T_SHORT"}]},
            "operator[0].token_env: the token from $T_SHORT has 5 characters; at least 16",
        ),
        (
            {
                "operator": [
                    {"name": "alice", "role": "operator", "token_env": "T_ALICE"},
                    {"name": "alice", "role": "admin", "token_env": "T_BOB"},
                ]
            },
            "duplicate operator 'alice'",
        ),
        (
            {
                "operator": [
                    {"name": "alice", "role": "operator", "token_env": "T_ALICE"},
                    {"name": "bob", "role": "admin", "token_env": "T_ALICE"},
                ]
            },
            "the same token as 'alice'",
        ),
        ({"commands": {"min_role": {"start_elution": "superuser"}}}, "commands.min_role.start_elution: 'superuser'"),
        ({"commands": {"min_role": {"reboot": "admin"}}}, "commands.min_role.reboot: unknown key"),
        ({"commands": {"audit": "x"}}, "did you mean 'audit_path'"),
    ],
)
def test_bad_operator_or_command_config_is_refused_precisely(
    tmp_path: Path, tokens: None, monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any], message: str
) -> None:
    monkeypatch.setenv("T_SHORT", "short")
    with pytest.raises(ConfigError) as raised:
        parse_config(lab(tmp_path, **extra), base_dir=tmp_path)
    assert message in str(raised.value)
    assert ALICE_TOKEN not in str(raised.value)


def test_a_label_is_authorised_by_what_it_asks_for(tmp_path: Path, tokens: None) -> None:
    """An accuracy verdict needs label_accuracy (qc_officer by default), a dosage label_dosage."""
    plain = {"measurement_id": "a" * 32, "label": "batch 12"}
    accuracy = plain | {"reference_source": "CO-57-REF"}
    dosage = plain | {"prescribed_activity": "370 MBq", "administration_time": "2026-12-04T10:00:00Z"}

    def label(user: str, token: str, args: dict[str, Any]) -> Command:
        body = command(args=args) | {"user": user, "token": token}
        return parse_command(encode(body), "label_measurement", CALIBRATOR)

    operators = [
        OperatorConfig("alice", "qc_officer", Secret(ALICE_TOKEN, "test")),
        OperatorConfig("bob", "operator", Secret(BOB_TOKEN, "test")),
    ]
    default = Authoriser(operators, DEFAULT_MIN_ROLE)
    for args in (plain, dosage, accuracy):
        assert default.authorise(label("alice", ALICE_TOKEN, args)).name == "alice"
    for args in (plain, dosage):
        assert default.authorise(label("bob", BOB_TOKEN, args)).name == "bob"
    with pytest.raises(Unauthorised) as raised:
        default.authorise(label("bob", BOB_TOKEN, accuracy))
    assert "may not run label_measurement (label_accuracy); it needs qc_officer" in str(raised.value)

    config = parse_config(
        lab(
            tmp_path,
            operator=[{"name": "bob", "role": "operator", "token_env": "T_BOB"}],
            commands={"min_role": {"label_dosage": "qc_officer", "label_accuracy": "operator"}},
        ),
        base_dir=tmp_path,
    )
    configured = Authoriser(config.operators, config.commands.min_role)
    assert configured.authorise(label("bob", BOB_TOKEN, accuracy)).name == "bob"
    assert configured.authorise(label("bob", BOB_TOKEN, plain)).name == "bob"
    with pytest.raises(Unauthorised, match="label_dosage"):
        configured.authorise(label("bob", BOB_TOKEN, dosage))


def test_authoriser_checks_user_token_and_role(tmp_path: Path, tokens: None) -> None:
    config = parse_config(
        lab(
            tmp_path,
            operator=[
                {"name": "alice", "role": "qc_officer", "token_env": "T_ALICE"},
                {"name": "bob", "role": "operator", "token_env": "T_BOB"},
            ],
            commands={"min_role": {"start_elution": "qc_officer"}},
        ),
        base_dir=tmp_path,
    )
    authoriser = Authoriser(config.operators, config.commands.min_role)

    def attempt(user: str, token: str, action: str = "start_elution") -> Command:
        return Command("r", user, token, "why", action, {}, time.time_ns())

    assert authoriser.authorise(attempt("alice", ALICE_TOKEN)).name == "alice"
    assert authoriser.authorise(attempt("bob", BOB_TOKEN, "abort")).role == "operator"
    for user, token, expected in [
        ("alice", BOB_TOKEN, "not authenticated"),
        ("mallory", ALICE_TOKEN, "not authenticated"),
        ("alice", ALICE_TOKEN[:-1], "not authenticated"),
        ("bob", BOB_TOKEN, "role operator of 'bob' may not run start_elution; it needs qc_officer"),
    ]:
        with pytest.raises(Unauthorised) as raised:
            authoriser.authorise(attempt(user, token))
        assert expected in str(raised.value)
        assert token not in str(raised.value)


# --------------------------------------------------------------------------- the handler, on a real audit trail

OPERATORS = (
    OperatorConfig("alice", "operator", Secret(ALICE_TOKEN, "test")),
    OperatorConfig("bob", "operator", Secret(BOB_TOKEN, "test")),
)
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
    """A handler on an audit trail with one station, and every reply it published."""

    def __init__(self, audit: AuditLog, station: RecordingStation | None = None) -> None:
        self.audit = audit
        self.station = station or RecordingStation()
        self.online = True
        self.replies: list[dict[str, Any]] = []
        target = CommandTarget(STATION, self.station, lambda: self.online)
        self.handler = CommandHandler(
            "lab",
            Authoriser(OPERATORS, DEFAULT_MIN_ROLE),
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
        token = ALICE_TOKEN if user == "alice" else BOB_TOKEN
        body = command(request_id=request_id, user=user, token=token, args=args, **changes)
        return await self.handler.handle(f"{CMD}/{action}", encode(body))

    def outcomes(self) -> list[tuple[str, str, str]]:
        return [(r.actor, r.action, r.new_value["outcome"]) for r in iter_records(self.audit.path)]


@pytest.fixture
def trail(tmp_path: Path) -> AuditLog:
    return AuditLog(tmp_path / "audit.jsonl")


async def test_a_reused_request_id_for_another_command_is_refused_not_answered(trail: AuditLog) -> None:
    console = Console(trail)
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


async def test_a_restarted_handler_remembers_request_ids_from_the_audit_trail(trail: AuditLog) -> None:
    before = Console(trail)
    assert (await before.send("start_elution", "r1"))["outcome"] == "executed"
    before.station.hang = True
    before.station.reached.clear()
    cut_off = asyncio.create_task(before.send("abort", "r2"))
    await asyncio.wait_for(before.station.reached.wait(), 30)
    cut_off.cancel()  # the controller dies after sending, before it learns or records the outcome
    await asyncio.gather(cut_off, return_exceptions=True)
    assert before.station.calls == ["start_elution", "abort"]

    after = Console(trail)
    again = await after.send("start_elution", "r1")
    assert again["duplicate"] is True and again["outcome"] == "executed" and again["new_value"]["sequence"] == 1
    assert [r.new_value.get("first_audit_seq") for r in iter_records(trail.path)][-1] == 2  # the executed record
    unknown = await after.send("abort", "r2")
    assert unknown["duplicate"] is True and unknown["outcome"] == "unconfirmed"
    assert "check it before sending a new request_id" in unknown["error"]
    reused = await after.send("abort", "r1")
    assert reused["outcome"] == "malformed" and "already used for a different command" in reused["error"]
    assert after.station.calls == [], "nothing may run twice across a restart"


async def test_refusals_that_never_reached_the_device_are_not_remembered(trail: AuditLog) -> None:
    console = Console(trail)
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
    restarted = Console(trail, console.station)  # the trail says "not sent": the restarted handler runs it
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


async def test_a_label_is_audited_like_select_nuclide_and_needs_no_device_online(trail: AuditLog) -> None:
    calibrator = RecordingCalibrator()
    target = CommandTarget(CALIBRATOR, calibrator, lambda: False)  # the calibrator is offline
    handler = CommandHandler("lab", Authoriser(OPERATORS, DEFAULT_MIN_ROLE), trail, _accept_reply, lambda name: target)
    topic = "hotlab/lab/hotcell-1/cal-1/cmd"

    async def send(action: str, args: dict[str, Any], request_id: str) -> dict[str, Any]:
        return await handler.handle(f"{topic}/{action}", encode(command(request_id=request_id, args=args)))

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
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trail = FlakyAuditLog(tmp_path / "audit.jsonl", failures=1)
    console = Console(trail)
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
    trail: AuditLog, caplog: pytest.LogCaptureFixture
) -> None:
    console = Console(trail)
    reply = await console.handler.handle(f"{CMD}/abort\nINFO command abort executed", encode(command()))
    assert reply["outcome"] == "malformed"
    assert caplog.records and all("\n" not in r.getMessage() for r in caplog.records)


HANDLER_TOPICS = st.sampled_from(
    [f"{CMD}/{action}" for action in ("start_elution", "abort", "acknowledge_fault", "select_nuclide", "reboot")]
    + ["hotlab/lab/elution-1/other/cmd/abort", "hotlab/elsewhere/x/y/cmd/abort", "x"]
)
#: Mostly valid envelopes with valid tokens (the station is a recorder), so executions, duplicates,
#: reused ids and malformed values all occur; strings may carry lone surrogates.
HANDLER_PAYLOADS = (
    st.fixed_dictionaries(
        {
            "schema": st.just("hotlab.command/1"),
            "request_id": st.sampled_from(["r1", "r2", "r3"]),
            "user": st.sampled_from(["alice", "bob"]) | TEXT,
            "token": st.sampled_from([ALICE_TOKEN, BOB_TOKEN]) | TEXT,
            "reason": st.just("because") | TEXT,
            "issued_at": st.builds(now_iso),
            "args": st.sampled_from([{}, {"volume_ml": 5.0}]) | JSON,
        }
    ).map(encode)
    | NEAR_MISS.map(encode)
    | st.binary(max_size=100)
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(st.tuples(HANDLER_TOPICS, HANDLER_PAYLOADS, st.booleans()), min_size=1, max_size=4))
@example(messages=[(f"{CMD}/abort", encode(command(args={}, token="\ud800")), False)])
@example(messages=[(f"{CMD}/abort", encode(command(args={}, reason="why \udfff")), False)])
def test_every_submitted_message_gets_exactly_one_reply_and_an_audit_record(
    messages: list[tuple[str, bytes, bool]],
) -> None:
    async def run(directory: str) -> None:
        audit = AuditLog(Path(directory) / "audit.jsonl")
        for topic, payload, retain in messages:
            console = Console(audit)  # a fresh handler per message: each also recalls the trail
            records_before = len(list(iter_records(audit.path)))
            await console.handler.submit(topic, payload, retain)
            await console.handler.close()
            assert len(console.replies) == 1, (topic, payload)
            assert len(list(iter_records(audit.path))) > records_before, (topic, payload)

    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(run(directory))


async def test_odd_records_in_the_trail_do_not_stop_the_handler_from_recalling_it(trail: AuditLog) -> None:
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
    console = Console(trail)
    assert (await console.send("abort", "r1"))["outcome"] == "executed"
    assert console.station.calls == ["abort"]


def _iso_seconds_from_now(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


@pytest.mark.parametrize(
    ("offset_s", "why"),
    [(-31.0, "s ago; commands older than 30 s are not run"), (31.0, "s ahead of the controller's clock")],
)
async def test_a_command_issued_outside_the_window_is_refused_as_expired_and_audited(
    trail: AuditLog, offset_s: float, why: str
) -> None:
    """A captured command replayed later, or one a broker queued for an offline client, must not run."""
    console = Console(trail)
    reply = await console.send("start_elution", "r-old", issued_at=_iso_seconds_from_now(offset_s))
    assert reply["outcome"] == "expired" and reply["ok"] is False
    assert why in reply["error"]
    assert console.station.calls == []
    assert console.outcomes() == [("alice", "elution.start", "expired")]
    fresh = await console.send("start_elution", "r-new", issued_at=_iso_seconds_from_now(-29.0))
    assert fresh["outcome"] == "executed" and console.station.calls == ["start_elution"]


async def test_the_window_is_configurable_and_a_resent_id_is_answered_at_any_age(trail: AuditLog) -> None:
    console = Console(trail)
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


async def test_a_command_whose_window_closes_while_its_intent_is_audited_does_not_run(trail: AuditLog) -> None:
    """Fresh when it arrived, stale once the intent record was on disk: checked again before the device."""
    console = Console(trail)
    issued = datetime.now(UTC)
    readings_of_the_clock = iter([0.0, 31.0])  # seconds after issued_at: at arrival, then before sending

    def clock_ns() -> int:
        return int((issued.timestamp() + next(readings_of_the_clock, 31.0)) * 1e9)

    console.handler._clock_ns = clock_ns
    reply = await console.send("start_elution", "r-slow", issued_at=issued.isoformat())
    assert reply["outcome"] == "expired" and console.station.calls == []
    assert console.outcomes() == [("alice", "elution.start", "requested"), ("alice", "elution.start", "expired")]


def test_start_qc_and_end_qc_are_parsed_strictly_and_a_baseline_needs_a_qc_officer(tokens: None) -> None:
    """start_qc names a procedure and its one subject; a baseline is a QC officer's record (qc_baseline)."""

    def qc(action: str, user: str, token: str, args: dict[str, Any]) -> Command:
        return parse_command(encode(command(args=args) | {"user": user, "token": token}), action, CALIBRATOR)

    daily = qc("start_qc", "bob", BOB_TOKEN, {"procedure": "daily_constancy", "source": "CS-1"})
    baseline = qc("start_qc", "bob", BOB_TOKEN, {"procedure": "baseline", "source": "CS-1"})
    linearity = qc("start_qc", "alice", ALICE_TOKEN, {"procedure": "linearity", "nuclide": "99mTc"})
    assert linearity.args == {"procedure": "linearity", "nuclide": "Tc-99m"}
    assert qc("end_qc", "bob", BOB_TOKEN, {}).args == {}
    operators = [
        OperatorConfig("alice", "qc_officer", Secret(ALICE_TOKEN, "test")),
        OperatorConfig("bob", "operator", Secret(BOB_TOKEN, "test")),
    ]
    authoriser = Authoriser(operators, DEFAULT_MIN_ROLE)
    assert authoriser.authorise(daily).name == "bob"
    assert authoriser.authorise(qc("end_qc", "bob", BOB_TOKEN, {"procedure": "baseline"})).name == "bob"
    with pytest.raises(Unauthorised, match=r"may not run start_qc \(qc_baseline\); it needs qc_officer"):
        authoriser.authorise(baseline)
    for args, problem in (
        ({"procedure": "baseline"}, "start_qc of baseline needs args.source and nothing else; got: procedure"),
        ({"procedure": "daily_constancy", "elution_id": "a" * 32}, "start_qc of daily_constancy needs args.source"),
        ({"procedure": "ge68_breakthrough", "elution_id": "12"}, "args.elution_id must be an elution's msg_id"),
        ({"procedure": "constancy", "source": "X"}, "args.procedure must be one of"),
        ({"source": "X"}, "args.procedure is missing"),
        ({"procedure": "linearity", "nuclide": "Xx-1"}, "args.nuclide"),
    ):
        with pytest.raises(MalformedCommand, match=problem):
            qc("start_qc", "bob", BOB_TOKEN, args)


def test_start_qc_of_geometry_sleeves_and_ga68_identity_parse_and_match_the_schema(tokens: None) -> None:
    """The geometries are listed reference first; sleeves come from the config; a half-life may name its elution."""
    schema = json.loads((SCHEMAS / "command.json").read_text())

    def parsed(args: dict[str, Any]) -> Command:
        return parse_command(encode(command(args=args) | {"user": "bob", "token": BOB_TOKEN}), "start_qc", CALIBRATOR)

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
    authoriser = Authoriser([OperatorConfig("bob", "operator", Secret(BOB_TOKEN, "test"))], DEFAULT_MIN_ROLE)
    for args in (geometry, sleeves, identity):
        assert role_key(parsed(args)) == "start_qc" and authoriser.authorise(parsed(args)).name == "bob"
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
