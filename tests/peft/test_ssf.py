"""peft=ssf: the scale-shift maths and its fold, parameter count, identity start, training, loading and merging."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
from _tiny import make_cfg, run  # noqa: E402

from ftune.peft.base import count_parameters  # noqa: E402
from ftune.peft.ssf import SSF, ScaleShift  # noqa: E402

IDS = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])


@pytest.fixture
def base():
    from transformers import AutoModelForCausalLM

    from ftune.models.loading import resolve_model_dir

    return AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny_random")).eval()


def test_scale_shift_and_its_fold():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    ss = ScaleShift(lin, init_std=0.5, shift=True)
    x = torch.randn(4, 3)
    with torch.no_grad():
        expected = (x @ lin.weight.T + lin.bias) * ss.scale + ss.shift  # y = gamma * (W x + b) + beta
        torch.testing.assert_close(ss(x), expected)
        f = ss.folded()
        torch.testing.assert_close(f.weight, ss.scale[:, None] * lin.weight)  # diag(gamma) W
        torch.testing.assert_close(f.bias, ss.scale * lin.bias + ss.shift)    # gamma * b + beta
        torch.testing.assert_close(f(x), expected)
    wide = ScaleShift(torch.nn.Linear(2, 20000), init_std=0.02, shift=True)
    assert wide.scale.mean().item() == pytest.approx(1.0, abs=2e-3) and wide.scale.std().item() == pytest.approx(
        0.02, rel=0.05)  # the paper's N(1, 0.02) and N(0, 0.02)
    assert wide.shift.mean().item() == pytest.approx(0.0, abs=2e-3)


def test_count_and_identity_start(base):
    with torch.no_grad():
        before = base(IDS).logits
    model = SSF(init_std=0.0).apply(base)
    # gamma and beta per output channel of q, k, v, o, gate, up, down: 2 x (64+32+32+64+128+128+64) per layer, 2 layers;
    # after each block's two norms 2 x 64 each; after the final norm gamma only (64); after the embedding 2 x 64.
    assert count_parameters(model)[0] == 2 * 2 * 512 + 2 * 2 * 2 * 64 + 64 + 2 * 64
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"model.layers.0.input_layernorm.ssf.shift", "model.layers.1.post_attention_layernorm.ssf.scale",
            "model.norm.ssf.scale", "model.embed_tokens.ssf.shift"} <= names and "model.norm.ssf.shift" not in names
    assert count_parameters(SSF(init_std=0.0, norms=False, embeddings=False).apply(
        type(base)(base.config)))[0] == 2 * 2 * 512
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)  # gamma = 1, beta = 0: exactly the base model


def test_ssf_trains_loads_and_merges_exactly(tmp_path):
    from transformers import AutoModelForCausalLM

    from ftune.merge import merge_run
    from ftune.models.runs import load_from_run
    from ftune.train import Trainer

    t = Trainer(make_cfg(tmp_path / "s", "peft=ssf", "data.size=8", "trainer.max_steps=3", "trainer.batch_size=2",
                         "trainer.lr=5e-2"))
    frozen = {n: p.detach().clone() for n, p in t.model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    # 7 linear layers x 2 blocks, 2 norms x 2 blocks, each gamma and beta; the final norm gamma; the embedding both
    assert len(trained) == 2 * 7 * 2 + 2 * 2 * 2 + 1 + 2 and all(n.endswith((".scale", ".shift")) for n in trained)
    summary = t.run()
    assert math.isfinite(summary["final_loss"])
    now = dict(t.model.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in frozen.items())
    assert all(not torch.equal(now[n], v) for n, v in trained.items())
    loaded, _ = load_from_run(tmp_path / "s")
    with torch.no_grad():
        reference = t.model.eval()(IDS).logits
        torch.testing.assert_close(loaded(IDS).logits, reference)
    out = merge_run(tmp_path / "s")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.config.attention_bias and merged.config.mlp_bias
    assert not any("scale" in n or "shift" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, reference, rtol=1e-4, atol=1e-4)


def test_scale_only_merges_without_biases(tmp_path):
    from transformers import AutoModelForCausalLM

    from ftune.merge import merge_run

    t = run(make_cfg(tmp_path / "g", "peft=ssf", "peft.shift=false", "data.size=8", "trainer.max_steps=2",
                     "trainer.batch_size=2", "trainer.lr=5e-2"))
    merged = AutoModelForCausalLM.from_pretrained(merge_run(tmp_path / "g")).eval()
    assert not merged.config.attention_bias and all(
        m.bias is None for m in merged.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, t.model.eval()(IDS).logits, rtol=1e-4, atol=1e-4)


def test_scale_shift_after_norms_and_the_embedding_is_the_papers_and_folds_exactly(base):
    from ftune.peft.base import adapter_disabled

    with torch.no_grad():
        before = base(IDS).logits
    ssf = SSF(init_std=0.3, target_modules=["q_proj"])  # few linear layers: the norm/embedding terms dominate
    model = ssf.apply(base)
    emb, norm = model.model.embed_tokens, model.model.layers[0].input_layernorm
    with torch.no_grad():
        x = torch.randn(1, 4, 64)
        # y = gamma * norm(x) + beta on the norm's output, and gamma * E[ids] + beta on the embedding's
        torch.testing.assert_close(norm(x), norm.ssf.scale * (norm.weight * x * torch.rsqrt(
            x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)) + norm.ssf.shift)
        torch.testing.assert_close(emb(IDS), emb.weight[IDS] * emb.ssf.scale + emb.ssf.shift)
        after = model(IDS).logits
        assert not torch.allclose(after, before, atol=1e-3)
        with adapter_disabled(model):  # every scale and shift off: the base model (the DPO reference)
            torch.testing.assert_close(model(IDS).logits, before)
    # The fold: a plain model of the same family with the same logits (norm shift through q/k/v biases, untied head).
    import tempfile

    from ftune.peft.base import save_trainable

    with tempfile.TemporaryDirectory() as d:
        save_trainable(model, Path(d))
        from transformers import AutoModelForCausalLM

        from ftune.models.loading import resolve_model_dir

        merged = ssf.merge(AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny_random")).eval(), Path(d))
    assert not any("ssf" in n for n, _ in merged.named_parameters())
    assert merged.config.attention_bias and merged.model.layers[0].self_attn.k_proj.bias is not None
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, after, rtol=1e-4, atol=1e-4)
