"""objective=grpo: rewards (built-in and the user's, checked), the sum/normalizer form of each loss_type, and runs on
the tiny random model: learning a reward, the same completions from the same seed, an exact resume mid-way through
mu passes, the KL to the adapter-disabled reference, a failing reward stopping the run before training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
from _tiny import crash_after_checkpoint, make_cfg, run  # noqa: E402

from ftune.config import ConfigError  # noqa: E402
from ftune.data.tokenize import IGNORE  # noqa: E402
from ftune.objectives import grpo, grpo_loss, rewards  # noqa: E402

RG = ["data=reasoning_gym", "data.tasks=[chain_sum]", "data.size=32", "data.max_length=256", "objective=grpo",
      "objective.num_generations=4", "objective.max_new_tokens=6", "trainer.batch_size=2", "peft.dropout=0",
      "objective.log_completions_every=1"]
EVEN = "objective.rewards=[{_target_: _rewards.even}]"


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------------ rewards
def test_reward_entries_are_checked_from_the_config_alone():
    with pytest.raises(ConfigError, match="objective.rewards is empty"):
        rewards.parse([])
    with pytest.raises(ConfigError, match=r"give either name .* or _target_"):
        rewards.parse([{"name": "verifier", "_target_": "_rewards.even"}])
    with pytest.raises(ConfigError, match=r"weight='x' must be a finite number"):
        rewards.parse([{"name": "format", "weight": "x"}])
    with pytest.raises(ConfigError, match="names a reward twice"):
        rewards.parse(["verifier", {"name": "verifier", "weight": 2}])
    with pytest.raises(ConfigError, match=r"_rewards\.scaled cannot be called as a reward.*\['wrong'\]"):
        rewards.parse([{"_target_": "_rewards.scaled", "wrong": 1}])
    (e,) = rewards.parse([{"_target_": "_rewards.scaled", "factor": 2, "weight": 0.5}])
    assert e["name"] == "scaled" and e["weight"] == 0.5 and e["kwargs"] == {"factor": 2}


def test_scores_are_checked_and_none_counts_as_zero():
    def call(fn):
        return rewards.score(rewards.Reward("mine", 1.0, fn), ["p1", "p2"], ["a", "b"], ids=["0", "1"])

    assert call(lambda p, c, **_: [None, 2]) == [0.0, 2.0]
    with pytest.raises(rewards.RewardError, match=r"reward 'mine' gave nan for completion 1 \(prompt: 'p2'"):
        call(lambda p, c, **_: [0.0, float("nan")])
    with pytest.raises(rewards.RewardError, match=r"reward 'mine' returned 1 values for 2 completions"):
        call(lambda p, c, **_: [1.0])
    with pytest.raises(rewards.RewardError, match=r"reward 'mine' raised KeyError: 'x'.*first prompt: 'p1'"):
        call(lambda p, c, **_: {}["x"])
    with pytest.raises(rewards.RewardError, match="gave 'yes'"):
        call(lambda p, c, **_: ["yes", 1])


def test_built_in_rewards(tmp_path):
    cfg = make_cfg(tmp_path / "r", *RG)
    verifier = rewards.verifier(cfg.data, cfg.seed)
    fmt = rewards.answer_format(cfg.data)
    from ftune.data import reasoning_gym as rg

    (_, label, entry), *_ = rg.training_problems(cfg.data, cfg.seed)
    right, wrong = f"<answer>{entry['answer']}</answer>", "<answer>-12345</answer>"
    # a reply without the tags is read whole (as the eval reads it); the format reward tells them apart
    assert verifier([], [right, wrong, str(entry["answer"])], ids=[f"{label}-0"] * 3) == [1.0, 0.0, 1.0]
    assert fmt([], [right, "no tags 3", wrong]) == [1.0, 0.0, 1.0]
    gsm = make_cfg(tmp_path / "g", "data=gsm8k")
    assert rewards.verifier(gsm.data, 0)([], ["so #### 18", "17"], golds=["... #### 18", "#### 18"]) == [1.0, 0.0]
    assert rewards.answer_format(gsm.data)([], ["#### 18", "18"]) == [1.0, 0.0]
    # DAPO's soft overlong punishment, TRL's example: L_max 100, cache 20.
    length = rewards.length(100, 20)
    assert length([], [""] * 3, completion_ids=[[0] * 80, [0] * 90, [0] * 101]) == [0.0, -0.5, -1.0]


# ------------------------------------------------------------------------------------------------- loss wiring
def _rows(lengths, advantages, weights=None):
    rows = []
    for i, (n, a) in enumerate(zip(lengths, advantages)):
        prompt = [5, 6, 7]
        comp = list(range(10, 10 + n))
        rows.append({"id": i, "input_ids": prompt + comp, "labels": [IGNORE] * 3 + comp, "advantage": a,
                     "weight": 1.0 if weights is None else weights[i]})
    return rows


def test_to_padded_keeps_each_sequences_tokens_in_order():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    seq = torch.tensor([1, 1, 0, 2, 2, 2])
    padded, mask = grpo.to_padded(values, seq, 3)
    assert padded.tolist() == [[3, 0, 0], [1, 2, 0], [4, 5, 6]]
    assert mask.tolist() == [[True, False, False], [True, True, False], [True, True, True]]


@pytest.mark.parametrize("loss_type", grpo_loss.LOSS_TYPES)
def test_summed_loss_over_the_normalizer_is_each_papers_aggregate(monkeypatch, loss_type):
    """What __call__ returns, summed over micro-batches and divided by the normalizers (as the loop does), equals
    TRL's loss: the aggregate of each micro-batch averaged over them (grpo, bnpo, dr_grpo), or the token-sum over
    the tokens of the whole step (dapo). Truncated completions are masked out when asked."""
    torch.manual_seed(0)
    obj = grpo.GRPO(num_generations=2, loss_type=loss_type, max_new_tokens=5, mask_truncated_completions=True,
                    log_entropy=False)
    micro = [_rows([2, 5], [1.0, -1.0], [1.0, 0.0]), _rows([3, 1], [0.5, -0.5])]
    batches = [grpo.collate_completions(m, 0) for m in micro]
    logps = {id(b): torch.randn(2, int(b["labels"].ne(IGNORE).sum(-1).max()) + 2) for b in batches}

    def fake(model, batch, entropy=False):
        counts = torch.bincount(batch["seq_ids"][:, 1:][batch["labels"][:, 1:] != IGNORE], minlength=2)
        width = int(counts.max())
        lp = logps[id(batch)][:, :width].clone().requires_grad_(True)
        mask = torch.arange(width)[None] < counts[:, None]
        return lp, mask, None

    monkeypatch.setattr(grpo, "token_logps", fake)
    total = sum(float(obj(None, b)[0]) for b in batches)
    got = total / sum(obj.normalizer(b) for b in batches)

    def parts(b):
        lp, mask, _ = fake(None, b)
        mask = mask & (b["weight"][:, None] > 0)
        losses, _ = grpo_loss.token_losses(lp, lp.detach(), b["advantages"], mask, 0.2, 0.28)
        return losses, mask

    if loss_type == "dapo":
        num = sum(float((loss * m).sum()) for loss, m in map(parts, batches))
        want = num / sum(float(m.sum()) for _, m in map(parts, batches))
    else:
        want = sum(float(grpo_loss.aggregate(loss, m, loss_type, 5)) for loss, m in map(parts, batches)) / 2
    assert got == pytest.approx(want, rel=1e-6)
    # The masked (truncated) completion adds nothing: with mu = 1 the loss is -A per token.
    assert float(parts(batches[0])[1].sum()) == 2


def test_bad_settings():
    with pytest.raises(ConfigError, match="num_generations=1 must be an integer >= 2"):
        grpo.GRPO(num_generations=1)
    with pytest.raises(ConfigError, match="temperature=0 must be > 0"):
        grpo.GRPO(temperature=0)
    with pytest.raises(ConfigError, match="loss_type='ppo' must be one of grpo, bnpo, dr_grpo, dapo"):
        grpo.GRPO(loss_type="ppo")
    assert grpo.GRPO().eps_high == 0.28 and grpo.GRPO(loss_type="grpo").eps_high == 0.2


# ------------------------------------------------------------------------------------------------ tiny-model runs
def test_a_step_moves_the_policy_towards_the_completions_with_positive_advantage(tmp_path):
    """One GRPO step through the real loop: the log-prob of every completion with a positive advantage rises against
    those with a negative one (the sign and weighting of the policy gradient), measured on the step's own completions
    with the adapter off (the initial policy: LoRA's B starts at 0) and on. Every logged figure is there."""
    import copy

    from ftune.peft.base import adapter_disabled
    from ftune.train import Trainer

    out = tmp_path / "step"
    t = Trainer(make_cfg(out, *RG, EVEN, "trainer.max_steps=1", "trainer.lr=1e-2"))
    seen = []
    real = t.objective.before_step

    def keep(run, rows):
        real(run, rows)
        seen.extend(copy.deepcopy([r for micro in rows for r in micro]))

    t.objective.before_step = keep
    t.run()
    batch = grpo.collate_completions(seen, t.tokenizer.pad_token_id)
    model = t.acc.unwrap_model(t.model).eval()
    with torch.no_grad():
        after, mask, _ = grpo.token_logps(model, batch)
        with adapter_disabled(model):
            before, _, _ = grpo.token_logps(model, batch)
    delta = ((after - before) * mask).sum(-1)
    adv = batch["advantages"]
    assert (adv > 0).any() and (adv < 0).any()
    assert float(delta[adv > 0].mean()) > float(delta[adv < 0].mean())
    assert float((delta * adv).sum()) > 0  # the first-order change of the objective the step maximised
    (rec,) = records(out)
    for key in ("rewards/even/mean", "rewards/even/std", "frac_reward_zero_std", "clip_ratio/low", "entropy",
                "completions/mean_length", "completions/max_length", "generation_s", "train_s"):
        assert key in rec
    (sample, _) = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert sample["step"] == 1 and len(sample["completions"]) == 4
    assert sample["advantages"] == pytest.approx(adv[:4].tolist(), abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"]["generated_completions"] == 2 * 4


def test_the_same_seed_gives_the_same_completions(tmp_path):
    def completions(name, *extra):
        run(make_cfg(tmp_path / name, *RG, EVEN, "trainer.max_steps=2", *extra))
        return [(s["completions"], s["reward"]) for s in map(json.loads,
                                                             (tmp_path / name / "completions.jsonl").open())]

    a, b, c = completions("a"), completions("b"), completions("c", "seed=7")
    assert a == b and a != c


def test_resume_in_the_middle_of_mu_passes_is_exact(tmp_path, monkeypatch):
    """mu = 2: steps 3 and 4 train on the completions drawn at step 3, against their stored old log-probs. A run
    killed after checkpoint-3 resumes with them (from the checkpoint) and ends where the uninterrupted run ends."""
    args = [*RG, EVEN, "objective.num_iterations=2", "trainer.max_steps=5", "trainer.save_every=1",
            "trainer.lr=3e-2"]
    whole = tmp_path / "whole"
    run(make_cfg(whole, *args))
    broken = tmp_path / "broken"
    crash_after_checkpoint(monkeypatch, make_cfg(broken, *args), "checkpoint-3")
    run(make_cfg(broken, *args, "trainer.resume=auto"))
    a, b = records(whole), records(broken)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-7) and x["reward"] == y["reward"]
    # the second pass over a batch is off-policy: its ratios differ from 1 (the first pass's are exactly 1)
    assert a[3]["generation_s"] == 0.0 and a[2]["generation_s"] > 0
    from safetensors.torch import load_file

    wa, wb = (load_file(next((d / "final").glob("*.safetensors"))) for d in (whole, broken))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_kl_to_the_adapter_disabled_reference(tmp_path):
    """beta > 0: the reference is the model with its adapter off, so the KL is 0 at the first step (LoRA's B starts
    at 0) and grows once the adapter has trained; beta = 0 computes none."""
    out = tmp_path / "kl"
    run(make_cfg(out, *RG, EVEN, "objective.beta=0.1", "trainer.max_steps=4", "trainer.lr=3e-2"))
    kl = [r["kl"] for r in records(out)]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 1e-4
    out0 = tmp_path / "nokl"
    run(make_cfg(out0, *RG, EVEN, "trainer.max_steps=1"))
    assert "kl" not in records(out0)[0]


@pytest.mark.parametrize(("target", "said"), [("nan", r"reward 'nan' gave nan for completion 0 \(prompt: '"),
                                              ("raises", r"reward 'raises' raised KeyError: 'no_such_column'"),
                                              ("short", r"reward 'short' returned 0 values for 1 completions")])
def test_a_failing_reward_stops_the_run_before_training(tmp_path, target, said):
    from ftune.train import Trainer

    out = tmp_path / target
    with pytest.raises(rewards.RewardError, match=said):
        Trainer(make_cfg(out, *RG, f"objective.rewards=[{{_target_: _rewards.{target}}}]", "trainer.max_steps=2"))
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_a_groups_shared_prefill_gives_what_separate_prompts_give():
    """generate_ids(group=G) runs each prompt's prefill once and repeats its KV cache: greedy completions equal
    those of the prompts repeated G times and generated on their own (left padding, several lengths)."""
    from transformers import AutoModelForCausalLM

    from ftune.eval.generation import generate_ids
    from ftune.models.loading import resolve_model_dir

    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny_random", None))
    prompts = [[1, 5, 9, 13], [1, 7], [1, 8, 2, 4, 6, 3]]
    alone = generate_ids(model, [p for p in prompts for _ in range(3)], 6, 9, 0, 2)
    shared = generate_ids(model, prompts, 6, 9, 0, 2, group=3)
    assert shared == alone and len(shared) == 9


@pytest.mark.parametrize("loss_type", grpo_loss.LOSS_TYPES)
def test_skipping_zero_advantage_completions_gives_the_same_update(loss_type):
    """skip_zero_advantage (beta 0): completions with advantage 0 run no forward or backward, yet the loss and every
    gradient equal those of the full micro-batches (they still count in each loss_type's normalisation)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    micro = [_rows([2, 4, 3], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]), _rows([3, 1, 2], [0.0, 0.0, 0.0])]

    def update(skip: bool):
        obj = grpo.GRPO(num_generations=3, loss_type=loss_type, max_new_tokens=5, mask_truncated_completions=True,
                        log_entropy=False, skip_zero_advantage=skip)
        rows = [[{**r, "skip": skip and r["advantage"] == 0.0} for r in m] for m in micro]
        batches = [grpo.collate_completions(m, 0) for m in rows]
        model.zero_grad()
        n = sum(obj.normalizer(b) for b in batches)
        total = 0.0
        for b in batches:
            part, _ = obj(model, b)
            (part / n).backward()
            total += float(part)
        return total / n, [p.grad.clone() for p in model.parameters()], [int(b["input_ids"].numel()) for b in batches]

    full_loss, full_grads, full_size = update(False)
    loss, grads, size = update(True)
    assert loss == pytest.approx(full_loss, rel=1e-5, abs=1e-7)
    for a, b in zip(grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(float(g.abs().sum()) > 0 for g in full_grads)  # the one positive advantage moves the model
    assert size[0] < full_size[0] and size[1] < full_size[1]  # fewer tokens ran (the all-zero batch keeps one row)
