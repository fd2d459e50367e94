"""End-to-end benchmark: simulated calibrators -> `hotlab run` -> real Mosquitto and InfluxDB.

    .venv/bin/python bench/e2e.py            # 1, 10, 100, 500 devices, ~3 min
    .venv/bin/python bench/e2e.py --quick    # 1 and 100 devices, ~30 s

Per device count N, everything is a real process on loopback:

* N VIK-202 simulators (simulators/calibrator_vik202.py) on TCP in one separate process,
  reached by the driver through `socket://` URLs, as through a serial device server;
* the controller, `python -m hotlab.controller.cli run --config ... --duration D`, exactly as
  deployed (outbox with synchronous=FULL, QC engine, MQTT, InfluxDB and history sinks);
* Mosquitto and influxd started like the test fixtures (tests/mosquitto_service.py and
  tests/influx_service.py, including its v2-write bridge for InfluxDB 1.6);
* a QoS 1 subscriber here, which stamps each reading on arrival.

Poll interval = N / `--offered` (default 2000 readings/s), so every N offers the same load.
Measured in a steady-state window (after `--warmup` s, until the stop), over the readings
whose device frame falls in it (each counted once, all of them delivered by the end):
readings/s, readings per CPU-second of the controller process (all its
threads, from /proc/<pid>/stat), latency from the device frame (Reading.timestamp_ns, set
when the reply was parsed) to arrival at the subscriber (p50/p99), and RSS. After the run
the InfluxDB row count must equal the distinct readings seen on MQTT.

Each N is followed by the naive baseline (bench/baseline.py) with the same number of
points, so the ratio is measured on the same machine in the same minute. Decay maths has
its own benchmark: bench/bench_decay.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hotlab.controller.config import MqttConfig
from hotlab.controller.lab.embedded_broker import MosquittoBroker
from tests.influx_service import InfluxService

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PASSWORD_ENV = "HOTLAB_BENCH_INFLUX_PASSWORD"


# --------------------------------------------------------------------------- simulator process


async def serve_simulators(count: int) -> None:
    """Child process: N VIK-202 simulators on TCP; print their URLs as one JSON line; run until stdin closes."""
    from hotlab.simulators.calibrator_vik202 import Vik202Simulator
    from hotlab.simulators.faults import FaultInjector
    from hotlab.simulators.serial_host import TcpHost
    from hotlab.simulators.source import make_chamber

    hosts = []
    for index in range(count):
        chamber = make_chamber("Tc-99m", 740e6 * (1 + index % 7), noise_rel=0.002, seed=index)
        host = TcpHost(Vik202Simulator(chamber, FaultInjector(seed=index)))
        await host.start()
        hosts.append(host)
    print(json.dumps([host.url for host in hosts]), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for host in hosts:
        await host.stop()


# --------------------------------------------------------------------------- measurement


class LatencySubscriber:
    """A QoS 1 subscriber on its own paho network thread; records (arrival ns, frame ns, msg_id) per reading."""

    def __init__(self, host: str, port: int, site: str) -> None:
        self.records: list[tuple[int, int, str]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{site}")
        self._client.on_connect = lambda c, *_: c.subscribe(f"hotlab/{site}/+/+/reading", qos=1)
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        self._client.loop_start()
        if not self._subscribed.wait(20):
            raise RuntimeError("subscriber could not subscribe within 20 s")

    def _on_message(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        arrived = time.time_ns()
        payload = json.loads(message.payload)
        with self._lock:
            self.records.append((arrived, int(payload["time_ns"]), payload["msg_id"]))

    def distinct(self) -> int:
        with self._lock:
            return len({msg_id for _, _, msg_id in self.records})

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid`, from /proc (the process must still run)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class RunResult:
    devices: int
    poll_s: float
    readings: int
    per_wall_s: float
    per_cpu_s: float
    cpu_fraction: float
    p50_ms: float
    p99_ms: float
    rss_mib: float
    max_rss_mib: float
    influx_rows: int
    mqtt_distinct: int
    left_in_outbox: int
    baseline_per_cpu_s: float
    baseline_per_wall_s: float

    @property
    def ratio_cpu(self) -> float:
        return self.per_cpu_s / self.baseline_per_cpu_s


def write_config(
    path: Path,
    site: str,
    urls: list[str],
    poll_s: float,
    broker: MosquittoBroker,
    influx: InfluxService,
    database: str,
    inflight: int,
) -> None:
    devices = "".join(
        f'[[device]]\nname = "cal-{i}"\nstation = "hotcell-1"\nfamily = "vik202"\ntransport = "{url}"\n'
        f"poll_interval_s = {poll_s}\ntimeout_s = 5.0\n\n"
        for i, url in enumerate(urls, start=1)
    )
    path.write_text(
        f'[site]\nname = "{site}"\n\n[service]\ndrain_timeout_s = 60\n\n'
        f'[outbox]\npath = "outbox.sqlite3"\n\n[history]\npath = "history.sqlite3"\n\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nclient_id = "bench-{site}"\n'
        f"inflight_window = {inflight}\n\n"
        f'[influx]\nurl = "{influx.v2_url}"\nusername = "{influx.username}"\npassword_env = "{PASSWORD_ENV}"\n'
        f'database = "{database}"\nflush_interval_s = 0.5\n\n' + devices
    )


def run_once(
    devices: int,
    duration_s: float,
    warmup_s: float,
    offered: float,
    inflight: int,
    broker: MosquittoBroker,
    influx: InfluxService,
    workdir: Path,
    controller_cpu: int | None,
) -> RunResult:
    site = f"bench-{devices}"
    run_dir = workdir / site
    run_dir.mkdir()
    poll_s = round(devices / offered, 4)
    simulators = subprocess.Popen(
        [sys.executable, __file__, "--serve-simulators", str(devices)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert simulators.stdout is not None
        urls = json.loads(simulators.stdout.readline())
        database = influx.create_database(site.replace("-", "_"))
        write_config(run_dir / "lab.toml", site, urls, poll_s, broker, influx, database, inflight)
        subscriber = LatencySubscriber(broker.host, broker.port, site)
        try:
            with (run_dir / "controller.log").open("wb") as log:
                pin = [] if controller_cpu is None else ["taskset", "--cpu-list", str(controller_cpu)]
                controller = subprocess.Popen(
                    [
                        *pin,
                        sys.executable,
                        "-m",
                        "hotlab.controller.cli",
                        "run",
                        "--config",
                        str(run_dir / "lab.toml"),
                        "--duration",
                        str(duration_s),
                        "--log-level",
                        "WARNING",
                    ],
                    cwd=REPO,
                    stdout=log,
                    stderr=log,
                    env={**os.environ, PASSWORD_ENV: influx.password},
                )
            try:
                started = time.monotonic()
                time.sleep(warmup_s)
                cpu0, t0_ns = cpu_seconds(controller.pid), time.time_ns()
                time.sleep(max(0.0, duration_s - warmup_s - (time.monotonic() - started) - 0.3))
                cpu1, t1_ns = cpu_seconds(controller.pid), time.time_ns()
                rss = rss_mib(controller.pid)
            except BaseException:
                controller.kill()
                controller.wait()
                raise
            _, status, usage = os.wait4(controller.pid, 0)  # wait4, not wait(): it also returns the rusage
            controller.returncode = os.waitstatus_to_exitcode(status)
            if controller.returncode != 0:
                raise RuntimeError(f"controller exited {controller.returncode}; see {run_dir / 'controller.log'}")
            left_in_outbox = undelivered(run_dir / "outbox.sqlite3")
            stored = influx.rows('SELECT count("activity_bq") FROM "reading"', database)
            influx_rows = int(stored[0]["count"]) if stored else 0
            deadline = time.monotonic() + 30
            while subscriber.distinct() < influx_rows and time.monotonic() < deadline:
                time.sleep(0.1)  # the drain at stop published everything; QoS 1 deliveries may still be in flight
        finally:
            subscriber.close()
    finally:
        if simulators.stdin is not None:
            simulators.stdin.close()
        simulators.wait(30)

    # A reading belongs to the window by its device frame time: it was read and committed then,
    # even if MQTT delivered it later (the latency says how much later). Repeats (QoS 1 resends) count once.
    firsts: dict[str, tuple[int, int]] = {}
    for arrived, framed, msg_id in subscriber.records:
        firsts.setdefault(msg_id, (arrived, framed))
    window = [(arrived, framed) for arrived, framed in firsts.values() if t0_ns <= framed < t1_ns]
    latencies_ms = [(arrived - framed) / 1e6 for arrived, framed in window]
    window_s = (t1_ns - t0_ns) / 1e9
    count = subscriber.distinct()
    baseline = run_baseline(max(len(window), 1000), broker, influx, site)
    return RunResult(
        devices=devices,
        poll_s=poll_s,
        readings=count,
        per_wall_s=len(window) / window_s,
        per_cpu_s=len(window) / (cpu1 - cpu0),
        cpu_fraction=(cpu1 - cpu0) / window_s,
        p50_ms=statistics.median(latencies_ms),
        p99_ms=percentile(latencies_ms, 0.99),
        rss_mib=rss,
        max_rss_mib=usage.ru_maxrss / 1024,
        influx_rows=influx_rows,
        mqtt_distinct=count,
        left_in_outbox=left_in_outbox,
        baseline_per_cpu_s=baseline["per_cpu_s"],
        baseline_per_wall_s=baseline["per_wall_s"],
    )


def undelivered(outbox: Path) -> int:
    """Deliveries still waiting in the outbox after the controller stopped (0 if the drain finished)."""
    with contextlib.closing(sqlite3.connect(outbox)) as db:
        return int(db.execute("SELECT COUNT(*) FROM delivery").fetchone()[0])


def run_baseline(points: int, broker: MosquittoBroker, influx: InfluxService, site: str) -> dict[str, float]:
    database = influx.create_database(f"baseline_{site.replace('-', '_')}")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "baseline.py"),
            "--points",
            str(points),
            "--mqtt",
            f"{broker.host}:{broker.port}",
            "--influx",
            influx.v2_url,
            "--token",
            influx.token,
            "--bucket",
            f"{database}/autogen",
            "--site",
            f"{site}-baseline",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return json.loads(result.stdout)


# --------------------------------------------------------------------------- report


def complete(result: RunResult) -> str:
    """'yes' when InfluxDB holds what MQTT delivered and the drain left nothing behind."""
    if result.influx_rows == result.mqtt_distinct and result.left_in_outbox == 0:
        return "yes"
    return f"NO: influx {result.influx_rows}, mqtt {result.mqtt_distinct}, outbox {result.left_in_outbox}"


def print_table(results: list[RunResult]) -> None:
    header = (
        "devices",
        "poll s",
        "readings",
        "rd/s wall",
        "rd/CPU-s",
        "ctl CPU",
        "p50 ms",
        "p99 ms",
        "RSS MiB",
        "maxRSS",
        "influx=mqtt, drained",
        "base/CPU-s",
        "hotlab/base",
    )
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in results:
        print(
            " | ".join(
                [
                    str(r.devices),
                    f"{r.poll_s:g}",
                    str(r.readings),
                    f"{r.per_wall_s:.0f}",
                    f"{r.per_cpu_s:.0f}",
                    f"{r.cpu_fraction * 100:.0f} %",
                    f"{r.p50_ms:.1f}",
                    f"{r.p99_ms:.1f}",
                    f"{r.rss_mib:.0f}",
                    f"{r.max_rss_mib:.0f}",
                    complete(r),
                    f"{r.baseline_per_cpu_s:.0f}",
                    f"{r.ratio_cpu:.2f}",
                ]
            )
        )
    target = next((r for r in results if r.devices == 100), None)
    if target is not None:
        met = target.per_cpu_s >= 2000 and target.p99_ms < 50
        print(
            f"\ntarget at 100 devices (>= 2000 readings/s per core, p99 < 50 ms): "
            f"{'MET' if met else 'NOT MET'} ({target.per_cpu_s:.0f} readings/CPU-s, p99 {target.p99_ms:.1f} ms)"
        )
    print("decay maths vs radioactivedecay: run bench/bench_decay.py (target >= 1000x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="1,10,100,500", help="comma-separated device counts")
    parser.add_argument("--duration", type=float, default=30.0, help="controller run time per device count, s")
    parser.add_argument("--warmup", type=float, default=6.0, help="seconds excluded at the start of each run")
    parser.add_argument("--offered", type=float, default=2000.0, help="offered load, readings/s over all devices")
    parser.add_argument(
        "--inflight",
        type=int,
        default=MqttConfig().inflight_window,
        help="[mqtt] inflight_window of the controller (default: the config's default)",
    )
    parser.add_argument(
        "--controller-cpu",
        type=int,
        metavar="CPU",
        help="run the controller on this one CPU only (taskset), all its threads included",
    )
    parser.add_argument("--quick", action="store_true", help="1 and 100 devices, 10 s each")
    parser.add_argument("--serve-simulators", type=int, metavar="N", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_simulators is not None:
        asyncio.run(serve_simulators(args.serve_simulators))
        return 0
    if args.quick:
        args.devices, args.duration, args.warmup = "1,100", 10.0, 3.0
    counts = [int(n) for n in args.devices.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="hotlab-bench-"))
    results: list[RunResult] = []
    (workdir / "mosquitto").mkdir()
    (workdir / "influxd").mkdir()
    try:
        with MosquittoBroker(workdir=workdir / "mosquitto") as broker, InfluxService(workdir / "influxd") as influx:
            for devices in counts:
                result = run_once(
                    devices,
                    args.duration,
                    args.warmup,
                    args.offered,
                    args.inflight,
                    broker,
                    influx,
                    workdir,
                    args.controller_cpu,
                )
                results.append(result)
                print(
                    f"# {devices} device(s): {result.per_cpu_s:.0f} readings/CPU-s, p99 {result.p99_ms:.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"# hotlab e2e, {os.cpu_count()} CPU(s), offered {args.offered:g} readings/s, "
        f"inflight_window {args.inflight}, "
        + ("" if args.controller_cpu is None else f"controller pinned to CPU {args.controller_cpu}, ")
        + f"{args.duration:g} s per run, window after {args.warmup:g} s"
    )
    print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
