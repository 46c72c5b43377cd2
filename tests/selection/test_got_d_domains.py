"""selection=got_d with domain pre-selection: the primal OT cost by hand, the near domain kept and the far one
dropped on a toy set, indices that are positions in the original pool, a domain column carried from the data into
`ftune select`'s output, and the errors."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ftune.config import ConfigError, DataConfig
from ftune.data.sources import DataError, load_conversations
from ftune.preflight import validate_train
from ftune.selection.got_d import GOTD, ot_cost

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from _fake import FakeEmbedder, records  # noqa: E402
from _tiny import make_cfg  # noqa: E402


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_ot_cost_by_hand():
    # One target point: the plan must send each candidate's whole mass 1/n to it, so <P, C> is the mean cost.
    x = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    y = torch.tensor([[0.0, 4.0]])
    cost, _ = ot_cost(x, y, eps=0.7)
    assert cost == pytest.approx((16 + 25) / 2, abs=1e-9)
    # Two points onto the same two points: with a small entropy the plan is the identity, cost ~ 0; a large entropy
    # spreads it towards the product plan, cost -> the mean of C = (0 + 2 + 2 + 0) / 4 = 1.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    small, _ = ot_cost(x, x, eps=0.01)
    large, _ = ot_cost(x, x, eps=1e4)
    assert small < 1e-6 and large == pytest.approx(1.0, abs=1e-3)


# Three domains on the unit circle, interleaved in the pool: "near" around the targets at 90 degrees, "mid" around 0,
# "far" around 270. Each domain has 4 points at its centre -30, -10, +10, +30 degrees.
CENTRES = {"near": 90, "mid": 0, "far": 270}
OFFSETS = (-30, -10, 10, 30)


def _toy(tmp_path, budget, field="source", **kw):
    pool = records(12)
    names = list(CENTRES)
    angles = []
    for i, r in enumerate(pool):
        r[field] = names[i % 3]  # near, mid, far, near, ...
        angles.append(CENTRES[r[field]] + OFFSETS[i // 3])
    targets = records(3, prefix="t")
    target_path = tmp_path / "target.jsonl"
    target_path.write_text("".join(json.dumps(t) + "\n" for t in targets))
    vectors = {r["id"]: _unit(a) for r, a in zip(pool, angles)}
    vectors.update({t["id"]: _unit(d) for t, d in zip(targets, (85, 90, 95))})
    sel = GOTD(budget=budget, target_path=str(target_path), epsilon=0.05, domain_field="source", **kw)
    sel.embedder = FakeEmbedder(vectors)
    return sel, pool, angles


def test_near_domain_kept_far_dropped_and_indices_in_the_original_pool(tmp_path):
    sel, pool, angles = _toy(tmp_path, budget=2, top_domains=1)
    result = sel.select(pool, seed=0)
    rep = result.report
    d = rep["domains"]
    assert rep["kept_domains"] == ["near"] and rep["candidate_pool"] == 4
    assert d["near"]["ot_cost"] < d["mid"]["ot_cost"] < d["far"]["ot_cost"]
    assert [d[k]["kept"] for k in ("near", "mid", "far")] == [True, False, False]
    assert all(d[k]["size"] == 4 and d[k]["sampled"] == 4 for k in d)
    # near = positions 0, 3, 6, 9 at 60, 80, 100, 120 degrees: the two nearest 90 degrees are positions 3 and 6.
    assert result.indices == [3, 6]
    assert [pool[i]["source"] for i in result.indices] == ["near", "near"]
    assert [math.isnan(s) for s in result.scores] == [i % 3 != 0 for i in range(12)]  # dropped domains: no score
    # The same as plain GOT-D on the near domain's examples alone, mapped back to pool positions.
    near = [i for i in range(12) if i % 3 == 0]
    plain = GOTD(budget=2, target_path=sel.target_path, epsilon=0.05)
    plain.embedder = sel.embedder
    sub = plain.select([pool[i] for i in near], seed=0)
    assert [near[j] for j in sub.indices] == result.indices
    assert [result.scores[i] for i in near] == pytest.approx(sub.scores)


def test_two_closest_domains_and_the_sample(tmp_path):
    sel, pool, _ = _toy(tmp_path, budget=6, top_domains=2, domain_sample=2)
    result = sel.select(pool, seed=0)
    rep = result.report
    assert rep["kept_domains"] == ["near", "mid"] and rep["candidate_pool"] == 8
    assert all(v["sampled"] == 2 and v["size"] == 4 for v in rep["domains"].values())
    assert not rep["domains"]["far"]["kept"]
    assert len(result.indices) == 6 and all(pool[i]["source"] != "far" for i in result.indices)
    assert sel.select(pool, seed=0).report == rep  # the per-domain sample is seeded


def test_without_domain_field_unchanged(tmp_path):
    sel, pool, _ = _toy(tmp_path, budget=3)
    sel.domain_field = None
    result = sel.select(pool, seed=0)
    assert "domains" not in result.report and not any(math.isnan(s) for s in result.scores)
    # The whole pool competes: 80 and 100 degrees (positions 3, 6), then 60 or 120 (a tie up to rounding), all "near".
    assert result.indices in ([0, 3, 6], [3, 6, 9])


def test_errors(tmp_path, compose):
    sel, pool, _ = _toy(tmp_path, budget=2, top_domains=1)
    del pool[5]["source"]
    with pytest.raises(ConfigError, match=r"domain_field=source: example 5 \(id 'q5'\) has no field 'source' "
                                          r"\(it has \['id'\]\).*data\.keep_fields=\[source\]"):
        sel.select(pool, 0)
    sel, pool, _ = _toy(tmp_path, budget=2, top_domains=4)
    with pytest.raises(ConfigError, match=r"top_domains=4, but the pool has 3 domain\(s\) in 'source' "
                                          r"\(near, mid, far\)"):
        sel.select(pool, 0)
    # No two domains hold 9: refused before anything is embedded.
    sel, pool, _ = _toy(tmp_path, budget=9, top_domains=2)
    with pytest.raises(ConfigError, match=r"budget=9 is larger than any 2 domain\(s\) hold \(at most 8\)"):
        sel.select(pool, 0)
    assert sel.embedder.calls == 0
    # One domain could hold 4, but the closest one only has 3 (near loses one example to mid).
    sel, pool, _ = _toy(tmp_path, budget=4, top_domains=1)
    pool[9]["source"] = "mid"
    with pytest.raises(ConfigError, match=r"budget=4 is larger than the 3 examples of the 1 closest domain\(s\) "
                                          r"\(near\)\. Raise selection\.top_domains \(now 1, of 3 domains\)"):
        sel.select(pool, 0)
    with pytest.raises(ConfigError, match=r"domain_sample=0"):
        GOTD(budget=2, domain_sample=0)
    # Through the config, before any model or data loads: the domain column must be carried from the data.
    target = tmp_path / "target.jsonl"
    base = ["selection=got_d", "model=tiny_random", f"selection.target_path={target}", "selection.domain_field=source"]
    with pytest.raises(ConfigError, match=r"add data\.keep_fields=\[source\] \(now \[\]\)"):
        validate_train(compose(base))
    validate_train(compose([*base, "data.keep_fields=[source]"]))


def _data_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), overrides)


def test_keep_fields_survive_loading(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b", "source": "web", "other": 1}) + "\n"
                    + json.dumps({"prompt": "c", "completion": "d"}) + "\n")
    plain, _ = load_conversations(_data_cfg(source="jsonl", path=str(path)), "train", 0)
    assert "source" not in plain[0] and "other" not in plain[0]  # nothing extra unless asked
    kept, _ = load_conversations(_data_cfg(source="jsonl", path=str(path), keep_fields=["source"]), "train", 0)
    assert kept[0]["source"] == "web" and "other" not in kept[0] and "source" not in kept[1]
    with pytest.raises(DataError, match=r"\['messages'\] are the example's own fields"):
        load_conversations(_data_cfg(source="jsonl", path=str(path), keep_fields=["messages"]), "train", 0)


def test_ftune_select_with_domains_end_to_end(tmp_path):
    from ftune.select import select_data

    # Domain "math" holds copies of the target texts, "chat" unrelated text: with any encoder, math is nearer.
    targets = [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."} for i in range(4)]
    rows = []
    for i in range(12):
        rows.append({**targets[i % 4], "id": f"m{i}", "source": "math"})
        rows.append({"prompt": f"Tell me a story about cat number {i}.", "completion": "Once upon a time " * (i + 1),
                     "id": f"c{i}", "source": "chat"})
    pool, target = tmp_path / "pool.jsonl", tmp_path / "target.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    target.write_text("".join(json.dumps(t) + "\n" for t in targets))
    out = tmp_path / "sel"
    cfg = make_cfg(out, "data=jsonl", f"data.path={pool}", "data.eval_size=0", "data.max_length=64",
                   "data.keep_fields=[source]", "selection=got_d", "selection.budget=5",
                   f"selection.target_path={target}",
                   "selection.domain_field=source", "selection.top_domains=1", "selection.batch_size=8")
    report = select_data(cfg)
    assert report["kept_domains"] == ["math"] and report["candidate_pool"] == 12
    assert report["domains"]["math"]["ot_cost"] < report["domains"]["chat"]["ot_cost"]
    selected = [json.loads(x) for x in (out / "selected.jsonl").read_text().splitlines()]
    indices = json.loads((out / "selected_indices.json").read_text())["indices"]
    assert len(selected) == 5 and {r["source"] for r in selected} == {"math"}
    assert all(i % 2 == 0 for i in indices)  # math rows sit at the even pool positions
    assert [r["id"] for r in selected] == [rows[i]["id"] for i in indices]
