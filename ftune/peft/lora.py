"""LoRA, QLoRA, DoRA, rsLoRA and LoRA+ through the `peft` library.

- LoRA (Hu et al. 2022): h = W0 x + (alpha / r) B A x, A random, B = 0.
- QLoRA (Dettmers et al. 2023): the same on a frozen 4-bit NF4 (double-quantized) base.
- DoRA (Liu et al. 2024): W' = m * (W0 + s B A) / ||W0 + s B A||_c, magnitude m (one per output feature) initialised
  to ||W0||_c and trained with A and B (`peft`'s `use_dora`).
- rsLoRA (Kalajdzievski 2023): scale alpha / sqrt(r) instead of alpha / r (`peft`'s `use_rslora`).
- LoRA+ (Hayou et al. 2024): B learns at `loraplus_lr_ratio` x the learning rate of A. `peft` has the same grouping in
  `peft.optimizers.create_loraplus_optimizer`, which builds its own optimizer; here it is a per-parameter lr
  multiplier (`lr_scale`) so ftune's optimizer keeps its weight-decay rule, scheduler and resumable state.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ftune.config import ConfigError
from ftune.peft.base import check_targets, load_adapter_weights, merge_peft_adapter, save_adapter, target_linears
from ftune.peft.dropout import use_fast_dropout
from ftune.peft.fused_lora import use_fused_lora


class AdapterInputsAsIs:
    """While active: peft's plain LoRA layers feed their input to the adapter in the dtype it arrives in.

    peft casts each LoRA layer's input to the adapter's dtype (float32) before dropout and A; under bf16 autocast A
    casts it straight back to bf16. The training step runs forward and backward under autocast, so the round trip
    only costs time and memory: on SmolLM2-135M (CPU, LoRA r16 on every linear layer) skipping it gave 345/340 vs
    310/327 tok/s and 4.9 vs 5.3-5.4 GB peak RSS (interleaved bench runs). Outside autocast (a bf16 base with float32
    adapters in generation, say) the cast is needed, so the step enables this around its forward and backward
    passes only (the backward too: gradient checkpointing recomputes the forward there). DoRA and other variant
    layers keep peft's behaviour. Uses peft's own switch (`cast_input_dtype_enabled`, as in
    `peft.helpers.disable_input_dtype_casting`), without walking the model at every step.
    """

    def __init__(self, model: torch.nn.Module):
        from peft.tuners.lora import LoraLayer

        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer) and not getattr(m, "lora_variant", None)]
        self.saved: list[bool] = []

    def __enter__(self):
        self.saved = [getattr(m, "cast_input_dtype_enabled", True) for m in self.layers]
        for m in self.layers:
            m.cast_input_dtype_enabled = False
        return self

    def __exit__(self, *exc):
        for m, was in zip(self.layers, self.saved):
            m.cast_input_dtype_enabled = was
        return False


def bnb_config(quantize: str | None, compute_dtype: torch.dtype):
    """The bitsandbytes config for a frozen base: 4bit = NF4 + double quantization, 8bit = LLM.int8."""
    if quantize is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"peft.quantize={quantize} needs bitsandbytes: pip install 'ftune[quant]'.") from None
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


class LoRA:
    """`peft=lora` / `peft=qlora` / `peft=dora`: a (DoRA) LoRA adapter on a frozen, optionally quantized, base.

    Args:
        r: rank of A and B (at most the smallest dimension of a targeted layer).
        alpha: scale numerator; the update is (alpha / r) B A, or (alpha / sqrt(r)) B A with `rslora`.
        dropout: dropout on the adapter input.
        target_modules: "all-linear", a list of module names (e.g. [q_proj, v_proj]) or a regex on full names.
        bias: none | all | lora_only.
        quantize: null | 4bit (NF4 + double quantization) | 8bit (LLM.int8) for the frozen base.
        dora: weight-decomposed LoRA (a trained magnitude per output feature).
        rslora: rank-stabilised scale alpha / sqrt(r).
        loraplus_lr_ratio: LoRA+: learning rate of B = ratio x trainer.lr (null: same as A).
        fused: plain LoRA layers run one fused autograd function (same maths as peft's forward, less memory:
            ftune/peft/fused_lora.py); false keeps peft's forward everywhere.
    """

    adapter = True
    # Names other tools use for these keys, for "did you mean" hints.
    aliases = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target": "target_modules",
               "use_dora": "dora", "use_rslora": "rslora"}

    def __init__(self, r: int = 16, alpha: float = 32, dropout: float = 0.05,
                 target_modules: str | list = "all-linear", bias: str = "none", quantize: str | None = None,
                 dora: bool = False, rslora: bool = False, loraplus_lr_ratio: float | None = None,
                 fused: bool = True):
        if r < 1:
            raise ConfigError(f"peft.r={r} must be >= 1.")
        if alpha <= 0:  # the update is scaled by alpha / r: 0 leaves the model as it is, and nothing trains
            raise ConfigError(f"peft.alpha={alpha} must be > 0 (the update is scaled by alpha / r; 2 x r is usual).")
        if not 0 <= dropout < 1:
            raise ConfigError(f"peft.dropout={dropout} must be in [0, 1).")
        if bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"peft.bias={bias!r} must be none, all or lora_only.")
        if quantize not in (None, "4bit", "8bit"):
            raise ConfigError(f"peft.quantize={quantize!r} must be null, 4bit or 8bit.")
        if loraplus_lr_ratio is not None and loraplus_lr_ratio <= 0:
            raise ConfigError(f"peft.loraplus_lr_ratio={loraplus_lr_ratio} must be > 0 (the paper uses 16), or null.")
        self.r, self.alpha, self.dropout, self.bias, self.quantize = r, alpha, dropout, bias, quantize
        self.dora, self.rslora, self.loraplus_lr_ratio, self.fused = dora, rslora, loraplus_lr_ratio, fused
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)

    def quantization_config(self, compute_dtype: torch.dtype):
        return bnb_config(self.quantize, compute_dtype)

    def _check_rank(self, model: torch.nn.Module) -> None:
        layers = target_linears(model, self.target_modules)
        if not layers:
            raise ConfigError(f"peft.target_modules={self.target_modules} selects no linear layer of this model. "
                              f"Use all-linear or names of its linear layers.")
        small = {n: min(m.in_features, m.out_features) for n, m in layers.items()
                 if self.r > min(m.in_features, m.out_features)}
        if small:
            name, dim = min(small.items(), key=lambda kv: kv[1])
            raise ConfigError(f"peft.r={self.r} is larger than the smallest dimension ({dim}) of the targeted layer "
                              f"{name}, so B A cannot have rank r. Use peft.r<={min(small.values())}, or drop such "
                              f"layers from peft.target_modules.")

    def apply(self, model: torch.nn.Module, gradient_checkpointing: bool = False) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        check_targets(model, self.target_modules)
        self._check_rank(model)
        if self.quantize:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        config = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, bias=self.bias,
                            target_modules=self.target_modules, use_dora=self.dora, use_rslora=self.rslora,
                            task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
        use_fast_dropout(model)  # same maths, a quarter of the CPU random draws (ftune/peft/dropout.py)
        if self.fused:
            use_fused_lora(model)  # same maths, less memory (ftune/peft/fused_lora.py)
        return model

    def lr_scale(self, name: str) -> float:
        """Learning-rate multiplier of parameter `name`: LoRA+ gives B matrices `loraplus_lr_ratio`."""
        if self.loraplus_lr_ratio is not None and (".lora_B." in name or ".lora_embedding_B." in name):
            return float(self.loraplus_lr_ratio)
        return 1.0

    def save(self, model: torch.nn.Module, directory: Path) -> None:
        save_adapter(model, directory)

    def load_trainable(self, model: torch.nn.Module, directory: Path) -> None:
        load_adapter_weights(model, directory)

    def merge(self, base: torch.nn.Module, directory: Path) -> torch.nn.Module:
        """Fold the adapter in `directory` into an unquantized `base`: W0 + s B A (DoRA: m-normalised)."""
        return merge_peft_adapter(base, directory)
