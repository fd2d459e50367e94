"""The layers of the installed package import downward only, and no bare folder name is imported.

Read from the source with `ast`, so an import that only runs inside a function counts as well:
a lazy import still ties the layers together. Layers, bottom up: the `hotlab` root leaves
(every module in hotlab/, e.g. errors and backoff: each imports nothing of ours), physics,
drivers, simulators, controller. `from hotlab import X` is an import of `hotlab.X`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: Repository folder -> installed package.
PARTS = {
    "hotlab": "hotlab",
    "physics": "hotlab.physics",
    "drivers": "hotlab.drivers",
    "simulators": "hotlab.simulators",
    "controller": "hotlab.controller",
}
#: What each layer may import besides itself.
ALLOWED = {
    "hotlab": set(),
    "physics": {"hotlab"},
    "drivers": {"hotlab", "physics"},
    "simulators": {"hotlab", "physics", "drivers"},
    "controller": {"hotlab", "physics", "drivers", "simulators"},
}
OTHER_FOLDERS = ("tests", "bench")
#: The root leaves: every module of hotlab/ itself.
ROOT_MODULES = frozenset(path.stem for path in (REPO / "hotlab").glob("*.py") if path.stem != "__init__")


def _sources(folder: str) -> Iterator[Path]:
    yield from sorted((REPO / folder).rglob("*.py"))


def _imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of each import; `from a.b import c` counts as `a.b.c`, which is `a.b` itself
    when c is a name in it rather than a submodule: the layer is the same either way."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def _layer_of(module: str) -> str | None:
    """The layer an imported module belongs to, or None if it is not ours.

    Anything under `hotlab.` that is neither a root module nor a layer's package is reported
    as a layer of its own name, which no folder may import.
    """
    parts = module.split(".")
    if parts[0] != "hotlab":
        return None
    if len(parts) == 1 or parts[1] in ROOT_MODULES:
        return "hotlab"
    for folder, package in PARTS.items():
        if folder != "hotlab" and parts[1] == package.split(".")[1]:
            return folder
    return f"hotlab.{parts[1]}"


def _is_root_module(path: Path) -> bool:
    return path.parent == REPO / "hotlab" and path.stem != "__init__"


def _folder_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {folder: set() for folder in PARTS}
    for folder in PARTS:
        for path in _sources(folder):
            for _, module in _imported_modules(path):
                layer = _layer_of(module)
                if layer is not None and layer != folder:
                    edges[folder].add(layer)
    return edges


def test_each_layer_imports_only_the_layers_below_it() -> None:
    wrong = [
        f"{path.relative_to(REPO)}:{line} imports {module} ({layer}/ is not below {folder}/)"
        for folder in PARTS
        for path in _sources(folder)
        for line, module in _imported_modules(path)
        if (layer := _layer_of(module)) is not None and layer != folder and layer not in ALLOWED[folder]
    ]
    assert not wrong, "\n".join(wrong)


def test_every_root_module_is_a_leaf() -> None:
    """errors, backoff and any module added to hotlab/ sit below physics, so they import nothing of ours."""
    assert ROOT_MODULES >= {"errors", "backoff"}
    wrong = [
        f"{path.relative_to(REPO)}:{line} imports {module}: a root module imports nothing of ours"
        for path in _sources("hotlab")
        if _is_root_module(path)
        for line, module in _imported_modules(path)
        if _layer_of(module) is not None
    ]
    assert not wrong, "\n".join(wrong)


def test_the_folder_graph_has_no_cycle() -> None:
    edges = _folder_edges()
    order: list[str] = []
    remaining = {folder: set(targets) for folder, targets in edges.items()}
    while remaining:
        leaves = [folder for folder, targets in remaining.items() if not targets & remaining.keys()]
        assert leaves, f"import cycle among {sorted(remaining)}: {remaining}"
        for folder in leaves:
            order.append(folder)
            del remaining[folder]
    assert order[0] == "hotlab"


@pytest.mark.parametrize("folder", [*PARTS, *OTHER_FOLDERS])
def test_no_bare_folder_name_is_imported(folder: str) -> None:
    """`import controller` would find the source folder, not the installed package: always `hotlab.<name>`."""
    bare = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in _sources(folder)
        for line, module in _imported_modules(path)
        if module.split(".", 1)[0] in PARTS.keys() - {"hotlab"}
    ]
    assert not bare, "\n".join(bare)


def test_the_detector_sees_a_wrong_import(tmp_path: Path) -> None:
    """The checks above would pass vacuously if the parser found no imports at all."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import controller.config\nfrom hotlab.controller import service\nfrom hotlab import controller, errors\n"
        "\ndef f():\n    import drivers\n"
    )
    assert [module for _, module in _imported_modules(sample)] == [
        "controller.config",
        "hotlab.controller.service",
        "hotlab.controller",
        "hotlab.errors",
        "drivers",
    ]
    assert _layer_of("hotlab.controller.service") == "controller"
    assert _layer_of("hotlab.controller") == "controller"  # `from hotlab import controller`: not the root
    assert _layer_of("hotlab.errors.HotlabError") == _layer_of("hotlab") == "hotlab"
    assert _layer_of("hotlab.backoff") == "hotlab"
    assert _layer_of("hotlab.nowhere") == "hotlab.nowhere"
    assert _layer_of("hotlabx.errors") is None
    assert _folder_edges()["controller"] >= {"physics", "drivers"}
