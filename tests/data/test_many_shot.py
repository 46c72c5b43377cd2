"""Many-shot sequences (ftune.data.many_shot) and eval prompts (ftune.eval.many_shot), checked against the SmolLM2
tokenizer by hand: labelled tokens are located from the chat template's text and the tokenizer's character offsets."""

from __future__ import annotations

import json
import logging
import random
from types import SimpleNamespace

import pytest

from ftune.data.many_shot import (
    ManyShotBuilder,
    TaskStream,
    answer_start,
    check_tasks,
    greedy_chunks,
    load_task_examples,
    query_prompt,
    tokenize_many_shot_batch,
)
from ftune.data.sources import DataError
from ftune.data.tokenize import IGNORE, tokenize_examples
from ftune.eval.many_shot import is_correct, parse_shots, pick_shots

ADD = [("2+3", "5"), ("10+2", "12"), ("999+1", "1000"), ("300+400", "seven hundred")]
INSTRUCTION = "Add the two numbers."


def pieces(tok, examples, task="add", instruction=None, start=0):
    batch = {"id": [f"{task}-{start + i}" for i in range(len(examples))], "input": [x for x, _ in examples],
             "output": [y for _, y in examples], "task": [task] * len(examples),
             "instruction": [instruction] * len(examples)}
    out = tokenize_many_shot_batch(batch, tok, max_length=10_000, policy="drop")
    cols = [k for k in out if k != "dropped"]
    return [{k: out[k][i] for k in cols} for i in range(len(examples))]


def one_sequence(tok, target_mask):
    p = pieces(tok, ADD, instruction=INSTRUCTION)
    rows = ManyShotBuilder(p, tok, max_length=512, target_mask=target_mask, seed=0).epoch_rows(0)
    assert len(rows) == 1  # all four fit in 512 tokens
    order = [int(i.split("-")[1]) for i in rows[0]["ids"]]
    return rows[0], [ADD[i] for i in order]


def rendered(tok, examples):
    """The chat template's own text of the whole conversation, its ids and character offsets."""
    messages = [{"role": "system", "content": INSTRUCTION}]
    for x, y in examples:
        messages += [{"role": "user", "content": x}, {"role": "assistant", "content": y}]
    text = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return text, enc["input_ids"], enc["offset_mapping"]


def answer_positions(text, offsets, examples):
    """Per example, the token positions of `answer<|im_end|>\\n` after its assistant header, found in the text."""
    spans, cursor = [], 0
    for x, y in examples:
        cursor = text.index(f"<|im_start|>user\n{x}<|im_end|>\n<|im_start|>assistant\n", cursor)
        start = text.index("assistant\n", cursor) + len("assistant\n")
        end = start + len(y) + len("<|im_end|>\n")
        assert text[start:end] == f"{y}<|im_end|>\n"
        spans.append([i for i, (a, _) in enumerate(offsets) if start <= a < end])
        cursor = end
    return spans


def test_all_answers_labels_exactly_the_answers(tiny_tokenizer):
    tok = tiny_tokenizer
    row, examples = one_sequence(tok, "all_answers")
    text, ids, offsets = rendered(tok, examples)
    assert row["input_ids"] == ids  # concatenated pieces == the template's rendering of the whole conversation
    spans = answer_positions(text, offsets, examples)
    labelled = [i for i, y in enumerate(row["labels"]) if y != IGNORE]
    assert labelled == [i for s in spans for i in s]
    assert all(row["labels"][i] == ids[i] for i in labelled)
    # Count by hand: each answer's own tokens, then <|im_end|> and "\n" (two tokens).
    assert len(labelled) == sum(len(tok(y, add_special_tokens=False)["input_ids"]) + 2 for _, y in examples)
    # No instruction or input token is labelled.
    for piece_text in [INSTRUCTION] + [x for x, _ in examples]:
        start = text.index(piece_text)
        inside = [i for i, (a, _) in enumerate(offsets) if start <= a < start + len(piece_text)]
        assert inside and all(row["labels"][i] == IGNORE for i in inside)


def test_last_answer_labels_one_span(tiny_tokenizer):
    row, examples = one_sequence(tiny_tokenizer, "last_answer")
    text, ids, offsets = rendered(tiny_tokenizer, examples)
    labelled = [i for i, y in enumerate(row["labels"]) if y != IGNORE]
    assert labelled == answer_positions(text, offsets, examples)[-1]
    assert labelled == list(range(labelled[0], labelled[-1] + 1)) and labelled[-1] == len(ids) - 1


def test_all_tokens_labels_everything(tiny_tokenizer):
    row, _ = one_sequence(tiny_tokenizer, "all_tokens")
    assert row["labels"] == row["input_ids"]  # position 0 is labelled too but never predicted (causal shift)


def test_greedy_chunks_by_hand():
    lengths = [3, 4, 2, 5, 7, 1]
    assert greedy_chunks([0, 1, 2, 3, 4, 5], lengths, budget=7) == [[0, 1], [2, 3], [4], [5]]
    assert greedy_chunks([5, 2, 0, 1], lengths, budget=7) == [[5, 2, 0], [1]]
    assert greedy_chunks([5, 2, 0, 1], lengths, budget=100, max_shots=2) == [[5, 2], [0, 1]]


