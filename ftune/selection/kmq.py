"""kMQ (k-means-quality) selection: Yu, Chen, Ahmadian, Fadaee, "Diversify and Conquer", arXiv 2409.11378, §2.1.

Paper: embed every example (prompt + completion), cluster with k-means (k by silhouette score), give cluster j the
budget b_j = |D_j| / |D| * b, and inside each cluster sample in proportion to softmax(quality) (the code,
`for-ai/iterative-data-selection` `kmeansrandom.py`, samples without replacement; so do we).

Adaptations:
- Embeddings are the training model's own mean-pooled last hidden states (`ftune.selection.embed`), L2-normalised
  before clustering (the paper's Cohere embeddings are unit vectors); `selection.encoder=PATH` swaps in another
  encoder. k-means is our torch k-means++ (`ftune.selection.cluster`), not faiss.
- Quality: the paper uses the Deita quality scorer: `selection.quality=deita` with `selection.scorer=hkust-nlp/deita-
  quality-scorer` (`ftune.selection.scorers.deita_quality`; recipes/paper_kmq_llama2_7b uses it). The default,
  `perplexity`, needs nothing to download: minus the response's log-perplexity under `selection.scorer` (the training
  model by default; fluent, well-formed responses score higher), `length` is the log of
  the response token count (the Deita score grows with length), `none` is uniform (the paper's kM-Random), and
  `module.function` is your own scorer (records -> one float each, e.g. a quality or reward model). Scores
  are standardised over the pool, then sampling weights are softmax(q / temperature) inside each cluster.
- Budgets: the paper's rounding is unspecified; we floor and give the remainder to the largest fractional parts. When
  budget >= k every cluster first gets one example and the rest is shared in proportion to |D_j| - 1, so each cluster
  is represented (the iterative code's guarantee); with budget < k it is plain proportional.
- The iterative variant (retrain, score generations, reweight clusters) is `selection=iterative`
  (`ftune.selection.iterative`).
"""

from __future__ import annotations

import logging
import math

import torch

from ftune.config import ConfigError
from ftune.selection.cluster import kmeans, silhouette
from ftune.selection.common import Selection, check_budget, import_function, kept
from ftune.selection.embed import Embedder

log = logging.getLogger(__name__)
QUALITIES = ("perplexity", "deita", "length", "none")
SILHOUETTE_SAMPLE = 2000


def cluster_budgets(sizes: list[int], budget: int) -> list[int]:
    """Per-cluster budgets summing to `budget`, proportional to cluster size, largest remainders rounded up; one per
    cluster first when budget >= number of clusters. Requires budget <= sum(sizes); never exceeds a cluster's size."""
    k, total = len(sizes), sum(sizes)
    if budget > total:
        raise ValueError(f"budget {budget} > pool {total}")
    base = [1 if budget >= k and s > 0 else 0 for s in sizes]
    rest = budget - sum(base)
    weights = [s - b for s, b in zip(sizes, base)]
    wsum = sum(weights)
    shares = [rest * w / wsum if wsum else 0.0 for w in weights]
    out = [b + math.floor(x) for b, x in zip(base, shares)]
    left = budget - sum(out)
    by_fraction = sorted(range(k), key=lambda j: (-(shares[j] - math.floor(shares[j])), j))
    for j in by_fraction:
        if left == 0:
            break
        if out[j] < sizes[j]:
            out[j] += 1
            left -= 1
    return out


