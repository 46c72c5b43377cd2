"""trainer.compile, trainer.liger and trainer.activation_offload: compiled training follows the eager trajectory, the
Liger path hands the kernel the right head, hidden states and labels, and the CUDA-only options are refused on a CPU
before the model loads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from ftune.config import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import losses, make_cfg, run  # noqa: E402

BASE = ["data.size=32", "data.packing=false", "peft.dropout=0", "trainer.batch_size=4", "trainer.max_steps=3",
        "trainer.scheduler=constant"]


def test_compiled_training_follows_the_eager_trajectory(tmp_path):
    eager = run(make_cfg(tmp_path / "eager", *BASE))
    compiled = run(make_cfg(tmp_path / "compiled", *BASE, "trainer.compile=true"))
    # Compiled in place: the model is the same object type, names unchanged, forward through dynamo.
    assert type(compiled.acc.unwrap_model(compiled.model)) is type(eager.acc.unwrap_model(eager.model))
    assert compiled.acc.unwrap_model(compiled.model)._compiled_call_impl is not None
    le, lc = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(le) == len(lc) == 3 and le[-1] < le[0]
    # inductor fuses and reorders float32 arithmetic: equal to rounding, over steps that move the loss by > 1e-2.
    torch.testing.assert_close(torch.tensor(lc), torch.tensor(le), rtol=0, atol=1e-4)


class ReferenceFusedCE(torch.nn.Module):
    """What Liger's LigerFusedLinearCrossEntropyLoss(ignore_index, reduction="sum") computes, in plain torch (its
    Triton kernel needs CUDA): sum over labelled positions of CE(x W^T + b, y). Records the shapes it was given."""

    calls: list = []

    def __init__(self, ignore_index: int, reduction: str):
        super().__init__()
        assert reduction == "sum"
        self.ignore_index = ignore_index

    def forward(self, lin_weight, _input, target, bias=None):
        self.calls.append((tuple(lin_weight.shape), tuple(_input.shape), int((target != self.ignore_index).sum())))
        logits = torch.nn.functional.linear(_input, lin_weight, bias).float()
        return torch.nn.functional.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="sum")


def test_liger_path_gives_the_sft_loss_from_hidden_states(tmp_path, monkeypatch):
    """The kernel itself is replaced by its reference maths: this checks what ftune hands it (the LM head weight,
    the last hidden states at exactly the labelled positions, their labels) and that the loss and the training
    trajectory are SFT's."""
    from importlib.machinery import ModuleSpec
    from types import ModuleType

    from ftune.training import distributed as dist

    for name in ("liger_kernel", "liger_kernel.transformers"):
        module = ModuleType(name)
        module.__spec__ = ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["liger_kernel.transformers"].LigerFusedLinearCrossEntropyLoss = ReferenceFusedCE
    monkeypatch.setattr(dist, "accelerator_available", lambda: True)  # the check; the run stays on CPU
    ReferenceFusedCE.calls.clear()
    plain = run(make_cfg(tmp_path / "plain", *BASE))
    fused = run(make_cfg(tmp_path / "liger", *BASE, "trainer.liger=true"))
    assert plain.objective.fused is None and isinstance(fused.objective.fused, ReferenceFusedCE)
    vocab, hidden = fused.acc.unwrap_model(fused.model).get_output_embeddings().weight.shape
    assert len(ReferenceFusedCE.calls) >= 3  # every training micro-batch
    for w, x, labelled in ReferenceFusedCE.calls:
        assert w == (vocab, hidden) and x == (labelled, hidden)  # one hidden state per labelled position, no others
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "liger")), torch.tensor(losses(tmp_path / "plain")),
                               rtol=0, atol=1e-5)


def test_liger_is_refused_for_other_objectives(tmp_path, monkeypatch):
    from ftune.training import distributed as dist

    monkeypatch.setattr(dist, "accelerator_available", lambda: True)
    with pytest.raises(ConfigError, match=r"trainer.liger=true replaces the LM head \+ cross-entropy.*objective=sft"):
        run(make_cfg(tmp_path / "run", *BASE, "trainer.liger=true", "objective=masked_thought"))


@pytest.mark.parametrize(("option", "message"), [
    ("trainer.activation_offload=true", "trainer.activation_offload=true moves saved activations.*=false"),
    ("trainer.liger=true", "trainer.liger=true runs Liger's Triton kernel, which needs CUDA and the liger-kernel"),
])
def test_cuda_only_options_are_refused_on_cpu_before_the_model_loads(tmp_path, monkeypatch, option, message):
    import ftune.models.loading as loading

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match=message):
        run(make_cfg(tmp_path / "run", *BASE, option))


@pytest.mark.parametrize("key", ["compile", "liger", "activation_offload"])
def test_options_are_booleans(tmp_path, key):
    with pytest.raises(ConfigCompositionException, match=f"trainer.{key}=maybe"):  # Hydra's schema check
        make_cfg(tmp_path, f"trainer.{key}=maybe")


def test_activation_offload_wraps_every_training_forward_and_keeps_the_trajectory(tmp_path, monkeypatch):
    """On CPU the saved activations already are in CPU memory, so offloading copies them and nothing else changes:
    the same losses; and torch's save_on_cpu hooks were in place for each training micro-batch."""
    from ftune.training import distributed as dist

    entered = []
    real = torch.autograd.graph.save_on_cpu

    def counting(pin_memory=False, device_type="cuda"):
        entered.append(pin_memory)
        return real(pin_memory=pin_memory, device_type=device_type)

    monkeypatch.setattr(dist, "accelerator_available", lambda: True)  # the check only; the run stays on CPU
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", counting)
    run(make_cfg(tmp_path / "plain", *BASE))
    assert entered == []
    run(make_cfg(tmp_path / "offload", *BASE, "trainer.activation_offload=true"))
    assert entered == [False] * 3  # 3 steps x 1 micro-batch, no pinning without CUDA
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "offload")), torch.tensor(losses(tmp_path / "plain")),
                               rtol=0, atol=0)
