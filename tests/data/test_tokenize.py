"""Chat-template tokenization, label masks, truncation and the tokenization cache (ftune.data.tokenize)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ftune.config import DataConfig
from ftune.data.sources import DataError
from ftune.data.tokenize import IGNORE, prompt_ids, tokenize_conversation, tokenize_examples

ONE_TURN = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
TWO_TURNS = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six."},
]


def template_ids(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def labelled_spans(labels) -> list[tuple[int, int]]:
    """[start, end) of each run of labelled positions."""
    spans, start = [], None
    for i, x in enumerate([*labels, IGNORE]):
        if x != IGNORE and start is None:
            start = i
        elif x == IGNORE and start is not None:
            spans.append((start, i))
            start = None
    return spans


def data_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), {"source": "jsonl", **overrides})


def example(i, response_words=3):
    return {"id": f"ex-{i}", "messages": [{"role": "user", "content": f"Question number {i}?"},
                                          {"role": "assistant", "content": " ".join(["word"] * response_words)}]}


def test_template_is_chatml(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(ONE_TURN, tokenize=False)
    assert "<|im_start|>assistant\nIt is 4.<|im_end|>" in text


def test_ids_equal_chat_template_and_prompt_is_masked(tiny_tokenizer):
    ids, labels = tokenize_conversation(tiny_tokenizer, ONE_TURN)
    assert ids == template_ids(tiny_tokenizer, ONE_TURN)
    assert len(labels) == len(ids)
    head = template_ids(tiny_tokenizer, ONE_TURN[:1], add_generation_prompt=True)
    assert ids[: len(head)] == head
    assert all(x == IGNORE for x in labels[: len(head)])
    assert labels[len(head):] == ids[len(head):]
    labelled = tiny_tokenizer.decode([t for t, x in zip(ids, labels) if x != IGNORE])
    assert labelled.startswith("It is 4.<|im_end|>")
    assert tiny_tokenizer.eos_token_id in [x for x in labels if x != IGNORE]


def test_multi_turn_labels_every_assistant_turn_only(tiny_tokenizer):
    ids, labels = tokenize_conversation(tiny_tokenizer, TWO_TURNS)
    assert ids == template_ids(tiny_tokenizer, TWO_TURNS)
    spans = labelled_spans(labels)
    assert len(spans) == 2
    texts = [tiny_tokenizer.decode(ids[s:e]) for s, e in spans]
    assert texts[0].startswith("It is 4.<|im_end|>") and texts[1].startswith("Six.<|im_end|>")
    for s, e in spans:
        assert labels[s:e] == ids[s:e]
    unlabelled = tiny_tokenizer.decode([t for t, x in zip(ids, labels) if x == IGNORE])
    for text in ("You add numbers.", "What is 2+2?", "And 3+3?"):
        assert text in unlabelled
    assert "It is 4." not in unlabelled and "Six." not in unlabelled
    # The second turn's label starts exactly after the generation prompt of the conversation so far.
    assert spans[1][0] == len(template_ids(tiny_tokenizer, TWO_TURNS[:4], add_generation_prompt=True))


def test_prompt_ids_is_generation_prompt_and_prefix(tiny_tokenizer):
    p = prompt_ids(tiny_tokenizer, TWO_TURNS[:4])
    assert p == template_ids(tiny_tokenizer, TWO_TURNS[:4], add_generation_prompt=True)
    full, _ = tokenize_conversation(tiny_tokenizer, TWO_TURNS)
    assert full[: len(p)] == p and len(full) > len(p)
    assert tiny_tokenizer.decode(p).endswith("<|im_start|>assistant\n")


# --------------------------------------------------------------------------------------- tokenize_examples
def lengths(tokenizer, examples):
    return {e["id"]: len(tokenize_conversation(tokenizer, e["messages"])[0]) for e in examples}


def test_truncation_drop(tiny_tokenizer):
    examples = [example(0, 2), example(1, 60), example(2, 3)]
    n = lengths(tiny_tokenizer, examples)
    max_len = n["ex-1"] - 10
    rows = tokenize_examples(examples, tiny_tokenizer, data_cfg(max_length=max_len, truncation="drop"), "tok", "t")
    assert [r["id"] for r in rows] == ["ex-0", "ex-2"]
    assert [len(r["input_ids"]) for r in rows] == [n["ex-0"], n["ex-2"]]


def test_truncation_truncate_keeps_prompt_and_cuts_response(tiny_tokenizer):
    examples = [example(0, 2), example(1, 60)]
    full_ids, full_labels = tokenize_conversation(tiny_tokenizer, examples[1]["messages"])
    prompt_len = next(i for i, x in enumerate(full_labels) if x != IGNORE)
    max_len = prompt_len + 5
    rows = tokenize_examples(examples, tiny_tokenizer, data_cfg(max_length=max_len, truncation="truncate"), "tok")
    long_row = {r["id"]: r for r in rows}["ex-1"]
    assert long_row["input_ids"] == full_ids[:max_len]
    assert long_row["labels"] == full_labels[:max_len]
    assert sum(x != IGNORE for x in long_row["labels"]) == 5


def test_truncation_truncate_drops_when_prompt_does_not_fit(tiny_tokenizer):
    examples = [example(0, 2), {"id": "long-prompt", "messages": [
        {"role": "user", "content": "many words " * 40}, {"role": "assistant", "content": "ok"}]}]
    max_len = lengths(tiny_tokenizer, examples[:1])["ex-0"]
    rows = tokenize_examples(examples, tiny_tokenizer, data_cfg(max_length=max_len, truncation="truncate"), "tok")
    assert [r["id"] for r in rows] == ["ex-0"]


def test_truncation_error_names_example_and_max_length(tiny_tokenizer):
    examples = [example(0, 2), example(1, 60)]
    max_len = lengths(tiny_tokenizer, examples)["ex-1"] - 1
    with pytest.raises(DataError, match=rf"example 'ex-1' has \d+ tokens > data\.max_length={max_len}"):
        tokenize_examples(examples, tiny_tokenizer, data_cfg(max_length=max_len, truncation="error"), "tok")


def test_all_too_long_is_a_data_error(tiny_tokenizer):
    examples = [example(0, 40), example(1, 60)]
    with pytest.raises(DataError, match=r"all 2 example\(s\) are longer than data\.max_length=20"):
        tokenize_examples(examples, tiny_tokenizer, data_cfg(max_length=20, truncation="drop"), "tok")


def test_tokenization_cache_is_reused(tiny_tokenizer, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("FTUNE_HOME", str(tmp_path))
    examples = [example(i, i + 1) for i in range(5)]
    cfg = data_cfg(max_length=256)
    first = tokenize_examples(examples, tiny_tokenizer, cfg, "tok-cache")
    cached = [p for p in (tmp_path / "tokenized").iterdir() if (p / "dataset_info.json").exists()]
    assert len(cached) == 1

    def no_map(*args, **kwargs):
        raise AssertionError("Dataset.map called although the tokenization is cached")

    monkeypatch.setattr(datasets.Dataset, "map", no_map)
    second = tokenize_examples(examples, tiny_tokenizer, cfg, "tok-cache")
    assert second == first
    assert [r["id"] for r in second] == [f"ex-{i}" for i in range(5)]
    # A different tokenizer key or max_length is a different cache entry (so it would tokenize again).
    with pytest.raises(AssertionError, match="Dataset.map called"):
        tokenize_examples(examples, tiny_tokenizer, cfg, "other-tokenizer")
    with pytest.raises(AssertionError, match="Dataset.map called"):
        tokenize_examples(examples, tiny_tokenizer, data_cfg(max_length=255), "tok-cache")
