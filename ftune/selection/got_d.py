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
value was not found); Sinkhorn without momentum (stabilised scaling-domain iterations, `sinkhorn`, with the log-domain
`sinkhorn_log` as reference and fallback). The cost matrix is held in memory (pool x target x 4
bytes).

Domain pre-selection (the paper's step 1: 10K samples per domain, OT to the target, candidates from the 2 closest
domains), when `selection.domain_field` names a record key (carried from the data with `data.keep_fields`): each
domain's seeded sample of `domain_sample` examples is embedded, its distance to the targets is the primal entropic
cost <P, C> of the same Sinkhorn, and only the examples of the `top_domains` closest domains go on to the gradient
selection. Adaptations: one absolute entropy for every domain (`epsilon` times the mean cost over all the samples),
so the distances are comparable; every example of a kept domain is a candidate (the paper resamples 1M from each).
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


def sinkhorn_log(cost: torch.Tensor, eps: float, max_iter: int = 1000, tol: float = 1e-6,
                 g: torch.Tensor | None = None, first: int = 1):
    """Entropic OT between uniform measures on the rows and columns of `cost`, in the log domain.

    Returns (f, g, iterations, marginal error): the dual potentials, with plan P_ij = a_i b_j exp((f_i+g_j-C_ij)/eps).
    `g` and `first` resume from iteration `first` with the column potential `g` (what `sinkhorn` hands over).
    """
    n, m = cost.shape
    log_a = torch.full((n,), -math.log(n), dtype=cost.dtype, device=cost.device)
    log_b = torch.full((m,), -math.log(m), dtype=cost.dtype, device=cost.device)
    f = torch.zeros(n, dtype=cost.dtype, device=cost.device)
    g = torch.zeros(m, dtype=cost.dtype, device=cost.device) if g is None else g
    err = float("inf")
    it = 0
    for it in range(first, max_iter + 1):
        f = -eps * torch.logsumexp((g[None, :] - cost) / eps + log_b[None, :], dim=1)
        g = -eps * torch.logsumexp((f[:, None] - cost) / eps + log_a[:, None], dim=0)
        if it % 10 == 0 or it == max_iter:
            # Columns are exact after the g update; measure how far the rows are from a.
            rows = torch.logsumexp((f[:, None] + g[None, :] - cost) / eps + log_b[None, :], dim=1)
            err = float((rows.exp() - 1).abs().mean())  # relative error of each row's mass against a_i
            if err < tol:
                break
    return f, g, it, err


TINY = 1e-300   # kernel entries below this are set to 0: no denormals (slow), and below what a double sum keeps
SAFE = 1e-200   # a row or column sum of the kernel below this hands over to the log domain


def sinkhorn(cost: torch.Tensor, eps: float, max_iter: int = 1000, tol: float = 1e-6):
    """The iterations of `sinkhorn_log` (same potentials up to rounding, same stopping rule, same returns), in the
    scaling domain: each half-step is one matrix-vector product with the kernel K_ij = exp(-(C_ij - min_j C_ij)/eps),
    computed once, instead of an exp over the whole matrix; a 100k x 500 problem runs ~20x faster on a CPU.

    Stabilised by shifts: f_i = c_i - G - eps log (K v)_i with c_i = min_j C_ij, G = max_j g_j and
    v_j = b_j exp((g_j - G)/eps); g_j = -H - eps log (K^T u)_j with H = max_i (f_i - c_i) and
    u_i = a_i exp((f_i - c_i - H)/eps). If a sum still falls below SAFE (a tiny entropy against the cost spread), the
    iteration restarts in the log domain from the last column potential.
    """
    n, m = cost.shape
    c = cost.min(1).values
    kernel = torch.exp((c[:, None] - cost) / eps)
    kernel.masked_fill_(kernel < TINY, 0.0)
    log_a, log_b = -math.log(n), -math.log(m)
    g = torch.zeros(m, dtype=cost.dtype, device=cost.device)
    f = torch.zeros(n, dtype=cost.dtype, device=cost.device)

    def row_sums(g):
        top = g.max()
        return kernel @ torch.exp((g - top) / eps + log_b), top

    err = float("inf")
    it = 0
    for it in range(1, max_iter + 1):
        kv, top = row_sums(g)
        if float(kv.min()) < SAFE:
            return sinkhorn_log(cost, eps, max_iter, tol, g, it)
        f = c - top - eps * kv.log()
        shift = (f - c).max()
        ktu = kernel.T @ torch.exp((f - c - shift) / eps + log_a)
        if float(ktu.min()) < SAFE:
            return sinkhorn_log(cost, eps, max_iter, tol, g, it)
        g_new = -shift - eps * ktu.log()
        if it % 10 == 0 or it == max_iter:
            kv, top = row_sums(g_new)
            if float(kv.min()) < SAFE:
                return sinkhorn_log(cost, eps, max_iter, tol, g, it)
            # Row i's log mass relative to a_i: f_i/eps + LSE_j((g_j - C_ij)/eps + log b_j).
            err = float((((f - c + top) / eps + kv.log()).exp() - 1).abs().mean())
        g = g_new
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
    f, _, it, err = sinkhorn(cost, eps, max_iter, tol)
    return calibrated_gradient(f), {"sinkhorn_iterations": it, "marginal_error": err, "epsilon_abs": eps}


