"""`ftune soup RUN_DIR RUN_DIR ... [--out DIR] [--greedy]`: model soups (Wortsman et al., ICML 2022, arXiv 2203.05482;
repo mlfoundations/model-soups `main.py`).

Ingredients are fine-tunes of the same base. Uniform soup: theta = mean_k theta_k. Greedy soup (the paper's code):
sort the ingredients by held-out accuracy, start from the best, and add each next one as
(n theta_soup + theta_i) / (n + 1) only if the held-out accuracy strictly improves.
Adaptation: each ingredient is first merged into a plain model (`ftune merge`'s folding; full fine-tunes as they are)
and the weights averaged in float32, so LoRA ingredients are averaged as merged updates (alpha/r) B A, never A and B
separately. Greedy accuracy is `eval.task` on the first run's data (`--eval`, `--limit`), scored on **validation**
problems by default (`--select-on validation`): reasoning-gym problems of their own validation seeds (never a test
or training problem), or for GSM8K-style data the run's held-out training examples (data.eval_split, or the last
data.eval_size examples of the training split). `--select-on test` scores the eval's test split instead, as some
papers do; the soup's test accuracy is then optimistic, and ftune says so.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ftune.config import ConfigError

State = dict[str, torch.Tensor]


def average(states: list[State], weights: list[float] | None = None) -> State:
    """Elementwise (weighted) mean in float32; all states must hold the same tensors."""
    keys = states[0].keys()
    for k, s in enumerate(states[1:], 2):
        if s.keys() != keys or any(s[n].shape != states[0][n].shape for n in keys):
            diff = sorted(set(s) ^ set(keys))[:5] or [n for n in keys if s[n].shape != states[0][n].shape][:5]
            raise ConfigError(f"soup ingredient {k} has other tensors than the first ({diff}): ingredients must be "
                              f"fine-tunes of the same base with the same architecture after merging.")
    w = weights or [1.0 / len(states)] * len(states)
    return {n: sum(wi * s[n].float() for wi, s in zip(w, states)) for n in keys}


def greedy_soup(states: list[State], score: Callable[[State], float]) -> tuple[State, list[int], list[float], float]:
    """(soup, kept ingredient indices in order added, each ingredient's own score, the soup's score)."""
    scores = [score(s) for s in states]
    order = sorted(range(len(states)), key=lambda i: -scores[i])  # stable: ties keep the given order
    soup, kept, best = {n: t.float() for n, t in states[order[0]].items()}, [order[0]], scores[order[0]]
    for i in order[1:]:
        n = len(kept)
        candidate = average([soup, states[i]], [n / (n + 1), 1 / (n + 1)])
        s = score(candidate)
        if s > best:  # strictly better, as in the paper's code
            soup, kept, best = candidate, [*kept, i], s
    return soup, kept, scores, best


SELECT_ON = ("validation", "test")


def _accuracy_fn(model, tokenizer, saved, eval_name: str | None, limit: int | None, max_new_tokens: int | None,
                 out: Path, select_on: str = "validation"):
    """score(state): `eval.task` accuracy of `model` with `state` loaded, on the first run's data (its validation
    problems, or with select_on=test the eval's test split)."""
    from ftune.eval.tasks import run_task, task_inputs
    from ftune.models.loading import fingerprint, resolve_model_dir
    from ftune.paths import configs_dir

    eval_cfg = OmegaConf.load(configs_dir() / "eval" / f"{eval_name}.yaml") if eval_name else saved.eval
    overrides = {k: v for k, v in (("limit", limit), ("max_new_tokens", max_new_tokens)) if v is not None}
    eval_cfg = OmegaConf.merge(eval_cfg, overrides)
    if eval_cfg.task == "none":
        raise ConfigError("--greedy needs a held-out accuracy, and the first run was trained with eval=none. Pass "
                          "--eval NAME (a configs/eval/ choice, e.g. gsm8k) and --limit N.")
    model_dir = resolve_model_dir(saved.model.name_or_path, saved.model.revision)
    inputs = task_inputs(saved.data, eval_cfg, tokenizer, saved.seed, fingerprint(model_dir) + str(model_dir),
                         part=select_on)
    calls = [0]

    def score(state: State) -> float:
        model.load_state_dict({k: v.to(model.dtype) for k, v in state.items()})
        calls[0] += 1
        with torch.no_grad():
            return float(run_task(model.eval(), tokenizer, inputs, eval_cfg, out / f"candidate-{calls[0]}",
                                  progress=False)["accuracy"])

    return score


