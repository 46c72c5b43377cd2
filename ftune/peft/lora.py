"""LoRA and QLoRA through the `peft` library (Hu et al. 2022; Dettmers et al. 2023)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ftune.config import ConfigError


class LoRA:
    """`peft=lora` / `peft=qlora`: a LoRA adapter on a frozen (optionally bitsandbytes-quantized) base.

    Args:
        r: rank of A and B.
        alpha: scale numerator; the update is (alpha / r) B A.
        dropout: dropout on the adapter input.
        target_modules: "all-linear" or a list of module names (e.g. [q_proj, v_proj]).
        bias: none | all | lora_only.
        quantize: null | 4bit (NF4 + double quantization) | 8bit (LLM.int8) for the frozen base.
    """

    adapter = True
    # Names other tools use for these keys, for "did you mean" hints.
    aliases = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target": "target_modules"}

    def __init__(self, r: int = 16, alpha: float = 32, dropout: float = 0.05,
                 target_modules: str | list = "all-linear", bias: str = "none", quantize: str | None = None):
        if r < 1:
            raise ConfigError(f"peft.r={r} must be >= 1.")
        if not 0 <= dropout < 1:
            raise ConfigError(f"peft.dropout={dropout} must be in [0, 1).")
        if bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"peft.bias={bias!r} must be none, all or lora_only.")
        if quantize not in (None, "4bit", "8bit"):
            raise ConfigError(f"peft.quantize={quantize!r} must be null, 4bit or 8bit.")
        self.r, self.alpha, self.dropout, self.bias, self.quantize = r, alpha, dropout, bias, quantize
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)

    def quantization_config(self, compute_dtype: torch.dtype):
        if self.quantize is None:
            return None
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(f"peft.quantize={self.quantize} needs bitsandbytes: pip install 'ftune[quant]'.") \
                from None
        from transformers import BitsAndBytesConfig

        if self.quantize == "8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)

    def _check_targets(self, model: torch.nn.Module) -> None:
        if isinstance(self.target_modules, str):
            return
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        unknown = [t for t in self.target_modules if t not in names]
        if unknown:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise ConfigError(f"peft.target_modules {unknown} match no module of this model. Its linear layers are: "
                              f"{', '.join(linear)} (or use target_modules=all-linear).")

    def apply(self, model: torch.nn.Module, gradient_checkpointing: bool = False) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        self._check_targets(model)
        if self.quantize:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        config = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, bias=self.bias,
                            target_modules=self.target_modules, task_type="CAUSAL_LM")
        return get_peft_model(model, config)

    def save(self, model: torch.nn.Module, directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)

    def load_trainable(self, model: torch.nn.Module, directory: Path) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(Path(directory) / "adapter_model.safetensors"))
        if result.unexpected_keys:
            raise RuntimeError(f"adapter in {directory} does not match this model: {result.unexpected_keys[:5]}")
