"""`ftune select`: run a data-selection method on its own and write the chosen subset for a later `ftune train`.

Composes the same config as `ftune train` (model, data, selection, seed), loads the training pool exactly as training
does (data.limit, the held-out split), runs the selector and writes to output_dir:

- selected.jsonl: the kept examples as {id, messages} records (`data=jsonl data.path=...` reads them back as-is),
- heldout.jsonl: the held-out examples, so a run on the subset evaluates on the same ones (`data.eval_split=...`),
- selected_indices.json: the kept examples' positions in the pool and their ids,
- report.json: the method's report (cluster sizes, budgets, Sinkhorn convergence ...) and whether the budget was met,
- scores.png: a histogram of the method's per-example score, pool against kept (when the method has a score).

Deterministic under `seed`.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ftune import preflight, run_record
from ftune.config import ConfigError, build, register_configs
from ftune.paths import configs_dir

log = logging.getLogger("ftune")
register_configs()
# Overrides of `ftune select` that also matter to the training run on the subset.
PASS_DATA_KEYS = ("data.max_length", "data.truncation", "data.packing", "data.num_proc")
OUTPUTS = ("selected.jsonl", "heldout.jsonl", "selected_indices.json", "report.json", "scores.png")


def _write_jsonl(path: Path, records: list[dict], keep_fields=()) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            row = {"id": str(r["id"]), "messages": r["messages"]}
            for name in ("tests", *keep_fields):  # data.keep_fields (e.g. a domain column) survive into the subset
                if name in r:
                    row[name] = r[name]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def plot_scores(scores: list[float], indices: list[int], name: str, out_png: Path) -> Path | None:
    import math

    pool = [s for s in scores if not math.isnan(s)]
    if not pool:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [scores[i] for i in indices if not math.isnan(scores[i])]
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = min(50, max(5, len(set(pool))))
    _, edges, _ = ax.hist(pool, bins=bins, alpha=0.5, label=f"pool ({len(pool)})")
    ax.hist(chosen, bins=edges, alpha=0.7, label=f"selected ({len(chosen)})")
    ax.set_xlabel(name)
    ax.set_ylabel("examples")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def train_command(out: Path, held_out: bool, overrides: list[str]) -> str:
    """The `ftune train` command that trains on the written subset with the same model, seed and data knobs."""
    keep = [o for o in overrides if not o.lstrip("+~").startswith(("data", "selection", "output_dir"))
            or o.lstrip("+~").startswith(PASS_DATA_KEYS)]
    args = ["ftune", "train", "data=jsonl", f"data.path={out / 'selected.jsonl'}", "selection=none"]
    args.append(f"data.eval_split={out / 'heldout.jsonl'}" if held_out else "data.eval_size=0")
    return shlex.join(args + keep)


def select_data(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Run `cfg.selection` on the training pool of `cfg.data`; write the outputs; return the report."""
    from ftune.data.pipeline import load_train_examples

    targets = preflight.validate_train(cfg)
    if targets["selection"] is None:
        raise ConfigError("ftune select needs a selection method, e.g. `selection=kmq selection.budget=1000` "
                          "(methods: configs/selection/*.yaml).")
    out = Path(cfg.output_dir)
    taken = [n for n in OUTPUTS if (out / n).exists()]
    if taken:
        raise ConfigError(f"output_dir={out} already holds a selection ({', '.join(taken)}). Choose another "
                          f"output_dir; nothing was overwritten.")
    preflight.check_writable(out)
    run_record.write(cfg, out)
    selector = build(cfg.selection)
    if hasattr(selector, "bind_config"):
        selector.bind_config(cfg)
    kind = getattr(targets["objective"], "data_kind", "sft")
    if kind != "sft":
        raise ConfigError(f"ftune select writes prompt/response examples, but {cfg.objective._target_} trains on "
                          f"'{kind}' data. Select with objective=sft, then train your objective on the subset.")
    pool, held_out, stats = load_train_examples(cfg.data, cfg.seed, None, kind)
    if hasattr(selector, "select"):
        sel = selector.select(pool, cfg.seed)
        indices, report, scores, score_name = sel.indices, sel.report, sel.scores, sel.score_name
    else:  # any `(records, seed) -> (kept, report)` callable: its records are the pool's own objects
        kept, report = selector(pool, cfg.seed)
        position = {id(r): i for i, r in enumerate(pool)}
        indices, scores, score_name = sorted(position[id(r)] for r in kept), None, ""
    if len(set(indices)) != len(indices):
        raise RuntimeError(f"{cfg.selection._target_} returned duplicate examples.")
    budget = cfg.selection.get("budget")
    report = {**report, "pool": len(pool), "selected": len(indices), "held_out": len(held_out),
              "budget_met": None if budget is None else len(indices) == min(budget, len(pool)),
              "data": {k: v for k, v in stats.items() if k in ("origin", "read", "skipped_empty")},
              "selection": cfg.selection._target_, "seed": cfg.seed}
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "selected.jsonl", [pool[i] for i in indices], cfg.data.keep_fields)
    if held_out:
        _write_jsonl(out / "heldout.jsonl", held_out, cfg.data.keep_fields)
    (out / "selected_indices.json").write_text(json.dumps(
        {"indices": indices, "ids": [str(pool[i]["id"]) for i in indices]}) + "\n")
    png = plot_scores(scores, indices, score_name, out / "scores.png") if scores else None
    report["score_histogram"] = png.name if png else None
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    command = train_command(out.resolve(), bool(held_out), overrides or [])
    print(f"Selected {len(indices)} of {len(pool)} examples with {cfg.selection._target_}; wrote {out}/selected.jsonl."
          f"\nTrain on them with:\n  {command}")
    report["train_command"] = command
    return report


@hydra.main(config_path=str(configs_dir()), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from ftune.reporting import run_reporting_errors

    overrides = list(HydraConfig.get().overrides.task)
    run_reporting_errors(lambda c: select_data(c, overrides), cfg, hydra_job=True)


if __name__ == "__main__":  # torchrun / accelerate launch: `python -m ftune.select key=value ...`
    from ftune.reporting import run_hydra_main

    sys.argv[0] = "ftune select"
    run_hydra_main(main, "select", sys.argv[1:])
