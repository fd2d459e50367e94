"""Signed commands: a sender's HMAC over the topic and the command, instead of a secret in the payload.

Why: a bearer token in a command's payload is read by every client subscribed to `hotlab/#`, and
whoever reads it can act as that person. A signature proves which sender (the web panel, an admin
tool: each with its own key shared only with the controller) sent exactly this command to exactly
this device, and gives nothing away that would let anyone else sign another. The person who acted
is named in the command; the sender vouches for them (it checked their password first).

Wire format (`hotlab.signed_command/1`, docs/mqtt.md): a JSON object with the sender's name, the
command itself as a JSON *text* (so the bytes signed are the bytes received, with no JSON
canonicalisation for another implementation to get subtly wrong), and the signature:

    {"schema": "hotlab.signed_command/1", "sender": "panel",
     "command": "{\"schema\":\"hotlab.command/2\", ...}", "signature": "<64 hex digits>"}

signature = HMAC-SHA256(key, DOMAIN || topic || 0x0A || command), all UTF-8. The topic is signed
so a command for one device cannot be replayed to another; freshness (`issued_at`) and the request
id memory of the command path (controller/commands.py) stop replays in time.

Everything that builds a command (the web panel, `hotlab cmd`, the simulated lab's consoles) goes
through `command_body` and `signed_payload`, so there is one way to make one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

from hotlab.controller.messages import iso_utc

SIGNED_SCHEMA = "hotlab.signed_command/1"
#: The command inside a signed envelope: the envelope of `hotlab.command/1` without its token.
COMMAND_SCHEMA = "hotlab.command/2"
#: RFC 2104 §3: a key shorter than the hash output (32 bytes for SHA-256) weakens the MAC.
MIN_KEY_BYTES = 32
SIGNATURE_HEX_CHARS = 64
#: Commands are a few hundred bytes; anything larger is a mistake or an attack on the parser.
MAX_PAYLOAD_BYTES = 4096
#: Prefixed to what is signed, so a signature made for anything else with the same key never verifies here.
_DOMAIN = b"hotlab.signed_command/1\n"
_HEX = re.compile(r"[0-9a-fA-F]*")


def sender_key(text: str) -> bytes:
    """The key a sender shares with the controller, from its hex text (`secrets.token_hex(32)`).

    ValueError says what is wrong with it, never what it is.
    """
    if len(text) % 2 or not _HEX.fullmatch(text):
        raise ValueError("is not hex text (an even number of the digits 0-9 and a-f)")
    key = bytes.fromhex(text)
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"has {len(key)} bytes; at least {MIN_KEY_BYTES} are needed "
            "(python3 -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return key


def command_body(
    *,
    user: str,
    reason: str,
    args: Mapping[str, Any],
    request_id: str | None = None,
    issued_ns: int | None = None,
) -> dict[str, Any]:
    """A `hotlab.command/2` by `user`: a new request id (a UUID) unless given, issued now unless `issued_ns` says when."""
    return {
        "schema": COMMAND_SCHEMA,
        "request_id": request_id if request_id is not None else uuid.uuid4().hex,
        "user": user,
        "reason": reason,
        "issued_at": iso_utc(time.time_ns() if issued_ns is None else issued_ns),
        "args": dict(args),
    }


def _message(topic: str, command_text: str) -> bytes:
    return _DOMAIN + topic.encode() + b"\n" + command_text.encode()


def signature(key: bytes, topic: str, command_text: str) -> str:
    """The hex HMAC-SHA256 a sender holding `key` puts beside `command_text` published on `topic`."""
    return hmac.new(key, _message(topic, command_text), hashlib.sha256).hexdigest()


def signature_matches(key: bytes, topic: str, command_text: str, claimed: str) -> bool:
    """Whether `claimed` is the signature of this command on this topic (constant time in the claim)."""
    return hmac.compare_digest(signature(key, topic, command_text).encode(), claimed.encode("ascii", "replace"))


def signed_payload(topic: str, command: Mapping[str, Any], *, sender: str, key: bytes) -> bytes:
    """The MQTT payload of `command` (a `hotlab.command/2` object) signed by `sender` for `topic`.

    ValueError for a key too short or a command too large for the controller to accept.
    """
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"a sender key needs at least {MIN_KEY_BYTES} bytes, this one has {len(key)}")
    text = json.dumps(dict(command), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    envelope = {"schema": SIGNED_SCHEMA, "sender": sender, "command": text, "signature": signature(key, topic, text)}
    payload = json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode()
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(
            f"the signed command has {len(payload)} bytes; the controller accepts at most {MAX_PAYLOAD_BYTES}"
        )
    return payload