def sample_without_replacement(weights: torch.Tensor, m: int, gen: torch.Generator) -> torch.Tensor:
    """m indices drawn without replacement with probabilities proportional to `weights` (sequentially renormalised),
    by the Gumbel-top-k trick."""
    u = torch.rand(len(weights), generator=gen, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    keys = weights.double().log() - (-u.log()).log()
    return keys.topk(m).indices


def standardise(q: torch.Tensor) -> torch.Tensor:
    q = torch.nan_to_num(q, nan=float(q[~q.isnan()].mean()) if (~q.isnan()).any() else 0.0)
    sd = q.std() if len(q) > 1 else torch.tensor(0.0)
    return (q - q.mean()) / sd if sd > 0 else torch.zeros_like(q)


class KMQ:
    """selection=kmq. Args are the keys of configs/selection/kmq.yaml."""

    def __init__(self, budget: int, k: int | None = None, k_candidates: list[int] | None = None,
                 quality: str = "perplexity", temperature: float = 1.0, encoder: str = "tiny_random",
                 scorer: str | None = None, max_length: int = 512, batch_size: int = 16, n_iter: int = 100,
                 n_redo: int = 3, progress: bool = True):
        if budget < 1:
            raise ConfigError(f"selection.budget={budget} must be >= 1.")
        if k is not None and k < 1:
            raise ConfigError(f"selection.k={k} must be >= 1, or null to choose k by silhouette score.")
        k_candidates = [8, 16, 32, 64] if k_candidates is None else list(k_candidates)
        if k is None and not k_candidates:
            raise ConfigError("selection.k is null, so k is chosen by silhouette among selection.k_candidates, "
                              "which is empty. Set selection.k=N or selection.k_candidates=[8,16,32].")
        self.quality_fn = (import_function("selection.quality", quality, QUALITIES, "taking the records and returning "
                                           "one score per record (higher = better)")
                           if quality not in QUALITIES else None)
        if temperature <= 0:
            raise ConfigError(f"selection.temperature={temperature} must be > 0.")
        self.budget, self.k, self.k_candidates = budget, k, k_candidates
        self.quality, self.temperature = quality, temperature
        self.n_iter, self.n_redo = n_iter, n_redo
        self.embedder = Embedder(encoder, max_length, batch_size, progress)
        same = scorer is None or scorer == encoder
        self.scorer = self.embedder if same else Embedder(scorer, max_length, batch_size, progress)

    def __call__(self, records: list[dict], seed: int) -> tuple[list[dict], dict]:
        return kept(records, self.select(records, seed))

    def choose_k(self, x: torch.Tensor, seed: int) -> tuple[int, dict]:
        gen = torch.Generator().manual_seed(seed)
        sample = torch.randperm(len(x), generator=gen)[:SILHOUETTE_SAMPLE]
        scores = {}
        for k in sorted({c for c in self.k_candidates if 2 <= c < len(x)}):
            _, labels, _ = kmeans(x, k, seed, self.n_iter, self.n_redo)
            scores[k] = silhouette(x[sample], labels[sample])
        if not scores:
            raise ConfigError(f"selection.k_candidates={self.k_candidates}: none is in [2, {len(x) - 1}] for a pool "
                              f"of {len(x)} examples. Set selection.k=N, or give smaller candidates.")
        return max(scores, key=lambda k: (scores[k], -k)), scores

    def clusters(self, records: list[dict], seed: int) -> dict:
        """Embed, cluster and score the pool: labels, k (given or by silhouette), standardised quality q."""
        n = len(records)
        if self.k is not None and self.k > n:
            raise ConfigError(f"selection.k={self.k} clusters is more than the pool of {n} examples. "
                              f"Lower selection.k.")
        out = self.embedder(records)
        x = torch.nn.functional.normalize(out.emb.float(), dim=1)
        if torch.cuda.is_available():
            x = x.cuda()
        if self.k is None:
            k, k_scores = self.choose_k(x, seed)
            log.info("kmq: k=%d by silhouette score (%s).", k, ", ".join(f"{c}: {s:.3f}" for c, s in k_scores.items()))
        else:
            k, k_scores = self.k, {}
        _, labels, inertia = kmeans(x, k, seed, self.n_iter, self.n_redo)
        labels = labels.cpu()
        if self.quality == "deita":
            from ftune.selection.scorers import deita_quality

            q = torch.tensor(deita_quality(records, self.scorer.name_or_path, self.scorer.max_length,
                                           self.scorer.batch_size), dtype=torch.float64)
        elif self.quality == "perplexity":
            nll = self.scorer(records).nll if self.scorer is not self.embedder else out.nll
            if nll is None:
                raise ConfigError(f"selection.quality=perplexity needs a causal LM as selection.scorer; "
                                  f"{self.scorer.name_or_path} has no LM head. Set selection.scorer to the training "
                                  f"model, or selection.quality=length|none.")
            q = -nll
        elif self.quality_fn is not None:
            q = torch.as_tensor(self.quality_fn(records), dtype=torch.float64)
            if q.shape != (n,):
                raise ValueError(f"selection.quality={self.quality} returned shape {tuple(q.shape)}, not ({n},).")
        elif self.quality == "length":
            q = out.response_tokens.double().clamp_min(1).log()
        else:
            q = torch.zeros(n)
        return {"labels": labels, "k": k, "k_scores": k_scores, "inertia": inertia, "q": standardise(q.double()),
                "sizes": torch.bincount(labels, minlength=k).tolist()}

    def draw(self, c: dict, budgets: list[int], gen: torch.Generator) -> list[int]:
        """budgets[j] examples of cluster j, sampled without replacement with weights softmax(q / temperature)."""
        chosen = []
        for j in range(c["k"]):
            members = (c["labels"] == j).nonzero().flatten()
            if budgets[j] == 0:
                continue
            w = torch.softmax(c["q"][members] / self.temperature, 0)
            chosen.append(members[sample_without_replacement(w, budgets[j], gen)])
        return sorted(torch.cat(chosen).tolist())

    def report(self, c: dict, budget: int, indices: list[int]) -> dict:
        picked = torch.bincount(c["labels"][indices], minlength=c["k"]).tolist()
        return {"method": "kmq", "pool": len(c["labels"]), "budget": budget, "selected": len(indices), "k": c["k"],
                "k_silhouette": {str(k): round(s, 4) for k, s in c["k_scores"].items()}, "inertia": c["inertia"],
                "quality": self.quality, "cluster_sizes": c["sizes"], "cluster_selected": picked,
                "clusters_represented": sum(n > 0 for n in picked)}

    def select(self, records: list[dict], seed: int) -> Selection:
        check_budget("kmq", self.budget, len(records))
        c = self.clusters(records, seed)
        budgets = cluster_budgets(c["sizes"], self.budget)
        indices = self.draw(c, budgets, torch.Generator().manual_seed(seed + 1))
        report = {**self.report(c, self.budget, indices), "cluster_budgets": budgets}
        return Selection(indices, report, c["q"].tolist(), f"quality ({self.quality}, standardised)")
