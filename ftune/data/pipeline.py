"""From a data config to training rows: load, select, hold out, tokenize, pack."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ftune.data.batching import pack
from ftune.data.many_shot import load_task_examples, tokenize_many_shot_batch
from ftune.data.preference import load_pairs, tokenize_pairs_batch
from ftune.data.sources import DataError, load_conversations
from ftune.data.tokenize import tokenize_examples

# What an objective reads (its `data_kind`): a loader of raw examples and the tokenizing map function.
KINDS = {"sft": (load_conversations, None), "preference": (load_pairs, tokenize_pairs_batch),
         "many_shot": (load_task_examples, tokenize_many_shot_batch)}  # per-example pieces of many-shot sequences

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: list[dict]                      # rows for the loop (packed or one example per row)
    eval: list[dict]                       # rows for the held-out loss (never packed)
    stats: dict = field(default_factory=dict)


def load_train_examples(cfg, seed: int, selector=None, kind: str = "sft") -> tuple[list[dict], list[dict], dict]:
    """(train, held-out, stats) examples. The held-out part is `data.eval_split`, or else the last
    `data.eval_size` training examples (only when that leaves at least as many to train on)."""
    load = KINDS[kind][0]
    # e.g. a gsm_symbolic recipe's data.size kept with data=jsonl
    if cfg.size and cfg.source not in ("gsm_symbolic", "reasoning_gym"):
        log.warning("data.size=%s is ignored: it is the number of problems data=gsm_symbolic or data=reasoning_gym "
                    "generates, and data.source=%s reads its examples. To train on the first N of them, set "
                    "data.limit=N.",
                    cfg.size, cfg.source)
    train, stats = load(cfg, cfg.split, seed)
    held_out: list[dict] = []
    if cfg.eval_split:
        held_out, _ = load(cfg, cfg.eval_split, seed)
        held_out = held_out[: cfg.eval_size] if cfg.eval_size else held_out
    elif cfg.eval_size and len(train) >= 2 * cfg.eval_size:
        train, held_out = train[: -cfg.eval_size], train[-cfg.eval_size:]
    if selector is not None:
        train, report = selector(train, seed)
        stats["selection"] = report
    stats.update(train_examples=len(train), eval_examples=len(held_out))
    return train, held_out, stats


def prepare(cfg, tokenizer, tokenizer_key: str, seed: int, selector=None, pack_rows: bool = False,
            kind: str = "sft") -> PreparedData:
    train, held_out, stats = load_train_examples(cfg, seed, selector, kind)
    map_fn = KINDS[kind][1]
    train_rows = tokenize_examples(train, tokenizer, cfg, tokenizer_key, "train", map_fn)
    eval_rows = tokenize_examples(held_out, tokenizer, cfg, tokenizer_key, "eval", map_fn) if held_out else []
    stats["train_tokens"] = sum(len(v) for r in train_rows for k, v in r.items() if k.endswith("input_ids"))
    if pack_rows:
        before = len(train_rows)
        train_rows = pack(train_rows, cfg.max_length)
        stats["packed_rows"] = len(train_rows)
        log.info("Packed %d examples into %d rows of <= %d tokens.", before, len(train_rows), cfg.max_length)
    if not train_rows:
        raise DataError("no training rows after tokenization.")
    return PreparedData(train_rows, eval_rows, stats)


def task_examples(cfg, split: str, seed: int, limit: int | None) -> list[dict]:
    """Conversations of the eval task's split (e.g. GSM8K test), the gold solution as the last turn."""
    examples, _ = load_conversations(cfg, split, seed)
    return examples[:limit] if limit else examples
