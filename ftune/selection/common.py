"""Shared pieces of the selection methods: the result type, budget checks and plain-text views of an example.

A selector is a callable `(records, seed) -> (kept_records, report)`; the methods here also expose
`select(records, seed) -> Selection` so that `ftune select` can write the source indices and the per-example scores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ftune.config import ConfigError

_SPACE = re.compile(r"\s+")


@dataclass
class Selection:
    indices: list[int]                      # positions in the pool, ascending (the source order is kept)
    report: dict = field(default_factory=dict)
    scores: list[float] | None = None       # one per pool example (what the method ranks or samples by), if any
    score_name: str = "score"


def kept(records: list[dict], sel: Selection) -> tuple[list[dict], dict]:
    """The selector-callable view of a Selection."""
    return [records[i] for i in sel.indices], sel.report


def check_budget(method: str, budget: int, pool: int) -> None:
    """A budget above the pool is a config mistake (the method would silently keep everything)."""
    if budget > pool:
        raise ConfigError(f"selection={method}: selection.budget={budget} is larger than the pool of {pool} training "
                          f"examples. Lower selection.budget (at most {pool}), or load more data (data.limit, "
                          f"data.size).")


def response_text(record: dict) -> str:
    return "\n".join(m["content"] for m in record["messages"] if m["role"] == "assistant")


def normalized_text(record: dict) -> str:
    """Lower-cased, whitespace-collapsed text of every turn with its role: equal for exact duplicates."""
    return "\n".join(m["role"] + ": " + _SPACE.sub(" ", m["content"]).strip().lower() for m in record["messages"])


def import_function(key: str, name: str, choices: tuple[str, ...], takes: str):
    """A user's `module.function` named by config key `key` (used when `name` is not one of the built-in `choices`);
    `takes` says what the function receives and returns, for the error."""
    import importlib

    module, _, attr = name.rpartition(".")
    try:
        if module:
            return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        pass
    raise ConfigError(f"{key}={name!r} must be one of {', '.join(choices)}, or an importable `module.function` "
                      f"{takes}.")
