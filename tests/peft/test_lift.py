"""peft=lift: principal-weight masks by hand, the masked AdamW step by hand, moment carry-over on a mask refresh, and
training where only k entries per matrix move."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
from _tiny import crash_after_checkpoint, losses, make_cfg, run  # noqa: E402

from ftune.peft.lift import MaskedAdamW, budget, principal_mask  # noqa: E402


def test_budget_is_lora_parameter_count_capped_at_the_matrix():
    assert budget(64, 32, 2) == 192 and budget(4, 4, 8) == 16


def test_mask_comes_from_the_low_rank_approximation():
    # W = 10 e1 [0.8, 0.6, 0, 0] + 9 e2 [0, 0, 0, 1]: rows [8, 6, 0, 0] and [0, 0, 0, 9]
    w = torch.zeros(4, 4)
    w[0, :2] = torch.tensor([8.0, 6.0])
    w[1, 3] = 9.0
    assert principal_mask(w, filter_rank=4, k=2).tolist() == [0, 7]  # |W| itself: 8 at (0,0), 9 at (1,3)
    assert principal_mask(w, filter_rank=1, k=2).tolist() == [0, 1]  # rank 1 keeps only the first component's row


def _opt(p, **kw):
    args = dict(lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.5, rank=1, filter_rank=1, update_interval=0)
    return MaskedAdamW([p], **{**args, **kw})


def test_masked_adamw_step_by_hand():
    p = torch.nn.Parameter(torch.cat([torch.tensor([[4.0, 3.0, 0.1, 0.1, 0.1, 0.1]]), torch.zeros(1, 6)]))
    # rank 1: k = min((2 + 6) * 1, 12) = 8 -> the 8 largest of |W'|, W' = W (W has rank 1): 4, 3, four 0.1, and two 0s
    opt = _opt(p)
    p.grad = torch.full_like(p, 2.0)
    before = p.detach().clone()
    opt.step()
    idx = opt.state[p]["idx"]
    assert idx.numel() == 8 and {0, 1, 2, 3, 4, 5} <= set(idx.tolist())
    # first Adam step, g = 2: m = 0.1 g = 0.2, v = 0.01 g^2 = 0.04; m_hat = 2, v_hat = 4 -> 2 / (sqrt(4) + eps)
    expected = before.view(-1).clone()
    expected[idx] = expected[idx] * (1 - 0.1 * 0.5) - 0.1 * 2 / (2 + 1e-8)
    torch.testing.assert_close(p.detach().view(-1), expected)
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(p.detach().view(-1)[untouched], before.view(-1)[untouched])  # no decay, no update outside M
    assert opt.state[p]["exp_avg"].shape == (8,)  # moments are length-k vectors


def test_mask_refresh_carries_moments_over_and_keeps_the_step():
    p = torch.nn.Parameter(torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]] + [[0.0] * 6]))
    opt = _opt(p, weight_decay=0.0, update_interval=0)
    p.grad = torch.arange(12, dtype=torch.float32).view(2, 6)
    opt.step()
    st = opt.state[p]
    old = dict(zip(st["idx"].tolist(), st["exp_avg"].tolist()))
    with torch.no_grad():  # make row 1 dominant: the next mask moves there
        p[1] = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0, 4.0])
    opt.refresh(p, opt.param_groups[0])
    new = st["idx"].tolist()
    assert new != sorted(old)
    for i, m in zip(new, st["exp_avg"].tolist()):
        assert m == (old[i] if i in old else 0.0)  # kept indices keep their moment, new ones start at zero
    assert float(st["step"]) == 1.0


def test_lift_trains_k_entries_per_matrix(tmp_path):
    t = run(make_cfg(tmp_path / "l", "peft=lift", "peft.rank=2", "peft.filter_rank=4", "peft.update_interval=2",
                     "data.size=8", "trainer.max_steps=3", "trainer.batch_size=2", "trainer.lr=1e-2"))
    from transformers import AutoModelForCausalLM

    from ftune.models.loading import resolve_model_dir

    base = dict(AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny_random")).named_parameters())
    moved = 0
    for name, p in t.model.named_parameters():
        changed = int((p.detach() != base[name]).sum())
        if p.requires_grad:
            m, n = p.shape
            k = budget(m, n, 2)
            # the mask was refreshed after step 2: at most the entries of two masks, at least those of one
            assert 0 < changed <= 2 * k, name
            moved += 1
        else:
            assert changed == 0, name  # embeddings, head, norms bit-identical
    assert moved == 14  # 7 linear layers x 2 blocks
    assert all(math.isfinite(x) for x in losses(tmp_path / "l"))


@pytest.mark.parametrize("bad", [["peft.rank=0"], ["peft.update_interval=-1"]])
def test_bad_options(tmp_path, bad):
    from ftune.config import ConfigError, build

    with pytest.raises(ConfigError):
        build(make_cfg(tmp_path, "peft=lift", *bad).peft)


def test_resume_restores_masks_and_moments(tmp_path, monkeypatch):

    common = ["peft=lift", "peft.rank=2", "peft.filter_rank=4", "peft.update_interval=3", "data.size=8",
              "trainer.max_steps=4", "trainer.save_every=2", "trainer.batch_size=2", "trainer.lr=1e-2"]
    full = run(make_cfg(tmp_path / "full", *common))
    crash_after_checkpoint(monkeypatch, make_cfg(tmp_path / "resumed", *common), "checkpoint-2")
    resumed = run(make_cfg(tmp_path / "resumed", *common, "trainer.resume=auto"))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")  # the refresh at step 3 happens after resume
    after = dict(resumed.model.named_parameters())
    assert all(torch.equal(p, after[n]) for n, p in full.model.named_parameters())
