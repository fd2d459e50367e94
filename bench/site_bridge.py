"""A site broker bridged to a central broker: messages/s through the bridge, and a 30 s link cut under load.

    .venv/bin/python bench/site_bridge.py                  # ~1 min
    .venv/bin/python bench/site_bridge.py --rate 50 --messages 50000

Everything is real and on loopback, set up as tests/test_site_bridge.py sets it up
(tests/mosquitto_service.py, `bridged_site`): the site broker runs the config `hotlab broker-config`
generates (TLS, passwords, ACL, the bridge with TLS, its own user, MQTT 3.1.1, a persistent
session, QoS 1) and reaches the central broker (TLS, passwords, the generated central ACL) through a
`CuttableLink`. The publisher publishes as the controller's MQTT sink does (many in flight); the
central subscriber is `mosquitto_sub` in a process of its own (persistent session, QoS 1), so that
counting costs this process nothing (`SubscriberProcess`).

1. Burst: `--messages` published as fast as the site broker takes them, timed from the first
   publish to the last arrival at the central subscriber. The baseline, in the same run: the same
   number published straight to the central broker. Ratio = through the bridge / direct.
2. Cut: `--rate` messages/s, the link cut for `--cut` s (dark: nothing moves, new connections are
   refused), then restored, publishing all along: how long the backlog takes to drain after the
   link returns, how many duplicates arrive (QoS 1 resends what was in flight), and the site
   broker's memory per queued message (its RSS growth during the cut / the messages taken then).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.mosquitto_service import (  # noqa: E402
    BridgedSite,
    NumberedPublisher,
    SubscriberProcess,
    TlsListener,
    bridged_site,
)
from tests.test_mqtt_tls import make_certificates  # noqa: E402
from tests.test_site_bridge import TOPICS  # noqa: E402

SITE = "bridge-a"  # the site TOPICS are on
#: The rest of a reading as docs/mqtt.md shows one, so that a message has a reading's size (about 450 bytes).
READING = {
    "schema": "hotlab.reading/1",
    "time": "2026-11-25T22:49:07.061375Z",
    "site": SITE,
    "station": "hotcell-1",
    "device": "calibrator-1",
    "nuclide": "Tc-99m",
    "activity_bq": 7.3981e9,
    "raw_value": 7.3981e9,
    "unit": "Bq",
    "raw_frame": ">7.3981E+09\r\n",
    "quality": "good",
    "extra": {"calibration_factor": 236.0},
}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


async def burst(publisher: NumberedPublisher, subscriber: SubscriberProcess, count: int) -> float:
    """Publish `count` messages as fast as they are taken; messages/s until the last arrived."""
    first = len(publisher.acked)
    start = time.monotonic()
    for _ in range(count):
        publisher.publish_next()
        if publisher.sent % 200 == 0:
            await asyncio.sleep(0)  # let the link relay meanwhile
    await publisher.settled(timeout_s=120)
    last = await subscriber.wait_for(set(publisher.acked[first:]), timeout_s=300)
    return count / (last - start)


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="hotlab-bench-bridge-") as temporary:
        directory = Path(temporary)
        pki = directory / "pki"
        pki.mkdir()
        tls = TlsListener(*make_certificates(pki))
        async with bridged_site(directory, SITE, tls, keepalive_interval_s=5, restart_timeout_s=(1, 2)) as lab:
            async with lab.central_subscriber("bench-central") as subscriber:
                await report(lab, subscriber, args)


async def report(lab: BridgedSite, subscriber: SubscriberProcess, args: argparse.Namespace) -> None:
    site_options = lab.site_client("hotlab-controller")
    bridge = lab.config.bridge
    assert bridge is not None
    direct_options = {**lab.central_client(), "username": bridge.username, "password": bridge.password}
    async with (
        NumberedPublisher(
            lab.central.host, lab.central.port, TOPICS, client_id="bench-direct", body=READING, **direct_options
        ) as d,
        NumberedPublisher(
            lab.broker.host, lab.broker.port, TOPICS, client_id="bench-site", body=READING, **site_options
        ) as site,
    ):
        await asyncio.sleep(2)  # the subscriber and the bridge connect
        await subscriber.wait_for({d.publish_next()}, timeout_s=20)
        await burst(d, subscriber, args.messages // 10)  # warm-up, not reported
        direct = await burst(d, subscriber, args.messages)
        bridged = await burst(site, subscriber, args.messages)
        print(f"burst of {args.messages}: direct {direct:.0f}/s, through the bridge {bridged:.0f}/s")
        print(f"  ratio bridged/direct {bridged / direct:.2f}")

        await site.settled()
        first, arrivals_before = len(site.acked), len(subscriber.arrivals)
        await site.run(args.rate, 3.0)
        await site.settled()
        taken_before_cut = len(site.acked)
        rss_before = rss_kib(lab.broker.pid or 0)
        lab.link.cut()
        await site.run(args.rate, args.cut)
        await site.settled()
        rss_cut = rss_kib(lab.broker.pid or 0)
        queued = len(site.acked) - taken_before_cut
        lab.link.restore()
        restored = time.monotonic()
        await site.run(args.rate, 2.0)
        await site.settled()
        taken = set(site.acked[first:])
        last = await subscriber.wait_for(taken, timeout_s=600)
        await asyncio.sleep(2)
        arrived = [msg_id for _, msg_id in subscriber.arrivals[arrivals_before:] if msg_id in taken]
        drain = last - restored
        size = len(json.dumps({**READING, "msg_id": "0" * 32, "seq": site.sent, "time_ns": time.time_ns()}))
        print(f"cut of {args.cut:g} s at {args.rate:g} messages/s of about {size} bytes: {queued} queued at the site")
        print(
            f"  backlog drained {drain:.1f} s after the link returned ({queued / drain:.0f}/s on top of the live load)"
        )
        print(f"  {len(arrived) - len(set(arrived))} duplicates, {len(taken - set(arrived))} missing")
        print(
            f"  site broker RSS {rss_before / 1024:.1f} -> {rss_cut / 1024:.1f} MiB: "
            f"{(rss_cut - rss_before) * 1024 / queued:.0f} bytes per queued message"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20000, help="messages per burst (default 20000)")
    parser.add_argument("--rate", type=float, default=300.0, help="offered load during the cut, messages/s")
    parser.add_argument("--cut", type=float, default=30.0, help="length of the cut, s")
    asyncio.run(run(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