def test_stream_passes_are_fresh_permutations():
    lengths = [random.Random(i).randint(1, 9) for i in range(40)]
    stream = TaskStream("t", lengths, budget=20, seed=3)
    first = stream.chunks(0, stream.first_pass)
    second_pass = TaskStream("t", lengths, 20, 3)
    second_pass.chunks(0, stream.first_pass + 1)
    flat = [i for c in first for i in c]
    assert sorted(flat) == list(range(40))  # one pass = every example exactly once
    assert all(sum(lengths[i] for i in c) <= 20 for c in first)
    n_second = len(second_pass._chunks) - stream.first_pass
    second = [i for c in second_pass.chunks(stream.first_pass, n_second) for i in c]
    assert sorted(second) == list(range(40)) and second != flat


def mixture(tok, n=30, seed=0):
    rng = random.Random(seed)
    add = [(f"{rng.randint(0, 999)}+{rng.randint(0, 999)}", str(rng.randint(0, 2000))) for _ in range(n)]
    rev = [(w := "".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 25))), w[::-1]) for _ in range(n)]
    return pieces(tok, add, "add") + pieces(tok, rev, "reverse", instruction="Reverse the text.")


def test_sequences_fit_hold_one_task_and_reshuffle_per_epoch(tiny_tokenizer):
    p = mixture(tiny_tokenizer)
    task_of = {x["id"]: x["task"] for x in p}
    build = lambda seed: ManyShotBuilder(p, tiny_tokenizer, max_length=96, target_mask="all_answers", seed=seed)  # noqa: E731
    builder = build(7)
    epochs = [builder.epoch_rows(e) for e in range(4)]
    for rows in epochs:
        assert len(rows) == len(epochs[0])  # the loop's row count never changes
        assert [r["slot"] for r in rows] == list(range(len(rows)))
        for r in rows:
            assert len(r["input_ids"]) <= 96 and len(r["input_ids"]) == len(r["labels"])
            assert {task_of[i] for i in r["ids"]} == {r["task"]}
            assert len(set(r["ids"])) == len(r["ids"])
        assert sum(len(r["ids"]) > 1 for r in rows) > len(rows) // 2  # many-shot, not one example per row
    assert [r["ids"] for r in epochs[0]] != [r["ids"] for r in epochs[1]]
    # Epoch 0 is exactly one pass: every example once.
    assert sorted(i for r in epochs[0] for i in r["ids"]) == sorted(task_of)
    again = build(7)
    assert [again.epoch_rows(e) for e in (2, 0)] == [epochs[2], epochs[0]]  # deterministic, any epoch first
    assert [r["ids"] for r in build(8).epoch_rows(0)] != [r["ids"] for r in epochs[0]]


def test_single_task_groups_everything(tiny_tokenizer):
    p = mixture(tiny_tokenizer, n=6)
    rows = ManyShotBuilder(p, tiny_tokenizer, 4096, "all_answers", seed=0, single_task="mixed").epoch_rows(0)
    assert len(rows) == 1 and len(rows[0]["ids"]) == 12 and rows[0]["task"] == "mixed"


def test_eval_prompt_holds_k_examples_and_the_query(tiny_tokenizer):
    tok = tiny_tokenizer
    pool = mixture(tok, n=20)[:20]
    query = pool[3]
    head = tok.apply_chat_template([{"role": "system", "content": "Sys."}], tokenize=True)
    head = list(head["input_ids"] if hasattr(head, "keys") else head)
    many = pick_shots(pool, query, "many", budget=300, seed=1)
    assert query["id"] not in [p["id"] for p in many] and sum(len(p["input_ids"]) for p in many) <= 300
    for k in (0, 1, 5):
        shots = pick_shots(pool, query, k, budget=300, seed=1)
        assert shots == many[:k]  # nested: the k-shot examples are the first many-shot ones
        text = tok.decode(query_prompt(head, shots, query))
        assert text.count("<|im_start|>user\n") == k + 1 and text.count("<|im_start|>assistant\n") == k + 1
        # The last user turn is the query's input, and the prompt stops at its assistant header.
        query_turn = tok.decode(query["input_ids"][: answer_start(query)])
        assert query_turn.startswith("<|im_start|>user\n") and query_turn.endswith("<|im_start|>assistant\n")
        assert "<|im_start|>user\n" + text.rsplit("<|im_start|>user\n", 1)[1] == query_turn


def test_parse_shots_and_matching():
    from ftune.config import ConfigError

    assert parse_shots([0, "5", "many"]) == [0, 5, "many"]
    for bad in ([], [-1], ["lots"], [2, 2], [True]):
        with pytest.raises(ConfigError, match="eval.shots"):
            parse_shots(bad)
    assert is_correct("  Positive\n", "positive", "exact") and not is_correct("positive!", "positive", "exact")
    assert is_correct("so it is 1,200 in total", "... #### 1200", "numeric")


