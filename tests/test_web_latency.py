"""The time from a reading on the bus to its appearance on a signed-in page, over 200 readings in chromium.

The figures (p50/p99, and against a plain subscriber) are printed for docs/benchmarks.md; their target is
checked by bench/web_latency.py on an idle machine, not here, where the suite shares the CPU. This test
checks what the measurement rests on: every reading, published one every 0.15 s (slower than the panel's
ten updates a second), appears on the page.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.mosquitto_service import require_mosquitto

pytest.importorskip("playwright")

CHROMIUM = "/usr/bin/chromium"
READINGS = 200


@pytest.mark.integration
@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="Debian's chromium is not installed")
async def test_every_reading_reaches_the_page_and_its_latency_is_measured(tmp_path: Path) -> None:
    from tests.web_latency_probe import percentile, time_readings

    require_mosquitto()
    result = await time_readings(tmp_path, READINGS, 0.15)
    assert len(result.panel_ms) == READINGS, f"{READINGS - len(result.panel_ms)} readings never shown on their own"
    assert len(result.baseline_ms) == READINGS
    assert all(ms >= 0 for ms in result.panel_ms)
    print(
        f"\nbus -> page over {READINGS} readings: p50 {percentile(result.panel_ms, 0.5):.1f} ms, "
        f"p99 {percentile(result.panel_ms, 0.99):.1f} ms; bus -> subscriber p99 "
        f"{percentile(result.baseline_ms, 0.99):.1f} ms"
    )
