"""Helpers shared by PEFT methods: parameter counts and loading full-model weights back for resume."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights are counted by their logical size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * 2 if p.__class__.__name__ == "Params4bit" else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def load_full_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load save_pretrained safetensors (possibly sharded) into `model`; only tied weights may be absent."""
    state = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(f))
    if not state:
        raise FileNotFoundError(f"no *.safetensors weights in {directory}")
    result = model.load_state_dict(state, strict=False)
    tied = {k for k in result.missing_keys if "lm_head" in k or "embed" in k}
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise RuntimeError(f"weights in {directory} do not match the model: missing {result.missing_keys[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
