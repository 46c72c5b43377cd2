#!/usr/bin/env python
"""SFT vs a method at the same budget: GSM8K accuracy and held-out loss, side by side, whatever the direction.

Every run is the real CLI (`ftune train ...` in a subprocess) with the same model, LoRA, data subset, steps, batch,
learning rate and seed; only `objective=` (and the method's own overrides) differ. The base model's accuracy is
measured once, in the SFT run (eval.at_start). Held-out loss is the token cross-entropy on the gold answers of the
same held-out examples for every SFT-data objective (for Masked Thought on clean inputs; for S3FT on the gold, not
the rebuilt answers), so it is comparable across rows.

    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 FTUNE_DATA_DIR=../shared/data
    .venv/bin/python scripts/compare.py --method masked_thought --out benchmarks/compare_mft.md
    .venv/bin/python scripts/compare.py --method s3ft --method-arg objective.judge=numeric_match
    .venv/bin/python scripts/compare.py --method masked_thought --steps 2 --examples 40 --eval-n 4   # smoke test

A 135M model moves little in a CPU-sized budget; read small differences (a few examples out of the test subset) as
noise: the table prints the test size, and a 95% interval for each accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", help="objective to compare with SFT (e.g. masked_thought, s3ft)")
    p.add_argument("--arm", action="append", default=[], metavar="'NAME: KEY=VALUE ...'",
                   help="instead of SFT vs --method: a run named NAME with these overrides (repeatable; the first\n"
                        "arm also scores the base model), e.g. --arm 'random: selection=random selection.budget=200'")
    p.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for the method's run only (repeatable), e.g. objective.rate=0.2")
    p.add_argument("--model", default="smollm2_135m", help="model config (default smollm2_135m)")
    p.add_argument("--examples", type=int, default=400, help="first N GSM8K train examples (default 400)")
    p.add_argument("--heldout", type=int, default=32, help="of those, held out for the loss (default 32)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps for every run (default 60)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-n", type=int, default=100, help="GSM8K test examples scored (default 100)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--skip-base", action="store_true",
                   help="do not score the base model before training (e.g. known from an earlier comparison)")
    p.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every run (repeatable)")
    p.add_argument("--work", type=Path, default=None,
                   help="keep the runs here (default: a temporary directory); a run already finished there with the\n"
                        "same overrides (e.g. the SFT baseline of an earlier comparison) is reused, not retrained")
    p.add_argument("--out", type=Path, default=None, help="write the table (markdown) and the JSON beside it")
    return p.parse_args(argv)


def common_overrides(a) -> list[str]:
    return [f"model={a.model}", "peft=lora", "data=gsm8k", f"data.limit={a.examples}", f"data.eval_size={a.heldout}",
            "data.max_length=512", "data.packing=true", "eval=gsm8k", "eval.split=test", f"eval.limit={a.eval_n}",
            f"eval.max_new_tokens={a.max_new_tokens}", "eval.at_end=true", f"trainer.max_steps={a.steps}",
            f"trainer.batch_size={a.batch_size}", f"trainer.grad_accum={a.grad_accum}", f"trainer.lr={a.lr}",
            "trainer.mixed_precision=bf16", "trainer.save_every=0", "trainer.eval_every=0", "trainer.progress=false",
            f"seed={a.seed}", *a.extra]


def run(name: str, overrides: list[str], out: Path) -> dict:
    exe = Path(sys.executable).parent / "ftune"
    cmd = [str(exe), "train"] if exe.exists() else [sys.executable, "-m", "ftune.cli", "train"]
    cmd += [*overrides, f"output_dir={out}"]
    done = out / "compare_run.json"
    if done.exists() and json.loads(done.read_text()).get("command") == "ftune train " + " ".join(overrides):
        # The same run (same overrides) already finished in this --work directory: reuse it rather than train again.
        res = json.loads(done.read_text())
        print(f"[compare] {name}: reusing {out} (same command)", flush=True)
        return res
    print(f"[compare] {name}: ftune train {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    with open(out.parent / f"{name}.log", "w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    wall = time.perf_counter() - t0
    if code != 0:
        tail = (out.parent / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"[compare] {name} failed (exit {code}):\n" + "\n".join(tail))
    s = json.loads((out / "summary.json").read_text())
    res = {"name": name, "wall_s": wall, "train_s": s["train_seconds"], "steps": s["steps"],
           "final_train_loss": s["final_loss"], "heldout_loss": (s.get("eval") or {}).get("eval_loss"),
           "acc_start": (s.get("task_start") or {}).get("accuracy"), "acc_end": s["task_end"]["accuracy"],
           "n": s["task_end"]["n"], "command": "ftune train " + " ".join(overrides)}
    if s.get("composition"):
        res["composition"] = s["composition"]
    done.write_text(json.dumps(res, indent=2))
    print(f"[compare]   -> accuracy {res['acc_end']:.3f} (n={res['n']}), held-out loss {res['heldout_loss']}, "
          f"{wall:.0f}s", flush=True)
    return res


def wilson(p: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion p of n (ftune.eval.stats.wilson takes the count)."""
    from ftune.eval.stats import wilson as wilson_count

    return wilson_count(p * n, n)


