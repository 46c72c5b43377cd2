"""peft=hft: exactly half of each category trains, the selection is seeded, frozen weights stay bit-identical."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
from _tiny import make_cfg  # noqa: E402

from ftune.config import ConfigError  # noqa: E402
from ftune.peft.base import count_parameters  # noqa: E402
from ftune.peft.hft import HFT, select  # noqa: E402

ATT, FFN, NORMS = ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"], ["a", "b"]


def test_selection_is_half_per_category_and_seeded():
    for n_layers in (2, 8, 24):
        sel = select(n_layers, ATT, FFN, NORMS, seed=3)
        assert all(sum(x in ATT for x in names) == 2 for names in sel.values())  # 2 of 4 attention per layer
        ffn_counts = sorted(sum(x in FFN for x in names) for names in sel.values())
        assert ffn_counts == [1] * (n_layers // 2) + [2] * (n_layers // 2)  # 3 of 6 per pair of layers: 50 %
        assert sum(ffn_counts) * 2 == 3 * n_layers
        assert all(sum(x in NORMS for x in names) == 1 for names in sel.values())
    assert select(24, ATT, FFN, NORMS, seed=3) == select(24, ATT, FFN, NORMS, seed=3)
    assert select(24, ATT, FFN, NORMS, seed=3) != select(24, ATT, FFN, NORMS, seed=4)


@pytest.fixture
def base():
    from transformers import AutoModelForCausalLM

    from ftune.models.loading import resolve_model_dir

    return AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny_random"))


def test_trainable_parameters_follow_the_selection(base):
    hft = HFT(seed=1)
    model = hft.apply(base)
    sizes = {"q_proj": 64 * 64, "k_proj": 32 * 64, "v_proj": 32 * 64, "o_proj": 64 * 64, "gate_proj": 128 * 64,
             "up_proj": 128 * 64, "down_proj": 64 * 128, "input_layernorm": 64, "post_attention_layernorm": 64}
    # the chosen matrices and norms, + tied embedding / head 49152 x 64, + the final norm 64
    expected = sum(sizes[x] for names in hft.selection.values() for x in names) + 49152 * 64 + 64
    assert count_parameters(model)[0] == expected
    ffn = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "mlp" in n)
    assert ffn == 3 * 128 * 64  # half of the 6 FFN matrices (all of the same size here)
    with pytest.raises(ConfigError, match="peft.attention"):
        HFT(attention=["wq", "wk"]).apply(base)


def test_hft_trains_only_the_selected_half(tmp_path):
    from transformers import AutoModelForCausalLM

    from ftune.train import Trainer

    t = Trainer(make_cfg(tmp_path / "h", "peft=hft", "data.size=8", "trainer.max_steps=2", "trainer.batch_size=2",
                         "trainer.lr=1e-3"))
    frozen = {n: p.detach().clone() for n, p in t.model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    assert math.isfinite(t.run()["final_loss"])
    now = dict(t.model.named_parameters())
    assert frozen and all(torch.equal(now[n], v) for n, v in frozen.items())
    assert all(not torch.equal(now[n], v) for n, v in trained.items())
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "h" / "final")
    assert all(torch.equal(p, now[n]) for n, p in saved.named_parameters())


def test_reselect_epoch_draws_a_new_half_each_epoch_and_resumes_exactly(tmp_path, monkeypatch):
    from _tiny import crash_after_checkpoint, losses, run

    common = ["peft=hft", "peft.reselect=epoch", "peft.seed=5", "data.size=8", "data.eval_size=0",
              "trainer.max_steps=-1", "trainer.epochs=2", "trainer.batch_size=2", "trainer.lr=1e-3",
              "trainer.save_every=2"]
    t = run(make_cfg(tmp_path / "full", *common))
    assert t.order.steps_per_epoch >= 3 and t.total_steps == 2 * t.order.steps_per_epoch and t.peft.epoch == 1
    n = len(t.peft.layers)
    first, second = (select(n, t.peft.attention, t.peft.ffn, t.peft.norms, seed) for seed in (5, 6))
    assert t.peft.selection == second and first != second
    from transformers import AutoModelForCausalLM

    from ftune.models.loading import resolve_model_dir

    initial = dict(AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny_random")).named_parameters())
    now = dict(t.model.named_parameters())
    changed = {n: not torch.equal(p, initial[n]) for n, p in now.items()}
    for i in range(n):
        for leaf in t.peft.attention + t.peft.ffn + t.peft.norms:
            names = [k for k in now if f".layers.{i}.{'self_attn' if leaf in t.peft.attention else 'mlp'}.{leaf}."
                     in k or k.endswith(f".layers.{i}.{leaf}.weight")]
            assert names, (i, leaf)
            trained = leaf in first[i] or leaf in second[i]
            assert all(changed[k] == trained for k in names), (i, leaf, trained)
    # A crash in epoch 1 (after step 4) resumes with epoch 1's half and the optimizer state of every candidate.
    crash_after_checkpoint(monkeypatch, make_cfg(tmp_path / "cut", *common), "checkpoint-4")
    resumed = run(make_cfg(tmp_path / "cut", *common, "trainer.resume=auto"))
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    after = dict(resumed.model.named_parameters())
    assert all(torch.equal(after[k], v) for k, v in now.items())


def test_reselect_must_be_run_or_epoch():
    with pytest.raises(ConfigError, match="peft.reselect"):
        HFT(reselect="stage")
