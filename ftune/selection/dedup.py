"""Duplicate filter: exact duplicates by normalised text, then near-duplicates by embedding cosine similarity.

Exact: lower-cased, whitespace-collapsed text of every turn (with roles) is equal. Near: cosine similarity of the
examples' embeddings (`ftune.selection.embed`, the training model's mean-pooled hidden states by default, or any
encoder) at or above `threshold`. Greedy in source order: an example is dropped when it duplicates one already kept,
so the first of each group survives (the usual SemDeDup-style rule, without its clustering step: the comparison is
exhaustive, in blocks).

Centering (`center: true`, the default): a causal LM's mean-pooled hidden states share a large common direction, so
unrelated examples look alike (SmolLM2-135M on 64 GSM8K problems: mean pairwise cosine 0.90, 4.5% of pairs of
distinct problems >= 0.95). Subtracting the pool's mean embedding before the cosine removes it (same 64: mean -0.01,
max 0.74) while true near-duplicates stay near 1. The mean needs a pool: below CENTER_MIN examples it is skipped.
"""

from __future__ import annotations

import torch

from ftune.config import ConfigError
from ftune.selection.common import Selection, kept, normalized_text
from ftune.selection.embed import Embedder

BLOCK = 1024
CENTER_MIN = 32  # examples needed for a usable mean embedding


def near_duplicates(x: torch.Tensor, threshold: float) -> tuple[list[int], torch.Tensor]:
    """Greedy near-duplicate removal on unit vectors x: (kept indices, each row's highest similarity to a kept
    earlier row, -1 for the first)."""
    n = len(x)
    keep = torch.zeros(n, dtype=torch.bool, device=x.device)
    best = torch.full((n,), -1.0, device=x.device)
    for s in range(0, n, BLOCK):
        block = x[s: s + BLOCK]
        if s and keep[:s].any():
            sims = block @ x[:s][keep[:s]].T
            best[s: s + len(block)] = sims.max(1).values
        inner = block @ block.T
        for i in range(len(block)):
            prev = inner[i, :i][keep[s: s + i]]
            if len(prev):
                best[s + i] = torch.maximum(best[s + i], prev.max())
            keep[s + i] = best[s + i] < threshold
    return keep.nonzero().flatten().tolist(), best.cpu()


class Dedup:
    """selection=dedup. Args are the keys of configs/selection/dedup.yaml."""

    def __init__(self, threshold: float | None = 0.95, encoder: str = "tiny_random", max_length: int = 512,
                 batch_size: int = 16, progress: bool = True, center: bool = True):
        if threshold is not None and not -1 < threshold <= 1:
            raise ConfigError(f"selection.threshold={threshold} must be in (-1, 1] (cosine similarity), or null for "
                              f"exact duplicates only.")
        self.threshold, self.center = threshold, center
        self.embedder = Embedder(encoder, max_length, batch_size, progress)

    def __call__(self, records: list[dict], seed: int) -> tuple[list[dict], dict]:
        return kept(records, self.select(records, seed))

    def select(self, records: list[dict], seed: int) -> Selection:
        seen: set[str] = set()
        unique = []
        for i, r in enumerate(records):
            key = normalized_text(r)
            if key not in seen:
                seen.add(key)
                unique.append(i)
        report = {"method": "dedup", "pool": len(records), "exact_duplicates": len(records) - len(unique)}
        scores = None
        if self.threshold is not None and len(unique) > 1:
            x = self.embedder([records[i] for i in unique]).emb.float()
            centered = self.center and len(x) >= CENTER_MIN
            x = torch.nn.functional.normalize(x - x.mean(0) if centered else x, dim=1)
            report["centered"] = centered
            if torch.cuda.is_available():
                x = x.cuda()
            keep, best = near_duplicates(x, self.threshold)
            report["near_duplicates"] = len(unique) - len(keep)
            scores = [float("nan")] * len(records)
            for j, i in enumerate(unique):
                scores[i] = float(best[j])
            unique = [unique[j] for j in keep]
        report["selected"] = len(unique)
        return Selection(unique, report, scores, "highest cosine similarity to an earlier kept example")
