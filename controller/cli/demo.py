"""`hotlab demo`: a whole simulated hot lab and a live view of it, in one command.

What runs (controller/lab/simulated_lab.py starts it, DEMO_LAB below describes it):

* two dose calibrators of different families: a VIK-202 in the hot cell (Tc-99m, on a
  pseudo-terminal) and a VDC-404 in the QC lab on TCP (socket://), in which a simulated
  radiopharmacist puts a Tc-99m dose and the Cs-137 check source in and takes them out again
  every few seconds: each time is one measurement, and each check-source measurement one
  daily-constancy verdict;
* a Ge-68/Ga-68 and a Mo-99/Tc-99m generator, each on its own Modbus TCP elution station,
  with a simulated operator who elutes on a schedule by MQTT `start_elution` commands; the
  station clocks (and the calibrators' decay) run `--acceleration` times faster than the wall clock;
* the controller with the QC engine (constancy, elution yield and its trend, Mo-99
  breakthrough), the history archive, the audit trail of control commands, the private
  mosquitto unless --mqtt-host is given, and the private influxd (if installed) unless
  --influx-url names an InfluxDB (1.x with --influx-database, 2.x/3.x with --influx-bucket);
* the live view (controller/lab/demo.py), subscribed to the broker like a lab-wall screen, and
  the web panel on http://127.0.0.1:8080/ (`--web-port`, `--no-web`) for the demo's accounts;
* with `--history-days N`, first N days of past lab life in the archive (and InfluxDB), made by the
  same simulators, QC engine and sinks in accelerated time (controller/lab/history_fill.py).

At the end it prints, per sink, what it delivered and what is left in the outbox. A demo shows the
data reaching every sink it has, so a sink that never acknowledged anything (a wrong password, an
unreachable InfluxDB) ends it with exit code 1 and says which and why.

Exit codes: 0 after a clean stop (Ctrl-C, SIGTERM or --duration), 2 for bad options,
1 when the service fails or a sink never acknowledged anything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler

from hotlab.controller.audit import KEY_FILE_ENV, load_hmac_key
from hotlab.controller.cli.run import add_web_options, web_port
from hotlab.controller.config import ConfigError, load_secret
from hotlab.controller.lab.demo import LabView, render, snapshot_svg, watch_broker
from hotlab.controller.lab.demo_review import demo_signer
from hotlab.controller.lab.embedded_broker import write_file
from hotlab.controller.lab.history_plan import MAX_DAYS, MIN_DAYS
from hotlab.controller.lab.simulated_lab import (
    BrokerAddress,
    CheckSource,
    SimCalibrator,
    SimGenerator,
    SimLab,
    cancel_and_wait,
    simulated_lab,
    station_mo99_breakthrough,
)
from hotlab.controller.service import ControllerService, delivery_report, run_to_exit_code
from hotlab.controller.stop_signals import StopSignals
from hotlab.controller.web.embedded import lab_panel
from hotlab.errors import HotlabError

log = logging.getLogger("hotlab.demo")

#: Where the InfluxDB token (or, with --influx-username, the password) is read from unless
#: --influx-token-env/--influx-token-file say otherwise. There is no option taking the secret itself: process
#: arguments are visible to every user (ps, /proc/<pid>/cmdline) and end up in shell history
#: (controller/config.py, load_secret).
INFLUX_TOKEN_ENV = "HOTLAB_INFLUX_TOKEN"
#: The bucket written to when --influx-url names a 2.x/3.x InfluxDB and --influx-bucket does not say.
DEFAULT_INFLUX_BUCKET = "hotlab"


class SinkNeverDelivered(HotlabError):
    """A sink of the demo never acknowledged anything: the demo did not show what it was started to show."""


DEMO_LAB = SimLab(
    site="hotlab-demo",
    calibrators=(
        SimCalibrator("hotcell-calibrator", "vik202", "hotcell-1", "Tc-99m", 7.4e9, "pty"),
        SimCalibrator("qc-calibrator", "vdc404", "qc-lab", "Cs-137", 7.4e6, "tcp"),
    ),
    generators=(
        # 1.85 GBq (50 mCi) Ge-68, a common clinical size, calibrated a month ago; eluted every 15 min. Its clock
        # starts 3 days behind, so the QC officer can follow up an elution >= 48 h old during the demo.
        SimGenerator(
            "ga68-station", "radiochemistry", "ge68", "GE68-DEMO-001", 1.85e9, 30.0, 900.0, 5.0, clock_behind_h=72.0
        ),
        # 20 GBq Mo-99 (the simulator's nominal size), calibrated 2 days ago; eluted every 20 min.
        SimGenerator("tc99m-station", "hotcell-1", "mo99", "MO99-DEMO-001", 20e9, 2.0, 1200.0, 10.0),
    ),
    # 7.4 MBq (200 uCi) Cs-137 vial source, a usual constancy check source.
    check_source=CheckSource("cs137-check", "qc-calibrator", "Cs-137", 7.4e6),
    acceleration=60.0,
    calibrator_acceleration=60.0,
    qc_officer=True,
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="start a simulated hot lab with a live view (the first thing to try)",
        description="Start two dose calibrators, a Ga-68 and a Tc-99m generator station, the controller with QC, "
        "a private MQTT broker and the history archive, and show everything live. Ctrl-C stops.",
    )
    parser.add_argument("--duration", type=float, metavar="S", help="stop cleanly after S seconds")
    parser.add_argument("--headless", action="store_true", help="no live view; print a summary at the end")
    parser.add_argument(
        "--acceleration",
        type=float,
        default=DEMO_LAB.acceleration,
        metavar="X",
        help=f"simulated time runs X times faster than the wall clock (default {DEMO_LAB.acceleration:g})",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path("var/demo"),
        help="outbox, history archive, audit trail and driver state (default var/demo)",
    )
    parser.add_argument("--mqtt-host", help="use this MQTT broker instead of starting a private mosquitto")
    parser.add_argument("--mqtt-port", type=int, default=1883, help="port of --mqtt-host (default 1883)")
    parser.add_argument(
        "--influx-url",
        help="write to this InfluxDB, e.g. http://127.0.0.1:8086, instead of starting a private influxd",
    )
    parser.add_argument("--influx-database", metavar="NAME", help="InfluxDB 1.x: write natively to this database")
    parser.add_argument(
        "--influx-username", metavar="USER", help="InfluxDB 1.x: authenticate as USER; the secret is USER's password"
    )
    token = parser.add_mutually_exclusive_group()
    token.add_argument(
        "--influx-token-env",
        metavar="NAME",
        help=f"environment variable holding the InfluxDB token, or with --influx-username the password "
        f"(default {INFLUX_TOKEN_ENV})",
    )
    token.add_argument(
        "--influx-token-file",
        type=Path,
        metavar="PATH",
        help="file holding only that secret (instead of an environment variable)",
    )
    parser.add_argument("--influx-org", default="-", help="InfluxDB 2.x organisation (default '-')")
    parser.add_argument("--influx-bucket", help=f"InfluxDB 2.x/3.x bucket (default {DEFAULT_INFLUX_BUCKET})")
    parser.add_argument(
        "--snapshot", type=Path, metavar="SVG", help="when the demo is told to stop, save the live view as an SVG image"
    )
    parser.add_argument(
        "--history-days",
        type=int,
        metavar="N",
        help=f"first fill a new --state-dir with N days ({MIN_DAYS}-{MAX_DAYS}) of past lab life, so the "
        "panel, the report and the dashboards have months to show",
    )
    add_web_options(parser)
    parser.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    problem = _check_options(args)
    if problem:
        print(f"hotlab demo: {problem}", file=sys.stderr)
        return 2
    # One console for the live view and the log, so log lines scroll above the view instead of through it.
    console = Console()
    handler: logging.Handler = (
        logging.StreamHandler(sys.stderr) if args.headless else RichHandler(console=console, show_path=False)
    )
    logging.basicConfig(
        level=args.log_level, handlers=[handler], format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    influx = _influx_table(args) if args.influx_url else None
    broker = BrokerAddress(args.mqtt_host, args.mqtt_port) if args.mqtt_host else None
    lab = replace(DEMO_LAB, acceleration=args.acceleration, calibrator_acceleration=args.acceleration)
    return run_to_exit_code(_run(lab, args, broker, influx, console), "hotlab demo")


def _check_options(args: argparse.Namespace) -> str:
    if args.duration is not None and not args.duration > 0:
        return f"--duration must be > 0, got {args.duration:g}"
    if not 1 <= args.acceleration <= 3600:
        return f"--acceleration must be from 1 to 3600, got {args.acceleration:g}"
    if not 1 <= args.mqtt_port <= 65535:
        return f"--mqtt-port must be from 1 to 65535, got {args.mqtt_port}"
    if args.web_port is not None and not 0 <= args.web_port <= 65535:
        return f"--web-port must be from 0 to 65535, got {args.web_port}"
    if args.history_days is not None and not MIN_DAYS <= args.history_days <= MAX_DAYS:
        return f"--history-days must be from {MIN_DAYS} to {MAX_DAYS}, got {args.history_days}"
    if args.influx_url:
        option = "--influx-token-file" if args.influx_token_file is not None else "--influx-token-env"
        try:
            load_secret(
                env=None if args.influx_token_file is not None else _influx_token_env(args), file=args.influx_token_file
            )
        except ConfigError as exc:
            return f"{option}: {exc} (--influx-url needs the InfluxDB token)"
        if args.influx_database is not None and args.influx_bucket is not None:
            return "give either --influx-database (InfluxDB 1.x) or --influx-bucket (2.x/3.x), not both"
        if args.influx_username is not None and args.influx_database is None:
            return "--influx-username needs --influx-database (InfluxDB 1.x)"
    elif any(
        value is not None
        for value in (args.influx_token_env, args.influx_token_file, args.influx_database, args.influx_username)
    ):
        return "--influx-token-env/--influx-token-file/--influx-database/--influx-username need --influx-url"
    return ""


def _influx_table(args: argparse.Namespace) -> dict[str, Any]:
    """The [influx] table of --influx-*: a 1.x database (its user's password, or a token) or a 2.x/3.x bucket."""
    if args.influx_database is None:
        bucket = args.influx_bucket or DEFAULT_INFLUX_BUCKET
        return {"url": args.influx_url, "org": args.influx_org, "bucket": bucket, **_influx_token_source(args)}
    table = {"url": args.influx_url, "database": args.influx_database}
    if args.influx_username is None:
        return table | _influx_token_source(args)
    secret = {key.replace("token_", "password_"): value for key, value in _influx_token_source(args).items()}
    return table | {"username": args.influx_username} | secret


def _influx_token_env(args: argparse.Namespace) -> str:
    return args.influx_token_env if args.influx_token_env is not None else INFLUX_TOKEN_ENV


def _influx_token_source(args: argparse.Namespace) -> dict[str, str]:
    """The [influx] token keys: the config reads the secret itself, so its value never passes through here."""
    if args.influx_token_file is not None:
        return {"token_file": str(args.influx_token_file.resolve())}
    return {"token_env": _influx_token_env(args)}


async def _run(
    lab: SimLab, args: argparse.Namespace, broker: BrokerAddress | None, influx: dict[str, Any] | None, console: Console
) -> None:
    signals = StopSignals()
    with signals.interruptible_start():
        await _run_lab(lab, args, broker, influx, console, signals)


async def _run_lab(
    lab: SimLab,
    args: argparse.Namespace,
    broker: BrokerAddress | None,
    influx: dict[str, Any] | None,
    console: Console,
    signals: StopSignals,
) -> None:
    stop = signals.stop
    loop = asyncio.get_running_loop()
    state_dir: Path = args.state_dir
    audit_path = state_dir / "audit.jsonl"
    key = await asyncio.to_thread(_audit_key, state_dir)
    sign = await asyncio.to_thread(demo_signer, state_dir, audit_path, state_dir / "history.sqlite3", key)
    async with (
        simulated_lab(
            state_dir,
            lab,
            broker=broker,
            influx=influx,
            private_influxd=influx is None,
            audit_path=audit_path,
            sign=sign,
            accepted=args.history_days is not None,
        ) as config,
        lab_panel(config, web_port(args), key) as web_url,
    ):
        from hotlab.controller.qc.stage import qc_stage_for

        if args.history_days is not None:
            from hotlab.controller.lab.history_fill import fill_history

            filled = await fill_history(config, lab, args.history_days)
            print(filled.describe(), file=sys.stderr, flush=True)
        service = ControllerService(
            config, processors=[station_mo99_breakthrough(config.site)], stage=qc_stage_for(config)
        )
        where = "none" if config.mqtt is None else f"{config.mqtt.host}:{config.mqtt.port}"
        view = LabView(config.site, where, lab.acceleration)
        watcher: asyncio.Task[None] | None = None
        snapshot: asyncio.Task[None] | None = None
        try:  # from here on the live view's task exists: it must end with the demo, however the demo ends
            if config.mqtt is not None:
                subscribed = asyncio.Event()
                watcher = asyncio.create_task(
                    watch_broker(view, config.mqtt.host, config.mqtt.port, subscribed=subscribed), name="live-view"
                )
                # Subscribe before the first reading is published, so the screen misses nothing.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(subscribed.wait(), timeout=10.0)
            if args.duration is not None:
                loop.call_later(args.duration, stop.set)
            if web_url is not None:
                print(f"web panel: {web_url} (sign in with a demo account above)", file=sys.stderr, flush=True)
            print(
                f"demo running: state in {state_dir}; "
                f"{'Ctrl-C stops' if args.duration is None else f'stops after {args.duration:g} s'}",
                file=sys.stderr,
                flush=True,
            )
            started = time.monotonic()
            signals.running()
            if args.snapshot is not None:
                snapshot = asyncio.create_task(_snapshot_on_stop(view, stop, args.snapshot), name="snapshot")
            if args.headless:
                await service.run(stop)
            else:
                await _run_live(service, view, stop, console)
        finally:
            if watcher is not None:
                await cancel_and_wait(watcher)
            if snapshot is not None:
                if not stop.is_set():  # the demo failed: there is no running lab to draw
                    snapshot.cancel()
                await asyncio.gather(snapshot, return_exceptions=True)
        if args.headless:
            wall_s = time.monotonic() - started
            print(await asyncio.to_thread(summary, view, config.history_path, wall_s, audit_path, key))
        print(delivery_report(service.deliveries), flush=True)
        silent = [delivery for delivery in service.deliveries if delivery.silent]
        if silent:
            raise SinkNeverDelivered(
                "; ".join(
                    f"the {d.name} sink never acknowledged anything ({d.detail or 'no reason known'}): "
                    f"{d.left} message(s) wait in {config.outbox.path}"
                    for d in silent
                )
            )


def _audit_key(state_dir: Path) -> bytes:
    """The audit trail's HMAC key: the one configured, else the demo's own (state_dir/audit.key, made once).

    Signatures need a keyed trail (controller/signatures.py). The controller reads the key from the
    environment, so the demo's own key file is put there for this process and its controller.
    """
    key = load_hmac_key()
    if key is not None:
        return key
    path = state_dir / "audit.key"
    if not path.is_file():
        state_dir.mkdir(parents=True, exist_ok=True)
        write_file(path, secrets.token_hex(32) + "\n", private=True)
    os.environ[KEY_FILE_ENV] = str(path.resolve())
    key = load_hmac_key()
    assert key is not None
    return key


def _review_lines(history_path: Path, audit_path: Path, key: bytes | None) -> list[str]:
    """Each ended QC procedure (who started it), the signatures that count, and how many records await review."""
    from hotlab.controller.archive import HistoryArchive
    from hotlab.controller.signatures import awaiting_review, read_signatures

    ledger = read_signatures(audit_path, key) if audit_path.is_file() else None
    signatures = [] if ledger is None else ledger.valid
    with HistoryArchive(history_path, read_only=True) as archive:
        ended = [p for p in archive.query("qc_procedure") if p["status"] != "started"]
        pending = awaiting_review(archive, signatures)
    lines = []
    for procedure in ended:
        by = procedure["started_by"]
        who = "recognised" if by is None else f"started by {by['user']}"
        lines.append(
            f"  procedure {procedure['procedure']:<18} {procedure['status']:<10} {procedure['verdict'] or '-':<5} "
            f"{who} ({procedure['msg_id']})"
        )
    for signature in signatures:
        lines.append(
            f"  signed    {signature.meaning} by {signature.printed_name} ({signature.signer}), {signature.time}: "
            f"{len(signature.records)} record(s)"
        )
    lines.append(f"  review    {len(pending)} record(s) await review: hotlab review list")
    return lines


async def _snapshot_on_stop(view: LabView, stop: asyncio.Event, path: Path) -> None:
    """Before the controller shuts the devices down, while the view still shows the running lab."""
    await stop.wait()
    svg = snapshot_svg(view)
    try:
        await asyncio.to_thread(path.write_text, svg, encoding="utf-8")
    except OSError as exc:
        log.error("cannot write the snapshot %s: %s", path, exc)
        return
    print(f"wrote the live view to {path}", file=sys.stderr, flush=True)


async def _run_live(service: ControllerService, view: LabView, stop: asyncio.Event, console: Console) -> None:
    with Live(render(view), console=console, refresh_per_second=4, screen=False) as live:
        task = asyncio.create_task(service.run(stop), name="controller")
        while not task.done():
            live.update(render(view))
            await asyncio.wait({task}, timeout=0.25)
        live.update(render(view))
        await task


def summary(view: LabView, history_path: Path | None, wall_s: float, audit_path: Path, key: bytes | None) -> str:
    """The headless end-of-run summary: what the archive holds, the QC procedures and their review, and
    each device's last state."""
    lines = [f"hotlab demo summary (site {view.site}, {wall_s:.0f} s wall, stations at {view.acceleration:g}x)"]
    if history_path is not None and history_path.is_file():
        from hotlab.controller.archive import HistoryArchive

        with HistoryArchive(history_path, read_only=True) as archive:
            kinds = ("reading", "measurement", "elution", "qc_result", "device_status")
            counts = {kind: archive.count(kind) for kind in kinds}
            suspect = len(archive.query("reading", quality="suspect"))
            verdicts = Counter((str(r["test"]), str(r["verdict"])) for r in archive.query("qc_result"))
            elutions = archive.query("elution")
        lines.append(
            f"  history {history_path}: {counts['reading']} readings ({suspect} suspect), "
            f"{counts['measurement']} measurements, {counts['elution']} elutions, "
            f"{counts['qc_result']} QC results, {counts['device_status']} device statuses"
        )
        for (test, verdict), count in sorted(verdicts.items()):
            lines.append(f"  qc {test:<22} {verdict:<5} {count}")
        for elution in elutions[-4:]:
            yield_pct = elution.get("yield_pct")
            lines.append(
                f"  elution {elution['generator']} #{elution['counter']}: "
                f"{float(elution['activity_bq']) / 1e6:.1f} MBq {elution['nuclide']}, yield "
                f"{'-' if yield_pct is None else f'{float(yield_pct):.1f} %'}"
            )
        lines += _review_lines(history_path, audit_path, key)
    else:
        lines.append("  no history archive was written")
    for name, row in sorted(view.devices.items()):
        lines.append(
            f"  device {name:<20} {'online' if row.up else 'offline':<8} errors {row.errors}"
            f"{'  ' + row.detail if row.detail else ''}"
        )
    lines.append(
        f"  live view: {sum(view.counts.values())} messages, {view.rejected} rejected; audit trail {audit_path}"
    )
    return "\n".join(lines)
