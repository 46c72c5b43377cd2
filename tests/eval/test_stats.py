"""Interval maths of ftune.eval.stats against values worked by hand."""

from __future__ import annotations

import math

import pytest

from ftune.eval.stats import paired_gain, percentile, wilson


def test_wilson_matches_the_formula_by_hand():
    # p = 0.3, n = 100, z = 1.96: centre = (0.3 + 1.9208/100) / 1.038416 = 0.30740, half = 0.08819
    lo, hi = wilson(30, 100)
    assert lo == pytest.approx(0.2189, abs=1e-4) and hi == pytest.approx(0.3958, abs=1e-4)
    lo, hi = wilson(0, 200)  # all wrong: the interval still has width (3.84/203.84)
    assert lo == 0.0 and hi == pytest.approx(3.8416 / 203.8416, abs=1e-6)
    assert wilson(0, 0) == (0.0, 1.0)


def test_percentile_interpolates_like_numpy():
    xs = [1.0, 2.0, 3.0, 4.0]
    assert percentile(xs, 0.5) == 2.5 and percentile(xs, 0.0) == 1.0 and percentile(xs, 1.0) == 4.0
    assert percentile(xs, 0.25) == pytest.approx(1.75)


def test_paired_gain_means_and_degenerate_intervals():
    arm = [[1, 1, 0, 0], [1, 1, 1, 0]]          # seeds 0.5 and 0.75
    base = [[0, 0, 0, 0]]                        # one base row, used for every seed
    g = paired_gain(arm, base, resamples=500)
    assert g["mean"] == pytest.approx(0.625) and g["per_seed"] == [0.5, 0.75]
    assert g["seed_sd"] == pytest.approx(math.sqrt(((0.5 - 0.625) ** 2 + (0.75 - 0.625) ** 2) / 1))
    assert g["ci95"][0] < 0.625 < g["ci95"][1]
    same = paired_gain([[1, 0, 1], [0, 1, 1]], [[1, 0, 1], [0, 1, 1]], resamples=200)
    assert same["mean"] == 0 and same["ci95"] == [0.0, 0.0]  # identical arms: no difference in any resample


def test_paired_gain_interval_carries_seed_spread():
    # Within each seed every problem has the same difference, so problem resampling adds nothing; the interval is
    # then the seed bootstrap's alone: with seeds at +1 and -1 it must reach both ends.
    arm = [[1] * 50, [0] * 50]
    base = [[0] * 50, [1] * 50]
    g = paired_gain(arm, base, resamples=2000, seed=1)
    assert g["mean"] == 0 and g["ci95"][0] == pytest.approx(-1) and g["ci95"][1] == pytest.approx(1)
    one = paired_gain([[1] * 50], [[0] * 50], resamples=200)  # one seed, constant gain: a point
    assert one["ci95"] == [1.0, 1.0]


def test_paired_gain_problem_interval_is_near_the_normal_one():
    # One seed, 400 problems, 120 right vs a base of 0: the bootstrap interval of p = 0.3 is close to
    # p +- 1.96 sqrt(p(1-p)/n) = 0.3 +- 0.0449.
    arm = [[1] * 120 + [0] * 280]
    g = paired_gain(arm, [[0] * 400], resamples=4000, seed=3)
    assert g["ci95"][0] == pytest.approx(0.3 - 0.0449, abs=0.01) and g["ci95"][1] == pytest.approx(0.3 + 0.0449,
                                                                                                 abs=0.01)


def test_paired_gain_refuses_misaligned_scores():
    with pytest.raises(ValueError, match="same problems"):
        paired_gain([[1, 0], [1]])
    with pytest.raises(ValueError, match="base"):
        paired_gain([[1, 0]], [[1, 0, 1]])
