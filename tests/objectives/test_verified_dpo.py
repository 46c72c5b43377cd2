"""objective=verified_dpo: pairs of a correct over an incorrect own answer, judged by the verifier; dropped prompts
counted; few-shot sampling prompts; an end-to-end run on the tiny model with reasoning-gym data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent))
from _tiny import make_cfg  # noqa: E402

from ftune.config import ConfigError  # noqa: E402
from ftune.data.tokenize import IGNORE  # noqa: E402
from ftune.objectives.verified_dpo import VerifiedDPO, build_pairs  # noqa: E402

EOS = 2
ROW = {"id": "r0", "input_ids": [1, 10, 11, 20, 21, EOS, 198], "labels": [IGNORE, IGNORE, IGNORE, 20, 21, EOS, 198]}


def test_pairs_are_the_first_correct_over_the_first_incorrect_sample_after_the_zero_shot_prompt():
    rows = [ROW, {**ROW, "id": "r1"}, {**ROW, "id": "r2"}]
    samples = [[[30, EOS], [31, EOS], [32, EOS], [33]], [[40, EOS], [41, EOS]], [[50, EOS], [51, EOS]]]
    correct = [[False, True, False, True], [True, True], [False, False]]
    pairs, stats = build_pairs(rows, samples, correct, EOS)
    assert stats == {"prompts": 3, "pairs": 1, "all_correct": 1, "all_wrong": 1}
    (p,) = pairs
    assert p["chosen_input_ids"] == [1, 10, 11, 31, EOS, 198] and p["rejected_input_ids"] == [1, 10, 11, 30, EOS, 198]
    assert p["chosen_labels"] == [IGNORE] * 3 + [31, EOS, 198]
    truncated, _ = build_pairs([ROW], [[[33], [34, EOS]]], [[True, False]], EOS)  # unfinished: no template tail
    assert truncated[0]["chosen_input_ids"] == [1, 10, 11, 33]


@pytest.mark.parametrize(("kw", "said"), [({"samples": 1}, "samples=1 must be >= 2"),
                                          ({"temperature": 0}, "temperature=0 must be > 0"),
                                          ({"judge": "llm_judge"}, "judge='llm_judge' must be verifier")])
def test_bad_settings(kw, said):
    with pytest.raises(ConfigError, match=said):
        VerifiedDPO(**kw)


RG = ["data=reasoning_gym", "data.tasks=[chain_sum]", "data.size=24", "data.eval_size=0", "data.max_length=256"]


def test_verifier_needs_reasoning_gym_data(tmp_path):
    from ftune.preflight import validate_train

    with pytest.raises(ConfigError, match="needs data=reasoning_gym"):
        validate_train(make_cfg(tmp_path / "x", "objective=verified_dpo"))


def test_end_to_end_on_the_tiny_model_with_the_verifier(tmp_path, ftune_home, monkeypatch):
    # The tiny random model never answers right, so the verifier is spied on and every other answer is declared
    # correct: what reaches training must be those answers, paired per prompt, with few-shot sampling prompts.
    from ftune.eval import judges
    from ftune.train import Trainer

    seen = []
    real = judges.Verifier.__call__

    def half(self, items):
        real(self, items)  # the real verifier runs on every answer (ids resolve to reasoning-gym problems)
        seen.extend(items)
        return [i % 2 == 0 for i in range(len(items))]

    monkeypatch.setattr(judges.Verifier, "__call__", half)
    t = Trainer(make_cfg(tmp_path / "v", *RG, "objective=verified_dpo", "objective.samples=2", "objective.shots=2",
                         "objective.max_new_tokens=4", "trainer.max_steps=2", "trainer.batch_size=2"))
    assert len(seen) == 2 * 24 and t.data.stats["verified_pairs"]["train"]["pairs"] == 24
    pair = t.data.train[0]
    assert pair["chosen_input_ids"] != pair["rejected_input_ids"]
    prompt_len = pair["chosen_labels"].index(next(x for x in pair["chosen_labels"] if x != IGNORE))
    assert pair["chosen_input_ids"][:prompt_len] == pair["rejected_input_ids"][:prompt_len]
    tok = t.tokenizer
    chosen = tok.decode(pair["chosen_input_ids"][prompt_len:], skip_special_tokens=True)
    assert chosen.strip() == seen[0]["answer"].strip()
    assert tok.decode(pair["chosen_input_ids"][:prompt_len]).count("<|im_start|>user") == 1  # trained 0-shot
    summary = t.run()
    assert summary["steps"] == 2
    assert json.loads((tmp_path / "v" / "summary.json").read_text())["steps"] == 2
