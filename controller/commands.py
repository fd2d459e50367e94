"""MQTT control commands: validate, authenticate, authorise, audit, execute, reply.

A command is a QoS 1 PUBLISH to hotlab/<site>/<station>/<device>/cmd/<action> carrying a
`hotlab.signed_command/1` envelope (controller/schemas/signed_command.json): a sender's name, the
`hotlab.command/2` command as JSON text (controller/schemas/command.json) and the sender's HMAC
over topic and text (controller/command_signing.py). The answer goes to the same topic plus
`/reply` (`hotlab.command_reply/1`, QoS 1, not retained). docs/mqtt.md has the contract.

Rules this module enforces, in this order:

1. Parse strictly, then authenticate, then parse again: the envelope (at most
   MAX_PAYLOAD_BYTES, UTF-8, one JSON object without duplicate keys, NaN/Infinity or lone
   surrogate escapes, exactly its keys and types); then its signature, which the named
   [[command_sender]]'s key must reproduce (compared in constant time; an unknown sender costs
   the same as a wrong signature, and the refusal does not say which); only then the command
   text inside, with the same strictness, an action the device's family knows and arguments of
   the right type and range. A retained command is refused: the broker would hand it to the
   controller again on every reconnect and it would run again. The subscription asks for
   MQTT 5's retain-as-published, because MQTT 3.1.1 clears the flag when it delivers to a
   connected subscriber, so the refusal holds for a command retained while the controller is
   online too.
2. Authorise: the person named in `user` must have an account in the lab's user store
   (controller/users.py) that is neither disabled nor locked, with a role at least
   [commands.min_role] for the action; a `label_measurement` that asks for an accuracy verdict
   (`reference_source`) needs `label_accuracy` (default qc_officer), a dosage
   (`prescribed_activity`) `label_dosage`; a `start_qc` of a baseline procedure needs
   `qc_baseline` (default qc_officer), `end_qc` `start_qc`. The sender vouches for the person
   (it checked their password); the audit trail names both.
   Migration: a `hotlab.command/1` with an [[operator]]'s token in its payload is refused
   (unauthorised) unless [commands] accept_token_commands is set, and then logged as a warning
   each time (docs/mqtt.md#migrating-from-tokens).
3. Audit every attempt in the hash-chained trail (controller/audit.py), including malformed
   and unauthorised ones, with the claimed user as actor. Audit first: an authorised command
   gets an intent record ("requested") before anything is sent to the device, and is not
   executed at all if that record cannot be written (fail closed); its result follows as a
   second record. A crash mid-command therefore still leaves who asked for what, and why.
   The one exception is `abort`: stopping an elution is the safe action, so an abort whose
   intent record fails still runs, logged as an AUDIT FAILURE, and is audited afterwards
   (the append is retried a few times).
4. Execute through the device's source (controller/service.py), which serialises commands
   with the device's polling on one lock, so the two never interleave on the wire. A
   `label_measurement` touches no device: it commits a record linking a label to a measurement
   (controller/measurement_labels.py), so it also runs while the calibrator is offline; so do
   `start_qc` and `end_qc`, which commit a QC procedure's start or end record
   (controller/qc/procedure_commands.py).
5. A command runs only while it is fresh: `issued_at` (ISO 8601 with an offset) must lie within
   `max_age_s` (default 30 s) of the controller's clock, in either direction, so a command
   replayed from a capture, or queued by a broker for a client that was offline, cannot run
   later (outcome `expired`). A re-sent request id is still answered from memory at any age:
   that only repeats an answer, it never runs anything.
6. Reply. Replies are not stored in the outbox: the audit trail is the durable record, and a
   requester that lost a reply re-sends the same `request_id`, which is answered from memory
   (outcome of the first attempt, `duplicate: true`) and never executed twice. That also
   covers a QoS 1 redelivery of the command itself. The memory is keyed on the request id
   alone and holds who asked for what on which device: the same id with any other user,
   action, device or arguments is refused as malformed, never answered with someone else's
   outcome. It is seeded from the audit trail before the first command after a start, so a
   console re-sending after a controller crash does not run the command again; an intent
   record without an outcome is answered `unconfirmed`. Refusals that never reached the
   device (device offline, controller shutting down, audit trail unwritable) are not
   remembered: a retry with the same id after the cause is fixed runs.

Tokens (of the migration) never appear in a log line, an audit record or a reply.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import sqlite3
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from hotlab.controller.audit import (
    ELUTION_ABORT,
    ELUTION_START,
    FAULT_ACKNOWLEDGE,
    AuditError,
    AuditLog,
    AuditRecord,
    iter_records,
)
from hotlab.controller.command_signing import (
    COMMAND_SCHEMA,
    MAX_PAYLOAD_BYTES,
    SIGNATURE_HEX_CHARS,
    SIGNED_SCHEMA,
    signature_matches,
)
from hotlab.controller.config import (
    DEFAULT_COMMAND_MAX_AGE_S,
    ROLES,
    TOKEN_MIGRATION_DOC,
    CommandSenderConfig,
    DeviceConfig,
    OperatorConfig,
)
from hotlab.controller.measurement_labels import LabelRefused
from hotlab.controller.messages import TOPIC_ROOT, iso_utc
from hotlab.controller.qc.procedure_commands import ProcedureRefused
from hotlab.controller.users import User
from hotlab.drivers.elution_station import (
    CommandOutcome,
    CommandOutcomeUnknown,
    CommandRefused,
    NotAuthorised,
)
from hotlab.drivers.records import DeviceRefused, DriverError
from hotlab.errors import HotlabError, InputError
from hotlab.physics.utc_time import parse_utc_ns

log = logging.getLogger(__name__)

#: A command with an [[operator]]'s token in its payload: run only during a migration.
TOKEN_COMMAND_SCHEMA = "hotlab.command/1"
REPLY_SCHEMA = "hotlab.command_reply/1"
#: The answer to a token command when they are not accepted (any more).
TOKENS_REFUSED = f"tokens in payloads are no longer accepted: sign commands, see {TOKEN_MIGRATION_DOC}"
#: Controller-side sanity bound on an elution volume; the station refuses volumes outside its
#: generator's own range (e.g. 1-10 mL for a Ge-68/Ga-68 generator) with a precise reason.
MAX_VOLUME_ML = 50.0
MAX_REASON_CHARS = 500
MAX_TOKEN_CHARS = 256

STATION_ACTIONS: tuple[str, ...] = ("start_elution", "abort", "acknowledge_fault")
CALIBRATOR_ACTIONS: tuple[str, ...] = ("select_nuclide", "label_measurement", "start_qc", "end_qc")
#: The audit trail's action names (dotted, controller/audit.py) for each command.
AUDIT_ACTIONS: dict[str, str] = {
    "start_elution": ELUTION_START,
    "abort": ELUTION_ABORT,
    "acknowledge_fault": FAULT_ACKNOWLEDGE,
    "select_nuclide": "calibrator.select_nuclide",
    "label_measurement": "measurement.label",
    "start_qc": "qc.start",
    "end_qc": "qc.end",
}
#: Commands that only store a record (controller/measurement_labels.py): they run while the device is offline.
RECORD_ACTIONS = frozenset({"label_measurement", "start_qc", "end_qc"})
MAX_LABEL_CHARS = 200
_MEASUREMENT_ID = re.compile(r"^[0-9a-f]{32}$")
#: Audit action of an attempt whose topic names no command this controller knows.
UNKNOWN_AUDIT_ACTION = "command.unknown"
#: Who the audit trail names when a payload claims no readable user.
UNKNOWN_ACTOR = "unknown"
#: Audit reason when the attempt gave none (the audit trail requires one; Annex 11 §9).
NO_REASON = "(no reason given)"

_COMMAND_KEYS = frozenset({"schema", "request_id", "user", "reason", "issued_at", "args"})
_TOKEN_COMMAND_KEYS = _COMMAND_KEYS | {"token"}
_SIGNED_KEYS = frozenset({"schema", "sender", "command", "signature"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
#: User and sender names: the config's name rule (controller/config.py).
_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SIGNATURE = re.compile(rf"^[0-9a-f]{{{SIGNATURE_HEX_CHARS}}}$")
#: Unicode categories refused in labels and reasons: controls (C0 and C1: Cc), format characters
#: (Cf: bidi overrides such as U+202E, which make an audit record read differently than it is
#: stored, zero-width characters) and the line and paragraph separators U+2028/U+2029 (Zl, Zp).
_CONTROL_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def _has_control_chars(text: str) -> bool:
    return any(unicodedata.category(char) in _CONTROL_CATEGORIES for char in text)


#: How many answered request ids are remembered for duplicate detection, per controller.
_REMEMBERED_REQUESTS = 1024
#: What a failing audit trail raises: its own errors, I/O errors, and ValueError (which covers
#: UnicodeEncodeError from text that is not valid Unicode) so no attempt escapes unaudited.
_AUDIT_ERRORS = (AuditError, OSError, ValueError)
#: An abort whose intent record failed is audited afterwards; these are the waits between tries.
_AUDIT_RETRY_DELAYS_S = (0.2, 0.5, 1.0)


class Outcome(StrEnum):
    REQUESTED = "requested"  # intent record, written before the device is touched
    EXECUTED = "executed"
    REFUSED = "refused"  # not carried out: device state, device refusal, device offline
    UNAUTHORISED = "unauthorised"  # unknown sender, bad signature, no active account, role not allowed, a token
    MALFORMED = "malformed"
    UNCONFIRMED = "unconfirmed"  # sent, but whether the device carried it out is unknown: check the device
    FAILED = "failed"  # not carried out: the audit trail or the user store was unusable (commands fail closed)
    DUPLICATE = "duplicate"  # audit only: a request id seen before, answered with the first outcome, not run again
    EXPIRED = "expired"  # not carried out: issued_at too old (replayed, queued) or too far ahead of our clock


class CommandRejected(HotlabError):
    """A command that is answered without touching the device; `outcome` says why."""

    outcome = Outcome.MALFORMED


class MalformedCommand(CommandRejected):
    """Topic or payload is not a valid command; the message says exactly what is wrong."""


class Unauthorised(CommandRejected):
    """Not authenticated (unknown sender, bad signature, no active account) or the role may not run the action."""

    outcome = Outcome.UNAUTHORISED


class AccountsUnavailable(CommandRejected):
    """The user store could not be read: nobody can be authorised, so nothing runs (fail closed)."""

    outcome = Outcome.FAILED


class ExpiredCommand(CommandRejected):
    """Issued too long ago, or too far in the future, to be run now."""

    outcome = Outcome.EXPIRED


@dataclass(frozen=True, slots=True)
class Command:
    """A well-formed command (not yet authorised)."""

    request_id: str
    user: str
    reason: str
    action: str
    args: dict[str, Any]
    #: When the sender issued it (UTC epoch ns), from `issued_at`.
    issued_ns: int


@dataclass(frozen=True, slots=True)
class SignedEnvelope:
    """A well-formed `hotlab.signed_command/1` (its signature not yet checked, its command not yet parsed)."""

    sender: str
    command: str
    signature: str


@dataclass(frozen=True, slots=True)
class TokenCommand:
    """A well-formed `hotlab.command/1` and the token it carries (migration only)."""

    command: Command
    token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Actor:
    """Who an authorised command runs as: the person, their role, and the sender that vouched for them
    (None for a token command, where the person's own token did)."""

    name: str
    role: str
    sender: str | None


@dataclass(frozen=True, slots=True)
class Claim:
    """What an attempt said about itself, read leniently for the audit trail even from a bad payload.

    Of a signed command: the sender from the envelope, the rest from the command text inside it.
    """

    actor: str = UNKNOWN_ACTOR
    reason: str = NO_REASON
    request_id: str | None = None
    sender: str | None = None

    @classmethod
    def read(cls, payload: bytes) -> Claim:
        body = _lenient_object(payload)
        if body is None:
            return cls()
        sender = _lenient_text(body, "sender", 64)
        inner = body.get("command")
        if isinstance(inner, str):
            body = _lenient_object(inner.encode("utf-8", "replace")) or {}
        request_id = _lenient_text(body, "request_id", 64)
        return cls(
            actor=_lenient_text(body, "user", 64) or UNKNOWN_ACTOR,
            reason=_lenient_text(body, "reason", MAX_REASON_CHARS) or NO_REASON,
            request_id=request_id if request_id and _REQUEST_ID.match(request_id) else None,
            sender=sender if sender and _USER.match(sender) else None,
        )


def _lenient_object(payload: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(payload) if len(payload) <= MAX_PAYLOAD_BYTES else None
    except (ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def _lenient_text(body: Mapping[str, Any], key: str, limit: int) -> str | None:
    value = body.get(key)
    if not isinstance(value, str) or not _is_unicode(value):
        return None  # a lone surrogate escape cannot be written to the audit trail
    return value.strip()[:limit] or None


# --------------------------------------------------------------------------- parsing


def command_topic_filter(site: str) -> str:
    """The subscription that catches every command for this site (and not the replies: one level more)."""
    return f"{TOPIC_ROOT}/{site}/+/+/cmd/+"


def reply_topic(command_topic: str) -> str:
    return f"{command_topic}/reply"


def actions_for(device: DeviceConfig) -> tuple[str, ...]:
    return STATION_ACTIONS if device.is_station else CALIBRATOR_ACTIONS


def parse_topic(site: str, topic: str) -> tuple[str, str, str]:
    """(station, device, action) of hotlab/<site>/<station>/<device>/cmd/<action>."""
    levels = topic.split("/")
    if len(levels) != 6 or levels[0] != TOPIC_ROOT or levels[1] != site or levels[4] != "cmd":
        raise MalformedCommand(f"topic {topic!r} is not {TOPIC_ROOT}/{site}/<station>/<device>/cmd/<action>")
    return levels[2], levels[3], levels[5]


def _reject_constant(name: str) -> float:
    raise MalformedCommand(f"payload contains {name}, which is not JSON (RFC 8259 §6)")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for key, value in pairs:
        if key in body:
            raise MalformedCommand(f"key {key!r} appears twice; which one was meant is ambiguous")
        body[key] = value
    return body


def decode_json(payload: bytes) -> dict[str, Any]:
    """One strict JSON object from at most MAX_PAYLOAD_BYTES of UTF-8."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MalformedCommand(f"payload has {len(payload)} bytes; at most {MAX_PAYLOAD_BYTES} are accepted")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedCommand(f"payload is not UTF-8 (byte {exc.start})") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
        # JSON allows "\ud800" escapes that decode to no Unicode character (RFC 8259 §8.2);
        # such a string could be neither audited nor compared as UTF-8.
        unicode_only = _is_unicode(json.dumps(body, ensure_ascii=False))
    except json.JSONDecodeError as exc:
        raise MalformedCommand(f"payload is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise MalformedCommand("payload nests too deeply") from None
    if not isinstance(body, dict):
        raise MalformedCommand(f"payload must be a JSON object, got {_json_type(body)}")
    if not unicode_only:
        raise MalformedCommand("payload contains a lone surrogate escape (\\ud800-\\udfff), which is not Unicode text")
    return body


def _is_unicode(text: str) -> bool:
    """Whether `text` encodes as UTF-8, i.e. holds no unpaired surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_action(action: str, device: DeviceConfig) -> None:
    """MalformedCommand unless `device`'s family takes `action`."""
    allowed = actions_for(device)
    if action not in allowed:
        kind = "an elution station" if device.is_station else "a dose calibrator"
        raise MalformedCommand(f"{action!r} is not a command for {device.name} ({kind}); allowed: {', '.join(allowed)}")


def read_envelope(payload: bytes) -> SignedEnvelope | dict[str, Any]:
    """The signed envelope of `payload`, checked strictly (its signature not yet).

    A token command (`hotlab.command/1`) comes back as its JSON object, for `parse_token_command`
    to read only when token commands are accepted at all.
    """
    body = decode_json(payload)
    schema = body.get("schema")
    if schema == TOKEN_COMMAND_SCHEMA:
        return body
    if "schema" in body and schema != SIGNED_SCHEMA:
        raise MalformedCommand(
            f"schema must be {SIGNED_SCHEMA!r} (a {COMMAND_SCHEMA} travels inside one, signed; docs/mqtt.md), "
            f"got {_brief(schema)}"
        )
    _exact_keys(body, _SIGNED_KEYS)
    sender = _string(body, "sender", 64)
    if not _USER.match(sender):
        raise MalformedCommand("sender must be a [[command_sender]] name: 1-64 letters, digits, '_', '-', '.'")
    command = _string(body, "command", MAX_PAYLOAD_BYTES)
    signature = _string(body, "signature", SIGNATURE_HEX_CHARS)
    if not _SIGNATURE.match(signature):
        raise MalformedCommand(f"signature must be {SIGNATURE_HEX_CHARS} lower-case hex digits (HMAC-SHA256)")
    return SignedEnvelope(sender, command, signature)


def parse_command(text: bytes, action: str, device: DeviceConfig) -> Command:
    """Validate `text`, the command inside a signed envelope, as `action` for `device`; raise
    MalformedCommand naming the first problem."""
    check_action(action, device)
    body = decode_json(text)
    _exact_keys(body, _COMMAND_KEYS)
    if body["schema"] != COMMAND_SCHEMA:
        raise MalformedCommand(f"schema must be {COMMAND_SCHEMA!r}, got {_brief(body['schema'])}")
    return _command(body, action)


def parse_token_command(body: dict[str, Any], action: str, device: DeviceConfig) -> TokenCommand:
    """Validate a `hotlab.command/1` (the envelope of `read_envelope`) as `action` for `device`.

    A command that is complete except for its token raises Unauthorised instead of MalformedCommand.
    """
    check_action(action, device)
    _exact_keys(body, _TOKEN_COMMAND_KEYS, optional=frozenset({"token"}))
    command = _command(body, action)
    if body.get("token") in (None, ""):
        # Well-formed otherwise, but without credentials: an authentication failure, not a syntax error.
        raise Unauthorised(f"command by {command.user!r} carries no token; every control command must be authenticated")
    return TokenCommand(command, _string(body, "token", MAX_TOKEN_CHARS))


def _exact_keys(body: Mapping[str, Any], keys: frozenset[str], optional: frozenset[str] = frozenset()) -> None:
    missing = sorted(keys - optional - body.keys())
    if missing:
        raise MalformedCommand(f"missing key(s): {', '.join(missing)}")
    unknown = sorted(body.keys() - keys)
    if unknown:
        raise MalformedCommand(f"unknown key(s): {', '.join(unknown)}; allowed: {', '.join(sorted(keys))}")


def _command(body: Mapping[str, Any], action: str) -> Command:
    """The fields every command has, checked; the keys are known to be exactly right."""
    request_id = _string(body, "request_id", 64)
    if not _REQUEST_ID.match(request_id):
        raise MalformedCommand("request_id must be 1-64 characters: letters, digits, '_', '.', ':', '-' (a UUID works)")
    user = _string(body, "user", 64)
    if not _USER.match(user):
        raise MalformedCommand("user must be a user name: 1-64 letters, digits, '_', '-', '.'")
    reason = _string(body, "reason", MAX_REASON_CHARS).strip()
    if not reason:
        raise MalformedCommand("reason must say why (it goes into the audit trail)")
    if _has_control_chars(reason):
        raise MalformedCommand("reason must not contain control characters")
    issued_ns = _moment_ns(_string(body, "issued_at", 64), "issued_at")
    args = body["args"]
    if not isinstance(args, dict):
        raise MalformedCommand(f"args must be a JSON object, got {_json_type(args)}")
    return Command(request_id, user, reason, action, _parse_args(action, args), issued_ns)


#: The argument sets each action takes (one of them, exactly).
_ARGS: dict[str, tuple[frozenset[str], ...]] = {
    "start_elution": (frozenset({"volume_ml"}),),
    "select_nuclide": (frozenset({"nuclide"}),),
    # A plain label; or one that says the measurement is an accuracy test of a certified reference
    # source; or a patient dosage with its prescription (docs/qc.md, "QC reads measurements").
    "label_measurement": (
        frozenset({"measurement_id", "label"}),
        frozenset({"measurement_id", "label", "reference_source"}),
        frozenset({"measurement_id", "label", "prescribed_activity", "administration_time"}),
    ),
    "end_qc": (frozenset(), frozenset({"procedure"})),
}
#: What each start_qc procedure is about besides its name: (required, optional) arguments. A daily check
#: or a baseline of the calibrator's check source; a linearity series (decay or sleeves) on one setting;
#: the geometries of a geometry test, the reference first; a Ga-68 identity, of an elution if named;
#: a Ge-68 follow-up of an elution, of the whole eluate or the fraction of it kept (docs/qc.md, "Procedures").
_START_QC_ARGS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "daily_constancy": (frozenset({"source"}), frozenset()),
    "baseline": (frozenset({"source"}), frozenset()),
    "linearity": (frozenset({"nuclide"}), frozenset()),
    "sleeve_linearity": (frozenset({"nuclide"}), frozenset()),
    "geometry": (frozenset({"nuclide", "geometries"}), frozenset()),
    "ga68_half_life": (frozenset(), frozenset({"elution_id"})),
    "ge68_breakthrough": (frozenset({"elution_id"}), frozenset({"aliquot_fraction"})),
}
#: A geometry test compares the reference with at most this many other volumes or containers.
MAX_GEOMETRIES = 12
MAX_GEOMETRY_LABEL_CHARS = 64


def _parse_args(action: str, args: dict[str, Any]) -> dict[str, Any]:
    if action == "start_qc":
        return _start_qc_args(args)
    accepted = _ARGS.get(action, (frozenset(),))
    if frozenset(args) not in accepted:
        wanted = " | ".join(", ".join(sorted(keys)) or "none (use {})" for keys in accepted)
        kind = "exactly" if len(accepted) == 1 else "one of"
        raise MalformedCommand(f"args of {action} must be {kind}: {wanted}; got: {', '.join(sorted(args)) or 'none'}")
    if action == "start_elution":
        volume = args["volume_ml"]
        if isinstance(volume, bool) or not isinstance(volume, (int, float)) or not math.isfinite(volume):
            raise MalformedCommand(f"args.volume_ml must be a number of millilitres, got {_json_type(volume)}")
        if not 0.0 < volume <= MAX_VOLUME_ML:
            raise MalformedCommand(f"args.volume_ml must be > 0 and <= {MAX_VOLUME_ML:g} mL, got {volume!r}")
        return {"volume_ml": float(volume)}
    if action == "select_nuclide":
        from hotlab.physics.nuclides import UnknownNuclideError, get_nuclide

        text = _string(args, "nuclide", 32, where="args.nuclide")
        try:
            return {"nuclide": get_nuclide(text).name}
        except UnknownNuclideError as exc:
            raise MalformedCommand(f"args.nuclide: {exc}") from None
    if action == "label_measurement":
        measurement_id = _string(args, "measurement_id", 32, where="args.measurement_id")
        if not _MEASUREMENT_ID.match(measurement_id):
            raise MalformedCommand("args.measurement_id must be a measurement's msg_id: 32 lower-case hex digits")
        label = _string(args, "label", MAX_LABEL_CHARS, where="args.label").strip()
        if not label or _has_control_chars(label):
            raise MalformedCommand("args.label must be text without control characters, not only spaces")
        parsed: dict[str, Any] = {"measurement_id": measurement_id, "label": label}
        if "reference_source" in args:
            source = _string(args, "reference_source", 64, where="args.reference_source")
            if not source.strip() or _has_control_chars(source):
                raise MalformedCommand("args.reference_source must be text without control characters, not only spaces")
            parsed["reference_source"] = source
        if "prescribed_activity" in args:
            parsed["prescribed_bq"] = _activity_bq(args["prescribed_activity"], "args.prescribed_activity")
            parsed["administration_ns"] = _moment_ns(
                _string(args, "administration_time", 64, where="args.administration_time"), "args.administration_time"
            )
        return parsed
    if action == "end_qc":
        return {"procedure": _procedure_name(args)} if "procedure" in args else {}
    return {}


def _procedure_name(args: Mapping[str, Any]) -> str:
    if "procedure" not in args:
        raise MalformedCommand(f"args.procedure is missing: one of {', '.join(_START_QC_ARGS)}")
    procedure = _string(args, "procedure", 32, where="args.procedure")
    if procedure not in _START_QC_ARGS:
        raise MalformedCommand(f"args.procedure must be one of: {', '.join(_START_QC_ARGS)}; got {_brief(procedure)}")
    return procedure


def _start_qc_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """The procedure and what it is about (`_START_QC_ARGS`): a check source, a nuclide setting, the
    geometries, an elution's msg_id."""
    from hotlab.physics.nuclides import UnknownNuclideError, get_nuclide

    procedure = _procedure_name(args)
    required, optional = _START_QC_ARGS[procedure]
    given = frozenset(args) - {"procedure"}
    if not required <= given <= required | optional:
        needs = ", ".join(f"args.{key}" for key in sorted(required)) or "no argument besides procedure"
        extra = f" (args.{', args.'.join(sorted(optional))} optional)" if optional else " and nothing else"
        raise MalformedCommand(f"start_qc of {procedure} needs {needs}{extra}; got: {', '.join(sorted(args))}")
    parsed: dict[str, Any] = {"procedure": procedure}
    if "source" in args:
        source = _string(args, "source", 64, where="args.source")
        if not source.strip() or _has_control_chars(source):
            raise MalformedCommand("args.source must be text without control characters, not only spaces")
        parsed["source"] = source
    if "nuclide" in args:
        text = _string(args, "nuclide", 32, where="args.nuclide")
        try:
            parsed["nuclide"] = get_nuclide(text).name
        except UnknownNuclideError as exc:
            raise MalformedCommand(f"args.nuclide: {exc}") from None
    if "geometries" in args:
        parsed["geometries"] = _geometries(args["geometries"])
    if "elution_id" in args:
        elution_id = _string(args, "elution_id", 32, where="args.elution_id")
        if not _MEASUREMENT_ID.match(elution_id):
            raise MalformedCommand("args.elution_id must be an elution's msg_id: 32 lower-case hex digits")
        parsed["elution_id"] = elution_id
    if "aliquot_fraction" in args:
        fraction = args["aliquot_fraction"]
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise MalformedCommand(
                f"args.aliquot_fraction must be the part of the eluate measured, > 0 and <= 1; got {_brief(fraction)}"
            )
        parsed["aliquot_fraction"] = float(fraction)
    return parsed


def _geometries(value: Any) -> list[str]:
    """The geometry labels of a geometry test, the reference first: 2 to 1 + MAX_GEOMETRIES distinct texts."""
    if not isinstance(value, list) or not 2 <= len(value) <= MAX_GEOMETRIES + 1:
        got = f"{len(value)} item(s)" if isinstance(value, list) else _json_type(value)
        raise MalformedCommand(
            f"args.geometries must list the reference geometry and 1 to {MAX_GEOMETRIES} others, "
            f'e.g. ["vial 10 mL", "syringe 3 mL"]; got {got}'
        )
    labels: list[str] = []
    for index, item in enumerate(value):
        where = f"args.geometries[{index}]"
        if not isinstance(item, str):
            raise MalformedCommand(f"{where} must be a geometry's name, got {_json_type(item)}")
        label = item.strip()
        if not label or _has_control_chars(label) or len(label) > MAX_GEOMETRY_LABEL_CHARS:
            raise MalformedCommand(
                f"{where} must be 1-{MAX_GEOMETRY_LABEL_CHARS} characters without control characters, not only spaces"
            )
        if label in labels:
            raise MalformedCommand(f"{where}: geometry {label!r} is listed twice")
        labels.append(label)
    return labels


def _moment_ns(text: str, where: str) -> int:
    """A moment (date and time with Z or an offset) as ns since the epoch; a bare date is refused.

    The shared parser reads a bare date as midnight UTC, but a command's `issued_at` and a
    dosage's `administration_time` are moments, and midnight is a guess, not what was meant.
    """
    try:
        date.fromisoformat(text.strip())
    except ValueError:
        pass
    else:
        raise MalformedCommand(f"{where} must be a date and time with Z or an offset, got the date {text!r}")
    try:
        return parse_utc_ns(text)
    except InputError as exc:
        raise MalformedCommand(f"{where} must be an ISO 8601 time with Z or an offset: {exc}") from None


def _activity_bq(value: Any, where: str) -> float:
    """A positive activity: a number of becquerel or a quantity such as "370 MBq"."""
    from hotlab.physics.units import UnitError, parse_activity

    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise MalformedCommand(f"{where} must be a number of Bq or a text such as '370 MBq', got {_json_type(value)}")
    try:
        bq = float(value) if not isinstance(value, str) else parse_activity(value)
    except UnitError as exc:
        raise MalformedCommand(f"{where}: {exc}") from None
    if not (math.isfinite(bq) and bq > 0):
        raise MalformedCommand(f"{where} must be a positive activity, got {_brief(value)}")
    return bq


def _string(body: Mapping[str, Any], key: str, limit: int, *, where: str | None = None) -> str:
    value = body[key]
    name = where or key
    if not isinstance(value, str) or not value:
        raise MalformedCommand(f"{name} must be a non-empty string, got {_json_type(value)}")
    if len(value) > limit:
        raise MalformedCommand(f"{name} has {len(value)} characters; at most {limit} are accepted")
    return value


def _json_type(value: Any) -> str:
    names = {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def _brief(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --------------------------------------------------------------------------- authorisation


class Accounts(Protocol):
    """Where the people who act are kept (controller/users.py `UserStore`); blocking, so called in a thread."""

    def user(self, username: str) -> User | None: ...


class Authoriser:
    """Who may do what: a signed command's sender ([[command_sender]] keys) and person (an active account
    in the user store), a token command's [[operator]] during a migration, and [commands.min_role].

    `accounts` None means the user store could not be opened: signed commands then fail closed.
    """

    def __init__(
        self,
        min_role: Mapping[str, str],
        *,
        senders: Sequence[CommandSenderConfig] = (),
        accounts: Accounts | None = None,
        operators: Sequence[OperatorConfig] = (),
        accept_token_commands: bool = False,
    ) -> None:
        self._min_role = dict(min_role)
        self._keys = {sender.name: sender.key_bytes() for sender in senders}
        self._accounts = accounts
        self._operators = {operator.name: operator for operator in operators}
        self.accept_token_commands = accept_token_commands
        # Compared against when the sender or user is unknown, so an unknown name costs the same as a wrong secret.
        self._decoy = b"\0" * 64

    def authenticate_sender(self, envelope: SignedEnvelope, topic: str) -> str:
        """The sender whose key signed this command for this topic, or Unauthorised (never how close it was)."""
        key = self._keys.get(envelope.sender)
        matches = signature_matches(key or self._decoy, topic, envelope.command, envelope.signature)
        if key is None or not matches:
            raise Unauthorised(
                f"the command from sender {envelope.sender!r} is not authenticated: unknown sender, or a signature "
                "that is not that sender's over this topic and command"
            )
        return envelope.sender

    async def authorise_person(self, command: Command, sender: str) -> Actor:
        """The person `sender` vouches for, if their account is active and their role may run `command`."""
        if self._accounts is None:
            raise AccountsUnavailable(
                "the lab's user store could not be opened (see the controller's log); no command can be authorised"
            )
        try:
            user = await asyncio.to_thread(self._accounts.user, command.user)
        except (sqlite3.Error, OSError) as exc:
            raise AccountsUnavailable(
                f"the lab's user store cannot be read ({type(exc).__name__}); command not executed"
            ) from None
        if user is None:
            raise Unauthorised(f"user {command.user!r} has no account in the lab's user store")
        if user.disabled:
            raise Unauthorised(f"the account {command.user!r} is disabled")
        if user.locked_until_ns is not None:
            until = iso_utc(user.locked_until_ns)[:19]
            raise Unauthorised(f"the account {command.user!r} is locked until {until} UTC after failed password checks")
        actor = Actor(user.username, user.role, sender)
        self._check_role(command, actor)
        return actor

    def authorise_token(self, token_command: TokenCommand) -> Actor:
        """The [[operator]] whose token this is (migration only), or Unauthorised saying why (never how close)."""
        command = token_command.command
        operator = self._operators.get(command.user)
        expected = operator.token.reveal().encode() if operator is not None else self._decoy
        token_ok = hmac.compare_digest(token_command.token.encode(), expected)
        if operator is None or not token_ok:
            raise Unauthorised(f"user {command.user!r} is not authenticated: unknown user or wrong token")
        actor = Actor(operator.name, operator.role, None)
        self._check_role(command, actor)
        return actor

    def _check_role(self, command: Command, actor: Actor) -> None:
        privilege = role_key(command)
        needed = self._min_role[privilege]
        if actor.role not in ROLES or ROLES.index(actor.role) < ROLES.index(needed):
            what = command.action if privilege == command.action else f"{command.action} ({privilege})"
            raise Unauthorised(f"role {actor.role} of {actor.name!r} may not run {what}; it needs {needed} or higher")


def role_key(command: Command) -> str:
    """The [commands.min_role] key that authorises `command`: its action, or for a label what it asks for.

    A label with `reference_source` asks for an accuracy verdict (`label_accuracy`), one with a
    prescription for a dosage record (`label_dosage`); a plain label is `label_measurement`. A
    baseline procedure is a QC officer's record (`qc_baseline`); ending a procedure needs `start_qc`.
    """
    if command.action == "label_measurement":
        if "reference_source" in command.args:
            return "label_accuracy"
        if "prescribed_bq" in command.args:
            return "label_dosage"
    if command.action == "start_qc" and command.args["procedure"] == "baseline":
        return "qc_baseline"
    if command.action == "end_qc":
        return "start_qc"
    return command.action


# --------------------------------------------------------------------------- execution


class StationControl(Protocol):
    """What the service's elution-station source offers (hotlab.drivers.elution_station semantics)."""

    async def start_elution(self, volume_ml: float, *, user: str, reason: str) -> CommandOutcome: ...

    async def abort(self, *, user: str, reason: str) -> CommandOutcome: ...

    async def acknowledge_fault(self, *, user: str, reason: str) -> CommandOutcome: ...


class CalibratorControl(Protocol):
    """What the service offers for a calibrator (controller/measurement_labels.py `CalibratorCommands`):
    select a nuclide, returning (old, new) nuclide; label a measurement, returning the label record;
    start or end a QC procedure, returning its record."""

    async def select_nuclide(self, nuclide: str) -> tuple[str | None, str]: ...

    async def label_measurement(
        self,
        measurement_id: str,
        label: str,
        *,
        user: str,
        request_id: str,
        reference_source: str | None = None,
        prescribed_bq: float | None = None,
        administration_ns: int | None = None,
    ) -> dict[str, Any]: ...

    async def start_qc(self, args: Mapping[str, Any], *, user: str, role: str, reason: str) -> dict[str, Any]: ...

    async def end_qc(self, args: Mapping[str, Any], *, user: str, role: str, reason: str) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class CommandTarget:
    """A configured device that can take commands, and whether its supervisor has it online."""

    device: DeviceConfig
    control: StationControl | CalibratorControl
    online: Callable[[], bool]


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    error: str | None = None
    old_value: Any = None
    new_value: Any = None
    #: False when the device was certainly not touched (offline, shutting down): such a refusal
    #: is not remembered, so the same request id may be sent again once the cause is gone.
    sent: bool = True


async def execute(target: CommandTarget, command: Command, actor: Actor) -> Result:
    """Run an authorised command on its device and classify what happened."""
    if command.action not in RECORD_ACTIONS and not target.online():
        return Result(Outcome.REFUSED, f"{target.device.name} is offline; the command was not sent", sent=False)
    try:
        if target.device.is_station:
            return await _execute_station(target.control, command, actor)  # type: ignore[arg-type]
        return await _execute_calibrator(target.control, command, actor)  # type: ignore[arg-type]
    except Exception as exc:  # a driver bug: the requester still gets an answer and the trail an outcome
        log.exception(
            "command %r on %r: unexpected %s from the driver", command.action, target.device.name, type(exc).__name__
        )
        return Result(
            Outcome.UNCONFIRMED,
            f"internal error in the {target.device.family} driver "
            f"({type(exc).__name__}); check the device before retrying",
        )


async def _execute_station(control: StationControl, command: Command, actor: Actor) -> Result:
    who = {"user": actor.name, "reason": command.reason}
    try:
        if command.action == "start_elution":
            done = await control.start_elution(command.args["volume_ml"], **who)
        elif command.action == "abort":
            done = await control.abort(**who)
        else:
            done = await control.acknowledge_fault(**who)
    except CommandRefused as exc:
        state = exc.state.name.lower() if exc.state is not None else None
        return Result(Outcome.REFUSED, exc.reason, {"state": state}, {"state": state})
    except CommandOutcomeUnknown as exc:
        return Result(
            Outcome.UNCONFIRMED,
            f"{exc}; check the station before retrying",
            {"state": exc.old_state.name.lower()},
            {"state": None, "sequence": exc.seq},
        )
    except (DeviceRefused, NotAuthorised) as exc:
        return Result(Outcome.REFUSED, str(exc))
    except DriverError as exc:
        # Usually the state read before the write failed (nothing sent), but a garbled reply to
        # the write itself cannot be told apart from here: claim nothing that is not known.
        return Result(
            Outcome.UNCONFIRMED,
            f"{type(exc).__name__}: {exc}; the command may or may not have "
            "reached the station: check it before retrying",
        )
    return Result(
        Outcome.EXECUTED,
        None,
        {"state": done.old_state.name.lower()},
        {"state": done.new_state.name.lower(), "sequence": done.sequence},
    )


async def _execute_calibrator(control: CalibratorControl, command: Command, actor: Actor) -> Result:
    if command.action == "label_measurement":
        args = dict(command.args)
        try:
            record = await control.label_measurement(
                args.pop("measurement_id"), args.pop("label"), user=actor.name, request_id=command.request_id, **args
            )
        except LabelRefused as exc:
            return Result(Outcome.REFUSED, str(exc), sent=False)
        return Result(Outcome.EXECUTED, None, None, record)
    if command.action in ("start_qc", "end_qc"):
        run = control.start_qc if command.action == "start_qc" else control.end_qc
        try:
            record = await run(command.args, user=actor.name, role=actor.role, reason=command.reason)
        except ProcedureRefused as exc:
            return Result(Outcome.REFUSED, str(exc), sent=False)
        return Result(Outcome.EXECUTED, None, None, record)
    try:
        old, new = await control.select_nuclide(command.args["nuclide"])
    except DeviceRefused as exc:
        return Result(Outcome.REFUSED, str(exc))
    except DriverError as exc:
        # A serial command may have been applied with only the reply lost: say so, never "failed".
        return Result(Outcome.UNCONFIRMED, f"{type(exc).__name__}: {exc}; check the calibrator's nuclide setting")
    return Result(Outcome.EXECUTED, None, {"nuclide": old}, {"nuclide": new})


# --------------------------------------------------------------------------- the handler

Publish = Callable[[str, dict[str, Any]], Awaitable[bool]]
Lookup = Callable[[str], CommandTarget | None]
#: Told about every record the handler appended (the service anchors the trail's head with it).
OnAudited = Callable[[AuditRecord], None]


class CommandHandler:
    """Turns command messages into audited actions and replies; `submit` never raises.

    At most `concurrency` commands are handled at once; `submit` waits for a slot, which
    slows the MQTT receive loop rather than growing an unbounded backlog. Commands for one
    device are serialised by that device's source lock, not here. `on_audited` is called with
    each record appended (synchronously, so it must only note it); an exception from it is
    logged and never reaches the command.
    """

    def __init__(
        self,
        site: str,
        authoriser: Authoriser,
        audit: AuditLog,
        publish: Publish,
        lookup: Lookup,
        *,
        concurrency: int = 8,
        max_age_s: float = DEFAULT_COMMAND_MAX_AGE_S,
        clock_ns: Callable[[], int] = time.time_ns,
        on_audited: OnAudited | None = None,
    ) -> None:
        self.site = site
        self._on_audited = on_audited
        self.max_age_s = max_age_s
        self._clock_ns = clock_ns
        self.authoriser = authoriser
        self.audit = audit
        self.publish = publish
        self.lookup = lookup
        self.topic_filter = command_topic_filter(site)
        self.handled = 0
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._answers: OrderedDict[str, _Remembered] = OrderedDict()
        self._recall_lock = asyncio.Lock()
        self._recalled = False
        self._stopping = False

    async def submit(self, topic: str, payload: bytes, retain: bool) -> None:
        """Accept one received message; it is handled in its own task."""
        await self._slots.acquire()
        task = asyncio.create_task(self._handle_in_slot(topic, payload, retain), name=f"command {topic}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, timeout_s: float = 30.0) -> None:
        """Refuse new commands from now on and wait (bounded) for those in progress."""
        self._stopping = True
        if self._tasks:
            _done, late = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in late:
                log.error("command %s did not finish within %.0f s; cancelling it", task.get_name(), timeout_s)
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def _handle_in_slot(self, topic: str, payload: bytes, retain: bool) -> None:
        try:
            await self.handle(topic, payload, retain)
        except Exception:  # a bug here must not end the subscriber; the audit/reply paths log their own failures
            log.exception("command on %s: unexpected failure", topic)
        finally:
            self._slots.release()

    async def handle(self, topic: str, payload: bytes, retain: bool = False) -> dict[str, Any]:
        """Validate, authorise, audit, execute and answer one command; return the reply sent."""
        self.handled += 1
        claim = Claim.read(payload)
        station, device, action = _topic_levels(topic)
        target_name = f"{station}/{device}" if station and device else topic
        audit_action = AUDIT_ACTIONS.get(action, UNKNOWN_AUDIT_ACTION)
        context = _Context(topic, target_name, audit_action, action, station, device, claim)
        try:
            target = self._resolve(topic)
            if retain:
                raise MalformedCommand(
                    "retained commands are refused: the broker would deliver them again on "
                    "every reconnect and they would run again; publish with retain=false"
                )
            command, actor = await self._authenticate(context, payload, target.device)
        except CommandRejected as exc:
            sender = {} if context.claim.sender is None else {"sender": context.claim.sender}
            return await self._reject(context, exc, {"authenticated": False} | sender)
        return await self._run_once(context, target, command, actor)

    async def _authenticate(self, context: _Context, payload: bytes, device: DeviceConfig) -> tuple[Command, Actor]:
        """The command and who it runs as: envelope, signature, command text, then the person (module docstring)."""
        envelope = read_envelope(payload)
        if isinstance(envelope, SignedEnvelope):
            sender = self.authoriser.authenticate_sender(envelope, context.topic)
            command = parse_command(envelope.command.encode(), context.action, device)
            context.claim = Claim(command.user, command.reason, command.request_id, sender)
            return command, await self.authoriser.authorise_person(command, sender)
        if not self.authoriser.accept_token_commands:
            raise Unauthorised(TOKENS_REFUSED)
        token_command = parse_token_command(envelope, context.action, device)
        command = token_command.command
        context.claim = Claim(command.user, command.reason, command.request_id)
        actor = self.authoriser.authorise_token(token_command)
        log.warning(
            "command %r on %r by %s carries a token in its payload, readable by every subscriber: run only because "
            "[commands] accept_token_commands = true; sign commands instead (%s)",
            command.action,
            context.target,
            actor.name,
            TOKEN_MIGRATION_DOC,
        )
        return command, actor

    def _resolve(self, topic: str) -> CommandTarget:
        station, device, _action = parse_topic(self.site, topic)
        target = self.lookup(device)
        if target is None or target.device.station != station:
            raise MalformedCommand(f"no device {device!r} at station {station!r} on this controller")
        return target

    async def _reject(self, context: _Context, exc: CommandRejected, detail: dict[str, Any]) -> dict[str, Any]:
        # %r throughout: action and target come from the topic, and a newline in them must not forge a log line.
        log.warning(
            "command %r on %r by %r: %s: %s", context.action, context.target, context.claim.actor, exc.outcome, exc
        )
        result = Result(exc.outcome, str(exc))
        return await self._reply(context, result, await self._audit_quietly(context, result, detail))

    async def _run_once(
        self, context: _Context, target: CommandTarget, command: Command, actor: Actor
    ) -> dict[str, Any]:
        """Execute unless this request id was seen before; then answer with the first attempt's outcome."""
        try:
            await self._recall_trail()
        except _AUDIT_ERRORS as exc:
            reply, _sent = await self._without_intent_record(context, target, command, actor, exc)
            return reply
        fingerprint = _Fingerprint(context.target, command.user, command.action, _canonical_args(command.args))
        earlier = self._answers.get(command.request_id)
        if earlier is not None and earlier.fingerprint != fingerprint:
            # Answering would hand one command's outcome to another (or to another user) without running it.
            return await self._reject(
                context,
                MalformedCommand(
                    f"request_id {command.request_id!r} already used for a different command; use a new request_id "
                    "for every new intention"
                ),
                _who(actor),
            )
        if earlier is not None:
            first = await asyncio.shield(earlier.answer)
            result = Result(Outcome(first["outcome"]), first["error"], first["old_value"], first["new_value"])
            record = await self._audit_quietly(
                context,
                Result(Outcome.DUPLICATE),
                _who(actor) | {"first_outcome": first["outcome"], "first_audit_seq": first["audit_seq"]},
            )
            log.info(
                "command %r %s on %r repeated; answered with the first outcome (%s), not run again",
                command.action,
                command.request_id,
                context.target,
                first["outcome"],
            )
            return await self._reply(context, result, record, duplicate=True)
        expired = self._expired(command)
        if expired is not None:
            return await self._reject(context, expired, _who(actor))
        remembered = _Remembered(fingerprint, asyncio.get_running_loop().create_future())
        self._remember(command.request_id, remembered)
        try:
            reply, sent = await self._execute_audited(context, target, command, actor)
        except BaseException:
            self._forget(command.request_id, remembered)
            raise
        remembered.answer.set_result(reply)
        if not sent:
            self._forget(command.request_id, remembered)
        return reply

    def _expired(self, command: Command) -> ExpiredCommand | None:
        """Why a new command is too old or too far ahead of our clock to run, if it is."""
        age_s = (self._clock_ns() - command.issued_ns) / 1e9
        if age_s > self.max_age_s:
            return ExpiredCommand(
                f"issued at {iso_utc(command.issued_ns)}, {age_s:.1f} s ago; commands older than "
                f"{self.max_age_s:g} s are not run (a replayed or queued command); send a new one"
            )
        if -age_s > self.max_age_s:
            return ExpiredCommand(
                f"issued at {iso_utc(command.issued_ns)}, {-age_s:.1f} s ahead of the controller's clock "
                f"(more than {self.max_age_s:g} s); check the sender's clock"
            )
        return None

    def _remember(self, request_id: str, remembered: _Remembered) -> None:
        self._answers[request_id] = remembered
        while len(self._answers) > _REMEMBERED_REQUESTS:
            self._answers.popitem(last=False)

    def _forget(self, request_id: str, remembered: _Remembered) -> None:
        if self._answers.get(request_id) is remembered:
            del self._answers[request_id]
        if not remembered.answer.done():
            remembered.answer.cancel()

    async def _recall_trail(self) -> None:
        """Seed the duplicate memory from the audit trail once, before the first command is run."""
        async with self._recall_lock:
            if self._recalled:
                return
            answers = await asyncio.to_thread(answers_in_trail, self.audit.path, _REMEMBERED_REQUESTS)
            loop = asyncio.get_running_loop()
            for request_id, (fingerprint, reply) in answers.items():
                answer: asyncio.Future[dict[str, Any]] = loop.create_future()
                answer.set_result(reply)
                self._remember(request_id, _Remembered(fingerprint, answer))
            self._recalled = True
            if answers:
                log.info("remembered %d request id(s) from the audit trail %s", len(answers), self.audit.path)

    async def _execute_audited(
        self, context: _Context, target: CommandTarget, command: Command, actor: Actor
    ) -> tuple[dict[str, Any], bool]:
        """(reply, whether the device may have been touched) of one authorised command, audited before and after."""
        who = _who(actor) | {"args": command.args}
        try:
            await self._append(context, Result(Outcome.REQUESTED), who)
        except _AUDIT_ERRORS as exc:
            return await self._without_intent_record(context, target, command, actor, exc)
        result = await self._execute_unless_stopping(target, command, actor)
        self._log_outcome(context, command, actor, result)
        record = await self._audit_quietly(context, result, who)
        return await self._reply(context, result, record), result.sent

    async def _without_intent_record(
        self, context: _Context, target: CommandTarget, command: Command, actor: Actor, exc: Exception
    ) -> tuple[dict[str, Any], bool]:
        """The audit trail failed before the device was touched: fail closed, except for `abort`.

        Stopping an elution is the safe action; refusing it because a disk is full would leave
        activity flowing that the operator wanted stopped. Everything else is not executed.
        """
        if command.action != "abort":
            log.error(
                "command %r on %r by %s NOT executed: audit trail %s unusable: %s: %s",
                command.action,
                context.target,
                actor.name,
                self.audit.path,
                type(exc).__name__,
                exc,
            )
            result = Result(
                Outcome.FAILED, f"audit trail unavailable ({type(exc).__name__}); command not executed", sent=False
            )
            return await self._reply(context, result, None), False
        log.error(
            "AUDIT FAILURE: abort on %r by %s runs WITHOUT its intent record (stopping an elution is the safe "
            "action); audit trail %s: %s: %s",
            context.target,
            actor.name,
            self.audit.path,
            type(exc).__name__,
            exc,
        )
        result = await self._execute_unless_stopping(target, command, actor)
        self._log_outcome(context, command, actor, result)
        detail = _who(actor) | {"args": command.args, "intent_record": f"not written ({type(exc).__name__})"}
        record = await self._audit_with_retries(context, result, detail)
        return await self._reply(context, result, record), result.sent

    async def _execute_unless_stopping(self, target: CommandTarget, command: Command, actor: Actor) -> Result:
        if self._stopping:
            return Result(Outcome.REFUSED, "the controller is shutting down; the command was not sent", sent=False)
        expired = self._expired(command)  # again: the intent record's fsync may have taken the rest of its window
        if expired is not None:
            return Result(Outcome.EXPIRED, str(expired), sent=False)
        return await execute(target, command, actor)

    @staticmethod
    def _log_outcome(context: _Context, command: Command, actor: Actor, result: Result) -> None:
        level = logging.INFO if result.outcome is Outcome.EXECUTED else logging.WARNING
        log.log(
            level,
            "command %r on %r by %s (%r): %s%s",
            command.action,
            context.target,
            actor.name,
            command.reason,
            result.outcome,
            f": {result.error}" if result.error else "",
        )

    async def _append(self, context: _Context, result: Result, detail: dict[str, Any]) -> AuditRecord:
        new_value = {
            "outcome": str(result.outcome),
            "command": context.action,
            "topic": context.topic,
            "request_id": context.claim.request_id,
            **detail,
        }
        if result.error is not None:
            new_value["error"] = result.error
        if result.new_value is not None:
            new_value["result"] = result.new_value
        if not result.sent:
            new_value["sent"] = False
        record = await self.audit.append_async(
            actor=context.claim.actor,
            action=context.audit_action,
            target=context.target,
            reason=context.claim.reason,
            old_value=result.old_value,
            new_value=new_value,
        )
        if self._on_audited is not None:
            try:
                self._on_audited(record)
            except Exception:  # the record is written: whatever the hook does, the command goes on
                log.exception("audit record #%d written, but its hook failed", record.seq)
        return record

    async def _audit_quietly(self, context: _Context, result: Result, detail: dict[str, Any]) -> AuditRecord | None:
        """Audit an outcome; a failing trail is logged loudly but does not hide the outcome from the requester."""
        try:
            return await self._append(context, result, detail)
        except _AUDIT_ERRORS as exc:
            self._log_audit_failure(context, result, exc)
            return None

    async def _audit_with_retries(
        self, context: _Context, result: Result, detail: dict[str, Any]
    ) -> AuditRecord | None:
        """Audit an outcome that already happened without an intent record; a transient failure gets more tries."""
        for delay_s in (*_AUDIT_RETRY_DELAYS_S, None):
            try:
                return await self._append(context, result, detail)
            except _AUDIT_ERRORS as exc:
                self._log_audit_failure(context, result, exc)
                if delay_s is None:
                    return None
                await asyncio.sleep(delay_s)
        return None

    def _log_audit_failure(self, context: _Context, result: Result, exc: Exception) -> None:
        log.error(
            "AUDIT FAILURE: could not record %s of %r on %r by %r in %s: %s: %s",
            result.outcome,
            context.action,
            context.target,
            context.claim.actor,
            self.audit.path,
            type(exc).__name__,
            exc,
        )

    async def _reply(
        self, context: _Context, result: Result, record: AuditRecord | None, *, duplicate: bool = False
    ) -> dict[str, Any]:
        now = time.time_ns()
        reply = {
            "schema": REPLY_SCHEMA,
            "request_id": context.claim.request_id,
            "site": self.site,
            "station": context.station,
            "device": context.device,
            "action": context.action,
            "ok": result.outcome is Outcome.EXECUTED,
            "outcome": str(result.outcome),
            "error": result.error,
            "old_value": result.old_value,
            "new_value": result.new_value,
            "audit_seq": record.seq if record is not None else None,
            "duplicate": duplicate,
            "time_ns": now,
            "time": iso_utc(now),
        }
        if not await self.publish(reply_topic(context.topic), reply):
            log.warning(
                "reply to %r (%s) not delivered; the requester can re-send request_id %s to get it",
                context.topic,
                result.outcome,
                context.claim.request_id,
            )
        return reply


@dataclass(slots=True)
class _Context:
    topic: str
    target: str
    audit_action: str
    action: str
    station: str | None
    device: str | None
    claim: Claim


@dataclass(frozen=True, slots=True)
class _Fingerprint:
    """What a request id stands for: the same id must always mean the same command by the same user."""

    target: str
    user: str
    action: str
    args: str  # canonical JSON


@dataclass(frozen=True, slots=True)
class _Remembered:
    fingerprint: _Fingerprint
    answer: asyncio.Future[dict[str, Any]]


def _canonical_args(args: Any) -> str:
    return json.dumps(args, sort_keys=True, separators=(",", ":"))


#: Outcome records in the trail that answer a request id for good (a re-send gets them back).
_FINAL_OUTCOMES = frozenset({Outcome.EXECUTED, Outcome.REFUSED, Outcome.UNCONFIRMED})
_CRASHED_MID_COMMAND = (
    "the controller stopped after recording this command's intent and before recording its "
    "outcome; whether the device carried it out is unknown: check it before sending a new "
    "request_id"
)


def answers_in_trail(path: str | Path, limit: int) -> OrderedDict[str, tuple[_Fingerprint, dict[str, Any]]]:
    """The answers the audit trail holds for the last `limit` request ids, oldest first (blocking: run in a thread).

    An intent record without an outcome (the controller stopped in between) is answered
    `unconfirmed`; an outcome marked `sent: false` (the device was never touched) is forgotten.
    """
    answers: OrderedDict[str, tuple[_Fingerprint, dict[str, Any]]] = OrderedDict()
    for record in iter_records(path):
        value = record.new_value
        if not isinstance(value, dict) or value.get("authenticated") is not True:
            continue
        request_id, outcome, command = value.get("request_id"), value.get("outcome"), value.get("command")
        if not (isinstance(request_id, str) and isinstance(outcome, str) and isinstance(command, str)):
            continue  # not a command record (or an unreadable one): it answers nothing
        fingerprint = _Fingerprint(record.target, record.actor, command, _canonical_args(value.get("args")))
        if outcome == Outcome.REQUESTED:
            answer = {
                "outcome": str(Outcome.UNCONFIRMED),
                "error": _CRASHED_MID_COMMAND,
                "old_value": None,
                "new_value": None,
                "audit_seq": record.seq,
            }
        elif outcome in _FINAL_OUTCOMES and value.get("sent") is not False:
            answer = {
                "outcome": outcome,
                "error": value.get("error"),
                "old_value": record.old_value,
                "new_value": value.get("result"),
                "audit_seq": record.seq,
            }
        elif outcome in _FINAL_OUTCOMES:
            answers.pop(request_id, None)
            continue
        else:
            continue  # duplicates and rejections answer nothing new
        answers.pop(request_id, None)
        answers[request_id] = (fingerprint, answer)
        while len(answers) > limit:
            answers.popitem(last=False)
    return answers


def _who(actor: Actor) -> dict[str, Any]:
    """What the audit trail records of an authorised command's actor besides their name: the sender that
    vouched for them (null for a token command of a migration)."""
    return {"authenticated": True, "role": actor.role, "sender": actor.sender}


def _topic_levels(topic: str) -> tuple[str | None, str | None, str]:
    """Best-effort (station, device, action) for audit and reply even when the topic is wrong."""
    levels = topic.split("/")
    if len(levels) == 6 and levels[4] == "cmd":
        return levels[2], levels[3], levels[5]
    return None, None, levels[-1] if levels else ""
