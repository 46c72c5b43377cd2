"""Task evaluation shared by `ftune eval` and the in-training `eval.at_start` / `eval.at_end`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ftune.eval import gsm8k
from ftune.eval.generation import generate


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def evaluate_gsm8k(model, tokenizer, examples: list[dict], eval_cfg, out_dir: Path, progress: bool = True) -> dict:
    """Greedy answers for `examples` (conversations whose last turn is the gold solution); writes
    predictions.jsonl and metrics.json under `out_dir` and returns the metrics."""
    if eval_cfg.limit is not None:
        examples = examples[: eval_cfg.limit]
    prompts = [ex["messages"][:-1] for ex in examples]
    outputs = generate(model, tokenizer, prompts, eval_cfg.max_new_tokens, eval_cfg.batch_size, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    correct = 0
    tmp = out_dir / "predictions.jsonl.tmp"
    with open(tmp, "w") as f:
        for ex, out in zip(examples, outputs):
            gold = gsm8k.gold_answer(ex["messages"][-1]["content"])
            pred = gsm8k.extract_answer(out)
            ok = gold is not None and pred == gold
            correct += ok
            f.write(json.dumps({"id": ex["id"], "question": ex["messages"][-2]["content"], "output": out,
                                "prediction": pred, "gold": gold, "correct": ok}) + "\n")
    os.replace(tmp, out_dir / "predictions.jsonl")
    metrics = {"task": "gsm8k", "n": len(examples), "correct": correct,
               "accuracy": correct / len(examples) if examples else 0.0}
    _write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics
