"""A real `influxd` for tests: free loopback ports, temp data dir, auth on, stop/restart, cleanup.

Import the fixtures into a test module to use them:

    from tests.influx_service import influx_server, influx_database  # noqa: F401

`influx_server` is one server per test module; `influx_database` is a fresh database on it per
test. For tests that stop and restart the server, build an `InfluxService` yourself.

The sink writes to InfluxDB 1.x natively (`url`, `sink_settings`). InfluxDB 1.6.7 (the only
version packaged here) predates the /api/v2/write endpoint that 1.8 added, so to test the sink's
2.x/3.x path the service also runs `V2WriteBridge` (`v2_url`, `v2_settings`): a small HTTP server
that serves what a 1.8 server serves, the 1.x API (forwarded as is) plus POST
/api/v2/write?org=-&bucket=db/rp&precision=ns with `Authorization: Token user:password`, which it
forwards to 1.x /write?db=&rp=&precision= with the same credentials. The bridge starts and stops
with influxd, so an outage looks like an outage (connection refused), not like an HTTP error from
a proxy.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

INFLUXD = shutil.which("influxd") or "/usr/bin/influxd"
_START_TIMEOUT_S = 60.0  # a loaded 2-core CI box running other servers can be slow to open a TSM store
_START_ATTEMPTS = 4  # lost port races tolerated per start() before giving up
_PORT_WAIT_S = 5.0  # how long a restart waits for its old ports before moving to new ones

_CONFIG = """\
reporting-enabled = false
bind-address = "127.0.0.1:{rpc_port}"

[meta]
  dir = "{root}/meta"
  logging-enabled = false

[data]
  dir = "{root}/data"
  wal-dir = "{root}/wal"
  index-version = "inmem"
  query-log-enabled = false
  wal-fsync-delay = "0s"

[monitor]
  store-enabled = false

[subscriber]
  enabled = false

[continuous_queries]
  enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{http_port}"
  auth-enabled = true
  log-enabled = false
  pprof-enabled = false

[logging]
  level = "warn"
  suppress-logo = true
"""

# /api/v2/write precision names -> InfluxDB 1.x /write precision names.
_PRECISIONS = {"ns": "ns", "us": "u", "ms": "ms", "s": "s"}


class InfluxServiceError(RuntimeError):
    """influxd did not start, or a query against it failed."""


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that were free a moment ago (bind port 0, let the kernel choose)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def ports_free_within(ports: list[int], timeout_s: float) -> bool:
    """Wait until every port in `ports` can be bound on 127.0.0.1 again; False if one is still taken at the deadline.

    The probe sets SO_REUSEADDR as Go's listeners (influxd) do, so connections of the previous
    run lingering in TIME_WAIT do not count as taken; only a live socket does.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            for port in ports:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


