"""The fused LoRA linear layer (ftune/peft/fused_lora.py) against peft's own forward and backward."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from ftune.peft import fused_lora
from ftune.peft.dropout import use_fast_dropout

# On a CUDA machine (scripts/gpu_check.sh) the comparisons also run there. With nn.Dropout anywhere, and with
# FastDropout off the CPU (F.dropout there), the fused layer draws its mask with torch.native_dropout, nn.Dropout's own
# kernel: the same mask as peft's for the same seed. FastDropout on a CPU draws its own mask, in both models.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class Net(torch.nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.q_proj = torch.nn.Linear(24, 40, bias=bias)
        self.down_proj = torch.nn.Linear(40, 24, bias=bias)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.q_proj(x)))


def lora_net(dropout: float, bias: bool = False, lora_bias: str = "none", fast: bool = True, **kw):
    torch.manual_seed(0)
    model = get_peft_model(Net(bias), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, bias=lora_bias,
                                                 target_modules=["q_proj", "down_proj"], **kw))
    if fast:
        use_fast_dropout(model)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give it values so that every gradient is non-trivial
            torch.nn.init.normal_(p, std=0.5)
    return model.train()


def run(model, x, seed=7, autocast=False):
    torch.manual_seed(seed)  # the same dropout masks for both paths
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
        loss = (y.float() * torch.linspace(-1, 1, y.shape[-1], device=y.device)).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout,fast", [(0.0, True), (0.2, True), (0.2, False)])
@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_same_output_and_gradients_as_peft_in_float32(dropout, fast, bias, device):
    x = torch.randn(3, 5, 24, device=device)
    ref_model = lora_net(dropout, bias=True, lora_bias=bias, fast=fast).to(device)
    model = lora_net(dropout, bias=True, lora_bias=bias, fast=fast).to(device)
    assert fused_lora.use_fused_lora(model) == 2
    y_ref, dx_ref, g_ref = run(ref_model, x.clone().requires_grad_())
    y, dx, g = run(model, x.clone().requires_grad_())
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    assert set(g) == set(g_ref) and any("lora_A" in n for n in g) and (bias == "none") == (len(g) == 4)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-5, msg=name)


def test_dropout_is_applied_to_the_adapter_input_only():
    """With dropout the adapter gradients differ from a run without it, and the fused path drops the same elements
    as peft's (same seed): a fused layer that ignored or misplaced the mask fails the comparison above, and this
    checks that the comparison is not vacuous."""
    x = torch.randn(3, 5, 24)
    _, _, g_drop = run(lora_net(0.5), x.clone().requires_grad_())
    _, _, g_none = run(lora_net(0.0), x.clone().requires_grad_())
    name = next(n for n in g_drop if "q_proj.lora_A" in n)
    assert not torch.allclose(g_drop[name], g_none[name], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fast", [True, False])
def test_under_bf16_autocast_matches_peft_to_bf16_rounding(device, fast):
    x = torch.randn(4, 6, 24, device=device)
    ref_model, model = lora_net(0.1, fast=fast).to(device), lora_net(0.1, fast=fast).to(device)
    fused_lora.use_fused_lora(model)
    y_ref, dx_ref, g_ref = run(ref_model, x.clone().requires_grad_(), autocast=True)
    y, dx, g = run(model, x.clone().requires_grad_(), autocast=True)
    assert y.dtype == y_ref.dtype == torch.bfloat16 and dx.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in g.values())
    # bf16 products round differently element by element (one ulp of a gradient entry of 20 is 0.125): compare
    # whole tensors, relative to their norm (a wrong mask or scale is off by more than 5%)
    for name, a, b in [("y", y.float(), y_ref.float()), ("dx", dx, dx_ref), *((n, g[n], g_ref[n]) for n in g_ref)]:
        assert ((a - b).norm() / b.norm()).item() < 1e-2, name


def test_lower_peak_memory_than_peft():
    """The same tensors are saved for the backward pass; the fused layer writes fewer full-size temporaries (no
    separate adapter output, scaled copy and sum; no separate adapter input gradient and sum in the backward pass).
    Peak of the tensor bytes alive during a forward and backward pass, from torch.profiler's allocations in order."""
    x = torch.randn(64, 128, 24, requires_grad=True)

    def peak_bytes(model):
        torch.manual_seed(0)
        with torch.profiler.profile(profile_memory=True) as prof:
            model(x).sum().backward()
        alive = peak = 0
        for event in sorted(prof.events(), key=lambda e: e.time_range.start):
            alive += event.self_cpu_memory_usage
            peak = max(peak, alive)
        return peak

    fused = lora_net(0.1)
    fused_lora.use_fused_lora(fused)
    assert peak_bytes(fused) < 0.9 * peak_bytes(lora_net(0.1))


