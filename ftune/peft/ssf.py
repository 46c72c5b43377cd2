"""SSF: Scaling & Shifting your Features (Lian et al., NeurIPS 2022, arXiv 2210.08823; repo dongzelian/SSF).

`peft` has no SSF, so it is implemented here. The paper inserts y = gamma * x + beta (per channel) after each operation
of a frozen ViT (qkv, attention projection, both MLP layers, the norms, the patch embedding), gamma ~ N(1, 0.02),
beta ~ N(0, 0.02), and folds them into the preceding layer for inference: W' = diag(gamma) W, b' = gamma * b + beta.

Adaptation for causal LMs: SSF on the outputs of the selected linear layers (default all but the LM head: q/k/v/o and
gate/up/down in a Llama block), of every hidden-size norm (`norms`: each block's two norms and the final norm) and
of the token embedding (`embeddings`), as the paper does after its norms and patch embedding. The final norm, which
feeds the LM head, is scaled only: its shift would need an LM-head bias that Llama-style models cannot have.
`init_std=0` starts exactly at the base model.

Merging (`ftune merge`) folds everything into a plain model of the same family: a linear layer's gamma into its weight
rows and beta into its bias; a norm's gamma into the norm's weight, and its beta into the norm's bias if it has one,
else through the layers that read the norm (W (h + beta) + b = W h + (W beta + b): q/k/v after a block's first norm,
gate/up after its second); the embedding's gamma and beta into the table rows (E' = gamma * E + beta, untying a tied
LM head, which keeps E). A Llama-style config gets `attention_bias` / `mlp_bias` switched on (zero biases where none
was learned) so the merged model loads with transformers; every fold is checked on a probe input and an
architecture where one does not hold is refused with the fix (peft.norms=false / peft.embeddings=false /
peft.shift=false, or load the run unmerged).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ftune.config import ConfigError
from ftune.peft.base import load_trainable_file, save_trainable, selected_linears

# Llama-style config flags that give a family of linear layers a bias.
BIAS_FLAGS = {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp_bias": ("gate_proj", "up_proj",
                                                                                      "down_proj")}


class ScaleShift(torch.nn.Module):
    """A frozen linear layer followed by a per-output-channel scale (and shift): y = gamma * (W x + b) + beta."""

    def __init__(self, base: torch.nn.Linear, init_std: float, shift: bool):
        super().__init__()
        self.base = base
        dtype = base.weight.dtype if base.weight.is_floating_point() else torch.float32
        out, device = base.out_features, base.weight.device
        self.scale = torch.nn.Parameter(torch.empty(out, dtype=dtype, device=device).normal_(1.0, init_std)
                                        if init_std > 0 else torch.ones(out, dtype=dtype, device=device))
        self.shift = torch.nn.Parameter(torch.empty(out, dtype=dtype, device=device).normal_(0.0, init_std)
                                        if init_std > 0 else torch.zeros(out, dtype=dtype, device=device)) \
            if shift else None
        self.adapter_enabled = True  # off: the base layer alone (the reference of DPO-like objectives)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled:
            return self.base(x)
        y = self.base(x) * self.scale
        return y + self.shift if self.shift is not None else y

    @torch.no_grad()
    def folded(self) -> torch.nn.Linear:
        """The equivalent plain linear layer: W' = diag(gamma) W, b' = gamma * b + beta."""
        w = self.base.weight
        bias = self.base.bias is not None or self.shift is not None
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias, device=w.device, dtype=w.dtype)
        lin.weight.copy_(self.scale[:, None].to(w.dtype) * w)
        if bias:
            b = self.base.bias * self.scale if self.base.bias is not None else torch.zeros_like(self.scale)
            lin.bias.copy_((b + self.shift if self.shift is not None else b).to(w.dtype))
        return lin


class FeatureScaleShift(torch.nn.Module):
    """y = gamma * f(x) + beta on the output of a norm or of the embedding, attached to that module (as its `ssf`
    child, applied by a forward hook) so that the model's own modules, tied weights and names stay as they are."""

    def __init__(self, channels: int, init_std: float, shift: bool, dtype: torch.dtype, device):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.empty(channels, dtype=dtype, device=device).normal_(1.0, init_std)
                                        if init_std > 0 else torch.ones(channels, dtype=dtype, device=device))
        self.shift = torch.nn.Parameter(torch.empty(channels, dtype=dtype, device=device).normal_(0.0, init_std)
                                        if init_std > 0 else torch.zeros(channels, dtype=dtype, device=device)) \
            if shift else None
        self.adapter_enabled = True

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled:
            return y
        y = y * self.scale.to(y.dtype)
        return y + self.shift.to(y.dtype) if self.shift is not None else y

    @staticmethod
    def hook(module, args, output):
        return module.ssf(output)


