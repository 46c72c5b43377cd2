"""`objective=dpo` on the tiny random model: sequence log-probs by hand, pair collation, and the loop end to end with
each kind of reference (adapter disabled, precomputed, frozen copy) and without one (SimPO, ORPO)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[1]))
from _tiny import losses, make_cfg, run  # noqa: E402

from ftune.config import ConfigError  # noqa: E402
from ftune.data.preference import tokenize_response  # noqa: E402
from ftune.data.tokenize import IGNORE  # noqa: E402
from ftune.objectives.dpo import DPO, collate_pairs, sequence_logps  # noqa: E402
from ftune.objectives.preference import log_odds  # noqa: E402

LOG2 = math.log(2)
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")


def fresh_tiny_model():
    """The initial weights every run starts from (tiny_random is built seeded, so it is the same every time)."""
    from transformers import AutoModelForCausalLM

    from ftune.models.loading import resolve_model_dir

    return AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny_random")).eval()


def pair_row(tok, prompt: str, chosen: str, rejected: str, **extra) -> dict:
    msgs = [{"role": "user", "content": prompt}]
    c_ids, c_labels = tokenize_response(tok, msgs, chosen)
    r_ids, r_labels = tokenize_response(tok, msgs, rejected)
    return {"chosen_input_ids": c_ids, "chosen_labels": c_labels, "rejected_input_ids": r_ids,
            "rejected_labels": r_labels, **extra}


def write_prefs(path: Path, n: int = 16) -> Path:
    """A preference set a tiny model learns within a few steps: the same good vs bad answer to varied prompts."""
    rows = [{"prompt": f"Question {i}: is {i} a nice number?", "chosen": "Yes, it is a fine number.",
             "rejected": "No idea, go away."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ unit level
def test_collate_pairs_packs_chosen_then_rejected_sequences_without_padding_between(tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    rows = [pair_row(tiny_tokenizer, "Hi", "Hello!", "Go away, I am busy right now.", ref_logp=(-1.0, -2.0)),
            pair_row(tiny_tokenizer, "A much longer question about the weather today, and tomorrow, and the day "
                     "after that one? " * 4, "Sunny.", "No.", ref_logp=(-3.0, -4.0))]
    batch = collate_pairs(rows, pad)
    order = [(0, "chosen"), (1, "chosen"), (0, "rejected"), (1, "rejected")]  # sequence index -> (pair, side)
    lengths = [len(rows[i][f"{s}_input_ids"]) for i, s in order]
    width = max(lengths)
    n_rows = batch["input_ids"].shape[0]
    for key in ("input_ids", "labels", "position_ids", "seq_ids"):
        assert batch[key].shape == (n_rows, width)
    # The two short pair-0 sequences share a row: fewer rows than sequences, and fewer padded tokens.
    assert n_rows < 4
    assert int((batch["seq_ids"] >= 0).sum()) == sum(lengths)
    for k, (i, side) in enumerate(order):
        where = (batch["seq_ids"] == k).nonzero()
        row = int(where[0, 0])
        cols = where[:, 1]
        assert (where[:, 0] == row).all() and (cols == torch.arange(int(cols[0]), int(cols[0]) + lengths[k])).all()
        assert batch["input_ids"][row, cols].tolist() == rows[i][f"{side}_input_ids"]
        assert batch["labels"][row, cols].tolist() == rows[i][f"{side}_labels"]
        assert batch["position_ids"][row, cols].tolist() == list(range(lengths[k]))  # restarts: no cross-attention
    padding = batch["seq_ids"] == -1
    assert (batch["input_ids"][padding] == pad).all() and (batch["labels"][padding] == IGNORE).all()
    assert batch["ref_logp"].tolist() == [-1.0, -3.0, -2.0, -4.0]
    assert DPO().normalizer(batch) == 2
    # Reference log-probs ride along only when every pair has them.
    del rows[1]["ref_logp"]
    assert "ref_logp" not in collate_pairs(rows, pad)


def test_sequence_logps_sums_response_token_logprobs_only(tiny_tokenizer):
    """Packed sequences score exactly as each does alone: only its response tokens, nothing seen across packing."""
    model = fresh_tiny_model()
    rows = [pair_row(tiny_tokenizer, "Hi", "Hello there, friend!", "Go away."),
            pair_row(tiny_tokenizer, "What is the capital city of France, please? Answer with one word, thanks. " * 4,
                     "Paris.", "I do not know any capitals.")]
    batch = collate_pairs(rows, tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] < 4  # something was packed
    seqs = [rows[i][f"{s}_{k}"] for s in ("chosen", "rejected") for i in range(2) for k in ("input_ids",)]
    labels = [rows[i][f"{s}_labels"] for s in ("chosen", "rejected") for i in range(2)]
    with torch.no_grad():
        logp, n_tokens = sequence_logps(model, batch)
        expected, everything = [], []
        for ids, lab in zip(seqs, labels):
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()  # the sequence on its own
            token_logp = F.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
            expected.append(float((token_logp * (torch.tensor(lab[1:]) != IGNORE)).sum()))
            everything.append(float(token_logp.sum()))
    torch.testing.assert_close(logp, torch.tensor(expected), rtol=1e-5, atol=1e-4)
    assert n_tokens.tolist() == [sum(x != IGNORE for x in lab[1:]) for lab in labels]
    # Prompt tokens do not count: summing every position gives a far lower log-prob ...
    assert (torch.tensor(expected) - torch.tensor(everything) > 5).all()
    # ... and labelling them (with their real ids) makes sequence_logps that sum.
    labelled = dict(batch, labels=torch.where(batch["seq_ids"] >= 0, batch["input_ids"], IGNORE))
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(model, labelled)[0], torch.tensor(everything), rtol=1e-5, atol=1e-3)


def test_labelled_logits_equal_the_models_logits_at_those_positions(tiny_tokenizer):
    """The LM head applied to the last hidden states of labelled positions reproduces the full forward's logits."""
    from ftune.objectives.sft import labelled_logits

    model = fresh_tiny_model()
    rows = [pair_row(tiny_tokenizer, "Hi", "Hello there, friend!", "Go away."),
            pair_row(tiny_tokenizer, "Why?", "Because the sky is blue today.", "No.")]
    batch = collate_pairs(rows, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        logits, targets, r, c = labelled_logits(model, batch)
        full = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    assert len(targets) == int((batch["labels"][:, 1:] != IGNORE).sum())
    torch.testing.assert_close(logits, full[r, c - 1], rtol=1e-4, atol=1e-4)
    assert (targets == batch["labels"][r, c]).all()


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"loss": "kto"}, r"objective\.loss='kto' is not one of sigmoid, cdpo, ipo, simpo, orpo"),
    ({"beta": 0.0}, r"objective\.beta=0\.0 must be > 0"),
    ({"loss": "cdpo", "label_smoothing": 0.5}, r"objective\.label_smoothing=0\.5 must be in \[0, 0\.5\)"),
    ({"label_smoothing": 0.1}, r"label_smoothing is only read by loss=cdpo \(this run: loss=sigmoid\)"),
])
def test_dpo_rejects_bad_settings(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        DPO(**kwargs)


@pytest.mark.parametrize(("loss", "beta"), [("sigmoid", 0.1), ("cdpo", 0.1), ("ipo", 0.1), ("simpo", 2.0)])
def test_beta_default_is_the_papers_for_each_loss(loss, beta):
    """SimPO's β is a reward scale of 2.0-2.5 (Meng et al. 2024), twenty times DPO's 0.1: an unset objective.beta
    takes the chosen loss's own value, and a given one is kept."""
    assert DPO(loss=loss).beta == beta
    assert DPO(loss=loss, beta=0.5).beta == 0.5


def test_dpo_config_leaves_beta_to_the_loss():
    from omegaconf import OmegaConf

    from ftune.paths import configs_dir

    assert OmegaConf.load(configs_dir() / "objective" / "dpo.yaml").beta is None


# ------------------------------------------------------------------------------------------ end to end
COMMON = ["objective=dpo", "data=jsonl", "data.eval_size=4", "trainer.batch_size=4", "trainer.lr=1e-2",
          "trainer.scheduler=constant"]
LORA = ["peft.dropout=0"]  # the LoRA runs: no dropout, so runs with different references are comparable


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    return write_prefs(tmp_path_factory.mktemp("prefs") / "prefs.jsonl")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, prefs, ftune_home):
    """LoRA DPO, reference = the adapter disabled: 8 steps on 12 pairs (3 epochs), 4 held out, ranked by
    eval=preference before and after training."""
    out = tmp_path_factory.mktemp("lora") / "run"
    return run(make_cfg(out, *COMMON, *LORA, f"data.path={prefs}", "trainer.max_steps=8", "eval=preference",
                        "eval.at_start=true", "eval.at_end=true", "eval.batch_size=3")), out


