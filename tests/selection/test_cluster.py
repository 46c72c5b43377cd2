"""k-means++ / Lloyd, silhouette and the kMQ per-cluster budgets against hand-derived answers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ftune.selection.cluster import kmeans, silhouette
from ftune.selection.kmq import cluster_budgets, sample_without_replacement

sys.path.insert(0, str(Path(__file__).parent))
from _fake import blobs  # noqa: E402


def test_kmeans_recovers_well_separated_blobs():
    centers = [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]
    x = blobs(centers, [30, 20, 40, 10], spread=0.3)
    got, labels, inertia = kmeans(x, 4, seed=0)
    truth = torch.repeat_interleave(torch.arange(4), torch.tensor([30, 20, 40, 10]))
    # Every true blob maps to exactly one cluster and vice versa.
    pairs = {(int(t), int(p)) for t, p in zip(truth, labels)}
    assert len(pairs) == 4 and len({p for _, p in pairs}) == 4
    for t, p in pairs:
        assert torch.allclose(got[p], torch.tensor(centers[t]), atol=0.2)
    # Inertia is the within-cluster sum of squares, about n * d * spread^2 = 100 * 2 * 0.09.
    assert 10 < inertia < 30


def test_kmeans_is_seeded():
    x = blobs([[0.0, 0.0], [1.0, 1.0]], [50, 50], spread=1.0)
    a, b, c = kmeans(x, 5, seed=3), kmeans(x, 5, seed=3), kmeans(x, 5, seed=4, n_redo=1)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert not torch.equal(a[0], c[0])


def test_silhouette_by_hand():
    # Two clusters on a line: {0, 1} and {4}. Point 0: a=1, b=4 -> 0.75; point 1: a=1, b=3 -> 2/3; point 4: alone -> 0.
    x = torch.tensor([[0.0], [1.0], [4.0]])
    assert silhouette(x, torch.tensor([0, 0, 1])) == pytest.approx((0.75 + 2 / 3 + 0) / 3)
    # Four points, two pairs: a=1, b = mean distance to the other pair.
    x = torch.tensor([[0.0], [1.0], [5.0], [6.0]])
    s0, s1 = (5.5 - 1) / 5.5, (4.5 - 1) / 4.5
    assert silhouette(x, torch.tensor([0, 0, 1, 1])) == pytest.approx((s0 + s1 + s1 + s0) / 4)


@pytest.mark.parametrize(("sizes", "budget", "expected"), [
    ([50, 30, 20], 10, [5, 3, 2]),            # one each, then 7 by (49, 29, 19)/97: 3.54 2.09 1.37
    ([10, 1, 1, 88], 10, [2, 1, 1, 6]),       # one each, 6 by (9, 0, 0, 87)/96: 0.56 0 0 5.44
    ([5, 5, 90], 2, [0, 0, 2]),               # budget < k: plain proportional, 0.1 0.1 1.8 -> 0 0 1, +1 to the 0.8
    ([3, 3, 3], 9, [3, 3, 3]),                # the whole pool
    ([4, 4, 4], 4, [2, 1, 1]),                # one each, the last one to the first of the tied fractions
])
def test_cluster_budgets(sizes, budget, expected):
    got = cluster_budgets(sizes, budget)
    assert got == expected and sum(got) == budget and all(g <= s for g, s in zip(got, sizes))


def test_gumbel_top_k_follows_the_weights():
    # Drawing one of three with weights (0.7, 0.2, 0.1): frequencies over many seeds approach the weights.
    w = torch.tensor([0.7, 0.2, 0.1])
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.cat([sample_without_replacement(w, 1, gen) for _ in range(4000)]), minlength=3)
    assert torch.allclose(counts / 4000, w.double().float(), atol=0.03)
    # Without replacement: all three drawn, each once.
    assert sorted(sample_without_replacement(w, 3, gen).tolist()) == [0, 1, 2]
