"""Review findings on the checked source: nuclide flips, the first reading, insertion ramps, failing re-reads.

Each case scripts what a calibrator sends (0.5 s apart, a re-read is the next frame) and derives the
expected qualities from the rules: a frame without a checksum is good when it follows from the last
good reading by decay, or when the immediate re-read repeats it; a flip is not repeated.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from hotlab.controller.checked_source import RAMP_MAX_RISE, CheckedSource, has_checksum
from hotlab.controller.supervisor import Item
from hotlab.drivers.records import Reading
from hotlab.physics.nuclides import UnknownNuclideError, get_nuclide
from hotlab.simulators.source import ChamberSchedule, IonChamber, SimClock, Source
from tests.test_plausibility import T0, S, Scripted, checked, qualities, rules


def test_the_flipped_nuclide_texts_differ_by_one_bit_and_are_not_in_the_library() -> None:
    for real, flipped in [("Tc-99m", "Tc-98m"), ("Cs-137", "Cs-136"), ("Cs-137", "Cs-127"), ("Cs-137", "Cs-37")]:
        if len(real) == len(flipped):
            differing = [ord(a) ^ ord(b) for a, b in zip(real, flipped) if a != b]
            assert len(differing) == 1 and bin(differing[0]).count("1") == 1
        with pytest.raises(UnknownNuclideError):
            get_nuclide(flipped)


async def test_a_flipped_nuclide_is_suspect_and_the_re_read_restores_the_reference() -> None:
    # The review's case: Tc-99m 1 GBq, a frame reading Tc-98m 5 GBq, then Tc-99m 1 GBq again.
    source = checked([(1e9, "Tc-99m"), (1e9, "Tc-99m"), (5e9, "Tc-98m"), (1e9, "Tc-99m")])
    out: list[Reading] = []
    for _ in range(2):
        out.extend(r for r in await source.read() if isinstance(r, Reading))
    assert [(r.nuclide, r.quality) for r in out] == [
        ("Tc-99m", "good"),
        ("Tc-99m", "good"),
        ("Tc-98m", "suspect"),
        ("Tc-99m", "good"),  # the re-read: decay-consistent with the last good Tc-99m reading
    ]
    assert out[2].quality_reason is not None and "'Tc-98m' is not in the nuclide library" in out[2].quality_reason


async def test_a_flip_to_a_known_nuclide_is_suspect_unless_the_re_read_repeats_it() -> None:
    # 'Tc-99m' losing its 'm' reads as Tc-99 (in the library): not repeated, so suspect.
    source = checked([1e9, 1e9, (1e9, "Tc-99"), 1e9, 1e9])
    assert await qualities(source, 3) == [
        (1e9, "good"),
        (1e9, "good"),
        (1e9, "suspect"),
        (1e9, "good"),
        (1e9, "good"),
    ]


async def test_with_a_checksum_an_unknown_nuclide_is_still_suspect() -> None:
    source = checked([(1e9, "Cs-137"), (1e9, "Cs-136"), (1e9, "Cs-137")], family="crc15r")
    assert [quality for _, quality in await qualities(source, 3)] == ["good", "suspect", "good"]


async def test_the_first_reading_after_start_needs_the_re_read_to_agree() -> None:
    # The review's case: 7.4e10 (a flipped exponent), then 7.4e9 twice. The re-read contradicts the
    # first frame; it is not confirmed either (nothing to compare with) until the next poll agrees.
    source = checked([7.4e10, 7.4e9, 7.4e9, 7.4e9])
    assert await qualities(source, 3) == [
        (7.4e10, "suspect"),
        (7.4e9, "suspect"),
        (7.4e9, "good"),  # agrees with the held candidate: it becomes the reference
        (7.4e9, "good"),
    ]
    assert source.source.reads == 4  # only the first poll needed a re-read


async def test_an_insertion_ramp_confirmed_by_re_reads_is_good() -> None:
    # The review's case: background, then 300 MBq, 800 MBq, 1 GBq as the dipper goes down. Each
    # rise is a step first, then a rise in the rising phase; the re-read continues it.
    source = checked([1e3, 1e3, 300e6, 800e6, 1e9, 1e9, 1e9])
    assert 800e6 <= RAMP_MAX_RISE * 300e6  # the ramp's largest step is within what a ramp may do
    assert await qualities(source, 4) == [(a, "good") for a in (1e3, 1e3, 300e6, 800e6, 1e9, 1e9, 1e9)]


async def test_in_the_rising_phase_a_flip_is_still_suspect() -> None:
    # 300 MBq going in, then a flipped exponent (3e9 for 3e8), which the re-read does not repeat.
    source = checked([1e3, 1e3, 300e6, 300e6, 3e9, 300e6])
    assert await qualities(source, 3) == [
        (1e3, "good"),
        (1e3, "good"),
        (300e6, "good"),
        (300e6, "good"),
        (3e9, "suspect"),  # re-read 300 MBq is below 3 GBq less its band: not a continuing ramp
        (300e6, "good"),
    ]
    # A flip down during the ramp (80 MBq for 800 MBq) rises tenfold to the re-read: more than a ramp.
    source = checked([1e3, 1e3, 300e6, 800e6, 80e6, 800e6])
    assert [q for _, q in await qualities(source, 3)] == ["good", "good", "good", "good", "suspect", "good"]


async def test_a_removal_confirmed_by_the_re_read_is_good() -> None:
    # 1 GBq, then 200 MBq as the vial comes out, then background: the re-read confirms the fall.
    source = checked([1e9, 1e9, 200e6, 1e3, 1e3])
    assert await qualities(source, 3) == [(a, "good") for a in (1e9, 1e9, 200e6, 1e3, 1e3)]


async def test_with_a_checksum_an_insertion_ramp_is_good() -> None:
    source = checked([1e3, 300e6, 800e6, 1e9, 1e9], family="crc15r")
    assert [q for _, q in await qualities(source, 5)] == ["good"] * 5


class Failing(Scripted):
    """Raises an unexpected error on one read (not a DriverError)."""

    def __init__(self, script: Sequence[float], fail_at: int) -> None:
        super().__init__(script)
        self.fail_at = fail_at

    async def read(self) -> Sequence[Item]:
        if self.reads + 1 == self.fail_at:
            self.reads += 1
            raise RuntimeError("parser bug")
        return await super().read()


async def test_any_error_in_the_re_read_keeps_the_first_reading_as_suspect() -> None:
    source = CheckedSource(Failing([7.4e9, 7.4e9, 7.4e8, 7.4e9], fail_at=4), rules(), reread=True)
    out: list[Reading] = []
    for _ in range(2):
        out.extend(r for r in await source.read() if isinstance(r, Reading))
    assert [(r.activity_bq, r.quality) for r in out] == [(7.4e9, "good"), (7.4e9, "good"), (7.4e8, "suspect")]
    assert out[2].quality_reason is not None and out[2].quality_reason.endswith("; the re-read failed")
    assert [(r.activity_bq, r.quality) for r in await source.read()] == [(7.4e9, "good")]


def test_a_false_checksum_option_is_off_as_in_the_driver() -> None:
    for off in (False, 0, ""):
        assert not has_checksum("crc15r", {"checksum": off})
    assert has_checksum("crc15r", {"checksum": 1}) and has_checksum("crc15r", {"checksum": True})


class SimulatedCalibrator:
    """A calibrator on the simulated chamber: each read (a poll or a re-read) is 1 s later."""

    streaming = False

    def __init__(self, chamber: IonChamber, clock: SimClock, flip_at: int | None = None) -> None:
        self.chamber, self.clock, self.flip_at = chamber, clock, flip_at
        self.reads = 0

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def delivered(self, items: Sequence[Item]) -> None: ...

    async def read(self) -> Sequence[Item]:
        self.clock.advance(1.0)
        self.reads += 1
        value = self.chamber.measure_bq() * (10.0 if self.reads == self.flip_at else 1.0)
        return [Reading("cal-1", self.chamber.selected, value, value, "Bq", self.clock.now_ns())]


def ramped_calibrator(flip_at: int | None = None) -> SimulatedCalibrator:
    clock = SimClock(acceleration=1e-9, start_ns=T0)
    vial = Source(get_nuclide("Tc-99m"), 1e9, T0)
    # Empty until 10 s, then the vial goes in over 4 s (about four polls), out at 30 s.
    schedule = ChamberSchedule(((T0 + 10 * S, vial), (T0 + 30 * S, None)), ramp_ns=4 * S)
    chamber = IonChamber(None, clock=clock, selected_nuclide="Tc-99m", schedule=schedule, noise_rel=0.002, seed=3)
    return SimulatedCalibrator(chamber, clock, flip_at)


def test_the_schedule_ramps_a_source_in_over_ramp_ns() -> None:
    vial = Source(get_nuclide("Tc-99m"), 1e9, T0)
    schedule = ChamberSchedule(((10 * S, vial), (30 * S, None)), ramp_ns=4 * S)
    seen = [schedule.content(t * S, None) for t in (9, 10, 11, 12, 14, 30)]
    assert seen[0] is None and seen[-1] is None
    fractions = [c.reference_activity_bq / 1e9 for c in seen[1:-1] if c is not None]
    assert fractions == [0.0, 0.25, 0.5, 1.0]
    with pytest.raises(ValueError, match="ramp"):
        ChamberSchedule(((0, vial),), ramp_ns=-1)


async def test_a_simulated_insertion_ramp_is_good_and_a_flip_in_it_is_not() -> None:
    calibrator = ramped_calibrator()
    source = CheckedSource(calibrator, rules(), reread=True)
    out = await qualities(source, 30)
    rising = [a for a, _ in out if 1e6 < a < 0.9e9]
    assert len(rising) >= 2  # the chamber really ramped over several frames
    assert all(q == "good" for _, q in out)

    flipped = ramped_calibrator(flip_at=13)  # a frame in the middle of the ramp, ten times too high
    source = CheckedSource(flipped, rules(), reread=True)
    out = await qualities(source, 30)
    suspects = [i for i, (_, q) in enumerate(out) if q == "suspect"]
    assert suspects == [12, 13]  # the flipped frame, and its re-read that nothing confirms yet
    assert out[12][0] > 5e9 and 0.9e9 < out[13][0] < 1.1e9
    assert out[14][1] == "good"  # the next poll agrees with the re-read
