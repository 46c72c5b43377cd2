"""Scaling curves for `python -m scripts.bench --curves seq,nproc`: useful tokens/s against the sequence length and
against the number of data-parallel processes, each point one scripts/bench_train.py run, plotted as PNG.

* seq: SFT with LoRA, packed rows of exactly L tokens, batch = tokens-per-step / L rows (at least 1), so every point
  trains about the same number of tokens per step and only the row length changes. Examples longer than L are
  truncated on both sides (ftune `data.truncation=truncate`; TRL truncates by default). TRL (packing on) runs at each
  point with --curve-trl.
* nproc: SFT with LoRA, packed rows of --seq-len tokens, `ftune train --nproc N` with --batch-size rows per process
  (weak scaling: N processes train N times the rows per step). On a CPU the processes share its cores (gloo, torchrun
  sets one thread per process); on a machine with N GPUs each process gets one.
"""

from __future__ import annotations

from pathlib import Path


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _point(data: dict, framework: str) -> dict | None:
    for r in data.get("results", []):
        if r["framework"] == framework and r.get("tokens_per_s"):
            return {"tokens_per_s": r["tokens_per_s"], "mfu": r.get("mfu"),
                    "peak_memory_mib": r.get("peak_memory_mib", r.get("peak_rss_mib"))}
    return None


def _plot(path: Path, xs_by_label: dict[str, tuple[list[float], list[float]]], xlabel: str, title: str,
          ideal: tuple[list[float], list[float]] | None = None, log2x: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in xs_by_label.items():
        if xs:
            ax.plot(xs, ys, marker="o", label=label)
    if ideal:
        ax.plot(*ideal, linestyle="--", color="grey", label="linear scaling from 1 process")
    if log2x:
        ax.set_xscale("log", base=2)
    all_x = sorted({x for xs, _ in xs_by_label.values() for x in xs})
    ax.set_xticks(all_x, [str(int(x)) for x in all_x])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("useful tokens/s")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---:"] * len(head)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])


def _fmt(p: dict | None, key: str = "tokens_per_s", spec: str = ",.1f") -> str:
    return format(p[key], spec) if p and p.get(key) is not None else "-"


def seq_curve(a, common: list[str], run_engine) -> dict:
    """ftune (and TRL with --curve-trl) tokens/s at each --seq-lens length, about --tokens-per-step per step."""
    points = []
    for length in _ints(a.seq_lens):
        batch = max(1, a.tokens_per_step // length)
        args = [*common, "--objective", "sft", "--peft", "lora", "--packing", "on", "--truncation", "truncate",
                "--seq-len", str(length), "--batch-size", str(batch), "--only", "both" if a.curve_trl else "ftune"]
        data = run_engine(args, f"curve-seq-{length}", a.out)
        points.append({"seq_len": length, "batch_size": batch, "ftune": _point(data, "ftune"),
                       "trl": _point(data, "trl"), "command": data.get("command"), "error": data.get("error")})
    series = {"ftune": ([p["seq_len"] for p in points if p["ftune"]],
                        [p["ftune"]["tokens_per_s"] for p in points if p["ftune"]])}
    if a.curve_trl:
        series["TRL SFTTrainer"] = ([p["seq_len"] for p in points if p["trl"]],
                                    [p["trl"]["tokens_per_s"] for p in points if p["trl"]])
    out = {"points": points, "tokens_per_step": a.tokens_per_step,
           "markdown": _markdown(["seq len", "rows/step", "ftune tok/s", "ftune MFU", "TRL tok/s"],
                                 [[str(p["seq_len"]), str(p["batch_size"]), _fmt(p["ftune"]),
                                   _fmt(p["ftune"], "mfu", ".2%"), _fmt(p["trl"])] for p in points])}
    if not series["ftune"][0]:
        out["error"] = "no point of the seq curve produced a measurement; see the curve-seq-*.log files"
        return out
    out["png"] = str(a.out / "curve_seq.png")
    _plot(Path(out["png"]), series, "sequence length (tokens, packed rows)",
          f"SFT-LoRA, {a.model}, ~{a.tokens_per_step} tokens/step", log2x=True)
    return out


def nproc_curve(a, common: list[str], run_engine) -> dict:
    """ftune tokens/s with `ftune train --nproc N` for each N in --nprocs."""
    points = []
    for n in _ints(a.nprocs):
        args = [*common, "--objective", "sft", "--peft", "lora", "--packing", "on", "--truncation", "truncate",
                "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size), "--only", "ftune", "--nproc", str(n)]
        data = run_engine(args, f"curve-nproc-{n}", a.out)
        points.append({"nproc": n, "ftune": _point(data, "ftune"), "command": data.get("command"),
                       "error": data.get("error")})
    xs = [p["nproc"] for p in points if p["ftune"]]
    ys = [p["ftune"]["tokens_per_s"] for p in points if p["ftune"]]
    base = next((p["ftune"]["tokens_per_s"] for p in points if p["nproc"] == 1 and p["ftune"]), None)
    out = {"points": points,
           "markdown": _markdown(["processes", "ftune tok/s", "vs 1 process", "peak RSS MiB (largest process)"],
                                 [[str(p["nproc"]), _fmt(p["ftune"]),
                                   f"{p['ftune']['tokens_per_s'] / base:.2f}x" if base and p["ftune"] else "-",
                                   _fmt(p["ftune"], "peak_memory_mib", ",.0f")] for p in points])}
    if not xs:
        out["error"] = "no point of the nproc curve produced a measurement; see the curve-nproc-*.log files"
        return out
    out["png"] = str(a.out / "curve_nproc.png")
    ideal = (xs, [base * x for x in xs]) if base else None
    _plot(Path(out["png"]), {"ftune": (xs, ys)}, "data-parallel processes (ftune train --nproc N)",
          f"SFT-LoRA, {a.model}, {a.batch_size} x {a.seq_len}-token rows per process", ideal=ideal)
    return out
