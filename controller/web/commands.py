"""The panel's command path: who may sign an action, and the sender that puts it on the bus.

There is exactly one way to act on a device (docs/mqtt.md, "Commands"): a command published on
`hotlab/<site>/<station>/<device>/cmd/<action>` and answered on `<topic>/reply`, validated,
authorised and audited by the controller. The panel is one more sender on that path, under its
own broker identity and its own sender key (controller/command_signing.py): it names the person
whose password the page checked, and signs. No secret of that person travels on the bus.

Before anything is sent, the page has the person sign: their username and password again for each
action (21 CFR 11.200(a)(1): both components of the signature), checked by the user store (audited,
counted for lockout), and their role against `[commands.min_role]`. The controller checks the role
again; the page only spares the person a command that would be refused.

One long-lived connection, subscribed to every reply of the site before anything is sent, so a
reply cannot arrive before the page waits for it. `send` never raises for what the bus does: a
broker that is gone or a controller that does not answer comes back as an answer that says so,
for the page to show. aiomqtt 2.x does not reconnect by itself, so `run` does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiomqtt
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from hotlab.controller.audit import USER_AUTH_FAILED
from hotlab.controller.command_signing import command_body, signed_payload
from hotlab.controller.commands import MAX_REASON_CHARS, REPLY_SCHEMA, reply_topic
from hotlab.controller.config import DeviceConfig, LabConfig, MqttConfig
from hotlab.controller.messages import TOPIC_ROOT
from hotlab.controller.users import AccessDenied, Credentials, User, account_target
from hotlab.controller.web.auth import signed_in
from hotlab.controller.web.live import broker_client
from hotlab.controller.web.panel import Panel, require_role
from hotlab.errors import HotlabError

log = logging.getLogger("hotlab.web")

#: How long a page waits for the controller's reply. A station command holds the device for at most
#: its read, write and acknowledgement (`confirm_timeout_s`, 5 s by default) after two audit fsyncs.
DEFAULT_REPLY_TIMEOUT_S = 10.0
#: How long to wait before connecting again after the broker was lost or refused us.
RECONNECT_S = 1.0
#: Answers kept for the page that shows them after its redirect, and replies per device for the pages.
REMEMBERED_ANSWERS = 256
#: Outcomes the panel gives when the controller never answered (the controller's own are in docs/mqtt.md).
NOT_SENT = "not_sent"
NO_REPLY = "no_reply"
#: What a page says to any refused signature: which of user, password, lock or disabled account it was
#: is in the audit trail, not on a screen anyone can walk up to (as the login form does).
SIGNATURE_REFUSED = "Signature refused: unknown user or wrong password, or the account is locked or disabled."
NO_SENDER = "This panel has no command sender ([web] sender): it shows the lab, it does not act."


class ActionRefused(HotlabError):
    """The page refuses to send an action; `status` is the HTTP status of the page that says why."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def privilege(action: str) -> str:
    """The `[commands.min_role]` key of an action the pages send, as the controller reads it
    (controller/commands.py `role_key`): ending a procedure is authorised as starting one. The
    pages start no baseline procedure and send no label, the other cases of `role_key`."""
    return "start_qc" if action == "end_qc" else action


def role_refusal(panel: Panel, user: User, action: str) -> str | None:
    """Why `user`'s role may not send `action` under this lab's `[commands.min_role]`, or None if it may."""
    try:
        require_role(user, panel.config.commands.min_role[privilege(action)])
    except HTTPException as refused:
        return f"{refused.detail} ([commands.min_role] {privilege(action)})"
    return None


@dataclass(frozen=True, slots=True)
class Confirmation:
    """An action as the person asked for it, to be confirmed and signed; `request_id` names the intention."""

    action: str
    #: What the buttons say, and what the person is about to do (the meaning of the signature).
    title: str
    meaning: str
    args: dict[str, Any]
    reason: str
    request_id: str


