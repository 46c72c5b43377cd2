"""DEALRec: Lin et al., "Data-efficient Fine-tuning for LLM-based Recommendation", SIGIR 2024, arXiv 2401.17197.

Paper and code (`Linxyhaha/DEALRec` `code/prune/`):
1. influence I(s) of removing example s on a surrogate model's empirical risk, through one parameter tensor:
   v = mean training gradient, H^-1 v by LiSSA (h <- v + (1 - damp) h - H_z h / scale over T random single examples,
   Hessian-vector products by double backprop; H^-1 v ~ h / scale), then I(s) = (H^-1 v)^T grad L(s) (the
   "symmetric" trick: one inverse-HVP for all examples);
2. effort E(s) = ||grad_phi L_LLM(s)||_2 for one last-layer tensor phi of the LLM;
3. score = minmax(I) + lambda * minmax(E);
4. coverage-enhanced sampling: sort by score, drop the top `hard_prune` fraction, cut the remaining score range into
   `strata` equal-width strata, and repeatedly take the stratum with the fewest examples, drawing
   min(|G|, floor(m / strata left)) of it uniformly.

Adaptations (the paper's surrogate is a SASRec recommender trained on all sequences; ours is a language model):
- the surrogate is `selection.surrogate` (default the training model) as it is, not first trained on the pool;
- the influence tensor defaults to the last layer's MLP down-projection, the effort tensor to the last layer's
  attention value projection (the paper: `v_proj.lora_B` of the last layer; we have no adapter yet at selection time);
- if the strata leave the budget unmet (a floor can fall short when a large stratum comes last), the rest is drawn
  uniformly from the unpicked, non-pruned examples, so the budget is exact;
- cost: two per-example backward passes over the pool plus `lissa_steps` double-backward passes.
"""

from __future__ import annotations

import logging
import math

import torch

from ftune.config import ConfigError
from ftune.selection.common import Selection, check_budget, kept

log = logging.getLogger(__name__)


def minmax(x: torch.Tensor) -> torch.Tensor:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


def lissa(v: torch.Tensor, hvp, steps: int, damp: float, scale: float) -> torch.Tensor:
    """LiSSA estimate of H^-1 v: h <- v + (1 - damp) h - hvp(t, h) / scale, returned as h / scale.

    Its fixed point is (H + damp * scale * I)^-1 v; `hvp(t, h)` is the Hessian of the t-th sampled example times h.
    """
    h = v.clone()
    for t in range(steps):
        h = v + (1 - damp) * h - hvp(t, h) / scale
        if not torch.isfinite(h).all():
            raise FloatingPointError(f"LiSSA diverged at step {t}; raise selection.scale or selection.damp.")
    return h / scale


