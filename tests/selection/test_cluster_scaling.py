"""The k-means speed-ups (running sum along x^T, point norms computed once in k-means++, 2 * (x @ c) instead of
(2 * x) @ c) give bit-for-bit the results of the plain formulas they replace."""

from __future__ import annotations

import torch

from ftune.selection import cluster


def _old_cluster_sums(x, labels, k):
    order = torch.argsort(labels, stable=True)
    running = torch.cat([torch.zeros(1, x.shape[1], dtype=x.dtype), x[order].cumsum(0)])
    ends = torch.bincount(labels, minlength=k).cumsum(0)
    starts = ends - torch.bincount(labels, minlength=k)
    return running[ends] - running[starts]


def _old_sqdist(x, c, xx=None):
    return ((x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)).clamp_min_(0)


def _old_assign(x, centers):
    c2 = (centers * centers).sum(1)
    v, i = (c2 - 2 * x @ centers.T).min(1)
    return i, (v + (x * x).sum(1)).clamp_min_(0)


def _data(n=3000, d=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, d, generator=gen) * 3
    return torch.nn.functional.normalize(centres[torch.arange(n) % 6] + torch.randn(n, d, generator=gen), dim=1)


def test_cluster_sums_bit_for_bit():
    x = _data().double()
    labels = torch.randint(7, (len(x),), generator=torch.Generator().manual_seed(1))
    labels[labels == 3] = 4  # an empty cluster
    new = cluster._cluster_sums(x, labels, 7)
    assert torch.equal(new, _old_cluster_sums(x, labels, 7))
    reference = torch.zeros(7, x.shape[1], dtype=x.dtype).index_add_(0, labels, x)
    assert torch.allclose(new, reference, atol=1e-10) and not new[3].any()


def test_distances_bit_for_bit():
    x = _data()
    c = x[[5, 17, 99]]
    xx = (x * x).sum(1, keepdim=True)
    assert torch.equal(cluster._sqdist(x, c, xx), _old_sqdist(x, c))
    assert torch.equal(cluster._sqdist(x, c), _old_sqdist(x, c))
    for a, b in zip(cluster.assign(x, c), _old_assign(x, c)):
        assert torch.equal(a, b)


def test_kmeans_unchanged(monkeypatch):
    x = _data(seed=2)
    new = cluster.kmeans(x, 6, seed=3, n_iter=50, n_redo=2)
    monkeypatch.setattr(cluster, "_cluster_sums", _old_cluster_sums)
    monkeypatch.setattr(cluster, "_sqdist", _old_sqdist)
    monkeypatch.setattr(cluster, "assign", _old_assign)
    old = cluster.kmeans(x, 6, seed=3, n_iter=50, n_redo=2)
    assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1]) and new[2] == old[2]