def ot_cost(x: torch.Tensor, y: torch.Tensor, eps: float, max_iter: int = 1000, tol: float = 1e-6):
    """Primal entropic OT cost <P, C> between uniform measures on the rows of x and y, at absolute entropy `eps`."""
    cost = torch.cdist(x.double(), y.double()).pow(2)
    f, g, it, err = sinkhorn(cost, eps, max_iter, tol)
    plan = torch.exp((f[:, None] + g[None, :] - cost) / eps - math.log(len(x)) - math.log(len(y)))
    return float((plan * cost).sum()), {"sinkhorn_iterations": it, "marginal_error": err}


def validation_targets(cfg, size: int) -> list[dict]:
    """`target_path=validation`: `size` validation problems of the run's eval tasks (reasoning-gym validation seeds:
    never a test or training problem), each with its reference answer in the data's answer format."""
    from omegaconf import OmegaConf

    from ftune.data.reasoning_gym import eval_problems

    ev = OmegaConf.merge(cfg.eval, {"limit": size})
    return [{"id": p["id"], "messages": [*p["messages"], {"role": "assistant", "content": p["template"].format(
        answer=p["entry"]["answer"])}]} for p in eval_problems(cfg.data, ev, cfg.seed, part="validation")]


def load_targets(target_path: str | None) -> list[dict]:
    """The target set as conversations (any format `data=jsonl` reads); errors name the key and the fix."""
    from ftune.data.sources import load_conversations

    if not target_path:
        raise ConfigError("selection=got_d needs selection.target_path=FILE.jsonl: a small set of examples of the "
                          "task you are preparing for (any format data=jsonl reads), or target_path=validation for "
                          "validation problems of the eval's reasoning-gym tasks.")
    path = Path(target_path).expanduser()
    if not path.is_file():
        raise DataError(f"selection.target_path={target_path}: no such file (relative paths resolve against "
                        f"{Path.cwd()}).")
    cfg = SimpleNamespace(source="jsonl", path=str(path), split="train", limit=None, fields={}, keep_fields=[],
                          format="auto", system_prompt=None)
    examples, _ = load_conversations(cfg, "train", 0)
    return examples


def group_domains(records: list[dict], field: str) -> dict:
    """Pool positions per domain value, domains in order of first appearance; a record without the field is an
    error naming the keys it has."""
    groups: dict = {}
    for i, r in enumerate(records):
        if field not in r:
            has = sorted(k for k in r if k not in ("messages", "answer"))
            raise ConfigError(f"selection.domain_field={field}: example {i} (id {r.get('id')!r}) has no field "
                              f"{field!r} (it has {has}). Carry the column from the data with "
                              f"data.keep_fields=[{field}] (every example needs it), or set selection.domain_field="
                              f"null to select from the whole pool.")
        groups.setdefault(r[field], []).append(i)
    return groups


