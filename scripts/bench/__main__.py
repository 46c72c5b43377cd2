"""ftune vs TRL, one table: `python -m scripts.bench` from the repository root.

Suites (each one ftune-vs-TRL comparison by scripts/bench_train.py, same model, data, method, hardware and run):
  sft-lora  SFT with LoRA r 16 on all linear layers (TRL SFTTrainer), GSM8K
  full-ft   SFT, full fine-tuning (ftune peft=none, SFTTrainer without a peft_config), GSM8K
  dpo       DPO (sigmoid, beta 0.1) with the same LoRA (TRL DPOTrainer), HH-RLHF harmless-base pairs
  all       the three

Curves (`--curves seq,nproc`, PNG + JSON in --out): ftune's (and, with `--curve-trl`, TRL's) useful tokens/s against
the sequence length at a fixed number of tokens per step (packed rows, batch = tokens per step / length), and against
the number of data-parallel processes (`ftune train --nproc N`: gloo on CPU, NCCL on GPUs; batch per process fixed).

Targets checked in the table (ftune rows): on a CPU >= 1.5x TRL's useful tokens/s at <= its peak memory (RSS) and
>= 80% of the measured matmul peak (MFU); on a GPU >= 1.3x TRL's tokens/s and >= 45% MFU (bf16 matmul peak).

    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 FTUNE_DATA_DIR=/path/to/data
    python -m scripts.bench --suite all --wait-idle 180 --out bench-out                    # CPU, SmolLM2-135M
    python -m scripts.bench --suite all --model llama_1b_random --device cuda --seq-len 2048 --batch-size 8 \\
        --packing on --examples 4000 --steps 30 --out bench-gpu                             # GPU, random Llama-3.2-1B
    python -m scripts.bench --suite none --curves seq,nproc --curve-trl --out bench-curves
    python -m scripts.bench --suite all --curves seq,nproc --curve-trl --model llama_tiny_random --steps 3 \\
        --warmup-steps 1 --examples 24 --batch-size 2 --seq-len 512 --seq-lens 128,256 --tokens-per-step 512 \\
        --out /tmp/bench-smoke                                                               # a smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from .curves import nproc_curve, seq_curve

REPO = Path(__file__).resolve().parents[2]
ENGINE = REPO / "scripts" / "bench_train.py"
SUITES = {
    "sft-lora": ["--objective", "sft", "--peft", "lora"],
    "full-ft": ["--objective", "sft", "--peft", "full"],
    "dpo": ["--objective", "dpo", "--peft", "lora", "--packing", "off"],
}
# ftune / TRL useful tokens/s, and MFU against the measured bf16 (or fp32) matmul peak.
TARGETS = {"cpu": {"speedup": 1.5, "mfu": 0.80, "memory": True}, "cuda": {"speedup": 1.3, "mfu": 0.45, "memory": False}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--suite", default="all", help="sft-lora, full-ft, dpo, all, none, or a comma list (default all)")
    p.add_argument("--curves", default="", help="seq, nproc or seq,nproc: scaling curves as PNG (default none)")
    p.add_argument("--out", type=Path, required=True, help="directory for the JSON, markdown, logs and PNG files")
    p.add_argument("--model", default="smollm2_135m",
                   help="smollm2_135m, llama_1b_random, llama_3b_random, llama_8b_random or llama_tiny_random")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--examples", type=int, default=400)
    p.add_argument("--seq-len", type=int, default=512, help="max length of the suites (default 512)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per step (per process) (default 4)")
    p.add_argument("--packing", choices=("off", "on", "both"), default="off",
                   help="packing of the SFT suites (DPO never packs) (default off: both tools see the same batches)")
    p.add_argument("--group-by-length", action="store_true",
                   help="padded runs: rows of similar length in each batch (ftune's data.group_by_length; TRL is\n"
                        "given the same batches)")
    p.add_argument("--only", choices=("ftune", "trl", "both"), default="both")
    p.add_argument("--seq-lens", default="128,256,512,1024", help="sequence lengths of the seq curve")
    p.add_argument("--tokens-per-step", type=int, default=2048,
                   help="tokens per step of the seq curve (batch = this / length, at least 1) (default 2048)")
    p.add_argument("--nprocs", default="1,2", help="process counts of the nproc curve (default 1,2)")
    p.add_argument("--curve-trl", action="store_true", help="run TRL at each point of the seq curve as well")
    p.add_argument("--wait-idle", type=float, default=0)
    p.add_argument("--retry-busy", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1,
                   help="measure each tool N times in ABBA order; median tokens/s, each run's ratio to TRL (default 1)")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--ftune-override", action="append", default=[], metavar="KEY=VALUE",
                   help="one more ftune override for every ftune run (repeatable), e.g. trainer.cpu_malloc=system")
    p.add_argument("--trl-malloc", choices=("system", "reuse"), default="system",
                   help="TRL with glibc's malloc defaults (system) or ftune's trainer.cpu_malloc=reuse thresholds")
    a = p.parse_args(argv)
    names = [s.strip() for s in a.suite.split(",") if s.strip()]
    a.suites = list(SUITES) if "all" in names else [] if names == ["none"] else names
    if bad := [s for s in a.suites if s not in SUITES]:
        p.error(f"--suite: unknown {', '.join(bad)}; choose from {', '.join(SUITES)}, all or none.")
    a.curve_list = [c.strip() for c in a.curves.split(",") if c.strip()]
    if bad := [c for c in a.curve_list if c not in ("seq", "nproc")]:
        p.error(f"--curves: unknown {', '.join(bad)}; choose seq, nproc or seq,nproc.")
    if not a.suites and not a.curve_list:
        p.error("nothing to run: give --suite and/or --curves.")
    return a


def common_args(a) -> list[str]:
    out = ["--model", a.model, "--device", a.device, "--precision", a.precision, "--steps", str(a.steps),
           "--warmup-steps", str(a.warmup_steps), "--examples", str(a.examples), "--wait-idle", str(a.wait_idle),
           "--retry-busy", str(a.retry_busy), "--repeats", str(a.repeats), "--trl-malloc", a.trl_malloc,
           *[arg for o in a.ftune_override for arg in ("--ftune-override", o)]]
    return out + (["--data-dir", str(a.data_dir)] if a.data_dir else [])


def run_engine(args: list[str], name: str, out_dir: Path) -> dict:
    """One scripts/bench_train.py run; its output goes to the console and to out_dir/name.log."""
    json_path, log_path = out_dir / f"{name}.json", out_dir / f"{name}.log"
    cmd = [sys.executable, str(ENGINE), *args, "--out", str(json_path)]
    print(f"\n[suite] {name}: python scripts/bench_train.py {' '.join(args)}", flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
               HF_DATASETS_OFFLINE=os.environ.get("HF_DATASETS_OFFLINE", "1"))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        proc.wait()
    if not json_path.exists():
        return {"error": f"bench_train exited {proc.returncode} without results; see {log_path}", "command": args}
    data = json.loads(json_path.read_text())
    data["command"] = "python scripts/bench_train.py " + " ".join(args)
    data["exit_code"] = proc.returncode
    return data


def suite_rows(name: str, data: dict) -> list[dict]:
    """Table rows (one per tool and packing setting) of one suite's results, with the verdict on ftune's rows."""
    if "error" in data:
        return [{"suite": name, "tool": "-", "error": data["error"]}]
    meta = data["meta"]
    target = TARGETS[meta.get("device", "cpu")]
    res = data["results"]
    trl = {r["packing"]: r for r in res if r["framework"] == "trl" and r.get("tokens_per_s")}
    # with --repeats, ftune / TRL of each repeat (bench_train pairs the k-th runs)
    run_ratios = {x["pair"]: x.get("tokens_per_s_ratio_runs") for x in meta.get("ratios", [])}
    rows = []
    for r in res:
        mem = r.get("peak_memory_mib", r.get("peak_rss_mib"))
        lower = bool(r.get("peak_rss_note")) and meta.get("device", "cpu") == "cpu"  # RSS polled: a lower bound
        row = {"suite": name, "tool": f"{r['framework']} {'packed' if r['packing'] else 'padded'}",
               "tokens_per_s": r.get("tokens_per_s"), "peak_memory_mib": mem, "mfu": r.get("mfu"),
               "shape_mfu": r.get("shape_mfu"), "memory_lower_bound": lower,
               "ratio": None, "memory_ratio": None, "target_met": None, "error": r.get("error") and "failed"}
        ref = trl.get(r["packing"])
        if r["framework"] == "ftune" and r.get("tokens_per_s") and ref:
            row["ratio"] = r["tokens_per_s"] / ref["tokens_per_s"]
            row["ratio_runs"] = run_ratios.get(f"same packing {'on' if r['packing'] else 'off'}")
            ref_mem = ref.get("peak_memory_mib", ref.get("peak_rss_mib"))
            row["memory_ratio"] = mem / ref_mem if mem and ref_mem else None
            missed = []
            if row["ratio"] < target["speedup"]:
                missed.append("speed")
            if target["memory"] and not (row["memory_ratio"] is not None and row["memory_ratio"] <= 1.0):
                missed.append("memory")
            if (r.get("mfu") or 0) < target["mfu"]:
                missed.append("MFU")
            row["target_met"] = not missed
            row["missed"] = missed
        elif r["framework"] == "trl" and r.get("tokens_per_s"):
            row["ratio"] = 1.0
        rows.append(row)
    return rows


def _f(x, spec):
    return "-" if x is None else format(x, spec)


def table(rows: list[dict], markdown: bool = False) -> str:
    head = ["suite", "tool", "useful tok/s", "vs TRL", "peak mem MiB", "mem vs TRL", "MFU", "MFU at model shapes",
            "target met"]
    body = []
    for r in rows:
        if r.get("error") and r.get("tool") == "-":
            body.append([r["suite"], "-", "failed", "", "", "", "", "", r["error"]])
            continue
        verdict = "-" if r.get("target_met") is None else "yes" if r["target_met"] else f"no ({', '.join(r['missed'])})"
        spread = f" ({min(r['ratio_runs']):.2f}-{max(r['ratio_runs']):.2f})" if r.get("ratio_runs") else ""
        mem = ("≥" if r.get("memory_lower_bound") else "") + _f(r["peak_memory_mib"], ",.0f")
        body.append([r["suite"], r["tool"], _f(r["tokens_per_s"], ",.1f"), _f(r["ratio"], ".2f") + "x" + spread
                     if r["ratio"] else "-", mem,
                     _f(r["memory_ratio"], ".2f") + "x" if r["memory_ratio"] else "-",
                     _f(r["mfu"] and 100 * r["mfu"], ".2f") + "%" if r["mfu"] else "-",
                     _f(100 * r["shape_mfu"], ".2f") + "%" if r.get("shape_mfu") else "-",
                     "failed" if r.get("error") else verdict])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 6 + ["---"]) + "|"]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    ws = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    out = ["  ".join(f"{h:<{w}}" if i < 2 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(head, ws)))]
    out += ["  ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(b, ws))) for b in body]
    return "\n".join(out)


def hardware(suites: dict) -> str:
    meta = next((d["meta"] for d in suites.values() if "meta" in d), None)
    if meta is None:
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    peak = ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in meta["matmul_peak_gflops"].items())
    if meta.get("shape_matmul_gflops"):  # the suite's first model and shapes; each suite's JSON holds its own
        peak += " (at the model's own shapes: " + ", ".join(
            f"{k} {v:,.0f}" for k, v in meta["shape_matmul_gflops"].items()) + ")"
    where = meta.get("gpu") or f"{meta['cpu']}, {os.cpu_count()} cores, {meta['torch_threads']} torch threads"
    v = meta["versions"]
    return (f"{where}; matmul peak {peak}; torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
            f"trl {v['trl']}")


def legend_text(device: str | None, rows: list[dict]) -> str:
    """The line under the table: the targets of this device, and what a GPU's packed TRL rows measure."""
    t = TARGETS.get(device or "cpu")
    text = (f"target ({device or 'cpu'}): ftune >= {t['speedup']}x TRL's useful tokens/s"
            + (" at <= TRL's peak memory" if t["memory"] else "") + f", MFU >= {100 * t['mfu']:.0f}% of the "
            f"measured matmul peak; ratios compare the same packing setting")
    if device == "cuda" and any(r.get("tool") == "trl packed" for r in rows):
        text += ("; TRL's packing is padding-free (one flattened row a step), cheap only with FlashAttention's "
                 "variable-length kernels: on SDPA its attention covers the whole row (compare the unpacked rows)")
    return text


