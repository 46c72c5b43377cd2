"""Shared helpers for tests that train the tiny random model: compose a config, run it, read its losses."""

from __future__ import annotations

import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ftune.config import register_configs
from ftune.paths import configs_dir

SMALL = ["model=tiny_random", "data.size=48", "data.eval_size=0", "data.max_length=256", "eval=none",
         "trainer.progress=false", "trainer.warmup_ratio=0", "trainer.lr=5e-3"]


def make_cfg(out: Path, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(configs_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[*SMALL, f"output_dir={out}", *overrides])
    OmegaConf.resolve(cfg)
    return cfg


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def run(cfg):
    from ftune.train import Trainer

    trainer = Trainer(cfg)
    trainer.run()
    return trainer


def crash_after_checkpoint(monkeypatch, cfg, checkpoint: str) -> None:
    """Train `cfg` until `checkpoint` (e.g. "checkpoint-3") is saved, then crash there (KeyboardInterrupt), as a
    killed run would; the caller resumes with trainer.resume=auto."""
    import pytest

    from ftune.train import Trainer

    real_save = Trainer._save

    def crash(self, name):
        path = real_save(self, name)
        if name == checkpoint:
            raise KeyboardInterrupt("simulated crash")
        return path

    monkeypatch.setattr(Trainer, "_save", crash)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(Trainer, "_save", real_save)


def assert_gathered_only_the_adapter(out: Path, engine: str = "deepspeed") -> None:
    """Each save and load held every trainable weight in full on rank 0, and no frozen one: the base stays
    partitioned (a LoRA checkpoint of a 70B model must not gather 140 GB onto each rank). Recorded by
    tests/_sharded_worker.py in OUT/{engine}_rank0.json."""
    gathers = json.loads((out / f"{engine}_rank0.json").read_text())["gathers"]
    assert gathers
    for g in gathers:
        assert g["frozen"] > 0 and g["frozen_full"] == 0 and g["trainable_full"] == g["trainable"] > 0, g


# eval.at_start / at_end on a few GSM8K questions, for the engines' tests
EVALS = ["trainer.max_steps=2", "eval=gsm8k", "eval.at_start=true", "eval.at_end=true", "eval.limit=4",
         "eval.max_new_tokens=8"]


def assert_evaluated_like(run_dir: Path, one: Path) -> None:
    """`run_dir` evaluated the 4 questions of EVALS before and after training, with the answers of run `one`."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task_start"]["n"] == summary["task_end"]["n"] == 4
    for tag in ("start", "end"):
        mine, theirs = (sorted(p.read_text() for p in (r / f"eval_{tag}").iterdir()) for r in (run_dir, one))
        assert mine and mine == theirs, tag


def assert_continues(resumed: Path, full: Path, weights: str = "adapter_model.safetensors", loss_atol: float = 2e-5,
                     weight_atol: float = 1e-4) -> None:
    """A run resumed from `full`'s checkpoint-2 continues `full`'s losses (to `loss_atol`: another engine or number of
    processes sums in another order), left no conversion scratch behind, and ends with `full`'s weights."""
    import torch
    from safetensors.torch import load_file

    torch.testing.assert_close(torch.tensor(losses(resumed)), torch.tensor(losses(full)[2:]), rtol=0, atol=loss_atol)
    assert not (resumed / ".universal-checkpoint").exists()
    a, b = (load_file(r / "final" / weights) for r in (resumed, full))
    assert a.keys() == b.keys()
    for k in b:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=weight_atol)


def assert_resumes_in_one_process(out: Path, full: Path, rows: int, *overrides: str) -> None:
    """`full`'s checkpoint-2, written by a sharded engine, resumed in one process with the same global batch (`rows`):
    its optimizer state converted from the engine's layout, the run continues `full`'s (assert_continues)."""
    run(make_cfg(out, *overrides, f"trainer.batch_size={rows}", "trainer.max_steps=4",
                 f"trainer.resume={full / 'checkpoints' / 'checkpoint-2'}"))
    assert_continues(out, full)
