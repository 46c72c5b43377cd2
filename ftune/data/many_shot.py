"""Many-shot sequences (ManyICL, He et al., arXiv 2506.11103): examples of ONE task after that task's instruction.

The paper (abstract; its code is not public) fine-tunes one model on a mixture of tasks with long sequences that hold
many in-context examples of a task, and treats every answer in the context as a training target. How a sequence is
laid out here is ftune's choice (METHODS.md §3 [adapt]):

    sequence = instruction ⊕ example_1 ⊕ example_2 ⊕ ... ⊕ example_K        (all examples of one task)

rendered through the model's chat template as one conversation: the instruction is the system turn, each example a
user turn (the input) and an assistant turn (the answer and its end-of-turn tokens). Each example is tokenized once
into a *piece* (`input_ids`, with `labels` on the answer only); a sequence is the concatenation of the instruction's
ids and its pieces, so training sequences and eval prompts are built the same way. For ChatML/Llama-3 style templates
the concatenation is exactly the template's rendering of the whole conversation (tested for SmolLM2); pieces are
rendered after a placeholder system turn, which assumes a turn renders the same whatever the system text is.

Examples carry a task name (the `task` field; rename it with `data.fields={task: NAME}`), or the whole data set is
one task (`objective.single_task` / `eval.single_task`). The instruction of a task is the `instruction` field of its
first example that has one, else `data.system_prompt`, else DEFAULT_INSTRUCTION; `{task}` in either is replaced by
the task name. K is as many examples as fit `data.max_length` (optionally capped by `max_shots`).

Every pass over a task's examples is a fresh seeded shuffle cut greedily into sequences (TaskStream); an epoch of
training serves a fixed number of sequences per task (as many as the first pass makes), so the loop's row count
never changes while the contexts are rebuilt every epoch.
"""

from __future__ import annotations

import logging
import random

from ftune.data.sources import DataError
from ftune.data.tokenize import IGNORE, _ids

log = logging.getLogger(__name__)

TARGET_MASKS = ("all_answers", "last_answer", "all_tokens")
INPUT_FIELDS = ("input", "prompt", "question")
OUTPUT_FIELDS = ("output", "completion", "answer")
DEFAULT_INSTRUCTION = "Task: {task}. Answer the last input the way the examples answer theirs."
# Pieces are rendered after this system turn and then cut off it (see the module docstring).
_PLACEHOLDER_SYSTEM = "Instruction."


# ------------------------------------------------------------------------------------------------------- loading
def _raw_rows(cfg, split: str, seed: int) -> tuple[list[dict], str]:
    from ftune.data import sources

    if cfg.source == "gsm8k":
        return sources._gsm8k_rows(cfg, split)
    if cfg.source == "gsm_symbolic":
        return sources._gsm_symbolic_rows(cfg, split, seed)
    if cfg.source == "jsonl":
        return sources.read_split_file(cfg, split)
    if cfg.source == "reasoning_gym":  # each problem of the mixture, answered in the data's answer format
        from ftune.data import reasoning_gym as rg

        template = rg.answer_template(cfg.get("answer_format") or "tags")
        instruction = rg.system_prompt(cfg.system_prompt, template)
        return [{"id": f"{label}-{i}", "task": label, "instruction": instruction, "input": e["question"],
                 "output": template.format(answer=e["answer"]), "_line": i + 1}
                for i, (_, label, e) in enumerate(rg.training_problems(cfg, seed))], "reasoning_gym"
    if cfg.source == "hub":
        if not cfg.hub_id:
            raise DataError("data.source=hub needs data.hub_id=ORG/NAME.")
        return sources._load_hub(cfg.hub_id, cfg.hub_config, split, "Use data=jsonl with a local copy."), cfg.hub_id
    raise DataError(f"data.source={cfg.source!r} holds no (input, answer) examples for many-shot sequences; use "
                    f"jsonl ({{task, input, output}} records), gsm8k, gsm_symbolic, reasoning_gym or hub.")


def _field(row: dict, names: tuple[str, ...], where: str, what: str) -> str:
    for name in names:
        if name in row:
            if not isinstance(row[name], str):
                raise DataError(f"{where}: field '{name}' must be a string, got {type(row[name]).__name__}.")
            return row[name]
    has = sorted(k for k in row if k != "_line")
    raise DataError(f"{where}: no {what} field (one of {list(names)}; has {has}). Add one, or map your names with "
                    f"data.fields, e.g. data.fields={{input: text, output: label}}.")


