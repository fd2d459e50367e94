"""ConfigTable, the one way a config table is read: every error is `file: key.path: problem`, with what is allowed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hotlab.controller.config_table import ConfigError, ConfigTable
from hotlab.errors import InputError


def problem(read: Callable[[], Any]) -> str:
    with pytest.raises(ConfigError) as info:
        read()
    return str(info.value)


def test_an_error_names_the_file_then_the_key_path() -> None:
    table = ConfigTable({"port": "high"}, "mqtt", file="lab.toml")
    assert (
        problem(lambda: table.integer("port", 1883)) == "lab.toml: mqtt.port: must be an integer, got 'high' (string)"
    )
    assert str(ConfigTable({}, file="lab.toml").error(None, "needs [site]")) == "lab.toml: (top level): needs [site]"


def test_a_table_built_in_code_has_no_file_and_starts_at_the_key_path() -> None:
    table = ConfigTable({"fail": -1.0}, "qc.limits.dosage")
    assert problem(lambda: table.number("fail", minimum=0.0)) == "qc.limits.dosage.fail: must be >= 0, got -1.0"


def test_sub_tables_and_arrays_of_tables_extend_the_key_path() -> None:
    root = ConfigTable({"device": [{"transport": {"port": 0}}]}, file="lab.toml")
    [device] = root.tables("device")
    transport = device.table("transport")
    assert transport is not None
    message = problem(lambda: transport.integer("port", 502, minimum=1))
    assert message == "lab.toml: device[0].transport.port: must be >= 1, got 0"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"name": "x"}, "lab.toml: device: must be an array of tables ([[device]]), got {'name': 'x'} (table)"),
        ([{"name": "x"}, 5], "lab.toml: device[1]: must be a table, got 5 (integer)"),
    ],
)
def test_an_array_of_tables_says_which_entry_is_wrong(value: Any, message: str) -> None:
    root = ConfigTable({"device": value}, file="lab.toml")
    assert problem(lambda: root.tables("device")) == message


def test_finish_names_the_closest_known_key_and_every_allowed_one() -> None:
    table = ConfigTable({"pol_interval_s": 5, "name": "c"}, "device[0]", file="lab.toml")
    table.string("name")
    table.number("poll_interval_s", 2.0)
    assert problem(table.finish) == (
        "lab.toml: device[0].pol_interval_s: unknown key (did you mean 'poll_interval_s'?); "
        "allowed here: name, poll_interval_s"
    )


def test_finish_can_say_what_the_keys_of_a_table_stand_for() -> None:
    table = ConfigTable({"constancyy": {}}, "qc.limits")
    table.table("constancy")
    assert problem(lambda: table.finish("test")) == (
        "qc.limits.constancyy: unknown test (did you mean 'constancy'?); allowed here: constancy"
    )


def test_relative_paths_resolve_against_the_config_files_directory(tmp_path: Path) -> None:
    table = ConfigTable({"path": "var/../outbox.sqlite3"}, "outbox", file="lab.toml", base_dir=tmp_path)
    assert table.path_value("path") == tmp_path / "outbox.sqlite3"
    assert table.resolve("/srv/lab") == Path("/srv/lab")


def test_config_errors_are_input_errors_with_exit_code_2() -> None:
    assert issubclass(ConfigError, InputError) and issubclass(ConfigError, ValueError)
    assert ConfigError.exit_code == 2
