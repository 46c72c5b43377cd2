"""The model cache writer (`ftune.models.loading._save_model`), which replaces `save_pretrained` because transformers 5
skips the weights on every rank but global rank 0: what it writes loads back as the same model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ftune.models.loading import _save_model


@pytest.mark.parametrize("tied", [True, False])
def test_saved_cache_loads_back_the_same_model(tmp_path, tied):
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if not tied:  # an untied head that differs from the embedding, so a swapped or shared tensor would show
        torch.nn.init.normal_(model.lm_head.weight)
    _save_model(model, tmp_path)
    assert {"config.json", "generation_config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert (loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()) == tied
    x = torch.tensor([[1, 5, 9, 3]])
    assert torch.equal(model(x).logits, loaded(x).logits)
