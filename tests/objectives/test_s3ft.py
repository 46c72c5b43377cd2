"""S3FT: the judges, the own/paraphrase/gold decision, its resumable cache, the rebuilt SFT rows, bad input, and a
short end-to-end run on the tiny model (real generation, some answers scripted so that every path is taken)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
from _tiny import losses, make_cfg, run  # noqa: E402

from ftune.config import ConfigError  # noqa: E402
from ftune.data.batching import pack  # noqa: E402
from ftune.data.sources import DataError  # noqa: E402
from ftune.data.tokenize import IGNORE, tokenize_conversation  # noqa: E402
from ftune.eval import judges  # noqa: E402
from ftune.objectives import s3ft  # noqa: E402
from ftune.objectives.s3ft import S3FT, composition, rebuild_rows, rewrite_cached, rewrite_chunk, unpack  # noqa: E402
from ftune.preflight import validate_train  # noqa: E402


def item(answer, gold="48 / 2 = 24\n#### 1,200", tests=None):
    return {"prompt": [{"role": "user", "content": "How many?"}], "gold": gold, "answer": answer, "tests": tests}


# ------------------------------------------------------------------------------------------------------- judges
def test_numeric_match_on_gsm8k_style_answers():
    judge = judges.NumericMatch()
    answers = ["So she sold 1200 clips. The answer is 1200.", "The answer is $1,200.00", "#### 1200",
               "The answer is 1201.", "I do not know.", ""]
    assert judge([item(a) for a in answers]) == [True, True, True, False, False, False]
    # "the answer is N" beats a later number; a gold answer without a number accepts nothing
    assert judge([item("The answer is 1200, not 7"), item("1200", gold="no number here")]) == [True, False]


def test_unit_tests_pass_fail_timeout_and_syntax_error():
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
    assert judges.run_tests("def add(a, b):\n    return a + b", tests) == (True, "passed")
    assert judges.run_tests("def add(a, b):\n    return a - b", tests) == (False, "AssertionError")
    ok, why = judges.run_tests("def add(a, b) return a + b", tests)
    assert not ok and why.startswith("SyntaxError")
    assert judges.run_tests("def add(a, b):\n    while True:\n        pass", tests, timeout=1) == (False, "timeout")
    # the program gets no proxies and no environment of ours
    assert judges.run_tests("import os\nassert 'http_proxy' not in os.environ and 'HOME' in os.environ", "")[0]
    fenced = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    mbpp = "[BEGIN]\n 'def add(a, b):\n    return a + b' \n[DONE]"
    assert judges.extract_code(mbpp) == "def add(a, b):\n    return a + b"
    assert judges.UnitTests(timeout=5)([item(fenced, tests=tests), item(mbpp, tests="\n".join(tests)),
                                        item("def add(a, b): return 0", tests=tests)]) == [True, True, False]


def test_llm_judge_with_a_stub_scorer():
    seen = []

    def scorer(conversations):
        seen.extend(conversations)
        return [1.0 if "1200" in c[0]["content"].split("Proposed answer:")[1] else -1.0 for c in conversations]

    judge = judges.LLMJudge(scorer)
    assert judge([item("It is 1200."), item("It is 12.")]) == [True, False]
    text = seen[0][0]["content"]
    assert "How many?" in text and "#### 1,200" in text and "It is 1200." in text and "yes or no" in text
    assert judge([]) == []
    with pytest.raises(ConfigError, match="judge_prompt"):
        judges.LLMJudge(scorer, prompt="{question} {answer}")  # no {reference}


def _tiny_model():
    from transformers import AutoModelForCausalLM

    from ftune.models.loading import resolve_model_dir

    return AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny_random")).eval()


def test_llm_judge_reads_the_models_yes_no_logits(tiny_tokenizer):
    tok, model = tiny_tokenizer, _tiny_model()
    yes, no = judges.yes_no_ids(tok)
    assert not set(yes) & set(no)
    assert all("yes".startswith(tok.decode([i]).strip().lower()) for i in yes)
    assert all("no".startswith(tok.decode([i]).strip().lower()) for i in no)
    scorer = judges.model_scorer(model, tok, batch_size=2)
    judge = judges.LLMJudge(scorer)
    items = [item("1200"), item("The total is 1200 clips, because 48 + 24 = 72 and so on.")]
    convs = [judge.conversation(it) for it in items]
    # by hand: log-sum-exp of the yes spellings minus that of the no spellings, unpadded, one prompt at a time
    from ftune.data.tokenize import prompt_ids

    by_hand = []
    for c in convs:
        with torch.no_grad():
            logp = model(torch.tensor([prompt_ids(tok, c)])).logits[0, -1].log_softmax(-1)
        by_hand.append(float(logp[yes].logsumexp(-1) - logp[no].logsumexp(-1)))
    assert scorer(convs) == pytest.approx(by_hand, abs=1e-4)  # the batch is left-padded: same numbers
    bias = torch.zeros(model.config.vocab_size)
    hook = model.lm_head.register_forward_hook(lambda m, i, out: out + bias)
    try:
        bias[yes] = 30.0
        assert judge(items) == [True, True]
        bias[yes], bias[no] = 0.0, 30.0
        assert judge(items) == [False, False]
    finally:
        hook.remove()


# -------------------------------------------------------------------------------------------- the S3FT decision
def gsm_example(i: int) -> dict:
    n = i + 2
    return {"id": f"train-{i}", "messages": [
        {"role": "user", "content": f"Sam has {n} boxes with 3 pens each. How many pens does he have?"},
        {"role": "assistant", "content": f"{n} * 3 = {3 * n}\n#### {3 * n}"}]}


def scripted(i: int, paraphrase: bool) -> str | None:
    """Own answers right for i % 3 == 0 (wrong for 1, none for 2); paraphrases right for i % 3 == 1 (wrong for 2)."""
    n, k = i + 2, i % 3
    if not paraphrase:
        return {0: f"He has {3 * n} pens. The answer is {3 * n}.", 1: "The answer is 1."}.get(k)
    return {1: f"Each box holds 3 pens, so {n} boxes hold {3 * n}.\n#### {3 * n}", 2: "#### 0"}.get(k)


def fake_answer(calls):
    questions = {gsm_example(i)["messages"][0]["content"]: i for i in range(50)}

    def answer(conversations):
        out = []
        for conv in conversations:
            text = conv[-1]["content"]
            own = text in questions or text.split("\n\nEnd with")[0] in questions
            i = questions[text.split("\n\n")[0]]
            calls.append(("own" if own else "paraphrase", i, text))
            out.append(scripted(i, paraphrase=not own))
        return out

    return answer


def test_rewrite_chunk_keeps_own_else_paraphrase_else_gold():
    calls = []
    examples = [gsm_example(i) for i in range(6)]
    records = rewrite_chunk(examples, fake_answer(calls), judges.NumericMatch(), answer_instruction="End with it.")
    assert [r["source"] for r in records] == ["own", "paraphrase", "gold"] * 2
    assert [r["own_ok"] for r in records] == [True, False, False] * 2
    assert [r["paraphrase_ok"] for r in records] == [None, True, False] * 2
    assert records[2]["own"] is None and records[0]["paraphrase"] is None
    own_calls = [c for c in calls if c[0] == "own"]
    para_calls = [c for c in calls if c[0] == "paraphrase"]
    assert [c[1] for c in own_calls] == list(range(6))
    assert all(c[2].endswith("\n\nEnd with it.") for c in own_calls)  # the answer instruction, own answers only
    assert [c[1] for c in para_calls] == [1, 2, 4, 5]  # only the rejected ones are paraphrased
    assert all(gsm_example(c[1])["messages"][1]["content"] in c[2] for c in para_calls)  # the gold as reference
    comp = composition([r["source"] for r in records])
    assert comp["counts"] == {"own": 2, "paraphrase": 2, "gold": 2}


def test_composition_counts_and_percentages_add_up():
    comp = composition(["own", "gold", "gold", "paraphrase", "own", "own", "gold"], judge="x")
    assert comp["counts"] == {"own": 3, "paraphrase": 1, "gold": 3} and comp["examples"] == 7
    assert comp["percent"] == pytest.approx({"own": 300 / 7, "paraphrase": 100 / 7, "gold": 300 / 7})
    assert sum(comp["percent"].values()) == pytest.approx(100.0)
    assert comp["judge"] == "x"


def test_interrupted_preparation_resumes_at_its_first_missing_chunk(tmp_path):
    examples = [gsm_example(i) for i in range(10)]
    calls = []

    def prepare(chunk, die_at=None):
        calls.append([ex["id"] for ex in chunk])
        if len(calls) == die_at:
            raise KeyboardInterrupt  # killed while preparing this chunk
        return rewrite_chunk(chunk, fake_answer([]), judges.NumericMatch())

    with pytest.raises(KeyboardInterrupt):
        rewrite_cached(examples, tmp_path / "c", 3, lambda chunk: prepare(chunk, die_at=3))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["chunk-00000.json", "chunk-00001.json"]
    calls.clear()
    records = rewrite_cached(examples, tmp_path / "c", 3, prepare)
    assert calls == [["train-6", "train-7", "train-8"], ["train-9"]]  # only chunks 2 and 3 were computed
    fresh = rewrite_cached(examples, tmp_path / "fresh", 3, prepare)
    assert records == fresh and [r["id"] for r in records] == [f"train-{i}" for i in range(10)]
    assert [r["source"] for r in records] == ["own", "paraphrase", "gold"] * 3 + ["own"]
    calls.clear()
    assert rewrite_cached(examples, tmp_path / "c", 3, prepare) == fresh and not calls  # all from disk
    # a chunk saved for other examples is not trusted: recomputed
    (tmp_path / "c" / "chunk-00001.json").write_text(json.dumps([{"id": "other"}]))
    assert rewrite_cached(examples, tmp_path / "c", 3, prepare) == fresh
    assert calls == [["train-3", "train-4", "train-5"]]


def test_processes_prepare_disjoint_chunks_then_read_them_all(tmp_path):
    examples = [gsm_example(i) for i in range(10)]
    done = {0: [], 1: []}

    def prepare(rank):
        return lambda chunk: (done[rank].append(chunk[0]["id"]),
                              rewrite_chunk(chunk, fake_answer([]), judges.NumericMatch()))[1]

    # process 1 of 2 reaches the barrier; process 0 does its share meanwhile
    records = rewrite_cached(examples, tmp_path, 3, prepare(1), rank=1, world=2,
                             barrier=lambda: rewrite_cached(examples, tmp_path, 3, prepare(0), rank=0, world=2))
    assert done == {0: ["train-0", "train-6"], 1: ["train-3", "train-9"]}
    assert records == rewrite_cached(examples, tmp_path / "one", 3, prepare(0))


def test_processes_of_a_sharded_model_prepare_every_chunk_in_step_and_rank_0_writes(tmp_path):
    """in_step: each process computes every missing chunk (the same prompts, the same generate calls), decided before
    any is written; only rank 0's records reach the disk."""
    examples = [gsm_example(i) for i in range(10)]
    done = {0: [], 1: []}

    def prepare(rank):
        def rewrite(chunk):
            done[rank].append(chunk[0]["id"])
            records = rewrite_chunk(chunk, fake_answer([]), judges.NumericMatch())
            return records if rank == 0 else [{**r, "written_by": 1} for r in records]
        return rewrite

    rewrite_cached(examples[3:6], tmp_path / "partial", 3, prepare(0))  # one chunk prepared by an earlier run
    (tmp_path / "partial" / "chunk-00000.json").rename(tmp_path / "chunk-00001.json")
    done[0].clear()
    # process 1 decides what is missing, then (at its first barrier) process 0 runs the whole preparation
    barriers = iter([lambda: rewrite_cached(examples, tmp_path, 3, prepare(0), rank=0, world=2, in_step=True),
                     lambda: None])
    records = rewrite_cached(examples, tmp_path, 3, prepare(1), rank=1, world=2, barrier=lambda: next(barriers)(),
                             in_step=True)
    assert done[0] == done[1] == ["train-0", "train-6", "train-9"]  # chunk 1 was on disk
    one = rewrite_cached(examples, tmp_path / "one", 3, prepare(0))
    assert [{k: v for k, v in r.items() if k != "written_by"} for r in records] == one  # its own, in memory
    on_disk = [r for k in range(4) for r in json.loads((tmp_path / f"chunk-{k:05d}.json").read_text())]
    assert on_disk == one  # written by rank 0 alone


