"""The GRPO family's maths (ftune/objectives/grpo_loss.py) against hand-computed values (shared/METHODS.md §16)."""

from __future__ import annotations

import math

import pytest
import torch

from ftune.objectives import grpo_loss as G


def test_advantages_by_hand_for_each_scaling():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    std = math.sqrt(4 * 0.25 / 3)  # Bessel-corrected std of (1, 0, 0, 1)
    group = G.advantages(r, 4, "group")
    a = 0.5 / (std + 1e-4)
    assert group[:4].tolist() == pytest.approx([a, -a, -a, a])
    assert group[4:].tolist() == [0.0] * 4  # equal rewards: no signal
    assert G.advantages(r, 4, "none").tolist() == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]  # Dr. GRPO
    batch_std = r.std().item()
    assert G.advantages(r, 4, "batch")[:4].tolist() == pytest.approx([x / (batch_std + 1e-4)
                                                                      for x in (0.5, -0.5, -0.5, 0.5)])
    with pytest.raises(ValueError, match="groups of 1"):
        G.advantages(r, 1)
    with pytest.raises(ValueError, match="groups of 3"):
        G.advantages(r, 3)


def _batch():
    torch.manual_seed(0)
    logp = (-torch.rand(4, 5) * 2).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0])
    return logp, mask, adv


def test_one_pass_is_the_policy_gradient_with_a_group_baseline():
    # mu = 1: old log-probs are the current ones, rho = 1, nothing clipped; d loss / d lp_it = -A_i / (G |o_i|) (grpo).
    logp, mask, adv = _batch()
    loss, stats = G.token_losses(logp, logp.detach(), adv, mask)
    assert stats["clip_low"] == stats["clip_high"] == 0.0
    G.aggregate(loss, mask, "grpo").backward()
    lengths = mask.sum(-1, keepdim=True)
    assert torch.allclose(logp.grad, -adv.unsqueeze(-1) / (4 * lengths) * mask)


@pytest.mark.parametrize(("loss_type", "norm"), [("bnpo", 11.0), ("dapo", 11.0), ("dr_grpo", 4 * 8)])
def test_token_level_normalisers(loss_type, norm):
    logp, mask, adv = _batch()
    loss, _ = G.token_losses(logp, logp.detach(), adv, mask)
    G.aggregate(loss, mask, loss_type, max_completion_length=8).backward()
    assert torch.allclose(logp.grad, -adv.unsqueeze(-1) / norm * mask)


def test_dapo_weighs_every_token_of_the_accumulated_batch_alike():
    logp, mask, adv = _batch()
    loss, _ = G.token_losses(logp, logp.detach(), adv, mask)
    whole = G.aggregate(loss, mask, "dapo")
    halves = sum(G.aggregate(loss[i:i + 2], mask[i:i + 2], "dapo", batch_tokens=mask.sum()) for i in (0, 2))
    assert torch.allclose(whole, halves)
    assert not torch.allclose(whole, sum(G.aggregate(loss[i:i + 2], mask[i:i + 2], "bnpo") for i in (0, 2)) / 2)


