"""Test-wide guards.

The repository root is on `sys.path` while the tests run (pytest puts it there for the `tests`
package), which would let a bare `import controller` find the source folder instead of the
installed `hotlab.controller`. This finder refuses those names, so no test can rely on them.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

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
