"""Intervals for accuracies and for differences of accuracies.

Wilson's score interval for one proportion (one model on n problems), and, for a comparison of training arms over
seeds, a two-level bootstrap: resample the seeds, and within each resampled seed resample the problems (paired: the
same problems for the arm and its baseline), so the interval carries both the seed spread and the problem sampling.
Written here because the quantities are a few lines of arithmetic on lists of 0/1 scores; scipy's `bootstrap`
resamples one level only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def wilson(correct: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of the proportion correct/n ((0, 1) when n == 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def percentile(sorted_xs: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of sorted values, linear between order statistics (numpy's default)."""
    if not sorted_xs:
        return float("nan")
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def paired_gain(arm: Sequence[Sequence[float]], base: Sequence[Sequence[float]] | None = None,
                resamples: int = 2000, seed: int = 0) -> dict:
    """Mean accuracy gain of `arm` over `base`, with a 95% interval from a two-level bootstrap.

    `arm[s][i]` is the score (0/1) of seed s on problem i; `base[s][i]` the baseline's on the same problem (the
    same seed index: e.g. the SFT arm's run with that seed; a single base model is given as one row and used for
    every seed). `base=None` gives the arm's own mean accuracy and its interval. Each resample draws seeds with
    replacement, then, for each drawn seed, problems with replacement (the same draw for arm and base), and takes
    the mean of the per-seed differences. With one seed this is the plain paired bootstrap over problems.
    """
    if not arm or any(not row for row in arm):
        raise ValueError("paired_gain needs at least one seed with at least one problem.")
    n = len(arm[0])
    if any(len(row) != n for row in arm):
        raise ValueError("every seed must be scored on the same problems.")
    if base is not None:
        if len(base) not in (1, len(arm)) or any(len(row) != n for row in base):
            raise ValueError("base must hold one row, or one per seed, over the same problems as arm.")
        rows = [[a - b for a, b in zip(arm[s], base[s if len(base) > 1 else 0])] for s in range(len(arm))]
    else:
        rows = [list(r) for r in arm]
    per_seed = [mean(r) for r in rows]
    import numpy as np

    d = np.asarray(rows, dtype=np.float64)  # seeds x problems
    k = d.shape[0]
    rng = np.random.default_rng(seed)
    seeds = rng.integers(k, size=(resamples, k))
    problems = rng.integers(n, size=(resamples, k, n))
    draws = sorted(d[seeds[..., None], problems].mean(axis=(1, 2)).tolist())
    sd = math.sqrt(sum((x - mean(per_seed)) ** 2 for x in per_seed) / (k - 1)) if k > 1 else 0.0
    return {"mean": mean(per_seed), "ci95": [percentile(draws, 0.025), percentile(draws, 0.975)],
            "per_seed": per_seed, "seeds": k, "problems": n, "seed_sd": sd}
