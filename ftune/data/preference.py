"""Preference pairs: {prompt, chosen, rejected} records, HH-RLHF transcripts, and their tokenization.

Accepted records: `{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}` (a messages
value for chosen/rejected must end with the assistant turn), or HH-RLHF's `{"chosen": transcript, "rejected":
transcript}` where a transcript is `\\n\\nHuman: … \\n\\nAssistant: …`; the shared prompt is every turn before the
final assistant turn, and the two responses are the final assistant turns.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ftune.data.sources import (
    ROLES,
    DataError,
    DataProblems,
    _load_hub,
    check_unique_ids,
    read_jsonl,
    read_split_file,
)
from ftune.data.tokenize import IGNORE, prompt_ids, tokenize_conversation

log = logging.getLogger(__name__)
_TURN = re.compile(r"\n\n(Human|Assistant): ")


class MismatchedPair(DataError):
    """An HH-RLHF record whose two transcripts diverge before the final answer (a few exist in the real data)."""


def parse_hh(transcript: str, where: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{'role': 'user', 'content': 'a'}, {'role': 'assistant', ...}]."""
    parts = _TURN.split(transcript)
    if len(parts) < 3 or parts[0].strip():
        raise DataError(f"{where}: not an HH-RLHF transcript ('\\n\\nHuman: ... \\n\\nAssistant: ...').")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def _as_messages(value, where: str, name: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"{where}: '{name}' must be a string or a non-empty list of messages with role in {ROLES} and "
                    f"a string content.")


def _response(value, where: str, name: str) -> str:
    if isinstance(value, str):
        return value
    msgs = _as_messages(value, where, name)
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: '{name}' messages must end with the assistant's turn.")
    return msgs[-1]["content"]


def to_pair(row: dict, where: str) -> dict:
    """One raw record to {"prompt": messages, "chosen": str, "rejected": str}."""
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        sft = any(all(f in row for f in fields) for fields in (("prompt", "completion"), ("messages",),
                                                                 ("instruction", "output"), ("question", "answer")))
        hint = (" This looks like prompt/response data: train it with objective=sft, or add chosen and rejected "
                "responses." if sft else "")
        raise DataError(f"{where}: missing field(s) {missing}; preference data needs chosen and rejected "
                        f"(and prompt, unless they are HH-RLHF transcripts).{hint}")
    if "prompt" not in row:
        if not (isinstance(row["chosen"], str) and isinstance(row["rejected"], str)):
            raise DataError(f"{where}: without a 'prompt' field, chosen and rejected must be HH-RLHF transcripts.")
        chosen, rejected = parse_hh(row["chosen"], where), parse_hh(row["rejected"], where)
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise DataError(f"{where}: both transcripts must end with an Assistant turn.")
        if not chosen[:-1]:
            raise DataError(f"{where}: the transcripts have no Human turn before the final answer.")
        if chosen[:-1] != rejected[:-1]:
            raise MismatchedPair(f"{where}: chosen and rejected transcripts do not share the same conversation "
                                 f"before their final answers.")
        return {"prompt": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}
    return {"prompt": _as_messages(row["prompt"], where, "prompt"), "chosen": _response(row["chosen"], where, "chosen"),
            "rejected": _response(row["rejected"], where, "rejected")}


def _hh_path(cfg, split: str) -> Path | None:
    if cfg.path:  # the user's own copy, or an error: never FTUNE_DATA_DIR's or the hub's in its place
        p = Path(cfg.path).expanduser()
        mine = [p] if p.is_file() else [p / f"{split}.jsonl.gz", p / f"{split}.jsonl"]
        if not any(c.is_file() for c in mine):
            raise DataError(f"data.path={cfg.path}: neither a file nor a directory with {split}.jsonl.gz or "
                            f"{split}.jsonl. Point it at your copy of the pairs, or drop it to read "
                            f"FTUNE_DATA_DIR/hh-rlhf-harmless/ or the hub.")
        return next(c for c in mine if c.is_file())
    if not os.environ.get("FTUNE_DATA_DIR"):
        return None
    d = Path(os.environ["FTUNE_DATA_DIR"]).expanduser() / "hh-rlhf-harmless"
    return next((c for c in (d / f"{split}.jsonl.gz", d / f"{split}.jsonl") if c.is_file()), None)


