"""The LM head and the summed cross-entropy in one autograd node, chunk by chunk, on any device.

`linear_cross_entropy_sum(hidden, weight, bias, targets)` equals
`F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=-100, reduction="sum")`, but never
holds the (N, V) logits: for each chunk of positions it computes the logits, their log-sum-exp and the gradient of the
loss with respect to them (softmax minus one-hot), and turns that at once into the gradients of `hidden` (and of the
head's weight and bias where they train). The backward pass only scales those by the incoming gradient.

Against the plain path (logits, float32 upcast, log-softmax, NLL) this skips the float32 log-probabilities kept for the
backward pass, the (N, V) zero-filled gradient buffer of the NLL backward and the log-softmax backward; on a CPU the
LM head + loss of SmolLM2-135M at 915 labelled positions (vocabulary 49,152, bf16 autocast) take 235-245 ms forward +
backward instead of 385-410 ms, where the two matmuls alone take 220 ms, and no (N, V) tensor is kept.

Our own code: Liger's fused linear cross-entropy (`trainer.liger=true`) does the same in Triton, and Apple's
cut-cross-entropy also needs Triton; neither runs on a CPU. The gradients are
computed in the forward pass, so the head's own gradient needs the loss summed (one incoming gradient for all
positions); `linear_cross_entropy` gives each position's loss where the head does not train (DPO with an adapter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ftune.data.tokenize import IGNORE

# Logits per chunk. CPU: 2^23 float32 values (32 MiB) stay close to the caches; measured on SmolLM2-135M's head
# (vocabulary 49,152 -> 128 rows): 32 rows 320 ms, 64 rows 280, 128 rows 245, 256 rows 280, 1024 rows 350.
# GPU: 2^26 (256 MiB), so that a chunk's matmuls fill the device and few chunks pay the per-chunk kernel launches
# (about Liger's choice for a Llama-3 vocabulary at 16k positions: 512 rows); not yet measured on a GPU.
# A head that trains (full fine-tuning) adds a (V, H) weight-gradient product per chunk, whose cost is mostly writing
# its output: 8x larger chunks there. SmolLM2's head + loss with its weight gradient, 915 labels, CPU bf16: 775 ms at
# 128 rows, 535 at 512, 495 at 1024, against 519 ms for the logits path.
CHUNK_LOGITS = {"cpu": 1 << 23}
CHUNK_LOGITS_ACCELERATOR = 1 << 26
HEAD_GRAD_FACTOR = 8


def auto_chunk_rows(vocab: int, device_type: str = "cpu", head_trains: bool = False) -> int:
    """Positions per chunk for a vocabulary of `vocab` on `device_type`: the largest power of two with at most
    CHUNK_LOGITS logits (HEAD_GRAD_FACTOR times that when the head's weight gets a gradient), at least 16."""
    budget = CHUNK_LOGITS.get(device_type, CHUNK_LOGITS_ACCELERATOR) * (HEAD_GRAD_FACTOR if head_trains else 1)
    rows = max(1, budget // max(1, vocab))
    return max(16, 1 << (rows.bit_length() - 1))


class _LinearCrossEntropy(torch.autograd.Function):
    """per_position=False: the summed loss (a scalar); True: each position's loss (N,), for a head that does not
    train (the weight gradient would need every position's incoming gradient at once)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, per_position):  # noqa: D401 - autograd.Function API
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        assert not (per_position and (need_w or need_b)), "per-position losses need a frozen head"
        losses = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        # The matmuls' dtype: autocast's where it is on (as the model's own head would run), else the weight's. The
        # weight is cast once, not per chunk (autocast caches casts of trained weights only; a frozen head is not).
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        w_mm = weight.to(dtype)
        b_mm = bias.to(dtype) if bias is not None else None
        for s in range(0, hidden.shape[0], chunk_rows):
            h, t = hidden[s: s + chunk_rows], targets[s: s + chunk_rows]
            logits = F.linear(h.to(dtype), w_mm, b_mm)
            z = logits.float()  # a new tensor unless the logits are float32 already; either way not needed after
            valid = t != IGNORE
            safe_t = torch.where(valid, t, torch.zeros_like(t))
            picked = z.gather(1, safe_t[:, None]).squeeze(1)
            top = z.amax(1, keepdim=True)
            z.sub_(top).exp_()
            total = z.sum(1, keepdim=True)
            lse = (top + total.log()).squeeze(1)
            losses[s: s + chunk_rows] = torch.where(valid, lse - picked, torch.zeros_like(lse))
            if not (need_h or need_w or need_b):
                continue
            # d loss / d logits = softmax - one-hot on labelled positions, 0 on ignored ones, in the matmuls' dtype.
            g = z.mul_(valid[:, None].to(z.dtype) / total).to(dtype)
            g.scatter_add_(1, safe_t[:, None], -valid[:, None].to(g.dtype))  # no nonzero(): no GPU sync per chunk
            if need_h:
                grad_h[s: s + chunk_rows] = g @ w_mm
            if need_w:
                grad_w += (g.t() @ h.to(dtype)).float()
            if need_b:
                grad_b += g.sum(0, dtype=torch.float32)
        ctx.grads, ctx.per_position = (grad_h, grad_w, grad_b), per_position
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return losses if per_position else losses.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.per_position:  # each position's loss depends on its own hidden state only
            grad_h = ctx.grads[0]
            return (None if grad_h is None else (grad_h * grad_loss[:, None]).to(ctx.dtypes[0]),
                    None, None, None, None, None)
        scaled = tuple(None if g is None else (g * grad_loss).to(d) for g, d in zip(ctx.grads, ctx.dtypes))
        return (*scaled, None, None, None)


def _head_trains(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether this pass computes a gradient for the head's weight or bias."""
    return torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))


