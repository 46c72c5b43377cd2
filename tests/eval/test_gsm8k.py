"""GSM8K answer extraction and scoring (ftune.eval.gsm8k)."""

from __future__ import annotations

import pytest

from ftune.eval.gsm8k import extract_answer, gold_answer, normalize_number, score


@pytest.mark.parametrize(("text", "expected"), [
    ("#### 1,234", "1234"),
    ("The answer is $18.00.", "18"),
    ("so 5 apples and 7 pears = 12 fruits", "12"),
    ("#### -3", "-3"),
    ("Step 1: 4 + 4 = 8\n#### 8\nSome trailing 99", "8"),
    ("First 3, then the answer is 7. Check: 7 - 4 = 3", "7"),
    ("The answer is: **42**", "42"),
    ("the answer is 2.50 dollars", "2.5"),
    ("It costs $1,200.50 in total", "1200.5"),
    ("#### 1,234,567.00", "1234567"),
    ("no numbers here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_normalize_number():
    assert normalize_number("$1,200.50") == "1200.5"
    assert normalize_number("18.0") == "18"
    assert normalize_number("-7") == "-7"
    assert normalize_number("none") is None


SOLUTION = "Natalia sold 48 / 2 = 24 clips in May.\nShe sold 48 + 24 = 72 clips.\n#### 72"


def test_gold_answer():
    assert gold_answer(SOLUTION) == "72"


@pytest.mark.parametrize(("prediction", "correct"), [
    ("48 + 24 = 72. The answer is 72.", True),
    ("She sold 72.00 clips in total.", True),
    ("#### 72", True),
    ("The answer is $72", True),
    ("The answer is 71.", False),
    ("48 + 24 = 72, so she sold 73", False),
    ("I don't know.", False),
])
def test_score(prediction, correct):
    assert score(prediction, SOLUTION) is correct


def test_score_without_gold_number_is_false():
    assert score("42", "no number in this solution") is False


def test_evaluate_counts_accuracy_and_answer_format(tmp_path, monkeypatch):
    """accuracy counts the right final numbers; answer_format the answers that end in `#### N`, right or wrong."""
    import json
    from types import SimpleNamespace

    from ftune.eval import tasks

    outputs = ["48 + 24 = 72\n#### 72", "The answer is 72.", "#### 70", "no idea"]
    monkeypatch.setattr(tasks, "generate", lambda model, tok, prompts, *a, **k: outputs[: len(prompts)])
    examples = [{"id": i, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": SOLUTION}]}
                for i in range(4)]
    cfg = SimpleNamespace(limit=None, max_new_tokens=8, batch_size=4)
    metrics = tasks.evaluate_gsm8k(None, None, examples, cfg, tmp_path, progress=False)
    assert (metrics["correct"], metrics["accuracy"], metrics["answer_format"]) == (2, 0.5, 0.5)
    rows = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["marker"] for r in rows] == [True, False, True, False]
    assert [r["correct"] for r in rows] == [True, True, False, False]
