#!/usr/bin/env python
"""PEFT methods side by side on one model and data: trainable parameters, optimizer-state bytes, peak RSS, tokens/s.

Each method trains in its own child process (`--child`), through ftune's own Trainer with the same model, data,
steps, batch, precision and seed; only `peft=` differs. The child reports what it holds after training: trainable
parameters, the optimizer state's bytes (every tensor in `optimizer.state`, e.g. AdamW's two moments; LIFT's masked
AdamW keeps them only for its selected entries), and ftune's own steady tokens/s; the parent adds the child's peak
RSS (`ru_maxrss` from wait4, that process alone).

    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 FTUNE_DATA_DIR=../shared/data
    .venv/bin/python scripts/bench_peft.py --out benchmarks/peft.json                    # every method, ~20 min
    .venv/bin/python scripts/bench_peft.py --methods lora,lift --rank 16                 # LIFT vs LoRA, same budget
    .venv/bin/python scripts/bench_peft.py --model tiny_random --steps 2 --methods lora   # a smoke test

LoRA, DoRA and LIFT get the same rank (`--rank`): LIFT's k = (m + n) r entries per matrix is the parameter count
of a rank-r LoRA, so the two train the same number of parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = ["none", "lora", "dora", "ia3", "prompt_tuning", "lift", "hft", "ssf", "adalink"]


def method_overrides(method: str, rank: int) -> list[str]:
    extra = {"lora": [f"peft.r={rank}", f"peft.alpha={2 * rank}"],
             "dora": [f"peft.r={rank}", f"peft.alpha={2 * rank}"],
             "lift": [f"peft.rank={rank}", f"peft.filter_rank={rank}"]}
    return [f"peft={method}", *extra.get(method, [])]


def overrides(a, method: str, out: Path) -> list[str]:
    packing = "false" if method == "prompt_tuning" else "true"  # prompt tuning cannot pack
    return [f"model={a.model}", "data=gsm8k", f"data.limit={a.examples}", "data.eval_size=0",
            f"data.max_length={a.seq_len}", f"data.packing={packing}", *method_overrides(method, a.rank),
            f"trainer.max_steps={a.steps}", f"trainer.batch_size={a.batch_size}", "trainer.grad_accum=1",
            f"trainer.mixed_precision={a.precision}", "trainer.save_every=0", "trainer.eval_every=0",
            "trainer.log_every=1", "trainer.progress=false", "eval=none", "seed=42", f"output_dir={out}"]


def child(a) -> None:
    """In the child process: train one method and write what it holds."""
    import torch
    from hydra import compose, initialize_config_dir

    from ftune.config import register_configs
    from ftune.paths import configs_dir
    from ftune.train import Trainer

    register_configs()
    with initialize_config_dir(config_dir=str(configs_dir()), version_base="1.3"):
        cfg = compose("train", overrides=json.loads(a.child))
    trainer = Trainer(cfg)
    summary = trainer.run()
    params = list(trainer.model.parameters())
    state_bytes = sum(t.numel() * t.element_size() for s in trainer.optimizer.state_dict()["state"].values()
                      for t in s.values() if torch.is_tensor(t))
    state = trainer.optimizer.state_dict()["state"].values()
    # Entries the optimizer updates: LIFT's masked AdamW keeps the indices of its principal weights ("idx"); every
    # other method updates each trainable parameter whole.
    masked = sum(s["idx"].numel() for s in state if "idx" in s)
    records = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    Path(a.child_out).write_text(json.dumps({
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "total_params": sum(p.numel() for p in params), "optimizer_state_bytes": state_bytes,
        "updated_entries": masked or sum(p.numel() for p in params if p.requires_grad),
        "tokens_per_s": summary["tokens_per_s"], "final_loss": summary["final_loss"],
        "tokens_per_s_last": rates[-1] if rates else None, "train_tokens": summary["train_tokens"]}))


def run_method(a, method: str, work: Path) -> dict:
    out = work / method
    res_file = work / f"{method}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(overrides(a, method, out)),
           "--child-out", str(res_file)]
    print(f"[bench-peft] {method}: ftune train {' '.join(overrides(a, method, out)[:-1])}", flush=True)
    t0 = time.perf_counter()
    with open(work / f"{method}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    res = {"method": method, "exit_code": os.waitstatus_to_exitcode(status), "peak_rss_mib": usage.ru_maxrss / 1024,
           "wall_s": time.perf_counter() - t0}
    if res["exit_code"] != 0:
        res["error"] = "\n".join((work / f"{method}.log").read_text(errors="replace").splitlines()[-8:])
        print(f"[bench-peft]   failed:\n{res['error']}", flush=True)
        return res
    res.update(json.loads(res_file.read_text()))
    print(f"[bench-peft]   -> {res['updated_entries']:,} entries updated, optimizer state "
          f"{res['optimizer_state_bytes'] / 2**20:.1f} MiB, peak RSS {res['peak_rss_mib']:,.0f} MiB, "
          f"{res['tokens_per_s']:.0f} tok/s", flush=True)
    return res


def table(results: list[dict], a) -> str:
    cols = ["method", "params with grad", "entries updated", "% of model", "optimizer state MiB", "peak RSS MiB",
            "tokens/s", "final loss"]
    rows = []
    for r in results:
        if r["exit_code"] != 0:
            rows.append([r["method"], "failed", "", "", "", "", "", ""])
            continue
        share = 100 * r["updated_entries"] / r["total_params"]
        rows.append([r["method"], f"{r['trainable_params']:,}", f"{r['updated_entries']:,}", f"{share:.2f}",
                     f"{r['optimizer_state_bytes'] / 2**20:.1f}", f"{r['peak_rss_mib']:,.0f}",
                     f"{r['tokens_per_s']:.0f}", f"{r['final_loss']:.3f}"])
    widths = [max(len(c), *(len(x[i]) for x in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(f"{c:>{w}}" for c, w in zip(cols, widths))]
    lines += ["  ".join(f"{x:>{w}}" for x, w in zip(row, widths)) for row in rows]
    lines.append(f"model={a.model}, first {a.examples} GSM8K train examples packed to {a.seq_len} tokens (prompt "
                 f"tuning unpacked), batch {a.batch_size}, {a.steps} steps, {a.precision}, rank {a.rank} for "
                 f"LoRA/DoRA/LIFT; tokens/s = ftune's whole-run rate (summary.json), first step included.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default {','.join(METHODS)})")
    p.add_argument("--model", default="smollm2_135m")
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--precision", choices=("bf16", "no"), default="bf16")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON (and the table beside it)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in methods if not (REPO / "configs" / "peft" / f"{m}.yaml").is_file()]
    if unknown:
        p.error(f"unknown method(s) {unknown}; configs/peft has "
                f"{sorted(x.stem for x in (REPO / 'configs' / 'peft').glob('*.yaml'))}")
    work = Path(tempfile.mkdtemp(prefix="bench_peft."))
    results = [run_method(a, m, work) for m in methods]
    text = table(results, a)
    print("\n" + text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"args": {k: v for k, v in vars(a).items() if k != "out"}, "results": results,
                                     "table": text}, indent=2))
        print(f"[bench-peft] results: {a.out}")
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
