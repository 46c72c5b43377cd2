"""AdaLink (Wang et al., arXiv 2310.12100): a non-intrusive low-rank adapter on the input embeddings.

`peft` has no AdaLink, so it is implemented here. The paper adds h' = h + W_up(W_down h) (W_down: d -> r, W_up: r -> d)
between the token embeddings and the first transformer block, with separate weights per modality and per task, and
leaves the backbone untouched. Whether a nonlinearity sits between the projections could not be verified.

Adaptation: text only (one adapter), a forward hook on `get_input_embeddings()`; W_up starts at zero so training
starts exactly at the base model; `activation` is configurable (default none). With no activation the adapter is
linear in h, so `ftune merge` folds it into the embedding table (E' = E + E W_downᵀ W_upᵀ) and unties a tied LM head,
which keeps the original E.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ftune.config import ConfigError
from ftune.peft.base import ADAPTER_FILE, load_trainable_file, save_trainable

ACTIVATIONS = {"none": torch.nn.Identity, "relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU}


class InputAdapter(torch.nn.Module):
    """h + up(act(down(h))) on the token embeddings; `up` is zero-initialised."""

    def __init__(self, dim: int, rank: int, activation: str, dtype: torch.dtype, device):
        super().__init__()
        self.down = torch.nn.Linear(dim, rank, bias=False, dtype=dtype, device=device)
        self.act = ACTIVATIONS[activation]()
        self.up = torch.nn.Linear(rank, dim, bias=False, dtype=dtype, device=device)
        torch.nn.init.zeros_(self.up.weight)
        self.adapter_enabled = True  # off: the embeddings unchanged (the reference of DPO-like objectives)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled:
            return h
        return h + self.up(self.act(self.down(h)))

    def hook(self, module, inputs, output):  # a bound method, so a deep copy of the model hooks its own copy
        return self(output)


class AdaLink:
    """`peft=adalink`: a trained low-rank residual adapter between the token embeddings and the first block.

    Args:
        r: bottleneck rank (the paper's value was not found; the default 16 is ftune's).
        activation: none (linear, mergeable) | relu | gelu | silu between the projections.
    """

    adapter = True
    aliases = {"rank": "r", "act": "activation"}

    def __init__(self, r: int = 16, activation: str = "none"):
        if r < 1:
            raise ConfigError(f"peft.r={r} must be >= 1.")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"peft.activation={activation!r} must be one of {', '.join(ACTIVATIONS)}.")
        self.r, self.activation = r, activation

    def quantization_config(self, compute_dtype: torch.dtype):
        return None

    def apply(self, model: torch.nn.Module, gradient_checkpointing: bool = False) -> torch.nn.Module:
        emb = model.get_input_embeddings()
        dim = emb.embedding_dim  # not the weight's shape: ZeRO-3 leaves an empty placeholder there
        if self.r > dim:
            raise ConfigError(f"peft.r={self.r} is larger than the embedding width {dim}. Use peft.r<={dim}.")
        model.requires_grad_(False)
        model.adalink = InputAdapter(dim, self.r, self.activation, emb.weight.dtype, emb.weight.device)
        emb.register_forward_hook(model.adalink.hook)
        return model

    def save(self, model: torch.nn.Module, directory: Path) -> None:
        save_trainable(model, directory)

    def load_trainable(self, model: torch.nn.Module, directory: Path) -> None:
        load_trainable_file(model, directory)

    @torch.no_grad()
    def merge(self, base: torch.nn.Module, directory: Path) -> torch.nn.Module:
        """E' = E + (E W_downᵀ) W_upᵀ, row by row of the embedding table; a tied LM head keeps E."""
        if self.activation != "none":
            raise ConfigError(f"peft=adalink with activation={self.activation} is not linear in the embedding, so it "
                              f"cannot be folded into the embedding table. Load the run unmerged (ftune eval/generate "
                              f"run_dir=...), or train with peft.activation=none.")
        state = load_file(Path(directory) / ADAPTER_FILE)
        down, up = state["adalink.down.weight"].float(), state["adalink.up.weight"].float()
        emb, head = base.get_input_embeddings(), base.get_output_embeddings()
        if head is not None and head.weight is emb.weight:  # untie: the head keeps the original table
            head.weight = torch.nn.Parameter(emb.weight.detach().clone())
            base.config.tie_word_embeddings = False
            if hasattr(base.config, "get_text_config"):
                base.config.get_text_config().tie_word_embeddings = False
        e = emb.weight.float()
        emb.weight = torch.nn.Parameter((e + (e @ down.T) @ up.T).to(emb.weight.dtype))
        return base
