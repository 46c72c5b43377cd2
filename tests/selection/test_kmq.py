"""selection=kmq: exact budget, no duplicates, every cluster represented, quality-weighted choice inside clusters,
seeded, bad input refused before any model loads, and one pass on the tiny random model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ftune.config import ConfigError
from ftune.selection.kmq import KMQ

sys.path.insert(0, str(Path(__file__).parent))
from _fake import FakeEmbedder, blobs, records  # noqa: E402

SIZES = [40, 25, 10, 5]


def pool():
    recs = records(sum(SIZES))
    # Four directions (the embeddings are L2-normalised before clustering).
    x = blobs([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], SIZES, spread=0.05)
    truth = torch.repeat_interleave(torch.arange(4), torch.tensor(SIZES))
    tokens = {r["id"]: 1 + (i * 7) % 50 for i, r in enumerate(recs)}  # distinct-ish response lengths
    return recs, x, truth, tokens


def make(budget, seed_vectors=None, **kw):
    recs, x, truth, tokens = pool()
    sel = KMQ(budget=budget, **{"k": 4, "quality": "none", **kw})
    sel.embedder = sel.scorer = FakeEmbedder({r["id"]: v.tolist() for r, v in zip(recs, x)},
                                             nll={r["id"]: float(i % 3) for i, r in enumerate(recs)}, tokens=tokens)
    return sel, recs, truth, tokens


@pytest.mark.parametrize("budget", [4, 7, 20, 80])
def test_budget_exact_no_duplicates_every_cluster(budget):
    sel, recs, truth, _ = make(budget)
    result = sel.select(recs, seed=0)
    assert len(result.indices) == budget == len(set(result.indices))
    assert result.indices == sorted(result.indices)
    per_true_cluster = torch.bincount(truth[result.indices], minlength=4).tolist()
    assert all(c >= 1 for c in per_true_cluster)
    assert sorted(result.report["cluster_sizes"]) == sorted(SIZES)
    assert result.report["clusters_represented"] == 4 and sum(result.report["cluster_selected"]) == budget
    kept, report = sel(recs, 0)
    assert [r["id"] for r in kept] == [recs[i]["id"] for i in result.indices] and report["selected"] == budget


def test_budget_is_proportional_to_cluster_size():
    # budget 20, k 4: one each, then 16 by (39, 24, 9, 4)/76 = 8.21 5.05 1.89 0.84 -> 8 5 1 0, +1 to 0.89, +1 to 0.84.
    sel, recs, truth, _ = make(20)
    result = sel.select(recs, seed=0)
    assert torch.bincount(truth[result.indices], minlength=4).tolist() == [9, 6, 3, 2]


def test_quality_weighting_with_low_temperature_takes_the_best_of_each_cluster():
    sel, recs, truth, tokens = make(8, quality="length", temperature=1e-3)
    result = sel.select(recs, seed=0)
    # Budgets for 8: one each, then 4 by (39, 24, 9, 4)/76 = 2.05 1.26 0.47 0.21 -> 3 2 2 1.
    for c in range(4):
        members = (truth == c).nonzero().flatten().tolist()
        picked = [i for i in result.indices if truth[i] == c]
        best = sorted(members, key=lambda i: -tokens[recs[i]["id"]])[: len(picked)]
        assert sorted(tokens[recs[i]["id"]] for i in picked) == sorted(tokens[recs[i]["id"]] for i in best)


def test_perplexity_quality_prefers_low_nll():
    sel, recs, truth, _ = make(4, quality="perplexity", temperature=1e-3)
    result = sel.select(recs, seed=0)
    # nll = i % 3, so the chosen example of each cluster has nll 0.
    assert all(i % 3 == 0 for i in result.indices)


def test_seeded():
    a = make(20)[0].select(make(20)[1], seed=0).indices
    b = make(20)[0].select(make(20)[1], seed=0).indices
    c = make(20)[0].select(make(20)[1], seed=1).indices
    assert a == b and a != c


def test_k_chosen_by_silhouette():
    sel, recs, _, _ = make(10, k=None, k_candidates=[2, 3, 4, 6, 8])
    result = sel.select(recs, seed=0)
    assert result.report["k"] == 4 and set(result.report["k_silhouette"]) == {"2", "3", "4", "6", "8"}


@pytest.mark.parametrize(("kw", "budget", "pattern"), [
    ({}, 81, r"selection\.budget=81 is larger than the pool of 80"),
    ({"k": 81}, 10, r"selection\.k=81 clusters is more than the pool of 80"),
])
def test_bad_sizes_fail_before_embedding(kw, budget, pattern):
    sel, recs, _, _ = make(budget, **kw)
    with pytest.raises(ConfigError, match=pattern):
        sel.select(recs, seed=0)
    assert sel.embedder.calls == 0


@pytest.mark.parametrize(("kw", "pattern"), [
    ({"budget": 0}, r"selection\.budget=0 must be >= 1"),
    ({"budget": 5, "quality": "dieta"}, r"selection\.quality='dieta' must be one of"),
    ({"budget": 5, "k": None, "k_candidates": []}, r"k_candidates.*empty"),
    ({"budget": 5, "temperature": 0.0}, r"selection\.temperature=0\.0 must be > 0"),
])
def test_bad_config(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        KMQ(**kw)


def test_on_the_tiny_model(ftune_home):
    recs = records(24)
    sel = KMQ(budget=6, k=3, encoder="tiny_random", max_length=64, batch_size=8, progress=False)
    first = sel.select(recs, seed=0)
    assert len(first.indices) == 6 == len(set(first.indices)) and first.report["clusters_represented"] == 3
    cached = list((ftune_home / "embeddings").glob("*.pt"))
    assert cached
    again = KMQ(budget=6, k=3, encoder="tiny_random", max_length=64, batch_size=8, progress=False).select(recs, 0)
    assert again.indices == first.indices and list((ftune_home / "embeddings").glob("*.pt")) == cached


def test_inside_a_training_run(tmp_path, ftune_home):
    """selection=kmq in `ftune train`: the trainer keeps exactly the budget and records the report."""
    import json

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from _tiny import make_cfg, run

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"prompt": f"Say {i}.", "completion": f"{i} " * (1 + i % 4)}) + "\n"
                            for i in range(30)))
    cfg = make_cfg(tmp_path / "run", "data=jsonl", f"data.path={pool}", "data.eval_size=0", "data.max_length=64",
                   "selection=kmq", "selection.budget=8", "selection.k=2", "trainer.max_steps=1",
                   "trainer.batch_size=2")
    trainer = run(cfg)
    report = trainer.data.stats["selection"]
    assert trainer.data.stats["train_examples"] == 8 and report["selected"] == 8 and report["k"] == 2
    assert len(trainer.data.train) == 8


def my_quality(records):
    """A user's scorer for the test below: prefers even ids."""
    return [1.0 if int(r["id"][1:]) % 2 == 0 else 0.0 for r in records]


def test_own_quality_function():
    sel, recs, _, _ = make(8, quality=f"{__name__}.my_quality", temperature=1e-3)
    assert all(i % 2 == 0 for i in sel.select(recs, seed=0).indices)
    with pytest.raises(ConfigError, match=r"or an importable `module\.function`"):
        KMQ(budget=3, quality="nomodule.nofn")
