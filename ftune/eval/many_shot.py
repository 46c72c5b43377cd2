"""`eval=many_shot`: 0-, k- and many-shot in-context accuracy, prompts built like ManyICL's training sequences.

For each held-out query (`data.eval_split`, or the last `data.eval_size` examples) and each entry of `eval.shots`
(an integer k, or `many` = as many as fit `data.max_length - eval.max_new_tokens`), the prompt is the task's
instruction, k examples of the query's task drawn from the training examples, and the query's input
(ftune/data/many_shot.py `query_prompt`). Only the final query is scored: its greedy answer against the gold output,
by `eval.match` = exact (whitespace-collapsed, case-folded equality), numeric (the final number, as GSM8K is scored:
ftune/eval/gsm8k.py) or auto (numeric for gsm8k/gsm_symbolic data, exact otherwise).

The examples of a query come in one seeded order per query, and a k-shot prompt takes the first ones that fit, so the
k-shot examples are the first of the many-shot ones. The eval protocol (pool, order, matching) is ftune's; the paper's
is not public.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path

from ftune.atomic import write_json_atomic
from ftune.config import ConfigError
from ftune.data.many_shot import (
    answer_start,
    check_tasks,
    group_by_task,
    instruction_ids,
    query_prompt,
    task_instruction,
    tokenize_many_shot_batch,
)
from ftune.data.sources import DataError
from ftune.eval import gsm8k
from ftune.eval.generation import generate_ids

log = logging.getLogger(__name__)
NUMERIC_SOURCES = ("gsm8k", "gsm_symbolic")


def parse_shots(shots) -> list[int | str]:
    """`eval.shots` as a list of distinct ints >= 0 and/or "many"; ConfigError otherwise."""
    out: list[int | str] = []
    for s in list(shots or []):
        if isinstance(s, str) and s.strip().isdigit():
            s = int(s)
        if not (s == "many" or (isinstance(s, int) and not isinstance(s, bool) and s >= 0)):
            raise ConfigError(f"eval.shots: {s!r} is not a number of examples; use integers >= 0 and/or many, e.g. "
                              f"eval.shots=[0,5,many].")
        if s in out:
            raise ConfigError(f"eval.shots lists {s!r} twice.")
        out.append(s)
    if not out:
        raise ConfigError("eval.shots is empty; e.g. eval.shots=[0,5,many].")
    return out


def resolve_match(match: str, source: str) -> str:
    if match == "auto":
        return "numeric" if source in NUMERIC_SOURCES else "exact"
    return match


def is_correct(prediction: str, gold: str, match: str) -> bool:
    if match == "numeric":
        return gsm8k.score(prediction, gold)
    return " ".join(prediction.split()).casefold() == " ".join(gold.split()).casefold()


def pick_shots(pool: list[dict], query: dict, k: int | str, budget: int, seed: int) -> list[dict]:
    """Up to k pieces of `pool` (all that fit for "many"), never the query itself, within `budget` tokens."""
    if k == 0:
        return []
    order = [p for p in pool if p["id"] != query["id"]]
    random.Random(f"{seed}|shots|{query['id']}").shuffle(order)
    chosen, used = [], 0
    for p in order:
        if k != "many" and len(chosen) >= k:
            break
        if used + len(p["input_ids"]) <= budget:
            chosen.append(p)
            used += len(p["input_ids"])
    return chosen


def many_shot_inputs(data_cfg, eval_cfg, tokenizer, seed: int, tokenizer_key: str) -> list[dict]:
    """One prompt per (held-out query, shot setting): {id, task, shots, k, prompt (ids), gold, match}."""
    from ftune.data.pipeline import load_train_examples
    from ftune.data.tokenize import tokenize_examples

    shots = parse_shots(eval_cfg.shots)
    budget = data_cfg.max_length - eval_cfg.max_new_tokens
    if budget <= 0:
        raise ConfigError(f"eval=many_shot: data.max_length={data_cfg.max_length} leaves no room for a prompt after "
                          f"eval.max_new_tokens={eval_cfg.max_new_tokens}. Raise data.max_length.")
    single = eval_cfg.single_task
    train, held_out, _ = load_train_examples(data_cfg, seed, kind="many_shot")
    if not held_out:
        raise DataError("eval.task=many_shot scores held-out queries, and there are none: set data.eval_size > 0 "
                        "(the last examples of the split) or data.eval_split.")
    check_tasks(train, single, "eval (shots)", min_examples=1, single_task_key="eval.single_task")
    check_tasks(held_out, single, "eval (queries)", min_examples=1, single_task_key="eval.single_task")
    held_out = held_out[: eval_cfg.limit] if eval_cfg.limit else held_out
    gold = {e["id"]: e["output"] for e in held_out}
    pools = group_by_task(tokenize_examples(train, tokenizer, data_cfg, tokenizer_key, "eval shots",
                                            tokenize_many_shot_batch), single)
    queries = tokenize_examples(held_out, tokenizer, data_cfg, tokenizer_key, "eval queries", tokenize_many_shot_batch)
    heads = {t: instruction_ids(tokenizer, task_instruction(t, pool, data_cfg.system_prompt))
             for t, pool in pools.items()}
    match = resolve_match(eval_cfg.match, data_cfg.source)
    inputs, too_long = [], 0
    for q in queries:
        task = single or q["task"]
        if task not in pools:
            raise DataError(f"eval: held-out example '{q['id']}' is of task '{task}', which has no training examples "
                            f"to draw in-context examples from. Add training examples of '{task}'.")
        room = budget - len(heads[task]) - answer_start(q)
        if room < 0:
            too_long += 1
            continue
        for k in shots:
            chosen = pick_shots(pools[task], q, k, room, seed)
            inputs.append({"id": q["id"], "task": task, "shots": str(k), "k": len(chosen),
                           "prompt": query_prompt(heads[task], chosen, q), "gold": gold[q["id"]], "match": match})
    if too_long:
        log.warning("eval: skipped %d query(ies) whose 0-shot prompt alone exceeds data.max_length - "
                    "eval.max_new_tokens = %d tokens.", too_long, budget)
    if not inputs:
        raise DataError(f"eval: no query fits data.max_length - eval.max_new_tokens = {budget} tokens.")
    return inputs


def evaluate_many_shot(model, tokenizer, inputs: list[dict], eval_cfg, out_dir: Path, progress: bool = True,
                       spread: Callable[[list, Callable[[list], list]], list] | None = None) -> dict:
    """Greedy answers to every prompt; accuracy per shot setting (and per task). Writes predictions.jsonl and
    metrics.json under `out_dir`. `accuracy` is the accuracy of the last setting of `eval.shots`. `spread(inputs, fn)`
    may compute `fn(inputs)` with several processes (each answers a share; distributed.shared_out)."""

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def answer(some: list[dict]) -> list[list[int]]:
        return generate_ids(model, [x["prompt"] for x in some], eval_cfg.max_new_tokens, eval_cfg.batch_size, pad,
                            tokenizer.eos_token_id, progress=progress)

    outputs = spread(inputs, answer) if spread else answer(inputs)
    settings = list(dict.fromkeys(x["shots"] for x in inputs))
    totals = {s: [0, 0, 0] for s in settings}  # correct, n, examples in context
    per_task: dict[str, dict[str, list[int]]] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "predictions.jsonl.tmp"
    with open(tmp, "w") as f:
        for x, ids in zip(inputs, outputs):
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            ok = is_correct(text, x["gold"], x["match"])
            for counts in (totals[x["shots"]], per_task.setdefault(x["task"], {}).setdefault(x["shots"], [0, 0, 0])):
                counts[0] += ok
                counts[1] += 1
                counts[2] += x["k"]
            f.write(json.dumps({"id": x["id"], "task": x["task"], "shots": x["shots"], "k": x["k"],
                                "prompt_tokens": len(x["prompt"]), "output": text, "gold": x["gold"],
                                "correct": ok}) + "\n")
    os.replace(tmp, out_dir / "predictions.jsonl")
    metrics: dict = {"task": "many_shot", "n": len({x["id"] for x in inputs}), "match": inputs[0]["match"]}
    for s, (correct, n, k) in totals.items():
        metrics[f"shots_{s}_accuracy"] = correct / n
        metrics[f"shots_{s}_mean_k"] = k / n
    metrics["accuracy"] = metrics[f"shots_{settings[-1]}_accuracy"]
    metrics["per_task"] = {t: {f"shots_{s}": c / n for s, (c, n, _) in d.items()} for t, d in per_task.items()}
    write_json_atomic(out_dir / "metrics.json", metrics, indent=2)
    return metrics
