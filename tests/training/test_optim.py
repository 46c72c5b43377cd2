"""build_optimizer: AdamW groups (no weight decay on biases and norms, a PEFT method's lr scale) and torch's fused
kernel whenever it can run, which gives the step of the loop-over-tensors default."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ftune.training.optim import build_optimizer

T = SimpleNamespace(lr=1e-3, weight_decay=0.1, adam_betas=[0.9, 0.999], adam_eps=1e-8)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))


def test_groups_and_the_fused_kernel_on_cpu():
    opt = build_optimizer(model(), T, lr_scale=lambda name: 4.0 if name.startswith("2.") else 1.0)
    assert opt.defaults["fused"] is True
    shapes = {(g["weight_decay"], g["lr"]): sorted(tuple(p.shape) for p in g["params"]) for g in opt.param_groups}
    assert shapes == {(0.1, 1e-3): [(16, 8)], (0.0, 1e-3): [(16,), (16,), (16,)], (0.1, 4e-3): [(4, 16)],
                      (0.0, 4e-3): [(4,)]}


def test_groups_by_the_real_shape_of_a_zero3_placeholder():
    """Under DeepSpeed ZeRO-3 each rank's parameter is an empty placeholder (shape [0]) with the real shape in
    `ds_shape`: the weight matrices still get weight decay (by p.ndim none did)."""
    m = model()
    for p in m.parameters():
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    opt = build_optimizer(m, T)
    shapes = {g["weight_decay"]: sorted(tuple(p.ds_shape) for p in g["params"]) for g in opt.param_groups}
    assert shapes == {0.1: [(4, 16), (16, 8)], 0.0: [(4,), (16,), (16,), (16,)]}


def test_fused_steps_like_torchs_default():
    a, b, start = model(), model(), model().state_dict()
    fused = build_optimizer(a, T)
    plain = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"], "lr": g["lr"]}
                               for g in build_optimizer(b, T).param_groups], foreach=False)
    x = torch.randn(32, 8)
    for _ in range(3):
        for m, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert not torch.equal(p, start[name])  # it stepped
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
