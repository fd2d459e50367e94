"""The simulated lab's own influxd: one per lab folder, on the same port, kept alive, never orphaned.

`hotlab run` without a config and `hotlab demo` write to InfluxDB when the system `influxd` (1.x,
Debian's `influxdb` package) is installed, the way they publish to a private mosquitto
(controller/lab/private_broker.py), whose rules this follows:
* loopback only; authentication on, with one admin user (ADMIN_USER) whose random password is made on
  the first start and kept in a private file of the folder, which the lab's [influx] names; the
  sink then provisions the database, its retention policies and continuous queries itself;
* the data lives in the folder (`data/`, `wal/`, `meta/`), so the lab's history survives a restart;
* the HTTP port of the last run is taken again when free, so a dashboard pointed at it keeps working;
* the process ends with its controller (Linux parent-death signal) and is in a session of its own,
  so a terminal's Ctrl-C reaches only the controller, which drains its backlog into it first and
  then stops it; a record file (`influxd.json`) lets the next start stop one that survived anyway;
* one that dies is started again on the same port, with backoff, for as long as it takes.

Everything but `supervise` is blocking: async callers use `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import logging
import secrets
import shutil
import signal
import subprocess
import time
import urllib.parse
from pathlib import Path

from hotlab.backoff import Backoff
from hotlab.controller.lab.embedded_broker import die_with_parent, free_tcp_port, write_file
from hotlab.controller.lab.private_broker import WATCH_INTERVAL_S, port_is_free, stop_orphan
from hotlab.errors import HotlabError

log = logging.getLogger(__name__)

RECORD_NAME = "influxd.json"
CONFIG_NAME = "influxd.conf"
PASSWORD_NAME = "influxd.password"
ADMIN_USER = "hotlab"
#: How long a start waits for /ping: opening a TSM store on a loaded machine takes a while.
START_TIMEOUT_S = 30.0

_CONFIG = """\
reporting-disabled = true
bind-address = "{host}:{rpc_port}"

[meta]
  dir = "{root}/meta"
  logging-enabled = false

[data]
  dir = "{root}/data"
  wal-dir = "{root}/wal"
  query-log-enabled = false

[monitor]
  store-enabled = false

[continuous_queries]
  enabled = true
  log-enabled = false

[http]
  enabled = true
  bind-address = "{host}:{http_port}"
  auth-enabled = true
  log-enabled = false

[logging]
  level = "warn"
  suppress-logo = true
