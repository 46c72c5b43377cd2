"""ftune's side of scripts/bench_train.py: its command line, the data and batches it trains on (so TRL gets the
same), and one measured `ftune train` child."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from .machine import run_child, steady_rate, tail
from .settings import DPO_BETA, IGNORE, LORA, MAX_GRAD_NORM, SEED, WARMUP_RATIO, WEIGHT_DECAY


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
        from ftune.config import build

        extra["kind"] = getattr(build(cfg.objective), "data_kind", "sft")
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
