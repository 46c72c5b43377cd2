"""AdamW with decoupled weight decay (not on biases and norms) and a warm-up + decay schedule."""

from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, t) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    if not decay and not no_decay:
        raise RuntimeError("the model has no trainable parameters; check the peft config.")
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps)


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
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.scheduler, warmup, total_steps))
