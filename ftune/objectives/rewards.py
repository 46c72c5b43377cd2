"""Reward functions of `objective=grpo`: a weighted list (`objective.rewards`), each scoring every completion of a
step; a completion's reward is the weighted sum of its scores.

Built in (`name:`):
- `verifier`: the task's own verifier. data=reasoning_gym: the task's `score_answer` on the answer extracted in the
  data's answer format (`<answer>...</answer>` by default), partial credit as the task gives it; data=gsm8k /
  gsm_symbolic: 1 when the final number equals the gold one (GSM8K-style extraction), else 0.
- `format`: 1 when the completion holds an answer in the data's answer format (reasoning-gym's template; GSM8K's
  `#### N`), else 0. A first signal for a model that does not answer in the format yet.
- `length`: DAPO's soft overlong punishment (Yu et al., arXiv 2503.14476, Eq. 13): 0 up to
  max_new_tokens - `cache` tokens, then falling linearly to -1 at max_new_tokens (`cache`: null = a fifth of it).

A user's own (`_target_: my_module.my_reward`; the launch directory is importable) is a plain function

    def my_reward(prompts: list[str], completions: list[str], *, ids: list[str], golds: list[str],
                  completion_ids: list[list[int]], truncated: list[bool], **kwargs) -> list[float | None]

called once per step with every completion of the step (the G completions of a prompt are consecutive, `prompts`
repeats each prompt G times): `ids` are the examples' ids, `golds` their reference responses, `truncated` whether a
completion hit max_new_tokens. Other keys of its entry in `objective.rewards` arrive in **kwargs. It returns one
score per completion: a finite number, or None where it does not apply (counted as 0). Anything else (the wrong
length, NaN, an exception) stops the run with its name and the prompt it failed on, before the optimizer sees it.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ftune.config import ConfigError
from ftune.training.watchdog import TrainingError

BUILT_IN = ("verifier", "format", "length")
VERIFIED_SOURCES = ("reasoning_gym", "gsm8k", "gsm_symbolic")
ENTRY_KEYS = ("name", "_target_", "weight")


class RewardError(TrainingError):
    """A reward function failed or returned something that is not one finite score per completion."""


@dataclass
class Reward:
    """One entry of `objective.rewards`: its name (for logs), weight and the function."""

    name: str
    weight: float
    fn: Callable[..., Sequence]
    kwargs: dict = field(default_factory=dict)


def _import(path: str) -> Callable:
    module, _, attr = str(path).rpartition(".")
    if not module:
        raise ConfigError(f"objective.rewards: _target_={path!r} is not an import path (module.function).")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise ConfigError(f"objective.rewards: cannot import {module!r} for _target_={path!r} ({e}). Put the module "
                          f"in the launch directory or on PYTHONPATH.") from None
    except AttributeError:
        raise ConfigError(f"objective.rewards: module {module!r} has no {attr!r} (_target_={path!r}).") from None
    if not callable(fn):
        raise ConfigError(f"objective.rewards: _target_={path!r} is not a function.")
    return fn


def parse(entries) -> list[dict]:
    """The checked entries of `objective.rewards` (config only: names, weights, imports); built later."""
    if not entries:
        raise ConfigError(f"objective.rewards is empty: name at least one reward, e.g. [{{name: verifier}}] (built "
                          f"in: {', '.join(BUILT_IN)}; or _target_: module.function).")
    out = []
    for i, e in enumerate(entries):
        e = dict(e) if hasattr(e, "keys") else {"name": e}
        has_name, has_target = "name" in e, "_target_" in e
        if has_name == has_target:
            raise ConfigError(f"objective.rewards[{i}]: give either name (one of {', '.join(BUILT_IN)}) or _target_ "
                              f"(module.function), got {e}.")
        if has_name and e["name"] not in BUILT_IN:
            import difflib

            close = difflib.get_close_matches(str(e["name"]), BUILT_IN, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"objective.rewards[{i}]: no built-in reward {e['name']!r}.{hint} Built in: "
                              f"{', '.join(BUILT_IN)}; your own: _target_: module.function.")
        weight = e.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"objective.rewards[{i}].weight={weight!r} must be a finite number.")
        fn = _import(e["_target_"]) if has_target else None
        name = e.get("name") or str(e["_target_"]).rpartition(".")[2]
        kwargs = {k: v for k, v in e.items() if k not in ENTRY_KEYS}
        if fn is not None and not signature_ok(fn, kwargs):
            raise ConfigError(f"objective.rewards[{i}]: {e['_target_']} cannot be called as a reward: it must take "
                              f"(prompts, completions, **kwargs) and the entry's own keys {sorted(kwargs)} "
                              f"(see ftune/objectives/rewards.py).")
        out.append({"name": name, "weight": float(weight), "fn": fn, "kwargs": kwargs})
    names = [e["name"] for e in out]
    if len(set(names)) < len(names):
        raise ConfigError(f"objective.rewards names a reward twice ({names}); each logs under its name.")
    return out


def check_source(entries: list[dict], source: str) -> None:
    """The built-ins that need a verifier or an answer format against data.source."""
    for e in entries:
        if e["fn"] is None and e["name"] in ("verifier", "format") and source not in VERIFIED_SOURCES:
            raise ConfigError(f"objective.rewards: {e['name']} needs a task with a verifier: data=reasoning_gym "
                              f"(the task's score_answer) or data=gsm8k / gsm_symbolic (the final number); data is "
                              f"{source}. Rewards that need no verifier: length, or your own function "
                              f"(_target_: module.function, see ftune/objectives/rewards.py).")


# ----------------------------------------------------------------------------------------------------- built-ins
_HASHES = re.compile(r"####\s*-?[\d,.$]+")


def verifier(data_cfg, seed: int) -> Callable:
    if data_cfg.source == "reasoning_gym":
        from ftune.eval.judges import Verifier

        judge = Verifier(data_cfg, seed)

        def score(prompts, completions, *, ids, **_):
            return [judge.score(str(i), c) for i, c in zip(ids, completions)]
    else:
        from ftune.eval import gsm8k

        def score(prompts, completions, *, golds, **_):
            return [float(gsm8k.score(c, g)) for c, g in zip(completions, golds)]
    return score


def answer_format(data_cfg) -> Callable:
    if data_cfg.source == "reasoning_gym":
        from ftune.data import reasoning_gym as rg

        template = rg.answer_template(data_cfg.get("answer_format") or "tags")

        def score(prompts, completions, **_):
            return [float(rg.extract(c, template)[1]) for c in completions]
    else:
        def score(prompts, completions, **_):
            return [float(bool(_HASHES.search(c))) for c in completions]
    return score


def length(max_new_tokens: int, cache: int | None = None) -> Callable:
    import torch

    from ftune.objectives.grpo_loss import soft_overlong_punishment

    cache = cache if cache is not None else max(1, max_new_tokens // 5)
    if not 0 < cache <= max_new_tokens:
        raise ConfigError(f"objective.rewards: length's cache={cache} must be in [1, max_new_tokens="
                          f"{max_new_tokens}].")

    def score(prompts, completions, *, completion_ids, **_):
        lengths = torch.tensor([len(c) for c in completion_ids])
        return soft_overlong_punishment(lengths, max_new_tokens, cache).tolist()
    return score


def build(entries: list[dict], data_cfg, seed: int, max_new_tokens: int) -> list[Reward]:
    out = []
    for e in entries:
        kwargs = dict(e["kwargs"])
        if e["fn"] is not None:
            fn = e["fn"]
        elif e["name"] == "verifier":
            fn = verifier(data_cfg, seed)
        elif e["name"] == "format":
            fn = answer_format(data_cfg)
        else:
            fn = length(max_new_tokens, kwargs.pop("cache", None))
        if kwargs and e["fn"] is None:
            raise ConfigError(f"objective.rewards: {e['name']} takes no {sorted(kwargs)} (length takes cache).")
        out.append(Reward(e["name"], e["weight"], fn, kwargs))
    return out


# ----------------------------------------------------------------------------------------------------- scoring
def _bad(value) -> bool:
    if value is None:
        return False
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        return True
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError):
        return True


def score(reward: Reward, prompts: list[str], completions: list[str], **columns) -> list[float]:
    """One reward's scores of every completion (None -> 0), checked: one finite number per completion."""
    try:
        out = reward.fn(prompts, completions, **columns, **reward.kwargs)
    except Exception as e:  # noqa: BLE001 - any failure of a user's function is reported with where it happened
        raise RewardError(f"reward {reward.name!r} raised {type(e).__name__}: {e} (scoring {len(completions)} "
                          f"completions; first prompt: {prompts[0][-200:]!r}).") from e
    if isinstance(out, (str, bytes)) or not hasattr(out, "__len__") or len(out) != len(completions):
        got = f"{len(out)} values" if hasattr(out, "__len__") else type(out).__name__
        raise RewardError(f"reward {reward.name!r} returned {got} for {len(completions)} completions: it must "
                          f"return one score per completion (see ftune/objectives/rewards.py).")
    out = list(out)
    for i, v in enumerate(out):
        if _bad(v):
            raise RewardError(f"reward {reward.name!r} gave {v!r} for completion {i} (prompt: {prompts[i][-200:]!r}; "
                              f"completion: {completions[i][:200]!r}): scores must be finite numbers or None. Nothing "
                              f"from this step reached the optimizer.")
    return [0.0 if v is None else float(v) for v in out]


def signature_ok(fn: Callable, kwargs: dict) -> bool:
    """Whether a function can be called as a reward: (prompts, completions, the columns, the entry's own keys)."""
    try:
        inspect.signature(fn).bind([], [], ids=[], golds=[], completion_ids=[], truncated=[], **kwargs)
    except (TypeError, ValueError):
        return False
    return True
