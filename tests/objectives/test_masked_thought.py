"""`objective=masked_thought`: which input tokens are replaced and by what, the rate and its warm-up, p=0 equals SFT,
bad settings, and the loop end to end (packed, resumed) on the tiny random model."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from _tiny import crash_after_checkpoint, losses, make_cfg, run  # noqa: E402

from ftune.config import ConfigError  # noqa: E402
from ftune.data.batching import collate, pack  # noqa: E402
from ftune.data.tokenize import IGNORE  # noqa: E402
from ftune.objectives.masked_thought import (  # noqa: E402
    MaskedThought,
    mask_rate,
    noise_examples,
    noise_inputs,
    unused_token_id,
)
from ftune.objectives.sft import SFT  # noqa: E402

PAD = 2


def fresh_tiny_model():
    from transformers import AutoModelForCausalLM

    from ftune.models.loading import resolve_model_dir

    return AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny_random"))


def sft_row(prompt: list[int], response: list[int]) -> dict:
    return {"input_ids": prompt + response, "labels": [IGNORE] * len(prompt) + response}


def random_rows(rows: int, prompt_len: int, response_len: int, seed: int = 0) -> list[dict]:
    """Rows of different lengths (so some are padded once collated) with ids in [100, 1000)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(rows):
        p, r = prompt_len + i % 3, response_len - i % 5
        ids = torch.randint(100, 1000, (p + r,), generator=g).tolist()
        out.append(dict(sft_row(ids[:p], ids[p:]), id=f"train-{i}"))
    return out