def test_lora_dpo_starts_at_log2_and_learns_the_preference(lora_run):
    t, out = lora_run
    assert t.objective.adapter and t.objective.ref_model is None  # no second copy with an adapter
    assert len(t.data.train) == 12 and len(t.data.eval) == 4
    assert all("ref_logp" not in r for r in t.data.train)
    train = [r for r in records(out) if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    # Step 1: policy == reference (LoRA B = 0), so every implicit reward is 0 and -log sigmoid(0) = log 2.
    first = train[0]
    assert first["loss"] == pytest.approx(LOG2, abs=1e-5)
    assert all(first[k] == 0 for k in REWARDS)
    for r in train:
        assert r["rewards/margin"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5)
        assert 0 <= r["rewards/accuracy"] <= 1
    late = train[-3:]
    assert all(r["rewards/margin"] > 0.3 and r["rewards/accuracy"] == 1 for r in late)
    assert all(r["loss"] < 0.6 for r in late)
    assert all(r["rewards/chosen"] > 0 > r["rewards/rejected"] for r in late)


def test_metrics_carry_rewards_and_eval_rewards(lora_run):
    t, out = lora_run
    recs = records(out)
    assert all(set(REWARDS) <= set(r) for r in recs if "loss" in r)
    evals = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in evals] == [8]
    ev = evals[0]
    assert {f"eval_{k}" for k in REWARDS} <= set(ev)
    assert ev["eval_rewards/accuracy"] == 1.0 and ev["eval_rewards/margin"] > 0.3
    assert ev["eval_loss"] < LOG2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["eval_rewards/accuracy"] == 1.0


