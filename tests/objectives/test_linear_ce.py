"""The fused LM head + summed cross-entropy: the same loss and gradients as the logits path, checked against float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ftune.data.batching import collate
from ftune.objectives.linear_ce import auto_chunk_rows, linear_cross_entropy, linear_cross_entropy_sum
from ftune.objectives.sft import SFT, labelled_ce_sum, labelled_logits, token_ce_sum

X = -100


def problem(n=30, h=16, v=50, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.5
    b = torch.randn(v, generator=g) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::4] = X  # ignored positions, at chunk boundaries and inside chunks
    return hidden, weight, b, targets


def loss_and_grads(fn, hidden, weight, bias, targets, scale=1.0, dtype=None):
    """fn's loss and the gradients of (scale x loss) w.r.t. hidden, weight and bias (all requiring grad)."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (hidden, weight, bias) if t is not None]
    h, w, b = leaves if bias is not None else (*leaves, None)
    loss = fn(h, w, b, targets)
    (loss * scale).backward()
    return loss.detach(), [t.grad for t in leaves]


def plain(h, w, b, t):
    """The logits path (float32 upcast, as token_ce_sum does); in float64 for float64 inputs."""
    z = F.linear(h, w, b)
    return F.cross_entropy(z if z.dtype == torch.float64 else z.float(), t, ignore_index=X, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_equals_float64_cross_entropy_for_any_chunking(chunk, bias):
    hidden, weight, b, targets = problem(bias=bias)
    ref_loss, ref_grads = loss_and_grads(plain, hidden, weight, b, targets, scale=2.5, dtype=torch.float64)
    loss, grads = loss_and_grads(lambda *a: linear_cross_entropy_sum(*a, chunk_rows=chunk), hidden, weight, b,
                                 targets, scale=2.5)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-5)
    assert len(grads) == len(ref_grads) == (3 if bias else 2)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # Ignored positions get no gradient at all.
    assert torch.equal(grads[0][targets == X], torch.zeros_like(grads[0][targets == X]))


def test_only_the_inputs_that_train_get_gradients():
    hidden, weight, b, targets = problem()
    h = hidden.clone().requires_grad_()
    loss = linear_cross_entropy_sum(h, weight, b, targets, chunk_rows=8)  # a frozen head, as under LoRA
    loss.backward()
    ref = hidden.clone().requires_grad_()
    plain(ref, weight, b, targets).backward()
    torch.testing.assert_close(h.grad, ref.grad, rtol=1e-5, atol=1e-6)
    assert weight.grad is None and b.grad is None
    with torch.no_grad():  # evaluation: the loss only
        torch.testing.assert_close(linear_cross_entropy_sum(hidden, weight, b, targets), plain(hidden, weight, b,
                                                                                                  targets))


def test_all_positions_ignored_give_zero_loss_and_zero_gradients():
    hidden, weight, b, _ = problem()
    targets = torch.full((hidden.shape[0],), X)
    loss, grads = loss_and_grads(linear_cross_entropy_sum, hidden, weight, b, targets)
    assert loss.item() == 0.0 and all(not g.any() for g in grads)


def test_under_bf16_autocast_as_close_to_float64_as_the_logits_path():
    """Under autocast the head runs in bf16 on both paths: the fused one must be no less accurate."""
    hidden, weight, b, targets = problem(n=64, h=32, v=300, seed=1)
    _, ref_grads = loss_and_grads(plain, hidden, weight, b, targets, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_loss, fused = loss_and_grads(lambda *a: linear_cross_entropy_sum(*a, chunk_rows=16), hidden, weight,
                                           b, targets)
        plain_loss, unfused = loss_and_grads(plain, hidden, weight, b, targets)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-3, atol=1e-3)
    for f, u, r in zip(fused, unfused, ref_grads):
        assert f.dtype == u.dtype == torch.float32
        err_fused, err_plain = (f.double() - r).norm(), (u.double() - r).norm()
        assert err_fused <= 1.5 * err_plain + 1e-6 * r.norm(), (float(err_fused), float(err_plain))
        assert err_fused < 0.02 * r.norm()


def test_auto_chunk_rows():
    assert auto_chunk_rows(49152) == 128  # SmolLM2: the fastest measured
    assert auto_chunk_rows(128256) == 64  # Llama 3
    assert auto_chunk_rows(10**9) == 16
    assert auto_chunk_rows(128256, "cuda") == 512  # an accelerator takes larger chunks
    assert auto_chunk_rows(49152, "cpu", head_trains=True) == 1024  # full fine-tuning: fewer weight-gradient products


# ------------------------------------------------------------------------------------------- through a model
def tiny_model(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).train()


def sft_batch():
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(3):
        prompt, response = torch.randint(5, 300, (3 + i,), generator=g).tolist(), \
            torch.randint(5, 300, (2 + 3 * i,), generator=g).tolist()
        rows.append({"input_ids": prompt + response, "labels": [X] * len(prompt) + response})
    return collate(rows, 0)


