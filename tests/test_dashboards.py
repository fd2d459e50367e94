"""Structure of the Grafana dashboards and provisioning files (no Grafana or InfluxDB needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"
DASHBOARD_FILES = sorted(DASHBOARDS.glob("*.json"))
BUILTIN_VARIABLES = {"timeFilter", "__interval", "tag_device", "tag_nuclide", "tag_generator", "tag_parent", "col"}
VARIABLE_USE = re.compile(r"\$\{?(\w+)")
# InfluxQL that InfluxDB 3.x does not implement (or that would not be portable between 1.8, 2.x and 3.x).
NON_PORTABLE = re.compile(
    r"\bINTO\b|FROM\s*\(|\bSLIMIT\b|\bSOFFSET\b|fill\(linear\)|\bholt_winters|\bCREATE\b|\bDROP\b", re.IGNORECASE
)
PORTABLE_FUNCTIONS = {"last", "mean", "min", "max", "count", "sum", "time", "fill"}
#: Where raw readings are (the 1.x retention policy, or a 2.x DBRP mapping / 3.x database of that name) and their
#: per-minute summary (docs/influxdb.md, "Retention and downsampling").
RAW_READINGS = 'FROM "raw"."reading"'
SUMMARY = 'FROM "reading_1m"'


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _provisioned_datasource() -> dict[str, Any]:
    document = yaml.safe_load((DASHBOARDS / "provisioning/datasources/hotlab.yaml").read_text())
    [datasource] = document["datasources"]
    return datasource


def test_the_four_dashboards_exist_with_unique_uids_and_titles() -> None:
    dashboards = [_load(path) for path in DASHBOARD_FILES]
    uids = [d["uid"] for d in dashboards]
    assert set(uids) == {"hotlab-lab-overview", "hotlab-elution", "hotlab-calibrator-qc", "hotlab-alarms"}
    assert len({d["title"] for d in dashboards}) == len(dashboards)
    assert all(len(uid) <= 40 for uid in uids)  # Grafana's uid limit


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_panels_have_datasource_targets_and_a_sane_layout(path: Path) -> None:
    dashboard = _load(path)
    datasource_uid = _provisioned_datasource()["uid"]
    panels = dashboard["panels"]
    assert panels and len({p["id"] for p in panels}) == len(panels)
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["datasource"] == {"type": "influxdb", "uid": datasource_uid}, panel["title"]
        assert panel["title"] and panel["description"], panel["id"]
        targets = panel["targets"]
        assert targets and len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["datasource"]["uid"] == datasource_uid and target["rawQuery"] is True
            assert target["query"].startswith("SELECT ") and "$timeFilter" in target["query"], panel["title"]
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_every_variable_used_is_defined_before_use_and_every_variable_is_used(path: Path) -> None:
    dashboard = _load(path)
    defined: list[str] = []
    for variable in dashboard["templating"]["list"]:
        assert variable["type"] == "query" and variable["query"].startswith("SHOW TAG VALUES")
        assert variable["datasource"]["uid"] == _provisioned_datasource()["uid"]
        used = set(VARIABLE_USE.findall(variable["query"])) - BUILTIN_VARIABLES
        assert used <= set(defined), f"variable {variable['name']} uses {used - set(defined)} before definition"
        defined.append(variable["name"])
    used_by_panels: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for text in (target["query"], target.get("alias", "")):
                names = set(VARIABLE_USE.findall(text))
                assert names - BUILTIN_VARIABLES <= set(defined), f"{panel['title']}: undefined {names - set(defined)}"
                used_by_panels |= names
    assert set(defined) <= used_by_panels, f"unused variables {set(defined) - used_by_panels}"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_queries_stay_within_influxql_that_1_8_2_x_and_3_x_all_run(path: Path) -> None:
    dashboard = _load(path)
    queries = [t["query"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [v["query"] for v in dashboard["templating"]["list"]]
    for query in queries:
        assert not NON_PORTABLE.search(query), query
        functions = {name.lower() for name in re.findall(r"(\w+)\(", query)}
        assert functions <= PORTABLE_FUNCTIONS, f"{functions - PORTABLE_FUNCTIONS} in {query}"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_readings_come_from_the_raw_policy_for_rows_and_short_ranges_and_from_the_summary_otherwise(path: Path) -> None:
    """Raw readings are kept raw_days: a panel that shows a range's trend or count reads the per-minute summary
    (kept for good), or has a twin that does; only panels of single readings (the latest, each suspect one) and
    short-range trends read them raw, and they say how long raw readings are kept."""
    panels = _load(path)["panels"]
    for panel in panels:
        for target in panel["targets"]:
            query = target["query"]
            assert 'FROM "reading"' not in query, f"{panel['title']}: readings are not in the default policy"
            if SUMMARY in query:
                assert panel.get("interval") == "1m", f"{panel['title']}: finer than its per-minute summary"
            if RAW_READINGS not in query:
                continue
            assert "raw_days" in panel["description"], panel["title"]
            grouping = re.search(r"GROUP BY time\(\$__interval\)(.*?) fill", query)
            if grouping is None:
                assert panel["type"] == "table", f"{panel['title']}: a count of raw readings misses older ones"
                continue
            twins = [p for p in panels for t in p["targets"] if SUMMARY in t["query"] and grouping[0] in t["query"]]
            assert twins, f"{panel['title']}: no per-minute twin for long ranges"


def test_datasource_provisioning_is_influxql_with_env_configured_secrets() -> None:
    datasource = _provisioned_datasource()
    assert datasource["type"] == "influxdb" and datasource["access"] == "proxy"
    assert datasource["jsonData"]["version"] == "InfluxQL"
    assert datasource["url"] == "${HOTLAB_INFLUX_URL}"
    assert datasource["jsonData"]["dbName"] == "${HOTLAB_INFLUX_DATABASE}"
    assert datasource["jsonData"]["httpHeaderName1"] == "Authorization"
    assert datasource["secureJsonData"]["httpHeaderValue1"] == "Token ${HOTLAB_INFLUX_TOKEN}"


def test_dashboard_provider_points_at_the_folder_the_readme_mounts_dashboards_to() -> None:
    document = yaml.safe_load((DASHBOARDS / "provisioning/dashboards/hotlab.yaml").read_text())
    [provider] = document["providers"]
    assert provider["type"] == "file"
    mount_target = provider["options"]["path"]
    readme = (DASHBOARDS / "README.md").read_text()
    assert f"./dashboards:{mount_target}:ro" in readme
    assert "./dashboards/provisioning:/etc/grafana/provisioning:ro" in readme
    assert DASHBOARD_FILES, "the mounted folder must hold the dashboards"
