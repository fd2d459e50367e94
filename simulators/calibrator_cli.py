"""`hotlab simulate calibrator`: run a simulated dose calibrator on a pty or TCP until Ctrl-C.

    hotlab simulate calibrator --model vik202 --pty
    hotlab simulate calibrator --model atomlab500 --tcp 127.0.0.1:0 --nuclide F-18 --activity 2GBq \
        --acceleration 60 --fault garbage:0.05 --fault drop:0.1

The first line printed is where to connect: a tty path (a stable symlink to the current pty)
or a `socket://host:port` URL, both usable as a driver's `url`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeAlias

from hotlab.physics.nuclides import UnknownNuclideError
from hotlab.physics.units import UnitError, parse_activity
from hotlab.simulators.calibrator_atomlab500 import Atomlab500Simulator
from hotlab.simulators.calibrator_crc15r import Crc15rSimulator
from hotlab.simulators.calibrator_vdc404 import Vdc404Simulator
from hotlab.simulators.calibrator_vik202 import Vik202Simulator
from hotlab.simulators.faults import FaultInjector, parse_fault_spec
from hotlab.simulators.serial_host import DeviceModel, PtyHost, Rfc2217Host, TcpHost
from hotlab.simulators.source import make_chamber

#: Family name -> factory(chamber, faults, **options) for its simulator.
CALIBRATOR_SIMULATORS: dict[str, Callable[..., DeviceModel]] = {
    "vik202": lambda chamber, faults, **_: Vik202Simulator(chamber, faults),
    "crc15r": lambda chamber, faults, curie_units=False, **_: Crc15rSimulator(chamber, faults, curie_units=curie_units),
    "vdc404": lambda chamber, faults, curie_units=False, interval_s=1.0, **_: Vdc404Simulator(
        chamber, faults, curie_units=curie_units, interval_s=interval_s
    ),
    "atomlab500": lambda chamber, faults, **_: Atomlab500Simulator(chamber, faults),
}

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def register(subparsers: Subparsers) -> None:
    parser = _simulate_group(subparsers).add_parser(
        "calibrator",
        help="serve a simulated dose calibrator on a pty or TCP",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, choices=sorted(CALIBRATOR_SIMULATORS), help="device family")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--pty", nargs="?", const="", metavar="LINK", help="serve on a pty (optional symlink path)")
    where.add_argument("--tcp", metavar="HOST:PORT", help="serve on TCP, e.g. 127.0.0.1:0 for a free port")
    where.add_argument(
        "--rfc2217",
        metavar="HOST:PORT",
        help="serve on TCP as a serial device server in RFC 2217 mode (rfc2217:// URLs)",
    )
    parser.add_argument("--nuclide", default="Tc-99m", help="nuclide of the source in the chamber")
    parser.add_argument("--activity", default="740 MBq", help="source activity at start, e.g. 740MBq or 20 mCi")
    parser.add_argument("--selected", help="nuclide the device is set to (default: the source's)")
    parser.add_argument("--acceleration", type=float, default=1.0, help="simulated seconds per wall second")
    parser.add_argument("--noise", type=float, default=0.002, help="relative electrometer noise, 1 sigma")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and fault RNGs")
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND[:RATE]",
        help="garbage, drop, late, disconnect, stuck, bad_checksum, bit_flip; repeatable",
    )
    parser.add_argument("--late-s", type=float, default=3.0, help="delay of a late reply")
    parser.add_argument("--interval", type=float, default=1.0, help="vdc404: seconds between streamed lines")
    parser.add_argument("--curie-units", action="store_true", help="crc15r/vdc404: display uCi/mCi/Ci")
    parser.set_defaults(func=run)


def _simulate_group(subparsers: Subparsers) -> Subparsers:
    """The sub-parsers under `hotlab simulate`, shared with the other simulators.

    Whichever simulator module registers first creates `simulate`; the others find its
    sub-parser action (simulators/elution_station_cli.py does the same).
    """
    simulate = subparsers.choices.get("simulate")
    if simulate is None:
        simulate = subparsers.add_parser("simulate", help="run a simulated instrument")
        return simulate.add_subparsers(dest="instrument", metavar="INSTRUMENT", required=True)
    for action in simulate._actions:
        if isinstance(action, argparse._SubParsersAction):
            group: Subparsers = action
            return group
    return simulate.add_subparsers(dest="instrument", metavar="INSTRUMENT", required=True)


def build(args: argparse.Namespace) -> DeviceModel:
    """The simulator described by parsed options; ValueError on bad input."""
    faults = FaultInjector(seed=args.seed, late_s=args.late_s)
    for spec in args.fault:
        faults.set_rate(*parse_fault_spec(spec))
    chamber = make_chamber(
        args.nuclide,
        parse_activity(args.activity),
        acceleration=args.acceleration,
        selected_nuclide=args.selected,
        noise_rel=args.noise,
        seed=args.seed,
    )
    options: dict[str, Any] = {"curie_units": args.curie_units, "interval_s": args.interval}
    return CALIBRATOR_SIMULATORS[args.model](chamber, faults, **options)


def run(args: argparse.Namespace) -> int:
    try:
        model = build(args)
    except (ValueError, UnitError, UnknownNuclideError) as exc:
        print(f"hotlab simulate calibrator: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(model, args))


async def _serve(model: DeviceModel, args: argparse.Namespace) -> int:
    host: PtyHost | TcpHost
    if args.tcp is not None or args.rfc2217 is not None:
        option, kind, spec = (
            ("tcp", TcpHost, args.tcp) if args.tcp is not None else ("rfc2217", Rfc2217Host, args.rfc2217)
        )
        address, _, port = spec.rpartition(":")
        if not address or not port.isdigit():
            print(f"hotlab simulate calibrator: --{option} wants HOST:PORT, got {spec!r}", file=sys.stderr)
            return 2
        host = kind(model, address, int(port))
    else:
        host = PtyHost(model, args.pty or None)
    try:
        where = await host.start()
    except OSError as exc:
        print(f"hotlab simulate calibrator: cannot serve: {exc}", file=sys.stderr)
        return 1
    # Handlers rather than KeyboardInterrupt: SIGTERM (a service manager's stop) ends it cleanly
    # too, and so does Ctrl-C when a shell started it as a background job with SIGINT ignored.
    # Installed before the address is printed, so whoever reads it may signal at once.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(where, flush=True)
    try:
        await stop.wait()
    finally:
        await host.stop()
    return 0