def test_a_chunk_counts_as_prepared_only_if_every_process_has_it(tmp_path):
    """`agree` (dist.agreed under a sharded model): a chunk on this process's disk that another process lacks is
    prepared again, by every process."""
    examples = [gsm_example(i) for i in range(6)]
    done = []

    def prepare(chunk):
        done.append(chunk[0]["id"])
        return rewrite_chunk(chunk, fake_answer([]), judges.NumericMatch())

    first = rewrite_cached(examples, tmp_path, 3, prepare)
    done.clear()
    again = rewrite_cached(examples, tmp_path, 3, prepare, in_step=True, agree=lambda here: [here[0], False])
    assert done == ["train-3"] and again == first


def test_unpack_undoes_pack():
    rows = [{"id": f"r{i}", "input_ids": list(range(10 * i, 10 * i + 3 + i)), "labels": [IGNORE] + [7] * (2 + i)}
            for i in range(5)]
    packed = pack(rows, max_length=9)
    assert len(packed) < len(rows)
    assert sorted(unpack(packed), key=lambda r: r["id"]) == rows
    assert unpack(rows) == rows


def test_rebuilt_rows_are_tokenized_like_sft_rows(tiny_tokenizer):
    tok = tiny_tokenizer
    examples = [gsm_example(i) for i in range(3)]
    rows = []
    for ex in examples:
        ids, labels = tokenize_conversation(tok, ex["messages"])
        rows.append({"id": ex["id"], "input_ids": ids, "labels": labels})
    own, para = "The answer is 6.", "Two boxes of three pens: 6 pens.\n#### 6 " + "and so on " * 40
    records = [{"source": "own", "own": own, "paraphrase": None}, {"source": "paraphrase", "own": None,
                                                                    "paraphrase": para},
               {"source": "gold", "own": None, "paraphrase": "#### 0"}]
    new, sources, too_long = rebuild_rows(rows, examples, records, tok, max_length=512, truncation="drop")
    expected = tokenize_conversation(tok, [examples[0]["messages"][0], {"role": "assistant", "content": own}])
    assert (new[0]["input_ids"], new[0]["labels"]) == expected
    assert tok.decode([t for t in new[1]["labels"] if t != IGNORE], skip_special_tokens=True).strip() == para.strip()
    assert new[2] is rows[2] and sources == ["own", "paraphrase", "gold"] and too_long == 0
    # the paraphrase no longer fits: drop/error keep the gold row (counted), truncate cuts it
    limit = len(rows[1]["input_ids"]) + 5
    new, sources, too_long = rebuild_rows(rows, examples, records, tok, max_length=limit, truncation="drop")
    assert new[1] is rows[1] and sources == ["own", "gold", "gold"] and too_long == 1
    new, sources, _ = rebuild_rows(rows, examples, records, tok, max_length=limit, truncation="truncate")
    assert len(new[1]["input_ids"]) == limit and sources[1] == "paraphrase"


