"""Every message a test publishes or archives must match its JSON Schema, controller/schemas/<kind>.json.

Why a plugin and not more examples: the schemas are the contract with every consumer, and a
hand-picked sample of builder calls (tests/test_mqtt_schemas.py) let every QC result fail its
schema unnoticed. So this records each message where it leaves the code, whichever test made
it, and fails that test when one does not match:

* `Outbox.put_many_stored`: everything committed for the sinks, as the JSON text stored;
* `HistoryArchive.add_many`: what a test archives directly;
* `QcResult.to_message`: QC verdicts, also those only printed (`hotlab qc --json`);
* the MQTT sink's `_encode`: what it publishes without the outbox (the controller status and its
  Last Will, the outbox alarm, command replies), the kind read from the payload's `schema`;
* `CommandHandler._reply`: command replies, also where a test stands in for the MQTT sink;
* `HistoryArchive.query`: payloads a test reads back that this process never wrote, i.e. what
  another process (`hotlab run`, `hotlab demo`) archived: the only way its messages reach us.

The kind picks the schema, and a kind without one is a failure too. Recording only keeps the
JSON text; it is validated once the test phase is over, each text once, so the timing a test
measures does not include validation. A test that needs a malformed message (to see it refused
or survived) passes it through `malformed_on_purpose` first.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from jsonschema.exceptions import best_match

from hotlab.controller.archive import HistoryArchive
from hotlab.controller.commands import CommandHandler
from hotlab.controller.messages import Message
from hotlab.controller.outbox import Outbox, StoredPayload
from hotlab.controller.qc.result import QcResult
from hotlab.controller.sinks import mqtt

SCHEMAS = Path(__file__).resolve().parent.parent / "controller" / "schemas"

_SCHEMA_FIELD = re.compile(r"hotlab\.([a-z_]+)/[0-9]+")
#: RFC 3339 date-time (jsonschema checks "date-time" only with rfc3339-validator installed).
_RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})")


def _is_rfc3339(instance: object) -> bool:
    if not isinstance(instance, str):
        return True  # "format" constrains strings only
    if _RFC3339.fullmatch(instance) is None:
        return False
    try:
        datetime.fromisoformat(instance)
    except ValueError:  # a month 13, a 25th hour
        return False
    return True


_FORMATS = jsonschema.FormatChecker()
_FORMATS.checks("date-time")(_is_rfc3339)


@functools.cache
def validator_for(kind: str) -> jsonschema.Draft202012Validator | None:
    """The validator of controller/schemas/<kind>.json, checked as a schema itself; None if there is none."""
    path = SCHEMAS / f"{kind}.json"
    if not path.is_file():
        return None
    schema = json.loads(path.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=_FORMATS)


@dataclass(frozen=True, slots=True)
class Violation:
    """One message that does not match its schema: where it was recorded and its most relevant error."""

    kind: str
    where: str
    path: str
    error: str
    msg_id: str


def validate(kind: str | None, where: str, text: str) -> Violation | None:
    """The violation of one message's JSON `text`, or None; `kind` None means: take it from the `schema` field."""
    payload = json.loads(text)
    fields = payload if isinstance(payload, dict) else {}
    msg_id = str(fields.get("msg_id") or fields.get("request_id") or "-")
    if kind is None:
        tag = fields.get("schema")
        found = _SCHEMA_FIELD.fullmatch(tag) if isinstance(tag, str) else None
        if found is None:
            return Violation("?", where, "$.schema", f"{tag!r} names no hotlab.<kind>/<version>", msg_id)
        kind = found.group(1)
    validator = validator_for(kind)
    if validator is None:
        return Violation(kind, where, "$", f"no schema {SCHEMAS.name}/{kind}.json for this kind", msg_id)
    error = best_match(validator.iter_errors(payload))
    if error is None:
        return None
    return Violation(kind, where, error.json_path, _shortened(error.message), msg_id)


def _shortened(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit]}…"


