"""FastDropout (LoRA input dropout on CPU): nn.Dropout's maths with a quarter of the random draws."""

from __future__ import annotations

import pytest
import torch

from ftune.peft import dropout
from ftune.peft.dropout import FastDropout, as_factor, keep_and_scale


@pytest.mark.parametrize("p", [0.05, 0.1, 0.125, 0.2, 0.5])
def test_drop_rate_scale_and_expectation(p):
    torch.manual_seed(0)
    d = FastDropout(p).train()
    assert d.by_gaps == (p <= 0.125)
    x = torch.rand(400_003) + 1  # odd size: the last 64-bit draw is only partly used; values > 0 so zeros are drops
    y = d(x)
    dropped = y == 0
    if d.by_gaps:
        assert d.rate == p  # drawn at p itself
    else:
        assert abs(d.rate - p) <= 0.5 / 65536 and d.rate * 65536 == round(d.rate * 65536)
        # each of the four 16-bit slices of a 64-bit draw drops at the same rate (a sign bit left 0 would bias one)
        per_slice = dropped[: 400_000].view(-1, 4).float().mean(0)
        assert (per_slice - d.rate).abs().max().item() < 5 * (d.rate * (1 - d.rate) / 100_000) ** 0.5
    sigma = (d.rate * (1 - d.rate) / x.numel()) ** 0.5
    assert abs(dropped.float().mean().item() - d.rate) < 5 * sigma
    # the start, middle and end of the tensor drop alike (the gaps' running sum must reach the end unbiased)
    for part in dropped[: 399_999].view(3, -1).float().mean(1):
        assert abs(part.item() - d.rate) < 5 * sigma * 3 ** 0.5
    assert d.scale == 1 / (1 - d.rate)
    torch.testing.assert_close(y[~dropped], x[~dropped] * d.scale)
    assert abs(y.mean().item() - x.mean().item()) < 0.01


@pytest.mark.parametrize("draws", ["as_shipped", "three_per_round"])
def test_gap_sampler_gives_independent_drops_at_every_position(draws, monkeypatch):
    """Drops drawn from the gaps between them are independent Bernoulli(p) trials: every position of a small tensor
    drops at rate p, neighbours drop together at p^2 (a gap never 0 would forbid it; one off by one would change
    it), and runs of kept elements are geometric. With three gaps per round the sampler needs many rounds per mask:
    the result must be the same distribution."""
    if draws == "three_per_round":
        monkeypatch.setattr(dropout, "_gap_draws", lambda mean: 3)
    torch.manual_seed(6)
    p, reps, n = 0.1, 5_000, 200
    d = FastDropout(p).train()
    masks = torch.stack([~d.keep_mask(torch.empty(10, 20)).flatten() for _ in range(reps)]).float()
    sigma = (p * (1 - p) / reps) ** 0.5
    assert (masks.mean(0) - p).abs().max().item() < 5 * sigma
    pairs = (masks[:, :-1] * masks[:, 1:]).mean().item()
    assert abs(pairs - p * p) < 5 * (p * p / (reps * (n - 1))) ** 0.5
    # P(the first drop is at position k) = (1 - p)^k p
    first = masks.argmax(1)[masks.sum(1) > 0]
    for k in range(4):
        expected = (1 - p) ** k * p * reps
        assert abs((first == k).sum().item() - expected) < 5 * expected ** 0.5


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(1)
    d = FastDropout(0.2).train()
    x = torch.randn(8, 33, requires_grad=True)
    y = d(x)
    y.sum().backward()
    kept = y.detach() != 0
    torch.testing.assert_close(x.grad, kept.float() * d.scale)


def test_eval_mode_seed_and_dtype():
    d = FastDropout(0.3)
    x = torch.randn(64, 64, dtype=torch.bfloat16)
    assert d.eval()(x) is x
    d.train()
    torch.manual_seed(3)
    a = d(x)
    torch.manual_seed(3)
    b = d(x)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    assert FastDropout(0.0).train()(x) is x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_is_scaled_by_the_exact_factor(dtype):
    """A kept element is x / (1 - p) rounded once to the input's dtype: the scale itself is not rounded to bf16
    (1 / 0.95 = 1.0526 would become 1.0547 there, a 0.2% bias of every kept element)."""
    torch.manual_seed(4)
    d = FastDropout(0.05).train()
    x = (torch.rand(100_000) + 1).to(dtype)
    y = d(x)
    kept = y != 0
    assert y.dtype == dtype and 0.9 < kept.float().mean().item() < 0.99
    assert torch.equal(y[kept], (x[kept].float() * d.scale).to(dtype))


def test_lora_layers_get_fast_dropout():
    from transformers import AutoModelForCausalLM

    from ftune.models.loading import resolve_model_dir
    from ftune.peft.lora import LoRA

    model = LoRA(r=4, dropout=0.1).apply(AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny_random")))
    layers = [m for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)]
    assert len(layers) == 14  # 7 linear layers x 2 blocks
    assert all(isinstance(m.lora_dropout["default"], FastDropout) and m.lora_dropout["default"].p == 0.1
               for m in layers)
    assert not any(type(m) is torch.nn.Dropout and m.p > 0 for m in model.modules())


def test_backward_keeps_a_one_byte_mask():
    """Only the boolean keep-mask is saved for the backward pass, not a mask (or the input) in the input's dtype."""
    torch.manual_seed(5)
    d = FastDropout(0.1).train()
    x = torch.randn(16, 40, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = d(x)
    assert [(t.dtype, tuple(t.shape)) for t in saved] == [(torch.bool, (16, 40))]
    assert torch.equal(saved[0], y.detach() != 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mask_applied_through_a_uint8_view_equals_the_boolean_product(dtype):
    """keep_and_scale multiplies by the mask's bytes viewed as uint8 (fast on CPU): same values and dtype as the
    product with the boolean mask, and the view shares the mask's memory (no converted copy)."""
    torch.manual_seed(5)
    x = torch.randn(37, 129).to(dtype)
    keep = torch.rand(37, 129) > 0.3
    factor = as_factor(keep)
    assert factor.dtype == torch.uint8 and factor.data_ptr() == keep.data_ptr()
    y = keep_and_scale(x, keep, 1.25)
    assert y.dtype == dtype
    assert torch.equal(y, (x * keep).mul_(1.25))
    assert torch.equal(y[~keep], torch.zeros_like(y[~keep])) and torch.equal(y[keep], (x[keep] * 1.25))
