"""Random-initialised models of real architectures, for throughput benchmarks that download nothing.

The shapes are those of the published configs (Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B: hidden size, layers, heads,
key/value heads, MLP width, vocabulary, RoPE base and scaling, tied or untied embeddings); the weights are seeded
random numbers, so the FLOPs and memory of a training step are the real model's while nothing has to be fetched.
`llama_tiny_random` runs the same code at a size a CPU smoke test can afford (the full 128,256-token vocabulary, a
64-wide 2-layer body).

The tokenizer is SmolLM2's (ftune's embedded copy, 49,152 tokens): every id it produces is below the architectures'
vocabulary of 128,256, so the data side needs nothing else; the unused embedding rows still cost their FLOPs in the LM
head, as they do in the real model. Each model is built once and saved (bf16 safetensors, loaded in whatever dtype a
run asks for) under $FTUNE_HOME/models/bench-NAME; `model.name_or_path=<that dir>` then works for ftune
(`model=hub`) and for TRL (`from_pretrained(dir)`) alike.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

LLAMA3_VOCAB = 128_256
# Llama 3.x RoPE: base 500,000 with the "llama3" frequency scaling (factor 32 for 3.2, 8 for 3.1).
_ROPE_32 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
_ROPE_8 = {**_ROPE_32, "factor": 8.0}
ARCHS = {
    # name: (hidden, layers, heads, kv heads, intermediate, tied embeddings, rope scaling)
    "llama_tiny_random": (64, 2, 4, 2, 256, True, _ROPE_32),
    "llama_1b_random": (2048, 16, 32, 8, 8192, True, _ROPE_32),   # Llama-3.2-1B
    "llama_3b_random": (3072, 28, 24, 8, 8192, True, _ROPE_32),   # Llama-3.2-3B
    "llama_8b_random": (4096, 32, 32, 8, 14336, False, _ROPE_8),  # Llama-3.1-8B
}
ROPE_THETA = 500_000.0
SEED = 0


def llama_config(name: str, tokenizer):
    """The LlamaConfig of architecture `name`, with the special-token ids of `tokenizer`."""
    from transformers import LlamaConfig

    hidden, layers, heads, kv, inter, tied, rope = ARCHS[name]
    config = LlamaConfig(
        vocab_size=LLAMA3_VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads, hidden_act="silu",
        max_position_embeddings=131_072, rms_norm_eps=1e-5, tie_word_embeddings=tied, attention_bias=False,
        mlp_bias=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # transformers >= 5 keeps the RoPE base and scaling in `rope_parameters`; older versions in two fields.
    if hasattr(config, "rope_parameters"):
        config.rope_parameters = {**rope, "rope_theta": ROPE_THETA}
    else:
        config.rope_theta, config.rope_scaling = ROPE_THETA, dict(rope)
    return config


def model_dir(name: str, root: Path | None = None) -> Path:
    """Build random model `name` once (seeded, so every build is identical) and return its directory."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from ftune.models.loading import embedded_tokenizer_dir
    from ftune.paths import ftune_home

    if name not in ARCHS:
        raise SystemExit(f"unknown random model {name!r}; choose one of {', '.join(ARCHS)}.")
    target = (root or ftune_home() / "models") / f"bench-{name}"
    if (target / ".complete").exists():
        return target
    print(f"[bench] building the random-initialised {name} (once) in {target} ...", flush=True)
    tok = AutoTokenizer.from_pretrained(embedded_tokenizer_dir())
    config = llama_config(name, tok)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".bench-{name}.", dir=target.parent))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    default_dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.bfloat16)  # an 8B model in fp32 would need 32 GB just to be initialised
        with torch.random.fork_rng(devices=[0] if device == "cuda" else []), torch.device(device):
            torch.manual_seed(SEED)
            model = LlamaForCausalLM(config)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / ".complete").write_text("ok\n")
        tmp.chmod(0o755)
        if target.exists():  # an incomplete leftover of an interrupted build
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        torch.set_default_dtype(default_dtype)
        shutil.rmtree(tmp, ignore_errors=True)
    return target
