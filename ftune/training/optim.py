"""AdamW with decoupled weight decay (not on biases and norms) and a warm-up + decay schedule."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


def build_optimizer(model: torch.nn.Module, t, lr_scale: Callable[[str], float] | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; `lr_scale(name)` (a PEFT method's, e.g. LoRA+) multiplies one's lr."""
    groups: dict[tuple[bool, float], list] = {(True, 1.0): [], (False, 1.0): []}  # (weight decay?, lr scale)
    for name, p in model.named_parameters():
        if p.requires_grad:
            # Under DeepSpeed ZeRO-3 each rank holds an empty placeholder (shape [0]) and the real shape is ds_shape:
            # by p.ndim every weight would be left without decay.
            decay = not (len(getattr(p, "ds_shape", p.shape)) < 2 or "norm" in name.lower())
            groups.setdefault((decay, lr_scale(name) if lr_scale else 1.0), []).append(p)
    if not any(groups.values()):
        raise RuntimeError("the model has no trainable parameters; check the peft config.")
    params = [p for ps in groups.values() for p in ps]
    # torch's fused AdamW kernel: one pass over each tensor instead of a dozen element-wise ops (the default on a CPU
    # loops over the tensors one op at a time): 0.065 vs 0.29 s per step for SmolLM2-135M's 134.5M weights on 2
    # cores, the same update to float rounding.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW([{"params": ps, "weight_decay": t.weight_decay if decay else 0.0, "lr": t.lr * scale}
                              for (decay, scale), ps in groups.items() if ps],
                             lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps, fused=fused or None)


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the peak lr at each step: linear warm-up, then cosine / linear decay to 0, or constant."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, t, total_steps: int):
    warmup = t.warmup_steps if t.warmup_steps > 0 else int(round(t.warmup_ratio * total_steps))
    if warmup >= total_steps:
        log.warning("trainer.warmup_steps=%d covers the whole run of %d steps: the learning rate only climbs, to "
                    "%.3g of trainer.lr at the last step, and never decays. Lower trainer.warmup_steps (or use "
                    "trainer.warmup_ratio).", warmup, total_steps, total_steps / (warmup + 1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.scheduler, warmup, total_steps))
