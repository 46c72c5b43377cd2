"""The paper's scorers of Diversify and Conquer: Deita's expected quality score and reward-model margins, checked by
hand on the tiny random model (the real scorers are hub downloads)."""

from __future__ import annotations

import pytest
import torch

from ftune.selection import scorers

RECORDS = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                         {"role": "assistant", "content": f"It is {i + 1}."}]} for i in range(3)]


def test_expected_score_by_hand():
    logits = torch.full((2, 10), -1e9)
    logits[0, [3, 4]] = 0.0          # "1" and "2" equally likely -> 1.5
    logits[1, 8] = 0.0               # only "6" -> 6
    ids = [3, 4, 5, 6, 7, 8]
    assert scorers.expected_scores(logits, ids).tolist() == pytest.approx([1.5, 6.0])
    assert scorers.instruction_and_output(RECORDS[0]["messages"]) == ("What is 0 + 1?", "It is 1.")


def test_deita_quality_is_the_expected_score_of_the_next_token_after_the_prompt(ftune_home):
    from transformers import AutoModelForCausalLM

    from ftune.models.loading import load_tokenizer, resolve_model_dir

    got = scorers.deita_quality(RECORDS, "tiny_random", batch_size=2)  # two batches, the second one row: padding
    path = resolve_model_dir("tiny_random")
    tok, model = load_tokenizer(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = scorers.score_token_ids(tok)
    assert [tok.decode([i]) for i in ids] == list("123456")
    for r, g in zip(RECORDS, got):
        q, a = scorers.instruction_and_output(r["messages"])
        text = scorers.QUALITY_PROMPT.format(instruction=q, output=a)
        assert text.endswith(f"#Response#:\n{a} \n##Quality: ")
        with torch.no_grad():
            logits = model(torch.tensor([tok(text)["input_ids"]])).logits[0, -1]
        p = torch.softmax(logits[ids].double(), 0)
        assert g == pytest.approx(float((p * torch.arange(1, 7)).sum()), rel=1e-4)
        assert 1.0 <= g <= 6.0


def test_reward_margin_is_gold_minus_generated_reward(tmp_path, ftune_home):
    from transformers import AutoModelForSequenceClassification

    from ftune.models.loading import load_tokenizer, resolve_model_dir

    path = resolve_model_dir("tiny_random")
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    rm.save_pretrained(tmp_path / "rm")
    tok = load_tokenizer(path)
    tok.save_pretrained(tmp_path / "rm")
    items = [{"prompt": r["messages"][:1], "gold": r["messages"][1]["content"], "answer": a}
             for r, a in zip(RECORDS, ["It is 7.", "No idea, sorry about that.", "It is 3."])]
    got = scorers.reward_margins(items, str(tmp_path / "rm"), batch_size=2)
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()

    def r(conv):
        ids = tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            return float(rm(torch.tensor([ids])).logits[0, 0])

    want = [r([*it["prompt"], {"role": "assistant", "content": it["gold"]}])
            - r([*it["prompt"], {"role": "assistant", "content": it["answer"]}]) for it in items]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert any(abs(w) > 1e-4 for w in want)