def random_batch(rows: int, prompt_len: int, response_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return collate(random_rows(rows, prompt_len, response_len, seed), PAD)


def fake_trainer(model, tokenizer, train_rows, step=0, total_steps=10):
    return SimpleNamespace(model=model, tokenizer=tokenizer, cfg=SimpleNamespace(seed=0), step=step,
                           total_steps=total_steps, data=SimpleNamespace(train=train_rows, eval=[]),
                           acc=SimpleNamespace(unwrap_model=lambda m: m, process_index=0))


# ------------------------------------------------------------------------------------------ the noise
def test_only_response_inputs_change_and_labels_keep_the_original_tokens():
    batch = random_batch(6, prompt_len=7, response_len=12)
    ids, labels = batch["input_ids"].clone(), batch["labels"].clone()
    noised, chosen = noise_inputs(ids, labels, 0.9, torch.Generator().manual_seed(1), replace_id=5)
    response = labels != IGNORE
    assert torch.equal(noised[~response], ids[~response])  # prompt and padding untouched
    assert torch.equal(noised[chosen], torch.full((int(chosen.sum()),), 5))
    assert torch.equal(noised[response & ~chosen], ids[response & ~chosen])
    assert not (chosen & ~response).any() and chosen.sum() > 0.7 * response.sum()
    # inputs are not modified in place; labels (aligned: labels[t] == ids[t] on the response) stay the clean ids
    assert torch.equal(ids, batch["input_ids"]) and torch.equal(labels[response], ids[response])


def test_empirical_rate_on_response_tokens_matches_p():
    p = 0.4
    batch = random_batch(64, prompt_len=200, response_len=300)
    response = batch["labels"] != IGNORE
    _, chosen = noise_inputs(batch["input_ids"], batch["labels"], p, torch.Generator().manual_seed(3), replace_id=5)
    n = int(response.sum())
    assert n > 15_000
    # iid Bernoulli(p): the observed rate is within 5 standard deviations of p
    assert abs(float(chosen.sum()) / n - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert not chosen[~response].any()


def test_random_noise_is_uniform_over_the_vocabulary_and_seeded():
    batch = random_batch(16, prompt_len=10, response_len=400)
    args = (batch["input_ids"], batch["labels"], 0.5, None, 1000)
    noised, chosen = noise_inputs(*args[:3], torch.Generator().manual_seed(7), *args[3:])
    again, _ = noise_inputs(*args[:3], torch.Generator().manual_seed(7), *args[3:])
    other, _ = noise_inputs(*args[:3], torch.Generator().manual_seed(8), *args[3:])
    assert torch.equal(noised, again) and not torch.equal(noised, other)
    drawn = noised[chosen].float()
    assert drawn.min() >= 0 and drawn.max() < 1000
    # mean of uniform{0..999} is 499.5 with standard deviation 288.7 / sqrt(n)
    assert abs(float(drawn.mean()) - 499.5) < 5 * 288.7 / math.sqrt(drawn.numel())
    assert len(set(drawn.tolist())) > 900  # not a constant id


@pytest.mark.parametrize("noise", ["pad", "mask", "random"])
def test_each_noise_replaces_with_its_id(noise, tiny_tokenizer):
    model = fresh_tiny_model().train()
    rows = [dict(sft_row(list(range(100, 110)), list(range(200, 260))), id=str(i)) for i in range(4)]
    obj = MaskedThought(rate=0.5, noise=noise, warmup_ratio=0)
    obj.setup(fake_trainer(model, tiny_tokenizer, rows))
    obj.before_step(fake_trainer(model, tiny_tokenizer, rows, step=3), [rows])
    batch = collate(rows, tiny_tokenizer.pad_token_id)
    seen = {}

    def spy(input_ids, **kwargs):
        seen["ids"] = input_ids
        return real_forward(input_ids=input_ids, **kwargs)

    real_forward, model.forward = model.forward, spy
    loss, metrics = obj(model, batch)
    replaced = seen["ids"] != batch["input_ids"]
    response = batch["labels"] != IGNORE
    assert replaced.any() and not (replaced & ~response).any()
    new = seen["ids"][replaced]
    if noise == "pad":
        assert (new == tiny_tokenizer.pad_token_id).all()
    elif noise == "mask":
        # SmolLM2's tokenizer has no mask token nor spare rows: its last unused special token stands in
        assert obj.replace_id == tiny_tokenizer.convert_tokens_to_ids("<empty_output>") == 16
        assert (new == 16).all()
        w = model.get_input_embeddings().weight
        torch.testing.assert_close(w[16], torch.cat([w[:16], w[17:]]).mean(0))
    else:
        assert len(set(new.tolist())) > 10 and new.max() < tiny_tokenizer.vocab_size
    assert metrics["mask_rate"] == int(replaced[:, 1:].sum())  # summed; the loop divides by the label tokens


def test_mask_token_choice(tiny_tokenizer):
    n = len(tiny_tokenizer)
    assert unused_token_id(tiny_tokenizer, n) == 16  # <empty_output>: BOS/EOS/pad ids are never used
    assert unused_token_id(tiny_tokenizer, n + 64) == n  # a spare embedding row past the vocabulary comes first
    assert unused_token_id(tiny_tokenizer, n, "<filename>") == 6
    with pytest.raises(ConfigError, match="not a single token"):
        unused_token_id(tiny_tokenizer, n, "no such token")
    # a stand-in that occurs in the data is refused
    obj = MaskedThought(noise="mask", mask_token="<filename>")
    with pytest.raises(ConfigError, match="occurs in the training data"):
        obj.setup(fake_trainer(fresh_tiny_model(), tiny_tokenizer, [sft_row([1, 6, 100], [200, 201])]))


def test_an_example_draws_the_same_mask_wherever_it_sits():
    """The draws depend on (seed, step, example id) only: an example alone, padded beside a longer one, or packed
    after another gets the same mask, so the number of processes, grad_accum and packing do not change a run."""
    a = dict(sft_row([100, 101], list(range(200, 260))), id="train-1")
    b = dict(sft_row([102], list(range(300, 340))), id="train-2")
    packed = pack([a, b], 200)
    assert len(packed) == 1 and packed[0]["ids"] == ["train-1", "train-2"]

    def mask(rows, seed=0, step=4):
        batch = collate(rows, PAD)
        return noise_examples(batch["input_ids"], batch["labels"], rows, 0.5, seed, step, replace_id=9)[1]

    alone_a, alone_b = mask([a])[0], mask([b])[0]
    assert 15 < int(alone_a.sum()) < 45 and 8 < int(alone_b.sum()) < 32 and not alone_a[:2].any()
    beside = mask([b, a])  # b padded to a's width, a in the second row
    assert torch.equal(beside[1], alone_a) and torch.equal(beside[0, :41], alone_b) and not beside[0, 41:].any()
    together = mask(packed)[0]
    assert torch.equal(together[:62], alone_a) and torch.equal(together[62:], alone_b)
    # another step, seed or example draws differently
    assert not torch.equal(mask([a], step=5)[0], alone_a) and not torch.equal(mask([a], seed=1)[0], alone_a)
    assert not torch.equal(mask([dict(a, id="train-3")])[0], alone_a)


def test_a_training_forward_without_its_rows_is_refused():
    obj = MaskedThought(rate=0.5, noise="pad", warmup_ratio=0)
    obj.replace_id = PAD
    rows = random_rows(2, prompt_len=4, response_len=10)
    obj.before_step(SimpleNamespace(step=1, total_steps=10), [rows[:1]])  # the step's one micro-batch has 1 row
    with pytest.raises(RuntimeError, match="before_step"):
        obj(fresh_tiny_model().train(), collate(rows, PAD))


# ------------------------------------------------------------------------------------------ schedule and loss
def test_warmup_schedule_values():
    # T = 100 steps, w = 0.66: p(step) = min(0.4, 0.4 * step / 67)
    assert mask_rate(0, 100, 0.4, 0.66) == 0.0
    assert mask_rate(10, 100, 0.4, 0.66) == pytest.approx(0.4 * 10 / 67)
    assert mask_rate(33, 100, 0.4, 0.66) == pytest.approx(0.19701492537)
    assert mask_rate(66, 100, 0.4, 0.66) == pytest.approx(0.39402985074)
    assert mask_rate(67, 100, 0.4, 0.66) == mask_rate(99, 100, 0.4, 0.66) == 0.4
    assert mask_rate(0, 100, 0.4, 0.0) == 0.4  # no warm-up: constant
    obj = MaskedThought(rate=0.2, warmup_ratio=0.5)
    obj.before_step(SimpleNamespace(step=3, total_steps=10), [])
    assert obj.current_rate() == pytest.approx(0.2 * 3 / 6)


def test_p0_is_exactly_sft_and_eval_is_never_noised():
    model = fresh_tiny_model().train()
    batch = random_batch(4, prompt_len=6, response_len=20)

    def loss_and_grads(objective):
        model.zero_grad()
        loss, _ = objective(model, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    sft_loss, sft_grads = loss_and_grads(SFT())
    mft = MaskedThought(rate=0.0, warmup_ratio=0)
    mft_loss, mft_grads = loss_and_grads(mft)
    assert torch.equal(mft_loss, sft_loss)
    assert all(torch.equal(a, b) for a, b in zip(mft_grads, sft_grads))

    noisy = MaskedThought(rate=0.5, noise="random", warmup_ratio=0)
    noisy.vocab_size = 1000
    noisy.before_step(SimpleNamespace(step=1, total_steps=10), [random_rows(4, prompt_len=6, response_len=20)])
    assert not torch.equal(loss_and_grads(noisy)[0], sft_loss)  # training inputs are noised ...
    model.eval()
    with torch.no_grad():
        assert torch.equal(noisy(model, batch)[0], SFT()(model, batch)[0])  # ... held-out ones are not


class EngineLike(torch.nn.Module):
    """Wraps a model as DeepSpeed's engine does: train() and eval() switch only the wrapped module, and the wrapper's
    own `training` flag stays True."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def forward(self, **kwargs):
        return self.module(**kwargs)

    def get_output_embeddings(self):
        return self.module.get_output_embeddings()


def test_held_out_batches_stay_clean_under_an_engine_that_keeps_its_own_training_flag():
    engine = EngineLike(fresh_tiny_model())
    rows = random_rows(4, prompt_len=6, response_len=20)
    batch = collate(rows, PAD)
    noisy = MaskedThought(rate=0.5, noise="random", warmup_ratio=0)
    noisy.vocab_size = 1000
    noisy.before_step(SimpleNamespace(step=1, total_steps=10), [rows])
    engine.eval()
    assert engine.training  # what DeepSpeed's engine does
    with torch.no_grad():
        assert torch.equal(noisy(engine, batch)[0], SFT()(engine, batch)[0])
        engine.train()
        assert not torch.equal(noisy(engine, batch)[0], SFT()(engine, batch)[0])


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"rate": 1.0}, r"objective\.rate=1\.0 must be in \[0, 1\)"),
    ({"rate": -0.1}, r"objective\.rate=-0\.1 must be in \[0, 1\)"),
    ({"noise": "blank"}, r"objective\.noise='blank' must be one of random, mask, pad"),
    ({"warmup_ratio": 1.5}, r"objective\.warmup_ratio=1\.5 must be in \[0, 1\]"),
    ({"mask_token": "<filename>"}, r"mask_token is only read by noise=mask"),
])
def test_bad_settings_fail_before_the_model_loads(kwargs, pattern, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=pattern):
        MaskedThought(**kwargs)

    def no_model(*args, **kw):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("ftune.models.loading.load_model", no_model)
    from ftune.train import Trainer

    overrides = [f"objective.{k}='{v}'" if isinstance(v, str) else f"objective.{k}={v}" for k, v in kwargs.items()]
    with pytest.raises(ConfigError, match=pattern):
        Trainer(make_cfg(tmp_path / "bad", "objective=masked_thought", *overrides))


# ------------------------------------------------------------------------------------------ end to end
def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_packed_run_follows_the_warmup_and_resumes_exactly(tmp_path, monkeypatch):
    """4 packed steps, w = 0.5: p = 0.4 * step / 3 (0, 0.133, 0.267, 0.4); crashing after checkpoint-2 and resuming
    reproduces the uninterrupted losses bit for bit (the masks depend on the step, not on RNG state)."""

    common = ["objective=masked_thought", "objective.warmup_ratio=0.5", "data.packing=true", "data.max_length=512",
              "trainer.max_steps=4", "trainer.save_every=2", "trainer.batch_size=2", "peft.dropout=0"]
    t = run(make_cfg(tmp_path / "full", *common))
    assert len(t.data.train) <= 26 and sum(len(r["ids"]) >= 2 for r in t.data.train) >= 20  # rows hold several examples
    rates = [r["mask_rate"] for r in records(tmp_path / "full") if "mask_rate" in r]
    assert len(rates) == 4 and rates[0] == 0.0
    for step, observed in enumerate(rates[1:], start=1):
        assert abs(observed - 0.4 * step / 3) < 0.07, rates  # ~500 response tokens per step
    assert all(math.isfinite(x) for x in losses(tmp_path / "full"))

    crash_after_checkpoint(monkeypatch, make_cfg(tmp_path / "resumed", *common), "checkpoint-2")
    run(make_cfg(tmp_path / "resumed", *common, "trainer.resume=auto"))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")


def test_mask_noise_end_to_end_with_lora(tmp_path):
    t = run(make_cfg(tmp_path / "m", "objective=masked_thought", "objective.noise=mask", "objective.rate=0.3",
                     "objective.warmup_ratio=0", "trainer.max_steps=3", "trainer.batch_size=4", "data.eval_size=4"))
    assert t.objective.replace_id == 16
    # the frozen base embedding keeps the mean row (LoRA does not train it); the held-out loss is on clean inputs
    w = t.acc.unwrap_model(t.model).get_input_embeddings().weight
    torch.testing.assert_close(w[16], torch.cat([w[:16], w[17:]]).mean(0))
    recs = records(tmp_path / "m")
    assert [r["mask_rate"] for r in recs if "mask_rate" in r][0] == pytest.approx(0.3, abs=0.1)
    assert any("eval_loss" in r for r in recs) and not any("eval_mask_rate" in r for r in recs)
