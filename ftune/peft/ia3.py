"""(IA)^3 through the `peft` library (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
than In-Context Learning", arXiv 2205.05638).

Learned vectors rescale activations: keys and values (l_k, l_v on the outputs of k_proj / v_proj) and the FFN
intermediate activation (l_ff on the input of down_proj), all initialised to ones, so training starts at the base
model. Merging multiplies them into the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ftune.config import ConfigError
from ftune.peft.base import check_targets, load_adapter_weights, merge_peft_adapter, save_adapter


class IA3:
    """`peft=ia3`: per-channel scaling vectors on a frozen base.

    Args:
        target_modules: module names whose activations are rescaled (the paper: keys, values, FFN intermediate).
        feedforward_modules: the subset of `target_modules` scaled on their input (FFN) instead of their output.
        quantize: null | 4bit | 8bit for the frozen base (as peft=qlora).
    """

    adapter = True
    aliases = {"target": "target_modules", "ff_modules": "feedforward_modules"}

    def __init__(self, target_modules: list = ("k_proj", "v_proj", "down_proj"),
                 feedforward_modules: list = ("down_proj",), quantize: str | None = None):
        self.target_modules, self.feedforward_modules = list(target_modules), list(feedforward_modules)
        extra = [m for m in self.feedforward_modules if m not in self.target_modules]
        if extra:
            raise ConfigError(f"peft.feedforward_modules {extra} are not in peft.target_modules "
                              f"{self.target_modules}; add them there or remove them.")
        if quantize not in (None, "4bit", "8bit"):
            raise ConfigError(f"peft.quantize={quantize!r} must be null, 4bit or 8bit.")
        self.quantize = quantize

    def quantization_config(self, compute_dtype: torch.dtype):
        from ftune.peft.lora import bnb_config

        return bnb_config(self.quantize, compute_dtype)

    def apply(self, model: torch.nn.Module, gradient_checkpointing: bool = False) -> torch.nn.Module:
        from peft import IA3Config, get_peft_model, prepare_model_for_kbit_training

        check_targets(model, self.target_modules)
        if self.quantize:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        config = IA3Config(target_modules=self.target_modules, feedforward_modules=self.feedforward_modules,
                           task_type="CAUSAL_LM")
        return get_peft_model(model, config)

    def save(self, model: torch.nn.Module, directory: Path) -> None:
        save_adapter(model, directory)

    def load_trainable(self, model: torch.nn.Module, directory: Path) -> None:
        load_adapter_weights(model, directory)

    def merge(self, base: torch.nn.Module, directory: Path) -> torch.nn.Module:
        """Fold the vectors into the weights: rows of k/v (output scaling), columns of down_proj (input scaling)."""
        return merge_peft_adapter(base, directory)
