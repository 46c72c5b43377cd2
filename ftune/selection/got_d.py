"""GOT-D: Kang et al., "Get more for less: Principled Data Selection for Warming Up Fine-Tuning in LLMs", ICLR 2024,
arXiv 2405.02774, §2.3 and Theorem 1.

Paper: with candidates D_S and a small target set D_R, fine-tuning on D_U moves the model's effective distribution
to lambda*D_U + (1-lambda)*D_S, so the chosen D_U should make OT(., D_R) fall fastest. To first order that is the N0
candidates with the most negative gradient of OT(D_S, D_R) with respect to their probability mass. The gradient comes
from the entropic OT dual potential f (Sinkhorn) with the calibration of Just et al. 2023 (LAVA):
g_i = f_i - mean_{j != i} f_j, which removes the potentials' free additive constant.

Adaptations: embeddings are the training model's mean-pooled hidden states (`ftune.selection.embed`; the paper
fine-tunes distilBERT, all-MiniLM-L6-v2 is on par, and `selection.encoder=PATH` takes such a model), L2-normalised;
the cost is the squared Euclidean distance between them; the entropy is `epsilon` times the mean cost (the paper's
value was not found); log-domain Sinkhorn without momentum. The cost matrix is held in memory (pool x target x 4
bytes). The paper's first step (picking the closest domains of a multi-domain corpus) is not part of this selector.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import SimpleNamespace

import torch

from ftune.config import ConfigError
from ftune.data.sources import DataError
from ftune.selection.common import Selection, check_budget, kept
from ftune.selection.embed import Embedder

log = logging.getLogger(__name__)


def sinkhorn_log(cost: torch.Tensor, eps: float, max_iter: int = 1000, tol: float = 1e-6):
    """Entropic OT between uniform measures on the rows and columns of `cost`, in the log domain.

    Returns (f, g, iterations, marginal error): the dual potentials, with plan P_ij = a_i b_j exp((f_i+g_j-C_ij)/eps).
    """
    n, m = cost.shape
    log_a = torch.full((n,), -math.log(n), dtype=cost.dtype, device=cost.device)
    log_b = torch.full((m,), -math.log(m), dtype=cost.dtype, device=cost.device)
    f = torch.zeros(n, dtype=cost.dtype, device=cost.device)
    g = torch.zeros(m, dtype=cost.dtype, device=cost.device)
    err = float("inf")
    it = 0
    for it in range(1, max_iter + 1):
        f = -eps * torch.logsumexp((g[None, :] - cost) / eps + log_b[None, :], dim=1)
        g = -eps * torch.logsumexp((f[:, None] - cost) / eps + log_a[:, None], dim=0)
        if it % 10 == 0 or it == max_iter:
            # Columns are exact after the g update; measure how far the rows are from a.
            rows = torch.logsumexp((f[:, None] + g[None, :] - cost) / eps + log_b[None, :], dim=1)
            err = float((rows.exp() - 1).abs().mean())  # relative error of each row's mass against a_i
            if err < tol:
                break
    return f, g, it, err


def calibrated_gradient(f: torch.Tensor) -> torch.Tensor:
    """LAVA's calibrated gradient g_i = f_i - (sum_j f_j - f_i) / (n - 1)."""
    n = len(f)
    if n == 1:
        return torch.zeros_like(f)
    return f - (f.sum() - f) / (n - 1)


def got_d_scores(x: torch.Tensor, y: torch.Tensor, epsilon: float, max_iter: int = 1000, tol: float = 1e-6):
    """Calibrated OT gradient per candidate row of x against the targets y (lower = pulls the pool toward y)."""
    cost = torch.cdist(x.double(), y.double()).pow(2)
    eps = epsilon * float(cost.mean()) if float(cost.mean()) > 0 else epsilon
    f, _, it, err = sinkhorn_log(cost, eps, max_iter, tol)
    return calibrated_gradient(f), {"sinkhorn_iterations": it, "marginal_error": err, "epsilon_abs": eps}


def load_targets(target_path: str | None) -> list[dict]:
    """The target set as conversations (any format `data=jsonl` reads); errors name the key and the fix."""
    from ftune.data.sources import load_conversations

    if not target_path:
        raise ConfigError("selection=got_d needs selection.target_path=FILE.jsonl: a small set of examples of the "
                          "task you are preparing for (any format data=jsonl reads).")
    path = Path(target_path).expanduser()
    if not path.is_file():
        raise DataError(f"selection.target_path={target_path}: no such file (relative paths resolve against "
                        f"{Path.cwd()}).")
    cfg = SimpleNamespace(source="jsonl", path=str(path), split="train", limit=None, fields={}, format="auto",
                          system_prompt=None)
    examples, _ = load_conversations(cfg, "train", 0)
    return examples


class GOTD:
    """selection=got_d. Args are the keys of configs/selection/got_d.yaml."""

    def __init__(self, budget: int, target_path: str | None = None, epsilon: float = 0.05, max_iter: int = 1000,
                 tol: float = 1e-6, encoder: str = "tiny_random", max_length: int = 512, batch_size: int = 16,
                 progress: bool = True):
        if budget < 1:
            raise ConfigError(f"selection.budget={budget} must be >= 1.")
        if epsilon <= 0:
            raise ConfigError(f"selection.epsilon={epsilon} must be > 0 (entropy, as a fraction of the mean cost).")
        self.budget, self.target_path, self.epsilon = budget, target_path, epsilon
        self.max_iter, self.tol = max_iter, tol
        self.embedder = Embedder(encoder, max_length, batch_size, progress)

    @staticmethod
    def check_config(cfg) -> None:
        """Before anything loads: the target file must be given and readable."""
        load_targets(cfg.selection.get("target_path"))

    def __call__(self, records: list[dict], seed: int) -> tuple[list[dict], dict]:
        return kept(records, self.select(records, seed))

    def select(self, records: list[dict], seed: int) -> Selection:
        targets = load_targets(self.target_path)
        check_budget("got_d", self.budget, len(records))
        x = torch.nn.functional.normalize(self.embedder(records).emb.float(), dim=1)
        y = torch.nn.functional.normalize(self.embedder(targets).emb.float(), dim=1)
        if torch.cuda.is_available():
            x, y = x.cuda(), y.cuda()
        scores, info = got_d_scores(x, y, self.epsilon, self.max_iter, self.tol)
        if info["marginal_error"] > max(self.tol, 1e-3):
            log.warning("got_d: Sinkhorn stopped after %d iterations with marginal error %.2e; raise "
                        "selection.max_iter or selection.epsilon.", info["sinkhorn_iterations"], info["marginal_error"])
        scores = scores.cpu()
        # Most negative first; ties by pool position, so the result is deterministic.
        order = sorted(range(len(records)), key=lambda i: (float(scores[i]), i))
        indices = sorted(order[: self.budget])
        report = {"method": "got_d", "pool": len(records), "budget": self.budget, "selected": len(indices),
                  "targets": len(targets), **info, "score_threshold": float(scores[order[self.budget - 1]])}
        return Selection(indices, report, scores.tolist(), "calibrated OT gradient")
