"""A built wheel installs into a fresh virtualenv with its declared dependencies and runs the demo from there.

Exactly what a lab does (`pip install hotlab-*.whl`, then `hotlab demo`), in another directory than
the checkout: a module the wheel misses, a dependency pyproject does not declare, or a template or
static file left out of the package data fails here, where the editable install would hide it. pip
resolves the dependencies from the configured package index (PyPI, or a mirror), helped by its
cache; the environment is made without pip of its own and filled by this interpreter's pip
(`--python`), which saves seconds. The base install runs the demo without the panel; the `web`
extra added, the demo serves its pages and static files from the installed package.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.wheel_build import REPO, built_wheel

#: The demo's panel announces itself on stderr (controller/cli/demo.py).
PANEL_LINE = re.compile(r"web panel: (http://127\.0\.0\.1:\d+/)")


def _run(*command: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv holding the wheel and the dependencies it declares, nothing from the checkout."""
    wheel = built_wheel(tmp_path_factory)
    root = tmp_path_factory.mktemp("wheel-venv")
    made = _run(sys.executable, "-m", "venv", "--without-pip", root / "venv", cwd=root)
    assert made.returncode == 0, made.stderr
    installed = _pip_install(root / "venv", str(wheel))
    assert installed.returncode == 0, installed.stderr
    return root / "venv"


def _pip_install(venv: Path, requirement: str) -> subprocess.CompletedProcess[str]:
    # --no-compile: the interpreter writes the bytecode it needs when it first imports a module.
    pip = [sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-compile"]
    return _run(*pip, requirement, cwd=venv)


def test_the_installed_wheel_imports_from_the_venv_and_has_no_bare_top_level_names(venv: Path, tmp_path: Path) -> None:
    imported = _run(
        venv / "bin" / "python", "-c", "import hotlab.controller.cli.main as m; print(m.__file__)", cwd=tmp_path
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip().startswith(str(venv)) and str(REPO) not in imported.stdout
    for bare in ("controller", "drivers", "simulators", "physics"):
        refused = _run(venv / "bin" / "python", "-c", f"import {bare}", cwd=tmp_path)
        assert f"No module named '{bare}'" in refused.stderr
    helped = _run(venv / "bin" / "hotlab", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert all(command in helped.stdout for command in ("run", "demo", "doctor", "install-units"))


def test_the_demo_runs_from_the_base_install_and_says_what_the_panel_needs(venv: Path, tmp_path: Path) -> None:
    hotlab = venv / "bin" / "hotlab"
    demo = _run(
        hotlab, "demo", "--headless", "--duration", "1", "--web-port", "0", "--state-dir", "state", cwd=tmp_path
    )
    assert demo.returncode == 0, demo.stderr
    assert "hotlab demo summary" in demo.stdout
    assert "web panel not started: it needs the optional packages, pip install 'hotlab[web]'" in demo.stderr
    assert (tmp_path / "state" / "history.sqlite3").is_file()


def test_with_the_web_extra_the_demo_serves_the_panel_from_the_package(
    venv: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Runs after the base-install tests above (pytest keeps the file's order): it adds the extra to their venv.
    installed = _pip_install(venv, f"{built_wheel(tmp_path_factory)}[web]")
    assert installed.returncode == 0, installed.stderr
    demo = subprocess.Popen(
        [venv / "bin" / "hotlab", "demo", "--headless", "--duration", "60", "--web-port", "0", "--state-dir", "state"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = _panel_url(demo)
        with urllib.request.urlopen(f"{url}login", timeout=10) as page:
            assert page.status == 200 and "<form" in page.read().decode()  # a template of the package
        with urllib.request.urlopen(f"{url}static/panel.css", timeout=10) as css:
            assert css.status == 200 and css.read()  # a static file of the package
        demo.send_signal(signal.SIGTERM)
        out, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.communicate()
    assert demo.returncode == 0, err
    assert "hotlab demo summary" in out


def _panel_url(demo: subprocess.Popen[str]) -> str:
    """Read the demo's stderr until the panel's URL; fail with what it said if it ends first.

    pytest's timeout (pyproject.toml) ends a demo that hangs without a word."""
    assert demo.stderr is not None
    said = []
    for line in demo.stderr:
        said.append(line)
        found = PANEL_LINE.search(line)
        if found:
            return found.group(1)
    raise AssertionError(f"the demo announced no web panel:\n{''.join(said)}")
