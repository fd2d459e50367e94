"""`hotlab doctor [--config lab.toml]`: one line per check of this machine and the lab's services.

The checks are in controller/doctor/. Run it as the user the service runs as (`sudo -u hotlab
hotlab doctor --config /etc/hotlab/lab.toml`): permissions are checked for whoever runs it, and
root may open any file. A config that does not load is a FAIL line like any other finding.

Exit codes: 0 nothing failed (warnings may remain), 1 at least one FAIL, 2 bad options.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from hotlab.controller.doctor import examine, exit_code


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="check that this machine can run the lab: config, devices, broker, InfluxDB, disk, clock",
        description="One line per check (ok, warn or FAIL); exit code 1 if any failed. Without --config, only the "
        "host: the clock, and the disk of the default state directory. Run it as the service user.",
    )
    parser.add_argument("--config", type=Path, help="lab config (TOML) to check, with its devices and services")
    parser.set_defaults(func=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    findings = asyncio.run(examine(args.config))
    for finding in findings:
        print(finding, flush=True)
    return exit_code(findings)