def confirmation(form: FormData, action: str, title: str, meaning: str, args: dict[str, Any]) -> Confirmation:
    """`action` with the form's reason and request id, or ValueError with one line saying what to correct.

    The confirmation screen carries the request id it was shown with; a form without one (the first
    step) is a new intention and gets a new id.
    """
    reason = str(form.get("reason") or "").strip()
    if not reason:
        raise ValueError("Say why (the reason goes into the audit trail with your name).")
    if len(reason) > MAX_REASON_CHARS:
        raise ValueError(f"The reason has {len(reason)} characters; at most {MAX_REASON_CHARS} are accepted.")
    request_id = str(form.get("request_id") or "")
    if not (len(request_id) == 32 and all(c in "0123456789abcdef" for c in request_id)):
        request_id = new_request_id()
    return Confirmation(action, title, meaning, args, reason, request_id)


class ShowPage(Protocol):
    """A device page rendered with a confirmation to sign, or a refusal, with its HTTP status."""

    def __call__(
        self, *, confirm: Confirmation | None = None, error: str | None = None, status: int = 200
    ) -> Response: ...


async def confirm_or_send(
    panel: Panel,
    request: Request,
    device: DeviceConfig,
    action: str,
    read: Callable[[FormData], Confirmation],
    show: ShowPage,
) -> Response:
    """One step of a signed action: the confirmation screen, or the signature checked and the command sent.

    The role is checked before anything else, so a person is not asked to confirm what they may not
    do. After sending, a redirect to the device's page with the answer: a reload shows the answer
    again and sends nothing.
    """
    if panel.commands is None:
        return show(error=NO_SENDER, status=503)
    _, user = signed_in(request)
    try:
        await _allowed(panel, user, action, device.name)
    except ActionRefused as refused:
        return show(error=str(refused), status=refused.status)
    form = await request.form()
    try:
        confirm = read(form)
    except ValueError as bad:
        return show(error=str(bad), status=400)
    if form.get("confirmed") != "yes":
        return show(confirm=confirm)
    credentials = Credentials(str(form.get("username") or ""), str(form.get("password") or ""))
    try:
        person = await signer(panel, user, credentials, action, device.name)
    except ActionRefused as refused:
        return show(confirm=confirm, error=str(refused), status=refused.status)
    answer = await panel.commands.send(
        device, action, confirm.args, user=person.username, reason=confirm.reason, request_id=confirm.request_id
    )
    return RedirectResponse(f"{request.url.path.rsplit('/', 1)[0]}?answer={answer.request_id}", status_code=303)


def shown_answer(panel: Panel, request: Request, device: DeviceConfig) -> CommandAnswer | None:
    """The answer the page was redirected to show (`?answer=<request id>`), if it is this device's."""
    request_id = request.query_params.get("answer")
    if panel.commands is None or request_id is None:
        return None
    answer = panel.commands.answer(request_id)
    return answer if answer is not None and answer.device == device.name else None


async def signer(panel: Panel, signed_in: User, credentials: Credentials, action: str, device: str) -> User:
    """The person signing `action` on `device`: the one signed in, with their password checked again
    and a role that may send it; else ActionRefused saying why (a refused password or role is audited)."""
    if credentials.username != signed_in.username:
        raise ActionRefused(
            f"Sign as the person signed in here ({signed_in.username}); to act as someone else, sign out first.", 403
        )
    try:
        user = await panel.authenticate(credentials, purpose=_purpose(action, device))
    except AccessDenied:
        raise ActionRefused(SIGNATURE_REFUSED, 401) from None
    await _allowed(panel, user, action, device)  # again: the role may have changed since the sign-in
    return user


async def _allowed(panel: Panel, user: User, action: str, device: str) -> None:
    """ActionRefused unless `user`'s role may send `action`; a refusal is an attempt at unauthorised use,
    audited as the user store audits a role refusal (21 CFR 11.300(d): such attempts are reported)."""
    refusal = role_refusal(panel, user, action)
    if refusal is None:
        return
    await panel.store.audit.append_async(
        actor=user.username,
        action=USER_AUTH_FAILED,
        target=account_target(user.username),
        reason=f"refused {_purpose(action, device)}: {refusal}",
    )
    raise ActionRefused(refusal, 403)