# Which layers read a block's norm (Llama-style decoders): a norm's shift is folded into their biases.
NORM_READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}


def hidden_norms(model: torch.nn.Module) -> tuple[dict[str, torch.nn.Module], str | None]:
    """({name: norm} of every norm over the hidden size, the final norm's name). Norms of other sizes (per-head
    q/k norms) are left alone."""
    hidden = model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") else \
        model.config.hidden_size
    norms = {n: m for n, m in model.named_modules()
             if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), torch.Tensor)
             and tuple(m.weight.shape) == (hidden,)}
    final = [n for n in norms if not any(n.rsplit(".", 1)[-1] == k for k in NORM_READERS) and ".layers." not in n]
    return norms, (final[-1] if final else None)


def _replace(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class SSF:
    """`peft=ssf`: trained per-channel scale and shift after the selected linear layers of a frozen model.

    Args:
        target_modules: "all-linear" (every linear layer but the LM head) or a list of module names.
        init_std: gamma ~ N(1, init_std), beta ~ N(0, init_std) (the paper: 0.02); 0 = identity (the base model).
        shift: learn beta as well as gamma (false: scale only, mergeable into any architecture).
        norms: also scale and shift after every hidden-size norm (the final one scale only), as the paper does.
        embeddings: also scale and shift the token embedding's output (the paper: after the patch embedding).
    """

    adapter = True
    aliases = {"target": "target_modules", "std": "init_std"}

    def __init__(self, target_modules: str | list = "all-linear", init_std: float = 0.02, shift: bool = True,
                 norms: bool = True, embeddings: bool = True):
        if init_std < 0:
            raise ConfigError(f"peft.init_std={init_std} must be >= 0 (0 = start at the base model).")
        if isinstance(target_modules, str) and target_modules != "all-linear":
            raise ConfigError(f"peft.target_modules={target_modules!r}: use all-linear or a list of module names.")
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.init_std, self.shift, self.norms, self.embeddings = init_std, shift, norms, embeddings

    def quantization_config(self, compute_dtype: torch.dtype):
        return None

    def apply(self, model: torch.nn.Module, gradient_checkpointing: bool = False) -> torch.nn.Module:
        layers = selected_linears(model, self.target_modules)
        model.requires_grad_(False)
        for name, lin in layers.items():
            _replace(model, name, ScaleShift(lin, self.init_std, self.shift))
        attached = []
        if self.norms:
            norms, final = hidden_norms(model)
            attached += [(m, m.weight.shape[0], self.shift and n != final) for n, m in norms.items()]
        if self.embeddings:
            emb = model.get_input_embeddings()
            attached.append((emb, emb.embedding_dim, self.shift))
        for module, channels, shift in attached:
            w = module.weight
            dtype = w.dtype if w.is_floating_point() else torch.float32
            module.ssf = FeatureScaleShift(channels, self.init_std, shift, dtype, w.device)
            module._ssf_hook = module.register_forward_hook(FeatureScaleShift.hook)
        return model

    def save(self, model: torch.nn.Module, directory: Path) -> None:
        save_trainable(model, directory)

    def load_trainable(self, model: torch.nn.Module, directory: Path) -> None:
        load_trainable_file(model, directory)

    @torch.no_grad()
    def merge(self, base: torch.nn.Module, directory: Path) -> torch.nn.Module:
        """Fold the trained gamma / beta of `directory` into `base` (see the module docstring)."""
        model = self.apply(base)
        self.load_trainable(model, directory)

        def linears():
            for n, m in model.named_modules():
                if isinstance(m, ScaleShift):
                    yield n, m.base, m.shift is not None
                elif isinstance(m, torch.nn.Linear) and not n.endswith(".base"):
                    yield n, m, False

        unbiased = {n for n, lin, _ in linears() if lin.bias is None}
        self._fold_features(model)  # norms' shifts become biases of the layers that read them
        biased = {n.rsplit(".", 1)[-1] for n, lin, shift in linears() if n in unbiased and (
            shift or lin.bias is not None)}
        flags = {f for f, names in BIAS_FLAGS.items() if biased & set(names)}
        other = biased - {n for f in flags for n in BIAS_FLAGS[f]}
        if other or not all(hasattr(model.config, f) for f in flags):
            raise ConfigError(f"the SSF shift on {sorted(biased)} needs a bias there, which this architecture "
                              f"({type(model).__name__}) cannot be configured to have. Train with peft.shift=false to "
                              f"get a mergeable model, or load the run unmerged (ftune eval/generate run_dir=...).")
        for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, ScaleShift)]:
            _replace(model, name, m.folded())
        for flag in flags:  # the config now promises a bias on every layer of the family: zeros where none was learned
            setattr(model.config, flag, True)
            for name, m in list(model.named_modules()):
                if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in BIAS_FLAGS[flag]:
                    zero_bias(m)
        return model.requires_grad_(True)

    def _fold_features(self, model: torch.nn.Module) -> None:
        """Fold the norms' and the embedding's gamma / beta into their weights; a norm's beta without a norm bias goes
        into the biases of the linear layers that read the norm (W (h + beta) + b), before their own SSF is folded."""
        owners = [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "ssf", None), FeatureScaleShift)]
        emb = model.get_input_embeddings()
        for name, m in owners:
            ssf, probe = m.ssf, None
            if m is emb:
                head = model.get_output_embeddings()
                ids = torch.arange(min(8, m.num_embeddings), device=m.weight.device)[None]
                want = m(ids)  # the hook applies gamma, beta
                if head is not None and head.weight is m.weight:  # untie: the head keeps the original table
                    head.weight = torch.nn.Parameter(m.weight.detach().clone())
                    model.config.tie_word_embeddings = False
                    if hasattr(model.config, "get_text_config"):
                        model.config.get_text_config().tie_word_embeddings = False
                e = m.weight.float() * ssf.scale.float()
                e = e + ssf.shift.float() if ssf.shift is not None else e
                m.weight = torch.nn.Parameter(e.to(m.weight.dtype))
                probe = (m, ids)
            else:
                x = torch.randn(2, 3, m.weight.shape[0], generator=torch.Generator().manual_seed(0)).to(
                    m.weight.device, m.weight.dtype)
                want = m(x)  # the hook applies gamma, beta
                shift = ssf.shift
                m.weight.mul_(ssf.scale.to(m.weight.dtype))
                if shift is not None and getattr(m, "bias", None) is not None:
                    m.bias.mul_(ssf.scale.to(m.bias.dtype)).add_(shift.to(m.bias.dtype))
                elif shift is not None:
                    readers = NORM_READERS.get(name.rsplit(".", 1)[-1])
                    parent = name.rpartition(".")[0]
                    layers = [f"{parent}.{r}" if parent else r for r in readers or ()]
                    found = [model.get_submodule(n) if _has(model, n) else None for n in layers]
                    if not readers or any(f is None for f in found):
                        raise ConfigError(
                            f"the SSF shift after {name} cannot be folded: ftune does not know which layers of "
                            f"{type(model).__name__} read that norm. Train with peft.shift=false or peft.norms=false "
                            f"for a mergeable model, or load the run unmerged (ftune eval/generate run_dir=...).")
                    for f in found:
                        lin = zero_bias(f.base if isinstance(f, ScaleShift) else f)
                        lin.bias.add_((lin.weight.float() @ shift.float()).to(lin.bias.dtype))
                    want = want - shift  # the norm itself now gives gamma * norm(x)
                probe = (m, x)
            m._ssf_hook.remove()
            del m.ssf, m._ssf_hook
            got = probe[0](probe[1])
            if not torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-4):
                raise ConfigError(f"the SSF scale after {name} cannot be folded into {type(m).__name__}'s weight "
                                  f"(its output is not proportional to the weight). Train with peft.norms=false / "
                                  f"peft.embeddings=false for a mergeable model, or load the run unmerged.")


def zero_bias(lin: torch.nn.Linear) -> torch.nn.Linear:
    """`lin`, with a zero bias added if it had none."""
    if lin.bias is None:
        lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
    return lin


def _has(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False
