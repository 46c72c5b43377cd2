"""Trajectory invariants of the training loop on a tiny random Llama (CPU, seeded).

Accumulation equals a big batch, packed equals unpacked, resumed equals uninterrupted, LoRA leaves the base
untouched, and the outputs load with the ecosystem's own loaders.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import crash_after_checkpoint, losses, make_cfg, run  # noqa: E402


def test_grad_accum_equals_big_batch(tmp_path):
    """batch 8 x accum 1 and batch 2 x accum 4 give the same losses and the same weights (loss normalised by the
    label tokens of the whole accumulated batch, not averaged per micro-batch)."""
    common = ["peft.dropout=0", "trainer.max_steps=3"]
    a = run(make_cfg(tmp_path / "a", *common, "trainer.batch_size=8", "trainer.grad_accum=1"))
    b = run(make_cfg(tmp_path / "b", *common, "trainer.batch_size=2", "trainer.grad_accum=4"))
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "a")), torch.tensor(losses(tmp_path / "b")),
                               rtol=1e-5, atol=1e-5)
    pa = dict(a.model.named_parameters())
    for name, p in b.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, pa[name], rtol=1e-3, atol=1e-5)


def test_per_microbatch_mean_would_differ(tmp_path):
    """The equivalence above is not vacuous: averaging each micro-batch separately gives another loss."""
    from ftune.data.batching import collate
    from ftune.objectives.sft import SFT

    t = run(make_cfg(tmp_path / "m", "peft.dropout=0", "trainer.max_steps=1", "trainer.batch_size=8"))
    rows = [t.data.train[i] for i in t.order.micro_batches(0)[0]]
    obj, pad = SFT(), t.tokenizer.pad_token_id
    with torch.no_grad():
        halves = [collate(rows[:2], pad), collate(rows[2:], pad)]
        sums = [obj(t.model, b)[0] for b in halves]
        counts = [obj.normalizer(b) for b in halves]
    token_mean = float(sum(sums) / sum(counts))
    mean_of_means = float(sum(s / c for s, c in zip(sums, counts)) / 2)
    assert abs(token_mean - mean_of_means) > 1e-4


def test_packed_equals_unpacked(tmp_path):
    """The summed loss over a packed row equals the sum over the same examples one per row; without resetting
    position ids per example (no isolation) it does not."""
    from ftune.data.batching import collate, pack
    from ftune.objectives.sft import SFT

    t = run(make_cfg(tmp_path / "p", "trainer.max_steps=1", "peft.dropout=0"))
    # On a CPU the trainer computes attention per packed example (ftune.models.packed_attention), not under a mask.
    assert t.model.config._attn_implementation == "ftune_sdpa"
    rows = t.data.train[:4]
    packed = pack(rows, max_length=sum(len(r["input_ids"]) for r in rows))
    assert len(packed) == 1
    obj, pad = SFT(), t.tokenizer.pad_token_id
    t.model.eval()
    with torch.no_grad():
        unpacked = obj(t.model, collate(rows, pad))[0]
        packed_loss = obj(t.model, collate(packed, pad))[0]
        leaky = dict(packed[0], position_ids=list(range(len(packed[0]["input_ids"]))))
        leaky_loss = obj(t.model, collate([leaky], pad))[0]
    torch.testing.assert_close(packed_loss, unpacked, rtol=1e-4, atol=1e-4)
    assert abs(float(leaky_loss) - float(unpacked)) > 1e-3


def test_packed_training_per_example_equals_the_masked_path(tmp_path):
    """model.packed_attention: the default on a CPU (per example) and the masked whole-row path train alike."""
    common = ["data.packing=true", "data.max_length=1024", "trainer.batch_size=2", "trainer.max_steps=3",
              "peft.dropout=0"]
    a = run(make_cfg(tmp_path / "a", *common))
    assert min(r["position_ids"].count(0) for r in a.data.train) >= 3  # several examples in every row
    b = run(make_cfg(tmp_path / "b", *common, "model.packed_attention=masked"))
    assert (a.model.config._attn_implementation, b.model.config._attn_implementation) == ("ftune_sdpa", "sdpa")
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "a")), torch.tensor(losses(tmp_path / "b")),
                               rtol=1e-5, atol=1e-5)
    # gradient checkpointing recomputes the attention in the backward pass: the same trajectory again
    run(make_cfg(tmp_path / "c", *common, "trainer.gradient_checkpointing=true"))
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "c")), torch.tensor(losses(tmp_path / "b")),
                               rtol=1e-5, atol=1e-5)


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """Crash right after checkpoint-3, resume with trainer.resume=auto: the losses of steps 4-6 and the final adapter
    equal the uninterrupted run bit for bit (LoRA dropout on, so RNG state must be restored too)."""
    from safetensors.torch import load_file


    common = ["trainer.max_steps=6", "trainer.save_every=3", "peft.dropout=0.1", "trainer.batch_size=2"]
    run(make_cfg(tmp_path / "full", *common))

    crash_after_checkpoint(monkeypatch, make_cfg(tmp_path / "resumed", *common), "checkpoint-3")
    resumed = run(make_cfg(tmp_path / "resumed", *common, "trainer.resume=auto"))
    assert resumed.resume_from.name == "checkpoint-3"
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")
    a = load_file(tmp_path / "full" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_auto_goes_on_from_final_or_a_newer_checkpoint(tmp_path, monkeypatch):
    """A finished run that kept no checkpoint, asked for more steps with trainer.resume=auto, goes on from its final/
    (it used to start again from scratch and replace final/); a checkpoint newer than final/ wins over it."""
    common = ["trainer.scheduler=constant", "trainer.warmup_ratio=0", "trainer.warmup_steps=0", "peft.dropout=0.1",
              "trainer.batch_size=2"]
    run(make_cfg(tmp_path / "full", *common, "trainer.max_steps=6"))
    run(make_cfg(tmp_path / "split", *common, "trainer.max_steps=3"))
    assert not (tmp_path / "split" / "checkpoints").exists()
    resumed = run(make_cfg(tmp_path / "split", *common, "trainer.max_steps=6", "trainer.resume=auto"))
    assert resumed.resume_from.name == "final" and resumed.step == 6
    assert losses(tmp_path / "split") == losses(tmp_path / "full")
    crash_after_checkpoint(monkeypatch, make_cfg(tmp_path / "split", *common, "trainer.max_steps=9",
                                                 "trainer.save_every=1", "trainer.resume=auto"), "checkpoint-7")
    again = run(make_cfg(tmp_path / "split", *common, "trainer.max_steps=9", "trainer.resume=auto"))
    assert again.resume_from.name == "checkpoint-7" and again.step == 9


def test_resuming_a_checkpoint_with_no_steps_left_says_so_and_saves_it_as_final(tmp_path, capsys):
    from safetensors.torch import load_file

    run(make_cfg(tmp_path / "full", "trainer.max_steps=4", "trainer.save_every=3", "trainer.batch_size=2"))
    ckpt = tmp_path / "full" / "checkpoints" / "checkpoint-3"
    capsys.readouterr()
    run(make_cfg(tmp_path / "again", "trainer.max_steps=3", "trainer.batch_size=2", f"trainer.resume={ckpt}"))
    out = capsys.readouterr().out
    assert "Done: nothing left to train, the checkpoint was at step 3 (raise trainer.max_steps" in out
    a, b = (load_file(d / "adapter_model.safetensors") for d in (ckpt, tmp_path / "again" / "final"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_trains_adapter_only_and_loads_with_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftune.models.loading import resolve_model_dir

    t = run(make_cfg(tmp_path / "l", "trainer.max_steps=2"))
    base = AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny_random"))
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    for name, p in t.model.named_parameters():
        if p.requires_grad:
            assert "lora_" in name
        else:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, base_state[key]), name
    trained_b = {n: p for n, p in t.model.named_parameters() if "lora_B" in n}
    assert trained_b and all(p.abs().sum() > 0 for p in trained_b.values())  # B starts at zero
    loaded = PeftModel.from_pretrained(base, tmp_path / "l" / "final")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    t.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, t.model(ids).logits)


def test_full_finetune_output_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = run(make_cfg(tmp_path / "f", "peft=none", "trainer.max_steps=2", "trainer.lr=1e-3"))
    final = tmp_path / "f" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    assert AutoTokenizer.from_pretrained(final).chat_template
    assert OmegaConf.load(final / "ftune_config.yaml").peft._target_ == "ftune.peft.full.FullFineTune"
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    t.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, t.model(ids).logits)


def test_keep_last_and_metrics(tmp_path):
    run(make_cfg(tmp_path / "k", "trainer.max_steps=5", "trainer.save_every=1", "trainer.keep_last=2",
                 "trainer.batch_size=2"))
    names = sorted(p.name for p in (tmp_path / "k" / "checkpoints").iterdir())
    assert names == ["checkpoint-3", "checkpoint-4"]
    records = [json.loads(x) for x in (tmp_path / "k" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]
    assert (tmp_path / "k" / "loss.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "k" / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["train_tokens"] > 0


def test_loss_decreases_when_overfitting(tmp_path):
    """A few epochs on 8 examples must drive the loss well down (catches broken labels or a dead optimizer)."""
    run(make_cfg(tmp_path / "o", "data.size=8", "data.max_length=512", "trainer.batch_size=8", "trainer.epochs=12",
                 "trainer.lr=1e-2", "peft=none", "trainer.scheduler=constant"))
    trajectory = losses(tmp_path / "o")
    assert trajectory[-1] < 0.6 * trajectory[0]


def test_refuses_to_overwrite_a_previous_run(tmp_path):
    from ftune.config import ConfigError

    run(make_cfg(tmp_path / "x", "trainer.max_steps=1"))
    before = (tmp_path / "x" / "final" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run.*trainer.resume=auto"):
        run(make_cfg(tmp_path / "x", "trainer.max_steps=1"))
    assert (tmp_path / "x" / "final" / "adapter_model.safetensors").read_bytes() == before


def test_resume_from_checkpoint_of_another_model_is_refused(tmp_path):
    from ftune.config import ConfigError

    run(make_cfg(tmp_path / "r", "trainer.max_steps=2", "trainer.save_every=1"))
    ck = tmp_path / "r" / "checkpoints" / "checkpoint-1"
    with pytest.raises(ConfigError, match="model.name_or_path"):
        run(make_cfg(tmp_path / "r2", "trainer.max_steps=2", f"trainer.resume={ck}",
                     "model=smollm2_135m"))


def test_unwritable_output_dir(tmp_path):
    from ftune.config import ConfigError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="not writable"):
        run(make_cfg(blocker / "run", "trainer.max_steps=1"))


def test_group_by_length_pads_less_and_resumes_exactly(tmp_path, monkeypatch):
    """data.group_by_length=true: the loop's batches hold rows of similar length (less padding than the same run's
    random batches) and a resumed run repeats the uninterrupted one bit for bit."""
    from ftune.data.batching import BatchOrder, row_tokens

    common = ["trainer.max_steps=6", "trainer.save_every=3", "trainer.batch_size=4", "data.group_by_length=true"]
    t = run(make_cfg(tmp_path / "full", *common))
    lengths = [row_tokens(r) for r in t.data.train]
    assert t.order.lengths == lengths

    def padding(order):
        steps = order.steps_per_epoch
        return sum(max(lengths[i] for i in mb) * len(mb) - sum(lengths[i] for i in mb)
                   for s in range(steps) for mb in order.micro_batches(s))

    plain = BatchOrder(len(lengths), 4, 1, 1, 0, t.cfg.seed)
    assert padding(t.order) < 0.5 * padding(plain)

    crash_after_checkpoint(monkeypatch, make_cfg(tmp_path / "resumed", *common), "checkpoint-3")
    resumed = run(make_cfg(tmp_path / "resumed", *common, "trainer.resume=auto"))
    assert resumed.resume_from.name == "checkpoint-3"
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")