def test_peft_forward_where_the_fused_one_would_be_wrong(monkeypatch):
    calls = []
    apply = fused_lora._LoraLinear.apply
    monkeypatch.setattr(fused_lora._LoraLinear, "apply", lambda *a: calls.append(1) or apply(*a))
    x = torch.randn(2, 3, 24)

    model = lora_net(0.0)
    fused_lora.use_fused_lora(model)
    model(x)
    assert len(calls) == 2
    with model.disable_adapter():  # e.g. a DPO reference pass
        model(x)
    assert len(calls) == 2
    handle = model.base_model.model.q_proj.base_layer.register_forward_pre_hook(lambda *a: None)  # e.g. ZeRO-3
    model(x)
    assert len(calls) == 3  # down_proj only
    handle.remove()
    for name in ("q_proj", "down_proj"):  # a bf16 base with float32 adapters, no autocast (e.g. generation):
        getattr(model.base_model.model, name).base_layer.to(torch.bfloat16)  # peft casts, so peft's forward runs
    assert model(x.bfloat16()).dtype == torch.bfloat16
    assert len(calls) == 3

    assert fused_lora.use_fused_lora(lora_net(0.0, use_dora=True)) == 0
    full = lora_net(0.0)
    full.base_model.model.q_proj.base_layer.weight.requires_grad_(True)
    fused_lora.use_fused_lora(full)
    full(x)
    assert len(calls) == 4  # only down_proj: q_proj's base weight trains, so peft's forward runs there


def test_deep_copy_keeps_its_own_fused_forward():
    model = lora_net(0.0)
    fused_lora.use_fused_lora(model)
    twin = copy.deepcopy(model)
    layer = twin.base_model.model.q_proj
    assert layer.forward.__self__ is layer
    with torch.no_grad():
        twin.base_model.model.q_proj.lora_B["default"].weight.zero_()
        twin.base_model.model.down_proj.lora_B["default"].weight.zero_()
    x = torch.randn(2, 24)
    base = twin.base_model.model
    expected = base.down_proj.base_layer(torch.nn.functional.silu(base.q_proj.base_layer(x)))
    torch.testing.assert_close(twin(x), expected)
    assert not torch.allclose(model(x), expected)


def test_lora_apply_fuses_every_plain_layer_and_a_step_matches_peft():
    from transformers import AutoModelForCausalLM

    from ftune.models.loading import resolve_model_dir
    from ftune.peft.lora import LoRA

    def build(fused: bool):
        torch.manual_seed(0)
        model = LoRA(r=4, dropout=0.1, fused=fused).apply(
            AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny_random")))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        return model.train()

    fused, plain = build(True), build(False)
    layers = [m for m in fused.modules() if fused_lora.eligible(m)]
    assert len(layers) == 14 and all("forward" in vars(m) for m in layers)
    assert not any("forward" in vars(m) for m in plain.modules())
    ids = torch.randint(0, 100, (2, 12))
    results = []
    for model in (fused, plain):
        torch.manual_seed(3)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    assert len(results[0][1]) == 28
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
