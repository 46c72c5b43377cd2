"""Reward functions for the GRPO tests, named by `_target_: _rewards.NAME` (tests/ is put on sys.path)."""

from __future__ import annotations


def even(prompts, completions, *, completion_ids, **kwargs):
    """The share of a completion's tokens with an even id: a tiny random model starts near 0.5 and can learn it."""
    return [sum(1 for t in c if t % 2 == 0) / max(1, len(c)) for c in completion_ids]


def nan(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)


def raises(prompts, completions, **kwargs):
    raise KeyError("no_such_column")


def short(prompts, completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def scaled(prompts, completions, *, factor, **kwargs):
    return [factor * len(c) for c in completions]
