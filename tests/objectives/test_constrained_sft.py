"""`objective=constrained_sft`: the token loss and its gradient by hand, the β schedule per response position, the
cross-entropy gradient while the policy equals the reference, and the loop with LoRA and with full fine-tuning."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[1]))
from _tiny import losses, make_cfg, run  # noqa: E402

from ftune.config import ConfigError  # noqa: E402
from ftune.data.batching import collate, pack  # noqa: E402
from ftune.data.tokenize import IGNORE  # noqa: E402
from ftune.objectives.constrained_sft import (  # noqa: E402
    ConstrainedSFT,
    beta_schedule,
    constrained_token_losses,
    response_positions,
)
from ftune.objectives.sft import SFT  # noqa: E402

X = IGNORE


def fresh_tiny_model():
    from transformers import AutoModelForCausalLM

    from ftune.models.loading import resolve_model_dir

    return AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny_random"))


def fake_trainer(model):
    return SimpleNamespace(model=model, acc=SimpleNamespace(unwrap_model=lambda m: m))


def batch_of(rows: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Short responses of different lengths (1 to 9 tokens), so every β of the schedule occurs, and padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(rows):
        prompt, response = torch.randint(100, 1000, (4 + i,), generator=g).tolist(), \
            torch.randint(100, 1000, (1 + 4 * i,), generator=g).tolist()
        out.append({"input_ids": prompt + response, "labels": [X] * len(prompt) + response})
    return collate(out, 2)


# ------------------------------------------------------------------------------------------ the maths
def test_token_losses_by_hand():
    # Δ = policy − ref = (0, −1, 1) with β = (0.5, 2, 0.1):
    #   w = 2σ(−βΔ) = (1, 2σ(2), 2σ(−0.1)) = (1, 1.7615941559557646, 0.95004162504212)
    #   surrogate = −w·log π_θ = 1·1 + 1.7615941559557646·2 + 0.95004162504212·0.5 = 4.998209124432589
    #   objective = (2/β) softplus(−βΔ) = 4·ln 2 + ln(1 + e²) + 20·ln(1 + e^−0.1)
    #             = 2.772588722239781 + 2.1269280110429727 + 12.887933201471418
    policy = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.0, -1.0, -1.5], dtype=torch.float64)
    beta = torch.tensor([0.5, 2.0, 0.1], dtype=torch.float64)
    surrogate, weight, objective = constrained_token_losses(policy, ref, beta)
    w = [1.0, 1.7615941559557646, 0.95004162504212]
    torch.testing.assert_close(weight, torch.tensor(w, dtype=torch.float64))
    assert float(surrogate.detach().sum()) == pytest.approx(4.998209124432589, rel=1e-12)
    torch.testing.assert_close(objective, torch.tensor([2.772588722239781, 2.1269280110429727, 12.887933201471418],
                                                       dtype=torch.float64))
    surrogate.sum().backward()
    torch.testing.assert_close(policy.grad, -torch.tensor(w, dtype=torch.float64))  # w_t × the CE gradient (−1)


def test_surrogate_has_the_gradient_of_the_papers_objective():
    """d/dlogπ (2/β) softplus(−β(logπ − ref)) = −2σ(−βΔ) = −w: the surrogate's gradient, except below the clamp."""
    g = torch.Generator().manual_seed(0)
    policy = (-3 * torch.rand(50, generator=g, dtype=torch.float64)).requires_grad_(True)
    ref = -3 * torch.rand(50, generator=g, dtype=torch.float64)
    beta = torch.tensor([0.5, 2.0, 2.0, 2.0, 2.0] + [0.1] * 45, dtype=torch.float64)
    paper = ((2 / beta) * F.softplus(-beta * (policy - ref))).sum()
    (paper_grad,) = torch.autograd.grad(paper, policy)
    surrogate, _, _ = constrained_token_losses(policy, ref, beta)
    (surrogate_grad,) = torch.autograd.grad(surrogate.sum(), policy)
    torch.testing.assert_close(surrogate_grad, paper_grad)
    # the code's clamp: w = 2σ(−20) = 4.1e-9 is raised to 1e-3
    far = torch.tensor([-0.1], dtype=torch.float64, requires_grad=True)
    loss, weight, _ = constrained_token_losses(far, torch.tensor([-10.1], dtype=torch.float64),
                                               torch.tensor([2.0], dtype=torch.float64))
    loss.sum().backward()
    assert float(weight) == pytest.approx(4.1223072363804075e-09) and float(far.grad) == pytest.approx(-1e-3)