def make_soup(run_dirs: list[str | Path], out: str | Path, force: bool = False, greedy: bool = False,
              eval_name: str | None = None, limit: int | None = None, max_new_tokens: int | None = None,
              select_on: str | None = None) -> Path:
    import tempfile

    from ftune.merge import check_output, load_merged, write_model
    from ftune.models.loading import DTYPES, load_tokenizer

    out = Path(out).expanduser()
    if len(run_dirs) < 2:
        raise ConfigError("a soup needs at least two runs: ftune soup RUN_DIR RUN_DIR ... --out DIR.")
    check_output(out, force, [Path(r) for r in run_dirs])
    given = [f for f, v in (("--eval", eval_name), ("--limit", limit), ("--max-new-tokens", max_new_tokens),
                            ("--select-on", select_on)) if v is not None]
    if given and not greedy:
        raise ConfigError(f"{', '.join(given)}: for a greedy soup only (how its candidates are scored); a uniform "
                          f"soup scores nothing. Add --greedy, or drop {'it' if len(given) == 1 else 'them'}.")
    select_on = select_on or "validation"
    if select_on not in SELECT_ON:
        raise ConfigError(f"--select-on {select_on}: validation (held-out problems that are not reported; the default) "
                          f"or test (the eval's test split, which makes the soup's test accuracy optimistic).")
    for flag, v in (("--limit", limit), ("--max-new-tokens", max_new_tokens)):
        if v is not None and v < 1:
            raise ConfigError(f"{flag}={v} must be >= 1.")
    if eval_name is not None:
        from ftune.paths import configs_dir

        choices = sorted(p.stem for p in (configs_dir() / "eval").glob("*.yaml"))
        if eval_name not in choices:
            from ftune.config import suggest

            raise ConfigError(f"--eval {eval_name}: no such eval config.{suggest(eval_name, choices)} Choices: "
                              f"{', '.join(choices)}.")
    states, first = [], None
    for run in run_dirs:
        model, weights, saved = load_merged(run, allow_full=True)
        if first is None:
            first = (model, weights, saved)
        elif saved.model.name_or_path != first[2].model.name_or_path:
            raise ConfigError(f"{run} fine-tuned {saved.model.name_or_path}, {run_dirs[0]} fine-tuned "
                              f"{first[2].model.name_or_path}: soup ingredients must share their base model.")
        states.append({k: v.detach().float().clone() for k, v in model.state_dict().items()})
    model, weights, saved = first
    info = {"ingredients": [str(Path(r).resolve()) for r in run_dirs], "method": "greedy" if greedy else "uniform"}
    if greedy:
        info["selected_on"] = select_on
        if select_on == "test":
            print("greedy soup: selecting on the test split (--select-on test): its accuracy there is optimistic, "
                  "not a held-out figure.", file=sys.stderr)
    if greedy:
        tokenizer = load_tokenizer(weights)
        with tempfile.TemporaryDirectory() as scratch:
            score = _accuracy_fn(model, tokenizer, saved, eval_name, limit, max_new_tokens, Path(scratch), select_on)
            soup, kept, scores, best = greedy_soup(states, score)
        info.update(kept=[info["ingredients"][i] for i in kept], ingredient_accuracy=scores, soup_accuracy=best)
        print(f"greedy soup: kept {len(kept)} of {len(states)} ({select_on} accuracy {max(scores):.3f} -> {best:.3f})")
    else:
        soup = average(states)
    model.load_state_dict(soup)
    return write_model(model.to(DTYPES[saved.model.dtype]), weights, out, force, info, [Path(r) for r in run_dirs])


def main(argv: list[str] | None = None) -> None:
    from ftune.reporting import run_reporting_errors

    parser = argparse.ArgumentParser(prog="ftune soup", description="Average fine-tunes of one base model "
                                     "(uniform or greedy model soup) into a plain model directory.")
    parser.add_argument("run_dirs", nargs="+", help="runs (or their final/ or checkpoint-N/), same base model")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    parser.add_argument("--greedy", action="store_true", help="greedy soup by held-out accuracy (else uniform)")
    parser.add_argument("--eval", default=None, help="configs/eval choice for --greedy (default: the first run's)")
    parser.add_argument("--limit", type=int, default=None, help="held-out examples scored per candidate")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="generation length for --greedy")
    parser.add_argument("--select-on", default=None, choices=SELECT_ON,
                        help="what --greedy scores candidates on: validation (default; held-out problems that are "
                             "not reported) or test (the eval's test split; the soup's test accuracy is then "
                             "optimistic)")
    a = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = run_reporting_errors(lambda a: make_soup(a.run_dirs, a.out, a.force, a.greedy, a.eval, a.limit,
                                                   a.max_new_tokens, a.select_on), a)
    print(f"soup: {out}")


if __name__ == "__main__":
    sys.argv[0] = "ftune soup"
    main()