def test_dpo_loss_and_rewards_by_hand_after_training(lora_run, tiny_tokenizer):
    """One pair at a time: the objective's loss is -log sigmoid(beta h) with h from the policy and the adapter-disabled
    model, and that reference is exactly the initial model."""
    t, _ = lora_run
    obj, model, base = t.objective, t.model, fresh_tiny_model()
    beta = obj.beta
    model.eval()
    for row in t.data.eval[:2]:
        batch = collate_pairs([row], tiny_tokenizer.pad_token_id)
        with torch.no_grad():
            loss, m = obj(model, batch)
            policy, _ = sequence_logps(model, batch)
            with model.disable_adapter():
                ref, _ = sequence_logps(model, batch)
            initial, _ = sequence_logps(base, batch)
        torch.testing.assert_close(ref, initial, rtol=1e-5, atol=1e-4)
        assert (policy - ref).abs().min() > 1e-3  # the policy moved
        rc, rr = beta * float(policy[0] - ref[0]), beta * float(policy[1] - ref[1])
        assert m["rewards/chosen"] == pytest.approx(rc, abs=1e-4)
        assert m["rewards/rejected"] == pytest.approx(rr, abs=1e-4)
        assert m["rewards/margin"] == pytest.approx(rc - rr, abs=1e-4)
        assert m["rewards/accuracy"] == float(rc > rr)
        assert float(loss) == pytest.approx(math.log1p(math.exp(-(rc - rr))), abs=1e-5)
    model.train()


