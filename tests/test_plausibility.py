"""The plausibility rules (range, decay, source changes), the checked source that applies them, and the alarm.

Expected values are derived here from the decay law A(t) = A0 * 2^(-t / T½), with the half-lives of
the project's nuclide library (physics/nuclides.py, DDEP/ENSDF), never read back from the code under test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest

from hotlab.controller.checked_source import CheckedSource, has_checksum
from hotlab.controller.config import ConfigError, parse_config
from hotlab.controller.plausibility import FAMILY_RANGES, Plausibility, PlausibilityRules, Point
from hotlab.controller.supervisor import Item
from hotlab.controller.suspect_alarm import SuspectRate
from hotlab.drivers.records import DeviceTimeout, DriverError, Reading
from hotlab.physics.nuclides import get_nuclide

S = 1_000_000_000
T0 = 1_795_000_000 * S
F18_HALF_LIFE_S = get_nuclide("F-18").half_life_s  # 109.77 min (ENSDF)
TC99M_HALF_LIFE_S = get_nuclide("Tc-99m").half_life_s  # 6.0072 h (DDEP)


def decayed(a0_bq: float, half_life_s: float, dt_s: float) -> float:
    return a0_bq * 2.0 ** (-dt_s / half_life_s)


def rules(family: str = "vik202", **settings: float | str) -> PlausibilityRules:
    return PlausibilityRules(family, dataclasses.replace(Plausibility.for_family(family), **settings))  # type: ignore[arg-type]


def test_every_calibrator_family_has_a_documented_range() -> None:
    assert set(FAMILY_RANGES) == {"vik202", "crc15r", "vdc404", "atomlab500"}
    for family, default in FAMILY_RANGES.items():
        assert default.min_bq < 0 < default.max_bq
        assert "hotlab assumption" in default.source  # no public specification was found for any of them
        assert Plausibility.for_family(family).range_source == default.source


def test_the_range_catches_a_flipped_exponent_but_not_a_real_dose() -> None:
    check = rules()
    assert check.out_of_range(7.4e9) is None and check.out_of_range(-2e3) is None
    reason = check.out_of_range(7.4e19)
    assert reason is not None and reason.startswith("7.4e+07 TBq is outside the vik202 range -1 MBq to 1 TBq")
    assert check.out_of_range(-5e6) is not None
    assert rules(max_bq=5e9, range_source="site configuration").out_of_range(7.4e9) == (
        "7.4 GBq is outside the vik202 range -1 MBq to 5 GBq (site configuration)"
    )


def test_decay_bounds_follow_the_half_life_and_the_noise_band() -> None:
    """F-18, 1 GBq, read again 10 min later: between A0 * 2^(-600/T½) - 2 % and A0 + 2 %."""
    check = rules()
    earlier = Point(T0, 1e9, "F-18")
    slowest = decayed(1e9, F18_HALF_LIFE_S, 600.0)
    assert slowest == pytest.approx(0.938807e9, rel=1e-6)  # 2^(-600 / 6586.2 s) = exp(-0.0631459)
    at = T0 + 600 * S

    def consistent(activity_bq: float) -> bool:
        return check.consistent(earlier, Point(at, activity_bq, "F-18"))

    assert consistent(slowest)  # exactly the decay law
    assert consistent(slowest * 0.981) and not consistent(slowest * 0.979)  # falls faster than F-18 allows
    assert consistent(1e9)  # no decay at all: a longer-lived source on the F-18 setting
    assert consistent(1.0199e9) and not consistent(1.0201e9)  # activity does not grow beyond the noise band
    assert not check.consistent(earlier, Point(at, slowest, "Tc-99m"))  # another setting: nothing to compare


def test_the_reasons_say_what_broke_with_numbers_from_the_decay_law() -> None:
    check = rules()
    dose = Point(T0, 7.4e9, "Tc-99m")
    flipped = Point(T0 + S // 2, 7.4e8, "Tc-99m")
    lowest = decayed(7.4e9, TC99M_HALF_LIFE_S, 0.5) * 0.98
    assert f"{lowest / 1e9:.4g}" == "7.252"
    assert check.why_not_decay(dose, flipped) == (
        "fell from 7.4 GBq to 740 MBq in 0.5 s on the Tc-99m setting: "
        f"Tc-99m (T½ {TC99M_HALF_LIFE_S:.6g} s) decays to no less than 7.252 GBq"
    )
    risen = Point(T0 + S, 7.4e10, "Tc-99m")
    assert check.why_not_decay(dose, risen) == (
        "rose from 7.4 GBq to 74 GBq in 1 s on the Tc-99m setting: activity does not grow (noise band 148 MBq)"
    )
    unknown = Point(T0, 1e9, None)
    assert "without a known half-life it stays above 980 MBq" in check.why_not_decay(unknown, Point(T0 + S, 5e8, None))


def test_a_source_change_is_a_step_to_or_from_background() -> None:
    check = rules()
    dose, empty = Point(T0, 7.4e9, "Tc-99m"), Point(T0 + S, 1.2e3, "Tc-99m")
    assert check.source_change(dose, empty) and check.source_change(empty, dose)
    assert not check.source_change(dose, Point(T0 + S, 7.4e8, "Tc-99m"))  # a power of ten is not a removal
    assert check.is_background(-4e3) and check.is_background(37e3) and not check.is_background(38e3)
    assert check.band(1e3) == 10e3 and check.band(1e9) == pytest.approx(2e7)  # absolute floor, relative band


def test_a_calibrator_has_a_checksum_only_where_its_protocol_does() -> None:
    assert has_checksum("crc15r", {}) and not has_checksum("crc15r", {"checksum": False})
    assert not any(has_checksum(family, {}) for family in ("vik202", "vdc404", "atomlab500"))


class Scripted:
    """A calibrator source returning scripted (activity, nuclide) readings, 0.5 s apart, or raising."""

    streaming = False

    def __init__(self, script: Sequence[float | tuple[float, str] | DriverError]) -> None:
        self.script = list(script)
        self.reads = 0

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def delivered(self, items: Sequence[Item]) -> None: ...

    async def read(self) -> Sequence[Item]:
        step = self.script.pop(0)
        self.reads += 1
        if isinstance(step, DriverError):
            raise step
        activity, nuclide = step if isinstance(step, tuple) else (step, "Tc-99m")
        frame = f">{activity:.4E}".encode()
        return [Reading("cal-1", nuclide, activity, activity, "Bq", T0 + self.reads * S // 2, frame)]


async def qualities(source: CheckedSource, polls: int) -> list[tuple[float, str]]:
    out: list[tuple[float, str]] = []
    for _ in range(polls):
        for item in await source.read():
            assert isinstance(item, Reading)
            assert (item.quality_reason is None) == (item.quality == "good")
            out.append((item.activity_bq, item.quality))
    return out


def checked(script: Sequence[float | tuple[float, str] | DriverError], family: str = "vik202") -> CheckedSource:
    return CheckedSource(Scripted(script), rules(family), reread=not has_checksum(family, {}))


async def test_without_a_checksum_a_flip_is_read_again_and_not_repeated() -> None:
    source = checked([7.4e9, 7.4e9, 7.4e8, 7.4e9, 7.4e19, 7.4e9, 7.4e9])
    assert await qualities(source, 4) == [
        (7.4e9, "good"),
        (7.4e9, "good"),  # the first reading since start is confirmed by its re-read
        (7.4e8, "suspect"),  # fell by 90 % in 0.5 s
        (7.4e9, "good"),  # the immediate re-read: the flip is not repeated
        (7.4e19, "suspect"),  # out of range
        (7.4e9, "good"),
        (7.4e9, "good"),
    ]
    assert source.source.reads == 7  # three re-reads, each right after its unconfirmed frame


async def test_without_a_checksum_a_real_change_is_confirmed_by_the_re_read() -> None:
    # A vial swapped between two polls (7.4 -> 3 GBq), then taken out, then another put in: each
    # step is repeated by the re-read, so both frames of each step are good.
    source = checked([7.4e9, 7.4e9, 3e9, 3e9, 0.0, 0.0, 5e8, 5e8])
    assert [quality for _, quality in await qualities(source, 4)] == ["good"] * 8


async def test_a_re_read_that_fails_leaves_the_reading_suspect_and_is_not_lost() -> None:
    source = checked([7.4e9, 7.4e9, 7.4e8, DeviceTimeout("no reply"), 7.4e9])
    out = []
    for _ in range(3):
        out.extend(await source.read())
    assert [(r.activity_bq, r.quality) for r in out] == [
        (7.4e9, "good"),
        (7.4e9, "good"),
        (7.4e8, "suspect"),
        (7.4e9, "good"),
    ]
    assert out[2].quality_reason is not None and out[2].quality_reason.endswith("; the re-read failed")


async def test_with_a_checksum_a_jump_is_suspect_until_the_next_poll_agrees() -> None:
    source = checked([7.4e9, 3e9, 3e9, 2.99e9, 0.0, 5e8], family="crc15r")
    assert await qualities(source, 6) == [
        (7.4e9, "good"),
        (3e9, "suspect"),  # unexplained jump: no re-read, the next poll decides
        (3e9, "good"),  # agrees with it: the change was real
        (2.99e9, "good"),
        (0.0, "good"),  # a source out: the checksum rules out a corrupted frame
        (5e8, "good"),  # a source in
    ]
    assert source.source.reads == 6


async def test_a_nuclide_change_repeated_by_the_re_read_resets_the_reference() -> None:
    # The same vial read on another setting shows another number: not a jump, once the re-read repeats it.
    source = checked([7.4e9, 7.4e9, (2.29e9, "F-18"), (2.29e9, "F-18"), (2.29e9, "F-18")])
    assert [quality for _, quality in await qualities(source, 3)] == ["good"] * 5
    assert source.source.reads == 5  # the re-read of the first reading and of the change; none after


async def test_with_a_checksum_a_nuclide_change_needs_no_re_read() -> None:
    source = checked([7.4e9, (2.29e9, "F-18"), (2.29e9, "F-18")], family="crc15r")
    assert [quality for _, quality in await qualities(source, 3)] == ["good"] * 3


def test_the_suspect_alarm_needs_a_full_window_and_clears_below_half_its_threshold() -> None:
    rate = SuspectRate(window=10, threshold=0.2)
    bad = "fell from 7.4 GBq to 740 MBq"
    rate = rate.observe([bad, bad, bad])
    assert not rate.active and rate.total == 3  # 3 of 3, but the window is not full yet
    rate = rate.observe([None] * 7)
    assert rate.active and rate.fraction == pytest.approx(0.3) and rate.last_reason == bad
    rate = rate.observe([None, None])  # 1 of 10 left: 0.1 is not below 0.2 * 0.5
    assert rate.active and rate.fraction == pytest.approx(0.1)
    rate = rate.observe([None])
    assert not rate.active and rate.total == 3
    before = SuspectRate(window=10, threshold=0.2)
    before.observe([bad] * 10)
    assert before.total == 0 and before.recent == ()  # observe never changes the state it is called on


def test_plausibility_and_measurement_settings_per_device() -> None:
    def device(**extra: object) -> dict[str, object]:
        return {"name": "cal-1", "station": "s", "family": "vik202", "transport": "/dev/null"} | extra

    def config(*devices: dict[str, object]) -> object:
        return parse_config({"site": {"name": "lab"}, "device": list(devices)})

    plain = config(device()).devices[0]  # type: ignore[attr-defined]
    assert plain.plausibility == Plausibility.for_family("vik202")
    assert (plain.measurement.settle_readings, plain.measurement.dwell_s) == (5, 60.0)
    tuned = config(
        device(
            plausibility={"max_bq": 2e11, "noise_rel": 0.05, "alarm_window": 20},
            measurement={"settle_readings": 3, "dwell_s": 120},
        )
    ).devices[0]  # type: ignore[attr-defined]
    assert (tuned.plausibility.max_bq, tuned.plausibility.min_bq) == (2e11, -1e6)
    assert tuned.plausibility.range_source == "site configuration"
    assert (tuned.plausibility.noise_rel, tuned.plausibility.alarm_window) == (0.05, 20)
    assert (tuned.measurement.settle_readings, tuned.measurement.dwell_s) == (3, 120.0)
    for extra, message in [
        ({"plausibility": {"max_bq": -2e6}}, "device[0].plausibility.max_bq: must be above min_bq"),
        ({"plausibility": {"noise_rel": 2}}, "device[0].plausibility.noise_rel: must be <= 1"),
        ({"plausibility": {"alarm_fraction": 0}}, "device[0].plausibility.alarm_fraction: must be > 0"),
        ({"plausibility": {"noise": 0.1}}, "device[0].plausibility.noise: unknown key"),
        ({"measurement": {"settle_readings": 1}}, "device[0].measurement.settle_readings: must be >= 2"),
        ({"measurement": {"dwell_s": 0}}, "device[0].measurement.dwell_s: must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            config(device(**extra))
    station = {
        "name": "gen-1",
        "station": "s",
        "family": "elution_station",
        "transport": {"modbus": "tcp", "host": "127.0.0.1"},
        "measurement": {"dwell_s": 5},
    }
    with pytest.raises(ConfigError, match="only dose calibrators have readings to check and measure"):
        config(station)
