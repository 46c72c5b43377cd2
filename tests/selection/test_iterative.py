"""selection=iterative (Diversify and Conquer, Algorithm 1): the round budgets, the cluster weights softmax(mean S),
the draw by weight, and whole runs on the tiny random model where the reward decides which cluster grows."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from ftune.config import ConfigError
from ftune.selection.iterative import IterativeKMQ, cluster_weights, draw_by_weight, round_budgets

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from _fake import FakeEmbedder  # noqa: E402
from _tiny import make_cfg  # noqa: E402


def test_round_budgets_sum_to_the_budget():
    assert round_budgets(10, 3) == [4, 3, 3]
    assert round_budgets(9, 3) == [3, 3, 3]
    assert round_budgets(5, 1) == [5]


def test_cluster_weights_are_softmax_of_mean_scores_unscored_get_the_mean():
    labels = torch.tensor([0, 0, 1, 1, 2])
    w, means = cluster_weights(labels, 3, {0: 1.0, 1: 0.0, 2: 2.0})  # cluster 2 never scored
    assert means == [0.5, 2.0, None]
    s = torch.tensor([0.5, 2.0, 1.25], dtype=torch.float64)
    assert torch.allclose(w, torch.softmax(s, 0))
    assert math.isclose(float(w.sum()), 1.0)
    # Next round only cluster 1 is scored: clusters 0 (and 2, still unknown) keep what they had.
    w, means = cluster_weights(labels, 3, {2: 4.0}, prior=means)
    assert means == [0.5, 4.0, None]
    assert torch.allclose(w, torch.softmax(torch.tensor([0.5, 4.0, 2.25], dtype=torch.float64), 0))


def test_draw_by_weight_exact_new_and_spills_from_an_exhausted_cluster():
    labels = torch.tensor([0] * 5 + [1] * 20)
    gen = torch.Generator().manual_seed(0)
    # All weight on cluster 0 (5 examples, 2 taken): its 3 free examples, then the rest from cluster 1.
    out = draw_by_weight(labels, 2, torch.tensor([1.0, 0.0]), 8, {0, 1}, gen)
    assert len(out) == len(set(out)) == 8 and not {0, 1} & set(out)
    assert sorted(i for i in out if i < 5) == [2, 3, 4] and sum(i >= 5 for i in out) == 5
    # Weights 3:1: the draw follows them (1,000 draws from two large clusters).
    big = torch.tensor([0] * 2000 + [1] * 2000)
    out = draw_by_weight(big, 2, torch.tensor([0.75, 0.25]), 1000, set(), torch.Generator().manual_seed(1))
    frac = sum(i < 2000 for i in out) / 1000
    assert 0.70 < frac < 0.80


POOL = 24  # 12 "plus" questions (cluster A), 12 "times" questions (cluster B)


def pool_records():
    recs = []
    for i in range(POOL):
        op = "plus" if i % 2 == 0 else "times"
        recs.append({"id": f"r{i}", "messages": [{"role": "user", "content": f"What is {i} {op} 2?"},
                                                 {"role": "assistant", "content": f"It is #### {i}"}]})
    return recs


def reward_times(items):
    """S_i = 5 for the "times" questions, 0 otherwise: the model "fails" only there."""
    return [5.0 if "times" in it["prompt"][-1]["content"] else 0.0 for it in items]


def make(tmp_path, **kw):
    recs = pool_records()
    vectors = {r["id"]: ([1.0, 0.0] if "plus" in r["messages"][0]["content"] else [0.0, 1.0]) for r in recs}
    sel = IterativeKMQ(**{"budget": 12, "rounds": 3, "round_steps": 2, "k": 2, "quality": "none",
                          "max_new_tokens": 4, "progress": False, **kw})
    sel.kmq.embedder = sel.kmq.scorer = FakeEmbedder(vectors)
    sel.bind_config(make_cfg(tmp_path / "run", "trainer.batch_size=2", "trainer.max_steps=1"))
    return sel, recs


def test_reward_steers_later_rounds_to_the_failing_cluster(tmp_path, ftune_home):
    sel, recs = make(tmp_path, reward=f"{__name__}.reward_times")
    s = sel.select(recs, seed=0)
    assert len(s.indices) == len(set(s.indices)) == 12
    times = {i for i, r in enumerate(recs) if "times" in r["messages"][0]["content"]}
    rep = s.report
    # Round 1 is kMQ: 4 examples, 2 per cluster. Later rounds: weights softmax([0, 5]) = [0.0067, 0.9933].
    assert rep["round_budgets"] == [4, 4, 4] and len(rep["round_reports"]) == 2
    first = rep["round_reports"][0]
    assert first["trained_on"] == 4 and first["scored"] == 4 and first["cluster_mean_S"] in ([0.0, 5.0], [5.0, 0.0])
    assert max(first["cluster_weights"]) == pytest.approx(1 / (1 + math.exp(-5)), abs=1e-4)
    assert rep["round_reports"][1]["trained_on"] == 8
    assert len(times & set(s.indices)) >= 10  # 2 from round 1, then (almost) all 8 later draws
    # The scores are the S_i of the scored examples (rounds 1 and 2), NaN elsewhere.
    scored = [i for i, v in enumerate(s.scores) if not math.isnan(v)]
    assert len(scored) == 8 and all(s.scores[i] == (5.0 if i in times else 0.0) for i in scored)
    # Deterministic under the seed.
    again, _ = make(tmp_path / "again", reward=f"{__name__}.reward_times")
    assert again.select(recs, seed=0).indices == s.indices


def test_numeric_match_reward_and_inline_training(tmp_path, ftune_home):
    """`ftune train selection=iterative`: the rounds train inside the run, then the run trains on the selection; the
    tiny random model answers nothing right, so every S_i is 1 and the weights stay uniform."""
    from ftune.train import Trainer

    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pool_records()))
    cfg = make_cfg(tmp_path / "run", "data=jsonl", f"data.path={path}", "data.eval_size=0", "selection=iterative",
                   "selection.budget=9", "selection.rounds=2", "selection.round_steps=1", "selection.k=2",
                   "selection.quality=none", "selection.max_new_tokens=4", "trainer.batch_size=2",
                   "trainer.max_steps=2")
    trainer = Trainer(cfg)
    rep = trainer.data.stats["selection"]
    assert trainer.data.stats["train_examples"] == 9 and rep["round_budgets"] == [5, 4]
    r1 = rep["round_reports"][0]
    assert r1["answer_accuracy"] == 0.0 and r1["mean_S"] == 1.0
    assert r1["cluster_weights"] == [0.5, 0.5]
    summary = trainer.run()
    assert summary["steps"] == 2 and (tmp_path / "run" / "final").exists()
    assert summary["selection"]["round_reports"] == rep["round_reports"]  # the run's summary says what was kept


def test_bad_settings_refused():
    with pytest.raises(ConfigError, match="selection.rounds"):
        IterativeKMQ(budget=10, rounds=0)
    with pytest.raises(ConfigError, match="less than selection.rounds"):
        IterativeKMQ(budget=2, rounds=3)
    with pytest.raises(ConfigError, match="selection.reward"):
        IterativeKMQ(budget=10, reward="no_such_reward")
    with pytest.raises(ConfigError, match="selection.round_steps=0 must be epoch"):
        IterativeKMQ(budget=10, round_steps=0)
    with pytest.raises(ConfigError, match="selection.round_steps='ep' must be epoch"):
        IterativeKMQ(budget=10, round_steps="ep")
    with pytest.raises(ConfigError, match="reward=reward_model needs selection.reward_model"):
        IterativeKMQ(budget=10, reward="reward_model")
    sel = IterativeKMQ(budget=30, rounds=3, k=2, quality="none")
    with pytest.raises(ConfigError, match="larger than the pool"):
        sel.select(pool_records(), 0)


def test_a_round_trains_one_epoch_by_default_as_the_paper(tmp_path):
    # The audit's defect: 20 steps per round where the paper trains one epoch on the selection so far.
    from omegaconf import OmegaConf

    sel = IterativeKMQ(budget=10, rounds=2, k=2, quality="none")
    sel.bind_config(OmegaConf.create(OmegaConf.to_container(make_cfg(tmp_path / "r"), resolve=True)))
    cfg = sel.round_config(tmp_path / "x.jsonl", tmp_path / "out", 0)
    assert (cfg.trainer.max_steps, cfg.trainer.epochs) == (-1, 1)
    sel.round_steps = 7
    assert sel.round_config(tmp_path / "x.jsonl", tmp_path / "out", 0).trainer.max_steps == 7
