#!/usr/bin/env python
"""ftune vs TRL (SFTTrainer, or DPOTrainer with --objective dpo): useful tokens/s, peak RSS and model-FLOPs
utilisation, in one run on one machine.

Both sides train the same model (SmolLM2-135M-Instruct, ftune's embedded copy), on the same data (the first N GSM8K
train examples as chat conversations user=question / assistant=answer, loss on the answer only), with the same LoRA
(r=16, alpha=32, dropout 0.05, all linear layers), max length, per-step batch, optimizer steps, lr schedule, seed and
precision (bf16 autocast when the CPU supports it, else fp32).

* ftune is the real CLI: `ftune train ...` in a subprocess. metrics.jsonl has one record per step with the
  *cumulative* tokens_per_s only; the per-step token counts are rebuilt with ftune's own pipeline (data.pipeline.prepare
  + batching.BatchOrder, same config and seed) and checked against summary.json's train_tokens, which gives the
  cumulative training time after every step (tokens_seen_k / tokens_per_s_k) and so the steady-state rate. If ftune
  ever logs `step_tokens` and `step_seconds` per record, those are used instead.
* TRL runs in a second subprocess (this script with `--child trl`): SFTTrainer + SFTConfig + peft LoraConfig, on a
  conversational prompt-completion dataset with `completion_only_loss=True`; real tokens are counted in
  `training_step`, steps are timed between `on_step_end` callbacks.
* Each side runs in its own child process; its peak RSS is that child's alone (the largest single process of its
  tree): `ru_maxrss` from `os.wait4`, or, where that is only this process's own peak carried over the spawn (Linux
  does), the VmHWM polled from /proc while the child ran (see peak_rss).
* Useful tokens = real (non-padding) tokens of the examples actually trained on, summed over the steps after the
  first `--warmup-steps` steps, divided by the wall time of those steps. Also reported: the same tokens per CPU-second
  of the child, and the CPU the rest of the machine used meanwhile (from /proc/stat), to judge noise.
* MFU = useful tokens/s x FLOPs per token / matmul peak (torch.matmul 2048x2048, best of 5, measured at start and at
  end, in the precision the run computes in). FLOPs per token: 6*N for full fine-tuning; for LoRA
  4*N_base + 6*N_lora (forward 2N, backward activation gradients 2N; the frozen base gets no weight gradients).
* `--objective dpo`: DPO (sigmoid loss, beta 0.1) with the same LoRA on Anthropic HH-RLHF harmless-base pairs (the
  first N records of $FTUNE_DATA_DIR/hh-rlhf-harmless/test.jsonl.gz, parsed by ftune: shared prompt + two final
  answers). TRL's DPOTrainer gets exactly the pairs ftune trains on, in ftune's order, as conversational
  {prompt, chosen, rejected} records. Both take the reference log-probs from the same model with the adapter
  disabled (no precomputation), chosen and rejected in one forward. Useful tokens = real tokens of both sequences of
  each pair (prompt + chosen, prompt + rejected). FLOPs per useful token: 6*N_base + 6*N_lora (the policy's
  4*N_base + 6*N_lora plus the reference's 2*N_base forward). No packing (neither tool packs preference pairs).
* `--peft full`: full fine-tuning instead of LoRA (ftune `peft=none`, TRL without a peft_config), learning rate
  2e-5 on both sides unless --lr says otherwise; 6N FLOPs per token (8N for DPO: the reference is a frozen copy).
* `--model llama_1b_random` (or llama_3b_random, llama_8b_random, llama_tiny_random for a CPU smoke test):
  a random-initialised model of that real architecture (scripts/bench/models.py), built once, nothing downloaded.
* `--device cuda` (default: cuda when there is one): the matmul peak is measured on the GPU, TRL trains on the GPU,
  and peak memory is each child's GPU memory as nvidia-smi reports it (sampled every ~0.3 s) besides its RSS.
* `--nproc N` runs ftune as `ftune train --nproc N` (data-parallel: NCCL on GPUs, gloo on CPU); the batch size is
  per process, so a step trains N times the rows. Peak RSS is then the largest single process's.

    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 FTUNE_DATA_DIR=/work/shared/data
    .venv/bin/python scripts/bench_train.py --wait-idle 180 --out /tmp/bench.json       # ~15 min on 2 cores
    .venv/bin/python scripts/bench_train.py --steps 4 --examples 40 --only ftune        # a quick smoke test
    .venv/bin/python scripts/bench_train.py --objective dpo --wait-idle 180                # ftune DPO vs DPOTrainer
"""


