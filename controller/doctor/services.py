"""The doctor's checks of the lab's services: the MQTT broker and InfluxDB, with the lab's credentials.

The broker check connects as the controller does (controller/sinks/mqtt.py: MQTT 5, the same host,
credentials, TLS files and hostname check, `connect_timeout_s`) but under a client id of its own:
a second connection with the controller's id would make the broker drop the running controller.
It publishes nothing, so the ACL (who may publish what) is not checked.

The InfluxDB check asks /ping, then posts each write request the sink makes (controller/sinks/
influx.py, from the same settings: raw readings and everything else may go to different retention
policies or buckets) with no points in it: the server checks the credentials and that the target
exists and may be written, and stores nothing (InfluxDB 1.x /write and, since 2.1 (influxdb#22574),
/api/v2/write answer an empty write 204). A 1.x database or retention policy that is missing is fine
if the sink will create it at start (`provision`, and a user InfluxDB lets run SHOW USERS, i.e. an
admin); otherwise the finding lists what an admin runs. A server that refuses an empty write (400)
is older: reachable, but its credentials could not be checked without writing, which the doctor
never does.
"""

from __future__ import annotations

import asyncio
import secrets
import urllib.error
import urllib.parse
import urllib.request
from typing import NamedTuple

import aiomqtt

from hotlab.controller.config import InfluxSection, MqttConfig
from hotlab.controller.doctor.finding import Finding, Status
from hotlab.controller.sinks.influx import InfluxConfig, server_words, write_target
from hotlab.controller.sinks.influx_v1 import provisioning_statements
from hotlab.controller.sinks.mqtt import tls_parameters

#: InfluxDB answers a write of nothing with this when it accepted the request (and /ping too, in 1.x and 2.x).
NO_CONTENT = 204
#: Straight to the server, as the sink's urllib3 pool goes: no proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


async def broker_finding(mqtt: MqttConfig, subject: str) -> Finding:
    """Connect and disconnect with `mqtt`'s settings; FAIL with the broker's reason if it refuses."""
    tls = mqtt.tls
    client = aiomqtt.Client(
        mqtt.host,
        mqtt.port,
        identifier=f"hotlab-doctor-{secrets.token_hex(4)}",
        username=mqtt.username,
        password=mqtt.password.reveal() if mqtt.password is not None else None,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=True,
        keepalive=mqtt.keepalive_s,
        timeout=mqtt.connect_timeout_s,
        tls_params=tls_parameters(tls),
        tls_insecure=tls.insecure_skip_hostname_check if tls is not None else None,
    )
    where = f"{mqtt.host}:{mqtt.port}{' (TLS)' if tls is not None else ''}"
    who = f"user {mqtt.username}" if mqtt.username is not None else "an anonymous client"
    try:
        async with client:
            pass
    except aiomqtt.MqttCodeError as exc:
        return Finding("FAIL", subject, f"{where} refused {who}: {exc}")
    except aiomqtt.MqttError as exc:
        return Finding("FAIL", subject, f"cannot connect to {where}: {exc}")
    return Finding("ok", subject, f"{where} accepted {who} (MQTT 5, as the controller connects)")


async def influx_finding(section: InfluxSection) -> Finding:
    return await asyncio.to_thread(_influx_finding, InfluxConfig.from_section(section))


class _Reply(NamedTuple):
    status: int
    version: str
    #: The server's own words when it refused (1.x `error`, 2.x `message`).
    words: str
    body: str

    @property
    def missing(self) -> bool:
        """A database, retention policy or bucket that does not exist (1.x: 404 database, 500 policy)."""
        return self.status in (404, 500) and "not found" in self.words


def _influx_finding(cfg: InfluxConfig) -> Finding:
    base, subject = cfg.url.rstrip("/"), f"influx {cfg.url}"
    headers = {"Content-Type": "text/plain; charset=utf-8"}
    if (authorization := cfg.authorization()) is not None:
        headers["Authorization"] = authorization
    try:
        ping = _request("GET", f"{base}/ping", {}, cfg.timeout_s)
        if ping.status not in (200, NO_CONTENT):
            return Finding("FAIL", subject, f"/ping answered HTTP {ping.status}: is this InfluxDB's URL?")
        # The sink's two writes: everything else, and raw readings (their own policy or bucket, if any).
        writes = [
            _request("POST", base + write_target(cfg.target, raw), headers, cfg.timeout_s) for raw in (False, True)
        ]
        admin = cfg.target.database is not None and _may_administer(base, headers, cfg.timeout_s)
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return Finding("FAIL", subject, f"cannot reach it: {reason}")
    status, detail = _judge(cfg, f"InfluxDB {ping.version}", writes, admin)
    return Finding(status, subject, detail)


def _judge(cfg: InfluxConfig, server: str, writes: list[_Reply], admin: bool) -> tuple[Status, str]:
    target = cfg.target
    who = f"user {cfg.username}" if cfg.username is not None else "the token"
    where = f"database {target.database}" if target.database is not None else f"bucket {target.bucket}"
    for reply in writes:
        if reply.status == 401:
            return "FAIL", f"{server} refused the credentials of {who}: {reply.words}"
        if reply.status == 403:
            return "FAIL", f"{server} does not let {who} write to {where}: {reply.words}"
        if reply.status == 400:
            return "warn", f"{server} refuses a write of nothing, so the credentials are unchecked: {reply.words}"
        if not (200 <= reply.status < 300 or reply.missing):
            return "FAIL", f"{server}: HTTP {reply.status}: {reply.words}"
    missing = "; ".join(dict.fromkeys(reply.words for reply in writes if reply.missing))
    if not missing:
        return "ok", f"{server} lets {who} write to {where} (a write of nothing)"
    if target.database is None:
        return "FAIL", f"{server}: {missing}"
    if target.provision and admin:
        return "ok", f"{server}: {missing}, which the sink creates at start ({who} is an admin)"
    statements = "; ".join(provisioning_statements(target.database, target.raw_days, target.retention_policy))
    return "FAIL", f"{server}: {missing}, and {who} may not create it: an admin runs {statements}"


def _may_administer(base: str, headers: dict[str, str], timeout_s: float) -> bool:
    """Whether InfluxDB 1.x lets these credentials run an admin statement (SHOW USERS reads, changes nothing)."""
    reply = _request("GET", f"{base}/query?{urllib.parse.urlencode({'q': 'SHOW USERS'})}", headers, timeout_s)
    return reply.status == 200 and '"error"' not in reply.body


def _request(method: str, url: str, headers: dict[str, str], timeout_s: float) -> _Reply:
    """One HTTP request (a POST with an empty body); an HTTP error status is an answer here, not an exception."""
    request = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method, headers=headers)
    try:
        with _DIRECT.open(request, timeout=timeout_s) as response:
            status, reply_headers, body = int(response.status), response.headers, response.read()
    except urllib.error.HTTPError as exc:
        status, reply_headers, body = exc.code, exc.headers, exc.read()
    text = body.decode("utf-8", "replace")
    words = server_words(text, reply_headers) if status >= 300 else ""
    return _Reply(status, reply_headers.get("X-Influxdb-Version", "(version not given)"), words, text)
