"""A run's training state on disk: which checkpoint a run continues from (checked before anything loads), the fresh-
run check, and saving / loading the whole state (weights of the PEFT method, optimizer and scheduler, step, RNG
states) through the engine (ftune/training/engine_state.py) into atomic checkpoint directories
(ftune/training/checkpoint.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ftune.config import ConfigError
from ftune.training import checkpoint as ckpt
from ftune.training import distributed as dist
from ftune.training import engine_state

log = logging.getLogger("ftune")


def resume_point(cfg: DictConfig, root: Path) -> Path | None:
    """The checkpoint to resume from, checked (integrity, same model and method) before anything is loaded."""
    resume = cfg.trainer.resume
    if resume is None:
        return None
    if resume == "auto":
        # The newest of the last intact checkpoint and the run's final/ (saved like a checkpoint, at the end of the
        # run: a run that kept no checkpoints, or one asked for more steps after it finished, goes on from there).
        found = [c for c in (ckpt.latest_valid(root), root.parent / "final") if c is not None and c.is_dir()]
        found = [c for c in found if c.name != "final" or ckpt.verify(c) is None]
        if not found:
            log.info("trainer.resume=auto: no complete checkpoint in %s; starting from scratch.", root)
            return None
        path = max(found, key=ckpt.saved_step) if len(found) > 1 else found[0]
    else:
        path = Path(resume).expanduser()
        if not path.is_dir():
            raise ConfigError(f"trainer.resume={resume}: no such directory. Use auto, or a checkpoint-N directory.")
        problem = ckpt.verify(path)
        if problem:
            raise ConfigError(f"trainer.resume={resume}: the checkpoint is damaged ({problem}). Use an earlier one.")
    saved = OmegaConf.load(path / "ftune_config.yaml")
    for key in ("model.name_or_path", "peft._target_"):
        if OmegaConf.select(saved, key) != OmegaConf.select(cfg, key):
            raise ConfigError(f"trainer.resume: {path} was trained with {key}={OmegaConf.select(saved, key)}, this "
                              f"run has {OmegaConf.select(cfg, key)}. Resume with the same {key}, or start afresh.")
    # The method's other settings shape or scale what was trained (r, alpha, targets, ...); dropout and the fused
    # kernel may change.
    was, now = (OmegaConf.to_container(c.peft, resolve=True) for c in (saved, cfg))
    changed = [f"peft.{k}={was.get(k)!r} (this run: {now.get(k)!r})" for k in sorted(set(was) | set(now))
               if k not in ("dropout", "fused") and was.get(k) != now.get(k)]
    if changed:
        raise ConfigError(f"trainer.resume: {path} was trained with {', '.join(changed)}. A resumed run keeps the "
                          f"method's settings: resume with the same ones, or start a new run in another output_dir.")
    return path


def check_fresh(out: Path, resume) -> None:
    """Never overwrite a previous run in the same output_dir unless asked to continue it."""
    if resume is None and any((out / name).exists() for name in ("final", "checkpoints", "metrics.jsonl")):
        raise ConfigError(f"output_dir={out} already holds a run. Continue it with trainer.resume=auto, or choose "
                          f"another output_dir. Its checkpoints and outputs were not touched.")


def save(trainer, name: str) -> Path:
    """Write `name` (checkpoint-N or final) atomically: tmp dir, fsync, manifest, rename."""
    root = trainer.ckpt_root if name.startswith("checkpoint-") else trainer.out
    tmp = root / f".tmp-{name}"
    if trainer.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        tmp.mkdir()
    trainer.acc.wait_for_everyone()
    torch.save(ckpt.rng_state(), tmp / f"rng_rank{trainer.acc.process_index}.pt")
    if hasattr(trainer.objective, "state_dict"):  # e.g. GRPO's stored completions and their old log-probs
        torch.save(trainer.objective.state_dict(), tmp / f"objective_rank{trainer.acc.process_index}.pt")
    trainer.acc.wait_for_everyone()
    final = root / name
    # Collective under FSDP2 / DeepSpeed: every rank writes its optimizer shards into tmp, then the PEFT method's
    # weights are gathered and rank 0 writes them as plain full tensors.
    optimizer_state = engine_state.optimizer_state(trainer.acc, trainer.model, trainer.optimizer, tmp)
    names = engine_state.param_names(trainer.acc, trainer.model, trainer.optimizer)
    # An adapter method saves its trainable weights only: only those are gathered from the shards.
    # A method whose save runs a forward (prompt tuning) runs it on every rank under ZeRO-3; rank 0 writes.
    every = dist.is_zero3(trainer.acc) and getattr(trainer.peft, "save_runs_forward", False)
    with dist.full_parameters(trainer.acc, trainer.model, whole=not trainer.peft.adapter) as model:
        if trainer.is_main:
            trainer.peft.save(model, tmp)
        elif every:
            trainer.peft.save(model, tmp, write=False)
    if trainer.is_main:
        try:
            trainer.tokenizer.save_pretrained(tmp)
            (tmp / "ftune_config.yaml").write_text(OmegaConf.to_yaml(trainer.cfg, resolve=True))
            (tmp / engine_state.ENGINE_FILE).write_text(json.dumps(dist.engine_record(trainer.acc)))
            torch.save({"step": trainer.step, "skipped": trainer.skipped, "optimizer": optimizer_state,
                        "param_names": names,
                        "scheduler": trainer.scheduler.state_dict(), "spike_guard": trainer.spikes.state_dict()},
                       tmp / ckpt.STATE)
            ckpt.finalize(tmp, final)
        except OSError as e:  # disk full, quota, permissions: say so, keep every complete checkpoint
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            good = ckpt.latest_valid(trainer.ckpt_root)
            raise ckpt.SaveError(
                f"could not write {name} to {root} at step {trainer.step} ({e.strerror or e}). Nothing written "
                f"before was touched; the newest complete checkpoint is {good or 'none'}. Free space (or fix "
                f"permissions) and continue with `ftune train ... output_dir={trainer.out} trainer.resume=auto`."
            ) from None
        if root == trainer.ckpt_root:
            ckpt.prune(trainer.ckpt_root, trainer.cfg.trainer.keep_last)
    trainer.acc.wait_for_everyone()
    return final

def load(trainer, path: Path) -> None:
    with dist.full_parameters(trainer.acc, trainer.model, ranks="all", whole=not trainer.peft.adapter) as model:
        trainer.peft.load_trainable(model, path)
    state = torch.load(path / ckpt.STATE, weights_only=False)
    engine_state.load_optimizer_state(trainer.acc, trainer.model, trainer.optimizer, state["optimizer"], path,
                                      trainer.out / ".universal-checkpoint", trainer.resume_how,
                                      state.get("param_names"))
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.step, trainer.skipped = state["step"], state["skipped"]
    if "spike_guard" in state:
        trainer.spikes.load_state_dict(state["spike_guard"])
    objective_state = path / f"objective_rank{trainer.acc.process_index}.pt"
    if objective_state.exists() and hasattr(trainer.objective, "load_state_dict"):
        trainer.objective.load_state_dict(torch.load(objective_state, weights_only=False))
    rng = path / f"rng_rank{trainer.acc.process_index}.pt"
    if rng.exists():
        ckpt.set_rng_state(torch.load(rng, weights_only=False))
    log.info("Resumed from %s at step %d.", path, trainer.step)
