"""Run metrics: JSONL (one record per line, flushed), TensorBoard, and a loss-curve PNG at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLog:
    """Append-only metric records in `run_dir/metrics.jsonl` and `run_dir/tensorboard/` (rank 0 only).

    On resume, records past the resumed step are dropped so the file describes one consistent trajectory.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        self._f = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
        except ImportError:  # tensorboard is optional at run time
            self.tb = None

    def log(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps({"step": step, **record}) + "\n")
        self._f.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._f.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: Path, out_png: Path) -> Path | None:
    """Training (and eval) loss against step, as a PNG; None when there is nothing to plot."""
    records = read_metrics(metrics_path) if Path(metrics_path).exists() else []
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def summary_text(s: dict, out: Path) -> str:
    lines = [f"Done: {s['steps']} steps, {s['train_tokens']:.0f} tokens in {s['train_seconds']:.1f}s "
             f"({(s['tokens_per_s'] or 0):.0f} tok/s); final train loss {s['final_loss']:.4f}"
             if s["train_tokens"] or not s["steps"] else
             f"Done: nothing left to train, the checkpoint was at step {s['steps']} (raise trainer.max_steps to go on)"]
    if s["eval"]:
        lines.append("  held-out: " + ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in s["eval"].items()))
    if s["task_end"]:
        start, end = s["task_start"] or {}, s["task_end"]
        keys = [k for k in end if k.endswith("_accuracy")] or ["accuracy"]  # `accuracy` repeats one of them
        keys += ["answer_format"] if "answer_format" in end else []  # answers ending in `#### N`
        shown = [f"{k} {start[k]:.3f} -> {end[k]:.3f}" if k in start else f"{k} {end[k]:.3f}" for k in keys]
        lines.append(f"  {s['task']} (n={end['n']}): " + ", ".join(shown))
        if end.get("tasks"):
            from ftune.eval.tasks import task_table

            lines.append(task_table(s["task_start"], end))
    if s.get("composition"):
        c = s["composition"]
        lines.append(f"  training data ({c['examples']} examples): "
                     + ", ".join(f"{k} {v:.1f}%" for k, v in c["percent"].items()))
    lines.append(f"  model: {s['output']}\n  metrics: {out / 'metrics.jsonl'} (TensorBoard: {out / 'tensorboard'}), "
                 f"curve: {out / 'loss.png'}")
    return "\n".join(lines)
