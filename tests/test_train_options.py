"""trainer.compile and trainer.activation_offload: compiled training follows the eager trajectory, and activation
offloading (CUDA only) is refused on a CPU before the model loads."""

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


def test_activation_offload_is_refused_on_cpu_before_the_model_loads(tmp_path, monkeypatch):
    import ftune.models.loading as loading

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match="trainer.activation_offload=true moves saved activations.*=false"):
        run(make_cfg(tmp_path / "run", *BASE, "trainer.activation_offload=true"))


@pytest.mark.parametrize("key", ["compile", "activation_offload"])
def test_options_are_booleans(tmp_path, key):
    with pytest.raises(ConfigCompositionException, match=f"trainer.{key}=maybe"):  # Hydra's schema check
        make_cfg(tmp_path, f"trainer.{key}=maybe")