def main(argv=None) -> int:
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    suites = {}
    for name in a.suites:
        args = [*common_args(a), *SUITES[name], "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size),
                "--only", a.only]
        if "--packing" not in SUITES[name]:
            args += ["--packing", a.packing]
        if a.group_by_length:
            args += ["--group-by-length"]
        suites[name] = run_engine(args, name, a.out)
    curves = {}
    if a.curve_list:
        if "seq" in a.curve_list:
            curves["seq"] = seq_curve(a, common_args(a), run_engine)
        if "nproc" in a.curve_list:
            curves["nproc"] = nproc_curve(a, common_args(a), run_engine)
    rows = [row for name, data in suites.items() for row in suite_rows(name, data)]
    device = next((d["meta"]["device"] for d in suites.values() if "meta" in d), None)
    legend = legend_text(device, rows)
    hw = hardware(suites)
    text = "\n".join(x for x in [table(rows) if rows else "", legend if rows else "", f"hardware: {hw}"] if x)
    print("\n" + text)
    for kind, c in curves.items():
        print(f"curve {kind}: {c.get('png') or c.get('error')}")
    md = [f"# ftune vs TRL ({started})", "", f"Hardware: {hw}", ""]
    if rows:
        md += [table(rows, markdown=True), "", legend, ""]
    md += [f"- {name}: `{d.get('command', '')}`" for name, d in suites.items()]
    for kind, c in curves.items():
        md += ["", f"## Curve: tokens/s vs {kind}", "", c.get("markdown", c.get("error", "")), ""]
        if c.get("png"):
            md.append(f"![{kind}]({Path(c['png']).name})")
    (a.out / "summary.md").write_text("\n".join(md) + "\n")
    (a.out / "summary.json").write_text(json.dumps({"started": started, "argv": sys.argv[1:], "hardware": hw,
                                                    "rows": rows, "legend": legend, "suites": suites,
                                                    "curves": curves}, indent=2, default=str))
    print(f"[suite] wrote {a.out / 'summary.md'} and {a.out / 'summary.json'}")
    failed = [n for n, d in suites.items() if "error" in d or d.get("exit_code")]
    failed += [k for k, c in curves.items() if c.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
