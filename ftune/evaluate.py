"""`ftune eval`: task accuracy of a base model or of a run (`run_dir=...`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ftune import preflight, run_record
from ftune.config import register_configs
from ftune.paths import configs_dir

log = logging.getLogger("ftune")
register_configs()


def evaluate(cfg: DictConfig) -> dict:
    from accelerate.utils import set_seed

    from ftune.data.reasoning_gym import check_config as check_reasoning_gym
    from ftune.data.reasoning_gym import eval_problems
    from ftune.eval.tasks import run_task, task_inputs, task_table
    from ftune.models.runs import load_for_inference

    preflight.evaluate(cfg)
    run_record.write(cfg, Path(cfg.output_dir))
    set_seed(cfg.seed)
    inputs = None
    if cfg.eval.task == "reasoning_gym":  # held-out problems drawn (and checked against training) before the model
        data, seed = _trained_on(cfg)
        check_reasoning_gym(OmegaConf.create({"data": data, "eval": cfg.eval, "seed": seed}))
        inputs = eval_problems(data, cfg.eval, seed)
    model, tokenizer = load_for_inference(cfg)
    key = f"{tokenizer.name_or_path}|{len(tokenizer)}"
    if inputs is None:
        inputs = task_inputs(cfg.data, cfg.eval, tokenizer, cfg.seed, key)
    metrics = run_task(model, tokenizer, inputs, cfg.eval, Path(cfg.output_dir))
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith(("accuracy", "answer_format")))
    print(f"{cfg.eval.task}: {shown} (n={metrics['n']}); predictions in {Path(cfg.output_dir) / 'predictions.jsonl'}")
    if metrics.get("tasks"):
        print(task_table(None, metrics))
    return metrics


def _trained_on(cfg: DictConfig) -> tuple[DictConfig, int]:
    """(data config, seed) whose problems the held-out set must avoid: a run's own reasoning-gym mixture when
    `run_dir` is a reasoning-gym run (its tasks are then the default eval tasks, with its prompt and answer format),
    else the command line's."""
    if cfg.run_dir:
        from ftune.models.runs import saved_config

        saved = saved_config(cfg.run_dir)
        if saved is not None and saved.data.get("source") == "reasoning_gym":
            return saved.data, saved.seed
    return cfg.data, cfg.seed


@hydra.main(config_path=str(configs_dir()), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ftune.reporting import run_reporting_errors

    run_reporting_errors(evaluate, cfg, hydra_job=True)


if __name__ == "__main__":  # torchrun / accelerate launch: `python -m ftune.evaluate key=value ...`
    from ftune.reporting import run_hydra_main

    sys.argv[0] = "ftune eval"
    run_hydra_main(main, "eval", sys.argv[1:])