def _json(payload: Mapping[str, Any]) -> str:
    """As the outbox and the archive store a payload."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False)


class MessageLog:
    """What the tests made, to be validated; thread-safe (the sinks record from worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: (kind, where, JSON text) recorded since the last `violations()`; kind None: see `validate`.
        self._texts: list[tuple[str | None, str, str]] = []
        #: msg_ids of every message this process wrote: checked then, so not again when read back.
        self._written: set[str] = set()
        #: JSON texts of the messages tests made malformed on purpose.
        self._malformed: set[str] = set()

    def clear(self) -> None:
        """Forget what was recorded and not yet validated."""
        with self._lock:
            self._texts = []

    def wrote(self, where: str, messages: Sequence[Message]) -> None:
        self.add(((m.kind, where, _json(m.payload)) for m in messages), (m.payload.get("msg_id") for m in messages))

    def stored(self, messages: Sequence[Message], stored: Sequence[StoredPayload]) -> None:
        self.add(((s.kind, "outbox", s.payload_json) for s in stored), (m.payload.get("msg_id") for m in messages))

    def read(self, kind: str, payloads: Iterable[Mapping[str, Any]]) -> None:
        with self._lock:
            unseen = [p for p in payloads if p.get("msg_id") not in self._written]
        self.add((kind, "archive read", _json(p)) for p in unseen)

    def add(self, texts: Iterable[tuple[str | None, str, str]], msg_ids: Iterable[object] = ()) -> None:
        with self._lock:
            self._texts.extend(texts)
            self._written.update(str(msg_id) for msg_id in msg_ids if msg_id is not None)

    def malformed_on_purpose(self, message: Message) -> None:
        text = _json(message.payload)
        if validate(message.kind, "malformed_on_purpose", text) is None:
            raise AssertionError(f"this {message.kind} message matches its schema: it is not malformed")
        with self._lock:
            self._malformed.add(text)

    def violations(self) -> list[Violation]:
        """Validate what was recorded since the last call, each (kind, text) once."""
        with self._lock:
            texts, self._texts = self._texts, []
            malformed = set(self._malformed)
        unique = (entry for entry in dict.fromkeys(texts) if entry[2] not in malformed)
        found = (validate(kind, where, text) for kind, where, text in unique)
        return [violation for violation in found if violation is not None]


#: The one log the plugin keeps for the whole session.
LOG = MessageLog()


def malformed_on_purpose(message: Message) -> Message:
    """`message`, which the test made malformed on purpose: the check lets exactly this payload pass.

    Fails if the message matches its schema after all, so no such mark outlives its reason.
    """
    LOG.malformed_on_purpose(message)
    return message


def report(violations: list[Violation]) -> str:
    """One line per distinct problem, with how many messages have it and one msg_id as an example."""
    counts = Counter((v.kind, v.where, v.path, v.error) for v in violations)
    example = {(v.kind, v.where, v.path, v.error): v.msg_id for v in reversed(violations)}
    lines = [f"{len(violations)} message(s) do not match their schema ({SCHEMAS.name}/<kind>.json):"]
    for key, count in counts.items():
        kind, where, path, error = key
        lines.append(f"  {kind} at {path}: {error}  [{where}; {count} message(s), e.g. msg_id {example[key]}]")
    return "\n".join(lines)


class SchemaCheck:
    """The pytest plugin: patches the places above for the whole session and judges each test phase."""

    def __init__(self) -> None:
        self._patches = pytest.MonkeyPatch()

    def pytest_sessionstart(self) -> None:
        put_many_stored, add_many, query = Outbox.put_many_stored, HistoryArchive.add_many, HistoryArchive.query
        to_message, reply, encode = QcResult.to_message, CommandHandler._reply, mqtt._encode

        @functools.wraps(put_many_stored)
        def recorded_put(outbox: Outbox, messages: Iterable[Message]) -> list[StoredPayload]:
            batch = list(messages)  # may be a generator: read it once, here
            stored = put_many_stored(outbox, batch)
            LOG.stored(batch, stored)
            return stored

        @functools.wraps(add_many)
        def recorded_add(archive: HistoryArchive, messages: Iterable[Message]) -> int:
            batch = list(messages)
            added = add_many(archive, batch)
            LOG.wrote("archive", batch)
            return added

        @functools.wraps(query)
        def recorded_query(archive: HistoryArchive, kind: str, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
            payloads = query(archive, kind, *args, **kwargs)
            LOG.read(kind, payloads)
            return payloads

        @functools.wraps(to_message)
        def recorded_result(result: QcResult, *args: Any, **kwargs: Any) -> Message:
            message = to_message(result, *args, **kwargs)
            LOG.wrote("QcResult.to_message", [message])
            return message

        @functools.wraps(reply)
        async def recorded_reply(handler: CommandHandler, *args: Any, **kwargs: Any) -> dict[str, Any]:
            answer = await reply(handler, *args, **kwargs)
            LOG.add([("command_reply", "command reply", _json(answer))])
            return answer

        @functools.wraps(encode)
        def recorded_encode(payload: dict[str, Any]) -> bytes:
            data = encode(payload)
            LOG.add([(None, "MQTT", data.decode())])
            return data

        for owner, name, replacement in (
            (Outbox, "put_many_stored", recorded_put),
            (HistoryArchive, "add_many", recorded_add),
            (HistoryArchive, "query", recorded_query),
            (QcResult, "to_message", recorded_result),
            (CommandHandler, "_reply", recorded_reply),
            (mqtt, "_encode", recorded_encode),
        ):
            self._patches.setattr(owner, name, replacement)

    def pytest_sessionfinish(self) -> None:
        self._patches.undo()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self) -> Any:
        LOG.clear()  # what a lingering thread of an earlier test recorded is not this test's
        return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self) -> Any:
        result = yield
        _judge()  # setup and call
        return result

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self) -> Any:
        result = yield
        _judge()  # teardown, and whatever a failed call left
        return result


def _judge() -> None:
    violations = LOG.violations()
    if violations:
        pytest.fail(report(violations), pytrace=False)
