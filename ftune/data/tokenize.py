"""Conversations to token ids and label masks through the model's own chat template.

The ids of a training example are exactly `tokenizer.apply_chat_template(messages)`; labels are -100 everywhere
except the assistant turns (their content and end-of-turn tokens), so the prompt never counts in the loss. Eval and
generate build their prompts with the same template (`add_generation_prompt=True`), so train and inference agree.

Truncation policy (`data.truncation`): `drop` skips (and counts) examples longer than `data.max_length`;
`truncate` cuts the end of the response and keeps the prompt whole (examples whose prompt alone does not fit are
dropped); `error` stops with the example's id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from ftune.data.sources import DataError
from ftune.paths import ftune_home

log = logging.getLogger(__name__)
IGNORE = -100
CACHE_VERSION = "1"


def _ids(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    if tokenizer.chat_template:
        out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    # No template (a base model): plain "prompt\n\nresponse" text, turns joined by blank lines.
    text = "\n\n".join(m["content"] for m in messages) + ("\n\n" if add_generation_prompt else "")
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Ids of the prompt for generation: every message, then the assistant header."""
    return _ids(tokenizer, messages, add_generation_prompt=True)


def tokenize_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with every assistant turn labelled and an EOS at the end."""
    ids = _ids(tokenizer, messages)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _ids(tokenizer, messages[:i], add_generation_prompt=True)
        start = len(head)
        end = len(_ids(tokenizer, messages[: i + 1])) if i + 1 < len(messages) else len(ids)
        if ids[:start] != head:
            raise DataError("this tokenizer's chat template does not render a conversation as a prefix of its "
                            "continuation, so the response tokens cannot be located; use a model whose template "
                            "does (ChatML, Llama-3, ...) or data without a template.")
        labels[start:end] = ids[start:end]
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in ids[-2:]:
        ids.append(eos)
        labels.append(eos)
    return ids, labels


def _truncate(ids, labels, max_length, policy, ex_id):
    if len(ids) <= max_length:
        return ids, labels
    if policy == "error":
        raise DataError(f"example '{ex_id}' has {len(ids)} tokens > data.max_length={max_length}. Raise "
                        f"data.max_length, or set data.truncation=drop (skip) or truncate (cut the response).")
    if policy == "truncate":
        first_label = next((i for i, x in enumerate(labels) if x != IGNORE), len(labels))
        if first_label < max_length - 1:
            return ids[:max_length], labels[:max_length]
    return None


def _tokenize_batch(batch, tokenizer, max_length, policy):
    out = {"input_ids": [], "labels": [], "id": [], "dropped": []}
    for messages, ex_id in zip(batch["messages"], batch["id"]):
        ids, labels = tokenize_conversation(tokenizer, messages)
        kept = _truncate(ids, labels, max_length, policy, ex_id)
        out["dropped"].append(kept is None)
        out["input_ids"].append(kept[0] if kept else [])
        out["labels"].append(kept[1] if kept else [])
        out["id"].append(ex_id)
    return out


def tokenize_examples(examples: list[dict], tokenizer, cfg, tokenizer_key: str, what: str = "train",
                      map_fn=None) -> list[dict]:
    """Tokenize examples with `map_fn` (default: conversations -> input_ids/labels), in parallel over
    `data.num_proc` and cached under $FTUNE_HOME/tokenized.

    `map_fn(batch, tokenizer, max_length, policy)` returns token columns plus a boolean `dropped` column. Returns the
    kept rows (token columns and `id`); raises DataError if nothing fits `data.max_length`.
    """
    import datasets

    map_fn = map_fn or _tokenize_batch
    records = [dict(e, id=str(e["id"])) for e in examples]
    # answer, tests and data.keep_fields columns ride along with the example; they are not tokenized.
    riding = ("answer", "tests", *(getattr(cfg, "keep_fields", None) or ()))
    fields = sorted(k for k in records[0] if k not in riding)
    payload = json.dumps([[r[k] for k in fields] for r in records], sort_keys=True).encode()
    key = hashlib.sha256(payload + f"|{map_fn.__module__}.{map_fn.__name__}|{tokenizer_key}|{cfg.max_length}|"
                                   f"{cfg.truncation}|{CACHE_VERSION}".encode())
    cache = ftune_home() / "tokenized" / key.hexdigest()[:24]
    if not (cache / "dataset_info.json").exists():
        ds = datasets.Dataset.from_list([{k: r[k] for k in fields} for r in records])
        ds = ds.map(map_fn, batched=True, batch_size=256, num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
                    remove_columns=[f for f in fields if f != "id"], desc=f"Tokenizing {what}",
                    fn_kwargs=dict(tokenizer=tokenizer, max_length=cfg.max_length, policy=cfg.truncation))
        tmp = Path(f"{cache}.tmp-{os.getpid()}")
        ds.save_to_disk(str(tmp))
        try:
            os.replace(tmp, cache)
        except OSError:  # another process cached it first
            shutil.rmtree(tmp, ignore_errors=True)
    ds = datasets.load_from_disk(str(cache))
    dropped = sum(ds["dropped"])
    label_cols = [c for c in ds.column_names if c.endswith("labels")]
    rows = [{k: v for k, v in r.items() if k != "dropped"} for r in ds if not r["dropped"]]
    rows = [r for r in rows if all(any(x != IGNORE for x in r[c][1:]) for c in label_cols)]
    if dropped:
        log.warning("%s: dropped %d of %d example(s) longer than data.max_length=%d (data.truncation=%s).",
                    what, dropped, len(ds), cfg.max_length, cfg.truncation)
    if not rows:
        raise DataError(f"{what}: all {len(ds)} example(s) are longer than data.max_length={cfg.max_length} (or have "
                        f"no response tokens). Raise data.max_length or set data.truncation=truncate.")
    return rows
