"""`hotlab qc status [--config lab.toml] [--at TIME] [--json]`: every scheduled QC item and its state.

Computed by the controller's own schedule (controller/qc/schedule_stage.py `restore` and
`current`) from the history archive and the lab config alone, so the list is right while the
controller is down, and `--at` shows it as it was at any past moment. Records the controller has
committed but not archived yet (its history sink runs behind) are not seen until they are. Only [site], [history],
the [[device]] stations and [qc] are read: no broker or database secrets are needed.
Exit 0 with the list (an overdue item is a state, not an error), 2 on a bad config or time.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime

from rich.console import Console
from rich.table import Table

from hotlab.controller.archive import HistoryArchive
from hotlab.controller.config import load_history_path
from hotlab.controller.config_file import read_config_file
from hotlab.controller.qc.engine import QcConfig, parse_time_ns
from hotlab.controller.qc.schedule import ItemStatus
from hotlab.controller.qc.schedule_stage import ScheduleStage, qc_status_message, schedule_stage_for
from hotlab.errors import InputError
from hotlab.physics.utc_time import NS_PER_S

_STATE_STYLE = {"done": "green", "due": "yellow", "overdue": "bold red", "failed": "bold red"}


def register_status(qc_subparsers: argparse._SubParsersAction) -> None:
    """Add `status` to the `hotlab qc` sub-commands."""
    description = __doc__.split("\n\n")[0]
    sub = qc_subparsers.add_parser(
        "status", help="list every scheduled QC item: done, due, overdue or failed", description=description
    )
    sub.add_argument(
        "--config", default="lab.toml", help="lab config (TOML) whose archive and [qc] to read (default lab.toml)"
    )
    sub.add_argument("--at", help="the moment to show, ISO 8601 with offset (default: now)")
    sub.add_argument("--json", action="store_true", help="print the qc_status payloads as JSON")
    sub.set_defaults(func=_run)


def load_schedule(config_path: str) -> ScheduleStage:
    """The schedule stage the controller would build from `config_path` (state not restored yet)."""
    root = read_config_file(config_path)
    site_table = root.table("site", required=True)
    assert site_table is not None
    site = site_table.string("name", required=True)
    stations = {
        entry.string("name", required=True): entry.string("station", required=True) for entry in root.tables("device")
    }
    qc_table = root.table("qc")
    if qc_table is None:
        raise InputError(f"{config_path}: no [qc] table: no calibrator or generator has scheduled QC")
    qc = QcConfig.from_table(qc_table)
    return schedule_stage_for(site, qc, qc.schedule, stations)


def _run(args: argparse.Namespace) -> int:
    now_ns = time.time_ns() if args.at is None else parse_time_ns(args.at, "--at")
    stage = load_schedule(args.config)
    archive_path = load_history_path(args.config)
    if archive_path is None or not archive_path.is_file():
        raise InputError(f"no history archive at {archive_path} ([history] in {args.config})")
    with HistoryArchive(archive_path, read_only=True) as archive:
        stage.restore(archive, now_ns=now_ns)
    statuses = stage.current(now_ns)
    if args.json:
        payloads = [qc_status_message(stage.site, status, now_ns).payload for status in statuses]
        print(json.dumps(payloads, indent=2, allow_nan=False))
    else:
        _print_table(stage, statuses, now_ns)
    return 0


def _print_table(stage: ScheduleStage, statuses: list[ItemStatus], now_ns: int) -> None:
    zone = stage.schedule.config.timezone
    table = Table(title=f"hotlab QC schedule, {stage.site}, at {_local(now_ns, stage)} ({zone.key})")
    for column in ("device", "item", "state", "due", "overdue from", "last done", "verdict"):
        table.add_column(column, no_wrap=True)
    table.add_column("detail")
    for status in statuses:
        table.add_row(
            status.device,
            status.item,
            f"[{_STATE_STYLE[status.state]}]{status.state.upper()}[/]",
            _local(status.due_ns, stage),
            _local(status.overdue_ns, stage),
            _local(status.last_done_ns, stage),
            status.last_verdict or "-",
            status.detail,
        )
    Console().print(table)


def _local(time_ns: int | None, stage: ScheduleStage) -> str:
    if time_ns is None:
        return "-"
    moment = datetime.fromtimestamp(time_ns // NS_PER_S, stage.schedule.config.timezone)
    return moment.strftime("%Y-%m-%d %H:%M %Z")
