"""Attention over packed rows that computes each example's own causal block, not the whole row under a mask.

Packed rows restart `position_ids` at every example. With `attn_implementation="sdpa"`, transformers then builds a
4D block-causal mask and SDPA computes the full T x T score matrix of the row, most of it masked out: on a 2,048-token
row of ~250-token examples, ~8x the attention work that the examples need, and a masked SDPA leaves the fused causal
kernels. This variant (registered with transformers' AttentionInterface as "ftune_sdpa", so every model that takes
`attn_implementation` uses it) skips the mask in training forwards and runs torch's SDPA once per example with
`is_causal=True` (grouped-query heads through `enable_gqa`): the FLOPs of FlashAttention's variable-length kernel, on
any device, with the maths of SDPA. Everything else (a 2D padding mask, a KV cache, decoding, sliding windows,
torch.compile) goes through the stock "sdpa" path unchanged.

Written here because transformers' variable-length path needs the flash-attn package (CUDA only) and torch's own
varlen attention is CUDA-only too; this one runs and is tested on a CPU.
"""

from __future__ import annotations

import weakref

import torch

NAME = "ftune_sdpa"

_last: tuple[weakref.ref | None, int, list] = (None, -1, [])


def _segments(position_ids: torch.Tensor, batch: int, length: int) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) spans of its examples: a new one wherever position_ids do not step by 1 (transformers'
    `find_packed_sequence_indices` rule). Cached for the tensor object (unchanged since), which every layer of a
    forward shares."""
    global _last
    ref, version, spans = _last
    if ref is not None and ref() is position_ids and version == position_ids._version:
        return spans
    pos = position_ids.expand(batch, length)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    spans = []
    for row in starts.cpu():
        s = row.nonzero().flatten().tolist() + [length]
        spans.append(list(zip(s[:-1], s[1:])))
    _last = (weakref.ref(position_ids), position_ids._version, spans)
    return spans


def _plain_causal_forward() -> bool:
    return not torch.compiler.is_compiling()


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    b, heads, t, _ = query.shape
    if (attention_mask is not None or position_ids is None or position_ids.dim() != 2 or key.shape[2] != t
            or t == 1 or is_causal is False or not getattr(module, "is_causal", True) or kwargs.get("softcap")
            or kwargs.get("output_attentions") or not _plain_causal_forward()):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    spans = _segments(position_ids, b, t)
    if all(len(row) == 1 for row in spans):  # no packing: one call, as stock sdpa
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                      is_causal=True, **kwargs)
    # unbind + split, not slicing: their backward passes are one stack and one cat, where every slice's backward
    # would zero-fill a full-size gradient (one SmolLM2 layer's attention forward + backward, 2 x 1,024 tokens in
    # 256-token examples, on a 2-core CPU: 50.8 ms sliced, 40.6 split).
    gqa = key.shape[1] != heads
    rows = []
    for row, q, k, v in zip(spans, query.unbind(0), key.unbind(0), value.unbind(0)):
        sizes = [e - s for s, e in row]
        parts = [torch.nn.functional.scaled_dot_product_attention(
                     qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0), dropout_p=dropout, scale=scaling,
                     is_causal=True, enable_gqa=gqa)[0]
                 for qs, ks, vs in zip(q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1))]
        rows.append(torch.cat(parts, dim=1))
    return torch.stack(rows).transpose(1, 2).contiguous(), None


def packed_sdpa_mask(batch_size, q_length, kv_length, attention_mask=None, **kwargs):
    """No mask for a training forward (no padding mask, no cache) of a model without sliding windows or a model-specific
    mask overlay: the attention above then separates the examples. Otherwise transformers' SDPA mask. (transformers
    marks an overlay, a model's own `or_mask_function` / `and_mask_function` such as bidirectional attention over
    image tokens, by asking for `use_vmap`; such a mask is more than causal-per-example and is kept.)"""
    from transformers.masking_utils import sdpa_mask

    config = kwargs.get("config")
    sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    sliding = sliding or any(k != "full_attention" for k in (getattr(config, "layer_types", None) or []))
    if (attention_mask is None and q_length == kv_length and kwargs.get("q_offset", 0) == 0
            and kwargs.get("kv_offset", 0) == 0 and not sliding and not kwargs.get("use_vmap", False)
            and _plain_causal_forward()):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, attention_mask=attention_mask,
                     **kwargs)


def register() -> str:
    """Make "ftune_sdpa" known to transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, packed_sdpa_mask)
    return NAME


def use_packed_attention(model) -> bool:
    """Switch a model loaded with "sdpa" to the per-example variant; returns whether it did."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(register())
    return True
