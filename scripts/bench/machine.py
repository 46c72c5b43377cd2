"""Measuring the machine and the children of scripts/bench_train.py: matmul peaks at the model's shapes, CPU and
memory of a process tree (peak RSS, GPU memory), a child run with its progress, and the steady-state rate."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

from .settings import LORA


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
