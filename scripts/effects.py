#!/usr/bin/env python
"""benchmarks/effects.{md,json,png}: every seed method against SFT at the same budget, on the reasoning-gym
quickstart (3 seeds x 300 held-out problems), with 95% intervals, the knobs changed for scale, and each method's
paper-scale recipe and headline number beside the CPU effect.

    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    .venv/bin/python scripts/effects.py --out runs/effects            # run what is missing (hours on 2 cores), write
    .venv/bin/python scripts/effects.py --out runs/effects --only sft,dora,ssf   # a page of the arms named

The runs are `ftune compare` (the real CLI, resumable: a finished run is never rerun), one invocation per arm with
the SFT baseline, so that an interrupted page has whole arms. The page is written from the runs' predictions:
gains vs SFT from compare.json, and for the selectors also vs random selection at the same budget (paired on the
same problems, the same two-level bootstrap, ftune.eval.stats.paired_gain).

Arms whose runs are not in `--out` but are on the existing page (its JSON) are kept from the page, only when the
baseline reproduced exactly here (the same per-problem SFT predictions on every seed; runs are deterministic on one
machine): so a page can grow by the arms just run without rerunning hours of others. `--fresh` drops them instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ftune import compare as cmp  # noqa: E402
from ftune.atomic import write_json_atomic  # noqa: E402
from ftune.eval import stats  # noqa: E402

COMMON = ["+recipe=quickstart"]
SEEDS = "0,1,2"
# name, overrides, what was changed for scale (and why)
ARMS = [
    ("sft", "", "LoRA r=16 on all linear layers, lr 1e-3, 80 steps x 8 examples (the quickstart)."),
    ("mft", "objective=masked_thought", "The paper's rate 0.4 and random-token noise; 80 steps where the paper "
     "trains 10 epochs (the budget is SFT's)."),
    ("dora", "peft=dora", "DoRA at the LoRA arm's rank and lr."),
    ("constrained_sft", "objective=constrained_sft", "The paper's beta defaults (ftune's config); its setting is "
     "safety data on an aligned model, here plain task data."),
    ("lift", "peft=lift peft.rank=16 peft.filter_rank=32", "Rank 16 (the LoRA arm's parameter count), filter rank "
     "32 (the paper's 1B value), the LoRA arm's lr."),
    ("hft", "peft=hft trainer.lr=1e-4", "lr 1e-4 (the paper's was not found; 1e-3 is a LoRA rate, HFT trains half "
     "of all weights)."),
    ("s3ft", "objective=s3ft objective.max_new_tokens=32", "numeric_match judge (the paper's GSM8K judge); answers "
     "capped at 32 tokens (they are one tag). Why it collapses (seed 0, s3ft_composition.json): the judge accepted "
     "60% paraphrases and 12% own answers with the right number outside the `<answer>` form, so the targets lose "
     "the trained format; s3ft_verifier is the fix."),
    ("s3ft_verifier", "objective=s3ft objective.judge=verifier objective.max_new_tokens=32", "The task's own "
     "verifier as the judge, in the trained answer format (ftune's; the paper judges GSM8K by the final number)."),
    ("pso_offline", "objective=pso objective.max_new_tokens=32", "LM adaptation (gold vs own sample), beta 0.1. "
     "Collapses to "
     "degenerate output (`<<<<...`) at the LoRA lr 1e-3: the margin pushes the answer tokens down."),
    ("pso_online", "objective=pso objective.mode=online objective.max_new_tokens=32", "As pso_offline, re-sampled "
     "every step."),
    ("verified_dpo", "objective=verified_dpo objective.shots=4 objective.max_new_tokens=32 trainer.lr=1e-4",
     "Pairs: 4 samples per prompt at temperature 1 with 4 solved examples in the sampling prompt (the base model "
     "answers 0% 0-shot), a correct over an incorrect one by the verifier; beta 0.1; lr 1e-4 (DPO's 1e-6 is a "
     "full fine-tuning rate)."),
    ("verified_simpo", "objective=verified_dpo objective.loss=simpo objective.shots=4 objective.max_new_tokens=32 "
     "trainer.lr=1e-4", "The same pairs; SimPO beta 2.0, gamma 1.0 (gamma/beta 0.5, the repo's); lr as DPO."),
    ("many_icl", "objective=many_icl", "Many-shot sequences of one task each within the quickstart's 128 tokens "
     "(2-3 examples, not the paper's thousands of tokens), so it trains ~1.9x SFT's tokens in the same steps; scored "
     "0-shot here and with 2 solved problems in context below (the training sequences' layout and size)."),
    ("adalink", "peft=adalink", "Rank 16 (the paper's was not found), the LoRA arm's lr."),
    ("ssf", "peft=ssf", "After linear layers, norms and the embedding as the paper; the LoRA arm's lr (the paper's "
     "ViT lr is also 1e-3)."),
    ("sel_random", "selection=random selection.budget=400", "400 of the 768 training problems, then the same 80 "
     "steps (the baseline of the selectors)."),
    ("sel_kmq", "selection=kmq selection.budget=400", "The model's own embeddings and perplexity as quality (the "
     "paper's Deita scorer and Cohere embeddings are downloads)."),
    ("sel_iterative", "selection=iterative selection.budget=400 selection.max_new_tokens=24", "3 rounds of one "
     "epoch each (the paper's), numeric_match reward (the paper's reward model is a download)."),
    ("sel_got_d", "selection=got_d selection.budget=400 selection.target_path=validation", "Targets: 64 validation "
     "problems of the eval's tasks (the paper: a few thousand target examples), the model's own embeddings (the "
     "paper: a fine-tuned distilBERT / MiniLM), no domain pre-selection (one pool)."),
    ("sel_dealrec", "selection=dealrec selection.budget=400", "The training model as its own surrogate (the paper "
     "trains a small one), LiSSA 100 steps (paper 5000)."),
]
SELECTORS_BASELINE = "sel_random"
# ManyICL's claim is about in-context use: these arms (and the base model) are also scored with CONTEXT_SHOTS solved
# problems of each query's task before it (eval.context_examples; the layout of many_icl's training sequences).
CONTEXT_ARMS = ("sft", "many_icl")
CONTEXT_SHOTS = 2
# method -> (paper-scale recipe or None, the paper's headline as quoted in shared METHODS specs)
PAPERS = {
    "mft": ("paper_mft_llama2_7b_gsm8k", "Llama-2-7B GSM8K test: SFT 41.6 -> MFT 47.1 (Table 1, 3 seeds)"),
    "dora": (None, "commonsense avg, Llama-7B: LoRA 74.7 -> DoRA 78.4 (third-party copy)"),
    "constrained_sft": (None, "Llama-2-7B-Chat, harmful-examples attack ASR: SFT 88.9 -> constrained 4.6; GSM8K "
                        "41.7 -> 37.4 (Table 4)"),
    "lift": (None, "Llama-3.2-1B, MATH-10K -> avg of 7 arithmetic sets: LoRA 67.98 -> LIFT 69.02 (Table 2)"),
    "hft": (None, "Llama-2-7B on Tulu V2, avg of 6 tasks: full FT 41.0 -> HFT 42.9 (third-party notes)"),
    "s3ft": ("paper_s3ft_gsm8k_mistral7b", "Mistral-7B-Instruct GSM8K: SFT 53.4 -> S3FT 56.9 (third-party copy of "
             "Table 2)"),
    "s3ft_verifier": ("paper_s3ft_gsm8k_mistral7b", "as s3ft"),
    "pso_offline": (None, "diffusion models only; no LM numbers"),
    "pso_online": (None, "diffusion models only; no LM numbers"),
    "verified_dpo": (None, "IRPO (Llama-2-70B-Chat, GSM8K): 55.6 -> 81.6 over 4 iterations (its abstract); DPO "
                     "itself: TL;DR win rate ~61% vs PPO 57%"),
    "verified_simpo": (None, "SimPO: up to +6.4 AlpacaEval 2 LC over DPO (abstract)"),
    "many_icl": ("paper_manyicl_qwen7b", "no numbers found (qualitative: beats 0/few-shot ICFT)"),
    "adalink": (None, "no numbers found (qualitative)"),
    "ssf": (None, "ViT-B/16: FGVC 90.72 vs full FT 88.54; VTAB-1k 73.10 vs 65.57 (abstract)"),
    "sel_kmq": ("paper_kmq_llama2_7b", "Llama-2-7B, 10K of WizardLM: random 43.8 -> kMQ 46.2 avg of 6 (GSM8K 13.3 "
                "-> 16.2) (Table 2)"),
    "sel_iterative": ("paper_kmq_llama2_7b", "random 43.8 -> iterative kMQ 46.9 (GSM8K 13.3 -> 18.4) (Table 2)"),
    "sel_got_d": (None, "GPT-2 XL zero-shot AGNews 49.5 -> 63.4 with 40K selected (App. E)"),
    "sel_dealrec": (None, "recommendation: 2% of the data beats full-data fine-tuning (abstract)"),
}


def compare_cmd(arm: tuple[str, str, str], out: Path) -> list[str]:
    name, overrides, _ = arm
    arms = ["--arm", "sft:"] + (["--arm", f"{name}: {overrides}"] if name != "sft" else [])
    return [sys.executable, "-m", "ftune.cli", "compare", *COMMON, *arms, "--seeds", SEEDS, "--out", str(out)]


def context_dir(out: Path, arm: str, seed: int) -> Path:
    """Where an arm's (or the base model's: arm `base`) in-context scoring of seed `seed` goes."""
    if arm == "base":
        return out / f"base_context{CONTEXT_SHOTS}-s{seed}"
    return cmp.run_dir(out, arm, seed) / f"eval_context{CONTEXT_SHOTS}"


def context_cmd(out: Path, arm: str, seed: int) -> list[str]:
    """`ftune eval` of a finished run (or of the base model, on the problems seed `seed`'s runs were scored on)
    with CONTEXT_SHOTS solved problems before each held-out one."""
    where = ["seed=" + str(seed)] if arm == "base" else ["run_dir=" + str(cmp.run_dir(out, arm, seed))]
    return [sys.executable, "-m", "ftune.cli", "eval", *COMMON, *where, f"eval.context_examples={CONTEXT_SHOTS}",
            f"output_dir={context_dir(out, arm, seed)}"]


def context_scoring(out: Path, seeds: list[int], run: bool) -> dict | None:
    """In-context accuracy of the base model and CONTEXT_ARMS, and many_icl's gain over SFT, both scored with
    CONTEXT_SHOTS examples (paired on the same problems, the page's bootstrap); None until every run is there."""
    arms = ["base", *CONTEXT_ARMS]
    if not all(cmp.finished(cmp.run_dir(out, a, s)) for a in CONTEXT_ARMS for s in seeds):
        return None
    for a in arms:
        for s in seeds:
            if not (context_dir(out, a, s) / "metrics.json").is_file() and run:
                subprocess.run(context_cmd(out, a, s), check=True, cwd=ROOT)
    if not all((context_dir(out, a, s) / "metrics.json").is_file() for a in arms for s in seeds):
        return None
    scores = {a: [cmp.read_scores(context_dir(out, a, s) / "predictions.jsonl") for s in seeds] for a in arms}
    zero = {a: [cmp.read_scores(cmp.run_dir(out, a, s) / "eval_end" / "predictions.jsonl") for s in seeds]
            for a in CONTEXT_ARMS}
    groups = cmp.task_groups(json.loads((context_dir(out, "sft", seeds[0]) / "metrics.json").read_text()))
    table = {}
    for a in arms:
        if [set(x) for x in scores[a]] != [set(x) for x in scores["sft"]]:
            raise SystemExit(f"in-context scoring: {a} was scored on other problems than sft; rerun its evals.")
        table[a] = {}
        for g in ("trained", "untrained"):
            ids = sorted(i for i, v in scores[a][0].items() if v[0] in groups[g])
            row = {"accuracy": stats.paired_gain(cmp.matrix(scores[a], ids))}
            if a != "sft":
                row["gain_vs_sft"] = stats.paired_gain(cmp.matrix(scores[a], ids), cmp.matrix(scores["sft"], ids))
            if a in zero:
                row["gain_vs_0shot"] = stats.paired_gain(cmp.matrix(scores[a], ids), cmp.matrix(zero[a], ids))
            table[a][g] = row
    return {"shots": CONTEXT_SHOTS, "arms": table,
            "commands": [shlex.join(["ftune", *context_cmd(out, a, s)[3:]]) for a in arms for s in seeds]}


def context_lines(ctx: dict) -> list[str]:
    k = ctx["shots"]
    lines = ["", f"## In-context scoring ({k} solved problems of the task before each held-out one)", "",
             f"ManyICL trains on sequences of several solved examples of one task, so its claim is about a model "
             f"used in context. The same held-out problems, each after {k} solved problems of its task (drawn per "
             f"problem from the task's validation seeds, never a scored problem; `eval.context_examples={k}`, the "
             f"layout of the training sequences):", "",
             f"| model | trained tasks, {k}-shot | gain vs SFT {k}-shot (trained) | verdict | {k}-shot vs its 0-shot "
             f"(trained) | untrained tasks, {k}-shot | gain vs SFT {k}-shot (untrained) |",
             "|---|---|---|---|---|---|---|"]
    for a, row in ctx["arms"].items():
        t, u = row["trained"], row["untrained"]
        name = "base model (no training)" if a == "base" else a
        lines.append(f"| {name} | {ci(t['accuracy'], False)} | {ci(t['gain_vs_sft']) if 'gain_vs_sft' in t else '-'}"
                     f" | {verdict(t.get('gain_vs_sft'))} | {ci(t['gain_vs_0shot']) if 'gain_vs_0shot' in t else '-'}"
                     f" | {ci(u['accuracy'], False)} | {ci(u['gain_vs_sft']) if 'gain_vs_sft' in u else '-'} |")
    lines += ["", "Commands (`ftune eval` of each finished run, and of the base model on each seed's problems):", ""]
    lines += ["    " + c for c in ctx["commands"]]
    return lines


def pct(x: float) -> str:
    return f"{100 * x:+.1f}"


def ci(r: dict, signed: bool = True) -> str:
    lo, hi = r["ci95"]
    f = pct if signed else (lambda v: f"{100 * v:.1f}")
    return f"{f(r['mean'])} [{f(lo)}, {f(hi)}]"


def verdict(g: dict | None) -> str:
    """What the interval says: above / below the baseline, or within noise; flags an interval wider than +/- 5."""
    if g is None:
        return "baseline"
    lo, hi = g["ci95"]
    word = "better than SFT" if lo > 0 else "worse than SFT" if hi < 0 else "no difference shown"
    return word + (" (interval wider than +/-5)" if (hi - lo) / 2 > 0.05 else "")


def page(result: dict, arms: list[tuple[str, str, str]], missing: list[str], vs_random: dict, out: Path,
         kept: list[str] = (), ctx: dict | None = None) -> str:
    t, b = result["table"], result["baseline"]
    base = result["base"] or {}
    lines = [
        "# Measured effects of the seed methods (CPU, reasoning-gym quickstart)", "",
        f"Generated by `scripts/effects.py` from `ftune compare` runs (the commands below). The quickstart: LoRA on "
        f"the embedded SmolLM2-135M-Instruct, 80 optimizer steps of 8 examples (every arm the same: `ftune compare` "
        f"refuses arms that change the budget, the tasks or the held-out problems), training on chain_sum + "
        f"basic_arithmetic; scored on {result['problems']} fresh held-out problems per seed (100 of each trained "
        f"task, 50 each of products and leg_counting, untrained) with each task's verifier; seeds {result['seeds']}. "
        f"Intervals: 95%, two-level bootstrap (seeds, then problems within a seed), gains paired on the same "
        f"problems. Base model: trained tasks {ci(base['trained'], False) if 'trained' in base else '-'}, untrained "
        f"{ci(base['untrained'], False) if 'untrained' in base else '-'} (it does not answer in the trained "
        f"`<answer>` format). 2 CPU cores; `train s` is each run's training wall time and is not comparable across "
        f"arms (some runs shared the cores with another run).", "",
        "| method | trained tasks | gain vs SFT (trained) | verdict | gain vs SFT (untrained) | steps | train tokens | "
        "train s |", "|---|---|---|---|---|---|---|---|"]
    for name, _, _ in arms:
        row, bud = t[name], result["budget"][name]
        g = row["trained"].get(f"gain_vs_{b}")
        u = row["untrained"].get(f"gain_vs_{b}")
        lines.append(f"| {name} | {ci(row['trained']['accuracy'], False)} | {ci(g) if g else '-'} | {verdict(g)} | "
                     f"{ci(u) if u else '-'} | {bud['steps']} | {bud['train_tokens']:.0f} | "
                     f"{bud['train_seconds']:.0f} |")
    if vs_random:
        lines += ["", f"Selectors against random selection of the same budget ({SELECTORS_BASELINE}), trained tasks:",
                  "", "| selector | gain vs random (trained) | gain vs random (untrained) |", "|---|---|---|"]
        for name, r in vs_random.items():
            lines.append(f"| {name} | {ci(r['trained'])} ({verdict(r['trained']).replace('SFT', 'random')}) | "
                         f"{ci(r['untrained'])} |")
    if ctx:
        lines += context_lines(ctx)
    lines += ["", "## What each arm changed for scale, and the paper-scale recipe", "",
              "| method | changed for scale (and why) | paper's headline | paper-scale recipe |", "|---|---|---|---|"]
    for name, _, note in arms:
        recipe, claim = PAPERS.get(name, (None, "-"))
        lines.append(f"| {name} | {note} | {claim} | {f'`ftune train +recipe={recipe}`' if recipe else 'none yet'} |")
    if missing:
        lines += ["", f"**Not measured yet** (their runs had not finished when this page was written): "
                      f"{', '.join(missing)}."]
    if kept:
        lines += ["", f"Rows of {', '.join(kept)} are from the earlier page's runs: this page's SFT runs reproduced "
                      f"that page's SFT predictions problem for problem on every seed, so their gains are against "
                      f"the same baseline."]
    lines += ["", "## Commands", "", "Each arm is one `ftune compare` with the SFT baseline, in the same `--out` "
              "directory (finished runs are reused):", ""]
    for arm in arms:
        lines.append("    " + shlex.join(["ftune", *compare_cmd(arm, out)[3:]]))
    lines += ["", "Page: `.venv/bin/python scripts/effects.py --out " + str(out) + "`", "",
              "## Every task group (ftune compare's report)", ""]
    full = cmp.markdown(result).split("\n", 2)[2]  # without its own title
    lines.append(full)
    return "\n".join(lines)


def fingerprint(run: Path) -> str:
    """The run's per-problem verdicts at the end, hashed: equal fingerprints = the same predictions scored the same."""
    scores = cmp.read_scores(run / "eval_end" / "predictions.jsonl")
    return hashlib.sha256(json.dumps(sorted((i, v[2]) for i, v in scores.items())).encode()).hexdigest()[:16]


def baseline_reproduced(stored: dict, result: dict, fingerprints: list[str]) -> str | None:
    """None when this comparison's SFT runs are the stored page's (per-problem fingerprints where the page has them,
    else every group's per-seed accuracy); otherwise what differs."""
    if stored.get("seeds") != result["seeds"] or stored.get("problems") != result["problems"]:
        return f"seeds/problems {stored.get('seeds')}/{stored.get('problems')} vs {result['seeds']}/" \
               f"{result['problems']}"
    if "baseline_fingerprints" in stored:
        return None if stored["baseline_fingerprints"] == fingerprints else (
            f"SFT predictions {stored['baseline_fingerprints']} vs {fingerprints}")
    old, new = stored["table"]["sft"], result["table"]["sft"]
    for group in sorted(set(old) | set(new)):
        a = old.get(group, {}).get("accuracy", {}).get("per_seed")
        b = new.get(group, {}).get("accuracy", {}).get("per_seed")
        if a != b:
            return f"SFT accuracy per seed on {group}: {a} on the page vs {b} here"
    return None


def carry_over(stored: dict, result: dict, vs_random: dict, wanted: list[str]) -> list[str]:
    """Put the stored page's rows of the wanted arms that did not run here into `result` / `vs_random`."""
    kept = [n for n in wanted if n not in result["table"] and n in stored.get("table", {})]
    for n in kept:
        result["arms"][n] = stored["arms"][n]
        result["table"][n] = stored["table"][n]
        result["budget"][n] = stored["budget"][n]
        result["runs"][n] = stored["runs"][n]
        if n in stored.get("vs_random", {}) and n not in vs_random:
            vs_random[n] = stored["vs_random"][n]
    order = {n: k for k, (n, _, _) in enumerate(ARMS)}
    for key in ("arms", "table", "budget", "runs"):
        result[key] = dict(sorted(result[key].items(), key=lambda kv: order.get(kv[0], len(order))))
    vs_random_sorted = dict(sorted(vs_random.items(), key=lambda kv: order[kv[0]]))
    vs_random.clear()
    vs_random.update(vs_random_sorted)
    return kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/effects", help="the comparison's directory (runs are reused)")
    p.add_argument("--only", default=None, help="comma-separated arms for the page (default: all)")
    p.add_argument("--no-run", action="store_true", help="write the page from finished arms only; run nothing")
    p.add_argument("--page", default=str(ROOT / "benchmarks" / "effects"), help="output path without suffix")
    p.add_argument("--fresh", action="store_true", help="do not keep the existing page's arms that did not run here")
    a = p.parse_args()
    out = Path(a.out).resolve()
    wanted = a.only.split(",") if a.only else [n for n, _, _ in ARMS]
    unknown = sorted(set(wanted) - {n for n, _, _ in ARMS})
    if unknown:
        raise SystemExit(f"--only: unknown arms {unknown}; arms: {', '.join(n for n, _, _ in ARMS)}")
    arms = [x for x in ARMS if x[0] in wanted]
    seeds = [int(s) for s in SEEDS.split(",")]
    done = []
    for arm in arms:
        if not all(cmp.finished(cmp.run_dir(out, arm[0], s)) for s in seeds) and not a.no_run:
            subprocess.run(compare_cmd(arm, out), check=True, cwd=ROOT)
        if all(cmp.finished(cmp.run_dir(out, arm[0], s)) for s in seeds):
            done.append(arm)
    missing = [n for n, _, _ in arms if n not in {d[0] for d in done}]
    if "sft" not in {d[0] for d in done}:
        raise SystemExit("the sft arm has not finished: nothing to compare with.")
    # One compare over every finished arm: reuses the runs, checks they share problems and steps, writes the tables.
    names = [d[0] for d in done]
    result = cmp.compare(COMMON, [(n, shlex.split(o)) for n, o, _ in done], seeds, out, "sft",
                         "scripts/effects.py", runner=lambda cmd: (_ for _ in ()).throw(RuntimeError(cmd)))
    vs_random = {}
    if SELECTORS_BASELINE in names:
        scores = {n: [cmp.read_scores(cmp.run_dir(out, n, s) / "eval_end" / "predictions.jsonl") for s in seeds]
                  for n in names if n.startswith("sel_")}
        groups = cmp.task_groups(json.loads((cmp.run_dir(out, "sft", seeds[0]) / "eval_end" /
                                             "metrics.json").read_text()))
        for n in scores:
            if n == SELECTORS_BASELINE:
                continue
            vs_random[n] = {}
            for g in ("trained", "untrained"):
                ids = sorted(i for i, v in scores[n][0].items() if v[0] in groups[g])
                vs_random[n][g] = stats.paired_gain(cmp.matrix(scores[n], ids),
                                                    cmp.matrix(scores[SELECTORS_BASELINE], ids))
    base = Path(a.page)
    fingerprints = [fingerprint(cmp.run_dir(out, "sft", s)) for s in seeds]
    stored_path = base.with_suffix(".json")
    kept: list[str] = []
    if not a.fresh and stored_path.is_file() and missing:
        stored = json.loads(stored_path.read_text())
        differs = baseline_reproduced(stored, result, fingerprints)
        if differs:
            raise SystemExit(f"{stored_path}: its SFT baseline is not this one ({differs}), so its arms cannot be "
                             f"kept beside these runs: rerun them here, or pass --fresh to drop them.")
        kept = carry_over(stored, result, vs_random, missing)
        done += [x for x in ARMS if x[0] in kept]
        done.sort(key=lambda x: [n for n, _, _ in ARMS].index(x[0]))
        missing = [n for n in missing if n not in kept]
        print(f"kept from {stored_path} (the baseline reproduced): {', '.join(kept) or 'none'}")
        names = [d[0] for d in done]
    ctx = context_scoring(out, seeds, not a.no_run)
    if ctx is None and not a.fresh and stored_path.is_file():
        ctx = json.loads(stored_path.read_text()).get("in_context")  # the baseline reproduced (checked above)
    text = page(result, done, missing, vs_random, Path(a.out), kept, ctx)
    tmp = base.with_suffix(".md.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(base.with_suffix(".md"))
    write_json_atomic(base.with_suffix(".json"), {**result, "vs_random": vs_random, "missing": missing,
                                                  "baseline_fingerprints": fingerprints, "in_context": ctx,
                                                  "notes": {n: note for n, _, note in done},
                                                  "papers": {n: PAPERS.get(n) for n in names}}, indent=2)
    cmp.plot(result, {n: [cmp.run_dir(out, n, s) for s in seeds] for n in names if n not in kept},
             base.with_suffix(".png"))
    print(f"wrote {base.with_suffix('.md')} ({len(done)} arms; missing: {', '.join(missing) or 'none'})")


if __name__ == "__main__":
    main()
