"""`ftune eval`: task accuracy of a base model or of a run (`run_dir=...`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ftune.config import ConfigError, check_eval_data, register_configs, validate_common
from ftune.paths import configs_dir

log = logging.getLogger("ftune")
register_configs()


def evaluate(cfg: DictConfig) -> dict:
    from accelerate.utils import set_seed

    from ftune.eval.tasks import run_task, task_inputs
    from ftune.models.runs import load_for_inference

    validate_common(cfg)
    if cfg.eval.task == "none":
        raise ConfigError("eval.task=none: nothing to evaluate. Use eval=gsm8k or eval=preference.")
    check_eval_data(cfg.data, cfg.eval, in_training=False)
    set_seed(cfg.seed)
    model, tokenizer = load_for_inference(cfg)
    key = f"{tokenizer.name_or_path}|{len(tokenizer)}"
    metrics = run_task(model, tokenizer, task_inputs(cfg.data, cfg.eval, tokenizer, cfg.seed, key), cfg.eval,
                       Path(cfg.output_dir))
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith(("accuracy", "answer_format")))
    print(f"{cfg.eval.task}: {shown} (n={metrics['n']}); predictions in {Path(cfg.output_dir) / 'predictions.jsonl'}")
    return metrics


@hydra.main(config_path=str(configs_dir()), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ftune.cli import run_reporting_errors

    run_reporting_errors(evaluate, cfg)


if __name__ == "__main__":
    sys.argv[0] = "ftune eval"
    main()
