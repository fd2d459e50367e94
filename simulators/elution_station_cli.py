"""`hotlab simulate station`: run a simulated generator elution station until Ctrl-C.

    hotlab simulate station --generator ge68 --tcp 127.0.0.1:5020
    hotlab simulate station --generator mo99 --rtu-pty --acceleration 60
    hotlab simulate station --generator ge68 --rtu-tcp 127.0.0.1:5021   # RTU frames over TCP
    hotlab simulate station --tcp 127.0.0.1:5020 --clock-offset-s 90     # its clock 90 s ahead
    hotlab simulate station --tls 127.0.0.1:8020 --ca-file ca.crt --cert-file station.crt --key-file station.key

It prints where to connect and an mbpoll line to look at the registers from outside. With
`--tls` it serves MODBUS/TCP Security only: clients need a certificate that `--ca-file` verifies.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hotlab.drivers.modbus_words import WordOrder
from hotlab.drivers.station_registers import INPUT_REGISTERS
from hotlab.errors import HotlabError, InputError
from hotlab.physics.units import format_activity, parse_activity
from hotlab.physics.utc_time import NS_PER_S
from hotlab.simulators.elution_station import ElutionStationSimulator, StationClock, StationIdentity, StationModel
from hotlab.simulators.generator_physics import PROFILES, GeneratorColumn, get_profile

SIMULATE_COMMAND = "simulate"


def _simulate_subparsers(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The sub-command group under `hotlab simulate`, shared with the other simulators (created once)."""
    parser = subparsers.choices.get(SIMULATE_COMMAND)
    if parser is None:
        parser = subparsers.add_parser(SIMULATE_COMMAND, help="run a simulated instrument")
        parser.add_subparsers(dest="instrument", metavar="INSTRUMENT", required=True)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest="instrument", metavar="INSTRUMENT", required=True)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (port 0-65535, 0 = any free port), got {text!r}")
    return host, int(port)


