"""The hotlab wheel, built by pip from this checkout once per test session for every test that needs it.

A module-scoped fixture in each test module would build it once per module (3-4 s each); the wheel
is instead kept in the session's base temporary directory and reused from there.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout (`pip wheel --no-deps`: the build backend comes from the package index)."""
    out = tmp_path_factory.getbasetemp() / "hotlab-wheel"
    if not out.is_dir():
        building = tmp_path_factory.mktemp("hotlab-wheel-building")
        built = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(building), str(REPO)],
            cwd=building,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert built.returncode == 0, built.stderr
        building.rename(out)
    (wheel,) = out.glob("hotlab-*.whl")
    return wheel
