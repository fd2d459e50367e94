"""Every `hotlab` command and sub-command prints its help: a help text argparse cannot format is a crash."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from hotlab.controller.cli.main import build_parser


def command_paths(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from command_paths(sub, (*path, name))


@pytest.mark.parametrize("path", list(command_paths(build_parser())), ids=" ".join)
def test_help_of_every_command(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*path, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage: hotlab")
