"""The model cache writer (`ftune.models.loading._save_model`), which replaces `save_pretrained` because transformers 5
skips the weights on every rank but global rank 0: what it writes loads back as the same model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
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
    ours, theirs = tmp_path / "ours", tmp_path / "save_pretrained"
    ours.mkdir()
    _save_model(model, ours)
    model.save_pretrained(theirs)  # one process, no process group: transformers writes everything itself
    # The same files, the same config (architectures and dtype included), the same tensors under the same names.
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    for name in ("config.json", "generation_config.json"):
        assert json.loads((ours / name).read_text()) == json.loads((theirs / name).read_text()), name
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded = AutoModelForCausalLM.from_pretrained(ours)
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert (loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()) == tied
    x = torch.tensor([[1, 5, 9, 3]])
    assert torch.equal(model(x).logits, loaded(x).logits)