"""


class InfluxdUnavailable(HotlabError, RuntimeError):
    """influxd is not installed, or it did not start answering in time (its log is in the message)."""


def influxd_binary() -> str | None:
    return shutil.which("influxd") or next((p for p in ("/usr/bin/influxd",) if Path(p).is_file()), None)


class PrivateInfluxd:
    """A supervised influxd 1.x whose files live in `directory` (one per simulated lab)."""

    def __init__(self, directory: Path, *, restart: Backoff = Backoff(0.5, 10.0)) -> None:
        self.directory = directory
        self.restart = restart
        self.host = "127.0.0.1"
        self.port = 0
        self.restarts = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def password_path(self) -> Path:
        return self.directory / PASSWORD_NAME

    @property
    def running(self) -> bool:
        """Polls the process, so one that exited is reaped (no zombie)."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Stop one an earlier run left behind, take its port if free, start, make the admin user once."""
        binary = influxd_binary()
        if binary is None:
            raise InfluxdUnavailable("the influxd binary is not installed (apt install influxdb)")
        self.directory.mkdir(parents=True, exist_ok=True)
        earlier = self._read_record()
        if earlier is not None:
            stop_orphan(earlier.get("pid"), "influxd", self.directory / CONFIG_NAME, grace_s=10.0)
            port = earlier.get("port")
            if isinstance(port, int) and not self.port and port_is_free(self.host, port):
                self.port = port
            elif isinstance(port, int) and not self.port:
                log.warning("the private influxd's port %d is taken now: choosing another one", port)
        if not self.password_path.exists():
            write_file(self.password_path, secrets.token_urlsafe(24) + "\n", private=True)
        fixed = self.port != 0
        for _attempt in range(1 if fixed else 3):
            if not fixed:
                self.port = free_tcp_port(self.host)
            log_offset = self._log_size()
            self._spawn(binary)
            if self._answers_ping():
                break
            self._stop(signal.SIGKILL)
        else:
            raise InfluxdUnavailable(f"influxd did not answer on {self.url}: {self._log_tail(log_offset)}")
        self._ensure_admin()
        self._write_record()

    async def supervise(self) -> None:
        """Run until cancelled: start influxd again on its port whenever it is not running."""
        failures = 0
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            if self.running:
                failures = 0
                continue
            if failures == 0:
                code = None if self._process is None else self._process.poll()
                log.error(
                    "the private influxd exited (code %s); restarting it on port %d: %s",
                    code,
                    self.port,
                    self._log_tail(0),
                )
            await asyncio.sleep(self.restart.delay(failures))
            try:
                await asyncio.to_thread(self.start)
            except (InfluxdUnavailable, OSError) as exc:
                failures += 1
                log.error("the private influxd did not start again: %s", exc)
                continue
            self.restarts += 1
            log.warning("the private influxd runs again on port %d", self.port)

    def close(self) -> None:
        """Stop influxd (SIGTERM: it closes its files); the record keeps the port for the next start."""
        self._stop(signal.SIGTERM)
        if self.port:
            self._write_record()

    def _spawn(self, binary: str) -> None:
        config = self.directory.resolve() / CONFIG_NAME
        rpc_port = free_tcp_port(self.host)
        write_file(config, _CONFIG.format(host=self.host, rpc_port=rpc_port, http_port=self.port, root=config.parent))
        with open(self.directory / "influxd.log", "ab") as output:  # the child keeps its own descriptor
            self._process = subprocess.Popen(
                [binary, "run", "-config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    def _stop(self, how: signal.Signals) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(how)
        try:
            process.wait(10.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10.0)

    def _answers_ping(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and self.running:
            with contextlib.suppress(OSError):
                if self._request("GET", "/ping", None)[0] == 204:
                    return True
            time.sleep(0.05)
        return False

    def _ensure_admin(self) -> None:
        """Create the admin user on a new store (allowed while it has no users); check the password on an old one."""
        password = self.password_path.read_text().strip()
        status, _ = self._request("POST", "/query", None, {"q": "SHOW DATABASES"}, (ADMIN_USER, password))
        if status == 200:
            return
        create = f"CREATE USER \"{ADMIN_USER}\" WITH PASSWORD '{password}' WITH ALL PRIVILEGES"
        status, body = self._request("POST", "/query", None, {"q": create})
        if status != 200 or b'"error"' in body:
            raise InfluxdUnavailable(
                f"the private influxd in {self.directory} does not accept the password in {self.password_path} "
                f"(HTTP {status}: {body[:200]!r}); remove {self.directory} to start it afresh"
            )

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        form: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
    ) -> tuple[int, bytes]:
        headers = {}
        if form is not None:
            body = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        if auth is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
        connection = http.client.HTTPConnection(self.host, self.port, timeout=5.0)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def _log_size(self) -> int:
        path = self.directory / "influxd.log"
        return path.stat().st_size if path.exists() else 0

    def _log_tail(self, offset: int) -> str:
        try:
            with (self.directory / "influxd.log").open("rb") as output:
                output.seek(offset)
                return output.read()[-2000:].decode("utf-8", "replace").strip() or "(empty log)"
        except OSError:
            return "(no log)"

    def _read_record(self) -> dict[str, object] | None:
        try:
            record = json.loads((self.directory / RECORD_NAME).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring the unreadable private influxd record in %s: %s", self.directory, exc)
            return None
        return record if isinstance(record, dict) else None

    def _write_record(self) -> None:
        pid = None if self._process is None else self._process.pid
        record = {"pid": pid, "port": self.port, "written": time.time()}
        path = self.directory / RECORD_NAME
        temporary = path.with_suffix(".tmp")
        write_file(temporary, json.dumps(record) + "\n")
        temporary.replace(path)
