"""Reading raw files and turning rows into conversations (ftune.data.sources)."""

from __future__ import annotations

import gzip
import json
import re
import time

import pytest
from omegaconf import OmegaConf

from ftune.config import DataConfig
from ftune.data.sources import DataError, load_conversations, read_jsonl


def data_cfg(**overrides):
    """A DataConfig node (schema defaults) with `overrides` merged in."""
    return OmegaConf.merge(OmegaConf.structured(DataConfig), overrides)


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def load_jsonl(path, **overrides):
    return load_conversations(data_cfg(source="jsonl", path=str(path), **overrides), "train", seed=0)


# ------------------------------------------------------------------------------------------------ read_jsonl
def test_read_jsonl_rows_and_blank_lines(tmp_path):
    p = tmp_path / "file.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    rows = read_jsonl(p)
    assert [r["a"] for r in rows] == [1, 2]
    assert [r["_line"] for r in rows] == [1, 3]


def test_read_jsonl_gzip(tmp_path):
    p = tmp_path / "file.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write('{"a": 1}\n{"a": 2}\n')
    assert [r["a"] for r in read_jsonl(p)] == [1, 2]


def test_read_jsonl_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "file.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"file\.jsonl:3") as e:
        read_jsonl(p)
    assert "not valid JSON" in str(e.value)


def test_read_jsonl_non_object_line(tmp_path):
    p = tmp_path / "file.jsonl"
    p.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"file\.jsonl:2: expected a JSON object, got list"):
        read_jsonl(p)


def test_read_jsonl_not_utf8(tmp_path):
    p = tmp_path / "file.jsonl"
    p.write_bytes(b'{"a": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"file\.jsonl:1: not UTF-8"):
        read_jsonl(p)


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file.*data\.path"):
        read_jsonl(tmp_path / "nope.jsonl")


# ------------------------------------------------------------------------------------------ formats
def test_prompt_completion(tmp_path):
    rows = [{"prompt": "2+2?", "completion": "4", "id": "a"}, {"prompt": "3+3?", "completion": "6"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    examples, stats = load_jsonl(path)
    assert examples[0] == {"id": "a", "answer": "4", "messages": [{"role": "user", "content": "2+2?"},
                                                                   {"role": "assistant", "content": "4"}]}
    assert examples[1]["id"] == "train-1"
    assert stats["read"] == 2 and stats["skipped_empty"] == 0 and stats["origin"] == path


def test_messages_format_and_system_prompt(tmp_path):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "extra": 1}]
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": msgs}])
    (ex,), _ = load_jsonl(path)
    assert ex["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert ex["answer"] is None
    (ex,), _ = load_jsonl(path, system_prompt="Be brief.")
    assert ex["messages"][0] == {"role": "system", "content": "Be brief."}
    assert len(ex["messages"]) == 3


def test_alpaca_with_and_without_input(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"instruction": "Translate", "input": "chat", "output": "cat"},
        {"instruction": "Say hi", "output": "hi"},
        {"instruction": "Say yo", "input": "", "output": "yo"},
    ])
    examples, _ = load_jsonl(path)
    assert [e["messages"][0]["content"] for e in examples] == ["Translate\n\nchat", "Say hi", "Say yo"]
    assert [e["messages"][1]["content"] for e in examples] == ["cat", "hi", "yo"]
    assert all(e["messages"][1]["role"] == "assistant" for e in examples)


def test_gsm8k_question_answer(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "1+1?", "answer": "1+1=2\n#### 2"}])
    (ex,), _ = load_jsonl(path)
    assert ex["messages"] == [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "1+1=2\n#### 2"}]
    assert ex["answer"] == "1+1=2\n#### 2"


def test_explicit_format_overrides_detection(tmp_path):
    # Has both question/answer and prompt/completion; auto picks prompt_completion, explicit gsm8k picks the other.
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "completion": "c", "question": "q", "answer": "a"}])
    (ex,), _ = load_jsonl(path)
    assert ex["messages"][0]["content"] == "p"
    (ex,), _ = load_jsonl(path, format="gsm8k")
    assert ex["messages"][0]["content"] == "q"