def _purpose(action: str, device: str) -> str:
    """What an audit record says was attempted."""
    return f"web command {action} on {device}"


@dataclass(frozen=True, slots=True)
class CommandAnswer:
    """What became of one command: the controller's outcome and its reply, or why there is none."""

    request_id: str
    device: str
    action: str
    #: The reply's outcome (executed, refused, unauthorised, …), else NOT_SENT or NO_REPLY.
    outcome: str
    #: One sentence for the person who signed: the controller's error, or what the command changed.
    message: str
    reply: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        return self.outcome == "executed"


def command_topic(site: str, device: DeviceConfig, action: str) -> str:
    return f"{TOPIC_ROOT}/{site}/{device.station}/{device.name}/cmd/{action}"


def new_request_id() -> str:
    """A request id for one intention (docs/mqtt.md: the same id is never run twice)."""
    return uuid.uuid4().hex


class CommandSender:
    """Signs and publishes commands as sender `sender`, and hands each page the reply to its command."""

    def __init__(
        self,
        site: str,
        mqtt: MqttConfig,
        sender: str,
        key: bytes,
        *,
        reply_timeout_s: float = DEFAULT_REPLY_TIMEOUT_S,
    ) -> None:
        self.site = site
        self.mqtt = mqtt
        self.sender = sender
        self._key = key
        self.reply_timeout_s = reply_timeout_s
        #: For each device, the newest reply from any sender that says something of it (a state, a setting):
        #: the last word the controller said about the device. A refusal before the device was reached
        #: (unauthorised, malformed, expired) says nothing of it and is not kept here.
        self.latest: dict[str, dict[str, Any]] = {}
        self._client: aiomqtt.Client | None = None
        self._running = False
        self._broker_error = "not connected yet"
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._answers: OrderedDict[str, CommandAnswer] = OrderedDict()

    @classmethod
    def for_lab(cls, config: LabConfig) -> CommandSender | None:
        """The sender `[web] sender` names, with its `[[command_sender]]` key and the panel's broker identity;
        None when the lab gives the panel no sender (it then shows, never acts) or has no broker."""
        sender = config.command_sender(config.web.sender) if config.web.sender is not None else None
        if sender is None or config.mqtt is None:
            return None
        return cls(config.site, config.web.broker(config.mqtt), sender.name, sender.key_bytes())

    @property
    def connected(self) -> bool:
        return self._client is not None

    def answer(self, request_id: str) -> CommandAnswer | None:
        """The answer to a command this panel sent recently, for the page shown after it."""
        return self._answers.get(request_id)

    async def run(self, *, subscribed: asyncio.Event | None = None) -> None:
        """Stay connected and subscribed to the site's command replies until cancelled (once per sender)."""
        if self._running:
            raise RuntimeError("this command sender is already running; start it once, in the app's lifespan")
        self._running = True
        try:
            await self._stay_connected(subscribed)
        finally:
            self._running = False

    async def _stay_connected(self, subscribed: asyncio.Event | None) -> None:
        identifier = f"hotlab-web-commands-{uuid.uuid4().hex[:8]}"
        while True:
            try:
                async with broker_client(self.mqtt, identifier) as client:
                    await client.subscribe(reply_topic(f"{TOPIC_ROOT}/{self.site}/+/+/cmd/+"), qos=1)
                    self._client, self._broker_error = client, ""
                    if subscribed is not None:
                        subscribed.set()
                    async for message in client.messages:
                        self._take_reply(message.payload)
            except aiomqtt.MqttError as exc:
                self._broker_error = str(exc)
                log.warning("web panel: command connection to the broker lost: %s", exc)
            finally:
                self._client = None
            await asyncio.sleep(RECONNECT_S)

    async def send(
        self,
        device: DeviceConfig,
        action: str,
        args: dict[str, Any],
        *,
        user: str,
        reason: str,
        request_id: str | None = None,
    ) -> CommandAnswer:
        """Sign and publish `action` for `device` as done by `user`, and wait for the controller's reply.

        `user` must be the person whose password the page has just checked: the signature vouches
        for them. A `request_id` made when the person was asked to confirm makes a resubmitted form
        one intention, answered again by the controller, never run twice.
        """
        request_id = request_id or new_request_id()
        topic = command_topic(self.site, device, action)
        command = command_body(user=user, reason=reason, args=args, request_id=request_id)
        payload = signed_payload(topic, command, sender=self.sender, key=self._key)
        client = self._client
        if client is None:
            return self._remember(
                request_id,
                device,
                action,
                NOT_SENT,
                f"not connected to the broker ({self._broker_error}); the command was not sent",
            )
        waiting = self._waiting.setdefault(request_id, asyncio.get_running_loop().create_future())
        try:
            await client.publish(topic, payload, qos=1, retain=False, timeout=self.reply_timeout_s)
        except aiomqtt.MqttError as exc:
            self._waiting.pop(request_id, None)
            return self._remember(
                request_id, device, action, NOT_SENT, f"the broker did not take the command ({exc}); it was not sent"
            )
        try:
            reply = await asyncio.wait_for(asyncio.shield(waiting), self.reply_timeout_s)
        except TimeoutError:
            return self._remember(
                request_id,
                device,
                action,
                NO_REPLY,
                f"no reply within {self.reply_timeout_s:g} s: check the controller, and the device before "
                "acting again (the command may have run; the audit trail says whether it did)",
            )
        finally:
            self._waiting.pop(request_id, None)
        return self._remember(request_id, device, action, str(reply["outcome"]), _said(reply), reply)

    def _take_reply(self, payload: Any) -> None:
        """One message on a reply topic: remembered per device, and handed to the send waiting for it."""
        try:
            reply = json.loads(payload)
        except (TypeError, ValueError, RecursionError):
            log.warning("web panel: a command reply that is not JSON was ignored")
            return
        if not (
            isinstance(reply, dict)
            and reply.get("schema") == REPLY_SCHEMA
            and isinstance(reply.get("request_id"), str)
            and isinstance(reply.get("outcome"), str)
            and isinstance(reply.get("device"), str)
        ):
            return  # a reply to a command too malformed to name its request: nobody here waits for it
        if reply.get("old_value") is not None or reply.get("new_value") is not None:
            self.latest[reply["device"]] = reply
        waiting = self._waiting.get(reply["request_id"])
        if waiting is not None and not waiting.done():
            waiting.set_result(reply)

    def _remember(
        self,
        request_id: str,
        device: DeviceConfig,
        action: str,
        outcome: str,
        message: str,
        reply: dict[str, Any] | None = None,
    ) -> CommandAnswer:
        answer = CommandAnswer(request_id, device.name, action, outcome, message, reply)
        self._answers[request_id] = answer
        self._answers.move_to_end(request_id)
        while len(self._answers) > REMEMBERED_ANSWERS:
            self._answers.popitem(last=False)
        if not answer.ok:
            log.info("command %s on %s for the web panel: %s: %s", action, device.name, outcome, message)
        return answer


def _said(reply: dict[str, Any]) -> str:
    """The reply in one sentence: its error, or what changed (old → new), and whether it was a repeat."""
    repeat = " (answered again: this request was already sent, it did not run twice)" if reply.get("duplicate") else ""
    if reply.get("error"):
        return f"{reply['error']}{repeat}"
    old, new = reply.get("old_value"), reply.get("new_value")
    if isinstance(old, dict) and isinstance(new, dict):
        changes = [f"{key} {old.get(key)} → {new[key]}" for key in new if key in old and old[key] != new[key]]
        if changes:
            return f"done: {', '.join(changes)}{repeat}"
    return f"done{repeat}"