def load_task_examples(cfg, split: str, seed: int) -> tuple[list[dict], dict]:
    """Examples {id, task, instruction, input, output} of `split`; `task`/`instruction` are None where absent.

    Input field: input | prompt | question; output field: output | completion | answer (after `data.fields` renames).
    """
    rows, origin = _raw_rows(cfg, split, seed)
    if cfg.limit is not None and split == cfg.split:
        rows = rows[: cfg.limit]
    rename = dict(cfg.fields or {})
    examples, skipped_empty = [], 0
    for i, row in enumerate(rows):
        where = f"{origin}:{row.pop('_line', i + 1)}"
        for ours, theirs in rename.items():
            if theirs in row:
                row[ours] = row.pop(theirs)
        text_in = _field(row, INPUT_FIELDS, where, "input")
        text_out = _field(row, OUTPUT_FIELDS, where, "output")
        task, instruction = row.get("task"), row.get("instruction")
        if isinstance(task, bool) or (task is not None and not isinstance(task, (str, int))):
            raise DataError(f"{where}: field 'task' must be a string (the task's name), got {type(task).__name__}.")
        if instruction is not None and not isinstance(instruction, str):
            raise DataError(f"{where}: field 'instruction' must be a string, got {type(instruction).__name__}.")
        if not text_in.strip() or not text_out.strip():
            skipped_empty += 1
            continue
        examples.append({"id": str(row.get("id", f"{split}-{i}")), "task": None if task is None else str(task),
                         "instruction": instruction or None, "input": text_in, "output": text_out,
                         "where": where})
    if skipped_empty:
        log.warning("%s: skipped %d example(s) with an empty input or output.", origin, skipped_empty)
    if not examples:
        raise DataError(f"{origin}: no usable examples in split '{split}' (read {len(rows)}, {skipped_empty} empty). "
                        f"Check data.path, data.limit and data.fields.")
    return examples, {"origin": origin, "read": len(rows), "skipped_empty": skipped_empty}


def check_tasks(examples: list[dict], single_task: str | None, what: str, min_examples: int = 2,
                single_task_key: str = "objective.single_task") -> dict[str, int]:
    """Examples per task; DataError when an example has no task (and no single task is set) or a task is too small."""
    if single_task is None:
        missing = [e for e in examples if e["task"] in (None, "")]
        if missing:
            raise DataError(f"{missing[0].get('where', what)}: {what} example '{missing[0]['id']}' has no 'task' field "
                            f"({len(missing)} of {len(examples)} examples lack one). Many-shot sequences hold "
                            f"examples of one task: add a task field, map yours with data.fields={{task: NAME}}, "
                            f"or treat the whole data set as one task with {single_task_key}=NAME.")
    counts: dict[str, int] = {}
    for e in examples:
        name = single_task or e["task"]
        counts[name] = counts.get(name, 0) + 1
    small = {t: n for t, n in counts.items() if n < min_examples}
    if small:
        raise DataError(f"{what}: task(s) {small} have fewer than {min_examples} examples; a many-shot sequence needs "
                        f"at least {min_examples} examples of its task. Add examples or remove those tasks.")
    return counts


