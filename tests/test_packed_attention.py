"""Per-example attention over packed rows ("ftune_sdpa"): the maths of transformers' masked SDPA, without the mask."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from ftune.models import packed_attention
from ftune.models.packed_attention import use_packed_attention

# Three rows: three packed examples; two examples and a padding tail whose positions run on (ftune's collate);
# one example (no packing).
POS = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4],
                    [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5],
                    list(range(12))])


def _tiny(arch="llama", **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config, cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (MistralConfig, MistralForCausalLM)
    cfg = config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, **extra)
    stock = cls._from_config(cfg, attn_implementation="sdpa")
    ours = copy.deepcopy(stock)
    assert use_packed_attention(ours) and ours.config._attn_implementation == "ftune_sdpa"
    return stock, ours


def _forward_backward(model, ids, pos):
    model.zero_grad()
    logits = model(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False).logits
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs it)")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_packed_rows_match_masked_sdpa_in_values_and_gradients(monkeypatch, device):
    stock, ours = _tiny()
    stock, ours, pos = stock.to(device), ours.to(device), POS.to(device)
    ids = torch.randint(0, 100, POS.shape, device=device)
    tol = dict(rtol=1e-5, atol=1e-5) if device == "cpu" else dict(rtol=1e-4, atol=1e-4)
    want, want_grads = _forward_backward(stock, ids, pos)
    got, got_grads = _forward_backward(ours, ids, pos)
    torch.testing.assert_close(got, want, **tol)
    for name, g in got_grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=1e-6 if device == "cpu" else 1e-5)
    # The comparison can fail: one span per row (examples attending to each other) gives other logits.
    monkeypatch.setattr(packed_attention, "_segments", lambda p, b, t: [[(0, t)]] * b)
    leaky, _ = _forward_backward(ours, ids, pos)
    assert (leaky[:2] - want[:2]).abs().max() > 1e-3
    torch.testing.assert_close(leaky[2], want[2])  # the unpacked row is the same either way


def test_segments_follow_transformers_packing_rule():
    from transformers.masking_utils import find_packed_sequence_indices

    spans = packed_attention._segments(POS, 3, 12)
    assert spans == [[(0, 4), (4, 7), (7, 12)], [(0, 6), (6, 12)], [(0, 12)]]
    ids = find_packed_sequence_indices(POS)
    for row, row_spans in zip(ids.tolist(), spans):
        assert [row[s] for s, _ in row_spans] == sorted(set(row))
        assert all(len(set(row[s:e])) == 1 for s, e in row_spans)


def test_generation_with_a_padding_mask_is_unchanged():
    stock, ours = _tiny()
    x = torch.randint(0, 100, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kw = dict(input_ids=x, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(stock.generate(**kw), ours.generate(**kw))


def test_sliding_window_models_keep_the_stock_mask():
    """A window shorter than the examples: only transformers' mask knows it, so it is kept (and used)."""
    stock, ours = _tiny("mistral", sliding_window=3)
    ids = torch.randint(0, 100, POS.shape)
    torch.testing.assert_close(_forward_backward(ours, ids, POS)[0], _forward_backward(stock, ids, POS)[0])
    # The window matters here: the same weights without it give other logits.
    no_window, _ = _tiny("mistral", sliding_window=None)
    assert (_forward_backward(no_window, ids, POS)[0] - _forward_backward(stock, ids, POS)[0]).abs().max() > 1e-3


def test_a_model_specific_mask_overlay_is_kept():
    """A model that widens the causal mask (an `or_mask_function`, e.g. bidirectional image tokens) gets transformers'
    mask, overlay included; a plain training forward gets none."""
    from transformers.masking_utils import create_causal_mask

    _, ours = _tiny()
    embeds = torch.zeros(3, 12, 64)
    assert create_causal_mask(ours.config, embeds, None, None, position_ids=POS) is None
    both_ways = create_causal_mask(ours.config, embeds, None, None, position_ids=POS,
                                   or_mask_function=lambda b, h, q, kv: (q < 2) & (kv < 2))
    assert both_ways is not None and bool(both_ways[0, 0, 0, 1])  # position 0 sees position 1
    assert not bool(both_ways[0, 0, 2, 3])  # and the rest stays causal


def test_under_torch_compile_the_stock_mask_and_attention_are_used(monkeypatch):
    """Mask and attention decide alike: while compiling, both take the stock path (no data-dependent Python loop)."""
    stock, ours = _tiny()
    monkeypatch.setattr(packed_attention, "_plain_causal_forward", lambda: False)
    monkeypatch.setattr(packed_attention, "_segments", None)  # never reached
    ids = torch.randint(0, 100, POS.shape)
    torch.testing.assert_close(_forward_backward(ours, ids, POS)[0], _forward_backward(stock, ids, POS)[0])


def test_saved_config_does_not_name_the_variant(tmp_path):
    _, ours = _tiny()
    ours.save_pretrained(tmp_path)
    assert "ftune_sdpa" not in json.dumps(json.loads((tmp_path / "config.json").read_text()))


def test_other_implementations_are_left_alone():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="eager")
    assert not use_packed_attention(model) and model.config._attn_implementation == "eager"
