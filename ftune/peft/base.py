"""Helpers shared by PEFT methods: parameter counts, target checks, adapter save/load/merge, full-model resume."""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from ftune.config import ConfigError


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


def check_targets(model: torch.nn.Module, targets: str | list | None, key: str = "peft.target_modules") -> None:
    """Refuse module names that match nothing in `model`, listing its linear layers (the usual targets)."""
    if targets is None or isinstance(targets, str):
        return
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [t for t in targets if t not in names]
    if unknown:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"{key} {unknown} match no module of this model. Its linear layers are: "
                          f"{', '.join(linear)} (or use {key}=all-linear where the method allows it).")


def target_linears(model: torch.nn.Module, targets: str | list) -> dict[str, torch.nn.Module]:
    """The linear layers a `target_modules` value selects: "all-linear" is every linear layer but the LM head, another
    string a regex on the full module name (as in `peft`), a list the last name component."""
    head = model.get_output_embeddings()
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or m is head:  # bitsandbytes' Linear4bit/8bitLt are nn.Linear
            continue
        if targets == "all-linear" or (re.fullmatch(targets, name) if isinstance(targets, str)
                                       else name.rsplit(".", 1)[-1] in targets):
            out[name] = m
    return out


def selected_linears(model: torch.nn.Module, targets: str | list) -> dict[str, torch.nn.Module]:
    """`target_linears`, after `check_targets`; an empty selection is refused with the fix."""
    check_targets(model, targets)
    layers = target_linears(model, targets)
    if not layers:
        raise ConfigError(f"peft.target_modules={targets} selects no linear layer of this model. Use all-linear or "
                          f"names of its linear layers.")
    return layers


def model_skeleton(model_dir: Path, trust_remote_code: bool = False) -> torch.nn.Module | None:
    """The model's modules on the meta device (no weights, no memory), to check module names before anything loads;
    None when the architecture cannot be built from its config that way."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # an unusual architecture: the same check runs on the loaded model instead
        return None


def preflight_targets(peft, model_dir: Path, trust_remote_code: bool = False) -> None:
    """A PEFT method's `target_modules` checked against the model's module names before the data is tokenized and
    the weights load (a typo then costs seconds, not a model load)."""
    targets = getattr(peft, "target_modules", None)
    if targets is None:
        return
    skeleton = model_skeleton(model_dir, trust_remote_code)
    if skeleton is not None:
        selected_linears(skeleton, targets)


def save_adapter(model: torch.nn.Module, directory: Path, write: bool = True) -> None:
    """A `peft` adapter directory (adapter_config.json + adapter_model.safetensors). `write=False`: compute the
    state to save (peft's collective part) without writing it."""
    model.save_pretrained(directory, safe_serialization=True, is_main_process=write)


def load_adapter_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load a saved `peft` adapter's weights into an already wrapped model (resume)."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, load_file(Path(directory) / "adapter_model.safetensors"))
    if result.unexpected_keys:
        raise RuntimeError(f"adapter in {directory} does not match this model: {result.unexpected_keys[:5]}")


def merge_peft_adapter(base: torch.nn.Module, directory: Path) -> torch.nn.Module:
    """Attach the `peft` adapter in `directory` to an unquantized `base` and fold it into the weights."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, directory)
    return model.merge_and_unload()


# ftune's own methods (those `peft` lacks) save only their trainable tensors, by parameter name, in this file.
ADAPTER_FILE = "ftune_adapter.safetensors"


def save_trainable(model: torch.nn.Module, directory: Path) -> None:
    from safetensors.torch import save_file

    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
              Path(directory) / ADAPTER_FILE)


def load_trainable_file(model: torch.nn.Module, directory: Path) -> None:
    """Load `save_trainable`'s tensors into a model the same method has been applied to."""
    state = load_file(Path(directory) / ADAPTER_FILE)
    params = dict(model.named_parameters())
    unknown = [k for k in state if k not in params]
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if unknown or missing:
        raise RuntimeError(f"adapter in {directory} does not match this model: unexpected {unknown[:5]}, "
                           f"missing {missing[:5]}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


# ------------------------------------------------------------------------------------------- switching adapters off
# Objectives that need the base model as a reference (DPO, PSO, constrained SFT, eval=preference) switch the adapter
# off instead of copying the model: `peft`'s models have `disable_adapter()`; ftune's own adapters (SSF, AdaLink) are
# modules with an `adapter_enabled` flag that their forward reads. A frozen deep copy would not do for them: it keeps
# their initial values (SSF's random scales), which are not the base model.
def own_adapter_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "adapter_enabled")]


def can_disable_adapter(model: torch.nn.Module) -> bool:
    """Whether `adapter_disabled(model)` gives the base model (a `peft` model, or one with ftune's own adapters)."""
    model = getattr(model, "module", model)
    return hasattr(model, "disable_adapter") or bool(own_adapter_modules(model))


@contextmanager
def adapter_disabled(model: torch.nn.Module):
    """Within the block, `model` computes as its base model (every adapter off); it is restored on exit."""
    unwrapped = getattr(model, "module", model)
    if hasattr(unwrapped, "disable_adapter"):
        with unwrapped.disable_adapter():
            yield model
        return
    mods = own_adapter_modules(unwrapped)
    if not mods:
        raise ValueError(f"{type(unwrapped).__name__} has no adapter to switch off")
    before = [m.adapter_enabled for m in mods]
    for m in mods:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.adapter_enabled = b
