"""Load what `ftune train` wrote (a run dir, its `final/`, or a `checkpoint-N/`) for eval and generate."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from ftune.config import ConfigError
from ftune.models.loading import load_model, load_tokenizer
from ftune.peft.base import ADAPTER_FILE


def _weights_dir(run_dir: Path) -> Path:
    for candidate in (run_dir, run_dir / "final"):
        if any((candidate / f).exists() for f in ("adapter_config.json", "config.json", ADAPTER_FILE)):
            return candidate
    raise ConfigError(f"run_dir={run_dir}: no adapter or model found there or in its final/ directory. Point "
                      f"run_dir at a directory written by `ftune train` (the run, its final/ or a checkpoint-N/).")


def saved_config(run_dir: str | Path):
    """The config a run was trained with (ftune_config.yaml beside its weights), or None."""
    path = _weights_dir(Path(run_dir).expanduser()) / "ftune_config.yaml"
    return OmegaConf.load(path) if path.is_file() else None


def load_from_run(run_dir: str | Path, model_cfg=None):
    """(model, tokenizer) of a finished run; LoRA adapters are attached to their base model with PEFT."""
    from peft import PeftModel

    weights = _weights_dir(Path(run_dir).expanduser())
    if (weights / ADAPTER_FILE).exists():  # a method of ftune's own (ftune/peft/): it re-applies itself
        from ftune.config import build

        saved = OmegaConf.load(weights / "ftune_config.yaml")
        method = build(saved.peft)
        base, _, _ = load_model(saved.model)
        model = method.apply(base)
        method.load_trainable(model, weights)
    elif (weights / "adapter_config.json").exists():
        saved = OmegaConf.load(weights / "ftune_config.yaml") if (weights / "ftune_config.yaml").exists() else None
        base_cfg = saved.model if saved is not None else model_cfg
        quant = saved.peft.get("quantize") if saved is not None else None
        qconfig = None
        if quant:
            import torch

            from ftune.config import build

            qconfig = build(saved.peft).quantization_config(torch.float32)
        base, _, _ = load_model(base_cfg, qconfig)
        model = PeftModel.from_pretrained(base, weights)
    else:
        cfg = OmegaConf.merge(model_cfg, {"name_or_path": str(weights)}) if model_cfg is not None else None
        model, _, _ = load_model(cfg, None, weights)
    return model.eval(), load_tokenizer(weights)


def load_for_inference(cfg):
    """(model, tokenizer) for `ftune eval` / `ftune generate`: the run in `cfg.run_dir`, else `cfg.model` as is."""
    if cfg.run_dir:
        return load_from_run(cfg.run_dir, cfg.model)
    model, tokenizer, _ = load_model(cfg.model)
    return model.eval(), tokenizer