# --------------------------------------------------------------------------------------------------- tokenizing
def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    try:
        return _ids(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # e.g. a jinja TemplateError: templates without a system role raise
        if isinstance(e, DataError):
            raise
        raise DataError(f"the tokenizer's chat template cannot render a system turn ({e}); many-shot sequences put "
                        f"the task instruction there. Use a model whose template has a system role.") from None


def instruction_ids(tokenizer, instruction: str) -> list[int]:
    """Ids of the sequence head: the instruction as the system turn (with BOS and the like, if the template adds)."""
    return _render(tokenizer, [{"role": "system", "content": instruction}])


def example_piece(tokenizer, text_in: str, text_out: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example's turns: the user turn and the assistant header unlabelled, the answer and
    its end-of-turn tokens labelled. An EOS is appended to the answer if the template does not end it with one."""
    system = [{"role": "system", "content": _PLACEHOLDER_SYSTEM}]
    user, assistant = {"role": "user", "content": text_in}, {"role": "assistant", "content": text_out}
    head = _render(tokenizer, system)
    query = _render(tokenizer, system + [user], add_generation_prompt=True)
    full = _render(tokenizer, system + [user, assistant])
    if full[: len(head)] != head or full[: len(query)] != query:
        raise DataError("this tokenizer's chat template does not render a conversation as a prefix of its "
                        "continuation, so the answer tokens cannot be located; use a model whose template does "
                        "(ChatML, Llama-3, ...).")
    ids = full[len(head):]
    start = len(query) - len(head)
    labels = [IGNORE] * start + ids[start:]
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in ids[-2:]:
        ids, labels = ids + [eos], labels + [eos]
    return ids, labels


def tokenize_many_shot_batch(batch, tokenizer, max_length, policy):
    """`datasets.map` function: one piece per example; an example longer than `max_length` on its own is dropped
    (counted and reported by tokenize_examples; `data.truncation=truncate` drops too, as a cut answer would be a
    wrong target), or an error under `data.truncation=error`."""
    out = {"input_ids": [], "labels": [], "id": [], "task": [], "instruction": [], "dropped": []}
    for i, ex_id in enumerate(batch["id"]):
        ids, labels = example_piece(tokenizer, batch["input"][i], batch["output"][i])
        too_long = len(ids) > max_length
        if too_long and policy == "error":
            raise DataError(f"example '{ex_id}' alone has {len(ids)} tokens > data.max_length={max_length}. Raise "
                            f"data.max_length, or set data.truncation=drop to skip such examples.")
        out["dropped"].append(too_long)
        out["input_ids"].append([] if too_long else ids)
        out["labels"].append([] if too_long else labels)
        out["id"].append(ex_id)
        out["task"].append(batch["task"][i])
        out["instruction"].append(batch["instruction"][i])
    return out


# ---------------------------------------------------------------------------------------------------- sequences
def answer_start(piece: dict) -> int:
    """Index of the first answer token in a piece (where the query prompt ends)."""
    return next(i for i, x in enumerate(piece["labels"]) if x != IGNORE)


def group_by_task(pieces: list[dict], single_task: str | None) -> dict[str, list[dict]]:
    """Pieces per task, tasks in order of first appearance (check_tasks has already refused missing tasks)."""
    groups: dict[str, list[dict]] = {}
    for p in pieces:
        groups.setdefault(single_task or p["task"], []).append(p)
    return groups


def task_instruction(task: str, pieces: list[dict], system_prompt: str | None) -> str:
    given = [p["instruction"] for p in pieces if p.get("instruction")]
    if given:
        if len(set(given)) > 1:
            log.warning("task '%s': its examples give %d different instructions; using the first.", task,
                        len(set(given)))
        return given[0]
    return (system_prompt or DEFAULT_INSTRUCTION).replace("{task}", task)


def greedy_chunks(order: list[int], lengths: list[int], budget: int, max_shots: int | None = None) -> list[list[int]]:
    """Cut `order` into consecutive chunks whose lengths sum to at most `budget` (and of at most `max_shots`)."""
    chunks: list[list[int]] = []
    current, used = [], 0
    for i in order:
        if current and (used + lengths[i] > budget or (max_shots is not None and len(current) >= max_shots)):
            chunks.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        chunks.append(current)
    return chunks


class TaskStream:
    """Endless passes over one task's examples: pass p is a seeded shuffle (seed, task, p) cut greedily into chunks.

    Chunks never cross a pass boundary, so no example appears twice in one sequence. `chunks(start, n)` returns
    chunks start..start+n-1 of the whole stream; the result depends only on (seed, task, lengths), not on history.
    """

    def __init__(self, task: str, lengths: list[int], budget: int, seed: int, max_shots: int | None = None):
        self.task, self.lengths, self.budget, self.seed, self.max_shots = task, lengths, budget, seed, max_shots
        self._chunks: list[list[int]] = []
        self._passes = 0
        self._extend()
        self.first_pass = len(self._chunks)

    def _extend(self) -> None:
        order = list(range(len(self.lengths)))
        random.Random(f"{self.seed}|{self.task}|{self._passes}").shuffle(order)
        self._chunks.extend(greedy_chunks(order, self.lengths, self.budget, self.max_shots))
        self._passes += 1

    def chunks(self, start: int, count: int) -> list[list[int]]:
        while len(self._chunks) < start + count:
            self._extend()
        return self._chunks[start: start + count]


def assemble(head: list[int], pieces: list[dict], target_mask: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of head ⊕ pieces. all_answers: every answer labelled; last_answer: the last one only;
    all_tokens: every token (the first is never predicted)."""
    ids = head + [t for p in pieces for t in p["input_ids"]]
    if target_mask == "all_tokens":
        return ids, list(ids)
    if target_mask == "all_answers":
        return ids, [IGNORE] * len(head) + [t for p in pieces for t in p["labels"]]
    if target_mask == "last_answer":
        return ids, [IGNORE] * (len(ids) - len(pieces[-1]["labels"])) + pieces[-1]["labels"]
    raise ValueError(f"unknown target_mask {target_mask!r}")


def query_prompt(head: list[int], shots: list[dict], query: dict) -> list[int]:
    """Eval prompt: head ⊕ shot pieces ⊕ the query's user turn and assistant header (its answer left out)."""
    return head + [t for p in shots for t in p["input_ids"]] + query["input_ids"][: answer_start(query)]


class ManyShotBuilder:
    """Training (or held-out) sequences from tokenized pieces: one TaskStream per task, a fixed number of sequences
    (slots) per task per epoch.

    Args:
        pieces: rows of tokenize_many_shot_batch.
        tokenizer: renders each task's instruction.
        max_length: tokens per sequence (instruction included).
        target_mask: all_answers | last_answer | all_tokens.
        seed: the run's seed (shuffles are seeded per task and pass).
        single_task: the one task every piece belongs to, or None to use each piece's task.
        system_prompt: the default instruction (`data.system_prompt`), `{task}` replaced.
        max_shots: at most this many examples per sequence (None: as many as fit).
        min_examples: refuse a task with fewer examples left after dropping those that do not fit.
        what: "train" or "eval", for messages.
    """

    def __init__(self, pieces: list[dict], tokenizer, max_length: int, target_mask: str, seed: int,
                 single_task: str | None = None, system_prompt: str | None = None, max_shots: int | None = None,
                 min_examples: int = 2, what: str = "train"):
        self.target_mask = target_mask
        self.heads: dict[str, list[int]] = {}
        self.pieces: dict[str, list[dict]] = {}
        self.streams: dict[str, TaskStream] = {}
        self.dropped = 0
        for task, group in group_by_task(pieces, single_task).items():
            head = instruction_ids(tokenizer, task_instruction(task, group, system_prompt))
            budget = max_length - len(head)
            kept = [p for p in group if len(p["input_ids"]) <= budget]
            if len(kept) < len(group):
                log.warning("%s: task '%s': dropped %d example(s) that do not fit data.max_length=%d after the "
                            "task's %d-token instruction.", what, task, len(group) - len(kept), max_length, len(head))
                self.dropped += len(group) - len(kept)
            if len(kept) < min_examples:
                raise DataError(f"{what}: task '{task}' has {len(kept)} example(s) that fit data.max_length="
                                f"{max_length} with its instruction; a many-shot sequence needs at least "
                                f"{min_examples}. Raise data.max_length, shorten the instruction, or drop the task.")
            self.heads[task], self.pieces[task] = head, kept
            self.streams[task] = TaskStream(task, [len(p["input_ids"]) for p in kept], budget, seed, max_shots)

    def epoch_rows(self, epoch: int) -> list[dict]:
        """The sequences of `epoch`, one per slot. Slots are grouped by task, S per task (its first pass's count);
        in epoch e they hold chunks e*S .. e*S+S-1 of the task's stream."""
        rows = []
        for task, stream in self.streams.items():
            per_epoch = stream.first_pass
            for members in stream.chunks(epoch * per_epoch, per_epoch):
                chosen = [self.pieces[task][i] for i in members]
                ids, labels = assemble(self.heads[task], chosen, self.target_mask)
                rows.append({"input_ids": ids, "labels": labels, "ids": [p["id"] for p in chosen], "task": task,
                             "slot": len(rows)})
        return rows

    def stats(self, rows: list[dict]) -> dict:
        """Summary of one epoch's `rows`."""
        shots = [len(r["ids"]) for r in rows]
        return {"tasks": {t: len(p) for t, p in self.pieces.items()}, "sequences_per_epoch": len(rows),
                "mean_shots": sum(shots) / len(shots), "min_shots": min(shots), "max_shots": max(shots),
                "mean_tokens": sum(len(r["input_ids"]) for r in rows) / len(rows), "dropped_too_long": self.dropped}
