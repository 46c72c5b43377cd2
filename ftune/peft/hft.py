"""HFT, Half Fine-Tuning (Hui et al., ACL 2025, arXiv 2404.18466): full fine-tuning of half the parameters, chosen at
category level, the other half frozen (no gradient, no optimizer state).

`peft` has no HFT and no official code was found, so it is implemented here after the paper's description as
summarised in METHODS.md §7: in every transformer layer 2 of the 4 attention matrices (W_Q, W_K, W_V, W_O) train; of
the FFN matrices (W_gate, W_up, W_down) a random half of the layers train 2 and the other half 1 (50 % overall); half
the norms train; embeddings and the LM head train. Adaptation: "half the norms" is one of the two norms of each
layer (the final norm trains with the head); biases follow their weight; the selection is drawn from `seed` once per
run (`reselect=run`: one ftune run is one stage of the paper's sequential training) or anew at every epoch
(`reselect=epoch`, from `seed + epoch`). With `reselect=epoch` the optimizer holds every candidate matrix; a frozen one
has no gradient, so AdamW leaves it (and its moments) untouched until it is selected again.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ftune.config import ConfigError
from ftune.peft.base import load_full_weights
from ftune.training.optim import build_optimizer


def select(n_layers: int, attention: list, ffn: list, norms: list, seed: int) -> dict[int, list[str]]:
    """Per layer index, the module names (last component) that train."""
    g = torch.Generator().manual_seed(seed)

    def pick(names: list, k: int) -> list[str]:
        return [names[i] for i in sorted(torch.randperm(len(names), generator=g)[:k].tolist())]

    two_ffn = set(torch.randperm(n_layers, generator=g)[: n_layers // 2].tolist())
    return {i: pick(attention, len(attention) // 2) + pick(ffn, 2 if i in two_ffn else 1)
            + pick(norms, len(norms) // 2) for i in range(n_layers)}


class HFT:
    """`peft=hft`: half of each layer's matrices and norms train (full weights saved, as peft=none).

    Args:
        attention: the attention projections of a layer (half of them train).
        ffn: the FFN matrices of a layer (2 in half the layers, 1 in the others).
        norms: the norms of a layer (half of them train).
        train_embeddings: train the token embeddings, the LM head and the final norm (the paper: yes).
        seed: seed of the selection.
        reselect: run (one selection for the whole run) | epoch (a new half at every epoch, seeded by seed + epoch).
    """

    adapter = False
    LAYER = re.compile(r"\.layers\.(\d+)\.")

    def __init__(self, attention: list = ("q_proj", "k_proj", "v_proj", "o_proj"),
                 ffn: list = ("gate_proj", "up_proj", "down_proj"),
                 norms: list = ("input_layernorm", "post_attention_layernorm"), train_embeddings: bool = True,
                 seed: int = 0, reselect: str = "run"):
        if len(ffn) != 3:
            raise ConfigError(f"peft.ffn={list(ffn)}: HFT's FFN rule (2 of 3 in half the layers, 1 of 3 in the "
                              f"others) needs exactly three FFN matrices per layer.")
        self.attention, self.ffn, self.norms = list(attention), list(ffn), list(norms)
        if reselect not in ("run", "epoch"):
            raise ConfigError(f"peft.reselect={reselect!r} must be run or epoch.")
        self.train_embeddings, self.seed, self.reselect = train_embeddings, seed, reselect
        self.selection: dict[int, list[str]] = {}
        self.layers: dict[int, dict[str, torch.nn.Module]] = {}
        self.epoch = 0

    def quantization_config(self, compute_dtype: torch.dtype):
        return None

    def apply(self, model: torch.nn.Module, gradient_checkpointing: bool = False) -> torch.nn.Module:
        layers: dict[int, dict[str, torch.nn.Module]] = {}
        for name, m in model.named_modules():
            found = self.LAYER.search(name + ".")
            leaf = name.rsplit(".", 1)[-1]
            if found and leaf in self.attention + self.ffn + self.norms:
                layers.setdefault(int(found.group(1)), {})[leaf] = m
        wanted = set(self.attention + self.ffn + self.norms)
        if not layers or any(set(mods) != wanted for mods in layers.values()):
            seen = sorted({leaf for mods in layers.values() for leaf in mods})
            raise ConfigError(f"peft=hft expects every layer (`.layers.N.`) to hold {sorted(wanted)}; found "
                              f"{seen or 'no such layers'}. Set peft.attention / peft.ffn / peft.norms to this "
                              f"model's module names.")
        self.layers = layers
        model.requires_grad_(False)
        self._select(0)
        if self.train_embeddings:
            for m in (model.get_input_embeddings(), model.get_output_embeddings()):
                if m is not None:
                    m.requires_grad_(True)
            for name, m in model.named_modules():
                if "norm" in name.rsplit(".", 1)[-1].lower() and not self.LAYER.search(name + "."):
                    m.requires_grad_(True)  # the final norm
        return model

    def _select(self, epoch: int) -> None:
        """Freeze every candidate, then unfreeze the half drawn for `epoch` (always epoch 0 with reselect=run)."""
        self.epoch = epoch if self.reselect == "epoch" else 0
        self.selection = select(len(self.layers), self.attention, self.ffn, self.norms, self.seed + self.epoch)
        for i, mods in self.layers.items():
            for leaf, m in mods.items():
                m.requires_grad_(leaf in self.selection[i])

    def build_optimizer(self, model: torch.nn.Module, t, lr_scale=None) -> torch.optim.Optimizer:
        """AdamW as usual; with reselect=epoch over every candidate too, so a later epoch's half can train."""
        if self.reselect == "run":
            return build_optimizer(model, t, lr_scale)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("peft.reselect=epoch changes which weights train during the run, which DDP cannot "
                              "follow across processes. Use one process, or peft.reselect=run.")
        frozen = [m for mods in self.layers.values() for m in mods.values() if not next(m.parameters()).requires_grad]
        for m in frozen:
            m.requires_grad_(True)
        try:
            return build_optimizer(model, t, lr_scale)
        finally:
            for m in frozen:
                m.requires_grad_(False)

    def before_step(self, run) -> None:
        """reselect=epoch: draw the new epoch's half when the loop enters it (also right after a resume)."""
        epoch = int(run.order.epoch_of(run.step))
        if self.reselect == "epoch" and epoch != self.epoch:
            self._select(epoch)

    def save(self, model: torch.nn.Module, directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)

    def load_trainable(self, model: torch.nn.Module, directory: Path) -> None:
        load_full_weights(model, directory)
