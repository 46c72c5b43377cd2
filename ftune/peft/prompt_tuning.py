"""Prompt tuning through the `peft` library (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning", arXiv 2104.08691): `num_virtual_tokens` trained embeddings are prepended to every input; the model is frozen.

Adaptation: ftune's training forwards pass `position_ids` (which `peft` drops for prompt tuning, with a warning) and
`logits_to_keep` / hidden states indexed by input position. Two hooks on the wrapped model keep those calls aligned
with the inputs: the kept positions are shifted past the virtual tokens on the way in, and the virtual positions are
cut from the logits and hidden states on the way out. Packed rows are refused (the prompt would precede only the first
sequence of a row). A prompt cannot be merged into weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ftune.config import ConfigError
from ftune.peft.base import load_adapter_weights, save_adapter

INITS = {"random": "RANDOM", "sample_vocab": "SAMPLE_VOCAB", "text": "TEXT"}


def _aligned(model, n: int) -> None:
    """Make a prompt-tuned `peft` model's outputs line up with its input positions (see the module docstring)."""

    cut = [False]  # whether the current call asked for whole-sequence logits

    def before(module, args, kwargs):
        if module._adapters_disabled:
            return args, kwargs
        pos = kwargs.pop("position_ids", None)
        if pos is not None:
            ramp = torch.arange(pos.shape[1], device=pos.device)
            if not bool((pos == ramp).all()):
                raise RuntimeError("prompt tuning needs one sequence per row, but position_ids restart inside a row "
                                   "(packed rows). Set data.packing=false and use an objective that keeps one "
                                   "sequence per row (e.g. objective=sft).")
        keep = kwargs.get("logits_to_keep")
        if isinstance(keep, torch.Tensor):
            kwargs["logits_to_keep"] = keep + n
        cut[0] = not isinstance(keep, torch.Tensor) and not keep
        return args, kwargs

    def after(module, args, kwargs, out):
        if module._adapters_disabled:
            return out
        if cut[0] and out.logits is not None:
            out.logits = out.logits[:, n:]
        if out.hidden_states is not None:
            out.hidden_states = tuple(h[:, n:] for h in out.hidden_states)
        return out

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True)


class PromptTuning:
    """`peft=prompt_tuning`: trained soft-prompt embeddings before every input.

    Args:
        num_virtual_tokens: length of the soft prompt.
        init: random (soft tokens sampled at random) | sample_vocab (embeddings of random vocabulary tokens, the
            paper's "sampled vocab") | text (the embeddings of `init_text`, repeated or cut to length).
        init_text: the text for init=text (e.g. a task instruction).
    """

    adapter = True
    # peft computes the soft prompt to save with a forward of its prompt encoder, which under ZeRO-3 every rank must
    # run (DeepSpeed traces the order in which each rank's forwards fetch parameters): see Trainer._save.
    save_runs_forward = True
    aliases = {"n_tokens": "num_virtual_tokens", "num_tokens": "num_virtual_tokens", "prompt_tuning_init": "init"}

    def __init__(self, num_virtual_tokens: int = 20, init: str = "sample_vocab", init_text: str | None = None):
        if num_virtual_tokens < 1:
            raise ConfigError(f"peft.num_virtual_tokens={num_virtual_tokens} must be >= 1.")
        if init not in INITS:
            raise ConfigError(f"peft.init={init!r} must be one of {', '.join(INITS)}.")
        if (init == "text") != bool(init_text):
            raise ConfigError("peft.init=text needs peft.init_text='...' (and init_text is read only with init=text).")
        self.num_virtual_tokens, self.init, self.init_text = num_virtual_tokens, init, init_text

    @staticmethod
    def check_config(cfg) -> None:
        from ftune.objectives.dpo import collate_pairs
        from ftune.preflight import check_target

        if cfg.data.packing:
            raise ConfigError("peft=prompt_tuning with data.packing=true: the soft prompt would precede only the "
                              "first sequence of each packed row. Set data.packing=false.")
        if getattr(check_target("objective", cfg.objective), "collate", None) is collate_pairs:
            raise ConfigError(f"peft=prompt_tuning with objective {cfg.objective._target_}: that objective packs "
                              f"chosen and rejected sequences into shared rows, and the soft prompt would precede only "
                              f"the first of each row. Use another PEFT method (e.g. peft=lora) for pair objectives.")

    def quantization_config(self, compute_dtype: torch.dtype):
        return None

    def apply(self, model: torch.nn.Module, gradient_checkpointing: bool = False) -> torch.nn.Module:
        from peft import PromptTuningConfig, get_peft_model

        text = {"prompt_tuning_init_text": self.init_text, "tokenizer_name_or_path": model.config._name_or_path} \
            if self.init == "text" else {}
        config = PromptTuningConfig(num_virtual_tokens=self.num_virtual_tokens, prompt_tuning_init=INITS[self.init],
                                    task_type="CAUSAL_LM", **text)
        model = get_peft_model(model, config)
        _aligned(model, self.num_virtual_tokens)
        return model

    def save(self, model: torch.nn.Module, directory: Path, write: bool = True) -> None:
        save_adapter(model, directory, write)

    def load_trainable(self, model: torch.nn.Module, directory: Path) -> None:
        load_adapter_weights(model, directory)

    def merge(self, base: torch.nn.Module, directory: Path) -> torch.nn.Module:
        raise ConfigError("peft=prompt_tuning cannot be merged: its soft prompt is extra input, not a change to the "
                          "weights. Load the run instead (ftune eval/generate run_dir=...), or train a LoRA-family "
                          "method (lora, dora, ia3) to get a mergeable model.")