def named_grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [True, False])
def test_sft_loss_and_every_gradient_equal_the_logits_path(tied):
    """Full fine-tuning, so the head's (or the tied embeddings') weight gradient is checked too."""
    model, batch = tiny_model(tied), sft_batch()
    fused = named_grads(model, SFT()(model, batch)[0])
    logits, targets, _, _ = labelled_logits(model, batch)
    loss_plain = token_ce_sum(logits, targets)
    unfused = named_grads(model, loss_plain)
    torch.testing.assert_close(SFT()(model, batch)[0], loss_plain, rtol=1e-6, atol=1e-5)
    assert fused.keys() == unfused.keys()
    assert "model.embed_tokens.weight" in fused and (tied or "lm_head.weight" in fused)
    for name in unfused:
        torch.testing.assert_close(fused[name], unfused[name], rtol=1e-4, atol=1e-6)


def test_a_head_with_a_hook_is_not_bypassed():
    """A forward hook on the head (as some adapters install) changes its output: the fused path, which reads only the
    head's weight, must not be used then."""
    model, batch = tiny_model(False), sft_batch()
    model.lm_head.register_forward_hook(lambda mod, args, out: out * 2.0)
    logits, targets, _, _ = labelled_logits(model, batch)
    torch.testing.assert_close(labelled_ce_sum(model, batch), token_ce_sum(logits, targets))
    hidden_unscaled = F.cross_entropy(logits.float() / 2.0, targets, ignore_index=X, reduction="sum")
    assert not torch.allclose(labelled_ce_sum(model, batch), hidden_unscaled)


# ------------------------------------------------------------------------------------------- per position
@pytest.mark.parametrize("head_trains", [False, True])
def test_per_position_losses_and_their_gradients_equal_float64(head_trains):
    """Each position's loss, with a different incoming gradient per position (as DPO's sequence sums give): fused for
    a frozen head, through the logits when the head trains."""
    hidden, weight, b, targets = problem()
    upstream = torch.randn(hidden.shape[0], generator=torch.Generator().manual_seed(3))

    def run(dtype, fn):
        h = hidden.detach().to(dtype).requires_grad_()
        w, bb = weight.to(dtype).requires_grad_(head_trains), b.to(dtype).requires_grad_(head_trains)
        losses = fn(h, w, bb)
        (losses * upstream.to(dtype)).sum().backward()
        return losses.detach(), h.grad, w.grad

    ref_losses, ref_gh, ref_gw = run(torch.float64, lambda h, w, bb: F.cross_entropy(
        F.linear(h, w, bb), targets, ignore_index=X, reduction="none"))
    losses, gh, gw = run(torch.float32, lambda h, w, bb: linear_cross_entropy(h, w, bb, targets, chunk_rows=7))
    assert losses.shape == targets.shape and losses.dtype == torch.float32
    torch.testing.assert_close(losses.double(), ref_losses, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gh.double(), ref_gh, rtol=1e-5, atol=1e-6)
    if head_trains:
        torch.testing.assert_close(gw.double(), ref_gw, rtol=1e-5, atol=1e-6)
    else:
        assert gw is None


def test_no_gradient_work_under_no_grad():
    hidden, weight, b, targets = problem()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.no_grad():
        total = linear_cross_entropy_sum(h, w, b, targets)
        each = linear_cross_entropy(h, w, b, targets)
    assert total.grad_fn is None and each.grad_fn is None
    torch.testing.assert_close(each.sum(), total)
    torch.testing.assert_close(total, plain(hidden, weight, b, targets))


def test_dpo_sequence_logps_equal_the_logits_path_with_an_adapter():
    """DPO with LoRA: the fused per-position path gives the same sequence log-probs and adapter gradients as the
    model's own logits."""
    from ftune.objectives.dpo import sequence_logps
    from ftune.peft.lora import LoRA

    model, batch = LoRA(r=4, dropout=0.0).apply(tiny_model(True)), sft_batch()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    logps, n = sequence_logps(model, batch)
    weights = torch.tensor([1.0, -2.0, 0.5])
    fused = named_grads(model, (logps * weights).sum())

    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits.float()
    token = F.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["labels"][:, 1:] != X
    ref = (token * mask).sum(1)
    torch.testing.assert_close(logps, ref, rtol=1e-5, atol=1e-4)
    assert n.tolist() == mask.sum(1).tolist()
    unfused = named_grads(model, (ref * weights).sum())
    assert fused.keys() == unfused.keys() and any("lora_B" in k for k in fused)
    for name in fused:
        torch.testing.assert_close(fused[name], unfused[name], rtol=1e-4, atol=1e-5)


def test_a_training_head_and_a_frozen_one_give_bitwise_equal_losses():
    """DPO under full fine-tuning: the policy's head trains (logits path), the frozen reference's does not (fused);
    at the same weights their log-probs must agree exactly, so the first step's rewards are exactly 0."""
    hidden, weight, b, targets = problem(n=300, v=500)
    trained = linear_cross_entropy(hidden.clone().requires_grad_(), weight.clone().requires_grad_(), b, targets,
                                   chunk_rows=64)
    assert trained.grad_fn is not None
    with torch.no_grad():
        frozen = linear_cross_entropy(hidden, weight, b, targets, chunk_rows=64)
    assert torch.equal(trained.detach(), frozen)
