"""How long a reading takes from the bus to a signed-in browser page of the web panel (p50/p99).

The measurement (tests/web_latency_probe.py) runs a real mosquitto, `hotlab web` as its own process and
Debian's chromium on loopback, and times each reading from its publication on the bus (as the controller
publishes it after the commit) to the DOM change on the page. Baseline, in the same run on the same
messages: a plain MQTT subscriber (the broker's delivery alone); panel/baseline is what the panel adds.
The panel pushes at most ten updates a second to a page (controller/web/events.py): readings closer
together are merged into the next update, and only the ones the page showed are timed. The
controller's own commit-to-publish time is measured by bench/e2e.py.

    .venv/bin/python bench/web_latency.py                 # 200 readings, one every 0.2 s, ~1 min
    .venv/bin/python bench/web_latency.py --readings 400 --interval 0.05
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.web_latency_probe import percentile, time_readings  # noqa: E402

#: The issue's target, bus to page, on this machine.
TARGET_P99_MS = 250.0


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readings", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between readings (default 0.2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = await time_readings(Path(tmp), args.readings, args.interval)
    panel_ms, baseline_ms = result.panel_ms, result.baseline_ms
    merged = args.readings - len(panel_ms)
    print(f"readings {args.readings}, one every {args.interval:g} s; {merged} merged into a later page update")
    for name, values in (("panel (bus -> page)", panel_ms), ("baseline (bus -> subscriber)", baseline_ms)):
        print(f"{name:<30} p50 {percentile(values, 0.5):7.1f} ms   p99 {percentile(values, 0.99):7.1f} ms")
    p99 = percentile(panel_ms, 0.99)
    ratio = p99 / max(percentile(baseline_ms, 0.99), 0.001)
    print(
        f"panel/baseline at p99: {ratio:.1f}x; target p99 < {TARGET_P99_MS:g} ms: {'met' if p99 < TARGET_P99_MS else 'NOT met'}"
    )
    return 0 if p99 < TARGET_P99_MS else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
