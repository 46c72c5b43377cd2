"""AdapterInputsAsIs: under autocast, LoRA layers skip peft's float32 round trip of their inputs."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from ftune.peft.lora import AdapterInputsAsIs, LoRA


def tiny(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


def dropout_input_dtypes(model):
    """dtype of the input each LoRA dropout module sees, by layer name, filled in by forward hooks."""
    seen, handles = {}, []
    for name, m in model.named_modules():
        if name.endswith("lora_dropout.default"):
            handles.append(m.register_forward_hook(lambda mod, args, out, n=name: seen.__setitem__(n, args[0].dtype)))
    return seen, handles


def step(model, ids, inputs_as_is):
    model.zero_grad()
    with AdapterInputsAsIs(model) if inputs_as_is else nullcontext():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_bf16_inputs_reach_the_adapter_and_the_step_agrees_with_peft_casting():
    # peft's forward (the fused layers of ftune/peft/fused_lora.py take their input as it comes by themselves)
    model = LoRA(r=4, dropout=0.1, fused=False).apply(tiny()).train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    seen, handles = dropout_input_dtypes(model)

    torch.manual_seed(5)
    loss_cast, grads_cast = step(model, ids, inputs_as_is=False)
    cast_dtypes = dict(seen)
    torch.manual_seed(5)
    loss_as_is, grads_as_is = step(model, ids, inputs_as_is=True)
    for h in handles:
        h.remove()
    # peft casts every adapter input to float32; as is, those after attention and the MLP's activation stay bf16.
    assert set(cast_dtypes.values()) == {torch.float32}
    as_is = {n.split(".")[-3] for n, d in seen.items() if d == torch.bfloat16}
    assert as_is == {"o_proj", "down_proj"}
    # Same dropout masks (same seed and order of draws), same maths up to bf16 rounding.
    torch.testing.assert_close(loss_as_is, loss_cast, rtol=1e-2, atol=1e-2)
    for n in grads_cast:
        err = (grads_as_is[n] - grads_cast[n]).norm() / grads_cast[n].norm().clamp_min(1e-12)
        assert err < 0.03, (n, float(err))
    # peft's own switch is restored afterwards (generation and evaluation outside the step still cast).
    assert all(m.cast_input_dtype_enabled for m in AdapterInputsAsIs(model).layers)


def test_dora_layers_keep_peft_casting():
    model = LoRA(r=4, dora=True).apply(tiny())
    assert AdapterInputsAsIs(model).layers == []
    plain = AdapterInputsAsIs(LoRA(r=4).apply(tiny()))
    assert len(plain.layers) == 14  # 7 linear layers x 2 blocks


@pytest.mark.parametrize("precision,expected", [("bf16", "AdapterInputsAsIs"), ("no", "nullcontext")])
def test_the_trainer_uses_it_only_under_autocast(tmp_path, precision, expected):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from _tiny import make_cfg

    from ftune.train import Trainer

    t = Trainer(make_cfg(tmp_path / "r", "trainer.max_steps=1", f"trainer.mixed_precision={precision}"))
    assert type(t.adapter_inputs).__name__ == expected
