#!/usr/bin/env python
"""Data selection at scale: examples/s of the embedding pass and of each selection method, from 10k to 100k examples.

Two parts:

1. Embedding, measured for real: the model (default the embedded SmolLM2-135M-Instruct) embeds the first
   `--embed-sample` GSM8K train examples exactly as `ftune.selection.embed.Embedder` does for a selection run
   (mean-pooled last hidden states and the response NLL); examples/s and tokens/s, model load timed apart.
2. Selection, for each pool size n in `--sizes`: n distinct records (GSM8K train questions, cycled, each given a
   suffix " (#i)") and n SYNTHETIC embeddings: the real embeddings of part 1, replicated, plus seeded gaussian noise
   (`--noise` times each dimension's standard deviation over the sample), with the real NLL and response lengths
   replicated alike. They are written as the Embedder's on-disk cache for exactly those records, so every selector
   runs unchanged and finds its embeddings there; each method's `select(records, seed)` is timed end to end. The
   GOT-D target set (`--targets` GSM8K test questions) gets synthetic embeddings the same way. `dedup` runs at
   `--dedup-threshold`; `dedup_all` at threshold 1.0, where nothing is a near-duplicate and every example is compared
   with every kept one (the worst case: mean-pooled hidden states are so alike that 0.95 drops most examples).
   DEALRec takes two per-example backward passes through the model, so it is not run at these sizes: its
   examples/s is measured on `--dealrec-sample` examples (with `--dealrec-lissa` LiSSA steps) and the time for each
   n is an extrapolation, labelled as such.

    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 FTUNE_DATA_DIR=../shared/data
    .venv/bin/python scripts/bench_select.py --out benchmarks/select.json --png benchmarks/select.png   # the full run
    .venv/bin/python scripts/bench_select.py --sizes 2000,4000 --embed-sample 32 --dealrec-sample 8      # a smoke test

The synthetic caches live in a temporary FTUNE_HOME that is deleted at the end; the model itself is resolved (and
the embedded GGUF converted, once) under the usual FTUNE_HOME.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

METHODS = ["random", "length", "dedup", "dedup_all", "kmq", "got_d", "dealrec"]


def gsm8k(split: str) -> list[dict]:
    from ftune.data.sources import read_jsonl

    root = os.environ.get("FTUNE_DATA_DIR")
    path = Path(root or "").expanduser() / "gsm8k" / f"{split}.jsonl"
    if not root or not path.is_file():
        sys.exit(f"needs $FTUNE_DATA_DIR/gsm8k/{split}.jsonl (FTUNE_DATA_DIR={root!r}); e.g. "
                 f"export FTUNE_DATA_DIR=../shared/data")
    return read_jsonl(path)


def conversations(rows: list[dict], n: int, prefix: str) -> list[dict]:
    """n distinct {id, messages} records: the rows cycled, each question given the suffix " (#i)"."""
    return [{"id": f"{prefix}-{i}",
             "messages": [{"role": "user", "content": f"{rows[i % len(rows)]['question']} (#{i})"},
                          {"role": "assistant", "content": rows[i % len(rows)]["answer"]}]}
            for i in range(n)]


def embed_for_real(a, model_dir: Path, rows: list[dict]) -> tuple[dict, dict]:
    """Part 1: the real embedding pass on the sample; returns (its result, the measurements)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftune.data.tokenize import tokenize_conversation
    from ftune.selection.embed import Embedder

    sample = [{"id": f"s-{i}", "messages": [{"role": "user", "content": r["question"]},
                                            {"role": "assistant", "content": r["answer"]}]}
              for i, r in enumerate(rows[: a.embed_sample])]
    emb = Embedder(str(model_dir), a.max_length, a.batch_size, progress=False)
    tok = emb.tokenizer()
    tokens = sum(min(len(tokenize_conversation(tok, r["messages"])[0]), a.max_length) for r in sample)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    load_s = time.perf_counter() - t
    del model
    t = time.perf_counter()
    out = emb._compute(sample)  # the Embedder's own pass (no cache read or write), model load included
    total_s = time.perf_counter() - t
    compute_s = max(total_s - load_s, 1e-9)
    m = {"examples": len(sample), "tokens": tokens, "seconds_total": total_s, "model_load_seconds": load_s,
         "examples_per_s": len(sample) / compute_s, "tokens_per_s": tokens / compute_s,
         "device": "cuda" if torch.cuda.is_available() else "cpu", "torch_threads": torch.get_num_threads()}
    return {"emb": out.emb, "nll": out.nll, "response_tokens": out.response_tokens}, m


