"""Each loop option trains end to end on the tiny model: QLoRA 4/8-bit, bf16 autocast, activation checkpointing,
schedules, periodic eval loss, and the eval/generate entry points on the run it writes."""

from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import losses, make_cfg, run  # noqa: E402


def trainable_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("overrides", [
    ["peft=qlora", "peft.r=8"],
    ["peft=qlora", "peft.quantize=8bit", "peft.r=8"],
    ["trainer.mixed_precision=bf16"],
    ["trainer.gradient_checkpointing=true"],
    ["trainer.scheduler=linear", "trainer.warmup_steps=1"],
    # Under autocast the adapters take their inputs as they come (AdapterInputsAsIs), also where gradient
    # checkpointing recomputes the forward in the backward pass, on a 4-bit base, and with DoRA (peft's casting).
    ["trainer.mixed_precision=bf16", "trainer.gradient_checkpointing=true"],
    ["peft=qlora", "peft.r=8", "trainer.mixed_precision=bf16"],
    ["peft=dora", "trainer.mixed_precision=bf16"],
], ids=["qlora4", "qlora8", "bf16", "grad_ckpt", "linear_sched", "bf16_grad_ckpt", "qlora4_bf16", "dora_bf16"])
def test_variant_trains(tmp_path, overrides):
    from ftune.train import Trainer

    t = Trainer(make_cfg(tmp_path / "v", "trainer.max_steps=2", "trainer.batch_size=2", *overrides))
    before = trainable_snapshot(t.model)
    t.run()
    after = trainable_snapshot(t.model)
    assert all(math.isfinite(x) for x in losses(tmp_path / "v"))
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    # LoRA A gets no gradient while B is still zero after the first step only for some layers; B always moves.
    assert [n for n in before if "lora_B" in n] and all(n in changed for n in before if "lora_B" in n)
    if "peft=qlora" in overrides:
        kind = "Linear4bit" if "8bit" not in " ".join(overrides) else "Linear8bitLt"
        assert any(type(m).__name__ == kind for m in t.model.modules())


def test_warmup_then_cosine_schedule_values():
    from ftune.training.optim import lr_lambda

    f = lr_lambda("cosine", warmup=2, total=10)
    assert [round(f(s), 4) for s in (0, 1, 2)] == [round(1 / 3, 4), round(2 / 3, 4), 1.0]
    assert f(6) == pytest.approx(0.5)  # halfway through the decay
    assert f(10) == pytest.approx(0.0, abs=1e-12)
    assert lr_lambda("linear", 0, 10)(5) == pytest.approx(0.5)
    assert lr_lambda("constant", 0, 10)(9) == 1.0


def test_warmup_longer_than_the_run_is_said(caplog):
    from types import SimpleNamespace

    from ftune.training.optim import build_scheduler

    t = SimpleNamespace(warmup_steps=5, warmup_ratio=0.0, scheduler="cosine")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with caplog.at_level("WARNING", logger="ftune.training.optim"):
        build_scheduler(opt, t, 2)
    assert "covers the whole run of 2 steps" in caplog.text and "0.333 of trainer.lr" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ftune.training.optim"):
        build_scheduler(opt, t, 6)
    assert not caplog.text


def test_periodic_eval_loss_logged(tmp_path):
    run(make_cfg(tmp_path / "e", "trainer.max_steps=4", "trainer.eval_every=2", "data.eval_size=4",
                 "trainer.batch_size=2"))
    records = [json.loads(x) for x in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]


def test_eval_and_generate_on_a_run(tmp_path):
    """`ftune eval run_dir=...` scores the trained adapter on its base; generate answers through the template."""
    from omegaconf import OmegaConf

    from ftune.evaluate import evaluate
    from ftune.generate import generate_answer

    run(make_cfg(tmp_path / "g", "trainer.max_steps=1", "trainer.batch_size=2"))
    cfg = OmegaConf.create({
        "model": {"name_or_path": "tiny_random", "dtype": "float32", "attn_implementation": "sdpa",
                  "revision": None, "trust_remote_code": False},
        "data": OmegaConf.to_container(make_cfg(tmp_path / "unused").data),
        "eval": {"task": "gsm8k", "split": "test", "limit": 3, "batch_size": 2, "max_new_tokens": 8,
                 "at_start": False, "at_end": False},
        "run_dir": str(tmp_path / "g"), "output_dir": str(tmp_path / "ev"), "seed": 0,
    })
    metrics = evaluate(cfg)
    assert metrics["n"] == 3 and 0 <= metrics["accuracy"] <= 1
    preds = [json.loads(x) for x in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 3 and all(p["gold"] is not None for p in preds)
    gen = OmegaConf.create({"model": cfg.model, "run_dir": cfg.run_dir, "prompt": "What is 2+2?", "system": None,
                            "max_new_tokens": 5, "temperature": 0.0, "seed": 0})
    assert isinstance(generate_answer(gen), str)


def test_offline_hub_id_fails_fast(monkeypatch):
    from ftune.models.loading import ModelLoadError, resolve_model_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="not in the local hub cache.*model.name_or_path"):
        resolve_model_dir("some-org/not-a-cached-model")
    assert time.perf_counter() - start < 5