class GOTD:
    """selection=got_d. Args are the keys of configs/selection/got_d.yaml."""

    def __init__(self, budget: int, target_path: str | None = None, epsilon: float = 0.05, max_iter: int = 1000,
                 tol: float = 1e-6, domain_field: str | None = None, domain_sample: int = 10000, top_domains: int = 2,
                 encoder: str = "tiny_random", max_length: int = 512, batch_size: int = 16, progress: bool = True,
                 target_size: int = 64):
        if budget < 1:
            raise ConfigError(f"selection.budget={budget} must be >= 1.")
        if epsilon <= 0:
            raise ConfigError(f"selection.epsilon={epsilon} must be > 0 (entropy, as a fraction of the mean cost).")
        if domain_sample < 1 or top_domains < 1:
            raise ConfigError(f"selection.domain_sample={domain_sample} and selection.top_domains={top_domains} must "
                              f"be >= 1.")
        if target_size < 1:
            raise ConfigError(f"selection.target_size={target_size} must be >= 1.")
        self.budget, self.target_path, self.epsilon, self.target_size = budget, target_path, epsilon, target_size
        self.cfg = None
        self.max_iter, self.tol = max_iter, tol
        self.domain_field, self.domain_sample, self.top_domains = domain_field, domain_sample, top_domains
        self.embedder = Embedder(encoder, max_length, batch_size, progress)

    @staticmethod
    def check_config(cfg) -> None:
        """Before anything loads: the target file must be given and readable, and a domain field carried."""
        if cfg.selection.get("target_path") == "validation":
            if cfg.eval.task != "reasoning_gym":
                raise ConfigError(f"selection.target_path=validation draws validation problems of the eval's "
                                  f"reasoning-gym tasks, and this run has eval={cfg.eval.task}. Use "
                                  f"eval=reasoning_gym, "
                                  f"or give selection.target_path=FILE.jsonl.")
        else:
            load_targets(cfg.selection.get("target_path"))
        field = cfg.selection.get("domain_field")
        if field is not None and field not in cfg.data.keep_fields:
            raise ConfigError(f"selection.domain_field={field} reads each example's {field!r} column, but the data "
                              f"does not carry it: add data.keep_fields=[{field}] (now {list(cfg.data.keep_fields)}).")

    def __call__(self, records: list[dict], seed: int) -> tuple[list[dict], dict]:
        return kept(records, self.select(records, seed))

    def bind_config(self, cfg) -> None:
        """The run's config (target_path=validation draws its targets from the run's eval tasks)."""
        self.cfg = cfg

    def targets(self) -> list[dict]:
        if self.target_path == "validation":
            if self.cfg is None:
                raise RuntimeError("GOTD.bind_config(cfg) must be called before select() with target_path=validation.")
            return validation_targets(self.cfg, self.target_size)
        return load_targets(self.target_path)

    def _warn_unconverged(self, info: dict, what: str) -> None:
        if info["marginal_error"] > max(self.tol, 1e-3):
            log.warning("got_d: Sinkhorn (%s) stopped after %d iterations with marginal error %.2e; raise "
                        "selection.max_iter or selection.epsilon.", what, info["sinkhorn_iterations"],
                        info["marginal_error"])

    def pick_domains(self, records: list[dict], groups: dict, y: torch.Tensor, seed: int) -> tuple[list[int], dict]:
        """The candidate pool (ascending positions) of the `top_domains` domains closest to the targets y."""
        gen = torch.Generator().manual_seed(seed)
        samples = {d: [idx[j] for j in sorted(torch.randperm(len(idx), generator=gen)[: self.domain_sample].tolist())]
                   for d, idx in groups.items()}
        flat = [i for idx in samples.values() for i in idx]
        x = torch.nn.functional.normalize(self.embedder([records[i] for i in flat]).emb.float(), dim=1).to(y.device)
        # One absolute entropy for all domains (the mean cost over every sample), so their distances compare.
        xd, yd = x.double(), y.double()
        mean_cost = float((xd * xd).sum(1).mean() + (yd * yd).sum(1).mean() - 2 * xd.mean(0) @ yd.mean(0))
        eps = self.epsilon * mean_cost if mean_cost > 0 else self.epsilon
        dist, info, start = {}, {}, 0
        for d, idx in samples.items():
            dist[d], info[d] = ot_cost(x[start: start + len(idx)], y, eps, self.max_iter, self.tol)
            self._warn_unconverged(info[d], f"domain {d}")
            start += len(idx)
        order = sorted(range(len(groups)), key=lambda k: (dist[list(groups)[k]], k))
        keep = [list(groups)[k] for k in order[: self.top_domains]]
        pool = sorted(i for d in keep for i in groups[d])
        report = {"domain_field": self.domain_field, "domain_epsilon_abs": eps, "kept_domains": [str(d) for d in keep],
                  "candidate_pool": len(pool),
                  "domains": {str(d): {"size": len(groups[d]), "sampled": len(samples[d]), "ot_cost": dist[d],
                                       "kept": d in keep, "sinkhorn_iterations": info[d]["sinkhorn_iterations"]}
                              for d in groups}}
        log.info("got_d: OT cost to the targets per domain: %s; kept %s (%d candidates).",
                 ", ".join(f"{d}: {dist[d]:.4f}" for d in groups), ", ".join(map(str, keep)), len(pool))
        if self.budget > len(pool):
            raise ConfigError(f"selection=got_d: selection.budget={self.budget} is larger than the {len(pool)} "
                              f"examples of the {len(keep)} closest domain(s) ({', '.join(map(str, keep))}). Raise "
                              f"selection.top_domains (now {self.top_domains}, of {len(groups)} domains), or lower "
                              f"selection.budget.")
        return pool, report

    def select(self, records: list[dict], seed: int) -> Selection:
        targets = self.targets()
        check_budget("got_d", self.budget, len(records))
        pool, domain_report = list(range(len(records))), {}
        if self.domain_field is not None:
            groups = group_domains(records, self.domain_field)
            if len(groups) < self.top_domains:
                raise ConfigError(f"selection.top_domains={self.top_domains}, but the pool has {len(groups)} "
                                  f"domain(s) in {self.domain_field!r} ({', '.join(map(str, groups))}). Lower "
                                  f"selection.top_domains, or set selection.domain_field=null.")
            largest = sum(sorted((len(v) for v in groups.values()), reverse=True)[: self.top_domains])
            if self.budget > largest:  # no choice of domains can meet the budget: say so before embedding
                raise ConfigError(f"selection=got_d: selection.budget={self.budget} is larger than any "
                                  f"{self.top_domains} domain(s) hold (at most {largest}). Raise "
                                  f"selection.top_domains (now {self.top_domains}, of {len(groups)} domains), or "
                                  f"lower selection.budget.")
        y = torch.nn.functional.normalize(self.embedder(targets).emb.float(), dim=1)
        if torch.cuda.is_available():
            y = y.cuda()
        if self.domain_field is not None:
            pool, domain_report = self.pick_domains(records, groups, y, seed)
        x = torch.nn.functional.normalize(self.embedder([records[i] for i in pool] if len(pool) < len(records)
                                                        else records).emb.float(), dim=1).to(y.device)
        scores, info = got_d_scores(x, y, self.epsilon, self.max_iter, self.tol)
        self._warn_unconverged(info, "candidates")
        scores = scores.cpu()
        # Most negative first; ties by pool position, so the result is deterministic.
        order = sorted(range(len(pool)), key=lambda i: (float(scores[i]), i))
        indices = sorted(pool[i] for i in order[: self.budget])
        full = [float("nan")] * len(records)  # examples of dropped domains have no score
        for j, i in enumerate(pool):
            full[i] = float(scores[j])
        report = {"method": "got_d", "pool": len(records), "budget": self.budget, "selected": len(indices),
                  "targets": len(targets), **info, "score_threshold": float(scores[order[self.budget - 1]]),
                  **domain_report}
        return Selection(indices, report, full, "calibrated OT gradient")
