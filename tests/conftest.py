"""Test-wide settings and guards.

Hypothesis runs the "ci" profile when CI is set (derandomized, so a failure in CI reproduces
the same way on a laptop; no deadline, since a shared 2-core machine stalls now and then) and
"dev" otherwise; HYPOTHESIS_PROFILE overrides both.

The repository root is on `sys.path` while the tests run (pytest puts it there for the `tests`
package), which would let a bare `import controller` find the source folder instead of the
installed `hotlab.controller`. This finder refuses those names, so no test can rely on them.

Every message a test publishes or archives is checked against its JSON Schema
(tests/schema_check.py), and the test that made a non-matching one fails.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

import pytest
from hypothesis import settings

from tests import fault_tally
from tests.schema_check import SchemaCheck

#: The repository folders that are installed only as `hotlab.<name>`.
FOLDER_NAMES = frozenset({"controller", "drivers", "simulators", "physics"})


class _RefuseFolderNames(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname.split(".", 1)[0] in FOLDER_NAMES:
            raise ImportError(f"import hotlab.{fullname}, not {fullname}: the folders are installed under hotlab")
        return None


sys.meta_path.insert(0, _RefuseFolderNames())


settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SchemaCheck(), "hotlab-schema-check")


def pytest_sessionfinish(session: pytest.Session) -> None:
    """In a parallel run's worker: hand this worker's fault counts to the main process."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["fault_tally"] = fault_tally.counts()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """In a parallel run's main process: add a finished worker's fault counts (pytest-xdist hook)."""
    for row, counts in (getattr(node, "workeroutput", {}) or {}).get("fault_tally", {}).items():
        fault_tally.tally(row, **counts)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault suite's totals (tests/fault_tally.py) as one table after the run."""
    lines = fault_tally.table()
    if lines:
        terminalreporter.section("fault suite: what was produced, delivered, flagged and refused")
        for line in lines:
            terminalreporter.write_line(line)
