"""A lab config file read into a `ConfigTable`: the one place a TOML file's read and syntax errors are worded.

Why apart from controller/config.py: commands that need one table of a lab's config (`hotlab qc`
its [qc.limits], `hotlab audit verify` its [mqtt] broker) read only that table, not the whole
lab, so a verifier needs none of the service's other settings or secrets; every error still
names the file the same way, e.g. `lab.toml: qc: must be a table, got 1 (integer)`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from hotlab.controller.config_table import ConfigError, ConfigTable


def read_config_file(path: str | Path) -> ConfigTable:
    """The whole file as the root table; paths in it resolve against its folder. Raises ConfigError."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read config file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    return ConfigTable(data, file=str(file), base_dir=file.resolve().parent)
