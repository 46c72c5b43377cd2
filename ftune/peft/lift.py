"""LIFT (Liu et al., ICML 2025, arXiv 2506.00772; repo zihanghliu/LIFT, `src/sparseAdam.py`): fine-tune only the
"principal weights" of each linear layer, with a masked AdamW.

`peft` has no LIFT, so it is implemented here after the official code. For every selected weight W (m x n):
1. fp32 SVD W = U S Vᵀ and its rank-r_f approximation W' (the filter);
2. k = min((m + n) r, m n) entries (LoRA rank r's parameter count), the mask M = top-k of |W'|;
3. AdamW on W[M] only: gradient gathered to a length-k vector, moments stored as length-k vectors, decoupled weight
   decay only on W[M]; everything else stays bit-identical;
4. every `update_interval` steps M is recomputed from the current W; moments carry over for indices kept (scatter
   into a dense zero tensor, gather with the new mask), zeros for new ones; the step count is not reset.
Embeddings, the LM head, norms and biases are frozen. The result is a full model (saved as peft=none).
Adaptation: the mask is drawn at a parameter's first optimizer step; gradients are clipped densely by the loop, as
the official code's HF Trainer does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ftune.config import ConfigError
from ftune.peft.base import load_full_weights, selected_linears


def budget(m: int, n: int, rank: int) -> int:
    """k = min((m + n) r, m n): as many trainable entries as a rank-r LoRA of the same layer."""
    return min((m + n) * rank, m * n)


@torch.no_grad()
def principal_mask(w: torch.Tensor, filter_rank: int, k: int) -> torch.Tensor:
    """Flat indices of the k largest |entries| of W's rank-`filter_rank` approximation (sorted)."""
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    r = min(filter_rank, s.numel())
    approx = (u[:, :r] * s[:r]) @ vh[:r]
    return torch.topk(approx.abs().flatten(), k, sorted=False).indices.sort().values


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW (torch's update and bias correction) on the masked entries of each parameter only."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, rank: int,
                 filter_rank: int, update_interval: int):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, filter_rank=filter_rank,
                        update_interval=update_interval)
        super().__init__(params, defaults)

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every state tensor to a floating parameter's dtype; mask indices must stay integers (a float32
        # index is exact only below 2^24 entries).
        idx = {k: v["idx"].clone() for k, v in state_dict["state"].items() if "idx" in v}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for k, v in idx.items():
            self.state[params[int(k)]]["idx"] = v.to(params[int(k)].device)

    @staticmethod
    def _mask(p: torch.Tensor, group: dict) -> torch.Tensor:
        m, n = p.shape
        return principal_mask(p, group["filter_rank"], budget(m, n, group["rank"]))

    @torch.no_grad()
    def refresh(self, p: torch.Tensor, group: dict) -> None:
        """New mask from the current weight; moments carried over where old and new masks overlap."""
        st = self.state[p]
        new = self._mask(p, group)
        for key in ("exp_avg", "exp_avg_sq"):
            dense = torch.zeros(p.numel(), dtype=st[key].dtype, device=st[key].device)
            dense[st["idx"]] = st[key]
            st[key] = dense[new]
        st["idx"] = new

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["idx"] = self._mask(p, group)
                    st["exp_avg"] = torch.zeros(st["idx"].numel(), dtype=torch.float32, device=p.device)
                    st["exp_avg_sq"] = torch.zeros_like(st["exp_avg"])
                    st["step"] = torch.zeros((), dtype=torch.float32)
                idx, flat = st["idx"], p.view(-1)
                g = p.grad.view(-1)[idx].float()
                st["step"] += 1
                t = float(st["step"])
                st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (st["exp_avg_sq"].sqrt() / (1 - b2 ** t) ** 0.5).add_(group["eps"])
                w = flat[idx].float() * (1 - group["lr"] * group["weight_decay"])
                w.addcdiv_(st["exp_avg"], denom, value=-group["lr"] / (1 - b1 ** t))
                flat[idx] = w.to(p.dtype)
                if group["update_interval"] and int(t) % group["update_interval"] == 0:
                    self.refresh(p, group)
        return loss


class LIFT:
    """`peft=lift`: sparse fine-tuning of each selected linear layer's principal weights.

    Args:
        rank: r; each matrix trains k = min((m + n) r, m n) entries (the paper: 128).
        filter_rank: r_f, rank of the low-rank approximation whose largest entries are chosen (paper: 32-128).
        update_interval: optimizer steps between mask refreshes; 0 = never (paper: 400).
        target_modules: "all-linear" (every linear layer but the LM head) or a list of module names.
    """

    adapter = False
    name, instead = "lift", "peft=lora or dora"  # its peft= choice; what to use under an engine it cannot
    # Engines (dist.check_engine_limits) it cannot run under, and why: refused before the model loads.
    not_under = {e: "selects its trainable entries from each whole weight matrix inside its own optimizer step, and "
                    "the optimizer gets shards (FSDP2) or flattened partitions (DeepSpeed) instead"
                 for e in ("fsdp2", "zero2", "zero3")}
    aliases = {"r": "rank", "r_f": "filter_rank", "lra_rank": "filter_rank", "interval": "update_interval"}

    def __init__(self, rank: int = 128, filter_rank: int = 128, update_interval: int = 400,
                 target_modules: str | list = "all-linear"):
        if rank < 1 or filter_rank < 1:
            raise ConfigError(f"peft.rank={rank} and peft.filter_rank={filter_rank} must be >= 1.")
        if update_interval < 0:
            raise ConfigError(f"peft.update_interval={update_interval} must be >= 0 (0 = never refresh the mask).")
        if isinstance(target_modules, str) and target_modules != "all-linear":
            raise ConfigError(f"peft.target_modules={target_modules!r}: use all-linear or a list of module names.")
        self.rank, self.filter_rank, self.update_interval = rank, filter_rank, update_interval
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)

    def quantization_config(self, compute_dtype: torch.dtype):
        return None

    def apply(self, model: torch.nn.Module, gradient_checkpointing: bool = False) -> torch.nn.Module:
        layers = selected_linears(model, self.target_modules)
        model.requires_grad_(False)
        for lin in layers.values():
            lin.weight.requires_grad_(True)
        return model

    def build_optimizer(self, model: torch.nn.Module, t, lr_scale=None) -> MaskedAdamW:
        params = [p for p in model.parameters() if p.requires_grad]
        return MaskedAdamW(params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay,
                           rank=self.rank, filter_rank=self.filter_rank, update_interval=self.update_interval)

    def save(self, model: torch.nn.Module, directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)

    def load_trainable(self, model: torch.nn.Module, directory: Path) -> None:
        load_full_weights(model, directory)
