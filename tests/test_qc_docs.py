"""docs/qc.md states what the code does: its limit tables, the schedule defaults and its config examples.

The doc is what a QC officer checks a verdict against, so a limit changed in controller/qc/limits.py
without the doc (or the reverse) must fail a test. Each number in the "Limits by profile" table is
parsed back and compared with `load_limits(profile=...)`; each source reference is expanded and
compared with the limit's `source` text. The tables of the QC, MQTT and InfluxDB docs are also
checked to render: every row has the header's number of cells, so a stray `|` cannot shift a column.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from hotlab.controller.qc.engine import QcConfig
from hotlab.controller.qc.limits import PROFILE_LIMITS, PROFILES, Limit, LimitKind, load_limits
from hotlab.controller.qc.schedule import DEFAULT_SOURCES, ScheduleConfig

ROOT = Path(__file__).resolve().parents[1]
QC_DOC = ROOT / "docs" / "qc.md"
DOCS = [QC_DOC, ROOT / "docs" / "mqtt.md", ROOT / "docs" / "influxdb.md"]
#: How a profile that has no limit of its own names the one it applies (controller/qc/limits.py `_instead`).
APPLIED_INSTEAD = "; applied instead: "

_NUMBER = r"[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?"
_RANGE = re.compile(rf"pass (?P<low>{_NUMBER})-(?P<high>{_NUMBER}) (?P<unit>\S+), fail outside")
_LEVELS = re.compile(
    rf"pass (?P<subject>\|dev\||value) (?P<op><=|>=) (?P<first>{_NUMBER}) (?P<unit>\S+)"
    rf"(?:, warn (?P=op) (?P<second>{_NUMBER}) (?P=unit))?, fail (?P<fail_op>[<>]) (?P<fail>{_NUMBER}) (?P=unit)"
)
_CELL = re.compile(r"`(?P<limit>[^`]+)` (?:(?P<why>N[0-9]+), )?(?P<source>S[0-9]+)")


def _cells(line: str) -> list[str]:
    """The cells of one table row; `\\|` is a pipe inside a cell (GitHub renders it so)."""
    inner = line.strip().removeprefix("|").removesuffix("|")
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", inner)]


def _tables(text: str) -> list[tuple[str, list[str]]]:
    """Every table outside code blocks, with the heading it stands under: (heading, raw lines)."""
    tables: list[tuple[str, list[str]]] = []
    heading, fenced = "", False
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if fenced:
            continue
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|"):
            if current is None:
                current = []
                tables.append((heading, current))
            current.append(line)
        else:
            current = None
    return tables


def _table(heading: str) -> list[list[str]]:
    """The body rows (cells) of the first table under `heading` in docs/qc.md."""
    for found, lines in _tables(QC_DOC.read_text(encoding="utf-8")):
        if found == heading:
            return [_cells(line) for line in lines[2:]]
    raise AssertionError(f"docs/qc.md has no table under {heading!r}")


def _levels(text: str) -> dict[str, Any]:
    """The kind, unit and numbers a limit cell states, read from its words (not from Limit.text)."""
    if match := _RANGE.fullmatch(text):
        return {
            "kind": LimitKind.RANGE,
            "unit": match["unit"],
            "warn": None,
            "fail": None,
            "low": float(match["low"]),
            "high": float(match["high"]),
        }
    match = _LEVELS.fullmatch(text)
    assert match is not None, f"limit cell {text!r} is not in the form a verdict's `limit` has"
    kind = {
        ("|dev|", "<="): LimitKind.TOLERANCE,
        ("value", "<="): LimitKind.CEILING,
        ("value", ">="): LimitKind.FLOOR,
    }[(match["subject"], match["op"])]
    assert match["fail_op"] == (">" if kind is not LimitKind.FLOOR else "<"), text
    fail = float(match["fail"])
    if match["second"] is None:
        assert float(match["first"]) == fail, f"{text!r}: a pass/fail limit has one level"
        warn = None
    else:
        assert float(match["second"]) == fail, f"{text!r}: warn ends where fail starts"
        warn = float(match["first"])
    return {"kind": kind, "unit": match["unit"], "warn": warn, "fail": fail, "low": None, "high": None}


def _numbers(limit: Limit) -> dict[str, Any]:
    return {name: getattr(limit, name) for name in ("kind", "unit", "warn", "fail", "low", "high")}


def _references() -> dict[str, str]:
    return {ref: text for ref, text in _table("Limit sources")}


def _limit_rows() -> dict[str, dict[str, str]]:
    """limit key -> {profile: cell} from "Limits by profile"."""
    rows: dict[str, dict[str, str]] = {}
    for key, _judges, *cells in _table("Limits by profile"):
        assert len(cells) == len(PROFILES), f"{key}: one column per profile {PROFILES}"
        rows[key.strip("`")] = dict(zip(PROFILES, cells, strict=True))
    return rows


def test_the_limits_table_has_one_row_per_limit_of_every_profile() -> None:
    rows = _limit_rows()
    for profile in PROFILES:
        assert set(rows) == set(PROFILE_LIMITS[profile]), profile


@pytest.mark.parametrize("profile", PROFILES)
def test_every_number_and_source_in_the_limits_table_is_the_profiles(profile: str) -> None:
    limits = load_limits(profile=profile)
    references = _references()
    for key, cells in _limit_rows().items():
        match = _CELL.fullmatch(cells[profile])
        assert match is not None, f"{key}/{profile}: cell {cells[profile]!r} is not `limit` [N.., ]S.."
        limit = limits[key]
        assert _levels(match["limit"]) == _numbers(limit), f"{key}/{profile}"
        assert match["limit"] == limit.text, f"{key}/{profile}: the cell is what the verdict's `limit` says"
        source = references[match["source"]]
        if match["why"] is not None:
            source = references[match["why"]] + APPLIED_INSTEAD + source
        assert source == limit.source, f"{key}/{profile}: source"


def test_every_source_reference_is_used() -> None:
    used = set()
    for cells in _limit_rows().values():
        for cell in cells.values():
            match = _CELL.fullmatch(cell)
            assert match is not None
            used |= {match["source"], match["why"]}
    assert set(_references()) == used - {None}


def _tests_the_rules_emit() -> set[str]:
    """Every `qc_result.test` name in controller/qc: the first argument of the calls that name a result."""
    namers = {"judged", "_against_source", "_GrowingImpurity"}
    names: set[str] = set()
    for path in (ROOT / "controller" / "qc").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in namers and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    names.add(first.value)
            # for test, ... in (("sr82_breakthrough", ...), ...): results named by a loop
            if isinstance(node, ast.For) and isinstance(node.target, ast.Tuple) and isinstance(node.iter, ast.Tuple):
                first_target = node.target.elts[0]
                if isinstance(first_target, ast.Name) and first_target.id == "test":
                    for item in node.iter.elts:
                        assert isinstance(item, ast.Tuple) and isinstance(item.elts[0], ast.Constant)
                        names.add(str(item.elts[0].value))
    return names


def test_every_test_the_code_can_judge_has_its_procedure_and_due_date_in_the_doc() -> None:
    emitted = _tests_the_rules_emit()
    assert {"constancy", "sr85_breakthrough", "mo99_breakthrough", "elution_yield_trend"} <= emitted
    rows = _table("Every QC test: how, when, and its limit")
    listed = {name for row in rows for name in re.findall(r"`([a-z0-9_]+)`", row[0])}
    assert emitted <= listed, f"missing from docs/qc.md: {sorted(emitted - listed)}"
    limits_named = {name for row in rows for name in re.findall(r"`([a-z0-9_]+)`", row[-1])}
    assert set(PROFILE_LIMITS[PROFILES[0]]) <= limits_named


def test_the_schedule_table_states_each_default_and_its_source() -> None:
    defaults = ScheduleConfig()
    rows = _table("Schedule")
    assert [row[0].strip("`") for row in rows] == list(DEFAULT_SOURCES)
    for key, default, source in rows:
        key = key.strip("`")
        assert source == DEFAULT_SOURCES[key], key
        value = default.strip("`").strip('"')
        configured = getattr(defaults, key)
        if key == "timezone":
            assert value == configured.key
        elif key == "daily_deadline":
            assert value == configured.strftime("%H:%M")
        elif isinstance(configured, str):
            assert value == configured
        else:
            assert float(value) == configured, key


def test_every_toml_example_in_the_qc_doc_is_a_valid_qc_config() -> None:
    blocks = re.findall(r"```toml\n(.*?)```", QC_DOC.read_text(encoding="utf-8"), flags=re.DOTALL)
    assert len(blocks) >= 3
    for block in blocks:
        QcConfig.from_mapping(tomllib.loads(block)["qc"])


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_every_table_row_has_the_headers_number_of_cells(doc: Path) -> None:
    for heading, lines in _tables(doc.read_text(encoding="utf-8")):
        widths = [len(_cells(line)) for line in lines]
        assert len(lines) >= 2 and set(_cells(lines[1])) <= {"---", ":---", "---:", ":---:", "--- "}, heading
        assert set(widths) == {widths[0]}, f"{doc.name}, table under {heading!r}: cells per row {widths}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_removed_settings_are_not_documented(doc: Path) -> None:
    assert "mo99_judge_horizon_h" not in doc.read_text(encoding="utf-8")