def test_preference_eval_ranks_the_held_out_pairs_by_hand(lora_run, tiny_tokenizer):
    """eval=preference: each held-out pair's summed log-probs under the policy and the adapter-disabled reference, as
    sequence_logps gives them one pair at a time, and the accuracies they imply."""
    t, out = lora_run
    summary = json.loads((out / "summary.json").read_text())
    start, end = summary["task_start"], summary["task_end"]
    assert start["task"] == end["task"] == "preference" and start["n"] == end["n"] == 4
    # Before training the policy is the reference: every implicit reward margin is 0, and a tie counts as wrong.
    assert start["reward_accuracy"] == 0.0 and end["reward_accuracy"] == end["accuracy"] == 1.0
    preds = [json.loads(x) for x in (out / "eval_end" / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [r["id"] for r in t.data.eval]
    model = t.model
    model.eval()
    for p, row in zip(preds, t.data.eval):
        batch = collate_pairs([row], tiny_tokenizer.pad_token_id)
        with torch.no_grad():
            policy, _ = sequence_logps(model, batch)
            with model.disable_adapter():
                ref, _ = sequence_logps(model, batch)
        got = [p["logp_chosen"], p["logp_rejected"], p["ref_chosen"], p["ref_rejected"]]
        assert got == pytest.approx([float(policy[0]), float(policy[1]), float(ref[0]), float(ref[1])], abs=1e-4)
        assert p["reward_correct"] == (float((policy[0] - ref[0]) - (policy[1] - ref[1])) > 0)
        assert p["logp_correct"] == (float(policy[0]) > float(policy[1]))
    model.train()
    assert end["logp_accuracy"] == sum(p["logp_correct"] for p in preds) / 4


def test_precomputed_reference_matches_adapter_disabled(lora_run, prefs, tmp_path, tiny_tokenizer):
    t_ref, out_ref = lora_run
    out = tmp_path / "pre"
    t = run(make_cfg(out, *COMMON, *LORA, f"data.path={prefs}", "trainer.max_steps=3",
                     "objective.precompute_ref=true"))
    assert t.objective.ref_model is None
    rows = t.data.train + t.data.eval
    assert len(rows) == 16 and all(len(r["ref_logp"]) == 2 for r in rows)
    # The precomputed values are the initial model's log-probs of (chosen, rejected).
    base = fresh_tiny_model()
    batch = collate_pairs(rows, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        initial, _ = sequence_logps(base, batch)
    torch.testing.assert_close(batch["ref_logp"], initial, rtol=1e-5, atol=1e-4)
    # Same trajectory as the adapter-disabled reference (same seed, data order and constant lr).
    got, want = [r for r in records(out) if "loss" in r], [r for r in records(out_ref) if "loss" in r][:3]
    assert got[0]["loss"] == pytest.approx(LOG2, abs=1e-5)
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(out_ref)[:3]), rtol=0, atol=1e-4)
    for g, w in zip(got, want):
        for k in REWARDS:
            assert g[k] == pytest.approx(w[k], abs=1e-4), (g["step"], k)


def test_full_finetune_keeps_a_frozen_copy_of_the_initial_model(prefs, tmp_path):
    from ftune.train import Trainer

    out = tmp_path / "full"
    t = Trainer(make_cfg(out, *COMMON, f"data.path={prefs}", "data.eval_size=0", "peft=none",
                         "trainer.max_steps=2", "trainer.lr=1e-3"))
    ref = t.objective.ref_model
    assert ref is not None and not t.objective.adapter
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    policy = dict(t.model.named_parameters())
    assert all(p.data_ptr() != policy[n].data_ptr() for n, p in ref.named_parameters())
    t.run()
    train = [r for r in records(out) if "loss" in r]
    assert train[0]["loss"] == pytest.approx(LOG2, abs=1e-5) and all(train[0][k] == 0 for k in REWARDS)
    assert train[1]["rewards/margin"] != 0
    initial = fresh_tiny_model().state_dict()
    assert all(torch.equal(v, initial[k]) for k, v in ref.state_dict().items())
    changed = [n for n, p in t.model.named_parameters() if not torch.equal(p.detach(), initial[n])]
    assert len(changed) > len(initial) // 2


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_never_touch_a_reference(loss, prefs, tmp_path, monkeypatch, tiny_tokenizer):
    def no_reference(self, model):
        raise AssertionError(f"{loss} entered the reference context")

    monkeypatch.setattr(DPO, "_reference", no_reference)
    out = tmp_path / loss
    t = run(make_cfg(out, *COMMON, *LORA, f"data.path={prefs}", "data.eval_size=2", f"objective.loss={loss}",
                     "trainer.batch_size=1", "trainer.max_steps=2"))
    obj = t.objective
    assert obj.ref_model is None and not obj.adapter
    assert all("ref_logp" not in r for r in t.data.train)
    recs = records(out)
    train = [r for r in recs if "loss" in r]
    assert len(train) == 2 and all(math.isfinite(r["loss"]) for r in train)
    assert all(math.isfinite(r[k]) for r in train for k in REWARDS)
    assert any("eval_loss" in r and math.isfinite(r["eval_loss"]) for r in recs)
    # Step 1 is one pair through the initial model: its logged rewards and loss follow the paper's formula.
    row = t.data.train[t.order.micro_batches(0)[0][0]]
    with torch.no_grad():
        logp, n = sequence_logps(fresh_tiny_model(), collate_pairs([row], tiny_tokenizer.pad_token_id))
    mean_c, mean_r = float(logp[0] / n[0]), float(logp[1] / n[1])
    first = train[0]
    if loss == "simpo":
        rc, rr = obj.beta * mean_c, obj.beta * mean_r
        expected = math.log1p(math.exp(-(rc - rr - obj.gamma)))
    else:
        rc, rr = mean_c, mean_r
        ratio = float(log_odds(torch.tensor(mean_c, dtype=torch.float64))
                      - log_odds(torch.tensor(mean_r, dtype=torch.float64)))
        expected = -mean_c + obj.lam * math.log1p(math.exp(-ratio))
    assert first["rewards/chosen"] == pytest.approx(rc, abs=1e-4)
    assert first["rewards/rejected"] == pytest.approx(rr, abs=1e-4)
    assert first["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_group_by_length_with_pairs_warns(prefs, tmp_path, caplog):
    """Pairs are already packed into shared rows: grouping them by length is allowed but warned about."""
    import logging

    from ftune.train import Trainer

    with caplog.at_level(logging.WARNING, logger="ftune"):
        t = Trainer(make_cfg(tmp_path / "g", *COMMON, f"data.path={prefs}", "data.eval_size=0",
                             "trainer.max_steps=1", "data.group_by_length=true"))
    assert t.order.lengths is not None
    assert "data.group_by_length=true with DPO" in caplog.text and "data.group_by_length=false" in caplog.text


@pytest.mark.parametrize("method", ["ssf", "adalink"])
def test_reference_of_ftunes_own_adapters_is_the_base_model(tiny_tokenizer, method):
    """SSF starts from random scales N(1, 0.02) (and AdaLink from whatever it was loaded with), so a frozen copy of the
    model at the start of training is not the base model. The reference of DPO (and constrained SFT) must be: the
    adapter is switched off, no copy is made, and the implicit reward is β (lp_θ − lp_base)."""
    from types import SimpleNamespace

    from ftune.objectives.constrained_sft import ConstrainedSFT
    from ftune.peft.adalink import AdaLink
    from ftune.peft.ssf import SSF

    rows = [pair_row(tiny_tokenizer, "Hi", "Hello there, friend!", "Go away.")]
    batch = collate_pairs(rows, tiny_tokenizer.pad_token_id)
    base = fresh_tiny_model()
    with torch.no_grad():
        base_logp, _ = sequence_logps(base, batch)
    torch.manual_seed(0)
    model = SSF(init_std=0.2).apply(base) if method == "ssf" else AdaLink(r=4).apply(base)
    if method == "adalink":
        torch.nn.init.normal_(model.adalink.up.weight, std=0.5)  # a trained adapter: not the identity
    obj = DPO()
    obj.setup(SimpleNamespace(model=model, acc=SimpleNamespace(unwrap_model=lambda m: m)))
    assert obj.ref_model is None and not obj.needs_frozen_copy(model) and not ConstrainedSFT.needs_frozen_copy(model)
    with torch.no_grad():
        policy_logp, _ = sequence_logps(model, batch)
        _, metrics = obj(model, batch)
        after, _ = sequence_logps(model, batch)
    assert abs(float(policy_logp[0] - base_logp[0])) > 1e-3  # the adapter does change the model
    torch.testing.assert_close(after, policy_logp)  # switched back on after the reference pass
    assert metrics["rewards/chosen"] == pytest.approx(obj.beta * float(policy_logp[0] - base_logp[0]), rel=1e-4,
                                                      abs=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx(obj.beta * float(policy_logp[1] - base_logp[1]), rel=1e-4,
                                                        abs=1e-6)
