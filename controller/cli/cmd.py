"""`hotlab cmd`: send one signed command to a device of a lab, and print the controller's answer.

For scripts and admins, the same command path as the web panel (docs/mqtt.md, "Signed commands"):

1. the command is built (`command_body`) and checked as the controller will check it, so a typo
   is an error here, before anyone types a password;
2. the person named by --user is authenticated against the lab's user store with their password
   (`UserStore.authenticate`: audited, counted for lockout), so nothing is signed for someone who
   did not give it;
3. it is signed with the key of the --sender from [[command_sender]] and published (QoS 1, not
   retained) with the [mqtt] credentials and TLS, after subscribing to `<topic>/reply`, so the
   reply cannot arrive before we listen; the reply with this request id is printed on one line.

The password comes from --password-env, --password-file or a prompt, never from an argument (it
would sit in shell history and `ps`). A refused password is written to the audit trail, so its
HMAC key is needed (--key-file, else the environment, as for `hotlab user`).

Exit codes (controller/cli/main.py): 0 executed; 1 any other outcome, no reply within --timeout,
a refused password or an unreachable broker; 2 bad input (config, unknown sender or device, a
command the controller would refuse as malformed).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import re
import uuid
from pathlib import Path
from typing import Any

import aiomqtt

from hotlab.controller.audit import AuditLog
from hotlab.controller.cli.user import required_audit_key
from hotlab.controller.command_signing import command_body, signed_payload
from hotlab.controller.commands import MalformedCommand, parse_command, reply_topic
from hotlab.controller.config import (
    CommandClientConfig,
    CommandSenderConfig,
    DeviceConfig,
    MqttConfig,
    load_command_client,
    load_secret,
)
from hotlab.controller.messages import TOPIC_ROOT
from hotlab.controller.sinks.mqtt import tls_parameters
from hotlab.controller.users import Credentials, UserStore
from hotlab.errors import HotlabError, InputError

DEFAULT_TIMEOUT_S = 10.0
#: A JSON number (RFC 8259 §6): what `--arg key=value` passes as a number rather than as text.
_JSON_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cmd", help="send one signed command to a device (as the web panel does) and print the controller's answer"
    )
    parser.add_argument("device", help="the device's [[device]] name, e.g. ga68-generator-1")
    parser.add_argument(
        "action",
        help="start_elution, abort, acknowledge_fault (stations); select_nuclide, label_measurement, start_qc, "
        "end_qc (dose calibrators)",
    )
    parser.add_argument("--config", type=Path, required=True, help="lab config (TOML)")
    parser.add_argument("--sender", required=True, help="the [[command_sender]] whose key signs the command")
    parser.add_argument("--user", required=True, help="the person who acts: an account of the lab's user store")
    parser.add_argument("--reason", required=True, help="why (kept in the audit trail)")
    given = parser.add_mutually_exclusive_group()
    given.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one argument, e.g. volume_ml=5 (repeatable; a number stays a number, anything else is text)",
    )
    given.add_argument(
        "--args-json", metavar="JSON", help='all arguments as one JSON object, e.g. \'{"nuclide": "F-18"}\''
    )
    password = parser.add_mutually_exclusive_group()
    password.add_argument("--password-env", metavar="VAR", help="environment variable holding the user's password")
    password.add_argument("--password-file", type=Path, metavar="FILE", help="file holding only the user's password")
    parser.add_argument(
        "--key-file",
        type=Path,
        default=None,
        help="audit HMAC key file (default $HOTLAB_AUDIT_KEY_FILE or $HOTLAB_AUDIT_KEY)",
    )
    parser.add_argument(
        "--request-id",
        default=None,
        help="re-send an earlier command's request id to get its answer again (never a second run)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds to wait for the reply (default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        raise InputError(f"--timeout must be > 0, got {args.timeout:g}")
    lab = load_command_client(args.config)
    sender = _sender(lab, args.sender)
    device = _device(lab, args.device)
    body = command_body(user=args.user, reason=args.reason, args=_arguments(args), request_id=args.request_id)
    try:
        parse_command(json.dumps(body).encode(), args.action, device)
    except MalformedCommand as exc:
        raise InputError(f"the controller would refuse this command: {exc}") from None
    _authenticate(lab, args, f"signing {args.action} on {device.name} with hotlab cmd")
    topic = f"{TOPIC_ROOT}/{lab.site}/{device.station}/{device.name}/cmd/{args.action}"
    try:
        payload = signed_payload(topic, body, sender=sender.name, key=sender.key_bytes())
    except ValueError as exc:
        raise InputError(str(exc)) from None
    reply = asyncio.run(_exchange(lab.mqtt, topic, payload, body["request_id"], args.timeout))
    what = f"{args.action} on {device.station}/{device.name} for {args.user} (request {body['request_id']}"
    if reply is None:
        print(
            f"no reply: {what}) within {args.timeout:g} s; it may or may not have run: check the device, that the "
            "controller is online, and that this broker user may publish commands"
        )
        return 1
    outcome = str(reply.get("outcome"))
    audit = f", audit #{reply['audit_seq']}" if reply.get("audit_seq") is not None else ""
    repeated = ", an earlier answer to this request id" if reply.get("duplicate") else ""
    if outcome == "executed":
        change = f"{_compact(reply.get('old_value'))} -> {_compact(reply.get('new_value'))}"
        print(f"executed: {what}{audit}{repeated}): {change}")
        return 0
    print(f"{outcome}: {what}{audit}{repeated}): {reply.get('error')}")
    return 1


def _sender(lab: CommandClientConfig, name: str) -> CommandSenderConfig:
    sender = next((sender for sender in lab.senders if sender.name == name), None)
    if sender is None:
        configured = ", ".join(s.name for s in lab.senders) or "none"
        raise InputError(f"--sender {name!r} is not a [[command_sender]] of this lab; configured: {configured}")
    return sender


def _device(lab: CommandClientConfig, name: str) -> DeviceConfig:
    device = next((device for device in lab.devices if device.name == name), None)
    if device is None:
        raise InputError(f"no device {name!r} in this lab; devices: {', '.join(d.name for d in lab.devices) or 'none'}")
    return device


def _arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The command's `args`: --args-json as given, or --arg pairs with numbers as numbers."""
    if args.args_json is not None:
        try:
            given = json.loads(args.args_json)
        except json.JSONDecodeError as exc:
            raise InputError(f"--args-json is not JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(given, dict):
            raise InputError(f"--args-json must be a JSON object, got {type(given).__name__}")
        return given
    arguments: dict[str, Any] = {}
    for pair in args.arg:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise InputError(f"--arg {pair!r} is not KEY=VALUE")
        if key in arguments:
            raise InputError(f"--arg {key} is given twice")
        arguments[key] = json.loads(value) if _JSON_NUMBER.fullmatch(value) else value
    return arguments


def _password(args: argparse.Namespace) -> str:
    if args.password_env is not None or args.password_file is not None:
        return load_secret(env=args.password_env, file=args.password_file).reveal()
    return getpass.getpass(f"password of {args.user}: ")


def _authenticate(lab: CommandClientConfig, args: argparse.Namespace, purpose: str) -> None:
    """AccessDenied unless the password is `args.user`'s (blocking: the CLI has no event loop yet)."""
    path = lab.users.resolved_path(lab.audit_path)
    if not path.is_file():
        raise InputError(f"no user store at {path} (`hotlab user add` creates it)")
    key = required_audit_key(args.key_file)
    password = _password(args)
    store = UserStore(
        path,
        AuditLog(lab.audit_path, key=key),
        min_password_chars=lab.users.min_password_chars,
        max_failed_passwords=lab.users.max_failed_passwords,
        lockout_min=lab.users.lockout_min,
    )
    with store:
        store.authenticate(Credentials(args.user, password), purpose=purpose)


async def _exchange(
    mqtt: MqttConfig, topic: str, payload: bytes, request_id: str, timeout_s: float
) -> dict[str, Any] | None:
    """Publish the command and return the controller's reply to it, or None after `timeout_s`."""
    client = aiomqtt.Client(
        mqtt.host,
        mqtt.port,
        identifier=f"hotlab-cmd-{uuid.uuid4().hex[:8]}",
        username=mqtt.username,
        password=mqtt.password.reveal() if mqtt.password is not None else None,
        keepalive=mqtt.keepalive_s,
        timeout=mqtt.connect_timeout_s,
        tls_params=tls_parameters(mqtt.tls),
        tls_insecure=mqtt.tls.insecure_skip_hostname_check if mqtt.tls is not None else None,
    )
    try:
        async with client:
            await client.subscribe(reply_topic(topic), qos=1)
            await client.publish(topic, payload, qos=1, retain=False)
            try:
                async with asyncio.timeout(timeout_s):
                    async for message in client.messages:
                        reply = _json_object(message.payload)
                        if reply is not None and reply.get("request_id") == request_id:
                            return reply
            except TimeoutError:
                return None
    except aiomqtt.MqttError as exc:
        raise HotlabError(f"MQTT broker {mqtt.host}:{mqtt.port}: {exc}") from None
    return None


def _json_object(payload: Any) -> dict[str, Any] | None:
    try:
        value = json.loads(bytes(payload))
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
