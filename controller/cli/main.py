"""`hotlab` command line: one sub-command per module, each with a `register(subparsers)`.

Sub-command modules live beside their feature (decay maths, simulators, controller, QC,
report); this file only wires them, so adding a command never touches another's code.
Exit codes: 0 success, 1 runtime failure, 2 bad input (usage, config, unknown nuclide or unit).
A `HotlabError` ends its command here, with one line naming the command as its usage does
(`hotlab qc mo99: error: ...`) and the error's own exit code: sub-commands raise, none prints
its own errors or maps them to exit codes.
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
    "hotlab.controller.cli.user",
    "hotlab.controller.cli.review",
    "hotlab.controller.cli.cmd",
    "hotlab.controller.cli.web",
    "hotlab.controller.cli.doctor",
    "hotlab.controller.cli.install_units",
    "hotlab.controller.cli.broker",
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
        print(f"{_command_name(parser, args)}: error: {exc}", file=sys.stderr)
        return exc.exit_code


def _command_name(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The (sub-)command that ran, as its usage line names it, e.g. `hotlab qc mo99`."""
    while True:
        choice = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        chosen = None if choice is None else getattr(args, choice.dest, None)
        if choice is None or chosen is None:
            return parser.prog
        parser = choice.choices[chosen]
