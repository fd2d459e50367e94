"""Diagnosis benchmark: the controller pipeline alone, with devices that answer instantly.

    .venv/bin/python bench/pipeline.py                     # 100 devices, 2000 readings/s offered
    .venv/bin/python bench/pipeline.py --inflight 32,500 --history on,off --event-loop asyncio

bench/e2e.py measures the deployed system; this separates the controller's own limits from
device I/O. Each device is an in-memory source whose read returns a reading at once, so
what is measured is commit (outbox, synchronous=FULL), QC stage, MQTT sink (real Mosquitto)
and optionally the history archive, inside one `ControllerService` in this process.

Per configuration, over `--seconds` after a `--warmup`: readings produced (committed) per
second, readings delivered to a QoS 1 subscriber per second, the MQTT backlog left in the
outbox, and produced readings per CPU-second of this process.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import paho.mqtt.client as mqtt

from hotlab.controller.config import DeviceConfig, MqttConfig, parse_config
from hotlab.controller.event_loop import DEFAULT_EVENT_LOOP, EVENT_LOOPS, loop_factory
from hotlab.controller.lab.embedded_broker import MosquittoBroker
from hotlab.controller.service import ControllerService
from hotlab.controller.supervisor import Item
from hotlab.drivers.records import Reading


class ArrivalCounter:
    """Counts messages on paho's network thread; read from the event loop."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def on_message(self, *_: object) -> None:
        with self._lock:
            self.count += 1


class InstantSource:
    """A calibrator that answers immediately: the controller, not the device, sets the pace."""

    streaming = False

    def __init__(self, device: str) -> None:
        self.device = device
        self.reads = 0

    async def connect(self) -> None:
        """Nothing to open."""

    async def read(self) -> Sequence[Item]:
        self.reads += 1
        return [Reading(self.device, "Tc-99m", 7.4e8, 7.4e8, "Bq", time.time_ns(), b">7.4000E+08\r\n")]

    async def delivered(self, items: Sequence[Item]) -> None:
        """A calibrator has nothing to confirm."""

    async def close(self) -> None:
        """Nothing to close."""


async def measure(
    broker: MosquittoBroker,
    workdir: Path,
    devices: int,
    offered: float,
    inflight: int,
    history: bool,
    warmup_s: float,
    seconds: float,
) -> str:
    arrivals = ArrivalCounter()
    subscriber = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    subscriber.on_message = arrivals.on_message
    subscriber.connect(broker.host, broker.port)
    subscriber.subscribe("hotlab/+/+/+/reading", qos=1)
    subscriber.loop_start()
    config = parse_config(
        {
            "site": {"name": "pipeline"},
            "device": [
                {
                    "name": f"cal-{i}",
                    "station": "s1",
                    "family": "vik202",
                    "transport": "/dev/null",
                    "poll_interval_s": devices / offered,
                }
                for i in range(devices)
            ],
            "mqtt": {"host": broker.host, "port": broker.port, "inflight_window": inflight},
            "outbox": {"path": "outbox.sqlite3"},
            "history": {"enabled": history, "path": "history.sqlite3"},
        },
        base_dir=workdir,
    )
    sources: dict[str, InstantSource] = {}

    def source(device: DeviceConfig) -> InstantSource:
        return sources.setdefault(device.name, InstantSource(device.name))

    service = ControllerService(config, source_factory=source)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await asyncio.sleep(warmup_s)
        reads0, got0, cpu0 = sum(s.reads for s in sources.values()), arrivals.count, time.process_time()
        await asyncio.sleep(seconds)
        reads1, got1, cpu1 = sum(s.reads for s in sources.values()), arrivals.count, time.process_time()
        assert service.outbox is not None
        backlog = await service.outbox.pending_count("mqtt")
    finally:
        stop.set()
        await task
        subscriber.disconnect()
        subscriber.loop_stop()
    produced = reads1 - reads0
    return (
        f"{devices} | {offered:g} | {inflight} | {'on' if history else 'off'} | {produced / seconds:.0f} | "
        f"{(got1 - got0) / seconds:.0f} | {backlog} | {produced / (cpu1 - cpu0):.0f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--offered", type=float, default=2000.0, help="readings/s over all devices")
    parser.add_argument(
        "--inflight",
        default=str(MqttConfig().inflight_window),
        help="comma-separated [mqtt] inflight_window values (default: the config's default)",
    )
    parser.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default=DEFAULT_EVENT_LOOP,
        help="event loop of this process (default: the controller's default)",
    )
    parser.add_argument("--history", default="off,on", help="history archive sink: on, off or both")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print("devices | offered/s | inflight | history | produced/s | MQTT delivered/s | MQTT backlog | produced/CPU-s")
    print(" | ".join(["---"] * 8))
    with tempfile.TemporaryDirectory(prefix="hotlab-pipeline-") as tmp:
        root = Path(tmp)
        (root / "mosquitto").mkdir()
        with MosquittoBroker(workdir=root / "mosquitto") as broker:
            for run, (inflight, history) in enumerate(
                itertools.product(
                    [int(w) for w in args.inflight.split(",")], [h == "on" for h in args.history.split(",")]
                )
            ):
                workdir = root / f"run-{run}"
                workdir.mkdir()
                with asyncio.Runner(loop_factory=loop_factory(args.event_loop)) as runner:
                    print(
                        runner.run(
                            measure(
                                broker,
                                workdir,
                                args.devices,
                                args.offered,
                                inflight,
                                history,
                                args.warmup,
                                args.seconds,
                            )
                        ),
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