def test_answers_without_eos_count_as_none(tiny_tokenizer, monkeypatch):
    tok = tiny_tokenizer
    done = tok.encode("The answer is 5.", add_special_tokens=False)
    monkeypatch.setattr(s3ft, "generate_from", lambda *a, **k: [done + [tok.eos_token_id], done, [tok.eos_token_id]])
    trainer = SimpleNamespace(tokenizer=tok, cfg=SimpleNamespace(trainer=SimpleNamespace(progress=False)))
    assert S3FT()._answer(trainer, [[{"role": "user", "content": "q"}]] * 3) == ["The answer is 5.", None, None]


# ---------------------------------------------------------------------------------------------------- bad input
def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_judges_and_prompts_fail_before_anything_loads(compose, tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'numeric_match'"):
        S3FT(judge="numeric")
    with pytest.raises(ConfigError, match="paraphrase_prompt"):
        S3FT(paraphrase_prompt="Rephrase: {gold}")
    with pytest.raises(ConfigError, match="unit_tests runs each example's tests, but data=gsm8k has no tests"):
        validate_train(compose(["objective=s3ft", "objective.judge=unit_tests", "data=gsm8k"]))
    with pytest.raises(ConfigError, match="is not a judge"):
        validate_train(compose(["objective=s3ft", "objective.judge=exact", "data=gsm8k"]))
    validate_train(compose(["objective=s3ft", "data=gsm8k"]))  # numeric_match on GSM8K: no data read
    names = ["plus", "total", "summed"]  # no digits: nothing numeric in these gold answers
    code = [{"prompt": f"Write {f}.", "completion": f"def {f}(a, b):\n    return a + b"} for f in names]
    no_tests = write_jsonl(tmp_path / "code.jsonl", code)
    with pytest.raises(DataError, match=r"example 'train-0' has no usable `tests`.*data.fields=\{tests: "):
        validate_train(compose(["objective=s3ft", "objective.judge=unit_tests", "data=jsonl", f"data.path={no_tests}"]))
    with pytest.raises(DataError, match="numeric_match compares final numbers, but none of the first 3"):
        validate_train(compose(["objective=s3ft", "data=jsonl", f"data.path={no_tests}"]))
    validate_train(compose(["objective=s3ft", "objective.judge=llm_judge", "data=jsonl", f"data.path={no_tests}"]))
    mbpp = write_jsonl(tmp_path / "mbpp.jsonl", [dict(r, test_list=[f"assert {f}(1, 2) == 3"])
                                                 for f, r in zip(names, code)])
    cfg = compose(["objective=s3ft", "objective.judge=unit_tests", "data=jsonl", f"data.path={mbpp}",
                   "+data.fields.tests=test_list"])
    validate_train(cfg)  # the tests field, renamed, reaches the examples
    from ftune.data.sources import load_conversations

    examples = load_conversations(cfg.data, "train", 0)[0]
    assert examples[1]["tests"] == ["assert total(1, 2) == 3"]


# ---------------------------------------------------------------------------------------------------- end to end
S3FT_RUN = ["objective=s3ft", "data=gsm8k", "objective.max_new_tokens=4", "objective.save_every=3",
            "data.packing=true", "trainer.batch_size=2", "trainer.max_steps=2"]


def test_end_to_end_own_paraphrase_gold_then_cached(tmp_path, monkeypatch, tiny_tokenizer):
    data = tmp_path / "gsm8k"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [{"question": gsm_example(i)["messages"][0]["content"],
                                       "answer": gsm_example(i)["messages"][1]["content"]} for i in range(8)])
    generated = []
    real_generate = s3ft.generate_from

    def counting_generate(*args, **kwargs):
        generated.append(len(args[1]))
        return real_generate(*args, **kwargs)

    real_answer = S3FT._answer

    def partly_scripted(self, trainer, conversations):  # the tiny model's own outputs, some replaced by a script
        model_says = real_answer(self, trainer, conversations)
        script = fake_answer([])(conversations)
        return [s if s is not None else m for s, m in zip(script, model_says)]

    monkeypatch.setattr(s3ft, "generate_from", counting_generate)
    monkeypatch.setattr(S3FT, "_answer", partly_scripted)
    t = run(make_cfg(tmp_path / "a", *S3FT_RUN, f"data.path={data}"))
    assert sum(generated) == 8 + 5  # every prompt answered, the 5 rejected ones (i % 3 != 0) paraphrased
    comp = json.loads((tmp_path / "a" / "s3ft_composition.json").read_text())
    assert comp["counts"] == {"own": 3, "paraphrase": 3, "gold": 2}  # i % 3 == 0 / 1 / 2 over i = 0..7
    assert comp["percent"] == {"own": 37.5, "paraphrase": 37.5, "gold": 25.0} and comp["examples"] == 8
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["composition"] == comp
    rows = {r["id"]: r for r in unpack(t.data.train)}
    assert len(rows) == 8 and all("position_ids" in r for r in t.data.train)  # packed again
    for i in range(8):
        ex = gsm_example(i)
        text = {0: scripted(i, False), 1: scripted(i, True), 2: ex["messages"][1]["content"]}[i % 3]
        ids, labels = tokenize_conversation(tiny_tokenizer, [ex["messages"][0], {"role": "assistant",
                                                                                 "content": text}])
        assert (rows[f"train-{i}"]["input_ids"], rows[f"train-{i}"]["labels"]) == (ids, labels)
    first = losses(tmp_path / "a")
    assert len(first) == 2 and all(x == x for x in first)

    # second run: everything comes from the cache, no generation at all, same trajectory
    def no_generation(*args, **kwargs):
        raise AssertionError("the S3FT rewrite must come from the cache")

    monkeypatch.setattr("ftune.objectives.sampling.generate_ids", no_generation)
    monkeypatch.setattr(S3FT, "_answer", real_answer)
    run(make_cfg(tmp_path / "b", *S3FT_RUN, f"data.path={data}"))
    assert losses(tmp_path / "b") == first
    assert json.loads((tmp_path / "b" / "s3ft_composition.json").read_text()) == comp
