"""What both sides of scripts/bench_train.py share: the seed, LoRA and optimisation settings, the speed targets,
and where the model and data come from."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


SEED = 42


LORA = dict(r=16, alpha=32, dropout=0.05, target_modules="all-linear")


# Shared optimisation settings (ftune's defaults; TRL is given the same).
LR, WEIGHT_DECAY, MAX_GRAD_NORM, WARMUP_RATIO = 2.0e-4, 0.0, 1.0, 0.03


FULL_LR = 2.0e-5  # full fine-tuning: every weight moves, so a LoRA learning rate would be too large


DPO_BETA = 0.1


# The speed targets: ftune's tokens/s at least this multiple of TRL's, at no more peak memory.
TARGET = {"sft": 1.5, "dpo": 1.3}


GPU_TARGET = 1.3  # on a GPU: ftune at least 1.3x TRL's tokens/s (and, for the suite, >= 45% MFU)


# --trl-malloc reuse: glibc's mmap and trim thresholds as ftune's trainer.cpu_malloc=reuse sets them with mallopt.
TRL_REUSE_TUNABLES = "glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=2147483647"


DATA_FILE = {"sft": Path("gsm8k") / "train.jsonl", "dpo": Path("hh-rlhf-harmless") / "test.jsonl.gz"}


IGNORE = -100


REPEAT_KEYS = ("tokens_per_s", "tokens_per_cpu_s", "peak_rss_mib", "peak_gpu_mib", "other_cpu_cores", "exit_code")


BUSY_CORES = 0.25  # other processes' average CPU use (cores) above which a measurement counts as disturbed


def random_archs() -> list[str]:
    from .models import ARCHS

    return list(ARCHS)


def pick_device(requested: str) -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_train: --device cuda but torch sees no GPU.")
    return requested if requested != "auto" else "cuda" if torch.cuda.is_available() else "cpu"


def bench_model_dir(name: str) -> Path:
    """The local directory of --model: ftune's embedded SmolLM2, or a random architecture built once."""
    if name == "smollm2_135m":
        from ftune.models.loading import EMBEDDED_SMOLLM2, resolve_model_dir

        return resolve_model_dir(EMBEDDED_SMOLLM2)
    from .models import model_dir

    return model_dir(name)


def child_env(data_dir: Path) -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env["FTUNE_DATA_DIR"] = str(data_dir)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def find_data_dir(arg: Path | None, objective: str = "sft") -> Path:
    candidates = [arg] if arg else [Path(os.environ["FTUNE_DATA_DIR"])] if os.environ.get("FTUNE_DATA_DIR") else []
    candidates = candidates or [REPO.parent / "shared" / "data"]
    for c in candidates:
        if (c.expanduser() / DATA_FILE[objective]).is_file():
            return c.expanduser().resolve()
    sys.exit(f"bench_train: no {DATA_FILE[objective]} under {candidates[0]}; pass --data-dir DIR or set "
             f"FTUNE_DATA_DIR.")


def gsm8k_rows(data_dir: Path, n: int) -> list[dict]:
    rows = []
    with open(data_dir / "gsm8k" / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def bf16_supported() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - older torch: try a bf16 matmul
        try:
            torch.ones(8, 8, dtype=torch.bfloat16) @ torch.ones(8, 8, dtype=torch.bfloat16)
            return True
        except Exception:  # noqa: BLE001
            return False
