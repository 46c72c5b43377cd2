"""Task evaluation shared by `ftune eval` and the in-training `eval.at_start` / `eval.at_end`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ftune.atomic import write_json_atomic
from ftune.eval import gsm8k, stats
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


def _accuracy(correct: int, n: int) -> dict:
    lo, hi = stats.wilson(correct, n)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0, "ci95": [lo, hi]}


def evaluate_reasoning_gym(model, tokenizer, examples: list[dict], eval_cfg, out_dir: Path, progress: bool = True,
                           spread: Callable[[list, Callable[[list], list]], list] | None = None) -> dict:
    """Greedy answers to held-out reasoning-gym problems (ftune.data.reasoning_gym.eval_problems), each scored by
    its task's own verifier (`score_answer`); per-task and overall accuracy (full credit) with 95% Wilson intervals,
    the mean verifier score, and the share of replies in the answer format. Writes predictions.jsonl and
    metrics.json under `out_dir`. `spread`: see evaluate_gsm8k."""
    from ftune.data.reasoning_gym import extract, scorer

    prompts = [ex["messages"] for ex in examples]

    def answer(some: list) -> list[str]:
        return generate(model, tokenizer, some, eval_cfg.max_new_tokens, eval_cfg.batch_size, progress=progress)

    outputs = spread(prompts, answer) if spread else answer(prompts)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_task: dict[str, dict] = {}
    tmp = out_dir / "predictions.jsonl.tmp"
    with open(tmp, "w") as f:
        for ex, out in zip(examples, outputs):
            pred, in_format = extract(out, ex["template"])
            try:
                score = float(scorer(ex["spec"]).score_answer(pred, ex["entry"]) or 0.0)
            except Exception:  # noqa: BLE001 - a verifier that cannot parse an answer scores it wrong
                score = 0.0
            t = per_task.setdefault(ex["task"], {"n": 0, "correct": 0, "score": 0.0, "format": 0,
                                                 "trained": ex["trained"]})
            t["n"] += 1
            t["correct"] += score >= 1.0
            t["score"] += score
            t["format"] += in_format
            f.write(json.dumps({"id": ex["id"], "task": ex["task"], "question": ex["messages"][-1]["content"],
                                "output": out, "prediction": pred, "gold": str(ex["entry"].get("answer")),
                                "score": score, "correct": score >= 1.0, "in_format": in_format}) + "\n")
    os.replace(tmp, out_dir / "predictions.jsonl")

    def summary(parts: list[dict]) -> dict:
        n = sum(p["n"] for p in parts)
        return {**_accuracy(sum(p["correct"] for p in parts), n),
                "mean_score": sum(p["score"] for p in parts) / n if n else 0.0,
                "answer_format": sum(p["format"] for p in parts) / n if n else 0.0}

    metrics = {"task": "reasoning_gym", **summary(list(per_task.values())),
               "tasks": {name: {**summary([t]), "trained": t["trained"]} for name, t in per_task.items()}}
    groups = {g: [t for t in per_task.values() if t["trained"] == (g == "trained")] for g in ("trained", "untrained")}
    if all(groups.values()):  # trained and untrained tasks both scored: transfer / forgetting
        metrics["groups"] = {g: summary(parts) for g, parts in groups.items()}
    write_json_atomic(out_dir / "metrics.json", metrics, indent=2)
    return metrics


def task_table(start: dict | None, end: dict) -> str:
    """Per-task accuracy before -> after (a reasoning-gym eval's metrics), with 95% intervals."""
    start = start or {}

    def cell(m: dict | None) -> str:
        if not m:
            return "-"
        lo, hi = m["ci95"]
        return f"{m['correct']}/{m['n']} = {100 * m['accuracy']:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}]"

    rows = [(f"{name}{'' if m['trained'] else ' (not trained)'}", start.get("tasks", {}).get(name), m)
            for name, m in end["tasks"].items()]
    rows += [(f"[{g}]", start.get("groups", {}).get(g), m) for g, m in end.get("groups", {}).items()]
    rows.append(("all", start if start.get("tasks") else None, end))
    width = max(len(r[0]) for r in rows)
    lines = [f"  {'task':<{width}}  {'before':<28}  after"]
    lines += [f"  {name:<{width}}  {cell(a):<28}  {cell(b)}" for name, a, b in rows]
    return "\n".join(lines)


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
    from ftune.peft.base import adapter_disabled, can_disable_adapter

    if eval_cfg.limit is not None:
        rows = rows[: eval_cfg.limit]
    device = next(model.parameters()).device
    has_ref = can_disable_adapter(model)
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
                with adapter_disabled(model):
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


def task_inputs(data_cfg, eval_cfg, tokenizer, seed: int, tokenizer_key: str, part: str = "test") -> list[dict]:
    """What `run_task` scores: GSM8K conversations of `eval.split`, reasoning-gym held-out problems, many-shot
    queries, or tokenized held-out preference pairs. `part=validation` is what a selection (e.g. a greedy soup)
    scores instead of the test problems: reasoning-gym problems of their own validation seeds, and for eval=gsm8k the
    run's held-out training examples (data.eval_split, or the last data.eval_size of the training split), never
    `eval.split`. Many-shot and preference evals score held-out training data already."""
    from ftune.data.pipeline import load_train_examples, task_examples
    from ftune.data.preference import tokenize_pairs_batch
    from ftune.data.sources import DataError
    from ftune.data.tokenize import tokenize_examples

    if eval_cfg.task == "reasoning_gym":
        from ftune.data.reasoning_gym import eval_problems

        return eval_problems(data_cfg, eval_cfg, seed, part)
    if eval_cfg.task == "gsm8k" and part == "validation":
        _, held_out, _ = load_train_examples(data_cfg, seed)
        if not held_out:
            raise DataError("validation examples for eval=gsm8k are the run's held-out training examples, and it had "
                            "none: train with data.eval_size=N (the last N examples of the training split, not trained "
                            "on) or data.eval_split=SPLIT, or select on the test split explicitly.")
        return held_out[: eval_cfg.limit] if eval_cfg.limit else held_out
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
    fn = {"gsm8k": evaluate_gsm8k, "preference": evaluate_preference, "many_shot": evaluate_many_shot,
          "reasoning_gym": evaluate_reasoning_gym}[eval_cfg.task]
    return fn(model, tokenizer, inputs, eval_cfg, out_dir, progress=progress, spread=spread)