# ------------------------------------------------------------------------------------------------- loading and errors
def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_cfg(path, **kw):
    base = dict(source="jsonl", path=str(path), split="train", limit=None, fields={}, max_length=64, truncation="drop",
                num_proc=1)
    return SimpleNamespace(**{**base, **kw})


def test_load_formats_and_renames(tmp_path):
    f = write(tmp_path / "a.jsonl", [{"category": "sent", "text": "good", "label": "positive", "instruction": "Rate."},
                                     {"category": "sent", "text": "bad", "label": "negative"}])
    ex, stats = load_task_examples(data_cfg(f, fields={"task": "category", "input": "text", "output": "label"}),
                                   "train", 0)
    assert [(e["task"], e["input"], e["output"], e["instruction"]) for e in ex] == [
        ("sent", "good", "positive", "Rate."), ("sent", "bad", "negative", None)]
    g = write(tmp_path / "b.jsonl", [{"task": 3, "prompt": "p", "completion": "c"}, {"question": "q", "answer": "a"}])
    ex, _ = load_task_examples(data_cfg(g), "train", 0)
    assert [(e["task"], e["input"], e["output"]) for e in ex] == [("3", "p", "c"), (None, "q", "a")]
    h = write(tmp_path / "c.jsonl", [{"task": "t", "text": "x", "output": "y"}])
    with pytest.raises(DataError, match=r"c\.jsonl:1: no input field .*data\.fields"):
        load_task_examples(data_cfg(h), "train", 0)


def test_missing_task_and_small_tasks_are_refused(tmp_path):
    f = write(tmp_path / "m.jsonl", [{"task": "a", "input": "1", "output": "2"}, {"input": "3", "output": "4"},
                                     {"task": "a", "input": "5", "output": "6"}])
    ex, _ = load_task_examples(data_cfg(f), "train", 0)
    with pytest.raises(DataError, match=r"m\.jsonl:2: .*no 'task' field.*objective\.single_task"):
        check_tasks(ex, None, "train")
    assert check_tasks(ex, "all", "train") == {"all": 3}
    with pytest.raises(DataError, match=r"\{'b': 1\} have fewer than 2 examples"):
        check_tasks(ex[:1] + [dict(ex[2], task="b")] + [dict(ex[0], id="x")], None, "train")


def test_examples_too_long_alone_are_dropped_then_refused(tmp_path, tiny_tokenizer, caplog):
    rows = [{"task": "t", "input": "word " * 80, "output": "long"}] + [
        {"task": "t", "input": str(i), "output": str(i)} for i in range(3)]
    ex, _ = load_task_examples(data_cfg(write(tmp_path / "l.jsonl", rows)), "train", 0)
    cfg = data_cfg(None)
    with caplog.at_level(logging.WARNING):
        kept = tokenize_examples(ex, tiny_tokenizer, cfg, "tiny", "train", tokenize_many_shot_batch)
    assert len(kept) == 3 and "dropped 1 of 4 example(s) longer than data.max_length=64" in caplog.text
    with pytest.raises(DataError, match="all 1 example"):
        tokenize_examples(ex[:1], tiny_tokenizer, cfg, "tiny", "train", tokenize_many_shot_batch)
    with pytest.raises(DataError, match="alone has .* tokens > data.max_length=64"):
        tokenize_examples(ex[:1], tiny_tokenizer, data_cfg(None, truncation="error"), "tiny", "train",
                          tokenize_many_shot_batch)


def test_eval_inputs_one_prompt_per_query_and_setting(tmp_path, tiny_tokenizer, compose):
    from ftune.eval.many_shot import many_shot_inputs

    rows = [{"question": f"{i}+{i}", "answer": f"#### {2 * i}"} for i in range(12)]
    f = write(tmp_path / "q.jsonl", rows)
    common = ["model=tiny_random", "data=jsonl", f"data.path={f}", "data.eval_size=3", "data.max_length=160",
              "eval=many_shot", "eval.shots=[0,2,many]", "eval.max_new_tokens=16"]
    with pytest.raises(DataError, match="eval.single_task=NAME"):
        many_shot_inputs((c := compose(common, "evaluate")).data, c.eval, tiny_tokenizer, 0, "tiny")
    c = compose([*common, "eval.single_task=sums", "eval.match=numeric"], "evaluate")
    inputs = many_shot_inputs(c.data, c.eval, tiny_tokenizer, 0, "tiny")
    settings = ("0", "2", "many")
    assert [(x["id"], x["shots"]) for x in inputs] == [(f"train-{q}", s) for q in (9, 10, 11) for s in settings]
    for x in inputs:
        text = tiny_tokenizer.decode(x["prompt"])
        assert text.count("<|im_start|>user\n") == x["k"] + 1 and len(x["prompt"]) <= 160 - 16
        assert x["task"] == "sums" and x["match"] == "numeric" and x["gold"] == rows[int(x["id"][6:])]["answer"]
        assert text.startswith("<|im_start|>system\nTask: sums.")  # the per-task default instruction
    assert {x["k"] for x in inputs if x["shots"] == "2"} == {2}
    assert min(x["k"] for x in inputs if x["shots"] == "many") > 2