class InfluxService:
    """One influxd process plus its v2 write bridge; the data dir and the bridge port survive stop/restart.

    influxd's own ports normally survive too, but if one was taken while the server was down, a
    restart moves influxd to fresh ports (see `start`); read `url` after a restart, not before.
    """

    def __init__(self, root: Path, username: str = "hotlab", password: str = "hot-lab-secret") -> None:
        self.root = Path(root)
        self.username = username
        self.password = password
        self.http_port, self.rpc_port = free_ports(2)
        self.bridge_port = 0  # the bridge binds port 0 on its first start and keeps that port afterwards
        self._process: subprocess.Popen[bytes] | None = None
        self._bridge: V2WriteBridge | None = None
        self._users_created = False

    @property
    def url(self) -> str:
        """The influxd 1.x HTTP API (/write, /query)."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def v2_url(self) -> str:
        """The bridge: influxd as a 1.8 server would serve it, with the v2 write API too."""
        return f"http://127.0.0.1:{self.bridge_port}"

    @property
    def token(self) -> str:
        """InfluxDB 1.8 compatibility token: "username:password"."""
        return f"{self.username}:{self.password}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def sink_settings(self, database: str) -> dict[str, Any]:
        """The sink's settings (`InfluxConfig.from_mapping`) for writing to `database` with the 1.x API."""
        return {"url": self.url, "username": self.username, "password": self.password, "database": database}

    def v2_settings(self, database: str, retention_policy: str = "autogen") -> dict[str, Any]:
        """The sink's settings for writing to `database` through the v2 write API (the bridge, as 1.8 serves it)."""
        return {"url": self.v2_url, "token": self.token, "org": "-", "bucket": f"{database}/{retention_policy}"}

    def start(self) -> None:
        """Start influxd and the bridge, surviving lost races for influxd's ports.

        Ports picked by `free_ports` can be taken by anyone before influxd binds them, on the first
        start as on a restart (another test's server, any client's ephemeral port). A restart
        first waits up to _PORT_WAIT_S for its old ports to come free (a process of the previous
        run may still be letting go); if they do not, or a start fails with "address already in
        use", influxd moves to fresh ports. Users and data live in the data dir and the sink
        talks to the bridge, whose port never changes, so moving influxd is invisible to it.
        """
        if self.running:
            return
        if self._users_created and not ports_free_within([self.http_port, self.rpc_port], _PORT_WAIT_S):
            self.http_port, self.rpc_port = free_ports(2)
        for attempt in range(_START_ATTEMPTS):
            try:
                self._start_once()
                return
            except InfluxServiceError as exc:
                if "address already in use" not in str(exc) or attempt == _START_ATTEMPTS - 1:
                    raise
                self.http_port, self.rpc_port = free_ports(2)

    def _start_once(self) -> None:
        (self.root / "influxd.conf").write_text(
            _CONFIG.format(root=self.root, rpc_port=self.rpc_port, http_port=self.http_port)
        )
        with open(self.root / "influxd.log", "ab") as log:  # the child keeps its own descriptor
            self._process = subprocess.Popen(
                [INFLUXD, "run", "-config", str(self.root / "influxd.conf")],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            self._wait_until_up()
        except InfluxServiceError:
            self.stop(kill=True)
            raise
        if not self._users_created:
            statement = f"CREATE USER \"{self.username}\" WITH PASSWORD '{self.password}' WITH ALL PRIVILEGES"
            status, body = self._request("POST", "/query", {"q": statement}, auth=False)
            if status != 200 or b'"error"' in body:
                raise InfluxServiceError(f"could not create the admin user: HTTP {status} {body[:300]!r}")
            self._users_created = True
        self._bridge = V2WriteBridge(self.bridge_port, self.http_port)
        self._bridge.start()
        self.bridge_port = self._bridge.port

    def stop(self, kill: bool = False) -> None:
        """Stop influxd and the bridge; `start()` reuses ports and data dir.

        `kill` sends SIGKILL: no graceful shutdown, so only what influxd had fsynced to its WAL survives.
        """
        if self._bridge is not None:
            self._bridge.stop()
            self._bridge = None
        if self._process is None:
            return
        if self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait(timeout=10)
        self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> InfluxService:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def create_database(self, name: str | None = None) -> str:
        name = name or f"hotlab_{uuid.uuid4().hex[:12]}"
        self.query(f'CREATE DATABASE "{name}"')
        return name

    def query(self, influxql: str, database: str | None = None) -> list[dict[str, Any]]:
        """Run InfluxQL via HTTP /query (ns epochs); return the statements' results, raising on any error."""
        params = {"q": influxql, "epoch": "ns"}
        if database:
            params["db"] = database
        status, body = self._request("POST", "/query", params)
        if status != 200:
            raise InfluxServiceError(f"query {influxql!r} -> HTTP {status}: {body[:500]!r}")
        results = json.loads(body)["results"]
        for result in results:
            if "error" in result:
                raise InfluxServiceError(f"query {influxql!r} failed: {result['error']}")
        return results

    def write_lines(self, database: str, lines: list[str]) -> None:
        """Write line protocol (ns) straight to 1.x /write, as a writer other than the sink would."""
        target = "/write?" + urllib.parse.urlencode({"db": database, "precision": "ns"})
        status, body = self._request("POST", target, {}, body="\n".join(lines).encode())
        if status != 204:
            raise InfluxServiceError(f"write to {database} -> HTTP {status}: {body[:500]!r}")

    def series(self, influxql: str, database: str) -> list[dict[str, Any]]:
        """The series of a single-statement query (empty list if it matched nothing)."""
        return self.query(influxql, database)[0].get("series", [])

    def rows(self, influxql: str, database: str) -> list[dict[str, Any]]:
        """A single-statement query flattened to dicts: each row's columns plus its series' tags."""
        out: list[dict[str, Any]] = []
        for serie in self.series(influxql, database):
            for values in serie["values"]:
                out.append(dict(zip(serie["columns"], values, strict=True)) | serie.get("tags", {}))
        return out

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise InfluxServiceError(f"influxd exited during start-up:\n{self._log_tail()}")
            try:
                if self._request("GET", "/ping", {}, auth=False, timeout=2)[0] == 204:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise InfluxServiceError(f"influxd did not answer /ping within {_START_TIMEOUT_S} s:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        path = self.root / "influxd.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"

    def _request(
        self,
        method: str,
        path: str,
        params: dict[str, str],
        auth: bool = True,
        timeout: float = 30,
        body: bytes | None = None,
    ) -> tuple[int, bytes]:
        headers = {"Content-Type": "text/plain" if body else "application/x-www-form-urlencoded"}
        if auth:
            headers["Authorization"] = _basic_auth(self.username, self.password)
        if body is None and method == "POST":
            body = urllib.parse.urlencode(params).encode()
        target = path if method == "POST" or not params else f"{path}?{urllib.parse.urlencode(params)}"
        connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        try:
            connection.request(method, target, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()


def _basic_auth(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


class V2WriteBridge:
    """Serves a 1.6 server as 1.8 does: the 1.x API as is, plus /api/v2/write and /health.

    `port` 0 lets the kernel choose on the first start; later starts rebind the same port.
    """

    def __init__(self, port: int, upstream_port: int) -> None:
        self.port = port
        self.upstream_port = upstream_port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        bridge = self

        class Handler(_BridgeHandler):
            upstream_port = bridge.upstream_port

        deadline = time.monotonic() + 10
        while True:
            try:
                self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
                break
            except OSError:  # the port is still held by a connection from the previous run
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.port = int(self._server.server_address[1])
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="influx-v2-bridge", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


class _BridgeHandler(BaseHTTPRequestHandler):
    """One request per connection, so that once the bridge stops, clients see connection refused."""

    upstream_port: int
    protocol_version = "HTTP/1.1"

    def end_headers(self) -> None:
        self.send_header("Connection", "close")
        self.close_connection = True
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path != "/health":
            self._relay("GET", self.path, b"", self._passed_headers())
        else:
            try:
                status, _, _ = self._upstream("GET", "/ping", b"", {})
            except OSError as exc:
                self._reply_json(503, {"name": "influxdb", "status": "fail", "message": str(exc)})
                return
            ok = status == 204
            self._reply_json(200 if ok else 503, {"name": "influxdb", "status": "pass" if ok else "fail"})

    def _passed_headers(self) -> dict[str, str]:
        return {name: self.headers[name] for name in ("Authorization", "Content-Type") if name in self.headers}

    def do_POST(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if parts.path != "/api/v2/write":
            self._relay("POST", self.path, body, self._passed_headers())
            return
        query = urllib.parse.parse_qs(parts.query)
        bucket = query.get("bucket", [""])[0]
        precision = query.get("precision", ["ns"])[0]
        if not bucket or precision not in _PRECISIONS:
            self._reply_json(400, {"code": "invalid", "message": "bucket is required and precision must be ns/us/ms/s"})
            return
        database, _, retention_policy = bucket.partition("/")
        params = {"db": database, "precision": _PRECISIONS[precision]}
        if retention_policy:
            params["rp"] = retention_policy
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if self.headers.get("Content-Encoding"):
            headers["Content-Encoding"] = self.headers["Content-Encoding"]
        authorization = self.headers.get("Authorization", "")
        if authorization.startswith("Token "):
            username, _, password = authorization[len("Token ") :].partition(":")
            headers["Authorization"] = _basic_auth(username, password)
        self._forward("POST", f"/write?{urllib.parse.urlencode(params)}", body, headers)

    def _relay(self, method: str, target: str, body: bytes, headers: dict[str, str]) -> None:
        """A 1.x request, passed on and answered as influxd answered it."""
        try:
            status, reply_headers, reply = self._upstream(method, target, body, headers)
        except OSError as exc:
            self._reply_json(503, {"error": f"influxd unreachable: {exc}"})
            return
        self.send_response(status)
        for name in ("Content-Type", "X-Influxdb-Version", "X-Influxdb-Build", "X-Influxdb-Error"):
            if name in reply_headers:
                self.send_header(name, reply_headers[name])
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def _forward(self, method: str, target: str, body: bytes, headers: dict[str, str]) -> None:
        """A v2 write, passed on as a 1.x write and answered as a v2 server would."""
        try:
            status, reply_headers, reply = self._upstream(method, target, body, headers)
        except OSError as exc:
            self._reply_json(503, {"code": "unavailable", "message": f"influxd unreachable: {exc}"})
            return
        if status < 300:
            self.send_response(status)
            for name in ("X-Influxdb-Version", "X-Influxdb-Build"):
                if name in reply_headers:
                    self.send_header(name, reply_headers[name])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        try:
            message = json.loads(reply).get("error", reply.decode(errors="replace"))
        except ValueError:
            message = reply.decode(errors="replace")
        code = {400: "invalid", 401: "unauthorized", 403: "forbidden", 404: "not found", 413: "request too large"}
        self._reply_json(status, {"code": code.get(status, "internal error"), "message": message})

    def _upstream(self, method: str, target: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        try:
            connection.request(method, target, body=body or None, headers=headers)
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        finally:
            connection.close()

    def _reply_json(self, status: int, document: dict[str, Any]) -> None:
        payload = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@contextlib.contextmanager
def running_influxd(prefix: str = "hotlab-influxd-") -> Iterator[InfluxService]:
    """A started influxd (plus bridge) in a fresh temporary directory, stopped and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    service = InfluxService(root)
    try:
        service.start()
        yield service
    finally:
        service.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def influx_server() -> Iterator[InfluxService]:
    """One running influxd (plus bridge) shared by the tests of a module; removed afterwards."""
    with running_influxd() as service:
        yield service


@pytest.fixture
def influx_database(influx_server: InfluxService) -> str:
    """A new, empty database on the module's server."""
    return influx_server.create_database()
