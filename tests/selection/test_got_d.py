"""selection=got_d: Sinkhorn's plan has the right marginals, the calibrated gradient by hand, nearest-to-target points
first on a toy 2-D set, and the target file checked before any model loads."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from ftune.config import ConfigError
from ftune.data.sources import DataError
from ftune.preflight import validate_train
from ftune.selection.got_d import GOTD, calibrated_gradient, got_d_scores, sinkhorn_log

sys.path.insert(0, str(Path(__file__).parent))
from _fake import FakeEmbedder, records  # noqa: E402


def test_sinkhorn_marginals_and_potentials():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 3, generator=g).double(), torch.randn(4, 3, generator=g).double()
    cost = torch.cdist(x, y).pow(2)
    eps = 0.5
    f, gg, _, err = sinkhorn_log(cost, eps, max_iter=5000, tol=1e-10)
    plan = torch.exp((f[:, None] + gg[None, :] - cost) / eps) / (7 * 4)
    assert torch.allclose(plan.sum(1), torch.full((7,), 1 / 7, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(plan.sum(0), torch.full((4,), 1 / 4, dtype=torch.float64), atol=1e-8)
    assert err < 1e-8


def test_single_target_potential_is_the_cost_up_to_a_constant():
    # With one target point, f_i = C_i1 - g - eps*log(1): the potential equals the cost plus one constant.
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    cost = torch.cdist(x, torch.zeros(1, 2, dtype=torch.float64)).pow(2)
    f, _, _, _ = sinkhorn_log(cost, eps=0.3)
    assert torch.allclose(f - f[0], torch.tensor([0.0, 1.0, 9.0], dtype=torch.float64), atol=1e-9)


def test_calibrated_gradient_by_hand():
    f = torch.tensor([1.0, 2.0, 6.0])
    # g_i = f_i - mean of the others: 1 - 4, 2 - 3.5, 6 - 1.5.
    assert torch.allclose(calibrated_gradient(f), torch.tensor([-3.0, -1.5, 4.5]))
    assert torch.allclose(calibrated_gradient(f + 10), calibrated_gradient(f))  # free constant removed


def _toy(budget, tmp_path):
    # Candidates on a ring of radius 1 at angles 0..330 degrees; targets near angle 90 degrees.
    angles = [math.radians(a) for a in range(0, 360, 30)]
    pool = records(len(angles))
    targets = records(3, prefix="t")
    target_path = tmp_path / "target.jsonl"
    target_path.write_text("".join(json.dumps(t) + "\n" for t in targets))
    vectors = {r["id"]: [math.cos(a), math.sin(a)] for r, a in zip(pool, angles)}
    vectors.update({t["id"]: [math.cos(math.radians(d)), math.sin(math.radians(d))]
                    for t, d in zip(targets, (85, 90, 95))})
    sel = GOTD(budget=budget, target_path=str(target_path), epsilon=0.05)
    sel.embedder = FakeEmbedder(vectors)
    return sel, pool, angles


def test_toy_picks_the_points_nearest_the_target_first(tmp_path):
    sel, pool, angles = _toy(3, tmp_path)
    result = sel.select(pool, seed=0)
    # Angles 60, 90, 120 are the three nearest to the targets around 90.
    assert [round(math.degrees(angles[i])) for i in result.indices] == [60, 90, 120]
    order = sorted(range(len(pool)), key=lambda i: result.scores[i])
    dist = [round(min(abs(math.degrees(angles[i]) - 90), 360 - abs(math.degrees(angles[i]) - 90))) for i in order]
    assert dist == sorted(dist)  # the gradient ranks every candidate by its distance to the targets
    assert result.report["selected"] == 3 and result.report["marginal_error"] < 1e-3
    assert sel.select(pool, seed=5).indices == result.indices  # no randomness in OT


def test_scores_are_centred():
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
    s, _ = got_d_scores(x, x[:3], 0.1)
    assert abs(float(s.sum())) < 1e-6  # sum_i (f_i - mean_{j!=i} f_j) = 0


def test_bad_input(tmp_path, compose):
    sel, pool, _ = _toy(13, tmp_path)
    with pytest.raises(ConfigError, match=r"selection\.budget=13 is larger than the pool of 12"):
        sel.select(pool, 0)
    assert sel.embedder.calls == 0
    with pytest.raises(ConfigError, match=r"needs selection\.target_path"):
        GOTD(budget=2).select(pool, 0)
    with pytest.raises(DataError, match=r"no such file"):
        GOTD(budget=2, target_path=str(tmp_path / "nope.jsonl")).select(pool, 0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"no records at all"):
        GOTD(budget=2, target_path=str(empty)).select(pool, 0)
    # Through the config: refused by validate_train, before any model or data loads.
    base = ["selection=got_d", "model=tiny_random"]
    with pytest.raises(ConfigError, match=r"needs selection\.target_path"):
        validate_train(compose(base))
    with pytest.raises(DataError, match=r"no records at all"):
        validate_train(compose([*base, f"selection.target_path={empty}"]))
    with pytest.raises(ConfigError, match=r"selection\.epsilon=0\.0 must be > 0"):
        GOTD(budget=2, epsilon=0.0)


def test_validation_targets_are_validation_problems_of_the_eval_tasks(tmp_path):
    # target_path=validation: GOT-D aims at what the run is scored on, drawn from the validation seeds (not test).
    from ftune.data import reasoning_gym as rg
    from ftune.preflight import validate_train
    from ftune.selection.got_d import GOTD, validation_targets

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from _tiny import make_cfg

    rgd = ["data=reasoning_gym", "data.tasks=[chain_sum]", "data.size=40", "eval=reasoning_gym",
           "eval.tasks=[chain_sum,products]", "eval.limit=10", "eval.overlap=replace"]
    cfg = make_cfg(tmp_path / "g", *rgd, "selection=got_d", "selection.target_path=validation", "selection.budget=5")
    validate_train(cfg)
    targets = validation_targets(cfg, 6)
    assert len(targets) == 6 and {t["id"].rsplit("-val-", 1)[0] for t in targets} == {"chain_sum", "products"}
    assert all(t["messages"][-1]["content"].startswith("<answer>") for t in targets)
    test = {p["entry"]["question"] for p in rg.eval_problems(cfg.data, cfg.eval, cfg.seed)}
    assert not test & {t["messages"][-2]["content"] for t in targets}
    sel = GOTD(budget=2, target_path="validation", target_size=6)
    with pytest.raises(RuntimeError, match="bind_config"):
        sel.targets()
    sel.bind_config(cfg)
    assert [t["id"] for t in sel.targets()] == [t["id"] for t in targets]
    with pytest.raises(ConfigError, match="target_path=validation draws validation problems"):
        validate_train(make_cfg(tmp_path / "h", *rgd, "eval=none", "selection=got_d",
                                "selection.target_path=validation"))
