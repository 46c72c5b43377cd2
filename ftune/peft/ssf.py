"""SSF: Scaling & Shifting your Features (Lian et al., NeurIPS 2022, arXiv 2210.08823; repo dongzelian/SSF).

`peft` has no SSF, so it is implemented here. The paper inserts y = gamma * x + beta (per channel) after each operation
of a frozen ViT (qkv, attention projection, both MLP layers, the norms, the patch embedding), gamma ~ N(1, 0.02),
beta ~ N(0, 0.02), and folds them into the preceding layer for inference: W' = diag(gamma) W, b' = gamma * b + beta.

Adaptation for causal LMs: SSF on the outputs of the selected linear layers (default all but the LM head: q/k/v/o and
gate/up/down in a Llama block); norms and embeddings are not scaled. `init_std=0` starts exactly at the base model.
Merging folds gamma into the weight rows and beta into a bias; a Llama-style config gets `attention_bias` / `mlp_bias`
switched on (with zero biases where no shift was learned) so the merged model loads with transformers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ftune.config import ConfigError
from ftune.peft.base import load_trainable_file, save_trainable, selected_linears

# Llama-style config flags that give a family of linear layers a bias.
BIAS_FLAGS = {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp_bias": ("gate_proj", "up_proj",
                                                                                      "down_proj")}


class ScaleShift(torch.nn.Module):
    """A frozen linear layer followed by a per-output-channel scale (and shift): y = gamma * (W x + b) + beta."""

    def __init__(self, base: torch.nn.Linear, init_std: float, shift: bool):
        super().__init__()
        self.base = base
        dtype = base.weight.dtype if base.weight.is_floating_point() else torch.float32
        out, device = base.out_features, base.weight.device
        self.scale = torch.nn.Parameter(torch.empty(out, dtype=dtype, device=device).normal_(1.0, init_std)
                                        if init_std > 0 else torch.ones(out, dtype=dtype, device=device))
        self.shift = torch.nn.Parameter(torch.empty(out, dtype=dtype, device=device).normal_(0.0, init_std)
                                        if init_std > 0 else torch.zeros(out, dtype=dtype, device=device)) \
            if shift else None
        self.adapter_enabled = True  # off: the base layer alone (the reference of DPO-like objectives)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled:
            return self.base(x)
        y = self.base(x) * self.scale
        return y + self.shift if self.shift is not None else y

    @torch.no_grad()
    def folded(self) -> torch.nn.Linear:
        """The equivalent plain linear layer: W' = diag(gamma) W, b' = gamma * b + beta."""
        w = self.base.weight
        bias = self.base.bias is not None or self.shift is not None
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias, device=w.device, dtype=w.dtype)
        lin.weight.copy_(self.scale[:, None].to(w.dtype) * w)
        if bias:
            b = self.base.bias * self.scale if self.base.bias is not None else torch.zeros_like(self.scale)
            lin.bias.copy_((b + self.shift if self.shift is not None else b).to(w.dtype))
        return lin


def _replace(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class SSF:
    """`peft=ssf`: trained per-channel scale and shift after the selected linear layers of a frozen model.

    Args:
        target_modules: "all-linear" (every linear layer but the LM head) or a list of module names.
        init_std: gamma ~ N(1, init_std), beta ~ N(0, init_std) (the paper: 0.02); 0 = identity (the base model).
        shift: learn beta as well as gamma (false: scale only, mergeable into any architecture).
    """

    adapter = True
    aliases = {"target": "target_modules", "std": "init_std"}

    def __init__(self, target_modules: str | list = "all-linear", init_std: float = 0.02, shift: bool = True):
        if init_std < 0:
            raise ConfigError(f"peft.init_std={init_std} must be >= 0 (0 = start at the base model).")
        if isinstance(target_modules, str) and target_modules != "all-linear":
            raise ConfigError(f"peft.target_modules={target_modules!r}: use all-linear or a list of module names.")
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.init_std, self.shift = init_std, shift

    def quantization_config(self, compute_dtype: torch.dtype):
        return None

    def apply(self, model: torch.nn.Module, gradient_checkpointing: bool = False) -> torch.nn.Module:
        layers = selected_linears(model, self.target_modules)
        model.requires_grad_(False)
        for name, lin in layers.items():
            _replace(model, name, ScaleShift(lin, self.init_std, self.shift))
        return model

    def save(self, model: torch.nn.Module, directory: Path) -> None:
        save_trainable(model, directory)

    def load_trainable(self, model: torch.nn.Module, directory: Path) -> None:
        load_trainable_file(model, directory)

    def merge(self, base: torch.nn.Module, directory: Path) -> torch.nn.Module:
        """Fold the trained gamma / beta of `directory` into `base`'s linear layers."""
        model = self.apply(base)
        self.load_trainable(model, directory)
        folded = {n: m for n, m in model.named_modules() if isinstance(m, ScaleShift)}
        biased = {n.rsplit(".", 1)[-1] for n, m in folded.items() if m.shift is not None and m.base.bias is None}
        flags = {f for f, names in BIAS_FLAGS.items() if biased & set(names)}
        other = biased - {n for f in flags for n in BIAS_FLAGS[f]}
        if other or not all(hasattr(model.config, f) for f in flags):
            raise ConfigError(f"the SSF shift on {sorted(biased)} needs a bias there, which this architecture "
                              f"({type(model).__name__}) cannot be configured to have. Train with peft.shift=false to "
                              f"get a mergeable model, or load the run unmerged (ftune eval/generate run_dir=...).")
        for name, m in folded.items():
            _replace(model, name, m.folded())
        for flag in flags:  # the config now promises a bias on every layer of the family: zeros where none was learned
            setattr(model.config, flag, True)
            for name, m in list(model.named_modules()):
                if isinstance(m, torch.nn.Linear) and m.bias is None and name.rsplit(".", 1)[-1] in BIAS_FLAGS[flag]:
                    m.bias = torch.nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype,
                                                            device=m.weight.device))
        return model.requires_grad_(True)