from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))  # scripts/bench/: the parts of this benchmark
from bench import trl_side  # noqa: E402,F401 - tests replace its run_child
from bench.ftune_side import attention_context, bench_ftune, ftune_data, ftune_overrides  # noqa: E402
from bench.machine import cpu_name, matmul_peak, model_matmul_shapes, param_counts, shape_matmul_rate, wait_for_idle  # noqa: E402
from bench.report import flops_per_token, report  # noqa: E402
from bench.settings import (  # noqa: E402
    BUSY_CORES,
    DATA_FILE,
    FULL_LR,
    LORA,
    LR,
    REPEAT_KEYS,
    SEED,
    bench_model_dir,
    bf16_supported,
    child_env,
    find_data_dir,
    pick_device,
    random_archs,
)
from bench.trl_side import bench_trl, trl_child  # noqa: E402


# ------------------------------------------------------------------------------------------------------- helpers
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--objective", choices=("sft", "dpo"), default="sft",
                   help="sft (vs SFTTrainer, GSM8K) or dpo (vs DPOTrainer, HH-RLHF pairs) (default sft)")
    p.add_argument("--examples", type=int, default=400,
                   help="first N GSM8K train examples, or HH-RLHF records with --objective dpo (default 400)")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per run (default 24)")
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of tokens/s (default 2)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="bf16 autocast (falls back to fp32 when the CPU lacks bf16) or fp32 (default bf16)")
    p.add_argument("--seq-len", type=int, default=512, help="max length / packed row length (default 512)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per optimizer step (default 4)")
    p.add_argument("--only", choices=("ftune", "trl", "both"), default="both")
    p.add_argument("--peft", choices=("lora", "full"), default="lora",
                   help="lora (r 16 on all linear layers) or full fine-tuning (default lora)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate for both sides (default {LR} with LoRA, {FULL_LR} for full fine-tuning)")
    p.add_argument("--model", default="smollm2_135m",
                   help="smollm2_135m (ftune's embedded SmolLM2-135M-Instruct) or a random-initialised architecture:\n"
                        "llama_1b_random, llama_3b_random, llama_8b_random, llama_tiny_random (default smollm2_135m)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where both sides train (default auto: cuda when available)")
    p.add_argument("--nproc", type=int, default=1, help="ftune data-parallel processes (`ftune train --nproc N`)")
    p.add_argument("--truncation", choices=("drop", "truncate"), default="drop",
                   help="ftune's data.truncation for examples longer than --seq-len: drop (ftune's default) or\n"
                        "truncate (what TRL does); short --seq-len values need truncate (default drop)")
    p.add_argument("--packing", choices=("off", "on", "both"), default=None,
                   help="packing off (padded rows), on (rows packed to --seq-len), or both (default: both for sft,\n"
                        "off for dpo)")
    p.add_argument("--group-by-length", action="store_true",
                   help="padded runs: ftune's data.group_by_length=true (rows of similar length per batch); TRL gets\n"
                        "the same batches, as always")
    p.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="directory with gsm8k/train.jsonl (default $FTUNE_DATA_DIR, else ../shared/data)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="S",
                   help="before each run, wait up to S seconds for the CPU to be >=85%% idle (default 0: don't wait)")
    p.add_argument("--retry-busy", type=int, default=0, metavar="N",
                   help=f"run a measurement again (up to N times) when other processes used more than {BUSY_CORES} "
                        f"cores on average during it (default 0)")
    p.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="measure each tool N times, in ABBA order (ftune, TRL, TRL, ftune, ...); the table gives the\n"
                        "median tokens/s, the largest peak memory and each run's ratio to TRL (default 1)")
    p.add_argument("--ftune-override", action="append", default=[], metavar="KEY=VALUE",
                   help="one more ftune override for every ftune run (repeatable), e.g. trainer.cpu_malloc=system\n"
                        "(ftune's glibc defaults) or trainer.compile=true")
    p.add_argument("--trl-malloc", choices=("system", "reuse"), default="system",
                   help="TRL's process runs with glibc's malloc defaults (system, as TRL's users run it) or with the\n"
                        "thresholds ftune's trainer.cpu_malloc=reuse sets, through GLIBC_TUNABLES (reuse)")
    p.add_argument("--keep", action="store_true", help="keep the runs' temporary output directories")
    p.add_argument("--child", choices=("trl",), help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-packing", choices=("on", "off"), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-device", choices=("cpu", "cuda"), default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--order-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--pairs-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--random-order", action="store_true",
                   help="without packing, let TRL draw its own random batches instead of ftune's (default: TRL\n"
                        "trains on exactly ftune's examples in ftune's order, so both see the same batches)")
    a = p.parse_args(argv)
    if a.packing is None:
        a.packing = "off" if a.objective == "dpo" else "both"
    if a.objective == "dpo" and a.packing != "off":
        p.error("--objective dpo runs without packing (neither ftune nor TRL packs preference pairs).")
    if a.steps <= a.warmup_steps:
        p.error(f"--steps ({a.steps}) must exceed --warmup-steps ({a.warmup_steps}).")
    if a.examples < a.batch_size:
        p.error("--examples must be at least --batch-size.")
    if a.repeats < 1:
        p.error(f"--repeats ({a.repeats}) must be at least 1.")
    if a.model != "smollm2_135m" and a.model not in random_archs():
        p.error(f"--model {a.model}: choose smollm2_135m or one of {', '.join(random_archs())}.")
    if a.nproc < 1:
        p.error("--nproc must be at least 1.")
    if a.lr is None:
        a.lr = FULL_LR if a.peft == "full" else LR
    return a


