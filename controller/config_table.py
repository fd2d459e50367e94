"""One TOML table under validation, so that every configuration error reads the same way.

The lab config (controller/config.py), the QC limits (controller/qc/limits.py) and the InfluxDB
sink's settings (controller/sinks/influx.py) are all written by people, and whoever fixes one
needs the same four things from any message: the file, the key path, what is wrong and what
would be accepted, e.g. `lab.toml: device[0].timeout_s: must be <= 300, got 900`. Each kind of
value is checked here once, and `finish()` turns a key nobody asked for into an error with a
"did you mean" hint: a misspelt key silently falling back to its default is how a lab ends up
polling a calibrator ten times too often.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, overload

from hotlab.errors import InputError


class ConfigError(InputError):
    """A config problem; `str()` is the full, user-facing message (file, key path, problem, what is allowed)."""


def describe(value: Any) -> str:
    """A value as a message quotes it, with its TOML kind, e.g. `'fast' (string)`."""
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "table"}
    return f"{value!r} ({kinds.get(type(value), type(value).__name__)})"


class ConfigTable:
    """One table being validated: knows its file and key path for messages, and which keys were read.

    `file` is None for a table built in code (the message then starts at the key path); relative
    paths are resolved against `base_dir` (the config file's directory), else the working directory.
    """

    def __init__(
        self, data: Mapping[str, Any], path: str = "", *, file: str | None = None, base_dir: Path | None = None
    ) -> None:
        self.data = data
        self.path = path
        self.file = file
        self.base_dir = base_dir if base_dir is not None else Path.cwd()
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        """The full key path of `name` in this table, e.g. `device[0].transport.port`."""
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str | None, problem: str) -> ConfigError:
        """The one shape of a config error: `file: key.path: problem` (the table itself when `name` is None)."""
        where = self.key(name) if name else (self.path or "(top level)")
        return ConfigError(f"{self.file}: {where}: {problem}" if self.file is not None else f"{where}: {problem}")

    def wrong_type(self, name: str, expected: str) -> ConfigError:
        """`name` holds the wrong kind of value; `expected` says what would do, e.g. "a table"."""
        return self.error(name, f"must be {expected}, got {describe(self.data[name])}")

    def value(self, name: str, *, required: bool = False) -> Any:
        """The raw value of `name` (None if absent), for keys that may hold more than one kind of value."""
        self._seen.add(name)
        if name not in self.data:
            if required:
                raise self.error(name, "is required but missing")
            return None
        return self.data[name]

    @overload
    def string(
        self,
        name: str,
        default: str,
        *,
        required: bool = ...,
        choices: tuple[str, ...] | None = ...,
        pattern: re.Pattern[str] | None = ...,
        rule: str = ...,
    ) -> str: ...

    @overload
    def string(
        self,
        name: str,
        default: None = ...,
        *,
        required: Literal[True],
        choices: tuple[str, ...] | None = ...,
        pattern: re.Pattern[str] | None = ...,
        rule: str = ...,
    ) -> str: ...

    @overload
    def string(
        self,
        name: str,
        default: str | None = ...,
        *,
        required: bool = ...,
        choices: tuple[str, ...] | None = ...,
        pattern: re.Pattern[str] | None = ...,
        rule: str = ...,
    ) -> str | None: ...

    def string(
        self,
        name: str,
        default: str | None = None,
        *,
        required: bool = False,
        choices: tuple[str, ...] | None = None,
        pattern: re.Pattern[str] | None = None,
        rule: str = "",
    ) -> str | None:
        """A non-blank string, one of `choices` or matching `pattern` (`rule` says in words what that allows)."""
        value = self.value(name, required=required)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.wrong_type(name, "a string")
        if choices is not None and value not in choices:
            raise self.error(name, f"{value!r} is not allowed; allowed: {', '.join(choices)}")
        if pattern is not None and not pattern.match(value):
            raise self.error(name, f"{value!r} is not valid; expected {rule}")
        if not value.strip():
            raise self.error(name, "must not be empty")
        return value

    @overload
    def number(
        self,
        name: str,
        default: float,
        *,
        minimum: float | None = ...,
        maximum: float | None = ...,
        exclusive_minimum: bool = ...,
    ) -> float: ...

    @overload
    def number(
        self,
        name: str,
        default: float | None = ...,
        *,
        minimum: float | None = ...,
        maximum: float | None = ...,
        exclusive_minimum: bool = ...,
    ) -> float | None: ...

    def number(
        self,
        name: str,
        default: float | None = None,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        exclusive_minimum: bool = False,
    ) -> float | None:
        """A finite number (an integer is accepted as one) within the bounds given."""
        value = self.value(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.wrong_type(name, "a finite number")
        self._check_range(name, value, minimum, maximum, exclusive_minimum)
        return float(value)

    def integer(self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
        """An integer within the bounds given (2.0 is refused: a count written as a float is a slip)."""
        value = self.value(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.wrong_type(name, "an integer")
        self._check_range(name, value, minimum, maximum, False)
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.value(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.wrong_type(name, "true or false")
        return value

    def path_value(self, name: str, default: Path | None = None, *, must_exist: bool = False) -> Path | None:
        """A file system path, resolved against `base_dir`; with `must_exist`, a regular file that exists now."""
        text = self.string(name)
        if text is None:
            return default
        if "\x00" in text:
            raise self.error(name, "must not contain a NUL byte (no file system accepts one in a path)")
        resolved = self.resolve(text)
        if must_exist:
            try:
                is_file = resolved.is_file()
            except OSError as exc:  # e.g. ENAMETOOLONG: the name cannot be a file at all
                raise self.error(name, f"cannot check {str(resolved)[:200]!r}: {exc.strerror}") from None
            if not is_file:
                raise self.error(name, f"file {str(resolved)!r} does not exist or is not a regular file")
        return resolved

    def resolve(self, text: str) -> Path:
        """`text` as a normalised path: `~` expanded, relative to `base_dir`, so a config works from any directory."""
        path = Path(text).expanduser()
        return Path(os.path.normpath(path if path.is_absolute() else self.base_dir / path))

    def table(self, name: str, *, required: bool = False) -> ConfigTable | None:
        """The sub-table `name` (None if absent), validated with the same file and a longer key path."""
        value = self.value(name, required=required)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise self.wrong_type(name, "a table")
        return self._child(value, self.key(name))

    def tables(self, name: str) -> list[ConfigTable]:
        """The array of tables `[[name]]` (empty if absent), one ConfigTable per entry at `name[index]`."""
        value = self.value(name)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.wrong_type(name, f"an array of tables ([[{name}]])")
        entries: list[ConfigTable] = []
        for index, item in enumerate(value):
            if not isinstance(item, Mapping):
                raise self.error(f"{name}[{index}]", f"must be a table, got {describe(item)}")
            entries.append(self._child(item, self.key(f"{name}[{index}]")))
        return entries

    def finish(self, kind: str = "key") -> None:
        """Reject keys nobody asked for (almost always a typo), naming the closest known one and all of them.

        `kind` names what a key of this table is, for a table whose keys are themselves names (e.g. "test").
        """
        unknown = sorted(set(self.data) - self._seen)
        if unknown:
            name = unknown[0]
            hint = difflib.get_close_matches(name, sorted(self._seen), n=1)
            allowed = ", ".join(sorted(self._seen))
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise self.error(name, f"unknown {kind}{suggestion}; allowed here: {allowed}")

    def _child(self, data: Mapping[str, Any], path: str) -> ConfigTable:
        return ConfigTable(data, path, file=self.file, base_dir=self.base_dir)

    def _check_range(
        self, name: str, value: float, minimum: float | None, maximum: float | None, exclusive_minimum: bool
    ) -> None:
        if minimum is not None and (value <= minimum if exclusive_minimum else value < minimum):
            raise self.error(name, f"must be {'>' if exclusive_minimum else '>='} {minimum:g}, got {value!r}")
        if maximum is not None and value > maximum:
            raise self.error(name, f"must be <= {maximum:g}, got {value!r}")