def _no_grad_detached(*tensors):
    """Detached under torch.no_grad() (evaluation, a reference model), so that no gradient is computed there."""
    if torch.is_grad_enabled():
        return tensors
    return tuple(None if t is None else t.detach() for t in tensors)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             targets: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Sum over positions whose target is not -100 of the cross-entropy of `hidden @ weight.T + bias`, in float32.

    Args:
        hidden: (N, H) last hidden states at the positions that predict a target.
        weight: (V, H) the LM head's weight (tied to the input embeddings or not).
        bias: (V,) the head's bias, or None.
        targets: (N,) token ids, -100 where ignored.
        chunk_rows: positions per chunk; None = `auto_chunk_rows(V, device)`.
    """
    rows = chunk_rows or auto_chunk_rows(weight.shape[0], hidden.device.type, _head_trains(weight, bias))
    return _LinearCrossEntropy.apply(*_no_grad_detached(hidden, weight, bias), targets, rows, False)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Each position's cross-entropy (N,), float32, 0 where the target is -100; arguments as in
    `linear_cross_entropy_sum`. Fused when the head does not train (LoRA and the other adapters; a reference model);
    a head that trains takes the logits path, chunk by chunk."""
    rows = chunk_rows or auto_chunk_rows(weight.shape[0], hidden.device.type)
    if not _head_trains(weight, bias):
        return _LinearCrossEntropy.apply(*_no_grad_detached(hidden, weight, bias), targets, rows, True)
    return torch.cat([_tracked_losses(hidden[s: s + rows], weight, bias, targets[s: s + rows])
                      for s in range(0, hidden.shape[0], rows)] or [hidden.new_zeros(0, dtype=torch.float32)])


def _tracked_losses(h, weight, bias, t):
    """One chunk's per-position losses through ordinary autograd ops, computed exactly as the fused forward computes
    them (so that, e.g., DPO's trained policy and its frozen reference agree bit for bit on the same weights)."""
    z = F.linear(h, weight, bias).float()
    valid = t != IGNORE
    safe_t = torch.where(valid, t, torch.zeros_like(t))
    picked = z.gather(1, safe_t[:, None]).squeeze(1)
    top = z.detach().amax(1, keepdim=True)
    lse = (top + (z - top).exp().sum(1, keepdim=True).log()).squeeze(1)
    return torch.where(valid, lse - picked, torch.zeros_like(lse))
