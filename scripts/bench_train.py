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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))  # scripts/bench/models.py: the random-initialised architectures
SEED = 42
LORA = dict(r=16, alpha=32, dropout=0.05, target_modules="all-linear")
# Shared optimisation settings (ftune's defaults; TRL is given the same).
LR, WEIGHT_DECAY, MAX_GRAD_NORM, WARMUP_RATIO = 2.0e-4, 0.0, 1.0, 0.03
FULL_LR = 2.0e-5  # full fine-tuning: every weight moves, so a LoRA learning rate would be too large
DPO_BETA = 0.1
# The speed targets: ftune's tokens/s at least this multiple of TRL's, at no more peak memory.
TARGET = {"sft": 1.5, "dpo": 1.3}
GPU_TARGET = 1.3  # on a GPU: ftune at least 1.3x TRL's tokens/s (and, for the suite, >= 45% MFU)
# --trl-malloc reuse: glibc's mmap and trim thresholds as ftune's trainer.cpu_malloc=reuse sets them with mallopt.
TRL_REUSE_TUNABLES = "glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=2147483647"
DATA_FILE = {"sft": Path("gsm8k") / "train.jsonl", "dpo": Path("hh-rlhf-harmless") / "test.jsonl.gz"}
IGNORE = -100
REPEAT_KEYS = ("tokens_per_s", "tokens_per_cpu_s", "peak_rss_mib", "peak_gpu_mib", "other_cpu_cores", "exit_code")
BUSY_CORES = 0.25  # other processes' average CPU use (cores) above which a measurement counts as disturbed


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


def random_archs() -> list[str]:
    from bench.models import ARCHS

    return list(ARCHS)


def pick_device(requested: str) -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_train: --device cuda but torch sees no GPU.")
    return requested if requested != "auto" else "cuda" if torch.cuda.is_available() else "cpu"


def bench_model_dir(name: str) -> Path:
    """The local directory of --model: ftune's embedded SmolLM2, or a random architecture built once."""
    if name == "smollm2_135m":
        from ftune.models.loading import EMBEDDED_SMOLLM2, resolve_model_dir

        return resolve_model_dir(EMBEDDED_SMOLLM2)
    from bench.models import model_dir

    return model_dir(name)


def child_env(data_dir: Path) -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env["FTUNE_DATA_DIR"] = str(data_dir)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def find_data_dir(arg: Path | None, objective: str = "sft") -> Path:
    candidates = [arg] if arg else [Path(os.environ["FTUNE_DATA_DIR"])] if os.environ.get("FTUNE_DATA_DIR") else []
    candidates = candidates or [REPO.parent / "shared" / "data"]
    for c in candidates:
        if (c.expanduser() / DATA_FILE[objective]).is_file():
            return c.expanduser().resolve()
    sys.exit(f"bench_train: no {DATA_FILE[objective]} under {candidates[0]}; pass --data-dir DIR or set "
             f"FTUNE_DATA_DIR.")


