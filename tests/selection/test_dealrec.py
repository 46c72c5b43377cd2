"""selection=dealrec: LiSSA's fixed point, coverage-enhanced sampling by hand, the effort as a gradient norm, and a
full pass on the tiny random model (exact budget, no duplicates, seeded)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ftune.config import ConfigError
from ftune.selection.dealrec import DEALRec, coverage_sample, lissa, minmax

sys.path.insert(0, str(Path(__file__).parent))
from _fake import records  # noqa: E402


def test_lissa_converges_to_the_damped_inverse():
    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    v = torch.tensor([1.0, -2.0], dtype=torch.float64)
    damp, scale = 0.01, 5.0
    got = lissa(v, lambda t, h: a @ h, steps=3000, damp=damp, scale=scale)
    expected = torch.linalg.solve(a + damp * scale * torch.eye(2, dtype=torch.float64), v)
    assert torch.allclose(got, expected, atol=1e-8)


def test_coverage_sample_by_hand():
    # 10 scores; hard_prune 0.2 drops the two highest (9, 8). Remaining 0..7 in 2 strata of width 3.5:
    # [0, 3.5) -> {0,1,2,3}, [3.5, 7] -> {4,5,6,7}. m=4: the first stratum (tie, lower index first) gives floor(4/2)=2,
    # the second min(4, 2)=2.
    scores = [float(i) for i in range(10)]
    got = coverage_sample(scores, 4, strata=2, hard_prune=0.2, gen=torch.Generator().manual_seed(0))
    assert len(got) == 4 and not {8, 9} & set(got)
    assert sum(i < 4 for i in got) == 2 and sum(4 <= i < 8 for i in got) == 2
    # Uneven strata: scores 0, 0, 0, 0, 0, 0, 10 with 2 strata and m=3: the one-example stratum first (takes 1),
    # then floor(2/1)=2 from the other.
    got = coverage_sample([0.0] * 6 + [10.0], 3, strata=2, hard_prune=0.0, gen=torch.Generator().manual_seed(0))
    assert 6 in got and len(got) == 3 == len(set(got))


@pytest.mark.parametrize("m", [1, 5, 9, 17, 30])
def test_coverage_sample_budget_exact(m):
    scores = torch.rand(30, generator=torch.Generator().manual_seed(m)).pow(3).tolist()
    got = coverage_sample(scores, m, strata=7, hard_prune=0.1, gen=torch.Generator().manual_seed(0))
    assert len(got) == m == len(set(got))


def test_minmax():
    assert torch.allclose(minmax(torch.tensor([2.0, 4.0, 3.0])), torch.tensor([0.0, 1.0, 0.5]))


def test_tiny_model_end_to_end(ftune_home):
    from transformers import AutoModelForCausalLM

    recs = records(8)
    sel = DEALRec(budget=4, surrogate="tiny_random", lissa_steps=5, strata=3, max_length=64, progress=False)
    influence, effort, names = sel.scores(recs, seed=0)
    assert names == {"influence_param": "model.layers.1.mlp.down_proj.weight",
                     "effort_param": "model.layers.1.self_attn.v_proj.weight"}
    # The effort of example 0 is the norm of its loss gradient w.r.t. the v_proj weight, by plain autograd.
    from ftune.data.tokenize import tokenize_conversation
    from ftune.models.loading import load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir("tiny_random")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    ids, labels = tokenize_conversation(load_tokenizer(model_dir), recs[0]["messages"])
    loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
    (g,) = torch.autograd.grad(loss, model.model.layers[1].self_attn.v_proj.weight)
    assert float(effort[0]) == pytest.approx(float(g.norm()), rel=1e-4)
    assert torch.isfinite(influence).all() and influence.abs().sum() > 0
    sel.scores = lambda r, seed: (influence, effort, names)  # one pass of the model is enough for the rest
    a = sel.select(recs, seed=0)
    assert len(a.indices) == 4 == len(set(a.indices)) and a.report["hard_pruned"] == 0  # int(8 * 0.1) = 0
    score = minmax(influence) + minmax(effort)
    assert a.scores == pytest.approx(score.tolist())
    assert sel.select(recs, seed=0).indices == a.indices


@pytest.mark.parametrize(("kw", "pattern"), [
    ({"budget": 0}, r"selection\.budget=0"),
    ({"budget": 3, "hard_prune": 1.0}, r"selection\.hard_prune=1\.0"),
    ({"budget": 3, "scale": 0.0}, r"scale=0\.0 > 0"),
])
def test_bad_config(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        DEALRec(**kw)


def test_budget_above_pool_fails_before_loading(monkeypatch):
    sel = DEALRec(budget=20)
    monkeypatch.setattr(sel, "_load", lambda name: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(ConfigError, match=r"selection\.budget=20 is larger than the pool of 12"):
        sel.select(records(12), 0)


def test_hessian_vector_product_matches_finite_differences(ftune_home):
    sel = DEALRec(budget=1, max_length=64)
    model, tok, device = sel._load("tiny_random")
    model.double()  # central differences need the precision
    phi = model.model.layers[1].mlp.down_proj.weight
    ids, labels = next(sel._batches(records(1), tok, device))
    h = torch.randn(phi.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    hv = sel.hvp(model, phi, ids, labels, h)

    def grad_at(delta):
        with torch.no_grad():
            phi.add_(delta * h)
        phi.requires_grad_(True)
        (g,) = torch.autograd.grad(sel._loss(model, ids, labels), phi)
        phi.requires_grad_(False)
        with torch.no_grad():
            phi.sub_(delta * h)
        return g

    fd = (grad_at(1e-3) - grad_at(-1e-3)) / 2e-3
    assert float((hv - fd).abs().max()) < 1e-3 * float(fd.abs().max())


def _exact(sel, recs):
    """Each example's loss gradient and exact Hessian w.r.t. the final norm's weight (64 numbers), in float64."""
    from torch.func import functional_call

    model, tok, device = sel._load("tiny_random")
    model.double()
    name = "model.norm.weight"
    phi0 = dict(model.named_parameters())[name].detach().clone()
    grads, hessians = [], []
    for ids, labels in sel._batches(recs, tok, device):
        def loss(w, ids=ids, labels=labels):
            return functional_call(model, {name: w}, kwargs={"input_ids": ids, "labels": labels,
                                                             "use_cache": False}).loss
        w = phi0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(w), w)
        grads.append(g)
        hessians.append(torch.autograd.functional.hessian(loss, phi0.clone(), vectorize=True))
    return model, tok, device, grads, hessians


def test_influence_is_the_inverse_hessian_vector_product_times_the_gradient_by_hand(ftune_home, monkeypatch):
    # I(s) = (H^-1 v)^T grad L(s), v the mean training gradient, H the (damped) Hessian of the surrogate's risk, on a
    # parameter small enough (64 numbers) for H to be computed exactly. A wrong sign, a missing Hessian (h = v), or a
    # wrong damping all fail here; the other tests would not notice them.
    recs = records(2)
    sel = DEALRec(budget=1, influence_param="model.norm.weight", effort_param="model.norm.weight", max_length=64,
                  progress=False)
    model, tok, device, grads, hessians = _exact(sel, recs)
    monkeypatch.setattr(sel, "_load", lambda name: (model, tok, device))

    # One example: LiSSA's fixed point is (H + damp * scale * I)^-1 v exactly; knobs chosen from H so it converges.
    eig = torch.linalg.eigvalsh(hessians[0])
    sel.scale, sel.damp, sel.lissa_steps = 2 * float(eig.max()) + 1.0, 0.5, 60
    assert sel.damp * sel.scale > -float(eig.min())  # the damped Hessian is positive definite
    influence, _, _ = sel.scores(recs[:1], seed=0)
    g = grads[0]
    want = g @ torch.linalg.solve(hessians[0] + sel.damp * sel.scale * torch.eye(64, dtype=torch.float64), g)
    assert float(influence[0]) == pytest.approx(float(want), rel=1e-6)
    assert float(influence[0]) != pytest.approx(float(g @ g) / (sel.damp * sel.scale), rel=1e-3)  # the Hessian counts

    # Two examples: LiSSA's recursion over the seeded sample of single examples, with each exact H_i, then
    # I(s) = (h / scale)^T grad L(s) for every s.
    sel.lissa_steps = 12
    influence, _, _ = sel.scores(recs, seed=7)
    sample = torch.randint(2, (sel.lissa_steps,), generator=torch.Generator().manual_seed(7)).tolist()
    v = sum(grads) / 2
    h = v.clone()
    for t in sample:
        h = v + (1 - sel.damp) * h - hessians[t] @ h / sel.scale
    want = torch.stack([(h / sel.scale) @ g for g in grads])
    torch.testing.assert_close(influence, want, rtol=1e-6, atol=1e-12)
    assert len(set(sample)) > 1 and (want > 0).any()
