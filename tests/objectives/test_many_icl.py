"""objective=many_icl: the loss by hand, bad input refused before the model loads, and the tiny model end to end on a
two-task JSONL mixture (epochs rebuild the contexts; resuming across an epoch boundary equals the uninterrupted run;
eval=many_shot scores 0/k/many-shot prompts)."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
from _tiny import crash_after_checkpoint, losses, make_cfg, run  # noqa: E402

from ftune.config import ConfigError  # noqa: E402
from ftune.data.sources import DataError  # noqa: E402
from ftune.data.tokenize import IGNORE  # noqa: E402
from ftune.objectives.many_icl import ManyICL  # noqa: E402


class FixedLogits(torch.nn.Module):
    """Stands in for a causal LM: returns preset logits at the positions asked for."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, position_ids, attention_mask, use_cache, logits_to_keep):
        assert attention_mask is None and use_cache is False
        return SimpleNamespace(logits=self.logits[:, logits_to_keep])


def test_loss_is_the_mean_cross_entropy_of_the_labelled_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    ids = torch.randint(0, 11, (2, 6), generator=g)
    labels = torch.tensor([[IGNORE, IGNORE, 4, 7, IGNORE, 1], [IGNORE, 3, IGNORE, IGNORE, 9, 9]])
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(6).repeat(2, 1)}
    obj = ManyICL(chunk_size=2)
    loss_sum, metrics = obj(FixedLogits(logits), batch)
    # By hand: token t+1 is predicted from position t; every labelled token counts once.
    terms = [-torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]] for b in range(2) for t in range(5)
             if labels[b, t + 1] != IGNORE]
    assert obj.normalizer(batch) == len(terms) == 6 and metrics == {}
    assert float(loss_sum) / obj.normalizer(batch) == pytest.approx(float(sum(terms)) / 6, rel=1e-6)


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="target_mask='answers' must be one of all_answers, last_answer"):
        ManyICL(target_mask="answers")
    with pytest.raises(ConfigError, match="max_shots=0"):
        ManyICL(max_shots=0)


def mixture(path: Path, n: int = 20, broken: dict | None = None) -> Path:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        rows.append({"task": "add", "input": f"{a}+{b}", "output": str(a + b)})
        w = "".join(rng.choice("abcdef") for _ in range(rng.randint(2, 6)))
        rows.append({"task": "reverse", "input": w, "output": w[::-1], "instruction": "Reverse the word."})
    if broken:
        rows.append(broken)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mix_cfg(tmp_path, name, data, *overrides):
    return make_cfg(tmp_path / name, "objective=many_icl", "data=jsonl", f"data.path={data}", "data.max_length=128",
                    "data.eval_size=4", "trainer.batch_size=2", *overrides)


@pytest.mark.parametrize(("rows", "overrides", "error", "pattern"), [
    ({"input": "1+1", "output": "2"}, [], DataError, r"mix\.jsonl:41: .*no 'task' field.*objective\.single_task"),
    ({"task": "lonely", "input": "x", "output": "y"}, [], DataError, r"\{'lonely': 1\} have fewer than 2"),
    (None, ["objective.target_mask=every"], ConfigError, "target_mask='every'"),
    (None, ["data=gsm8k"], ConfigError, "data=gsm8k has no task field.*objective.single_task=gsm8k"),
    (None, ["data.max_length=8"], DataError, "all 36 example"),
    (None, ["eval=many_shot", "eval.single_task=other"], ConfigError, "eval.single_task=other differs"),
])
def test_bad_input_fails_before_the_model_loads(tmp_path, monkeypatch, rows, overrides, error, pattern):
    from ftune.train import Trainer

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr("ftune.models.loading.load_model", no_model)
    data = mixture(tmp_path / "mix.jsonl", broken=rows)
    with pytest.raises(error, match=pattern):
        Trainer(mix_cfg(tmp_path, "run", data, *overrides))


