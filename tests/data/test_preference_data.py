"""Preference pairs: HH-RLHF transcripts, {prompt, chosen, rejected} records, loading, tokenization, config checks
(ftune.data.preference, objective/data compatibility in ftune.preflight.validate_train)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ftune.config import ConfigError, DataConfig
from ftune.data.preference import load_pairs, parse_hh, to_pair, tokenize_pairs_batch, tokenize_response
from ftune.data.sources import DataError
from ftune.data.tokenize import IGNORE, prompt_ids, tokenize_examples
from ftune.preflight import validate_train

SHARED_HH = Path("/work/shared/data/hh-rlhf-harmless/test.jsonl.gz")

# A two-exchange HH transcript pair: same conversation, different final answers.
HH_CHOSEN = "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: And 3+3?\n\nAssistant:  Six.\nThat is all."
HH_REJECTED = "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: And 3+3?\n\nAssistant: Seven. "
HH_PROMPT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
]


def data_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), {"source": "jsonl", **overrides})


def write_jsonl(path: Path, rows, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def template_ids(tokenizer, messages) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ----------------------------------------------------------------------------------------------- parse_hh
def test_parse_hh_multi_turn_roles_and_stripped_contents():
    assert parse_hh(HH_CHOSEN, "f:1") == [*HH_PROMPT, {"role": "assistant", "content": "Six.\nThat is all."}]


def test_parse_hh_splits_only_on_blank_line_turn_markers():
    text = "\n\nHuman: I said Human: hi and\nAssistant: bye\n\nAssistant: Noted."
    assert parse_hh(text, "f:1") == [{"role": "user", "content": "I said Human: hi and\nAssistant: bye"},
                                     {"role": "assistant", "content": "Noted."}]


@pytest.mark.parametrize("text", ["Hello there", "Preamble\n\nHuman: hi\n\nAssistant: yo", ""])
def test_parse_hh_rejects_non_transcripts(text):
    with pytest.raises(DataError, match=r"^data\.jsonl:7: not an HH-RLHF transcript"):
        parse_hh(text, "data.jsonl:7")


# ------------------------------------------------------------------------------------------------ to_pair
def test_to_pair_hh_prompt_is_every_turn_before_the_final_answer():
    pair = to_pair({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, "f:1")
    assert pair == {"prompt": HH_PROMPT, "chosen": "Six.\nThat is all.", "rejected": "Seven."}


def test_to_pair_hh_single_exchange():
    pair = to_pair({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go."},
                   "f:1")
    assert pair == {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go."}


def test_to_pair_strings():
    pair = to_pair({"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven.", "id": "x"}, "f:1")
    assert pair == {"prompt": [{"role": "user", "content": "Name a colour."}], "chosen": "Blue.",
                    "rejected": "Seven."}


def test_to_pair_chat_messages():
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour.", "x": 1}]
    row = {"prompt": prompt,
           "chosen": [{"role": "assistant", "content": "Blue."}],
           "rejected": [{"role": "user", "content": "ignored"}, {"role": "assistant", "content": "Seven."}]}
    pair = to_pair(row, "f:1")
    # Only role and content are kept; a response value contributes its final assistant turn.
    assert pair == {"prompt": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Name a colour."}],
                    "chosen": "Blue.", "rejected": "Seven."}


@pytest.mark.parametrize(("row", "pattern"), [
    ({"prompt": "p", "chosen": "a"}, r"^f\.jsonl:3: missing field\(s\) \['rejected'\].*needs chosen and rejected"),
    ({"prompt": "p"}, r"^f\.jsonl:3: missing field\(s\) \['chosen', 'rejected'\]"),
    ({"chosen": "a", "rejected": "b"}, r"^f\.jsonl:3: not an HH-RLHF transcript"),
    ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
     r"^f\.jsonl:3: without a 'prompt' field, chosen and rejected must be HH-RLHF transcripts"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: OTHER\n\nAssistant: c"},
     r"^f\.jsonl:3: chosen and rejected transcripts do not share the same conversation"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
      "rejected": "\n\nHuman: a\n\nAssistant: e"},
     r"do not share the same conversation"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: more?", "rejected": "\n\nHuman: a\n\nAssistant: c"},
     r"^f\.jsonl:3: both transcripts must end with an Assistant turn"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
     r"^f\.jsonl:3: 'chosen' messages must end with the assistant's turn"),
    ({"prompt": "p", "chosen": 5, "rejected": "b"},
     r"^f\.jsonl:3: 'chosen' must be a string or a non-empty list of messages"),
    ({"prompt": "p", "chosen": "a", "rejected": None}, r"'rejected' must be a string or a non-empty list of messages"),
    ({"prompt": {"role": "user", "content": "p"}, "chosen": "a", "rejected": "b"},
     r"'prompt' must be a string or a non-empty list of messages"),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"},
     r"'prompt' must be a string or a non-empty list of"),
    ({"prompt": ["p"], "chosen": "a", "rejected": "b"}, r"'prompt' must be a string or a non-empty list of"),
    ({"prompt": "p", "chosen": [], "rejected": "b"}, r"f\.jsonl:3: 'chosen'"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": 5}], "rejected": "b"},
     r"f\.jsonl:3: .*'chosen'.*string"),
    ({"prompt": [{"role": "bot", "content": "p"}], "chosen": "a", "rejected": "b"}, r"f\.jsonl:3: .*role"),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, r"f\.jsonl:3: .*'prompt'"),
], ids=["no-rejected", "no-chosen-rejected", "prompt-less-strings", "prompt-less-messages", "different-conversation",
        "different-turn-count", "ends-with-human", "messages-end-with-user", "int-response", "none-response",
        "dict-prompt", "message-without-content", "list-of-strings", "empty-response-list", "int-content",
        "unknown-role", "empty-prompt"])
def test_to_pair_errors_name_the_record_and_the_problem(row, pattern):
    with pytest.raises(DataError, match=pattern):
        to_pair(row, "f.jsonl:3")


# --------------------------------------------------------------------------------------------- load_pairs
def test_load_pairs_jsonl_skips_identical_and_empty_pairs(tmp_path):
    f = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "Q0", "chosen": "good 0", "rejected": "bad 0"},
        {"prompt": "Q1", "chosen": "same", "rejected": "same"},
        {"prompt": "Q2", "chosen": "  \n", "rejected": "bad 2"},
        {"prompt": [{"role": "user", "content": "Q3"}], "chosen": [{"role": "assistant", "content": "good 3"}],
         "rejected": "", "id": "r3"},
        {"prompt": "Q4", "chosen": "good 4", "rejected": "bad 4", "id": 44},
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
    ])
    pairs, stats = load_pairs(data_cfg(path=str(f)), "train", seed=0)
    assert stats == {"origin": str(f), "read": 6, "skipped_pairs": 3, "mismatched_pairs": 0}
    assert [p["id"] for p in pairs] == ["train-0", "44", "train-5"]
    assert pairs[0] == {"prompt": [{"role": "user", "content": "Q0"}], "chosen": "good 0", "rejected": "bad 0",
                        "id": "train-0"}
    assert pairs[2]["prompt"] == HH_PROMPT and pairs[2]["chosen"] == "Six.\nThat is all."


def test_load_pairs_limit_counts_raw_records(tmp_path):
    rows = [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(6)]
    rows[1]["rejected"] = rows[1]["chosen"]
    f = write_jsonl(tmp_path / "prefs.jsonl", rows)
    pairs, stats = load_pairs(data_cfg(path=str(f), limit=3), "train", seed=0)
    assert [p["chosen"] for p in pairs] == ["good 0", "good 2"]
    assert stats["read"] == 3 and stats["skipped_pairs"] == 1


def test_load_pairs_system_prompt_prepended_unless_present(tmp_path):
    f = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "Q0", "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "system", "content": "Own."}, {"role": "user", "content": "Q1"}],
         "chosen": "a", "rejected": "b"},
    ])
    pairs, _ = load_pairs(data_cfg(path=str(f), system_prompt="Be kind."), "train", seed=0)
    assert pairs[0]["prompt"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Q0"}]
    assert pairs[1]["prompt"][0] == {"role": "system", "content": "Own."} and len(pairs[1]["prompt"]) == 2


def test_load_pairs_nothing_usable_is_an_error(tmp_path):
    f = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "Q", "chosen": "x", "rejected": "x"},
                                               {"prompt": "Q", "chosen": "", "rejected": "y"}])
    with pytest.raises(DataError, match=re.escape(f"{f}: no usable preference pairs in split 'train' (read 2: 1 "
                                                  f"with identical chosen and rejected, 1 with an empty response, 0 ")):
        load_pairs(data_cfg(path=str(f)), "train", seed=0)


def test_load_pairs_bad_record_names_file_and_line(tmp_path):
    f = tmp_path / "prefs.jsonl"
    f.write_text(json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"}) + "\n\n"
                 + json.dumps({"prompt": "Q", "chosen": "a"}) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{f}:3: missing field(s) ['rejected']")):
        load_pairs(data_cfg(path=str(f)), "train", seed=0)


def test_load_pairs_eval_split_is_its_own_file(tmp_path):
    from ftune.data.pipeline import load_train_examples

    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"Q{i}", "chosen": "a", "rejected": "b"}
                                                   for i in range(5)])
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"H{i}", "chosen": "a", "rejected": "b"}
                                                 for i in range(3)])
    cfg = data_cfg(path=str(train), eval_split=str(held), eval_size=3, limit=2)
    tr, ev, stats = load_train_examples(cfg, seed=0, kind="preference")
    assert [p["prompt"][0]["content"] for p in tr] == ["Q0", "Q1"]
    assert [p["prompt"][0]["content"] for p in ev] == ["H0", "H1", "H2"]  # data.limit reads the train split only
    assert [p["id"] for p in ev] == [f"{held}-{i}" for i in range(3)]
    assert stats["train_examples"] == 2 and stats["eval_examples"] == 3
    tr, ev, _ = load_train_examples(data_cfg(path=str(train), eval_split=str(held), eval_size=2), seed=0,
                                    kind="preference")
    assert len(tr) == 5 and [p["prompt"][0]["content"] for p in ev] == ["H0", "H1"]
    # Without an eval file the last eval_size pairs are held out.
    tr, ev, _ = load_train_examples(data_cfg(path=str(train), eval_size=2), seed=0, kind="preference")
    assert [p["prompt"][0]["content"] for p in ev] == ["Q3", "Q4"] and len(tr) == 3


HH_ROWS = [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
           {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go."}]


def hh_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), {"source": "hh_rlhf", "split": "test", **overrides})


def test_hh_rlhf_from_ftune_data_dir(tmp_path, monkeypatch):
    f = write_jsonl(tmp_path / "data" / "hh-rlhf-harmless" / "test.jsonl.gz", HH_ROWS, gz=True)
    monkeypatch.setenv("FTUNE_DATA_DIR", str(tmp_path / "data"))
    pairs, stats = load_pairs(hh_cfg(), "test", seed=0)
    assert stats["origin"] == str(f) and stats["read"] == 2
    assert pairs[0]["prompt"] == HH_PROMPT and pairs[1]["rejected"] == "Go."
    assert [p["id"] for p in pairs] == ["test-0", "test-1"]


def test_hh_rlhf_from_data_path_file_and_dir_before_data_dir(tmp_path, monkeypatch):
    decoy = write_jsonl(tmp_path / "data" / "hh-rlhf-harmless" / "test.jsonl.gz", HH_ROWS[:1], gz=True)
    monkeypatch.setenv("FTUNE_DATA_DIR", str(tmp_path / "data"))
    f = write_jsonl(tmp_path / "mine" / "test.jsonl.gz", HH_ROWS, gz=True)
    for path in (f, f.parent):
        pairs, stats = load_pairs(hh_cfg(path=str(path)), "test", seed=0)
        assert stats["origin"] == str(f) and len(pairs) == 2
    # A data.path without the split's file is an error, not FTUNE_DATA_DIR's copy in its place.
    with pytest.raises(DataError, match=r"data\.path=.*empty: neither a file nor a directory with test\.jsonl\.gz"):
        load_pairs(hh_cfg(path=str(tmp_path / "empty")), "test", seed=0)
    assert load_pairs(hh_cfg(), "test", seed=0)[1]["origin"] == str(decoy)


def test_hh_rlhf_offline_without_a_local_copy_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("FTUNE_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"cannot load 'Anthropic/hh-rlhf' split 'test': offline.*data\.path.*"
                                        r"FTUNE_DATA_DIR=DIR with DIR/hh-rlhf-harmless/test\.jsonl\.gz"):
        load_pairs(hh_cfg(), "test", seed=0)


@pytest.mark.parametrize("source", ["gsm8k", "gsm_symbolic"])
def test_load_pairs_refuses_sources_without_pairs(source):
    with pytest.raises(DataError, match=rf"data\.source={source} has no preference pairs; use data=hh_rlhf"):
        load_pairs(data_cfg(source=source), "train", seed=0)


@pytest.mark.skipif(not SHARED_HH.is_file(), reason="no shared HH-RLHF harmless-base copy")
def test_real_hh_rlhf_harmless_base():
    # The first 1000 records (the recipe's data.limit) load; every pair is a well-formed prompt + two answers.
    pairs, stats = load_pairs(hh_cfg(path=str(SHARED_HH), limit=1000), "test", seed=0)
    assert stats["read"] == 1000 and len(pairs) + stats["skipped_pairs"] == 1000 and len(pairs) > 990
    for p in pairs:
        assert p["prompt"] and p["prompt"][0]["role"] == "user" and p["prompt"][-1]["role"] == "user"
        assert {m["role"] for m in p["prompt"]} == {"user", "assistant"} or len(p["prompt"]) == 1
        assert p["chosen"].strip() and p["rejected"].strip() and p["chosen"] != p["rejected"]
        assert p["chosen"] == p["chosen"].strip() and "\n\nHuman: " not in p["chosen"]
    # The whole split (data=hh_rlhf's default, data.limit=null) must load too, skipping the malformed pairs.
    pairs, stats = load_pairs(hh_cfg(path=str(SHARED_HH)), "test", seed=0)
    assert stats["read"] == 2312 and 2290 <= len(pairs) < 2312


# ------------------------------------------------------------------------------------------ tokenization
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.parametrize("prompt", [PROMPT, HH_PROMPT, [{"role": "system", "content": "Be brief."}, *PROMPT]],
                         ids=["one-turn", "multi-turn", "system"])
def test_tokenize_response_masks_exactly_the_prompt(tiny_tokenizer, prompt):
    response = "Paris, of course."
    ids, labels = tokenize_response(tiny_tokenizer, prompt, response)
    full = template_ids(tiny_tokenizer, prompt + [{"role": "assistant", "content": response}])
    # ChatML ends with <|im_end|> = the EOS token, so the loader appends nothing: ids are the template's exactly.
    assert tiny_tokenizer.eos_token_id in full[-2:]
    assert ids == full and len(labels) == len(ids)
    n_prompt = len(prompt_ids(tiny_tokenizer, prompt))
    assert ids[:n_prompt] == prompt_ids(tiny_tokenizer, prompt)
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and all(x != IGNORE for x in labels[n_prompt:])
    assert tiny_tokenizer.decode(ids[n_prompt:]).startswith(response)
    # Earlier assistant turns of a multi-turn prompt are context, never labelled.
    assert sum(x != IGNORE for x in labels) == len(ids) - n_prompt


def pairs_batch(*pairs):
    return {"prompt": [p[0] for p in pairs], "chosen": [p[1] for p in pairs], "rejected": [p[2] for p in pairs],
            "id": [p[3] for p in pairs]}


SHORT, LONG = "Paris.", "Paris, the capital and largest city of France, on the Seine. " * 3


def test_tokenize_pairs_batch_fits(tiny_tokenizer):
    out = tokenize_pairs_batch(pairs_batch((PROMPT, SHORT, LONG, "p0")), tiny_tokenizer, 512, "error")
    assert out["dropped"] == [False]
    assert (out["chosen_input_ids"][0], out["chosen_labels"][0]) == tokenize_response(tiny_tokenizer, PROMPT, SHORT)
    assert (out["rejected_input_ids"][0], out["rejected_labels"][0]) == tokenize_response(tiny_tokenizer, PROMPT,
                                                                                          LONG)


def lengths(tok, prompt=PROMPT):
    return (len(prompt_ids(tok, prompt)), len(tokenize_response(tok, prompt, SHORT)[0]),
            len(tokenize_response(tok, prompt, LONG)[0]))


@pytest.mark.parametrize("long_side", ["chosen", "rejected"])
def test_tokenize_pairs_batch_drop_when_either_side_is_too_long(tiny_tokenizer, long_side):
    n_prompt, n_short, n_long = lengths(tiny_tokenizer)
    max_length = (n_short + n_long) // 2
    assert n_short <= max_length < n_long
    sides = (SHORT, LONG) if long_side == "chosen" else (LONG, SHORT)
    out = tokenize_pairs_batch(pairs_batch((PROMPT, SHORT, SHORT + "!", "ok"), (PROMPT, *sides, "too-long")),
                               tiny_tokenizer, max_length, "drop")
    assert out["dropped"] == [False, True]
    assert out["chosen_input_ids"][1] == out["rejected_input_ids"][1] == [] == out["rejected_labels"][1]
    assert out["chosen_input_ids"][0] == tokenize_response(tiny_tokenizer, PROMPT, SHORT)[0]


def test_tokenize_pairs_batch_truncate_cuts_the_long_response_only(tiny_tokenizer):
    n_prompt, n_short, n_long = lengths(tiny_tokenizer)
    max_length = (n_short + n_long) // 2
    out = tokenize_pairs_batch(pairs_batch((PROMPT, SHORT, LONG, "p")), tiny_tokenizer, max_length, "truncate")
    assert out["dropped"] == [False]
    short_ids, short_labels = tokenize_response(tiny_tokenizer, PROMPT, SHORT)
    long_ids, long_labels = tokenize_response(tiny_tokenizer, PROMPT, LONG)
    assert out["chosen_input_ids"][0] == short_ids and out["chosen_labels"][0] == short_labels
    assert out["rejected_input_ids"][0] == long_ids[:max_length]
    assert out["rejected_labels"][0] == long_labels[:max_length]
    assert out["rejected_labels"][0][:n_prompt] == [IGNORE] * n_prompt


def test_tokenize_pairs_batch_truncate_drops_when_the_prompt_does_not_fit(tiny_tokenizer):
    n_prompt, _, _ = lengths(tiny_tokenizer)
    out = tokenize_pairs_batch(pairs_batch((PROMPT, SHORT, LONG, "p")), tiny_tokenizer, n_prompt, "truncate")
    assert out["dropped"] == [True] and out["chosen_input_ids"] == [[]]


def test_tokenize_pairs_batch_error_names_pair_side_and_lengths(tiny_tokenizer):
    _, n_short, n_long = lengths(tiny_tokenizer)
    max_length = n_long - 1
    with pytest.raises(DataError, match=re.escape(f"pair 'p-7': the rejected side has {n_long} tokens > "
                                                  f"data.max_length={max_length}") + r".*data\.truncation=drop"):
        tokenize_pairs_batch(pairs_batch((PROMPT, SHORT, SHORT + "!", "p-6"), (PROMPT, SHORT, LONG, "p-7")),
                             tiny_tokenizer, max_length, "error")


def test_tokenize_examples_with_pairs_drops_and_keeps_ids(tiny_tokenizer, tmp_path):
    """Through the cached datasets.map: kept pairs carry the four token columns and their id."""
    _, n_short, n_long = lengths(tiny_tokenizer)
    pairs = [{"prompt": PROMPT, "chosen": SHORT, "rejected": SHORT + " Yes.", "id": "a"},
             {"prompt": PROMPT, "chosen": LONG, "rejected": SHORT, "id": "b"},
             {"prompt": PROMPT, "chosen": SHORT + " Sure.", "rejected": SHORT, "id": "c"}]
    cfg = data_cfg(path="unused", max_length=(n_short + n_long) // 2, truncation="drop")
    rows = tokenize_examples(pairs, tiny_tokenizer, cfg, f"tiny-{tmp_path.name}", "train", tokenize_pairs_batch)
    assert [r["id"] for r in rows] == ["a", "c"]
    assert set(rows[0]) == {"id", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
    assert rows[1]["rejected_input_ids"] == tokenize_response(tiny_tokenizer, PROMPT, SHORT)[0]


# ------------------------------------------------------------------------------------------ config checks
@pytest.mark.parametrize("data", ["gsm8k", "gsm_symbolic"])
def test_dpo_on_prompt_response_data_is_refused(compose, data):
    with pytest.raises(ConfigError, match=rf"objective ftune\.objectives\.dpo\.DPO trains on preference pairs, but "
                                          rf"data={data} has prompt/response examples only\. Use data=hh_rlhf, or "
                                          rf"data=jsonl with \{{prompt, chosen, rejected\}} records"):
        validate_train(compose(["objective=dpo", f"data={data}"]))


def test_sft_on_preference_data_is_refused(compose):
    with pytest.raises(ConfigError, match=r"data=hh_rlhf holds preference pairs, but objective "
                                          r"ftune\.objectives\.sft\.SFT trains on prompt/response examples\. "
                                          r"Use objective=dpo"):
        validate_train(compose(["objective=sft", "data=hh_rlhf"]))


def test_dpo_on_preference_data_validates(compose):
    validate_train(compose(["objective=dpo", "data=hh_rlhf"]))
    validate_train(compose(["objective=dpo", "data=jsonl", "data.path=prefs.jsonl"]))
    with pytest.raises(ConfigError, match=r"data\.packing=true does not work with ftune\.objectives\.dpo\.DPO"):
        validate_train(compose(["objective=dpo", "data=hh_rlhf", "data.packing=true"]))
