"""`hotlab run [--config lab.toml] [--duration S]`: the controller service from the command line.

With `--config` it runs the configured lab. Without it, it runs a simulated lab so a
newcomer sees the whole pipeline at once, with nothing to install or configure:

* four dose calibrators, one per family, each the physics simulator from simulators/
  speaking its real wire protocol: VIK-202 and VDC-404 on pseudo-terminals (real ttys),
  CRC-15R and Atomlab 500 on TCP (serial device server style, socket://);
* a Ge-68/Ga-68 elution station as a real Modbus TCP server, clock accelerated 30x, where a
  simulated operator starts an elution every 30 s of wall time;
* the system `mosquitto` binary on a free loopback port (controller/embedded_broker.py);
  if it is not installed, local-only mode: no broker, everything is kept in the outbox
  (and the local history archive) until a broker is configured.

State (outbox, history, station counter) lives in ./var/simulated-lab.
Exit codes: 0 after a clean stop (SIGINT, SIGTERM or --duration), 2 for a bad config,
1 when the service fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from controller.config import (
    ConfigError,
    LabConfig,
    ModbusTcpTransport,
    load_config,
    parse_config,
)
from controller.messages import iso_utc
from controller.service import CommitStage, ControllerService, ServiceError

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
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.duration is not None and args.duration <= 0:
        print(f"hotlab run: --duration must be > 0, got {args.duration:g}", file=sys.stderr)
        return 2
    config: LabConfig | None = None
    if args.config is not None:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"hotlab run: config error: {exc}", file=sys.stderr)
            return 2
    try:
        asyncio.run(_run(config, args.duration))
    except ServiceError as exc:
        print(f"hotlab run: {exc}", file=sys.stderr)
        return 1
    except Exception:
        log.exception("controller failed")
        return 1
    return 0


async def _run(config: LabConfig | None, duration_s: float | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if duration_s is not None:
        loop.call_later(duration_s, stop.set)
    async with _lab(config) as lab_config:
        service = ControllerService(lab_config, stage=_qc_engine(lab_config))
        log.info("site %s: %d device(s): %s", lab_config.site, len(lab_config.devices),
                 ", ".join(f"{d.name} ({d.family})" for d in lab_config.devices) or "none")
        await service.run(stop)


@contextlib.asynccontextmanager
async def _lab(config: LabConfig | None) -> AsyncIterator[LabConfig]:
    if config is not None:
        yield config
        return
    async with simulated_lab(Path("var/simulated-lab")) as lab_config:
        yield lab_config


#: Simulated operator: seconds of wall time between elutions in the simulated lab, and the volume.
SIM_ELUTION_EVERY_S = 30.0
SIM_ELUTION_VOLUME_ML = 5.0
SIM_STATION_ACCELERATION = 30.0
SIM_GENERATOR_ID = "GE68-SIM-001"
SIM_GENERATOR_CAL_BQ = 1.85e9  # 50 mCi Ge-68, a common clinical generator size


@contextlib.asynccontextmanager
async def simulated_lab(workdir: Path) -> AsyncIterator[LabConfig]:
    """Start simulators (and a private broker when possible); yield the config that points at them."""
    from controller.embedded_broker import BrokerUnavailable, MosquittoBroker
    from simulators.calibrator_cli import CALIBRATOR_SIMULATORS
    from simulators.faults import FaultInjector
    from simulators.serial_host import PtyHost, TcpHost
    from simulators.source import make_chamber

    workdir.mkdir(parents=True, exist_ok=True)
    async with contextlib.AsyncExitStack() as stack:
        broker: MosquittoBroker | None = MosquittoBroker(persistence=False)
        try:
            await asyncio.to_thread(broker.start)  # type: ignore[union-attr]
            stack.push_async_callback(asyncio.to_thread, broker.close)  # type: ignore[union-attr]
        except BrokerUnavailable as exc:
            log.warning("no broker for the simulated lab (%s): LOCAL-ONLY mode, messages stay in %s",
                        exc, workdir / "outbox.sqlite3")
            broker = None

        calibrators = [  # (family, station, nuclide, activity at start, host kind)
            ("vik202", "hotcell-1", "Tc-99m", 7.4e9, "pty"),
            ("crc15r", "dispensing", "F-18", 3.7e9, "tcp"),
            ("vdc404", "qc-lab", "Cs-137", 7.4e6, "pty"),
            ("atomlab500", "qc-lab", "Tc-99m", 1.1e9, "tcp"),
        ]
        devices: list[dict[str, object]] = []
        for index, (family, station, nuclide, activity_bq, kind) in enumerate(calibrators):
            chamber = make_chamber(nuclide, activity_bq, seed=index)
            model = CALIBRATOR_SIMULATORS[family](chamber, FaultInjector(seed=index))
            host = PtyHost(model) if kind == "pty" else TcpHost(model)
            address = await host.start()
            stack.push_async_callback(host.stop)
            devices.append({"name": f"{family}-sim", "station": station, "family": family, "transport": address,
                            "poll_interval_s": 2.0, "timeout_s": 3.0})

        now_ns = time.time_ns()
        cal_ns, last_elution_ns = now_ns - 30 * 86400 * 10**9, now_ns - 86400 * 10**9
        station_address = await _start_station(stack, cal_ns, last_elution_ns)
        devices.append({"name": "ga68-generator-sim", "station": "elution-1", "family": "elution_station",
                        "poll_interval_s": 1.0, "transport": station_address})

        document: dict[str, object] = {
            "site": {"name": "simulated-lab"},
            "device": devices,
            "outbox": {"path": "outbox.sqlite3"},
            "history": {"path": "history.sqlite3"},
            "service": {"state_dir": "state", "drain_timeout_s": 5.0, "status_interval_s": 30.0},
            # QC (docs/qc.md): daily constancy of the VDC-404 on its Cs-137 check source, and the
            # elution yield of the simulated generator, with the same calibration as the station's column.
            "qc": {
                "sources": {"cs137-check": {"nuclide": "Cs-137", "activity": "7.4 MBq",
                                            "reference_time": iso_utc(now_ns), "certificate": "simulated"}},
                "devices": {"vdc404-sim": {"check_source": "cs137-check"}},
                "generators": {SIM_GENERATOR_ID: {"parent": "Ge-68", "activity": f"{SIM_GENERATOR_CAL_BQ} Bq",
                                                  "calibration_time": iso_utc(cal_ns),
                                                  "last_elution": iso_utc(last_elution_ns)}},
            },
        }
        if broker is not None:
            document["mqtt"] = {"host": broker.host, "port": broker.port, "client_id": "hotlab-simulated-lab"}
        config = parse_config(document, file="<simulated lab>", base_dir=workdir.resolve())
        _announce(config)
        yield config


async def _start_station(stack: contextlib.AsyncExitStack, cal_ns: int, last_elution_ns: int) -> dict[str, object]:
    """A Ge-68/Ga-68 generator station on Modbus TCP, and an operator who starts elutions."""
    from drivers.elution_station import CommandCode
    from simulators.elution_station import (
        ElutionStationSimulator,
        StationClock,
        StationIdentity,
        StationModel,
    )
    from simulators.generator_physics import GeneratorColumn, get_profile

    column = GeneratorColumn(get_profile("ge68"), generator_id=SIM_GENERATOR_ID, parent_cal_bq=SIM_GENERATOR_CAL_BQ,
                             cal_time_ns=cal_ns, last_elution_ns=last_elution_ns)
    model = StationModel(column, StationClock(SIM_STATION_ACCELERATION), StationIdentity())
    simulator = ElutionStationSimulator(model)
    host, port = await simulator.start_tcp("127.0.0.1", 0)
    stack.push_async_callback(simulator.stop)

    async def operator() -> None:
        while True:
            await asyncio.sleep(SIM_ELUTION_EVERY_S)
            model.execute(CommandCode.START, SIM_ELUTION_VOLUME_ML)

    task = asyncio.create_task(operator(), name="simulated-operator")
    stack.callback(task.cancel)
    return {"modbus": "tcp", "host": host, "port": port, "device_id": 1, "word_order": "ABCD"}


def _announce(config: LabConfig) -> None:
    lines = ["", "hotlab simulated lab", "  devices:"]
    for device in config.devices:
        transport = device.transport
        where = (f"modbus tcp {transport.host}:{transport.port}" if isinstance(transport, ModbusTcpTransport)
                 else transport.url)
        lines.append(f"    {device.name:<20} {device.family:<16} {where}")
    if config.mqtt is not None:
        lines += [f"  MQTT broker: private mosquitto on {config.mqtt.host}:{config.mqtt.port}",
                  f"  watch it:    mosquitto_sub -h {config.mqtt.host} -p {config.mqtt.port} -t 'hotlab/#' -v"]
    else:
        lines.append("  MQTT broker: none (mosquitto not installed) - LOCAL-ONLY mode, data stays in the outbox")
    lines += [f"  outbox:      {config.outbox.path}", f"  history:     {config.history_path}",
              "  stop with Ctrl-C", ""]
    print("\n".join(lines), file=sys.stderr, flush=True)


def _qc_engine(config: LabConfig) -> CommitStage | None:
    """The QC engine judges every reading and elution in the same commit (config: the [qc] table)."""
    try:
        from controller.qc.engine import QcConfig, QcEngine
    except ImportError as exc:
        log.error("QC engine not available (%s): readings are published WITHOUT QC", exc)
        return None
    return QcEngine(config.site, QcConfig.from_mapping(config.qc))