def test_fields_renaming(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"q": "Why?", "a": "Because."}])
    (ex,), _ = load_jsonl(path, fields={"prompt": "q", "completion": "a"})
    assert ex["messages"] == [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]


def test_undetectable_format_names_file_line_and_fields(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "reply": "d"}])
    with pytest.raises(DataError, match=r"t\.jsonl:2: cannot tell the format.*'prompt', 'reply'"):
        load_jsonl(path)


def test_missing_field_names_field_and_line(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "reply": "d"}])
    with pytest.raises(DataError, match=r"t\.jsonl:2: missing field\(s\) \['completion'\]"):
        load_jsonl(path, format="prompt_completion")


def test_non_string_field(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "completion": 4}])
    with pytest.raises(DataError, match=r"t\.jsonl:1: field 'completion' must be a string, got int"):
        load_jsonl(path)


def test_messages_last_turn_must_be_assistant(tmp_path):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"},
            {"role": "user", "content": "?"}]
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": msgs}])
    with pytest.raises(DataError, match=r"t\.jsonl:1: the last message must be the assistant's"):
        load_jsonl(path)


def test_messages_bad_role(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"t\.jsonl:1: each message needs role"):
        load_jsonl(path)


def test_empty_responses_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "  "}, {"prompt": "", "completion": "d"},
        {"prompt": "e", "completion": "f"}])
    examples, stats = load_jsonl(path)
    assert [e["messages"][0]["content"] for e in examples] == ["a", "e"]
    assert stats["skipped_empty"] == 2 and stats["read"] == 4


def test_all_empty_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "completion": ""}, {"prompt": "c", "completion": " "}])
    with pytest.raises(DataError, match=r"no usable examples.*2 empty"):
        load_jsonl(path)


def test_limit(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)])
    examples, stats = load_jsonl(path, limit=3)
    assert [e["messages"][0]["content"] for e in examples] == ["p0", "p1", "p2"]
    assert stats["read"] == 3


# ------------------------------------------------------------------------------------------- gsm8k source
GSM_ROWS = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(5)]


def test_gsm8k_from_data_path_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("FTUNE_DATA_DIR", raising=False)
    write_jsonl(tmp_path / "train.jsonl", GSM_ROWS)
    examples, stats = load_conversations(data_cfg(source="gsm8k", path=str(tmp_path)), "train", seed=0)
    assert len(examples) == 5
    assert examples[2]["messages"][0]["content"] == "What is 2 + 1?"
    assert examples[2]["answer"].endswith("#### 3")
    assert stats["origin"] == str(tmp_path / "train.jsonl")


def test_gsm8k_data_path_missing_split_file(tmp_path, monkeypatch):
    monkeypatch.delenv("FTUNE_DATA_DIR", raising=False)
    with pytest.raises(DataError, match=r"data\.path=.*does not exist"):
        load_conversations(data_cfg(source="gsm8k", path=str(tmp_path / "nowhere")), "train", seed=0)


