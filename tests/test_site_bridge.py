"""A site broker bridged to a central broker rides out a 30 s cut of the link under load and loses nothing.

Two real mosquittos on loopback (tests/mosquitto_service.py, `bridged_site`): the site broker runs
the config `hotlab broker-config` generates (TLS listener, passwords set by its make-passwords.sh,
its ACL, its bridge: TLS to the central broker with the bridge's own user, MQTT 3.1.1 with a
persistent session, QoS 1, data out only); the central broker has TLS, passwords and the
generated central ACL. A publisher at the site, connected as the controller's broker user and
publishing the way the controller's MQTT sink does, sends numbered messages with a msg_id each,
a few hundred per second, on one topic of every kind docs/mqtt.md lists. A central subscriber with
a persistent session at QoS 1 (`mosquitto_sub`, in a process of its own) counts them by msg_id.

Why a cut link rather than a stopped central broker: the central broker is the one part a
network of sites runs as a cluster (or at least watched, in a data centre); what fails for a site
is its WAN or VPN link. A link that fails does not close its connections: it goes dark, and each
end notices only by its keepalive, with whatever was in flight lost; when it comes back, the
routers along it have lost the old connection, which is reset. `CuttableLink` does exactly that, and
refuses new connections while it is down. So the test covers the bridge noticing a dead link,
retrying against a refused one, resending what was in flight, and draining the backlog queued
at the site, while the site keeps taking messages.

The bridge's keepalive is 5 s (mosquitto's minimum) and its reconnect delay 1-2 s, instead of the
generated 30 s and 5-30 s, so that all of it fits in the 30 s cut and the test stays under 45 s.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import aiomqtt
import pytest

from hotlab.controller.deploy.mosquitto_site import CONF_NAME
from tests.mosquitto_service import BridgedSite, NumberedPublisher, TlsListener, bridged_site
from tests.test_mqtt_tls import make_certificates

pytestmark = pytest.mark.integration

SITE = "bridge-a"
RATE_PER_S = 300
BEFORE_S, CUT_S, AFTER_S = 3.0, 30.0, 2.0
KEEPALIVE_S = 5
RESTART_TIMEOUT_S = (1, 2)
#: One topic of each kind the controller publishes (docs/mqtt.md, Topics), retained where that table says so.
CAL = f"hotlab/{SITE}/hotcell-1/calibrator-1"
TOPICS: list[tuple[str, bool]] = [
    (f"{CAL}/reading", False),
    (f"{CAL}/measurement", False),
    (f"{CAL}/label", False),
    (f"{CAL}/qc", False),
    (f"{CAL}/qc/procedure", False),
    (f"{CAL}/qc/baseline/cs-137", True),
    (f"{CAL}/qc/status/daily_constancy", True),
    (f"hotlab/{SITE}/elution-1/ga68-generator-1/qc/status/ge68_breakthrough/0123456789abcdef0123456789abcdef", True),
    (f"hotlab/{SITE}/elution-1/elution", False),
    (f"{CAL}/status", True),
    (f"{CAL}/alarm", True),
    (f"hotlab/{SITE}/controller/status", True),
    (f"hotlab/{SITE}/controller/audit", True),
    (f"hotlab/{SITE}/controller/alarm", True),
    (f"hotlab/{SITE}/controller/mqtt_alarm", True),
]


async def _watch_link_state(lab: BridgedSite, states: list[tuple[float, str]]) -> None:
    """Record the bridge's state as the central broker sees it ($SYS/broker/connection/<client id>/state)."""
    loop = asyncio.get_running_loop()
    topic = f"$SYS/broker/connection/{lab.config.remote_clientid}/state"
    async with aiomqtt.Client(
        lab.central.host, lab.central.port, identifier="link-watch", **lab.central_client()
    ) as client:
        await client.subscribe(topic, qos=1)
        async for message in client.messages:
            states.append((loop.time(), bytes(message.payload).decode()))  # type: ignore[arg-type]


async def _until(predicate: object, timeout_s: float, what: str) -> None:
    assert callable(predicate)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_every_message_taken_at_the_site_reaches_the_central_broker_across_a_30_s_cut(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    tls = TlsListener(*make_certificates(pki))
    loop = asyncio.get_running_loop()
    async with bridged_site(
        tmp_path, SITE, tls, keepalive_interval_s=KEEPALIVE_S, restart_timeout_s=RESTART_TIMEOUT_S
    ) as lab:
        states: list[tuple[float, str]] = []
        watcher = asyncio.create_task(_watch_link_state(lab, states))
        try:
            await _until(lambda: states and states[-1][1] == "1", 20, "the bridge to connect")
            async with (
                lab.central_subscriber("central-collector") as central,
                NumberedPublisher(
                    lab.broker.host,
                    lab.broker.port,
                    TOPICS,
                    client_id="site-controller",
                    **lab.site_client("hotlab-controller"),
                ) as publisher,
            ):
                await publisher.run(RATE_PER_S, BEFORE_S)
                lab.link.cut()
                cut_at = loop.time()
                await publisher.run(RATE_PER_S, CUT_S)
                lab.link.restore()
                restored_at = loop.time()
                restored_monotonic = time.monotonic()
                await publisher.run(RATE_PER_S, AFTER_S)
                await publisher.settled()

                taken = set(publisher.acked)
                assert publisher.refused == []
                assert len(publisher.acked) == len(taken) == publisher.sent  # the site took every message, once
                last = await central.wait_for(taken, timeout_s=20)
                await asyncio.sleep(1.0)  # anything resent late would show as a duplicate
                arrived = central.msg_ids()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    assert set(arrived) == taken, f"missing {len(taken - set(arrived))}, unexpected {len(set(arrived) - taken)}"
    duplicates = len(arrived) - len(taken)
    # QoS 1 resends what was in flight when the link died: at most max_inflight_messages per connection lost.
    conf = (lab.broker.workdir or Path()) / CONF_NAME
    in_flight = int(re.findall(r"^max_inflight_messages (\d+)$", conf.read_text(), re.M)[0])
    assert duplicates <= in_flight * lab.link.accepted
    # The bridge noticed the dark link within the cut (two keepalives) and was refused while it lasted;
    # the central broker saw the site's link go down (the bridge's will) and come back.
    assert lab.link.refused >= 1
    assert any(value == "0" and cut_at < at < restored_at for at, value in states), states
    assert states[-1][1] == "1", states
    print(
        f"\n{len(taken)} messages taken at the site ({RATE_PER_S}/s), {len(taken & set(arrived))} at the central "
        f"broker, {duplicates} duplicates; the backlog of the {CUT_S:g} s cut drained "
        f"{last - restored_monotonic:.1f} s after the link returned; {lab.link.accepted} bridge connections, "
        f"{lab.link.refused} refused during the cut"
    )
