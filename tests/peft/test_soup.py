"""`ftune soup`: uniform and greedy soups by hand, LoRA ingredients averaged as merged updates, the CLI end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent.parent))
from _tiny import make_cfg, run  # noqa: E402

from ftune.config import ConfigError  # noqa: E402
from ftune.soup import average, greedy_soup, make_soup  # noqa: E402


def _s(x: float):
    return {"w": torch.tensor([x])}


def test_greedy_soup_by_hand():
    def score(state):
        return -abs(float(state["w"]) - 2.0)  # best at w = 2

    # scores -1, -2, -1, -8, 0 -> order: w=2 (index 4), w=1 (0), w=3 (2), w=4 (1), w=10 (3)
    soup, kept, scores, best = greedy_soup([_s(1), _s(4), _s(3), _s(10), _s(2)], score)
    assert scores == [-1.0, -2.0, -1.0, -8.0, 0.0]
    # start at w=2 (score 0); (2+1)/2 = 1.5 -> -0.5 rejected; (2+3)/2 = 2.5 rejected; (2+4)/2 = 3 rejected; 6 rejected
    assert kept == [4] and float(soup["w"]) == 2.0 and best == 0.0
    soup, kept, _, best = greedy_soup([_s(1), _s(3), _s(4)], score)  # w=1 first (stable tie with w=3)
    # (1 + 3)/2 = 2 -> 0 kept; then (2*2 + 4)/3 = 8/3 -> -2/3 rejected
    assert kept == [0, 1] and float(soup["w"]) == pytest.approx(2.0) and best == 0.0
    soup, kept, _, _ = greedy_soup([_s(2), _s(2)], score)
    assert kept == [0]  # an equal score is not an improvement
    assert float(average([_s(1), _s(4), _s(10)])["w"]) == pytest.approx(5.0)
    with pytest.raises(ConfigError, match="other tensors"):
        average([_s(1), {"v": torch.tensor([1.0])}])


def test_lora_soup_averages_merged_updates_and_greedy_runs(tmp_path):
    from transformers import AutoModelForCausalLM

    from ftune.models.loading import resolve_model_dir

    common = ["data.size=8", "trainer.max_steps=2", "trainer.batch_size=2", "trainer.lr=5e-2", "peft.dropout=0",
              "peft.r=4", "peft.alpha=8"]
    run(make_cfg(tmp_path / "a", *common, "seed=1"))
    run(make_cfg(tmp_path / "b", *common, "seed=2"))
    out = make_soup([tmp_path / "a", tmp_path / "b"], tmp_path / "soup")
    soup = AutoModelForCausalLM.from_pretrained(out)
    w0 = AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny_random")).model.layers[0].self_attn.q_proj.weight
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    ab = [load_file(tmp_path / r / "final" / "adapter_model.safetensors") for r in "ab"]
    deltas = [2.0 * s[key.format("B")] @ s[key.format("A")] for s in ab]  # (alpha / r) B A, alpha / r = 2
    expected = w0 + (deltas[0] + deltas[1]) / 2
    got = soup.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    averaged_factors = w0 + 2.0 * ((ab[0][key.format("B")] + ab[1][key.format("B")]) / 2) @ (
        (ab[0][key.format("A")] + ab[1][key.format("A")]) / 2)
    assert not torch.allclose(got, averaged_factors, atol=1e-6)  # not A and B averaged separately
    # A soup of one model with itself is that model (merged).
    from ftune.merge import merge_run

    same = AutoModelForCausalLM.from_pretrained(make_soup([tmp_path / "a", tmp_path / "a"], tmp_path / "aa"))
    merged = dict(AutoModelForCausalLM.from_pretrained(merge_run(tmp_path / "a")).named_parameters())
    assert all(torch.equal(p, merged[n]) for n, p in same.named_parameters())
    with pytest.raises(ConfigError, match="--force"):
        make_soup([tmp_path / "a", tmp_path / "b"], tmp_path / "soup")
    with pytest.raises(ConfigError, match="--eval, --limit: for a greedy soup only"):  # was silently ignored
        make_soup([tmp_path / "a", tmp_path / "b"], tmp_path / "u", eval_name="gsm8k", limit=2)
    with pytest.raises(ConfigError, match="--limit=0 must be >= 1"):  # 0 scored every test example
        make_soup([tmp_path / "a", tmp_path / "b"], tmp_path / "u", greedy=True, eval_name="gsm8k", limit=0)
    with pytest.raises(ConfigError, match="--eval gsmk: no such eval config. Did you mean 'gsm8k'"):
        make_soup([tmp_path / "a", tmp_path / "b"], tmp_path / "u", greedy=True, eval_name="gsmk")
    assert not (tmp_path / "u").exists()
    with pytest.raises(ConfigError, match="which this command reads"):  # --force never deletes an ingredient
        make_soup([tmp_path / "a", tmp_path / "b"], tmp_path / "b", force=True)
    assert (tmp_path / "b" / "final" / "ftune_config.yaml").exists()
    with pytest.raises(Exception, match="held-out training examples, and it had none.*data.eval_size"):
        make_soup([tmp_path / "a", tmp_path / "b"], tmp_path / "g0", greedy=True, eval_name="gsm8k", limit=2)
    with pytest.raises(ConfigError, match="--select-on: for a greedy soup only"):
        make_soup([tmp_path / "a", tmp_path / "b"], tmp_path / "u", select_on="test")
    greedy = make_soup([tmp_path / "a", tmp_path / "b"], tmp_path / "greedy", greedy=True, eval_name="gsm8k",
                       limit=2, max_new_tokens=4, select_on="test")
    import json

    info = json.loads((greedy / "ftune_merge.json").read_text())
    assert info["method"] == "greedy" and len(info["ingredient_accuracy"]) == 2 and 1 <= len(info["kept"]) <= 2
    assert info["selected_on"] == "test"
    with pytest.raises(ConfigError, match="--eval"):
        make_soup([tmp_path / "a", tmp_path / "b"], tmp_path / "g2", greedy=True)


def test_greedy_soup_selects_on_held_out_training_examples_not_the_test_split(tmp_path, monkeypatch):
    # The audit's defect: candidates were scored on eval.split (GSM8K test by default), the split that is reported.
    import ftune.eval.tasks as tasks
    from ftune.data.pipeline import load_train_examples, task_examples

    common = ["data.size=8", "trainer.max_steps=1", "trainer.batch_size=2", "data.eval_size=3"]
    run(make_cfg(tmp_path / "a", *common, "seed=1"))
    run(make_cfg(tmp_path / "b", *common, "seed=1", "trainer.lr=1e-2"))
    seen = []
    real = tasks.run_task
    monkeypatch.setattr(tasks, "run_task", lambda m, t, inputs, *a, **k: seen.append(inputs) or real(m, t, inputs, *a,
                                                                                                      **k))
    make_soup([tmp_path / "a", tmp_path / "b"], tmp_path / "g", greedy=True, eval_name="gsm8k", max_new_tokens=2)
    from ftune.merge import load_merged

    saved = load_merged(tmp_path / "a")[2]
    train, held_out, _ = load_train_examples(saved.data, saved.seed)
    test = task_examples(saved.data, "test", saved.seed, None)
    questions = [[m["content"] for e in inputs for m in e["messages"] if m["role"] == "user"] for inputs in seen]
    want = [m["content"] for e in held_out for m in e["messages"] if m["role"] == "user"]
    assert len(held_out) == 3 and seen and all(q == want for q in questions)
    assert not set(want) & {m["content"] for e in test for m in e["messages"] if m["role"] == "user"}
    assert not set(want) & {m["content"] for e in train for m in e["messages"] if m["role"] == "user"}
