"""`ftune generate prompt="..."`: answer one prompt with a model or a run, through its chat template."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from ftune import preflight
from ftune.config import register_configs
from ftune.paths import configs_dir

register_configs()


def generate_answer(cfg: DictConfig) -> str:
    from accelerate.utils import set_seed

    from ftune.eval.generation import generate
    from ftune.models.runs import load_for_inference

    preflight.generate(cfg)
    set_seed(cfg.seed)
    model, tokenizer = load_for_inference(cfg)
    messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
        {"role": "user", "content": cfg.prompt}]
    answer = generate(model, tokenizer, [messages], cfg.max_new_tokens, batch_size=1, temperature=cfg.temperature)[0]
    print(answer)
    return answer


@hydra.main(config_path=str(configs_dir()), config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ftune.reporting import run_reporting_errors

    run_reporting_errors(generate_answer, cfg, hydra_job=True)


if __name__ == "__main__":  # torchrun / accelerate launch: `python -m ftune.generate key=value ...`
    from ftune.reporting import run_hydra_main

    sys.argv[0] = "ftune generate"
    run_hydra_main(main, "generate", sys.argv[1:])