def test_policy_equal_reference_and_small_beta_give_cross_entropy():
    policy = torch.tensor([-0.3, -2.5, -7.0], dtype=torch.float64, requires_grad=True)
    for beta in (0.5, 2.0, 0.1):
        loss, weight, objective = constrained_token_losses(policy, policy.detach(), torch.full((3,), beta))
        assert torch.equal(weight, torch.ones(3, dtype=torch.float64))  # w = 2σ(0) = 1 exactly
        assert torch.equal(loss, -policy)  # value and gradient of the cross-entropy
        torch.testing.assert_close(objective, torch.full((3,), 2 * math.log(2) / beta, dtype=torch.float64))
    # β → 0: (2/β) softplus(−βΔ) = 2 ln 2 / β − Δ + O(β), and w → 1
    ref = torch.tensor([-1.0, -1.2, -4.0], dtype=torch.float64)
    beta = torch.full((3,), 1e-6, dtype=torch.float64)
    _, weight, objective = constrained_token_losses(policy.detach(), ref, beta)
    torch.testing.assert_close(objective - 2 * math.log(2) / beta, -(policy.detach() - ref), atol=1e-5, rtol=0)
    torch.testing.assert_close(weight, torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)


def test_beta_schedule_per_response_position():
    positions = torch.tensor([-1, 0, 1, 2, 3, 4, 5, 6, 20])
    assert beta_schedule(positions, 0.1, 5.0, 20.0, 5)[1:].tolist() == pytest.approx(
        [0.5, 2.0, 2.0, 2.0, 2.0, 0.1, 0.1, 0.1])
    assert beta_schedule(positions, 0.1, 5.0, 20.0, 0)[1:].tolist() == pytest.approx([0.1] * 8)
    assert beta_schedule(positions, 0.2, 5.0, 20.0, 1)[1:4].tolist() == pytest.approx([1.0, 0.2, 0.2])
    assert beta_schedule(positions, 0.1, 5.0, 20.0, 3)[1:5].tolist() == pytest.approx([0.5, 2.0, 2.0, 0.1])


def test_response_positions_restart_per_example():
    # one row: example A (prompt 3, response 4), example B (prompt 2, response 3), 2 padding tokens
    a = {"input_ids": [1, 2, 3, 10, 11, 12, 13], "labels": [X, X, X, 10, 11, 12, 13], "id": "a"}
    b = {"input_ids": [4, 5, 20, 21, 22], "labels": [X, X, 20, 21, 22], "id": "b"}
    packed = collate(pack([a, b], 12), 0)
    padded = collate([a, b], 0)
    assert response_positions(packed["labels"], packed["position_ids"]).tolist() == [
        [-1, -1, -1, 0, 1, 2, 3, -1, -1, 0, 1, 2]]
    assert response_positions(padded["labels"], padded["position_ids"]).tolist() == [
        [-1, -1, -1, 0, 1, 2, 3], [-1, -1, 0, 1, 2, -1, -1]]
    # multi-turn: the second assistant turn of the same example continues the count (as the paper's code does)
    turns = collate([{"input_ids": [1, 2, 30, 31, 3, 4, 40, 41], "labels": [X, X, 30, 31, X, X, 40, 41]}], 0)
    assert response_positions(turns["labels"], turns["position_ids"]).tolist() == [[-1, -1, 0, 1, -1, -1, 2, 3]]


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"beta": 0.0}, r"objective\.beta=0\.0 must be > 0"),
    ({"bias_factor": -1.0}, r"must be > 0"),
    ({"bias_length": -1}, r"objective\.bias_length=-1 must be >= 0"),
])
def test_bad_settings(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        ConstrainedSFT(**kwargs)


# ------------------------------------------------------------------------------------------ on the tiny model
def grads(model, objective, batch):
    model.zero_grad()
    loss, metrics = objective(model, batch)
    loss.backward()
    named = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), named, metrics


@pytest.mark.parametrize("peft", ["lora", "full"])
def test_policy_equal_reference_gives_the_cross_entropy_gradient(peft):
    """At the start (LoRA B = 0, or the frozen copy of the initial weights) Δ_t = 0 and w_t = 1 exactly, so the loss
    and every gradient equal plain SFT's."""
    from ftune.peft.lora import LoRA

    model = fresh_tiny_model().train()
    if peft == "lora":
        model = LoRA(r=4, dropout=0.0).apply(model)
    objective = ConstrainedSFT()
    objective.setup(fake_trainer(model))
    assert objective.adapter == (peft == "lora") and (objective.ref_model is None) == (peft == "lora")
    batch = batch_of()
    loss, g, metrics = grads(model, objective, batch)
    sft_loss, sft_g, _ = grads(model, SFT(), batch)
    n = SFT().normalizer(batch)
    assert metrics == {"weight": n, "delta": 0.0, "objective": pytest.approx(metrics["objective"])}
    torch.testing.assert_close(loss, sft_loss, rtol=1e-6, atol=1e-6)
    assert g.keys() == sft_g.keys() and len(g) > 0
    for name in g:  # SFT runs the head + loss fused, so float32 rounding differs slightly from the logits path here
        torch.testing.assert_close(g[name], sft_g[name], rtol=1e-5, atol=1e-6)


