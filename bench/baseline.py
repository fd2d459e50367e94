"""The naive baseline the end-to-end benchmark compares against: no outbox, no QC, no devices.

    .venv/bin/python bench/baseline.py --points 20000 --mqtt 127.0.0.1:1883 \
        --influx http://127.0.0.1:8087 --token user:password --bucket db/autogen

It builds the same reading payloads the controller publishes and sends them the plainest way
the libraries allow: a paho-mqtt QoS 1 publish loop (network thread, wait for every PUBACK),
then synchronous influxdb-client writes in batches of `--batch` points (the controller's
default batch size). Nothing is made durable first, so this is the cost of just moving the
data; hotlab's extra cost per reading is what the ratio in bench/e2e.py shows.

Prints one JSON object: points, cpu_s (process CPU, all threads), wall_s, per_cpu_s, per_wall_s.
"""

from __future__ import annotations

import argparse
import json
import time

import paho.mqtt.client as mqtt
from influxdb_client import InfluxDBClient, Point, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS

from hotlab.controller.messages import reading_message
from hotlab.drivers.records import Reading


def build_points(count: int, site: str) -> list[tuple[str, bytes, Point]]:
    """The same payloads (and InfluxDB points) the controller would produce for `count` readings."""
    out = []
    for index in range(count):
        reading = Reading(
            f"cal-{index % 100}",
            "Tc-99m",
            7.4e8 + index,
            7.4e8 + index,
            "Bq",
            time.time_ns(),
            b">7.4000E+08\r\n",
            {"calibration_factor": 236.0},
        )
        message = reading_message(site, "hotcell-1", reading)
        point = (
            Point("reading")
            .tag("site", site)
            .tag("station", "hotcell-1")
            .tag("device", reading.device)
            .tag("nuclide", "Tc-99m")
            .field("activity_bq", float(reading.activity_bq))
            .field("raw_value", float(reading.raw_value))
            .field("unit", reading.unit)
            .time(reading.timestamp_ns, WritePrecision.NS)
        )
        out.append((message.topic, json.dumps(message.payload, separators=(",", ":")).encode(), point))
    return out


def publish_all(host: str, port: int, items: list[tuple[str, bytes, Point]]) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="hotlab-bench-baseline")
    client.max_inflight_messages_set(32)  # the controller's default inflight_window
    client.max_queued_messages_set(0)
    client.connect(host, port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1) for topic, payload, _ in items]
        for info in infos:
            info.wait_for_publish(timeout=60)
    finally:
        client.disconnect()
        client.loop_stop()


def write_all(url: str, token: str, bucket: str, items: list[tuple[str, bytes, Point]], batch: int) -> None:
    with InfluxDBClient(url=url, token=token, org="-", timeout=30_000) as client:
        write = client.write_api(write_options=SYNCHRONOUS)
        for start in range(0, len(items), batch):
            write.write(bucket=bucket, record=[point for _, _, point in items[start : start + batch]])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, required=True)
    parser.add_argument("--mqtt", required=True, metavar="HOST:PORT")
    parser.add_argument("--influx", required=True, metavar="URL")
    parser.add_argument("--token", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--site", default="bench-baseline")
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    host, _, port = args.mqtt.rpartition(":")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    items = build_points(args.points, args.site)  # building payloads is hotlab's cost too, so it is timed
    publish_all(host, int(port), items)
    write_all(args.influx, args.token, args.bucket, items, args.batch)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    print(
        json.dumps(
            {
                "points": args.points,
                "cpu_s": cpu,
                "wall_s": wall,
                "per_cpu_s": args.points / cpu,
                "per_wall_s": args.points / wall,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
