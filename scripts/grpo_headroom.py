#!/usr/bin/env python
"""How much GRPO can gain on a task by sampling alone: a model's greedy accuracy, its mean accuracy at temperature 1,
and pass@G (a problem solved by at least one of G samples) on the held-out problems of a recipe's trained tasks,
each scored by the task's verifier. GRPO sharpens the policy towards answers it already samples, so pass@G bounds
what a short run reaches, and the share of problems with mixed rewards is the share of prompts that give a gradient.

    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    .venv/bin/python scripts/grpo_headroom.py --model W30/merged --limit 200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--recipe", default="grpo_quickstart")
    ap.add_argument("--limit", type=int, default=200, help="held-out problems, split over the trained tasks")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("overrides", nargs="*", help="further Hydra overrides, e.g. data.answer_format=plain")
    a = ap.parse_args()

    import torch
    from hydra import compose, initialize_config_dir

    from ftune.config import register_configs
    from ftune.data import reasoning_gym as rg
    from ftune.data.tokenize import prompt_ids
    from ftune.eval.generation import generate_ids
    from ftune.models.loading import load_model, load_tokenizer, resolve_model_dir
    from ftune.paths import configs_dir

    register_configs()
    with initialize_config_dir(config_dir=str(configs_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[f"+recipe={a.recipe}", "model=hub", f"model.name_or_path={a.model}",
                                          "eval.tasks=null", f"eval.limit={a.limit}", *a.overrides])
    model_dir = resolve_model_dir(cfg.model.name_or_path, None)
    tok = load_tokenizer(model_dir)
    model, _, _ = load_model(cfg.model, None, model_dir)
    problems = rg.eval_problems(cfg.data, cfg.eval, cfg.seed)
    template = rg.answer_template(cfg.data.get("answer_format") or "tags")
    prompts = [prompt_ids(tok, ex["messages"]) for ex in problems]
    G, pad, eos = a.group, tok.pad_token_id, tok.eos_token_id

    def solved(ex, ids) -> tuple[bool, bool]:
        pred, in_format = rg.extract(tok.decode(ids, skip_special_tokens=True), template)
        try:
            score = float(rg.scorer(ex["spec"]).score_answer(pred, ex["entry"]) or 0.0)
        except Exception:  # noqa: BLE001 - as the eval: an answer the verifier cannot parse is wrong
            score = 0.0
        return score >= 1.0, in_format

    with torch.autocast("cpu", dtype=torch.bfloat16):
        greedy = generate_ids(model, prompts, a.max_new_tokens, 64, pad, eos)
        torch.manual_seed(cfg.seed)
        sampled = generate_ids(model, prompts, a.max_new_tokens, 64, pad, eos, temperature=1.0, top_p=1.0, top_k=0,
                               group=G)
    per: dict[str, dict] = {}
    for i, ex in enumerate(problems):
        t = per.setdefault(ex["task"], {"n": 0, "greedy": 0, "sampled": 0.0, "format": 0.0, "pass": 0, "mixed": 0})
        right = sum(solved(ex, c)[0] for c in sampled[i * G:(i + 1) * G])
        t["n"] += 1
        t["greedy"] += solved(ex, greedy[i])[0]
        t["sampled"] += right / G
        t["format"] += sum(solved(ex, c)[1] for c in sampled[i * G:(i + 1) * G]) / G
        t["pass"] += right > 0
        t["mixed"] += 0 < right < G
    print(f"| task | problems | greedy | sampled (T=1) | in format (sampled) | pass@{G} | mixed rewards |")
    print("|---|---|---|---|---|---|---|")
    for name, t in per.items():
        n = t["n"]
        print(f"| {name} | {n} | {t['greedy'] / n:.1%} | {t['sampled'] / n:.1%} | {t['format'] / n:.1%} | "
              f"{t['pass'] / n:.1%} | {t['mixed'] / n:.1%} |")


if __name__ == "__main__":
    main()