def gsm8k_rows(data_dir: Path, n: int) -> list[dict]:
    rows = []
    with open(data_dir / "gsm8k" / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def bf16_supported() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - older torch: try a bf16 matmul
        try:
            torch.ones(8, 8, dtype=torch.bfloat16) @ torch.ones(8, 8, dtype=torch.bfloat16)
            return True
        except Exception:  # noqa: BLE001
            return False


def matmul_peak(n: int = 2048, repeats: int = 5, inner: int = 3, device: str = "cpu") -> dict[str, float]:
    """Best-of-`repeats` GFLOP/s of an n x n x n torch.matmul (2 n^3 FLOPs) in fp32 and bf16 on `device`.

    fp32 on a GPU is measured as torch computes it by default (TF32 tensor cores only if the user enabled them)."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
        for _ in range(2):
            torch.matmul(a, b)
        sync()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(inner):
                torch.matmul(a, b)
            sync()
            best = min(best, (time.perf_counter() - t0) / inner)
        out[name] = 2 * n ** 3 / best / 1e9
    return out


def meta_model(model_dir: Path):
    """The causal LM of `model_dir`'s config on the meta device: its shapes, without memory or weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))


def model_matmul_shapes(model_dir: Path, rows: int, peft: str = "lora") -> list[tuple[int, int, int, int]]:
    """(m, k, n, count) of the matrix products one decoder-only forward + backward over `rows` tokens runs: every
    decoder layer's projections and the LM head, forward (rows x in x out) and activation gradient (rows x out x in),
    plus the weight gradient (in x rows x out) under full fine-tuning. LoRA's rank-r products and attention scores
    are left out, as in flops_per_token."""
    import torch

    model = meta_model(model_dir)
    counts: dict[tuple[int, int, int], int] = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            k, n = m.in_features, m.out_features
            products = [(rows, k, n), (rows, n, k)] + ([(k, rows, n)] if peft == "full" else [])
            for shape in products:
                counts[shape] = counts.get(shape, 0) + 1
    return [(*shape, c) for shape, c in counts.items()]


def shape_matmul_rate(shapes: list[tuple[int, int, int, int]], device: str = "cpu", repeats: int = 5,
                      dtypes: tuple[str, ...] = ("fp32", "bf16")) -> dict[str, float]:
    """GFLOP/s of the model's own products: each distinct (m, k, n) timed alone (best of `repeats`), then their total
    FLOPs over their total time, each weighted by how often the model runs it. This is the rate a step could reach
    if everything but these products took no time: the roof for this model's shapes, beside the square peak."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {}
    for name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        flops = seconds = 0.0
        for m, k, n, count in shapes:
            a, b = torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)
            torch.matmul(a, b)
            sync()
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                torch.matmul(a, b)
                sync()
                best = min(best, time.perf_counter() - t0)
            flops += 2 * m * k * n * count
            seconds += best * count
        out[name] = flops / seconds / 1e9
    return out


def param_counts(model_dir: Path) -> dict[str, int]:
    """Base parameters (tied weights counted once) and LoRA parameters for r on every linear layer but the LM head."""
    import torch

    model = meta_model(model_dir)
    config = model.config
    base = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    out_emb = model.get_output_embeddings()
    lora = sum(LORA["r"] * (m.in_features + m.out_features) for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m is not out_emb)
    emb = model.get_input_embeddings().weight.numel()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"base": base, "lora": lora, "embedding": emb, "tied": bool(getattr(config, "tie_word_embeddings", False)),
            "layers": config.num_hidden_layers, "attention_width": heads * head_dim}


def machine_busy_cpu_s() -> float:
    """CPU-seconds the whole machine has spent busy (all cores, /proc/stat: everything but idle and iowait)."""
    try:
        vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return (sum(vals[:8]) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def wait_for_idle(max_wait: float, idle_frac: float = 0.85, window: float = 3.0) -> float:
    """Wait (at most max_wait s) until the machine was >= idle_frac idle over a `window`; return the seconds waited."""
    cores, t0 = os.cpu_count() or 1, time.perf_counter()
    while True:
        b0 = machine_busy_cpu_s()
        time.sleep(window)
        busy = (machine_busy_cpu_s() - b0) / (window * cores)
        waited = time.perf_counter() - t0
        if busy <= 1 - idle_frac or waited >= max_wait:
            if busy > 1 - idle_frac:
                print(f"[bench] machine still {100 * busy:.0f}% busy after waiting {waited:.0f}s; going ahead",
                      flush=True)
            return waited


def _proc_cpu_rss(pid: int) -> tuple[float, float] | None:
    """(user+system CPU seconds of all threads, current RSS in MiB) of a live process, from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
        return cpu, rss
    except (OSError, ValueError, IndexError):
        return None


def _vm_hwm_mib(pid: int) -> float | None:
    """A live process's own peak RSS (VmHWM, MiB): counted from its exec, unlike wait4's ru_maxrss."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss(wait4_mib: float, parent_mib: float, polled_mib: float | None) -> tuple[float, str | None]:
    """The child's peak RSS and, when it is only a lower bound, why. Linux carries a process's peak RSS over fork
    and exec, so wait4 reports max(the parent's peak at the spawn, the child's own peak): exact when above the
    parent's, else the child stayed below it and only the VmHWM polled from /proc while it ran is its own."""
    if wait4_mib > parent_mib or polled_mib is None:
        return wait4_mib, None
    return polled_mib, (f"below the benchmark process's own {parent_mib:,.0f} MiB, which wait4 reports instead; this "
                        f"is the child's VmHWM polled from /proc while it ran (a lower bound)")


def _process_tree(pid: int) -> set[int]:
    """pid and all its descendants (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo.extend(children.get(p, []))
    return tree


def _nvidia_smi(query: str) -> list[list[str]]:
    try:
        out = subprocess.run(["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [[x.strip() for x in line.split(",")] for line in out.splitlines() if line.strip()]


def gpu_used_mib() -> float | None:
    """Memory in use on all GPUs together (MiB), or None without nvidia-smi."""
    rows = _nvidia_smi("--query-gpu=memory.used")
    try:
        return sum(float(r[0]) for r in rows) if rows else None
    except ValueError:
        return None


def gpu_memory_mib(pids: set[int], baseline: float | None) -> float | None:
    """GPU memory (MiB) of these processes together as nvidia-smi reports it; inside a container, where its pids are
    the host's and match none of ours, the memory in use on the GPUs minus `baseline` (measured before the child
    started: the benchmark assumes nothing else uses the GPUs meanwhile). None when nvidia-smi cannot be asked."""
    total, matched = 0.0, False
    for parts in _nvidia_smi("--query-compute-apps=pid,used_memory"):
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in pids:
            try:
                total, matched = total + float(parts[1]), True
            except ValueError:
                continue
    if matched:
        return total
    used = gpu_used_mib()
    return None if used is None else max(0.0, used - (baseline or 0.0))


def run_child(cmd: list[str], env: dict, log_path: Path, cwd: Path, progress: Path | None = None,
              gpu: bool = False) -> dict:
    """Run cmd in its own process and return its exit code, peak RSS (MiB, that child alone: see peak_rss), wall time,
    CPU time and, when `progress` (a JSONL file the child appends one line per step to) is given, the wall and CPU
    time at which each line appeared (polled every 20 ms from /proc). With `gpu`, also the peak GPU memory of the
    child and its descendants (nvidia-smi, sampled about every 0.3 s)."""
    import threading

    seen: list[tuple[float, float]] = []
    gpu_peak: list[float] = []
    hwm = [0.0]  # the largest VmHWM (MiB) seen in any process of the child's tree
    stop = threading.Event()

    gpu_baseline = gpu_used_mib() if gpu else None

    def poll(pid: int) -> None:
        lines, last_gpu, last_hwm = 0, 0.0, 0.0
        while not stop.is_set():
            now, sample = time.perf_counter(), _proc_cpu_rss(pid)
            if progress is not None and progress.exists() and sample:
                n = sum(1 for x in progress.read_text().splitlines() if '"tokens_per_s"' in x)
                seen.extend([(now, sample[0])] * (n - lines))
                lines = n
            want_hwm, want_gpu = now - last_hwm >= 0.5, gpu and now - last_gpu >= 0.3
            tree = _process_tree(pid) if want_hwm or want_gpu else set()  # one /proc scan serves both
            if want_hwm:  # a high-water mark: rare polls miss only a peak in the child's last 0.5 s
                hwm[0] = max([hwm[0], *(x for x in map(_vm_hwm_mib, tree) if x is not None)])
                last_hwm = now
            if want_gpu:
                used = gpu_memory_mib(tree, gpu_baseline)
                if used is not None:
                    gpu_peak.append(used)
                last_gpu = time.perf_counter()
            stop.wait(0.02)

    import resource

    parent_peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0, busy0 = time.perf_counter(), machine_busy_cpu_s()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        poller = threading.Thread(target=poll, args=(proc.pid,), daemon=True)
        poller.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # interrupted: do not leave the child training
            proc.kill()
            proc.wait()
            raise
        finally:
            stop.set()
            poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall, cpu = time.perf_counter() - t0, usage.ru_utime + usage.ru_stime
    rss, rss_note = peak_rss(usage.ru_maxrss / 1024, parent_peak_mib, hwm[0] or None)
    return {"other_cpu_cores": max(0.0, (machine_busy_cpu_s() - busy0 - cpu) / wall),
            "exit_code": proc.returncode, "peak_rss_mib": rss, "peak_rss_note": rss_note,
            "peak_gpu_mib": max(gpu_peak) if gpu_peak else None,
            "process_wall_s": wall, "process_cpu_s": cpu,
            "progress_wall": [w - t0 for w, _ in seen], "progress_cpu": [c for _, c in seen]}


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def steady_rate(step_tokens: list[float], step_end: list[float], warmup: int, t_start: float) -> dict:
    """tokens/s over steps warmup+1..S given per-step tokens and the time each step ended (same clock as t_start)."""
    s = len(step_tokens)
    t_from = step_end[warmup - 1] if warmup > 0 else t_start
    tokens = sum(step_tokens[warmup:])
    seconds = step_end[-1] - t_from
    return {"steps_timed": s - warmup, "tokens_timed": tokens, "seconds_timed": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else float("nan")}


# --------------------------------------------------------------------------------------------------------- ftune
def ftune_overrides(a, packing: bool, precision: str, out_dir: Path) -> list[str]:
    data = (["data=hh_rlhf", "objective=dpo", "objective.loss=sigmoid", f"objective.beta={DPO_BETA}"]
            if a.objective == "dpo" else ["data=gsm8k"])
    model = (["model=smollm2_135m"] if a.model == "smollm2_135m"
             else ["model=hub", f"model.name_or_path={a.model_dir}", "model.dtype=float32"])
    peft = (["peft=none"] if a.peft == "full" else
            ["peft=lora", f"peft.r={LORA['r']}", f"peft.alpha={LORA['alpha']}", f"peft.dropout={LORA['dropout']}",
             f"peft.target_modules={LORA['target_modules']}"])
    return [
        *model, *data, f"data.limit={a.examples}", "data.eval_size=0",
        f"data.max_length={a.seq_len}", f"data.truncation={a.truncation}",
        f"data.packing={'true' if packing else 'false'}",
        f"data.group_by_length={'true' if a.group_by_length and not packing else 'false'}", *peft,
        f"trainer.max_steps={a.steps}", f"trainer.batch_size={a.batch_size}", "trainer.grad_accum=1",
        f"trainer.mixed_precision={'bf16' if precision == 'bf16' else 'no'}", f"trainer.lr={a.lr}",
        f"trainer.weight_decay={WEIGHT_DECAY}", f"trainer.max_grad_norm={MAX_GRAD_NORM}",
        "trainer.scheduler=cosine", f"trainer.warmup_ratio={WARMUP_RATIO}", "trainer.warmup_steps=0",
        "trainer.gradient_checkpointing=false", "trainer.log_every=1", "trainer.eval_every=0",
        "trainer.save_every=0", "trainer.progress=false", "eval=none", f"seed={SEED}", f"output_dir={out_dir}",
        *getattr(a, "ftune_override", []),
    ]


def ftune_data(overrides: list[str]):
    """(config, prepared data) of an ftune run, by ftune's own data pipeline (as ftune.train.Trainer.__init__)."""
    import inspect

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import ftune.train  # noqa: F401 - registers ftune's config schema
    from ftune.data.pipeline import prepare
    from ftune.models.loading import fingerprint, load_tokenizer, resolve_model_dir
    from ftune.paths import configs_dir

    with initialize_config_dir(config_dir=str(configs_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    model_dir = resolve_model_dir(cfg.model.name_or_path, cfg.model.revision)
    tok = load_tokenizer(model_dir)
    selector = instantiate(cfg.selection) if cfg.selection.get("_target_") else None
    extra = {}
    if "kind" in inspect.signature(prepare).parameters:
        extra["kind"] = getattr(instantiate(cfg.objective), "data_kind", "sft")
    return cfg, prepare(cfg.data, tok, fingerprint(model_dir) + str(model_dir), cfg.seed, selector,
                        pack_rows=cfg.data.packing, **extra)


def attention_context(rows: list[dict]) -> float:
    """Sum T^2 / sum T over the sequences of `rows` (T: a sequence's tokens): the context a trained token attends over,
    on average per token. Causal attention over a sequence of T tokens costs T^2 x (attention width) multiply-adds for
    the scores and as many for their product with the values, so T per token."""
    lengths = [len(ids) for r in rows for ids, _ in sequences(r)]
    return sum(n * n for n in lengths) / sum(lengths) if lengths else 0.0


def ftune_step_rows(overrides: list[str], steps: int, world: int = 1) -> list[list[dict]]:
    """The rows of each optimizer step of an ftune run (over all `world` processes), rebuilt with ftune's own data
    pipeline and BatchOrder.

    metrics.jsonl only has the cumulative tokens_per_s per step; with the per-step token counts rebuilt here, the
    cumulative training time after step k is tokens_seen_k / tokens_per_s_k. (Mirrors ftune.train.Trainer.__init__.)
    """
    from ftune.data.batching import BatchOrder, row_tokens

    cfg, data = ftune_data(overrides)
    t = cfg.trainer
    lengths = [row_tokens(r) for r in data.train] if cfg.data.get("group_by_length") else None
    orders = [BatchOrder(len(data.train), t.batch_size, t.grad_accum, world, rank, cfg.seed, lengths)
              for rank in range(world)]
    return [[data.train[i] for order in orders for idx in order.micro_batches(k) for i in idx] for k in range(steps)]


def ftune_objective(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import ftune.train  # noqa: F401 - registers ftune's config schema
    from ftune.paths import configs_dir

    with initialize_config_dir(config_dir=str(configs_dir()), version_base="1.3"):
        return instantiate(compose("train", overrides=overrides).objective)


def row_tokens(row: dict) -> int:
    try:
        from ftune.data.batching import row_tokens as ftune_row_tokens
    except ImportError:
        return len(row["input_ids"])
    return ftune_row_tokens(row)


def sequences(row: dict) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each sequence a row puts through the model: one, or chosen and rejected for a pair."""
    if "input_ids" in row:
        return [(row["input_ids"], row["labels"])]
    return [(row[f"{s}_input_ids"], row[f"{s}_labels"]) for s in ("chosen", "rejected")]


def bench_ftune(a, packing: bool, precision: str, env: dict, work: Path) -> dict:
    out_dir = work / f"ftune-{'pack' if packing else 'nopack'}"
    overrides = ftune_overrides(a, packing, precision, out_dir)
    exe = Path(sys.executable).parent / "ftune"
    nproc = ["--nproc", str(a.nproc)] if a.nproc > 1 else []
    cmd = ([str(exe), "train", *nproc, *overrides] if exe.exists()
           else [sys.executable, "-m", "ftune.cli", "train", *nproc, *overrides])
    print(f"[bench] ftune (packing={'on' if packing else 'off'}): {' '.join(cmd[1:] if exe.exists() else cmd[3:])}",
          flush=True)
    log_path = work / f"ftune-{'pack' if packing else 'nopack'}.log"
    proc = run_child(cmd, env, log_path, work, progress=out_dir / "metrics.jsonl", gpu=a.device == "cuda")
    polled_wall, polled_cpu = proc.pop("progress_wall"), proc.pop("progress_cpu")
    res = {"framework": "ftune", "packing": packing, "nproc": a.nproc,
           "command": "ftune " + " ".join(cmd[-len(overrides) - 1 - len(nproc):]),
           **proc, "log": str(log_path)}
    if proc["exit_code"] != 0:
        res["error"] = tail(log_path)
        print(f"[bench] ftune failed (exit {proc['exit_code']}):\n{res['error']}", file=sys.stderr)
        return res
    summary = json.loads((out_dir / "summary.json").read_text())
    records = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    per_step = {r["step"]: r for r in records if "tokens_per_s" in r}
    losses = [r["loss"] for r in per_step.values() if "loss" in r]
    res["mean_loss"] = sum(losses) / len(losses) if losses else None
    res.update(summary_tokens=summary["train_tokens"], summary_seconds=summary["train_seconds"],
               summary_tokens_per_s=summary["tokens_per_s"], final_loss=summary["final_loss"])
    steps_logged = all(k in per_step for k in range(1, a.steps + 1))
    if steps_logged and all("step_tokens" in per_step[k] and "step_seconds" in per_step[k] for k in per_step):
        # Per-step fields (what this benchmark asks ftune to log): no reconstruction needed.
        step_tokens = [float(per_step[k]["step_tokens"]) for k in range(1, a.steps + 1)]
        cum_time = [sum(per_step[j]["step_seconds"] for j in range(1, k + 1)) for k in range(1, a.steps + 1)]
        source = "metrics.jsonl per-step step_tokens and step_seconds"
        rows = None
    else:
        try:
            rows = ftune_step_rows(overrides, a.steps, a.nproc)
        except Exception as e:  # noqa: BLE001 - ftune's internals changed: fall back to the whole-run rate
            rows, res["note"] = None, f"could not rebuild ftune's per-step rows ({type(e).__name__}: {e})"
        step_tokens = [float(sum(row_tokens(r) for r in rs)) for rs in rows] if rows else []
        cum_time, acc = [], 0.0
        if steps_logged:
            for k, n in enumerate(step_tokens, 1):
                acc += n
                cum_time.append(acc / per_step[k]["tokens_per_s"])
        source = ("metrics.jsonl cumulative tokens_per_s x per-step tokens rebuilt from ftune.data (prepare + "
                  "BatchOrder), checked against summary.json train_tokens")
    if rows:
        seqs = [[s for r in rs for s in sequences(r)] for rs in rows]
        try:  # the tokens each step's forward really computes, padding included, as ftune's objective collates them
            obj = ftune_objective(overrides)
            res["padded_tokens"] = sum(obj.collate(rs, 0)["input_ids"].numel() for rs in rows)
        except Exception:  # noqa: BLE001 - ftune's internals changed: rows padded to the widest sequence
            res["padded_tokens"] = sum(len(ss) * max(len(ids) for ids, _ in ss) for ss in seqs)
        res["loss_tokens"] = sum(sum(x != IGNORE for x in labels[1:]) for ss in seqs for _, labels in ss)
        res["examples_trained"] = sum(len(r.get("ids", [r.get("id")])) for rs in rows for r in rs)
        res["widest_row"] = max(len(ids) for ss in seqs for ids, _ in ss)
    res["useful_tokens"] = sum(step_tokens) if step_tokens else summary["train_tokens"]
    if step_tokens and len(polled_cpu) == a.steps and a.warmup_steps:
        # Cross-checks from /proc polling: wall time and process CPU time when each step's record appeared.
        res["polled_tokens_per_s"] = steady_rate(step_tokens, polled_wall, a.warmup_steps, 0.0)["tokens_per_s"]
        if a.nproc == 1:  # with --nproc the polled process is the launcher; the workers' CPU time is not in it
            res["tokens_per_cpu_s"] = steady_rate(step_tokens, polled_cpu, a.warmup_steps, 0.0)["tokens_per_s"]
    problem = res.get("note")
    if not problem and not steps_logged:
        problem = "metrics.jsonl lacks a record for every step"
    if not problem and abs(res["useful_tokens"] - summary["train_tokens"]) > 0.5:
        problem = (f"per-step tokens ({res['useful_tokens']:.0f}) != summary.json train_tokens "
                   f"({summary['train_tokens']:.0f})")
    if problem:
        res["note"] = problem + "; used summary.json's whole-run rate (warm-up steps included)"
        res.update(tokens_per_s=summary["tokens_per_s"], steps_timed=a.steps, tokens_timed=summary["train_tokens"],
                   seconds_timed=summary["train_seconds"], warmup_excluded=False)
        return res
    res["step_seconds"] = [round(t1 - t0, 4) for t0, t1 in zip([0.0] + cum_time[:-1], cum_time)]
    res.update(steady_rate(step_tokens, cum_time, a.warmup_steps, 0.0), warmup_excluded=a.warmup_steps > 0,
               tokens_per_s_source=source)
    return res


# ----------------------------------------------------------------------------------------------------------- TRL
def trl_child(a) -> None:
    """Runs inside the TRL child process: train with SFTTrainer and write the measurements to --child-out."""
    import dataclasses

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    packing = a.child_packing == "on"
    dpo = a.objective == "dpo"
    if dpo:
        from trl import DPOConfig as Config
        from trl import DPOTrainer as BaseTrainer
    else:
        from trl import SFTConfig as Config
        from trl import SFTTrainer as BaseTrainer
    precision = a.precision
    data_dir = Path(os.environ["FTUNE_DATA_DIR"])
    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    if dpo:  # the pairs ftune trains on, parsed by ftune, in ftune's order
        pairs = json.loads(a.pairs_file.read_text())
        order = list(range(len(pairs)))
        ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in pairs])
        # Same as ftune's DPO: sigmoid loss, reference = adapter disabled (not precomputed), dropout left on.
        method = dict(beta=DPO_BETA, precompute_ref_log_probs=False, disable_dropout=False)
    else:
        rows = gsm8k_rows(data_dir, a.examples)
        order = json.loads(a.order_file.read_text()) if a.order_file else None
        if order is not None:  # ftune's examples in ftune's order, read sequentially: both sides see the same batches
            rows = [rows[i] for i in order]
        ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}],
                                 "completion": [{"role": "assistant", "content": r["answer"]}]} for r in rows])
        method = dict(packing=packing, completion_only_loss=True, assistant_only_loss=False)
    work = a.child_out.parent / f"trl-{a.child_packing}"
    # SFTConfig turns activation (gradient) checkpointing on by default; ftune's default is off. transformers 5.x
    # renamed the argument to activation_checkpointing (gradient_checkpointing is a deprecated alias).
    fields = {f.name for f in dataclasses.fields(Config)}
    no_ckpt = {"activation_checkpointing": False} if "activation_checkpointing" in fields \
        else {"gradient_checkpointing": False}
    sequential = order is not None and "train_sampling_strategy" in fields
    if sequential:
        no_ckpt["train_sampling_strategy"] = "sequential"
    config = Config(
        output_dir=str(work), max_steps=a.steps, per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=1, learning_rate=a.lr, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM,
        lr_scheduler_type="cosine", warmup_steps=int(round(WARMUP_RATIO * a.steps)),
        bf16=precision == "bf16", fp16=False, use_cpu=a.child_device == "cpu", **no_ckpt,
        max_length=a.seq_len, **method,
        report_to="none", save_strategy="no", eval_strategy="no", logging_steps=10, disable_tqdm=True,
        seed=SEED, dataloader_num_workers=0,
    )
    # Full fine-tuning: no peft_config (DPOTrainer then keeps a frozen copy of the model as the reference).
    peft_config = None if a.peft == "full" else LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], bias="none",
        target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    stats = {"tokens": [], "padded": [], "loss_tokens": [], "rows": [], "widths": [], "losses": []}

    class Counting(BaseTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            if order is not None and not sequential:  # older transformers: no train_sampling_strategy
                return torch.utils.data.SequentialSampler(self.train_dataset)
            return super()._get_train_sampler(*args, **kwargs)

        def training_step(self, *args, **kwargs):
            inputs = args[1] if len(args) > 1 else kwargs["inputs"]
            ids = inputs["input_ids"]
            # Padding-free (packing) batches are one flattened row of real tokens; otherwise the mask marks them.
            stats["tokens"].append(int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else ids.numel())
            stats["padded"].append(ids.numel())
            stats["loss_tokens"].append(int((inputs["labels"][:, 1:] != IGNORE).sum()) if "labels" in inputs
                                        else int(inputs["completion_mask"][:, 1:].sum()))  # DPO: completion tokens
            stats["rows"].append(ids.shape[0])
            # Row width the model sees (padding-free: the whole batch flattened into one row).
            stats["widths"].append(ids.shape[1])
            loss = super().training_step(*args, **kwargs)
            stats["losses"].append(float(loss))  # this step's mean loss (no gradient accumulation)
            return loss

    times = {"begin": None, "ends": [], "cpu_begin": None, "cpu_ends": []}

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            times["begin"], times["cpu_begin"] = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            times["ends"].append(time.perf_counter())
            times["cpu_ends"].append(time.process_time())

    trainer = Counting(model=model, args=config, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                       callbacks=[Timer()])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    lens = ([len(p) + len(c) + len(p) + len(r) for p, c, r in zip(*(trainer.train_dataset[k] for k in
                                                                     ("prompt_ids", "chosen_ids", "rejected_ids")))]
            if dpo else [len(x) for x in trainer.train_dataset["input_ids"]])
    t0 = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - t0
    steps = len(times["ends"])
    res = {"framework": "trl", "packing": packing, "trl_version": trl.__version__,
           "example_order": "ftune's (same batches)" if order is not None else "TRL's own random sampler",
           "transformers_version": transformers.__version__, "steps_done": steps, "train_wall_s": train_s,
           "final_loss": stats["losses"][-1] if stats["losses"] else None,
           "mean_loss": sum(stats["losses"]) / len(stats["losses"]) if stats["losses"] else out.training_loss,
           "trainable_params": trainable, "dataset_rows": len(lens),
           "dataset_mean_row_tokens": sum(lens) / max(len(lens), 1),
           "useful_tokens": float(sum(stats["tokens"])), "padded_tokens": sum(stats["padded"]),
           "activation_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)
                                            or config.gradient_checkpointing),
           "bf16_autocast": trainer.accelerator.mixed_precision,
           "loss_tokens": sum(stats["loss_tokens"]), "widest_row": max(stats["widths"]), "optim": str(config.optim),
           "step_seconds": [round(t1 - t0_, 4)
                            for t0_, t1 in zip([times["begin"]] + times["ends"][:-1], times["ends"])],
           "tokens_per_s_source": "time between on_step_end callbacks (data loading, forward, backward, optimizer, "
                                  f"logging) and the real tokens counted in {BaseTrainer.__name__}.training_step"}
    if dpo:
        res["trl_loss_type"] = str(config.loss_type)
    if len(stats["tokens"]) != steps:
        res["note"] = f"counted {len(stats['tokens'])} micro-batches for {steps} steps"
    step_tokens = [float(x) for x in stats["tokens"][:steps]]
    res.update(steady_rate(step_tokens, times["ends"], a.warmup_steps, times["begin"]),
               warmup_excluded=a.warmup_steps > 0,
               tokens_per_cpu_s=steady_rate(step_tokens, times["cpu_ends"], a.warmup_steps,
                                            times["cpu_begin"])["tokens_per_s"])
    a.child_out.write_text(json.dumps(res))


def ftune_example_order(a, precision: str) -> list[int]:
    """Indices (into the first N GSM8K rows) of the examples ftune trains on without packing, in its order."""
    rows = ftune_step_rows(ftune_overrides(a, False, precision, Path(tempfile.gettempdir()) / "unused"), a.steps,
                           a.nproc)
    order = []
    for rs in rows:
        for r in rs:
            split, _, idx = str(r["id"]).rpartition("-")
            if split != "train" or not idx.isdigit():
                raise ValueError(f"unexpected example id {r['id']!r}")
            order.append(int(idx))
    return order


def ftune_dpo_pairs(a, precision: str) -> list[dict]:
    """The preference pairs ftune trains on (its own parsing of the HH-RLHF records), in the order it trains on them."""
    from hydra import compose, initialize_config_dir

    import ftune.train  # noqa: F401 - registers ftune's config schema
    from ftune.data.preference import load_pairs
    from ftune.paths import configs_dir

    overrides = ftune_overrides(a, False, precision, Path(tempfile.gettempdir()) / "unused")
    with initialize_config_dir(config_dir=str(configs_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    by_id = {p["id"]: p for p in load_pairs(cfg.data, cfg.data.split, cfg.seed)[0]}
    ids = [r["id"] for rs in ftune_step_rows(overrides, a.steps, a.nproc) for r in rs]
    return [{k: by_id[i][k] for k in ("prompt", "chosen", "rejected")} for i in ids]


def bench_trl(a, packing: bool, precision: str, env: dict, work: Path, model_dir: Path) -> dict:
    tag = "pack" if packing else "nopack"
    out = work / f"trl-{tag}.json"
    order_note = None
    order_args: list[str] = []
    if a.objective == "dpo":  # no fallback: TRL gets ftune's pairs or the comparison means nothing
        pairs_file = work / "ftune_pairs.json"
        pairs_file.write_text(json.dumps(ftune_dpo_pairs(a, precision)))
        order_args = ["--pairs-file", str(pairs_file)]
    elif not packing and not a.random_order:
        try:
            order_file = work / "ftune_order.json"
            order_file.write_text(json.dumps(ftune_example_order(a, precision)))
            order_args = ["--order-file", str(order_file)]
        except Exception as e:  # noqa: BLE001 - ftune's internals changed: TRL draws its own batches
            order_note = f"could not rebuild ftune's example order ({type(e).__name__}: {e}); TRL used its own"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "trl", "--child-out", str(out),
           "--child-packing", "on" if packing else "off", "--model-dir", str(model_dir),
           "--examples", str(a.examples), "--steps", str(a.steps), "--warmup-steps", str(a.warmup_steps),
           "--precision", precision, "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size),
           "--objective", a.objective, "--peft", a.peft, "--lr", str(a.lr), "--child-device", a.device, *order_args]
    print(f"[bench] TRL {'DPOTrainer' if a.objective == 'dpo' else 'SFTTrainer'} "
          f"(packing={'on' if packing else 'off'})", flush=True)
    log_path = work / f"trl-{tag}.log"
    if a.trl_malloc == "reuse":  # the thresholds of ftune's trainer.cpu_malloc=reuse (ftune/training/cpu_malloc.py)
        env = dict(env, GLIBC_TUNABLES=TRL_REUSE_TUNABLES)
    proc = run_child(cmd, env, log_path, work, gpu=a.device == "cuda")
    proc.pop("progress_wall"), proc.pop("progress_cpu")
    res = {"framework": "trl", "packing": packing, **proc, "log": str(log_path)}
    if proc["exit_code"] != 0 or not out.exists():
        res["error"] = tail(log_path)
        print(f"[bench] TRL failed (exit {proc['exit_code']}):\n{res['error']}", file=sys.stderr)
        return res
    res.update(json.loads(out.read_text()))
    if order_note:
        res["note"] = order_note
    return res


# ----------------------------------------------------------------------------------------------------- reporting
def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), e.g. "AMD EPYC 7B13 (x86_64)": figures from two machines of one
    architecture differ (this suite's fp32 and bf16 matmul peaks did, 1.7x and 0.2x, between two cloud machines)."""
    arch = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({arch})"
    except OSError:
        pass
    return arch


def flops_per_token(params: dict, objective: str = "sft", peft: str = "lora",
                    context: float = 0.0) -> tuple[float, str]:
    """Model FLOPs per useful token: the weights' products, plus attention's when `context` (attention_context) is
    given: the scores and their product with the values, causal (half the T x T matrix, as FlashAttention counts),
    forward 2*L*A*T (L layers, A = heads x head size), training 3x that (both operands of each product get a gradient,
    also under LoRA), the reference model of DPO once more forward."""
    n, n_lora = params["base"], params["lora"]
    if peft == "full":
        if objective == "dpo":
            fpt, text = 8 * n, (f"DPO, full fine-tuning: 8*N = 8*{n / 1e6:.1f}M FLOPs per useful token (policy 6N: "
                                f"forward 2N, activation and weight gradients 4N; frozen reference copy forward 2N)")
        else:
            fpt, text = 6 * n, (f"full fine-tuning: 6*N = 6*{n / 1e6:.1f}M FLOPs per useful token (forward 2N, "
                                f"activation and weight gradients 4N). N counts every parameter once (a tied "
                                f"embedding as the LM-head matmul)")
    elif objective == "dpo":
        fpt, text = 6 * n + 6 * n_lora, (f"DPO with LoRA: 6*N_base + 6*N_lora = 6*{n / 1e6:.1f}M + "
                                         f"6*{n_lora / 1e6:.2f}M FLOPs per useful token (policy 2N forward + 2N "
                                         f"activation gradients + 6*N_lora for the adapter, reference forward 2N "
                                         f"with the adapter disabled)")
    else:
        fpt, text = 4 * n + 6 * n_lora, (f"LoRA: 4*N_base + 6*N_lora = 4*{n / 1e6:.1f}M + 6*{n_lora / 1e6:.2f}M "
                                         f"FLOPs per useful token (2N forward + 2N activation gradients; no weight "
                                         f"gradients for the frozen base; full fine-tuning would be 6N). N counts "
                                         f"every base parameter once (the tied embedding as the LM-head matmul)")
    if not context:
        return fpt, text + "; attention score FLOPs are left out"
    c, layers, width = (8 if objective == "dpo" else 6), params["layers"], params["attention_width"]
    attn = c * layers * width * context
    return fpt + attn, (text + f"; plus causal attention {c}*L*A*T = {c}*{layers}*{width}*{context:.1f} = "
                        f"{attn / 1e6:.1f}M (T = sum T^2 / sum T over the benchmark's training sequences; "
                        f"{'policy 6, reference forward 2' if c == 8 else 'forward 2, gradients 4'})")


def run_ratios(f: dict, t: dict) -> list[float] | None:
    """ftune / TRL tokens/s of each repeat (the k-th ftune run against the k-th TRL run), with --repeats > 1."""
    fr, tr = f.get("repeats") or [], t.get("repeats") or []
    if len(fr) < 2 or len(fr) != len(tr) or not all(x.get("tokens_per_s") for x in fr + tr):
        return None
    return [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(fr, tr)]


def fmt(x, spec=",.0f"):
    return "-" if x is None else format(x, spec)


def report(results: list[dict], meta: dict) -> str:
    ok = [r for r in results if r.get("exit_code") == 0 and r.get("tokens_per_s")]
    peak = meta["matmul_peak_gflops"][meta["precision"]]
    fpt = meta["flops_per_token"]
    gpu = meta.get("device") == "cuda"
    for r in results:  # what the ratios compare: GPU memory on a GPU, resident memory on a CPU
        r["peak_memory_mib"] = r.get("peak_gpu_mib") if gpu else r.get("peak_rss_mib")
    shape_peak = (meta.get("shape_matmul_gflops") or {}).get(meta["precision"])
    for r in ok:
        r["mfu"] = r["tokens_per_s"] * fpt / (peak * 1e9)
        if shape_peak:
            r["shape_mfu"] = r["tokens_per_s"] * fpt / (shape_peak * 1e9)
    cols = [f"{r['framework']} {'pack' if r['packing'] else 'no-pack'}"
            + (f" x{r['nproc']}" if r.get("nproc", 1) > 1 else "") for r in results]
    rows = [
        ("useful tokens/s (steady)", [fmt(r.get("tokens_per_s"), ",.1f") for r in results]),
        ("peak RSS (MiB)", [fmt(r.get("peak_rss_mib")) for r in results]),
        *([("peak GPU memory (MiB, nvidia-smi)", [fmt(r.get("peak_gpu_mib")) for r in results])] if gpu else []),
        (f"MFU vs {meta['precision']} matmul peak", [fmt(r.get("mfu") and 100 * r["mfu"], ".2f") + "%"
                                                      if r.get("mfu") else "-" for r in results]),
        *([("MFU vs the model's own matmul shapes", [fmt(r.get("shape_mfu") and 100 * r["shape_mfu"], ".2f") + "%"
                                                       if r.get("shape_mfu") else "-" for r in results])]
          if shape_peak else []),
        *([("useful tokens/s, each run (ABBA order)", [", ".join(fmt(x.get("tokens_per_s"), ".1f")
                                                                 for x in r.get("repeats", [r])) for r in results])]
          if any(r.get("repeats") for r in results) else []),
        ("useful tokens per CPU-second", [fmt(r.get("tokens_per_cpu_s"), ",.1f") for r in results]),
        ("timed steps / seconds", [f"{r.get('steps_timed', '-')} / {fmt(r.get('seconds_timed'), '.1f')}"
                                   for r in results]),
        ("widest row seen (tokens)", [fmt(r.get("widest_row")) for r in results]),
        ("other processes' CPU (cores, avg)", [fmt(r.get("other_cpu_cores"), ".2f") for r in results]),
        ("load avg (1 min) before/after", [f"{fmt(r.get('load_1min_before'), '.1f')}/"
                                           f"{fmt(r.get('load_1min_after'), '.1f')}" for r in results]),
        ("useful tokens (all steps)", [fmt(r.get("useful_tokens")) for r in results]),
        ("padded tokens (all steps)", [fmt(r.get("padded_tokens")) for r in results]),
        ("loss tokens (all steps)", [fmt(r.get("loss_tokens")) for r in results]),
        ("train loss: last step / mean", [f"{fmt(r.get('final_loss'), '.3f')} / {fmt(r.get('mean_loss'), '.3f')}"
                                          for r in results]),
        ("process wall s", [fmt(r.get("process_wall_s"), ".0f") for r in results]),
    ]
    w0 = max(len(k) for k, _ in rows)
    ws = [max(len(c), *(len(v[i]) for _, v in rows)) for i, c in enumerate(cols)]
    lines = [f"{'':{w0}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cols, ws))]
    lines += [f"{k:{w0}}  " + "  ".join(f"{x:>{w}}" for x, w in zip(v, ws)) for k, v in rows]
    by = {(r["framework"], r["packing"]): r for r in ok}
    target = GPU_TARGET if gpu else TARGET[meta["objective"]]
    mem_name = "peak GPU memory" if gpu else "peak RSS"
    ratios = []
    pairs = [("same packing off", (False, False)), ("same packing on", (True, True)),
             ("ftune packed vs TRL default (no packing)", (True, False))]
    for label, (fp, tp) in pairs:
        f, t = by.get(("ftune", fp)), by.get(("trl", tp))
        if f and t:
            speed = f["tokens_per_s"] / t["tokens_per_s"]
            mem = (f["peak_memory_mib"] / t["peak_memory_mib"] if f["peak_memory_mib"] and t["peak_memory_mib"]
                   else float("nan"))
            runs = run_ratios(f, t)
            ratios.append({"pair": label, "tokens_per_s_ratio": speed, "tokens_per_s_ratio_runs": runs,
                           "peak_memory_ratio": mem, "peak_memory_kind": mem_name,
                           "meets_target": speed >= target and mem <= 1.0})
            verdict = "met" if speed >= target and mem <= 1.0 else "NOT met"
            each = f" (each run: {', '.join(f'x{x:.2f}' for x in runs)})" if runs else ""
            lines.append(f"ftune/TRL, {label}: tokens/s x{speed:.2f}{each}, {mem_name} x{mem:.2f} -> target "
                         f"(>={target}x tokens/s at <= TRL's {mem_name}) {verdict}")
    meta["ratios"] = ratios
    lines.append(f"matmul peak ({meta['matmul_n']}^3, best of {meta['matmul_repeats']} at start and at end): "
                 + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in meta["matmul_peak_gflops"].items())
                 + f"; MFU uses the {meta['precision']} figure")
    if meta.get("shape_matmul_gflops"):
        lines.append(f"matmul rate at the model's own shapes ({meta['shape_matmul_rows']} rows: each projection "
                     f"forward and backward, weighted by its FLOPs): "
                     + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in meta["shape_matmul_gflops"].items())
                     + "; the roof a step could reach if nothing but these products took time")
    lines.append(f"MFU formula: {meta['flops_formula']}")
    lines.append(f"tokens/s: real (non-padding) tokens of steps {meta['warmup_steps'] + 1}..{meta['steps']} over "
                 f"their wall time; the first {meta['warmup_steps']} step(s) are warm-up and left out. Per CPU-second: "
                 f"the same tokens over the process's user+system CPU time in those steps (less sensitive to other "
                 f"load on the machine). Padding-free TRL batches are one flattened row.")
    for r in results:
        if r.get("peak_rss_note"):
            lines.append(f"peak RSS ({r['framework']}, packing={r['packing']}): {r['peak_rss_note']}")
        if r.get("note"):
            lines.append(f"note ({r['framework']}, packing={r['packing']}): {r['note']}")
    return "\n".join(lines)


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
