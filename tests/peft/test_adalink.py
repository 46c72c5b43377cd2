"""peft=adalink: the adapter's maths, parameter count, identity start, training, loading and the embedding fold."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
from _tiny import make_cfg  # noqa: E402

from ftune.config import ConfigError  # noqa: E402
from ftune.peft.adalink import AdaLink  # noqa: E402
from ftune.peft.base import count_parameters  # noqa: E402

IDS = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])


@pytest.fixture
def base():
    from transformers import AutoModelForCausalLM

    from ftune.models.loading import resolve_model_dir

    return AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny_random")).eval()


def test_identity_start_count_and_residual_maths(base):
    with torch.no_grad():
        before = base(IDS).logits
    model = AdaLink(r=4, activation="relu").apply(base)
    assert count_parameters(model)[0] == 2 * 4 * 64  # W_down 4 x 64 and W_up 64 x 4
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)  # W_up = 0: exactly the base model
        torch.nn.init.normal_(model.adalink.up.weight)
        h = model.get_input_embeddings()(IDS)  # the hook applies the adapter to the embedding output
        e = model.get_input_embeddings().weight[IDS]
        d, u = model.adalink.down.weight, model.adalink.up.weight
        torch.testing.assert_close(h, e + torch.relu(e @ d.T) @ u.T)
    with pytest.raises(ConfigError, match="peft.r<=64"):
        AdaLink(r=65).apply(base)


def test_adalink_trains_loads_and_merges(tmp_path):
    from transformers import AutoModelForCausalLM

    from ftune.merge import merge_run
    from ftune.models.runs import load_from_run
    from ftune.train import Trainer

    t = Trainer(make_cfg(tmp_path / "a", "peft=adalink", "peft.r=4", "data.size=8", "trainer.max_steps=3",
                         "trainer.batch_size=2", "trainer.lr=5e-2"))
    frozen = {n: p.detach().clone() for n, p in t.model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    assert sorted(trained) == ["adalink.down.weight", "adalink.up.weight"]
    assert math.isfinite(t.run()["final_loss"])
    now = dict(t.model.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in frozen.items())
    assert all(not torch.equal(now[n], v) for n, v in trained.items())
    with torch.no_grad():
        reference = t.model.eval()(IDS).logits
        loaded, _ = load_from_run(tmp_path / "a")
        torch.testing.assert_close(loaded(IDS).logits, reference)
        merged = AutoModelForCausalLM.from_pretrained(merge_run(tmp_path / "a")).eval()
        assert not merged.config.tie_word_embeddings
        assert merged.get_output_embeddings().weight.data_ptr() != merged.get_input_embeddings().weight.data_ptr()
        torch.testing.assert_close(merged(IDS).logits, reference, rtol=1e-4, atol=1e-4)


def test_nonlinear_adapter_is_not_merged(tmp_path, base):
    with pytest.raises(ConfigError, match="activation=gelu.*cannot be folded"):
        AdaLink(activation="gelu").merge(base, tmp_path)
