"""Read raw examples from a source and turn each into a conversation: {"id", "messages", "answer"?}.

Sources: `gsm8k` (local JSONL or the hub), `gsm_symbolic` (generated offline by reasoning-gym), `reasoning_gym` (a
mixture of reasoning-gym tasks, ftune.data.reasoning_gym), `jsonl` (your files), `hub` (any hub dataset). Formats:
prompt/completion, chat `messages`, alpaca instruction/input/output, GSM8K question/answer. Bad lines fail with
file:line before any model is loaded.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path

from ftune.config import said_at_once

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
FORMAT_FIELDS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "gsm8k": ("question", "answer"),
}


class DataError(ValueError):
    """Bad or missing data; the message names the file (and line) and the fix."""


class DataProblems:
    """The data phase's collector (the config's is ftune/preflight.py): the checks of every line of a file run to the
    end, and what they found is one DataError, its first SHOWN problems said with their lines and fixes and the rest
    counted. One problem reads exactly as its own message."""

    SHOWN = 10

    def __init__(self, what: str):
        self.what, self.found, self.more = what, [], 0

    def add(self, message: str) -> None:
        if len(self.found) < self.SHOWN:
            self.found.append(message)
        else:
            self.more += 1

    def raise_any(self) -> None:
        if self.found:
            raise DataError(said_at_once(self.found, self.what, self.more))


def read_jsonl(path: Path, key: str = "data.path") -> list[dict]:
    """Parse a .jsonl (or .jsonl.gz) file; malformed lines raise DataError with file:line (`key`: the setting that
    named the file, for a missing one)."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows, p = [], DataProblems(str(path))
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    p.add(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}). Each line must be one "
                          f"JSON object; fix or delete that line.")
                    continue
                if not isinstance(row, dict):
                    p.add(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}. The file must be "
                          f"JSON Lines: one {{...}} object per line (a .json array is not read).")
                    continue
                row.setdefault("_line", lineno)
                rows.append(row)
    except UnicodeDecodeError:
        raise DataError(f"{path}:{_first_non_utf8_line(path, opener)}: not UTF-8 text. Re-encode the file as UTF-8 "
                        f"(e.g. `iconv -f latin1 -t utf-8`).") from None
    except FileNotFoundError:
        raise DataError(f"{path}: no such file. Check {key} (relative paths resolve against "
                        f"{Path.cwd()}).") from None
    p.raise_any()
    return rows


def read_split_file(cfg, split: str) -> tuple[list[dict], str]:
    """(rows, origin) of `split` for data.source=jsonl: data.split names the file data.path; any other split (an
    eval split) is the path of its own file."""
    own = split == cfg.split
    path = Path(cfg.path if own else split).expanduser()
    return read_jsonl(path, "data.path" if own else "data.eval_split"), str(path)


def _first_non_utf8_line(path: Path, opener) -> int:
    with opener(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return 0


def check_unique_ids(rows: list[dict], origin: str, p: DataProblems) -> None:
    """Ids given in the data must be unique: caches, reference log-probs and reports are keyed by them."""
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        if "id" not in row:
            continue
        line = row.get("_line", i + 1)
        first = seen.setdefault(str(row["id"]), line)
        if first != line:
            p.add(f"{origin}:{line}: id {str(row['id'])!r} already used at line {first}. Ids must be unique: "
                  f"remove the duplicate example or give it another id.")


def _hub_offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(v, "0").lower() in ("1", "true", "yes") for v in flags)


def _load_hub(hub_id: str, hub_config: str | None, split: str, hint: str) -> list[dict]:
    """Rows of a hub dataset. Offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE), datasets reads its own cache, as on a
    cluster whose cache was filled on a machine with network; a dataset not in it fails at once with `hint`."""
    from ftune.models.loading import _hub_reachable

    offline = _hub_offline()
    if not offline and not _hub_reachable():
        raise DataError(f"cannot load '{hub_id}' split '{split}': the Hugging Face hub cannot be reached. With a copy "
                        f"in the datasets cache, set HF_DATASETS_OFFLINE=1 to read it. {hint}")
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, hub_config, split=split)
    except (ConnectionError, FileNotFoundError, ValueError) as e:
        said = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = ("offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE set) and not in the datasets cache" if offline
                 else "the hub refused it")
        raise DataError(f"cannot load '{hub_id}'{f' ({hub_config})' if hub_config else ''} split '{split}': {where} "
                        f"({said}). {hint}") from None
    return [dict(r, _line=i + 1) for i, r in enumerate(ds)]


def _gsm8k_rows(cfg, split: str) -> tuple[list[dict], str]:
    hint = ("Point data.path at a directory with {train,test}.jsonl (fields question, answer), or set "
            "FTUNE_DATA_DIR=DIR with DIR/gsm8k/{train,test}.jsonl.")
    if cfg.path:  # the user's own copy, or an error: never FTUNE_DATA_DIR's or the hub's in its place
        p = Path(cfg.path).expanduser()
        mine = p if p.suffix in (".jsonl", ".gz") else p / f"{split}.jsonl"
        if not mine.is_file():
            raise DataError(f"data.path={cfg.path}: {mine} does not exist. {hint}")
        return read_jsonl(mine), str(mine)
    if os.environ.get("FTUNE_DATA_DIR"):
        shared = Path(os.environ["FTUNE_DATA_DIR"]).expanduser() / "gsm8k" / f"{split}.jsonl"
        if shared.is_file():
            return read_jsonl(shared), str(shared)
    return _load_hub(cfg.hub_id or "openai/gsm8k", cfg.hub_config or "main", split, hint), cfg.hub_id