def _device_id(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 247:  # Modbus serial line spec: unit ids 1-247
        raise argparse.ArgumentTypeError(f"a Modbus unit id is 1-247, got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise argparse.ArgumentTypeError(f"expected a number of seconds such as 90 or -3600, got {text!r}")
    return seconds


def _utc_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO 8601 time such as 2026-11-01T12:00Z, got {text!r}") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give a time zone (e.g. a trailing Z for UTC): {text!r}")
    return moment


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = _simulate_subparsers(subparsers).add_parser(
        "station",
        help="a generator elution station on Modbus TCP (plain or TLS) or RTU",
        description="Serve a simulated elution station (register map: docs/elution-station-registers.md).",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--tcp", type=_host_port, metavar="HOST:PORT", help="Modbus TCP")
    where.add_argument("--rtu-tcp", type=_host_port, metavar="HOST:PORT", help="Modbus RTU frames over TCP")
    where.add_argument("--rtu-pty", action="store_true", help="Modbus RTU on a new pseudo-terminal")
    where.add_argument("--tls", type=_host_port, metavar="HOST:PORT", help="MODBUS/TCP Security (TLS, port 802)")
    tls = parser.add_argument_group("TLS (with --tls)")
    tls.add_argument("--ca-file", type=Path, help="CA whose client certificates are accepted")
    tls.add_argument("--cert-file", type=Path, help="the station's certificate")
    tls.add_argument("--key-file", type=Path, help="the station's private key")
    parser.add_argument("--generator", choices=sorted(PROFILES), default="ge68")
    parser.add_argument("--generator-id", default=None, help="generator serial number (default: per profile)")
    parser.add_argument("--activity", default=None, help="parent activity at calibration, e.g. 1.85GBq or 50mCi")
    parser.add_argument("--calibrated", type=_utc_time, default=None, help="calibration time (default: 30 days ago)")
    parser.add_argument("--eluted-hours-ago", type=float, default=24.0, help="time since the last elution")
    parser.add_argument("--device-id", type=_device_id, default=1, help="Modbus unit id 1-247 (default 1)")
    parser.add_argument("--word-order", choices=[o.value for o in WordOrder], default="ABCD")
    parser.add_argument("--acceleration", type=float, default=1.0, help="station clock speed-up (default 1)")
    parser.add_argument(
        "--clock-offset-s",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="set the station's clock S seconds wrong (negative: behind); the times it reports are off by S,"
        " its physics is not (default 0)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C; bad input raises an InputError, which controller/cli/main.py reports with exit 2."""
    profile = get_profile(args.generator)
    cal_bq = parse_activity(args.activity) if args.activity else profile.nominal_cal_bq
    if not args.acceleration > 0 or args.eluted_hours_ago < 0:
        raise InputError("--acceleration must be > 0 and --eluted-hours-ago >= 0")
    tls_files = (args.ca_file, args.cert_file, args.key_file)
    if not all(tls_files) if args.tls else any(tls_files):
        raise InputError("--tls goes with --ca-file, --cert-file and --key-file")
    now = datetime.now(UTC).replace(microsecond=0)
    calibrated = args.calibrated or now - timedelta(days=30)
    last_elution = max(now - timedelta(hours=args.eluted_hours_ago), calibrated)
    column = GeneratorColumn(
        profile,
        generator_id=args.generator_id or f"{profile.key.upper()}-SIM-001",
        parent_cal_bq=cal_bq,
        cal_time_ns=int(calibrated.timestamp()) * NS_PER_S,
        last_elution_ns=int(last_elution.timestamp()) * NS_PER_S,
    )
    model = StationModel(column, StationClock(args.acceleration, offset_s=args.clock_offset_s), StationIdentity())
    simulator = ElutionStationSimulator(model, device_id=args.device_id, word_order=WordOrder(args.word_order))
    try:
        return asyncio.run(_serve(simulator, args))
    except OSError as exc:  # ssl.SSLError too: a certificate or key that cannot be loaded
        raise HotlabError(f"cannot serve: {exc}") from exc


async def _serve(simulator: ElutionStationSimulator, args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    column = simulator.model.column
    if args.tcp:
        host, port = await simulator.start_tcp(*args.tcp)
        where = f"Modbus TCP on {host}:{port}"
        mbpoll = f"mbpoll -m tcp -p {port} -a {args.device_id} -0 -t 3 -r 0 -c {INPUT_REGISTERS.count} -1 {host}"
    elif args.tls:
        host, port = await simulator.start_tls(
            *args.tls, ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file
        )
        where = f"MODBUS/TCP Security (TLS) on {host}:{port}, client certificates from {args.ca_file}"
        mbpoll = "(mbpoll does not speak TLS)"
    elif args.rtu_tcp:
        host, port = await simulator.start_tcp(*args.rtu_tcp, rtu_framing=True)
        where = f"Modbus RTU over TCP on socket://{host}:{port}"
        mbpoll = "(mbpoll speaks RTU only on serial ports)"
    else:
        path = await simulator.start_rtu_pty()
        where = f"Modbus RTU on {path} (8N1; any baud rate)"
        mbpoll = f"mbpoll -m rtu -b 19200 -P none -a {args.device_id} -0 -t 3 -r 0 -c {INPUT_REGISTERS.count} -1 {path}"
    skew = f", set {args.clock_offset_s:+g} s wrong" if args.clock_offset_s else ""
    print(
        f"elution station simulator: {column.profile.description}\n"
        f"  generator {column.generator_id}, {format_activity(column.parent_cal_bq)} {column.profile.parent}"
        f" at calibration, clock x{args.acceleration:g}{skew}\n"
        f"  serving {where}, device id {args.device_id}, word order {args.word_order}\n"
        f"  look from outside: {mbpoll}\n"
        f"  Ctrl-C to stop",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await simulator.stop()
    return 0
