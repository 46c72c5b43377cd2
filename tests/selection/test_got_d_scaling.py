"""GOT-D's scaling-domain Sinkhorn (the fast path) gives the log-domain iterations' potentials, iteration count and
marginal error, hands over to the log domain when its sums underflow, and leaves the selection unchanged."""

from __future__ import annotations

import pytest
import torch

from ftune.selection import got_d
from ftune.selection.got_d import sinkhorn, sinkhorn_log


def _cost(n, m, seed=0, shift=0.5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, 8, generator=gen), dim=1).double()
    y = torch.nn.functional.normalize(torch.randn(m, 8, generator=gen) + shift, dim=1).double()
    return torch.cdist(x, y).pow(2)


@pytest.mark.parametrize("fraction,max_iter", [(0.05, 1000), (0.01, 1000), (0.05, 7)])
def test_same_iterations_as_the_log_domain(fraction, max_iter):
    cost = _cost(300, 40)
    eps = fraction * float(cost.mean())
    f0, g0, it0, err0 = sinkhorn_log(cost, eps, max_iter)
    f1, g1, it1, err1 = sinkhorn(cost, eps, max_iter)
    assert it1 == it0 and err1 == pytest.approx(err0, rel=1e-6, abs=1e-15)
    assert torch.allclose(f1, f0, rtol=0, atol=1e-12) and torch.allclose(g1, g0, rtol=0, atol=1e-12)


def test_underflow_hands_over_to_the_log_domain(monkeypatch):
    # The target at 30 is 900 entropies further from every candidate than their nearest target: its kernel column
    # underflows to 0, so the scaling domain cannot run and the log domain takes over.
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    cost = torch.cdist(x, torch.tensor([[0.0], [30.0]], dtype=torch.float64)).pow(2)
    reference = sinkhorn_log(cost, 1.0, 200)
    calls = []

    def spy(*args):
        calls.append(args[-1])  # the iteration it resumes at
        return sinkhorn_log(*args)

    monkeypatch.setattr(got_d, "sinkhorn_log", spy)
    f, g, it, err = got_d.sinkhorn(cost, 1.0, 200)
    assert calls == [1] and it == reference[2] and err == reference[3]
    assert torch.equal(f, reference[0]) and torch.equal(g, reference[1])


def test_log_domain_resumes_where_it_left_off():
    cost = _cost(50, 7)
    eps = 0.02 * float(cost.mean())
    _, g12, _, _ = sinkhorn_log(cost, eps, 12, tol=0.0)
    f, g, it, err = sinkhorn_log(cost, eps, 40, 0.0, g12, 13)
    ref = sinkhorn_log(cost, eps, 40, tol=0.0)
    assert it == ref[2] == 40 and err == ref[3] and torch.equal(f, ref[0]) and torch.equal(g, ref[1])


def test_selection_unchanged(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    x = torch.nn.functional.normalize(torch.randn(400, 16, generator=gen), dim=1)
    y = torch.nn.functional.normalize(torch.randn(30, 16, generator=gen) + 0.3, dim=1)
    fast, info = got_d.got_d_scores(x, y, 0.05)
    monkeypatch.setattr(got_d, "sinkhorn", sinkhorn_log)
    slow, info_log = got_d.got_d_scores(x, y, 0.05)
    assert info["sinkhorn_iterations"] == info_log["sinkhorn_iterations"]
    assert torch.allclose(fast, slow, rtol=0, atol=1e-10)
    budget = 50
    top = sorted(range(400), key=lambda i: (float(fast[i]), i))[:budget]
    assert top == sorted(range(400), key=lambda i: (float(slow[i]), i))[:budget]
