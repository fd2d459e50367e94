"""hotlab installs as one `hotlab` package: a built wheel and the editable install both give
`hotlab.controller`, `hotlab.drivers`, `hotlab.simulators` and `hotlab.physics`, and neither puts
a top-level `controller` or `drivers` where another distribution could shadow it.

The wheel is built by pip from this checkout (tests/wheel_build.py); what it holds is checked here,
installing and running it in tests/test_wheel_install.py.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.wheel_build import REPO, built_wheel

#: Repository folder -> where the wheel installs it.
PACKAGE_FOLDERS = {
    "hotlab": "hotlab",
    "physics": "hotlab/physics",
    "drivers": "hotlab/drivers",
    "simulators": "hotlab/simulators",
    "controller": "hotlab/controller",
}
IMPORT_ALL = "import hotlab.controller, hotlab.drivers, hotlab.simulators, hotlab.physics; print(hotlab.__file__)"


def _run(*command: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_wheel(tmp_path_factory)


def _source_files() -> set[str]:
    """Every file the wheel must hold, named as installed: each module of the five folders, the JSON
    schemas, the web panel's templates and static files, and the typing marker. A subpackage missing from pyproject's explicit `packages` is missing here."""
    files = {"hotlab/py.typed"}
    for folder, prefix in PACKAGE_FOLDERS.items():
        root = REPO / folder
        for path in root.rglob("*.py"):
            if "__pycache__" not in path.parts:
                files.add(f"{prefix}/{path.relative_to(root).as_posix()}")
    files |= {f"hotlab/controller/schemas/{path.name}" for path in (REPO / "controller" / "schemas").glob("*.json")}
    web = REPO / "controller" / "web"
    files |= {
        f"hotlab/controller/web/{path.relative_to(web).as_posix()}"
        for folder in ("templates", "static")
        for path in (web / folder).rglob("*")
        if path.is_file()
    }
    return files


def test_the_wheel_holds_exactly_the_hotlab_package(wheel: Path) -> None:
    names = [name for name in zipfile.ZipFile(wheel).namelist() if not name.split("/", 1)[0].endswith(".dist-info")]
    assert {name.split("/", 1)[0] for name in names} == {"hotlab"}
    packaged, expected = set(names), _source_files()
    assert not expected - packaged, f"missing from the wheel (pyproject's packages?): {sorted(expected - packaged)}"
    assert not packaged - expected, (
        f"in the wheel but not in the source (a stale build/?): {sorted(packaged - expected)}"
    )


def test_the_editable_install_gives_the_same_names_and_no_bare_ones(tmp_path: Path) -> None:
    imported = _run(sys.executable, "-c", IMPORT_ALL, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == str(REPO / "hotlab" / "__init__.py")
    refused = _run(sys.executable, "-c", "import controller", cwd=tmp_path)
    assert "No module named 'controller'" in refused.stderr
