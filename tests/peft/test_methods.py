"""PEFT methods through `peft` on the tiny model (hidden 64, FFN 128, 2 layers, 4 query / 2 key-value heads of 16):
trainable-parameter counts by hand, each method's maths on one layer, training end to end, LoRA+ groups, bad input."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
from _tiny import make_cfg  # noqa: E402

from ftune.config import ConfigError  # noqa: E402
from ftune.peft.base import count_parameters  # noqa: E402
from ftune.peft.ia3 import IA3  # noqa: E402
from ftune.peft.lora import LoRA  # noqa: E402
from ftune.peft.prompt_tuning import PromptTuning  # noqa: E402

H, FF, LAYERS, KV = 64, 128, 2, 32  # hidden, intermediate, layers, key/value width (2 heads x 16)
# (in, out) of each linear layer of a block: q, k, v, o, gate, up, down
SHAPES = [(H, H), (H, KV), (H, KV), (H, H), (H, FF), (H, FF), (FF, H)]


@pytest.fixture
def base():
    from transformers import AutoModelForCausalLM

    from ftune.models.loading import resolve_model_dir

    return AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny_random"))


def _layer(model, name: str):
    return dict(model.named_modules())[f"base_model.model.model.layers.0.{name}"]


@pytest.mark.parametrize("method, expected", [
    (LoRA(r=8), 16384),                                 # 2 layers x 8 x sum(in + out) = 2 x 8 x 1024
    (LoRA(r=8, rslora=True), 16384),                    # same shapes, another scale
    (LoRA(r=8, dora=True), 16384 + 1024),               # + one magnitude per output feature: 2 x 512
    (LoRA(r=4, target_modules=["q_proj", "v_proj"]), 1792),  # 2 x 4 x ((64 + 64) + (64 + 32))
    (IA3(), 384),                                       # 2 x (l_k 32 + l_v 32 + l_ff 128)
    (PromptTuning(num_virtual_tokens=5), 320),          # 5 soft tokens of width 64
], ids=["lora", "rslora", "dora", "lora_qv", "ia3", "prompt_tuning"])
def test_trainable_parameter_counts(base, method, expected):
    assert sum(i + o for i, o in SHAPES) == 1024 and sum(o for _, o in SHAPES) == 512  # the per-layer sums used
    total_base = sum(p.numel() for p in base.parameters())
    model = method.apply(base)
    trainable, total = count_parameters(model)
    assert trainable == expected
    assert total == total_base + expected  # nothing of the base became trainable


def test_lora_and_rslora_scale_the_update(base):
    x = torch.randn(3, H)
    for rslora, scale in ((False, 16 / 4), (True, 16 / math.sqrt(4))):
        model = LoRA(r=4, alpha=16, dropout=0.0, rslora=rslora, target_modules=["q_proj"]).apply(
            __import__("copy").deepcopy(base))
        q = _layer(model, "self_attn.q_proj")
        assert q.scaling["default"] == pytest.approx(scale)
        torch.nn.init.normal_(q.lora_B["default"].weight)
        a, b, w0 = q.lora_A["default"].weight, q.lora_B["default"].weight, q.base_layer.weight
        with torch.no_grad():
            torch.testing.assert_close(q(x), x @ w0.T + scale * (x @ a.T) @ b.T)


def test_dora_output_is_magnitude_times_normalised_direction(base):
    model = LoRA(r=4, alpha=8, dropout=0.0, dora=True, target_modules=["k_proj"]).apply(base)
    k = _layer(model, "self_attn.k_proj")
    w0 = k.base_layer.weight.detach().clone()
    m = k.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(m.detach(), w0.norm(dim=1))  # m starts at the row norms of W0 (one per output)
    torch.nn.init.normal_(k.lora_B["default"].weight)
    with torch.no_grad():
        m.mul_(1.5)
    w = w0 + 2.0 * k.lora_B["default"].weight @ k.lora_A["default"].weight  # s = alpha / r = 2
    expected_w = m[:, None] * w / w.norm(dim=1, keepdim=True)
    x = torch.randn(3, H)
    with torch.no_grad():
        torch.testing.assert_close(k(x), x @ expected_w.T, rtol=1e-4, atol=1e-5)


def test_ia3_scales_key_outputs_and_ffn_inputs(base):
    model = IA3().apply(base)
    k, down = _layer(model, "self_attn.k_proj"), _layer(model, "mlp.down_proj")
    assert torch.equal(k.ia3_l["default"].detach(), torch.ones(KV, 1))  # identity at init
    with torch.no_grad():
        k.ia3_l["default"].uniform_(0.5, 1.5)
        down.ia3_l["default"].uniform_(0.5, 1.5)
        x, h = torch.randn(3, H), torch.randn(3, FF)
        torch.testing.assert_close(k(x), (x @ k.base_layer.weight.T) * k.ia3_l["default"].view(-1))
        torch.testing.assert_close(down(h), (h * down.ia3_l["default"].view(-1)) @ down.base_layer.weight.T)


def test_prompt_tuning_outputs_line_up_with_the_inputs(base):
    ref = __import__("copy").deepcopy(base)
    model = PromptTuning(num_virtual_tokens=3).apply(base).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    prompt = model.get_prompt(batch_size=1)
    with torch.no_grad():
        direct = ref(inputs_embeds=torch.cat([prompt, ref.get_input_embeddings()(ids)], 1)).logits[:, 3:]
        full = model(input_ids=ids, position_ids=torch.arange(5)[None], attention_mask=None).logits
        keep = torch.tensor([1, 3])
        kept = model(input_ids=ids, position_ids=torch.arange(5)[None], logits_to_keep=keep).logits
        hidden = model(input_ids=ids, logits_to_keep=keep[:0], output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(full, direct)  # the soft prompt's own positions are cut
    torch.testing.assert_close(kept, direct[:, keep])
    assert hidden.shape[1] == 5
    with pytest.raises(RuntimeError, match="packed"):
        model(input_ids=ids, position_ids=torch.tensor([[0, 1, 0, 1, 2]]))


def test_loraplus_gives_b_ratio_times_the_learning_rate(tmp_path):
    from ftune.train import Trainer

    t = Trainer(make_cfg(tmp_path / "p", "data.size=8", "trainer.max_steps=1", "peft.loraplus_lr_ratio=16",
                         "trainer.lr=1e-3"))
    names = {id(p): n for n, p in t.model.named_parameters()}
    seen = 0
    for group in t.optimizer.param_groups:
        kinds = {"B" if ".lora_B." in names[id(p)] else "A" for p in group["params"]}
        assert len(kinds) == 1  # A and B never share a group
        assert group["initial_lr"] == pytest.approx(1e-3 * (16 if kinds == {"B"} else 1))
        seen += len(group["params"])
    assert seen == sum(p.requires_grad for p in t.model.parameters())


METHODS = {
    "lora_rslora": ["peft.rslora=true", "peft.dropout=0"],
    "dora": ["peft=dora", "peft.dropout=0"],
    "loraplus": ["peft.loraplus_lr_ratio=4", "peft.dropout=0"],
    "ia3": ["peft=ia3", "trainer.lr=5e-2"],
    "prompt_tuning": ["peft=prompt_tuning", "peft.num_virtual_tokens=4", "trainer.lr=5e-2"],
}


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_only_its_parameters(tmp_path, name):
    from ftune.train import Trainer

    t = Trainer(make_cfg(tmp_path / name, "data.size=12", "trainer.max_steps=3", "trainer.batch_size=2",
                         *METHODS[name]))
    frozen = {n: p.detach().clone() for n, p in t.model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    summary = t.run()
    assert math.isfinite(summary["final_loss"])
    now = dict(t.model.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in frozen.items())  # bit-identical base
    unchanged = [n for n, v in trained.items() if torch.equal(now[n], v)]
    assert not unchanged, unchanged
    assert (tmp_path / name / "final" / "adapter_model.safetensors").exists()


def test_bad_targets_and_rank_are_refused_with_the_fix(base):
    with pytest.raises(ConfigError, match=r"\['q_prj'\] match no module.*q_proj"):
        LoRA(target_modules=["q_prj"]).apply(base)
    with pytest.raises(ConfigError, match=r"peft.r=33 is larger.*\(32\).*k_proj.*peft.r<=32"):
        LoRA(r=33).apply(base)
    LoRA(r=33, target_modules=["q_proj"]).apply(base)  # q_proj is 64 x 64: fine
    with pytest.raises(ConfigError, match="feedforward_modules"):
        IA3(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ConfigError, match="init_text"):
        PromptTuning(init="text")


def test_prompt_tuning_with_packing_fails_before_the_model_loads(tmp_path, monkeypatch):
    from ftune.preflight import validate_train

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("ftune.models.loading.load_model", no_load)
    with pytest.raises(ConfigError, match="data.packing=false"):
        validate_train(make_cfg(tmp_path / "x", "peft=prompt_tuning", "data.packing=true"))
    with pytest.raises(ConfigError, match="packs chosen and rejected"):
        validate_train(make_cfg(tmp_path / "x", "peft=prompt_tuning", "objective=dpo", "data=hh_rlhf"))
