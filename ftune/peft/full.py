"""Full fine-tuning: every parameter trains; checkpoints are plain `save_pretrained` directories."""

from __future__ import annotations

from pathlib import Path

import torch

from ftune.config import ConfigError
from ftune.peft.base import load_full_weights


class FullFineTune:
    """`peft=none`. Quantized (frozen) base weights cannot be trained, so `quantize` is refused."""

    adapter = False

    def __init__(self, quantize: str | None = None):
        if quantize:
            raise ConfigError(f"peft=none (full fine-tuning) with peft.quantize={quantize}: quantized weights cannot "
                              f"be trained directly. Use peft=qlora (LoRA on a {quantize} base) or drop quantize.")

    def quantization_config(self, compute_dtype: torch.dtype):
        return None

    def apply(self, model: torch.nn.Module, gradient_checkpointing: bool = False) -> torch.nn.Module:
        model.requires_grad_(True)
        return model

    def save(self, model: torch.nn.Module, directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)

    def load_trainable(self, model: torch.nn.Module, directory: Path) -> None:
        load_full_weights(model, directory)
