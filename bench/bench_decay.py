"""Benchmark: hotlab's vectorised decay correction against radioactivedecay, same inputs.

    .venv/bin/python bench/bench_decay.py [--n 1000000] [--sample 2000] [--seed 1]

N random decay corrections (activities 1 kBq-100 GBq, nuclides drawn from the library, elapsed
times 0-10 half-lives) are run through hotlab as one numpy call. radioactivedecay builds and
decays one Inventory per correction, far too slow for N, so a random sample is timed and its
rate scaled to N (the output says so). The sample is also checked for agreement: the two codes
use different half-lives (hotlab DDEP/ENSDF, radioactivedecay ICRP-107), so each pair must agree
within the ratio those half-lives imply, and, re-run with the ICRP-107 half-lives, to float rounding.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import radioactivedecay as rd

from hotlab.physics.decay import decay_factor
from hotlab.physics.nuclides import NUCLIDES


def hotlab_correct(a0_bq: np.ndarray, half_lives_s: np.ndarray, index: np.ndarray, dt_s: np.ndarray) -> np.ndarray:
    """The production path: gather each row's half-life, then one broadcast decay_factor."""
    return a0_bq * decay_factor(half_lives_s[index], dt_s)


def best_of(repeats: int, func, *args) -> tuple[float, np.ndarray]:
    """Shortest wall time of `repeats` runs (the least disturbed by other load) and the result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = func(*args)
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="decay corrections for hotlab (default 1e6)")
    parser.add_argument("--sample", type=int, default=2000, help="radioactivedecay sample size (default 2000)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    names = sorted(NUCLIDES)
    half_lives = np.array([NUCLIDES[name].half_life_s for name in names])
    icrp_half_lives = np.array([rd.Nuclide(name).half_life("s") for name in names])
    index = rng.integers(0, len(names), args.n)
    a0 = 10.0 ** rng.uniform(3.0, 11.0, args.n)
    dt = rng.uniform(0.0, 10.0, args.n) * half_lives[index]

    hotlab_s, ours = best_of(5, hotlab_correct, a0, half_lives, index, dt)
    hotlab_rate = args.n / hotlab_s

    sample = rng.choice(args.n, size=min(args.sample, args.n), replace=False)
    start = time.perf_counter()
    theirs = np.array(
        [
            rd.Inventory({names[index[i]]: a0[i]}, "Bq").decay(dt[i], "s").activities("Bq")[names[index[i]]]
            for i in sample
        ]
    )
    rd_s = time.perf_counter() - start
    rd_rate = len(sample) / rd_s

    # Agreement 1: as shipped, within what the two half-life evaluations imply.
    implied = np.abs(
        np.exp2(dt[sample] * (1.0 / icrp_half_lives[index[sample]] - 1.0 / half_lives[index[sample]])) - 1.0
    )
    deviation = np.abs(ours[sample] / theirs - 1.0)
    excess = deviation - (1.001 * implied + 1e-10)
    # Agreement 2: same maths on the same (ICRP-107) data.
    same_data = hotlab_correct(a0[sample], icrp_half_lives, index[sample], dt[sample])
    maths = np.max(np.abs(same_data / theirs - 1.0))

    print(
        f"hotlab decay_factor (numpy, vectorised): {args.n:,} corrections in {hotlab_s * 1e3:.1f} ms "
        f"(best of 5) = {hotlab_rate:,.0f} /s"
    )
    print(
        f"radioactivedecay {rd.__version__} Inventory.decay: {len(sample):,} sampled corrections in {rd_s:.2f} s "
        f"= {rd_rate:,.0f} /s; scaled to {args.n:,}: {args.n / rd_rate:.0f} s (estimated from the sample, not run)"
    )
    print(f"speed-up: {hotlab_rate / rd_rate:,.0f}x")
    print(
        f"agreement as shipped (DDEP/ENSDF vs ICRP-107 half-lives): max |rel diff| {deviation.max():.3e}, "
        f"all within the half-life-implied bound: {bool(np.all(excess <= 0))}"
    )
    print(f"agreement on identical ICRP-107 half-lives: max |rel diff| {maths:.3e}")
    return 0 if np.all(excess <= 0) and maths < 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