def test_gsm8k_data_path_is_never_replaced_by_ftune_data_dir(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", GSM_ROWS)
    monkeypatch.setenv("FTUNE_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=r"data\.path=.*mine.*train\.jsonl does not exist"):
        load_conversations(data_cfg(source="gsm8k", path=str(tmp_path / "mine")), "train", seed=0)


def test_gsm8k_from_ftune_data_dir(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM_ROWS[:2])
    monkeypatch.setenv("FTUNE_DATA_DIR", str(tmp_path))
    examples, _ = load_conversations(data_cfg(source="gsm8k", hub_id="openai/gsm8k"), "test", seed=0)
    assert [e["id"] for e in examples] == ["test-0", "test-1"]


def test_gsm8k_offline_without_local_copy_fails_fast(monkeypatch):
    monkeypatch.delenv("FTUNE_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tic = time.perf_counter()
    with pytest.raises(DataError) as e:
        load_conversations(data_cfg(source="gsm8k", hub_id="openai/gsm8k", hub_config="main"), "train", seed=0)
    assert time.perf_counter() - tic < 5
    assert "data.path" in str(e.value) and "FTUNE_DATA_DIR" in str(e.value)


# ---------------------------------------------------------------------------------------- gsm_symbolic
def test_gsm_symbolic_deterministic_and_splits_differ():
    cfg = data_cfg(source="gsm_symbolic", size=8)
    train_a, _ = load_conversations(cfg, "train", seed=3)
    train_b, _ = load_conversations(cfg, "train", seed=3)
    test, _ = load_conversations(cfg, "test", seed=3)
    other, _ = load_conversations(cfg, "train", seed=4)
    assert len(train_a) == 8
    assert train_a == train_b
    questions = {e["messages"][0]["content"] for e in train_a}
    assert questions.isdisjoint(e["messages"][0]["content"] for e in test)
    assert [e["messages"] for e in other] != [e["messages"] for e in train_a]
    assert all("####" in e["answer"] for e in train_a)


def test_a_size_for_generated_problems_on_a_file_is_said_to_be_ignored(tmp_path, caplog):
    """data.size counts the problems gsm_symbolic generates; kept from a recipe with data=jsonl it changes nothing,
    and the warning names data.limit, which does."""
    from ftune.data.pipeline import load_train_examples

    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(6)])
    with caplog.at_level("WARNING", logger="ftune.data.pipeline"):
        train, _, _ = load_train_examples(data_cfg(source="jsonl", path=path, size=2, eval_size=0), seed=0)
    assert len(train) == 6
    assert "data.size=2 is ignored" in caplog.text and "set data.limit=N" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ftune.data.pipeline"):
        train, _, _ = load_train_examples(data_cfg(source="jsonl", path=path, limit=2, eval_size=0), seed=0)
    assert len(train) == 2 and "is ignored" not in caplog.text


# ------------------------------------------------------------------------------------------------ data=hub offline
def test_hub_dataset_in_the_datasets_cache_loads_offline(tmp_path, monkeypatch):
    """On a machine without network whose datasets cache holds the dataset (filled elsewhere, HF_DATASETS_OFFLINE=1),
    data=hub reads the cache; it used to refuse every hub dataset when offline. One not in the cache fails at once."""
    import shutil

    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    rows = [{"question": f"What is {i} + 1?", "answer": f"It is {i + 1}.\n#### {i + 1}"} for i in range(3)]
    # The cache as `load_dataset("someorg/tinymath", "main")` leaves it: ORG___NAME/CONFIG/VERSION/HASH/ holding
    # dataset_info.json and NAME-SPLIT.arrow (built here through the json builder, then moved into place).
    datasets.load_dataset("json", data_files={"train": write_jsonl(tmp_path / "t.jsonl", rows)},
                          cache_dir=str(tmp_path / "build"))
    built = next(p.parent for p in (tmp_path / "build").rglob("dataset_info.json"))
    cached = tmp_path / "cache" / "someorg___tinymath" / "main" / "0.0.0" / "0123abcd"
    shutil.copytree(built, cached)
    info = json.loads((cached / "dataset_info.json").read_text())
    (cached / "dataset_info.json").write_text(json.dumps({**info, "config_name": "main"}))
    (cached / "json-train.arrow").rename(cached / "tinymath-train.arrow")

    examples, _ = load_conversations(data_cfg(source="hub", hub_id="someorg/tinymath", hub_config="main"), "train", 0)
    assert [e["messages"][-1]["content"] for e in examples] == [r["answer"] for r in rows]
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"cannot load 'someorg/other' \(main\) split 'train': offline .*not in the "
                                        r"datasets cache"):
        load_conversations(data_cfg(source="hub", hub_id="someorg/other", hub_config="main"), "train", 0)
    assert time.perf_counter() - start < 10


def test_every_bad_line_of_a_file_is_found_in_one_read(tmp_path):
    # 13 malformed lines: the first 10 said with their line numbers, the other 3 counted; good lines do not count.
    path = tmp_path / "d.jsonl"
    path.write_text("".join('{"prompt": "a", "completion": "b"}\n' if i % 2 else "{oops\n" for i in range(26)))
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    text = str(e.value)
    assert text.startswith(f"13 problems in {path}, each with its fix:")
    said = [int(m) for m in re.findall(rf"{re.escape(str(path))}:(\d+): not valid JSON", text)]
    assert said == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19]
    assert text.endswith("... and 3 more line(s) like these.")
