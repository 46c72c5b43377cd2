"""Seeded k-means++ / Lloyd k-means and the silhouette score, in torch.

Our own rather than a library's: faiss (what the kMQ code uses) and scikit-learn are not dependencies of ftune, and
these ~100 lines run on the GPU when there is one, chunked so that 100k x 4k distances never sit in memory at once.
Differences from faiss: exact k-means++ seeding (faiss samples its initial centroids uniformly), and an empty cluster
is re-seeded with the point farthest from its centroid.
"""

from __future__ import annotations

import torch

CHUNK = 8192


def _sqdist(x: torch.Tensor, c: torch.Tensor, xx: torch.Tensor | None = None) -> torch.Tensor:
    """Squared distances of the rows of x to those of c; `xx` = (x * x).sum(1, keepdim=True) when already known."""
    xx = (x * x).sum(1, keepdim=True) if xx is None else xx
    return (xx - 2 * (x @ c.T) + (c * c).sum(1)).clamp_min_(0)  # 2 * (x @ c): no scaled copy of x


def assign(x: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nearest center index, squared distance to it) per point, in chunks."""
    labels, dists = [], []
    c2 = (centers * centers).sum(1)
    for s in range(0, len(x), CHUNK):
        chunk = x[s: s + CHUNK]
        # ||x||^2 is the same for every center: add it after the argmin, to the winner only.
        v, i = (c2 - 2 * (chunk @ centers.T)).min(1)
        labels.append(i)
        dists.append((v + (chunk * chunk).sum(1)).clamp_min_(0))
    return torch.cat(labels), torch.cat(dists)


def _cluster_sums(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per-cluster sums of the rows of x by sorting and a running sum (fixed order, unlike CUDA's index_add_, and
    faster than CPU index_add_ when many rows land on few clusters). The running sum runs along the rows of x^T:
    the same sequential additions as along dim 0 (identical values), several times faster on a CPU."""
    order = torch.argsort(labels, stable=True)
    running = torch.cat([torch.zeros(x.shape[1], 1, dtype=x.dtype), x[order].T.contiguous().cumsum(1)], dim=1)
    ends = torch.bincount(labels, minlength=k).cumsum(0)
    starts = ends - torch.bincount(labels, minlength=k)
    return (running[:, ends] - running[:, starts]).T


def kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next center drawn with probability proportional to the
    squared distance to the nearest center chosen so far."""
    n = len(x)
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [x[first]]
    xx = (x * x).sum(1, keepdim=True)  # once, not at each of the k steps
    closest = _sqdist(x, x[first: first + 1], xx).squeeze(1)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than k: any remaining point
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            idx = int(torch.multinomial((closest / total).cpu(), 1, generator=gen))
        centers.append(x[idx])
        closest = torch.minimum(closest, _sqdist(x, x[idx: idx + 1], xx).squeeze(1))
    return torch.stack(centers)


def kmeans(x: torch.Tensor, k: int, seed: int, n_iter: int = 100, n_redo: int = 3):
    """Lloyd's k-means from `n_redo` seeded k-means++ starts; returns (centers, labels, inertia) of the best start.

    Deterministic under `seed` on a given device (the generator is a CPU one).
    """
    if not 1 <= k <= len(x):
        raise ValueError(f"k={k} must be in [1, {len(x)}]")
    gen = torch.Generator().manual_seed(seed)
    # Centroid sums on the CPU in float64: CUDA's index_add_ adds in a run-dependent order (atomics), and a last-bit
    # difference can flip a tie and with it the selection.
    x_sum = x.double().cpu()
    best = None
    for _ in range(n_redo):
        centers = kmeans_pp(x, k, gen)
        labels = None
        for _ in range(n_iter):
            new, dist = assign(x, centers)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            sums = _cluster_sums(x_sum, labels.cpu(), k)
            counts = torch.bincount(labels, minlength=k)
            empty = (counts == 0).nonzero().flatten()
            centers = (sums / counts.cpu().clamp_min(1).unsqueeze(1)).to(x)
            if len(empty):
                far = dist.argsort(descending=True)[: len(empty)]
                centers[empty] = x[far]
        labels, dist = assign(x, centers)
        inertia = float(dist.sum())
        if best is None or inertia < best[2]:
            best = (centers, labels, inertia)
    return best


def silhouette(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette (Rousseeuw 1987) with Euclidean distances; a point alone in its cluster scores 0 (as in
    scikit-learn). O(n^2): pass a subsample for large sets."""
    k = int(labels.max()) + 1
    d = torch.cdist(x, x)
    onehot = torch.nn.functional.one_hot(labels, k).to(d.dtype)
    sums = d @ onehot                                   # (n, k): summed distance to each cluster
    counts = onehot.sum(0)
    own = counts[labels]
    a = sums.gather(1, labels[:, None]).squeeze(1) / (own - 1).clamp_min(1)
    mean_other = sums / counts.clamp_min(1)
    mean_other[torch.arange(len(x)), labels] = float("inf")
    mean_other[:, counts == 0] = float("inf")
    b = mean_other.min(1).values
    s = (b - a) / torch.maximum(a, b).clamp_min(1e-12)
    s[own <= 1] = 0.0
    return float(s.mean())