def coverage_sample(scores: list[float], m: int, strata: int, hard_prune: float, gen: torch.Generator) -> list[int]:
    """DEALRec's coverage-enhanced sampling of m indices (see the module docstring); ascending indices."""
    n = len(scores)
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    pruned = min(int(n * hard_prune), n - m)  # never prune so much that the budget cannot be met
    pool = order[pruned:]
    lo, hi = min(scores[i] for i in pool), max(scores[i] for i in pool)
    width = (hi - lo) / strata
    groups: dict[int, list[int]] = {}
    for i in pool:
        g = min(int((scores[i] - lo) / width), strata - 1) if width > 0 else 0
        groups.setdefault(g, []).append(i)
    left = sorted(groups.values(), key=lambda g: (len(g), g[0]))
    chosen: list[int] = []
    while left and m > 0:
        g = left.pop(0)
        take = min(len(g), m // (len(left) + 1))
        pick = torch.randperm(len(g), generator=gen)[:take].tolist()
        chosen += [g[j] for j in pick]
        m -= take
        left.sort(key=lambda g: (len(g), g[0]))
    if m > 0:  # top up from what the strata left (adaptation: keeps the budget exact)
        rest = sorted(set(pool) - set(chosen))
        chosen += [rest[j] for j in torch.randperm(len(rest), generator=gen)[:m].tolist()]
    return sorted(chosen)


def pick_param(model, name: str | None, prefer: str, key: str) -> str:
    params = dict(model.named_parameters())
    if name is not None:
        if name not in params:
            import difflib

            close = difflib.get_close_matches(name, list(params), n=3)
            raise ConfigError(f"selection.{key}={name}: the model has no such parameter. Close names: {close}.")
        return name
    last = f"layers.{model.config.num_hidden_layers - 1}."
    candidates = [n for n, p in params.items() if p.ndim == 2 and last in n]
    if not candidates:
        raise ConfigError(f"selection.{key}: cannot find the last layer's weights ('{last}'); name a parameter.")
    return next((n for n in candidates if prefer in n), candidates[-1])


class DEALRec:
    """selection=dealrec. Args are the keys of configs/selection/dealrec.yaml."""

    def __init__(self, budget: int, surrogate: str = "tiny_random", llm: str | None = None, lam: float = 1.0,
                 hard_prune: float = 0.1, strata: int = 25, lissa_steps: int = 100, damp: float = 0.01,
                 scale: float = 25.0, influence_param: str | None = None, effort_param: str | None = None,
                 max_length: int = 512, progress: bool = True):
        if budget < 1:
            raise ConfigError(f"selection.budget={budget} must be >= 1.")
        if not 0 <= hard_prune < 1:
            raise ConfigError(f"selection.hard_prune={hard_prune} must be in [0, 1).")
        if strata < 1 or lissa_steps < 0 or scale <= 0 or not 0 <= damp < 1:
            raise ConfigError(f"selection: strata={strata} must be >= 1, lissa_steps={lissa_steps} >= 0, "
                              f"scale={scale} > 0 and damp={damp} in [0, 1).")
        self.budget, self.surrogate, self.llm = budget, surrogate, llm or surrogate
        self.lam, self.hard_prune, self.strata = lam, hard_prune, strata
        self.lissa_steps, self.damp, self.scale = lissa_steps, damp, scale
        self.influence_param, self.effort_param = influence_param, effort_param
        self.max_length, self.progress = max_length, progress

    def __call__(self, records: list[dict], seed: int) -> tuple[list[dict], dict]:
        return kept(records, self.select(records, seed))

    def _load(self, name: str):
        from transformers import AutoModelForCausalLM

        from ftune.models.loading import load_tokenizer, resolve_model_dir

        model_dir = resolve_model_dir(name)
        # Eager attention: Hessian-vector products need a double backward, which fused kernels may lack.
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device).eval().requires_grad_(False)
        return model, load_tokenizer(model_dir), device

    def _batches(self, records, tok, device):
        from ftune.data.tokenize import tokenize_conversation

        for r in records:
            ids, labels = tokenize_conversation(tok, r["messages"])
            yield (torch.tensor([ids[: self.max_length]], device=device),
                   torch.tensor([labels[: self.max_length]], device=device))

    @staticmethod
    def _loss(model, ids, labels):
        if not (labels[0, 1:] != -100).any():
            return None
        return model(input_ids=ids, labels=labels, use_cache=False).loss

    def hvp(self, model, phi, ids, labels, h):
        """Hessian of one example's loss w.r.t. phi, times h (double backprop)."""
        phi.requires_grad_(True)
        try:
            loss = self._loss(model, ids, labels)
            if loss is None:
                return torch.zeros_like(h)
            (g,) = torch.autograd.grad(loss, phi, create_graph=True)
            (hv,) = torch.autograd.grad((g * h).sum(), phi)
            return hv
        finally:
            phi.requires_grad_(False)

    def per_example_grads(self, model, params, records, tok, device, fn):
        """Call fn(i, [grad of example i's mean response loss w.r.t. each of params]) for every example."""
        from tqdm.auto import tqdm

        for p in params:
            p.requires_grad_(True)
        items = zip(range(len(records)), self._batches(records, tok, device))
        for i, (ids, labels) in tqdm(items, total=len(records), desc="Per-example gradients",
                                     disable=not self.progress):
            loss = self._loss(model, ids, labels)
            grads = torch.autograd.grad(loss, params) if loss is not None else [torch.zeros_like(p) for p in params]
            fn(i, grads)
        for p in params:
            p.requires_grad_(False)

    def scores(self, records: list[dict], seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(influence, effort) per example and the parameter names used."""
        n = len(records)
        model, tok, device = self._load(self.surrogate)
        llm, llm_tok = (model, tok) if self.llm == self.surrogate else self._load(self.llm)[:2]
        inf_name = pick_param(model, self.influence_param, "down_proj", "influence_param")
        eff_name = pick_param(llm, self.effort_param, "v_proj", "effort_param")
        phi = dict(model.named_parameters())[inf_name]
        psi = dict(llm.named_parameters())[eff_name]
        effort = torch.zeros(n, dtype=torch.float64)
        v = torch.zeros_like(phi)
        if llm is model:
            def first(i, g):
                v.add_(g[0] / n)
                effort[i] = float(g[1].norm())
            self.per_example_grads(model, [phi, psi], records, tok, device, first)
        else:
            self.per_example_grads(model, [phi], records, tok, device, lambda i, g: v.add_(g[0] / n))
            self.per_example_grads(llm, [psi], records, llm_tok, device,
                                   lambda i, g: effort.__setitem__(i, float(g[0].norm())))
        gen = torch.Generator().manual_seed(seed)
        sample = torch.randint(n, (self.lissa_steps,), generator=gen).tolist()
        encoded = list(self._batches(records, tok, device))

        def hvp(t, h):
            return self.hvp(model, phi, *encoded[sample[t]], h)

        inv_hvp = lissa(v, hvp, self.lissa_steps, self.damp, self.scale)
        influence = torch.zeros(n, dtype=torch.float64)
        self.per_example_grads(model, [phi], records, tok, device,
                               lambda i, g: influence.__setitem__(i, float((inv_hvp * g[0]).sum())))
        return influence, effort, {"influence_param": inf_name, "effort_param": eff_name}

    def select(self, records: list[dict], seed: int) -> Selection:
        check_budget("dealrec", self.budget, len(records))
        influence, effort, names = self.scores(records, seed)
        score = minmax(influence) + self.lam * minmax(effort)
        gen = torch.Generator().manual_seed(seed)
        indices = coverage_sample(score.tolist(), self.budget, self.strata, self.hard_prune, gen)
        report = {"method": "dealrec", "pool": len(records), "budget": self.budget, "selected": len(indices),
                  "lambda": self.lam, "hard_pruned": min(int(len(records) * self.hard_prune),
                                                          len(records) - self.budget),
                  "strata": self.strata, "lissa_steps": self.lissa_steps, **names,
                  "influence_mean": float(influence.mean()), "effort_mean": float(effort.mean())}
        if not math.isfinite(report["influence_mean"]):
            raise FloatingPointError("DEALRec influence scores are not finite; raise selection.scale.")
        return Selection(indices, report, score.tolist(), "score = minmax(influence) + lambda minmax(effort)")
