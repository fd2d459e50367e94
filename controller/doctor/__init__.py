"""`hotlab doctor`: is this machine ready to run the lab? One finding per check, `ok`, `warn` or `FAIL`.

Each check asks the thing itself rather than reasoning about the config: a serial port is stat()ed
and access()ed as the user running the doctor (run it as the service user: root may open any
file), a device server is connected to, the broker is connected to with the controller's settings,
and InfluxDB is sent the sink's write without points (services.py). The checks run concurrently,
each bounded by its own timeout, so a dead host costs seconds, not the sum of them. A FAIL is a
problem the controller would hit; a warn is something the doctor could not decide, or that only
some setups need. Without a config only the host is examined: the clock, and the storage of ./var,
where `hotlab run` and `hotlab demo` keep their state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from pathlib import Path

from hotlab.controller.config import LabConfig, OutboxConfig, ServiceConfig, load_config
from hotlab.controller.doctor.finding import Finding, Status
from hotlab.controller.doctor.host import (
    audit_key_finding,
    clock_findings,
    device_finding,
    storage_findings,
    users_finding,
)
from hotlab.controller.doctor.services import broker_finding, influx_finding
from hotlab.errors import HotlabError

__all__ = ["Finding", "Status", "examine", "exit_code"]

#: Without --config, the host checks look at ./var: `hotlab run` and `hotlab demo` keep their state there.
DEFAULT_STATE_DIR = ServiceConfig().state_dir


async def examine(config_path: Path | None) -> list[Finding]:
    """Every finding, in a fixed order: the config, its devices, broker, InfluxDB and storage, then the clock."""
    if config_path is None:
        state = DEFAULT_STATE_DIR.absolute()
        outbox = OutboxConfig(path=state / "outbox.sqlite3")
        storage = asyncio.to_thread(storage_findings, outbox, state / "history.sqlite3", [state])
        return await _gather([storage, clock_findings()])
    try:
        config = await asyncio.to_thread(load_config, config_path)
    except HotlabError as exc:
        return [Finding("FAIL", "config", str(exc)), *await clock_findings()]
    summary = Finding("ok", "config", f"{config_path}: site {config.site}, {len(config.devices)} device(s)")
    return [summary, *await _gather([*_lab_checks(config), clock_findings()])]


def exit_code(findings: Iterable[Finding]) -> int:
    """1 if anything failed, else 0: a warning alone is not a problem."""
    return 1 if any(finding.status == "FAIL" for finding in findings) else 0


def _lab_checks(config: LabConfig) -> list[Awaitable[list[Finding]]]:
    checks: list[Awaitable[list[Finding]]] = [_listed(device_finding(d.name, d.transport)) for d in config.devices]
    if config.mqtt is None:
        checks.append(_listed(_found("warn", "mqtt", "no [mqtt]: the controller keeps everything in its outbox")))
    else:
        checks.append(_listed(broker_finding(config.mqtt, "mqtt")))
        if config.web.mqtt_username is not None:
            checks.append(_listed(broker_finding(config.web.broker(config.mqtt), "mqtt (web panel)")))
    if config.influx is not None:
        checks.append(_listed(influx_finding(config.influx)))
    audit = config.commands.resolved_audit_path(config.service.state_dir)
    users = config.users.resolved_path(audit)
    directories = [config.service.state_dir, audit.parent, users.parent]
    checks.append(asyncio.to_thread(storage_findings, config.outbox, config.history_path, directories))
    checks.append(_listed(asyncio.to_thread(audit_key_finding)))
    checks.append(_listed(asyncio.to_thread(users_finding, users)))
    return checks


async def _gather(checks: Iterable[Awaitable[list[Finding]]]) -> list[Finding]:
    return [finding for found in await asyncio.gather(*checks) for finding in found]


async def _listed(check: Awaitable[Finding]) -> list[Finding]:
    return [await check]


async def _found(status: Status, subject: str, detail: str) -> Finding:
    return Finding(status, subject, detail)