def load_pairs(cfg, split: str, seed: int) -> tuple[list[dict], dict]:
    """Preference pairs of `split` for the data config `cfg` (sources: hh_rlhf, jsonl, hub)."""
    if cfg.source == "hh_rlhf":
        path = _hh_path(cfg, split)
        if path is not None:
            rows, origin = read_jsonl(path), str(path)
        else:
            hint = ("Point data.path at a .jsonl(.gz) file or a directory with {split}.jsonl.gz, or set "
                    "FTUNE_DATA_DIR=DIR with DIR/hh-rlhf-harmless/{split}.jsonl.gz.").replace("{split}", split)
            rows, origin = _load_hub(cfg.hub_id or "Anthropic/hh-rlhf", cfg.hub_config, split, hint), cfg.hub_id
    elif cfg.source == "jsonl":
        rows, origin = read_split_file(cfg, split)
    elif cfg.source == "hub" and cfg.hub_id:
        rows, origin = _load_hub(cfg.hub_id, cfg.hub_config, split, "Use data=jsonl with a local copy."), cfg.hub_id
    else:
        raise DataError(f"data.source={cfg.source} has no preference pairs; use data=hh_rlhf or data=jsonl with "
                        f"{{prompt, chosen, rejected}} records.")
    if not rows:
        raise DataError(f"{origin}: no records at all (an empty file or split '{split}'). Check data.path.")
    if cfg.limit is not None and split == cfg.split:
        rows = rows[: cfg.limit]
    p = DataProblems(origin)
    check_unique_ids(rows, origin, p)
    pairs, skipped, mismatched, identical = [], 0, [], 0
    for i, row in enumerate(rows):
        where = f"{origin}:{row.pop('_line', i + 1)}"
        try:
            pair = to_pair(row, where)
        except MismatchedPair:
            mismatched.append(where.rsplit(":", 1)[-1])
            continue
        except DataError as e:  # said with the others once every pair is read
            p.add(str(e))
            continue
        if not pair["chosen"].strip() or not pair["rejected"].strip() or pair["chosen"] == pair["rejected"]:
            skipped += 1
            identical += pair["chosen"] == pair["rejected"]
            continue
        if cfg.system_prompt and pair["prompt"][0]["role"] != "system":
            pair["prompt"] = [{"role": "system", "content": cfg.system_prompt}] + pair["prompt"]
        pair["id"] = str(row.get("id", f"{split}-{i}"))
        pairs.append(pair)
    p.raise_any()
    if mismatched:
        log.warning("%s: skipped %d pair(s) whose transcripts differ before the final answer (lines %s).", origin,
                    len(mismatched), ", ".join(mismatched[:10]))
    if not pairs:
        raise DataError(f"{origin}: no usable preference pairs in split '{split}' (read {len(rows)}: {identical} with "
                        f"identical chosen and rejected, {skipped - identical} with an empty response, "
                        f"{len(mismatched)} whose transcripts differ before the final answer). Each pair needs two "
                        f"different, non-empty responses to the same prompt; check data.path and data.limit.")
    return pairs, {"origin": origin, "read": len(rows), "skipped_pairs": skipped, "mismatched_pairs": len(mismatched)}


def tokenize_response(tokenizer, prompt: list[dict], response: str) -> tuple[list[int], list[int]]:
    """(ids, labels) of prompt + one assistant response; only the response (and EOS) is labelled."""
    ids, _ = tokenize_conversation(tokenizer, prompt + [{"role": "assistant", "content": response}])
    start = len(prompt_ids(tokenizer, prompt))
    return ids, [IGNORE] * start + ids[start:]


def tokenize_pairs_batch(batch, tokenizer, max_length, policy):
    """datasets.map function: chosen/rejected ids and labels per pair; a pair is dropped if either side is too long
    (`truncate` cuts both responses to fit instead)."""
    out = {k: [] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "dropped")}
    for prompt, chosen, rejected, ex_id in zip(batch["prompt"], batch["chosen"], batch["rejected"], batch["id"]):
        sides, dropped = {}, False
        for name, response in (("chosen", chosen), ("rejected", rejected)):
            ids, labels = tokenize_response(tokenizer, prompt, response)
            if len(ids) > max_length:
                if policy == "error":
                    raise DataError(f"pair '{ex_id}': the {name} side has {len(ids)} tokens > data.max_length="
                                    f"{max_length}. Raise data.max_length or set data.truncation=drop or truncate.")
                first = next((i for i, x in enumerate(labels) if x != IGNORE), len(labels))
                dropped = dropped or policy == "drop" or first >= max_length - 1
                ids, labels = ids[:max_length], labels[:max_length]
            sides[name] = (ids, labels)
        out["dropped"].append(dropped)
        for name, (ids, labels) in sides.items():
            out[f"{name}_input_ids"].append([] if dropped else ids)
            out[f"{name}_labels"].append([] if dropped else labels)
    return out