def synthetic(base: dict, n: int, noise: float, seed: int) -> dict:
    """n embeddings: the real ones replicated (row i is sample row i mod s) plus seeded gaussian noise."""
    import torch

    s = len(base["emb"])
    rep = torch.arange(n) % s
    gen = torch.Generator().manual_seed(seed)
    sd = base["emb"].std(0) if s > 1 else base["emb"].abs().mean().expand(base["emb"].shape[1])
    emb = base["emb"][rep] + noise * sd * torch.randn(n, base["emb"].shape[1], generator=gen)
    return {"emb": emb.float(), "nll": base["nll"][rep].clone(),
            "response_tokens": base["response_tokens"][rep].clone()}


def write_cache(model_dir: Path, max_length: int, records: list[dict], data: dict) -> Path:
    import torch

    from ftune.selection.embed import Embedder

    path = Embedder(str(model_dir), max_length).cache_path(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return path


def selectors(a, model_dir: Path, target_path: Path) -> dict:
    from ftune.selection.dedup import Dedup
    from ftune.selection.got_d import GOTD
    from ftune.selection.kmq import KMQ
    from ftune.selection.length import LengthFilter
    from ftune.selection.random import RandomSelection

    enc = dict(encoder=str(model_dir), max_length=a.max_length, batch_size=a.batch_size, progress=False)
    return {"random": lambda: RandomSelection(budget=a.budget),
            "length": lambda: LengthFilter(min_length=1, unit="tokens", tokenizer=str(model_dir)),
            "dedup": lambda: Dedup(threshold=a.dedup_threshold, **enc),
            # threshold 1.0: nothing is a near-duplicate, every example is compared with every kept one (worst case)
            "dedup_all": lambda: Dedup(threshold=1.0, **enc),
            "kmq": lambda: KMQ(budget=a.budget, k=a.k, quality="perplexity", **enc),
            "got_d": lambda: GOTD(budget=a.budget, target_path=str(target_path), **enc)}


def run_select(sel, records: list[dict], seed: int) -> tuple[float, dict]:
    t = time.perf_counter()
    if hasattr(sel, "select"):
        report = sel.select(records, seed).report
    else:  # a plain `(records, seed) -> (kept, report)` selector (selection=random)
        report = sel(records, seed)[1]
    return time.perf_counter() - t, report


SUMMARY_KEYS = ("selected", "exact_duplicates", "near_duplicates", "k", "sinkhorn_iterations", "marginal_error",
                "too_short")


def dealrec_rate(a, model_dir: Path, records: list[dict]) -> dict:
    """DEALRec on a small sample, its time split into the per-example gradient passes (linear in n), the LiSSA
    Hessian-vector products (one per step) and the rest (model load, sampling)."""
    from ftune.selection.dealrec import DEALRec

    sample = records[: a.dealrec_sample]
    sel = DEALRec(budget=max(1, len(sample) // 2), surrogate=str(model_dir), lissa_steps=a.dealrec_lissa,
                  max_length=a.max_length, progress=False)
    spent = {"per_example_grads": 0.0, "hvp": 0.0}

    def timed(name):
        fn = getattr(sel, name)

        def wrapper(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                spent[name] += time.perf_counter() - t
        return wrapper

    sel.per_example_grads, sel.hvp = timed("per_example_grads"), timed("hvp")
    seconds, _ = run_select(sel, sample, a.seed)
    per_example = spent["per_example_grads"] / len(sample)
    per_step = spent["hvp"] / max(a.dealrec_lissa, 1)
    fixed = seconds - spent["per_example_grads"] - spent["hvp"]
    return {"examples": len(sample), "lissa_steps": a.dealrec_lissa, "seconds": seconds,
            "per_example_seconds": per_example, "lissa_step_seconds": per_step, "other_seconds": fixed,
            "examples_per_s": 1 / per_example, "lissa_steps_at_scale": a.dealrec_lissa_at_scale}


def dealrec_extrapolated(d: dict, n: int) -> float:
    return n * d["per_example_seconds"] + d["lissa_steps_at_scale"] * d["lissa_step_seconds"] + d["other_seconds"]


def table(results: dict, sizes: list[int], methods: list[str]) -> str:
    head = "| method | " + " | ".join(f"n={n:,}: s | n={n:,}: ex/s" for n in sizes) + " |"
    lines = [head, "|---|" + "---:|" * (2 * len(sizes))]
    for m in methods:
        cells = []
        for n in sizes:
            r = results.get(m, {}).get(str(n))
            if r is None:
                cells.append("-")
            else:
                mark = "~" if r.get("extrapolated") else ""
                rate = r["examples_per_s"]
                cells.append(f"{mark}{r['seconds']:,.1f} | {mark}{rate:,.0f}" if rate >= 100 else
                             f"{mark}{r['seconds']:,.1f} | {mark}{rate:.3g}")
        lines.append(f"| {m}{' (extrapolated)' if m == 'dealrec' else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, sizes: list[int], methods: list[str], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        pts = [(n, results[m][str(n)]["seconds"]) for n in sizes if str(n) in results.get(m, {})]
        if pts:
            ax.plot(*zip(*pts), marker="o", linestyle="--" if m == "dealrec" else "-",
                    label=m + (" (extrapolated)" if m == "dealrec" else ""))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("pool size (examples)")
    ax.set_ylabel("selection time (s), embeddings cached")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="10000,20000,50000,100000", help="pool sizes, comma-separated")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default {','.join(METHODS)})")
    p.add_argument("--model", default="smollm2_135m", help="embedding model: a model= config name or a name_or_path")
    p.add_argument("--embed-sample", type=int, default=256, help="GSM8K train examples embedded for real")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16, help="examples per embedding forward pass")
    p.add_argument("--noise", type=float, default=0.1, help="noise sd of the synthetic embeddings, per dimension sd")
    p.add_argument("--budget", type=int, default=1000)
    p.add_argument("--k", type=int, default=64, help="kmq clusters")
    p.add_argument("--dedup-threshold", type=float, default=0.95)
    p.add_argument("--targets", type=int, default=500, help="GOT-D target examples (GSM8K test)")
    p.add_argument("--dealrec-sample", type=int, default=64)
    p.add_argument("--dealrec-lissa", type=int, default=4, help="LiSSA steps in the DEALRec measurement")
    p.add_argument("--dealrec-lissa-at-scale", type=int, default=100,
                   help="LiSSA steps counted in the extrapolation (configs/selection/dealrec.yaml: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--png", type=Path, default=None, help="plot time vs pool size per method (log-log)")
    a = p.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")]
    methods = [m for m in a.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {METHODS}")

    import torch
    from omegaconf import OmegaConf

    from ftune.models.loading import resolve_model_dir
    from ftune.paths import configs_dir

    group = configs_dir() / "model" / f"{a.model}.yaml"  # a model= config name, or else a name_or_path
    name = OmegaConf.load(group).name_or_path if group.is_file() else a.model
    model_dir = resolve_model_dir(name)  # under the usual FTUNE_HOME (the embedded model converts once)
    train, test = gsm8k("train"), gsm8k("test")
    print(f"Embedding {a.embed_sample} GSM8K train examples with {name} ({model_dir}) for real ...", flush=True)
    base, embed_m = embed_for_real(a, model_dir, train)
    print(f"  {embed_m['examples_per_s']:.2f} examples/s, {embed_m['tokens_per_s']:.0f} tokens/s on "
          f"{embed_m['device']} ({embed_m['tokens']} tokens; model load {embed_m['model_load_seconds']:.1f} s, "
          f"not counted)", flush=True)
    for n in sizes:
        print(f"  extrapolated: embedding {n:,} such examples takes ~{n / embed_m['examples_per_s'] / 60:,.1f} min",
              flush=True)
    print(f"\nSelection timings use SYNTHETIC embeddings: the {a.embed_sample} real ones replicated, plus gaussian "
          f"noise ({a.noise} x each dimension's sd), seed {a.seed}; records are GSM8K train questions cycled, each "
          f"made distinct with a suffix ' (#i)'. The embedding pass itself is not in these times.\n", flush=True)

    results: dict = {m: {} for m in methods}
    old_home = os.environ.get("FTUNE_HOME")
    with tempfile.TemporaryDirectory(prefix="bench_select_") as home:
        os.environ["FTUNE_HOME"] = home  # the synthetic caches go here and are deleted with it
        try:
            targets_file = Path(home) / "targets.jsonl"
            targets_file.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n"
                                            for r in test[: a.targets]))
            if "got_d" in methods:
                from ftune.selection.got_d import load_targets

                target_recs = load_targets(str(targets_file))
                write_cache(model_dir, a.max_length, target_recs, synthetic(base, len(target_recs), a.noise,
                                                                           a.seed + 1))
            build = selectors(a, model_dir, targets_file)
            dealrec = None
            if "dealrec" in methods:
                print(f"dealrec: measuring on {a.dealrec_sample} examples ({a.dealrec_lissa} LiSSA steps) ...",
                      flush=True)
                dealrec = dealrec_rate(a, model_dir, conversations(train, a.dealrec_sample, "d"))
                print(f"  {dealrec['seconds']:.1f} s: {dealrec['per_example_seconds']:.2f} s per example (two "
                      f"gradient passes), {dealrec['lissa_step_seconds']:.2f} s per LiSSA step, "
                      f"{dealrec['other_seconds']:.1f} s other (model load ...); at scale: n x per example + "
                      f"{a.dealrec_lissa_at_scale} LiSSA steps + other", flush=True)
            for n in sizes:
                records = conversations(train, n, "train")
                write_cache(model_dir, a.max_length, records, synthetic(base, n, a.noise, a.seed))
                for m in methods:
                    if m == "dealrec":
                        t = dealrec_extrapolated(dealrec, n)
                        results[m][str(n)] = {"seconds": t, "examples_per_s": n / t, "extrapolated": True}
                        continue
                    seconds, report = run_select(build[m](), records, a.seed)
                    summary = {k: report[k] for k in SUMMARY_KEYS if k in report}
                    results[m][str(n)] = {"seconds": seconds, "examples_per_s": n / seconds, **summary}
                    print(f"n={n:>7,} {m:<9} {seconds:8.1f} s {n / seconds:12,.0f} examples/s  {summary}", flush=True)
        finally:
            if old_home is None:
                os.environ.pop("FTUNE_HOME", None)
            else:
                os.environ["FTUNE_HOME"] = old_home

    print("\nSelection time with embeddings cached (s | examples/s); dealrec (~) is an extrapolation from "
          f"{a.dealrec_sample} examples (it computes no embeddings: its time is all model passes):\n")
    print(table(results, sizes, methods))
    if len(sizes) > 1:
        print(f"\nGrowth from n={sizes[0]:,} to n={sizes[-1]:,} ({sizes[-1] / sizes[0]:.0f}x the examples):")
        for m in methods:
            r = results.get(m, {})
            if str(sizes[0]) in r and str(sizes[-1]) in r and m != "dealrec":
                print(f"  {m:<9} {r[str(sizes[-1])]['seconds'] / r[str(sizes[0])]['seconds']:6.1f}x the time")
    out = {"embedding": embed_m, "selection": results, "sizes": sizes,
           "synthetic_embeddings": {"replicated_from": a.embed_sample, "noise_sd_fraction": a.noise, "seed": a.seed},
           "dealrec_measurement": dealrec, "args": {k: str(v) for k, v in vars(a).items()},
           "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                       "cuda": torch.cuda.is_available()}}
    if a.out:
        a.out.write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nWrote {a.out}")
    if a.png:
        plot(results, sizes, methods, a.png)
        print(f"Wrote {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