def table(results: list[dict], a) -> str:
    base = results[0].get("acc_start")
    lines = ["| run | GSM8K test accuracy (95% CI) | held-out loss | final train loss | train s |",
             "|---|---:|---:|---:|---:|"]
    if base is not None:
        lo, hi = wilson(base, results[0]["n"])
        lines.append(f"| base model (before training) | {base:.3f} ({lo:.2f}-{hi:.2f}) | - | - | - |")
    for r in results:
        lo, hi = wilson(r["acc_end"], r["n"])
        held = "-" if r["heldout_loss"] is None else f"{r['heldout_loss']:.4f}"
        lines.append(f"| {r['name']} | {r['acc_end']:.3f} ({lo:.2f}-{hi:.2f}) | {held} | "
                     f"{r['final_train_loss']:.4f} | {r['train_s']:.0f} |")
    lines.append("")
    lines.append(f"Same budget for every run: {a.steps} steps x {a.batch_size} x {a.grad_accum} packed rows of <= 512 "
                 f"tokens from the first {a.examples} GSM8K train examples ({a.heldout} held out for the loss), "
                 f"LoRA, lr {a.lr}, seed {a.seed}, model={a.model}; GSM8K test: first {a.eval_n} problems, greedy, "
                 f"{a.max_new_tokens} new tokens.")
    for r in results:
        if r.get("composition"):
            lines.append(f"{r['name']} training data: {json.dumps(r['composition'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    work = a.work or Path(tempfile.mkdtemp(prefix="ftune_compare."))
    work.mkdir(parents=True, exist_ok=True)
    common = common_overrides(a)
    if a.arm:
        arms = [(name.strip(), shlex.split(rest)) for name, _, rest in (x.partition(":") for x in a.arm)]
        bad = [x for x, (name, _) in zip(a.arm, arms) if not name or ":" not in x]
        if bad or len({n for n, _ in arms}) != len(arms):
            raise SystemExit(f"--arm takes 'NAME: KEY=VALUE ...' with distinct names; got {bad or a.arm}")
        title = " vs ".join(n for n, _ in arms)
    elif a.method:
        arms = [("sft", ["objective=sft"]), (a.method, [f"objective={a.method}", *a.method_arg])]
        title = f"SFT vs {a.method}"
    else:
        raise SystemExit("give --method OBJECTIVE (SFT vs it), or two or more --arm 'NAME: overrides'")
    base = [] if a.skip_base else ["eval.at_start=true"]
    results = [run(name, [*common, *extra, *(base if i == 0 else [])], work / name)
               for i, (name, extra) in enumerate(arms)]
    text = table(results, a)
    print("\n" + text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        cmd = shlex.join(["python", "scripts/compare.py", *(argv or sys.argv[1:])])
        a.out.write_text(f"# {title}\n\n    {cmd}\n\n"
                         + text + "\n")
        a.out.with_suffix(".json").write_text(json.dumps({"args": vars(a) | {"work": str(work), "out": str(a.out)},
                                                          "results": results}, indent=2))
        print(f"[compare] wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
