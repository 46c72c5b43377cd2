"""Same seed and config in two separate processes: the same loss at every step and the same final weights, bit for
bit (CPU, one thread). Another seed gives another trajectory, so the comparison is not vacuous.

The two runs get different PYTHONHASHSEEDs, so anything that depends on set or dict-of-str iteration order would
show up here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROWS = [{"id": f"ex{i}", "prompt": f"What is {i} times 3?", "completion": f"{i} times 3 is {3 * i}."}
        for i in range(24)]


def _launch(data: Path, out: Path, seed: int, hash_seed: int) -> subprocess.Popen:
    args = ["model=tiny_random", "data=jsonl", f"data.path={data}", "data.eval_size=0", "data.max_length=128",
            "eval=none", "trainer.max_steps=5", "trainer.batch_size=4", "trainer.lr=5e-3", "trainer.warmup_ratio=0",
            "trainer.progress=false", "peft.dropout=0.1", f"seed={seed}", f"output_dir={out}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": str(hash_seed)}
    return subprocess.Popen([sys.executable, "-m", "ftune.cli", "train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _losses(run: Path) -> list[tuple[int, float]]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def test_same_seed_same_trajectory_in_separate_processes(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    runs = {"a": (0, 1), "b": (0, 2), "other_seed": (1, 1)}
    procs = {name: _launch(data, tmp_path / name, seed, hs) for name, (seed, hs) in runs.items()}
    for name, p in procs.items():
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"{name}: {out[-3000:]}"
    a, b, other = (_losses(tmp_path / n) for n in ("a", "b", "other_seed"))
    assert [s for s, _ in a] == [1, 2, 3, 4, 5]
    assert a == b  # floats compared exactly (JSON keeps every bit of a double)
    wa = load_file(tmp_path / "a" / "final" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "b" / "final" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [loss for _, loss in other] != [loss for _, loss in a]