def _gsm_symbolic_rows(cfg, split: str, seed: int) -> tuple[list[dict], str]:
    import reasoning_gym

    size = cfg.size or 1000
    # Distinct seeds per split so the test problems are not the training problems.
    split_seed = seed + (0 if split == "train" else 1_000_003)
    ds = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=split_seed)
    rows = [{"question": x["question"], "answer": x["metadata"]["answer_cot"], "_line": i + 1}
            for i, x in enumerate(ds)]
    return rows, f"reasoning-gym:gsm_symbolic(seed={split_seed})"


def detect_format(row: dict, fmt: str, where: str) -> str:
    if fmt != "auto":
        return fmt
    for name, fields in FORMAT_FIELDS.items():
        if all(f in row for f in fields):
            return name
    if {"chosen", "rejected"} <= set(row):
        raise DataError(f"{where}: this is a preference pair (chosen/rejected), but the objective trains on "
                        f"prompt/response examples. Use a preference objective (objective=dpo), or give "
                        f"{{prompt, completion}} records.")
    raise DataError(f"{where}: cannot tell the format from fields {sorted(k for k in row if k != '_line')}. Use "
                    f"{{prompt, completion}}, {{messages: [...]}}, {{instruction, input, output}} or "
                    f"{{question, answer}}, or map your names with data.fields={{prompt: ..., completion: ...}}.")


def to_conversation(row: dict, fmt: str, where: str, system_prompt: str | None = None) -> dict:
    """One raw row to {"messages": [...], "answer": ...}; raises DataError naming the missing field."""
    fields = FORMAT_FIELDS[fmt]
    missing = [f for f in fields if f not in row]
    if missing:
        has = sorted(k for k in row if k != "_line")
        raise DataError(f"{where}: missing field(s) {missing} for format '{fmt}' (has {has}). "
                        f"Add them, or map names with data.fields.")
    if fmt == "messages":
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}.")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: each message needs role in {ROLES} and a string content; got {m!r:.80}.")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's (the training target).")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        answer = None
    else:
        if fmt == "alpaca":
            prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
            completion = row["output"]
        else:
            prompt, completion = row[fields[0]], row[fields[1]]
        for name, value in zip(fields, (prompt, completion)):
            if not isinstance(value, str):
                raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}.")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        answer = completion
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return {"messages": messages, "answer": answer}


def load_conversations(cfg, split: str, seed: int) -> tuple[list[dict], dict]:
    """Load `split` of the source in `cfg` (a DataConfig) as conversations; returns (examples, stats)."""
    source = cfg.source
    if source == "gsm8k":
        rows, origin = _gsm8k_rows(cfg, split)
    elif source == "gsm_symbolic":
        rows, origin = _gsm_symbolic_rows(cfg, split, seed)
    elif source == "reasoning_gym":
        from ftune.data.reasoning_gym import training_rows

        rows, origin = training_rows(cfg, seed)
    elif source == "jsonl":
        rows, origin = read_split_file(cfg, split)
    elif source == "hub":
        if not cfg.hub_id:
            raise DataError("data.source=hub needs data.hub_id=ORG/NAME.")
        rows = _load_hub(cfg.hub_id, cfg.hub_config, split, "Use data=jsonl with a local copy instead.")
        origin = cfg.hub_id
    else:
        raise DataError(f"data.source={source!r} holds no prompt/response examples; use gsm8k, gsm_symbolic, "
                        f"reasoning_gym, jsonl or hub (hh_rlhf holds preference pairs, for objective=dpo).")
    if not rows:
        raise DataError(f"{origin}: no records at all (an empty file or split '{split}'). Check data.path.")
    if cfg.limit is not None and split == cfg.split:
        rows = rows[: cfg.limit]
    p = DataProblems(origin)
    check_unique_ids(rows, origin, p)
    rename = dict(cfg.fields or {})
    keep = list(getattr(cfg, "keep_fields", None) or [])  # a plain namespace config (the API) may not have it
    reserved = sorted(set(keep) & {"id", "messages", "answer", "tests"})
    if reserved:
        raise DataError(f"data.keep_fields={keep}: {reserved} are the example's own fields (always "
                        f"kept as built); keep_fields names other raw columns only, e.g. data.keep_fields=[source].")
    examples, skipped_empty = [], 0
    fmt = None
    for i, row in enumerate(rows):
        where = f"{origin}:{row.pop('_line', i + 1)}"
        for ours, theirs in rename.items():
            if theirs in row:
                row[ours] = row.pop(theirs)
        try:
            fmt = detect_format(row, cfg.format, where) if fmt is None or cfg.format == "auto" else fmt
            ex = to_conversation(row, fmt, where, cfg.system_prompt)
        except DataError as e:  # said with the others once every row is read
            p.add(str(e))
            continue
        if any(not m["content"].strip() for m in ex["messages"] if m["role"] != "system"):
            skipped_empty += 1
            continue
        ex["id"] = row.get("id", f"{split}-{i}")
        if "task" in row:  # a mixture's task (data=reasoning_gym), for per-task reports and selection.domain_field
            ex["task"] = row["task"]
        if "tests" in row:  # kept for judges that run the example's tests (objective=s3ft, judge=unit_tests)
            ex["tests"] = row["tests"]
        for name in keep:  # e.g. a source/domain column for selection.domain_field
            if name in row:
                ex[name] = row[name]
        examples.append(ex)
    p.raise_any()
    if skipped_empty:
        log.warning("%s: skipped %d example(s) with an empty prompt or response.", origin, skipped_empty)
    if not examples:
        raise DataError(f"{origin}: no usable examples in split '{split}' (read {len(rows)}, {skipped_empty} empty). "
                        f"Check data.path, data.limit and data.fields.")
    return examples, {"origin": origin, "read": len(rows), "skipped_empty": skipped_empty}
