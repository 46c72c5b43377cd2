"""Task evaluation shared by `ftune eval` and the in-training `eval.at_start` / `eval.at_end`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ftune.atomic import write_json_atomic
from ftune.eval import gsm8k
from ftune.eval.generation import generate
from ftune.eval.many_shot import evaluate_many_shot, many_shot_inputs


def evaluate_gsm8k(model, tokenizer, examples: list[dict], eval_cfg, out_dir: Path, progress: bool = True,
                   spread: Callable[[list, Callable[[list], list]], list] | None = None) -> dict:
    """Greedy answers for `examples` (conversations whose last turn is the gold solution); writes
    predictions.jsonl and metrics.json under `out_dir` and returns the metrics. `spread(prompts, fn)` may compute
    `fn(prompts)` with several processes (each answers a share; distributed.shared_out)."""
    if eval_cfg.limit is not None:
        examples = examples[: eval_cfg.limit]
    prompts = [ex["messages"][:-1] for ex in examples]

    def answer(some: list) -> list[str]:
        return generate(model, tokenizer, some, eval_cfg.max_new_tokens, eval_cfg.batch_size, progress=progress)

    outputs = spread(prompts, answer) if spread else answer(prompts)
    out_dir.mkdir(parents=True, exist_ok=True)
    correct = marked = 0
    tmp = out_dir / "predictions.jsonl.tmp"
    with open(tmp, "w") as f:
        for ex, out in zip(examples, outputs):
            gold = gsm8k.gold_answer(ex["messages"][-1]["content"])
            pred = gsm8k.extract_answer(out)
            ok = gold is not None and pred == gold
            marker = gsm8k.has_marker(out)
            correct += ok
            marked += marker
            f.write(json.dumps({"id": ex["id"], "question": ex["messages"][-2]["content"], "output": out,
                                "prediction": pred, "gold": gold, "correct": ok, "marker": marker}) + "\n")
    os.replace(tmp, out_dir / "predictions.jsonl")
    n = len(examples)
    # answer_format: the share of answers ending in `#### N`, which shows a short run learning the format even
    # where a small model's accuracy stays at zero
    metrics = {"task": "gsm8k", "n": n, "correct": correct, "accuracy": correct / n if n else 0.0,
               "answer_format": marked / n if n else 0.0}
    write_json_atomic(out_dir / "metrics.json", metrics, indent=2)
    return metrics


@torch.no_grad()
def evaluate_preference(model, tokenizer, rows: list[dict], eval_cfg, out_dir: Path, progress: bool = True,
                        spread: Callable[[list, Callable[[list], list]], list] | None = None) -> dict:
    """Held-out preference accuracy: how often the model ranks chosen above rejected.

    `logp_accuracy` ranks by the summed response log-prob lp(y|x) (any model); `reward_accuracy` ranks by the DPO
    implicit reward lp(y|x) - lp_ref(y|x), with the reference = the same model with its adapter disabled (only for
    adapter runs). Ties count as wrong. Writes predictions.jsonl and metrics.json under `out_dir`. `spread`: see
    evaluate_gsm8k.
    """
    from tqdm.auto import tqdm

    from ftune.objectives.dpo import collate_pairs, sequence_logps

    if eval_cfg.limit is not None:
        rows = rows[: eval_cfg.limit]
    device = next(model.parameters()).device
    has_ref = hasattr(model, "disable_adapter")
    model.eval()

    def score(some: list[dict]) -> list[dict]:
        records = []
        for s in tqdm(range(0, len(some), eval_cfg.batch_size), desc="Scoring pairs", disable=not progress,
                      leave=False):
            chunk = some[s: s + eval_cfg.batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs(chunk, tokenizer.pad_token_id).items()}
            logp, _ = sequence_logps(model, batch)
            ref = None
            if has_ref:
                with model.disable_adapter():
                    ref, _ = sequence_logps(model, batch)
            n = len(chunk)
            for i, r in enumerate(chunk):
                rec = {"id": r["id"], "logp_chosen": float(logp[i]), "logp_rejected": float(logp[n + i])}
                if ref is not None:
                    rec.update(ref_chosen=float(ref[i]), ref_rejected=float(ref[n + i]))
                    margin = (rec["logp_chosen"] - rec["ref_chosen"]) - (rec["logp_rejected"] - rec["ref_rejected"])
                    rec["reward_correct"] = margin > 0
                rec["logp_correct"] = rec["logp_chosen"] > rec["logp_rejected"]
                records.append(rec)
        return records

    records = spread(rows, score) if spread else score(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "predictions.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, out_dir / "predictions.jsonl")
    n = max(len(records), 1)
    metrics = {"task": "preference", "n": len(records), "logp_accuracy": sum(r["logp_correct"] for r in records) / n}
    if has_ref:
        metrics["reward_accuracy"] = sum(r["reward_correct"] for r in records) / n
    metrics["accuracy"] = metrics.get("reward_accuracy", metrics["logp_accuracy"])
    write_json_atomic(out_dir / "metrics.json", metrics, indent=2)
    return metrics


def task_inputs(data_cfg, eval_cfg, tokenizer, seed: int, tokenizer_key: str) -> list[dict]:
    """What `run_task` scores: GSM8K conversations of `eval.split`, or tokenized held-out preference pairs."""
    from ftune.data.pipeline import load_train_examples, task_examples
    from ftune.data.preference import tokenize_pairs_batch
    from ftune.data.sources import DataError
    from ftune.data.tokenize import tokenize_examples

    if eval_cfg.task == "gsm8k":
        return task_examples(data_cfg, eval_cfg.split, seed, eval_cfg.limit)
    if eval_cfg.task == "many_shot":
        return many_shot_inputs(data_cfg, eval_cfg, tokenizer, seed, tokenizer_key)
    _, held_out, _ = load_train_examples(data_cfg, seed, kind="preference")
    if not held_out:
        raise DataError("eval.task=preference scores held-out pairs, and there are none: set data.eval_size > 0 "
                        "(the last pairs of the split) or data.eval_split.")
    held_out = held_out[: eval_cfg.limit] if eval_cfg.limit else held_out
    return tokenize_examples(held_out, tokenizer, data_cfg, tokenizer_key, "eval", tokenize_pairs_batch)


def run_task(model, tokenizer, inputs: list[dict], eval_cfg, out_dir: Path, progress: bool = True,
             spread: Callable | None = None) -> dict:
    """Dispatch to the task named by `eval.task` and return its metrics (with an `accuracy` key). `spread`: see
    evaluate_gsm8k."""
    fn = {"gsm8k": evaluate_gsm8k, "preference": evaluate_preference, "many_shot": evaluate_many_shot}[eval_cfg.task]
    return fn(model, tokenizer, inputs, eval_cfg, out_dir, progress=progress, spread=spread)
