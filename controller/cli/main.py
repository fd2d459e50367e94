"""`hotlab` command line: one sub-command per module, each with a `register(subparsers)`.

Sub-command modules live beside their feature (decay maths, simulators, controller, QC,
report); this file only wires them, so adding a command never touches another's code.
Exit codes: 0 success, 1 runtime failure, 2 bad input (usage, config, unknown nuclide or unit).
A `HotlabError` that a sub-command does not handle itself ends it here with one line and the
error's own exit code, so no sub-command needs its own mapping.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from hotlab.errors import HotlabError

#: Modules that each add one or more sub-commands, in the order `--help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "hotlab.controller.cli.run",
    "hotlab.controller.cli.demo",
    "hotlab.controller.cli.decay",
    "hotlab.controller.cli.qc",
    "hotlab.controller.cli.audit",
    "hotlab.controller.cli.report",
    "hotlab.simulators.calibrator_cli",
    "hotlab.simulators.elution_station_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hotlab",
        description="Control and monitor radiopharmacy hot-lab instruments.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except HotlabError as exc:
        print(f"hotlab {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