def test_single_task_makes_task_free_data_one_task(tmp_path, tiny_tokenizer):
    from ftune.data.pipeline import prepare
    from ftune.preflight import validate_train

    rows = [{"question": f"{i}+1", "answer": f"#### {i + 1}"} for i in range(12)]
    data = tmp_path / "plain.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = mix_cfg(tmp_path, "run", data, "objective.single_task=sums")
    validate_train(cfg)  # no task field, but the data set is named as one task
    obj = ManyICL(single_task="sums")
    trainer = SimpleNamespace(cfg=cfg, tokenizer=tiny_tokenizer,
                              data=prepare(cfg.data, tiny_tokenizer, "tiny", cfg.seed, kind=obj.data_kind))
    data = obj.setup(trainer)  # the many-shot sequences are returned as the data (the run's is left alone)
    assert "many_icl" not in trainer.data.stats and data.stats["many_icl"]["tasks"] == {"sums": 8}
    assert all(r["task"] == "sums" for r in data.train) and max(len(r["ids"]) for r in data.train) > 1
    assert sorted(i for r in data.eval for i in r["ids"]) == sorted(f"train-{i}" for i in range(8, 12))


def test_two_task_mixture_end_to_end(tmp_path, monkeypatch):
    seen: dict[int, list[tuple]] = {}
    original = ManyICL.before_step

    def spy(self, trainer, rows):
        original(self, trainer, rows)
        epoch = trainer.step // trainer.order.steps_per_epoch
        seen.setdefault(epoch, []).extend(tuple(r["ids"]) for micro in rows for r in micro)

    monkeypatch.setattr(ManyICL, "before_step", spy)
    data = mixture(tmp_path / "mix.jsonl")
    t = run(mix_cfg(tmp_path, "run", data, "trainer.epochs=3", "eval=many_shot", "eval.at_end=true", "eval.limit=4",
                    "eval.shots=[0,2,many]", "eval.max_new_tokens=4", "eval.batch_size=8"))
    stats = t.data.stats["many_icl"]
    assert stats["tasks"] == {"add": 18, "reverse": 18} and stats["mean_shots"] > 2
    n = stats["sequences_per_epoch"]
    assert len(t.data.train) == n and t.total_steps == 3 * (n // 2) and sorted(seen) == [0, 1, 2]
    assert set(seen[0]) != set(seen[1]) and set(seen[1]) != set(seen[2])  # contexts rebuilt every epoch
    for epoch, trained in seen.items():  # each epoch trains on that epoch's sequences
        assert set(trained) <= {tuple(r["ids"]) for r in t.objective.builder.epoch_rows(epoch)}
    curve = losses(tmp_path / "run")
    assert all(math.isfinite(x) for x in curve) and curve[-1] < curve[0]
    # Held-out loss on held-out many-shot sequences; task accuracy per shot count on 4 queries.
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "eval_loss" in summary["eval"]
    end = summary["task_end"]
    assert end["n"] == 4 and set(end["per_task"]) == {"add", "reverse"}
    assert {"shots_0_accuracy", "shots_2_accuracy", "shots_many_accuracy"} <= set(end)
    assert end["accuracy"] == end["shots_many_accuracy"]
    preds = [json.loads(x) for x in (tmp_path / "run" / "eval_end" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and {p["k"] for p in preds if p["shots"] == "0"} == {0}
    assert {p["k"] for p in preds if p["shots"] == "2"} == {2}
    assert all(p["k"] >= 2 and p["prompt_tokens"] <= 128 - 4 for p in preds if p["shots"] == "many")


def test_resume_across_an_epoch_boundary_equals_uninterrupted(tmp_path, monkeypatch):

    data = mixture(tmp_path / "mix.jsonl")
    common = ["trainer.epochs=2", "trainer.save_every=2", "data.eval_size=0"]
    full = run(mix_cfg(tmp_path, "full", data, *common))
    assert full.total_steps > 3  # the crash below is in epoch 0, the resumed part crosses into epoch 1
    crash_after_checkpoint(monkeypatch, mix_cfg(tmp_path, "resumed", data, *common), "checkpoint-2")
    run(mix_cfg(tmp_path, "resumed", data, *common, "trainer.resume=auto"))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")