def measure(a, fw: str, packing: bool, precision: str, env: dict, work: Path, model_dir: Path, rep: int = 0) -> dict:
    """One measured run of one tool, run again (up to --retry-busy times) while other processes disturbed it."""
    discarded = []
    for attempt in range(a.retry_busy + 1):
        waited = wait_for_idle(a.wait_idle) if a.wait_idle > 0 else 0.0
        load = os.getloadavg()[0]
        run_dir = work / f"rep{rep}-try{attempt}"
        run_dir.mkdir(exist_ok=True)
        r = (bench_ftune(a, packing, precision, env, run_dir) if fw == "ftune"
             else bench_trl(a, packing, precision, env, run_dir, model_dir))
        r.update(load_1min_before=load, load_1min_after=os.getloadavg()[0], waited_for_idle_s=waited)
        if r.get("tokens_per_s"):
            gpu_mem = f", peak GPU {r['peak_gpu_mib']:.0f} MiB" if r.get("peak_gpu_mib") else ""
            print(f"[bench]   -> {r['tokens_per_s']:.1f} useful tok/s, peak RSS {r['peak_rss_mib']:.0f} "
                  f"MiB{gpu_mem}, {r['process_wall_s']:.0f}s; other processes used "
                  f"{r['other_cpu_cores']:.2f} cores meanwhile", flush=True)
        busy = r.get("other_cpu_cores", 0) > BUSY_CORES and r.get("exit_code") == 0
        if not busy or attempt == a.retry_busy:
            break
        print(f"[bench]   machine was busy during this run; running it again "
              f"({attempt + 1}/{a.retry_busy})", flush=True)
        discarded.append({k: r.get(k) for k in ("tokens_per_s", "peak_rss_mib", "other_cpu_cores")})
    r["discarded_busy_attempts"] = discarded
    return r


def measure_all(a, packings: list[bool], frameworks: list[str], precision: str, env: dict, work: Path,
                model_dir: Path) -> list[dict]:
    """Every tool at every packing setting, --repeats times each in ABBA order (ftune, TRL, TRL, ftune, ...), so that
    a drift of the machine's speed during the run slows both tools alike; one combined result per tool and setting."""
    results = []
    for packing in packings:
        runs = {fw: [] for fw in frameworks}
        for rep in range(a.repeats):
            for fw in (frameworks if rep % 2 == 0 else frameworks[::-1]):
                runs[fw].append(measure(a, fw, packing, precision, env, work, model_dir, rep))
        results += [combine_repeats(runs[fw]) for fw in frameworks]
    return results


def combine_repeats(runs: list[dict]) -> dict:
    """One result from --repeats runs of the same tool and setting: the median tokens/s (and per CPU-second), the
    largest peak memory, every run's figures kept (`repeats`). A failed run makes the result that failure."""
    if len(runs) == 1:
        return runs[0]
    if failed := [r for r in runs if r.get("exit_code") != 0 or not r.get("tokens_per_s")]:
        return {**failed[0], "repeats": [{k: r.get(k) for k in REPEAT_KEYS} for r in runs]}
    med = statistics.median(r["tokens_per_s"] for r in runs)
    out = dict(min(runs, key=lambda r: abs(r["tokens_per_s"] - med)))  # the run nearest the median for the rest
    out["tokens_per_s"] = med
    if all(r.get("tokens_per_cpu_s") for r in runs):
        out["tokens_per_cpu_s"] = statistics.median(r["tokens_per_cpu_s"] for r in runs)
    if any(r.get("peak_gpu_mib") is not None for r in runs):
        out["peak_gpu_mib"] = max(r["peak_gpu_mib"] for r in runs if r.get("peak_gpu_mib") is not None)
    top = max(runs, key=lambda r: r.get("peak_rss_mib") or 0)
    out["peak_rss_mib"], out["peak_rss_note"] = top.get("peak_rss_mib"), top.get("peak_rss_note")
    out["repeats"] = [{k: r.get(k) for k in REPEAT_KEYS} for r in runs]
    return out