def test_hub_ids_with_dots_resolve_from_the_cache(tmp_path, monkeypatch):
    """Qwen/Qwen2.5-0.5B, meta-llama/Llama-3.2-1B: a dot in a hub id does not make it a local path (it used to be
    refused as "no such directory", cached or not)."""
    from ftune.models.loading import ModelLoadError, resolve_model_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert resolve_model_dir("Qwen/Qwen2.5-0.5B") == snapshot
    with pytest.raises(ModelLoadError, match="'meta-llama/Llama-3.2-1B' is not in the local hub cache"):
        resolve_model_dir("meta-llama/Llama-3.2-1B")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file. Point it at the model's directory"):
        resolve_model_dir(str(tmp_path / "weights.safetensors"))


def test_missing_local_model_dir_is_named(tmp_path):
    from ftune.models.loading import ModelLoadError, resolve_model_dir

    with pytest.raises(ModelLoadError, match="no such directory"):
        resolve_model_dir(str(tmp_path / "nope"))


def test_non_finite_steps_are_skipped_then_stop(tmp_path, monkeypatch, capsys):
    """A NaN loss skips the step (weights untouched, counted); three in a row stop with the examples' ids."""
    from ftune.objectives.sft import SFT
    from ftune.train import Trainer

    real = SFT.__call__
    calls = {"n": 0}

    def nan_on_first(self, model, batch):
        calls["n"] += 1
        loss, m = real(self, model, batch)
        return (loss * float("nan"), m) if calls["n"] == 1 else (loss, m)

    monkeypatch.setattr(SFT, "__call__", nan_on_first)
    t = Trainer(make_cfg(tmp_path / "n", "trainer.max_steps=2", "trainer.batch_size=2"))
    before = trainable_snapshot(t.model)
    stepped_after_calls = []
    real_step = t.optimizer.step
    t.optimizer.step = lambda *a, **k: (stepped_after_calls.append(calls["n"]), real_step(*a, **k))[1]
    summary = t.run()
    assert summary["skipped_steps"] == 1 and summary["steps"] == 2
    assert stepped_after_calls == [2]  # no optimizer step after the NaN forward
    assert any(not torch.equal(before[n], p) for n, p in t.model.named_parameters() if p.requires_grad)

    monkeypatch.setattr(SFT, "__call__", lambda self, model, batch: (real(self, model, batch)[0] * float("nan"), {}))
    from ftune.reporting import run_reporting_errors
    from ftune.train import train

    with pytest.raises(SystemExit) as exc:  # said as one paragraph, not a traceback
        run_reporting_errors(train, make_cfg(tmp_path / "n2", "trainer.max_steps=5", "trainer.batch_size=2"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"ftune: training error: 3 non-finite steps in a row \(last at step 3, examples \[.*\]\)\. "
                     r"Lower trainer\.lr", err), err


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path, monkeypatch):
    """Preemption: SIGTERM during step 2 finishes the step, writes checkpoint-2, exits 143; resume continues."""
    import os
    import signal

    from ftune.objectives.sft import SFT
    from ftune.training.checkpoint import verify

    real = SFT.__call__
    calls = {"n": 0}

    def term_on_second(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, model, batch)

    monkeypatch.setattr(SFT, "__call__", term_on_second)
    with pytest.raises(SystemExit) as e:
        run(make_cfg(tmp_path / "s", "trainer.max_steps=5", "trainer.batch_size=2"))
    assert e.value.code == 128 + signal.SIGTERM
    ckpt = tmp_path / "s" / "checkpoints" / "checkpoint-2"
    assert verify(ckpt) is None
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    resumed = run(make_cfg(tmp_path / "s", "trainer.max_steps=5", "trainer.batch_size=2", "trainer.resume=auto"))
    assert resumed.step == 5 and len(losses(tmp_path / "s")) == 5


def test_disk_full_during_a_save_says_so_and_keeps_the_earlier_checkpoint(tmp_path, monkeypatch, capsys):
    """The loop's own save path: ENOSPC while writing checkpoint-4 -> a one-paragraph error naming the step, the cause
    and the intact checkpoint-2; no half-written directory is left behind."""
    import errno

    from ftune.reporting import run_reporting_errors
    from ftune.train import train
    from ftune.training import checkpoint as ckpt

    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if str(path).endswith(f"checkpoint-4/{ckpt.STATE}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        run_reporting_errors(train, make_cfg(out, "trainer.max_steps=6", "trainer.save_every=2"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "ftune: save error: could not write checkpoint-4" in err and "No space left on device" in err
    assert "checkpoint-2" in err and "trainer.resume=auto" in err
    assert ckpt.verify(out / "checkpoints" / "checkpoint-2") is None
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