def test_moved_policy_gets_the_weighted_cross_entropy_gradient_by_hand():
    """With the LoRA weights moved, the gradient is Σ_t w_t ∇(−log π_θ(y_t)) with w_t = 2σ(−β_t Δ_t), β_t from each
    token's index in its response: computed here from full logits, independently of the objective's code."""
    from ftune.peft.lora import LoRA

    torch.manual_seed(0)
    model = LoRA(r=4, dropout=0.0).apply(fresh_tiny_model().train())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    objective = ConstrainedSFT()
    objective.setup(fake_trainer(model))
    batch = batch_of()
    loss, g, metrics = grads(model, objective, batch)

    def token_logp(m):
        logits = m(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits.float()
        return F.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)

    with torch.no_grad(), model.disable_adapter():
        ref = token_logp(model)
    model.zero_grad()
    policy = token_logp(model)
    schedule = [0.5, 2.0, 2.0, 2.0, 2.0] + [0.1] * 100
    labels = batch["labels"][:, 1:]
    total = 0.0
    weights = []
    for r in range(labels.shape[0]):
        k = 0
        for t in range(labels.shape[1]):
            if labels[r, t] == IGNORE:
                continue
            beta = schedule[k]
            k += 1
            w = 2 * torch.sigmoid(-beta * (policy[r, t] - ref[r, t])).detach()
            weights.append(float(w))
            total = total - w * policy[r, t]
    assert k > 5  # the longest response reaches the β = 0.1 tail
    total.backward()
    torch.testing.assert_close(loss, total.detach(), rtol=1e-5, atol=1e-5)
    assert metrics["weight"] == pytest.approx(sum(weights), rel=1e-5)
    assert max(abs(w - 1) for w in weights) > 0.05  # the policy really moved: not plain cross-entropy
    for name, p in model.named_parameters():  # the objective's fused head rounds differently in float32
        if p.requires_grad:
            torch.testing.assert_close(g[name], p.grad, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ end to end
def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


COMMON = ["trainer.max_steps=4", "trainer.batch_size=4", "trainer.lr=1e-2", "trainer.scheduler=constant"]


def test_lora_run_packed_starts_as_sft_and_moves_away(tmp_path):
    packed = ["data.packing=true", "data.max_length=512", "peft.dropout=0"]
    t = run(make_cfg(tmp_path / "c", "objective=constrained_sft", *COMMON, *packed))
    run(make_cfg(tmp_path / "s", *COMMON, *packed))
    assert t.objective.adapter and t.objective.ref_model is None  # the adapter disabled: no second copy
    rec = [r for r in records(tmp_path / "c") if "weight" in r]
    assert len(rec) == 4 and rec[0]["weight"] == 1.0 and rec[0]["delta"] == 0.0
    assert losses(tmp_path / "c")[0] == pytest.approx(losses(tmp_path / "s")[0], rel=1e-6)
    assert rec[-1]["delta"] > 0 and rec[-1]["weight"] < 1  # likelier than the initial model: weights drop


def test_full_finetune_keeps_a_frozen_initial_copy(tmp_path):
    t = run(make_cfg(tmp_path / "f", "objective=constrained_sft", "peft=none", *COMMON))
    ref, initial = t.objective.ref_model, fresh_tiny_model()
    assert ref is not None and not t.objective.adapter
    assert not any(p.requires_grad for p in ref.parameters())
    trained = t.acc.unwrap_model(t.model).state_dict()
    for name, p in initial.state_dict().items():
        assert torch.equal(ref.state_dict()[name], p)  # the reference never trains
    assert any(not torch.equal(trained[n], p) for n, p in initial.state_dict().items())
    rec = [r for r in records(tmp_path / "f") if "weight" in r]
    assert rec[0]["weight"] == 1.0 and rec[-1]["weight"] != 1.0
    assert all(math.isfinite(x) for x in losses(tmp_path / "f"))
