"""Preference losses against values derived by hand."""

from __future__ import annotations

import math

import pytest
import torch

from ftune.objectives.preference import log_odds, preference_loss

T = torch.tensor


def call(loss, c, r, rc=None, rr=None, lc=1.0, lr=1.0, **kw):
    rc_t = None if rc is None else T([rc])
    rr_t = None if rr is None else T([rr])
    return preference_loss(T([c]), T([r]), rc_t, rr_t, T([lc]), T([lr]), loss=loss, **kw)


def test_dpo_equals_log2_when_policy_is_reference():
    losses, cr, rr = call("sigmoid", -3.0, -5.0, -3.0, -5.0, beta=0.1)
    assert losses.item() == pytest.approx(math.log(2))
    assert cr.item() == 0 and rr.item() == 0


def test_dpo_value_by_hand():
    # h = (-2 - -3) - (-6 - -4) = 1 - (-2) = 3; beta 0.5 -> -log sigmoid(1.5) = log(1 + e^-1.5)
    losses, cr, rr = call("sigmoid", -2.0, -6.0, -3.0, -4.0, beta=0.5)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.5)))
    assert cr.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-1.0)


def test_cdpo_with_zero_smoothing_is_dpo_and_smoothing_is_symmetric_mix():
    dpo = call("sigmoid", -2.0, -6.0, -3.0, -4.0, beta=0.5)[0]
    assert call("cdpo", -2.0, -6.0, -3.0, -4.0, beta=0.5, label_smoothing=0.0)[0].item() == pytest.approx(dpo.item())
    eps = 0.2
    expected = (1 - eps) * math.log1p(math.exp(-1.5)) + eps * math.log1p(math.exp(1.5))
    got = call("cdpo", -2.0, -6.0, -3.0, -4.0, beta=0.5, label_smoothing=eps)[0].item()
    assert got == pytest.approx(expected)


def test_ipo_by_hand():
    # h = (-1 - -2) - (-3 - -3) = 1
    assert call("ipo", -1.0, -3.0, -2.0, -3.0, beta=0.5)[0].item() == pytest.approx(0.0)   # (1 - 1)^2
    assert call("ipo", -1.0, -3.0, -2.0, -3.0, beta=0.25)[0].item() == pytest.approx(1.0)  # (1 - 2)^2


def test_simpo_by_hand_and_reference_free():
    # beta 2: chosen -4/2*2 = -4, rejected -9/3*2 = -6; gamma 1 -> -log sigmoid(-4 + 6 - 1)
    losses, cr, rr = call("simpo", -4.0, -9.0, lc=2.0, lr=3.0, beta=2.0, simpo_gamma=1.0)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.0)))
    assert (cr.item(), rr.item()) == (pytest.approx(-4.0), pytest.approx(-6.0))


def test_orpo_by_hand():
    # P_w = 0.5 -> log odds 0; P_l = 0.2 -> odds 0.25; ratio term = -log sigmoid(log 4) = log 1.25
    c, r = math.log(0.5) * 3, math.log(0.2) * 2
    losses = call("orpo", c, r, lc=3.0, lr=2.0, orpo_lambda=0.1)[0]
    assert losses.item() == pytest.approx(-math.log(0.5) + 0.1 * math.log(1.25), rel=1e-5)
    assert log_odds(T([math.log(0.2)])).item() == pytest.approx(math.log(0.25), rel=1e-5)


@pytest.mark.parametrize("loss", ["sigmoid", "cdpo", "ipo", "simpo", "orpo"])
def test_gradient_descent_increases_the_margin(loss):
    c = T([-5.0], requires_grad=True)
    r = T([-5.0], requires_grad=True)
    losses, _, _ = preference_loss(c, r, T([-5.0]), T([-5.0]), T([4.0]), T([4.0]), loss=loss, beta=0.1,
                                   label_smoothing=0.1)
    losses.sum().backward()
    assert c.grad.item() < 0 < r.grad.item()  # descent raises lp(chosen) and lowers lp(rejected)


def test_reference_losses_need_reference():
    with pytest.raises(ValueError, match="reference"):
        call("sigmoid", -1.0, -2.0)