def test_duplicating_a_completion_doubles_its_dr_grpo_weight_but_not_its_grpo_weight():
    lp = torch.tensor([[-1.0, -1.0, 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    short = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    long = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # the second one's tokens, twice
    adv = torch.tensor([0.0, 1.0])
    loss, _ = G.token_losses(lp, lp, adv, long)
    loss_s, _ = G.token_losses(lp, lp, adv, short)
    assert G.aggregate(loss, long, "dr_grpo", 4) == pytest.approx(2 * G.aggregate(loss_s, short, "dr_grpo", 4))
    assert G.aggregate(loss, long, "grpo") == pytest.approx(G.aggregate(loss_s, short, "grpo"))


@pytest.mark.parametrize(("rho", "adv", "moves"), [
    (1.25, 1.0, True), (1.30, 1.0, False),   # clip-higher: A > 0 is clipped above 1 + 0.28 only
    (0.85, -1.0, True), (0.79, -1.0, False),  # A < 0 is clipped below 1 - 0.2 only
    (0.5, 1.0, True), (2.0, -1.0, True),     # the other side of each never clips (the min keeps the worse)
])
def test_clipping_engages_only_outside_the_interval(rho, adv, moves):
    old = torch.zeros(1, 1)
    logp = torch.full((1, 1), math.log(rho), requires_grad=True)
    loss, stats = G.token_losses(logp, old, torch.tensor([adv]), torch.ones(1, 1), epsilon=0.2, epsilon_high=0.28)
    G.aggregate(loss, torch.ones(1, 1), "dapo").backward()
    assert (logp.grad.abs().item() > 0) == moves
    assert (stats["clip_high"] + stats["clip_low"] > 0) == (not moves)


def test_equal_rewards_give_no_gradient_and_k3_is_zero_only_at_the_reference():
    logp, mask, _ = _batch()
    adv = G.advantages(torch.ones(4), 4)
    loss, _ = G.token_losses(logp, logp.detach() - 0.1, adv, mask)
    G.aggregate(loss, mask, "dapo").backward()
    assert torch.count_nonzero(logp.grad) == 0
    x = torch.tensor([-1.0, -2.0])
    assert G.k3_kl(x, x).tolist() == [0.0, 0.0]
    assert (G.k3_kl(x, x + torch.tensor([0.3, -0.3])) > 0).all()
    loss, stats = G.token_losses(x.view(1, 2), x.view(1, 2), torch.zeros(1), torch.ones(1, 2), beta=0.1,
                                 ref_logp=x.view(1, 2) + 0.5)
    assert loss.flatten().tolist() == pytest.approx([0.1 * (math.exp(0.5) - 1.5)] * 2)
    assert stats["kl"] == pytest.approx(math.exp(0.5) - 1.5)


def test_sequence_level_ratio_is_one_per_completion():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    old = torch.tensor([[-1.5, -2.0, -9.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rho = G.ratios(lp, old, mask, "sequence")
    assert rho[0].tolist() == pytest.approx([math.exp(0.25)] * 3)  # mean of (0.5, 0.0); the padded token not counted
    assert rho[1].tolist() == pytest.approx([1.0] * 3)


def test_soft_overlong_punishment():
    assert G.soft_overlong_punishment(torch.tensor([80, 90, 101]), 100, 20).tolist() == [0.0, -0.5, -1.0]


def test_policy_gradient_on_a_tiny_model():
    # mu = 1, beta = 0, grpo: autograd's gradient of the loss on a tiny LM equals
    # sum_i A_i / (G |o_i|) * grad(-sum_t log pi(o_it)), the policy gradient with the group mean as baseline.
    torch.manual_seed(1)
    lm = torch.nn.Sequential(torch.nn.Embedding(7, 5), torch.nn.Linear(5, 7))
    ctx = torch.randint(0, 7, (4, 3))
    out = torch.randint(0, 7, (4, 3))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.float)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    adv = G.advantages(rewards, 4)

    def logps():
        return torch.log_softmax(lm(ctx), -1).gather(-1, out.unsqueeze(-1)).squeeze(-1)

    lp = logps()
    loss, _ = G.token_losses(lp, lp.detach(), adv, mask)
    grads = torch.autograd.grad(G.aggregate(loss, mask, "grpo"), list(lm.parameters()))
    expected = [torch.zeros_like(p) for p in lm.parameters()]
    for i in range(4):
        g = torch.autograd.grad(-(logps()[i] * mask[i]).sum(), list(lm.parameters()))
        for e, gi in zip(expected, g):
            e += adv[i] / (4 * mask[i].sum()) * gi
    for a, b in zip(grads, expected):
        assert torch.allclose(a, b, atol=1e-6)