def main(argv=None) -> int:
    import signal

    a = parse_args(argv)
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C: the running child is killed and the temporary runs removed.
    def _interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _interrupt)
    if a.child == "trl":
        trl_child(a)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    data_dir = find_data_dir(a.data_dir, a.objective)
    env = child_env(data_dir)
    os.environ["FTUNE_DATA_DIR"] = str(data_dir)
    import torch

    a.device = pick_device(a.device)
    if a.device == "cpu" and torch.cuda.is_available():
        env["CUDA_VISIBLE_DEVICES"] = ""  # both children on the CPU although there is a GPU
    precision = a.precision
    fallback = None
    if precision == "bf16" and a.device == "cpu" and not bf16_supported():
        precision, fallback = "fp32", "this CPU has no bf16 support; ran in fp32"
        print(f"[bench] {fallback}", flush=True)
    model_dir = a.model_dir = bench_model_dir(a.model)
    load_before = os.getloadavg()
    print(f"[bench] load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}", flush=True)
    print(f"[bench] measuring the matmul peak on {a.device} ...", flush=True)
    matmul_n = 8192 if a.device == "cuda" else 2048  # a GPU needs a large matmul to reach its peak
    peak = matmul_peak(matmul_n, device=a.device)
    params = param_counts(model_dir)
    # The same examples for both tools, so the same context (from ftune's tokenization, unpacked).
    context = attention_context(ftune_data(ftune_overrides(a, False, precision, Path(os.devnull)))[1].train)
    fpt, formula = flops_per_token(params, a.objective, a.peft, context)
    rows = a.seq_len * a.batch_size
    print(f"[bench] measuring the matmul rate at the model's own shapes ({rows} rows) ...", flush=True)
    shape_rate = shape_matmul_rate(model_matmul_shapes(model_dir, rows, a.peft), a.device, dtypes=(precision,))
    packings = {"off": [False], "on": [True], "both": [False, True]}[a.packing]
    frameworks = {"ftune": ["ftune"], "trl": ["trl"], "both": ["ftune", "trl"]}[a.only]
    work = Path(tempfile.mkdtemp(prefix="bench_train."))
    try:
        results = measure_all(a, packings, frameworks, precision, env, work, model_dir)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    print("[bench] measuring the matmul peak again ...", flush=True)
    peak_end = matmul_peak(matmul_n, device=a.device)
    peak_runs = {"start": peak, "end": peak_end}
    peak = {k: max(peak[k], peak_end[k]) for k in peak}

    import peft
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    meta = {"objective": a.objective, "examples": a.examples, "steps": a.steps, "warmup_steps": a.warmup_steps,
            "precision": precision,
            "precision_requested": a.precision, "precision_note": fallback, "seq_len": a.seq_len,
            "batch_size": a.batch_size, "peft": a.peft, "lora": LORA if a.peft == "lora" else None, "lr": a.lr,
            "seed": SEED, "model": a.model, "model_dir": str(model_dir), "device": a.device, "nproc": a.nproc,
            "gpu": torch.cuda.get_device_name(0) if a.device == "cuda" else None,
            "data": str(data_dir / DATA_FILE[a.objective]), "params": params,
            "attention_context": context, "flops_per_token": fpt,
            "flops_formula": formula, "matmul_peak_gflops": peak, "matmul_peak_runs": peak_runs, "matmul_n": matmul_n,
            "shape_matmul_gflops": shape_rate, "shape_matmul_rows": rows,
            "matmul_repeats": 5,
            "torch_threads": torch.get_num_threads(), "cpu": cpu_name(),
            "load_avg_before": load_before, "load_avg_after": load_after, "work_dir": str(work) if a.keep else None,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                         "trl": trl_version, "python": platform.python_version()}}
    text = report(results, meta)
    print("\n" + text)
    print(f"\n[bench] load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"meta": meta, "results": results, "table": text}, indent=2))
        print(f"[bench] results: {a.out}")
    return 0 if all(r.get("exit_code") == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
