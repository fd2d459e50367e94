"""`hotlab run [--config lab.toml] [--duration S]`: the controller service from the command line.

With `--config` it runs the configured lab. Without it, it runs a simulated lab
(controller/lab/simulated_lab.py, RUN_LAB) so a newcomer sees the whole pipeline at once,
with nothing to install or configure:

* four dose calibrators, one per family, each the physics simulator from simulators/
  speaking its real wire protocol: VIK-202 and VDC-404 on pseudo-terminals (real ttys),
  CRC-15R and Atomlab 500 on TCP as behind a serial device server, in raw mode (socket://)
  and in RFC 2217 mode (rfc2217://);
* a Ge-68/Ga-68 elution station as a real Modbus TCP server, clock accelerated 30x, where a
  simulated operator starts an elution every 30 s of wall time;
* the system `mosquitto` binary on a free loopback port (controller/lab/embedded_broker.py);
  if it is not installed, local-only mode: no broker, everything is kept in the outbox
  (and the local history archive) until a broker is configured;
* the system `influxd` (InfluxDB 1.x) on a free loopback port (controller/lab/private_influxd.py),
  written to natively; if it is not installed, the lab runs without InfluxDB;
* the web panel on http://127.0.0.1:8080/ (`--web-port`, `--no-web`; controller/web/embedded.py),
  signed in with the lab's demo accounts. A configured lab serves its panel with `hotlab web`.

State (outbox, history, station counter, the private influxd's data) lives in ./var/simulated-lab.
At the end it prints, per sink, what it delivered in the run and what is left in the outbox, and a
WARNING line for a configured sink that never acknowledged anything. That is not a failure of the
service (everything it read is kept for the next start), so the exit code stays 0.
Exit codes: 0 after a clean stop (SIGINT, SIGTERM or --duration), 2 for a bad config or
option (a ConfigError or InputError, reported by controller/cli/main.py), 1 when the service fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from hotlab.controller.audit import load_hmac_key
from hotlab.controller.config import LabConfig, load_config
from hotlab.controller.event_loop import DEFAULT_EVENT_LOOP
from hotlab.controller.gc_policy import settle_after_startup
from hotlab.controller.lab.simulated_lab import simulated_lab
from hotlab.controller.service import CommitStage, ControllerService, delivery_report, run_to_exit_code
from hotlab.controller.stop_signals import StopSignals
from hotlab.controller.web.embedded import DEFAULT_PORT, lab_panel
from hotlab.errors import InputError

log = logging.getLogger("hotlab.run")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the controller service (simulated lab without --config)",
        description="Poll the configured instruments, run QC, and publish everything to MQTT/InfluxDB "
        "through the durable outbox. Without --config, run a simulated lab with a private broker.",
    )
    parser.add_argument("--config", type=Path, help="lab config (TOML); see examples/lab.toml")
    parser.add_argument("--duration", type=float, metavar="S", help="stop cleanly after S seconds")
    add_web_options(parser)
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.set_defaults(func=main)


def add_web_options(parser: argparse.ArgumentParser) -> None:
    """--web-port and --no-web: the simulated lab's web panel (hotlab run and hotlab demo alike)."""
    web = parser.add_mutually_exclusive_group()
    web.add_argument(
        "--web-port",
        type=int,
        metavar="PORT",
        help=f"serve the simulated lab's web panel on 127.0.0.1:PORT (default {DEFAULT_PORT}; 0: any free port)",
    )
    web.add_argument("--no-web", action="store_true", help="do not start the web panel")


def web_port(args: argparse.Namespace) -> int | None:
    """The panel's port, or None for --no-web; InputError for a port that is not one."""
    if args.no_web:
        return None
    if args.web_port is None:
        return DEFAULT_PORT
    if not 0 <= args.web_port < 65536:
        raise InputError(f"--web-port {args.web_port} is not a TCP port (0-65535)")
    return int(args.web_port)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.duration is not None and args.duration <= 0:
        raise InputError(f"--duration must be > 0, got {args.duration:g}")
    if args.config is not None and args.web_port is not None:
        raise InputError("--web-port serves the simulated lab's panel; a configured lab's is `hotlab web --config`")
    port = web_port(args)
    config = load_config(args.config) if args.config is not None else None
    event_loop = config.service.event_loop if config is not None else DEFAULT_EVENT_LOOP
    return run_to_exit_code(_run(config, args.duration, port), "hotlab run", event_loop)


async def _run(config: LabConfig | None, duration_s: float | None, port: int | None) -> None:
    signals = StopSignals()
    if duration_s is not None:
        asyncio.get_running_loop().call_later(duration_s, signals.stop.set)
    with signals.interruptible_start():
        async with _lab(config, port) as lab_config:
            service = ControllerService(lab_config, stage=_qc_engine(lab_config), on_started=settle_after_startup)
            log.info(
                "site %s: %d device(s): %s",
                lab_config.site,
                len(lab_config.devices),
                ", ".join(f"{d.name} ({d.family})" for d in lab_config.devices) or "none",
            )
            signals.running()
            await service.run(signals.stop)
            print(delivery_report(service.deliveries), file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def _lab(config: LabConfig | None, web_port: int | None) -> AsyncIterator[LabConfig]:
    if config is not None:
        yield config
        return
    key = await asyncio.to_thread(load_hmac_key)
    async with (
        simulated_lab(Path("var/simulated-lab"), private_influxd=True) as lab_config,
        lab_panel(lab_config, web_port, key) as url,
    ):
        if url is not None:
            print(f"  web panel:   {url} (sign in with an account above)", file=sys.stderr, flush=True)
        yield lab_config


def _qc_engine(config: LabConfig) -> CommitStage | None:
    """The QC stage judges every measurement and elution and keeps the schedule in the same commit ([qc])."""
    try:
        from hotlab.controller.qc.stage import qc_stage_for
    except ImportError as exc:
        log.error("QC engine not available (%s): readings are published WITHOUT QC", exc)
        return None
    return qc_stage_for(config)
