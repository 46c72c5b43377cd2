"""data=reasoning_gym / eval=reasoning_gym: mixtures, seeds, overlap, answer formats, errors before any model."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from ftune.config import ConfigError
from ftune.data import reasoning_gym as rg

SMALL = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}  # 200 possible questions


def data_cfg(tasks, size=60, **kw):
    return OmegaConf.create({"source": "reasoning_gym", "tasks": tasks, "size": size, "answer_format": "tags",
                             "system_prompt": None, "eval_split": None, **kw})


def eval_cfg(tasks=None, limit=20, overlap="error", seed=0, context_examples=0):
    return OmegaConf.create({"task": "reasoning_gym", "tasks": tasks, "limit": limit, "seed": seed,
                             "overlap": overlap, "context_examples": context_examples})


def test_mixture_sizes_weights_and_seeds():
    d = data_cfg(["chain_sum", {"name": "products", "weight": 3, "config": {"max_digits": 2}}], size=40)
    rows, origin = rg.training_rows(d, seed=0)
    tasks = [r["task"] for r in rows]
    assert tasks.count("chain_sum") == 10 and tasks.count("products") == 30 and "seed=0" in origin
    assert rows[0]["messages"][-1]["content"].startswith("<answer>") and rows[0]["messages"][0]["role"] == "system"
    again, _ = rg.training_rows(d, seed=0)
    other, _ = rg.training_rows(d, seed=1)
    assert again == rows
    q = lambda rs: {r["messages"][1]["content"] for r in rs}  # noqa: E731
    assert len(q(rows) & q(other)) < 5  # another seed draws other problems (not the same ones shifted by one)


def test_held_out_problems_are_fixed_across_training_seeds_and_disjoint_from_training():
    d = data_cfg([{"name": "chain_sum", "config": {"max_digits": 3, "min_digits": 2}}], size=200)
    a = rg.eval_problems(d, eval_cfg(), seed=0)
    b = rg.eval_problems(d, eval_cfg(), seed=5)
    assert [p["messages"][-1]["content"] for p in a] == [p["messages"][-1]["content"] for p in b]
    assert all(p["trained"] for p in a)
    for s in (0, 5):
        train = {e["question"] for _, _, e in rg.training_problems(d, s)}
        assert not train & {p["entry"]["question"] for p in a}


def test_validation_problems_are_neither_test_nor_training_problems():
    # What a greedy soup selects on: the same tasks, other seeds, never a test or training problem.
    d = data_cfg([{"name": "chain_sum", "config": SMALL}], size=100)
    test = rg.eval_problems(d, eval_cfg(limit=20, overlap="replace"), seed=0)
    val = rg.eval_problems(d, eval_cfg(limit=20), seed=0, part="validation")
    assert len(val) == 20 and all(p["id"].startswith("chain_sum-val-") for p in val)
    qs = {p["entry"]["question"] for p in val}
    assert not qs & {p["entry"]["question"] for p in test}
    assert not qs & {e["question"] for _, _, e in rg.training_problems(d, 0)}
    again = rg.eval_problems(d, eval_cfg(limit=20), seed=3, part="validation")
    # fixed across training seeds except where a seed's own training problems had to be replaced
    assert len(qs & {p["entry"]["question"] for p in again}) >= 10


def test_overlap_is_an_error_or_replaced():
    d = data_cfg([{"name": "chain_sum", "config": SMALL}], size=300)
    with pytest.raises(ConfigError, match="also in the training set.*eval.overlap=replace"):
        rg.eval_problems(d, eval_cfg(limit=30), seed=0)
    fresh = rg.eval_problems(d, eval_cfg(limit=10, overlap="replace"), seed=0)
    train = {e["question"] for _, _, e in rg.training_problems(d, 0)}
    assert len(fresh) == 10 and not train & {p["entry"]["question"] for p in fresh}
    big = data_cfg([{"name": "chain_sum", "config": SMALL}], size=3000)
    with pytest.raises(ConfigError, match="problem space is too small"):
        rg.eval_problems(big, eval_cfg(limit=50, overlap="replace"), seed=0)


def test_context_examples_put_solved_problems_of_the_task_before_each_query():
    # Many-shot scoring: the same scored problems, each after k solved ones of its own task (ManyICL's layout).
    d = data_cfg(["chain_sum"], size=40)
    plain = rg.eval_problems(d, eval_cfg(["chain_sum", "leg_counting"], limit=10), seed=0)
    shot = rg.eval_problems(d, eval_cfg(["chain_sum", "leg_counting"], limit=10, context_examples=2), seed=0)
    assert [p["entry"] for p in shot] == [p["entry"] for p in plain]
    firsts = set()
    for p, q in zip(shot, plain):
        m = p["messages"]
        assert [x["role"] for x in m] == ["system", "user", "assistant", "user", "assistant", "user"]
        assert m[0] == q["messages"][0] and m[-1] == q["messages"][-1]
        for user, reply in ((m[1], m[2]), (m[3], m[4])):
            assert user["content"] != m[-1]["content"]  # never the query itself
            answer, in_format = rg.extract(reply["content"], p["template"])
            assert in_format and reply["content"].startswith("<answer>")
            entry = next(e for e in rg.context_pool(p["spec"], eval_cfg(context_examples=2))
                         if e["question"] == user["content"])  # a problem of the query's own task, solved right
            assert rg.scorer(p["spec"]).score_answer(answer, entry) == 1.0
        firsts.add(m[1]["content"])
    assert len(firsts) > 3  # a draw per query, not one fixed prefix
    again = rg.eval_problems(d, eval_cfg(["chain_sum", "leg_counting"], limit=10, context_examples=2), seed=3)
    assert [p["messages"] for p in again] == [p["messages"] for p in shot]  # the same for every training seed


def test_untrained_eval_tasks_are_marked():
    d = data_cfg(["chain_sum"], size=20)
    probs = rg.eval_problems(d, eval_cfg(["chain_sum", "leg_counting"], limit=6), seed=0)
    assert {(p["task"], p["trained"]) for p in probs} == {("chain_sum", True), ("leg_counting", False)}


@pytest.mark.parametrize(("tasks", "said"), [
    (["chain_summ"], "no task 'chain_summ'. Closest: chain_sum"),
    ([{"name": "chain_sum", "config": {"max_term": 3}}], "no setting.*max_term.*accepts: min_terms=2, max_terms=6"),
    ([{"name": "chain_sum", "weight": 0}], "weight=0.*> 0"),
    ([{"name": "chain_sum", "weight": -1}], "weight=-1"),
    ([], "is empty"),
    ([{"name": "chain_sum", "config": {"min_terms": 5, "max_terms": 2}}], "refuses these settings"),
    ([{"name": "chain_sum", "difficulty": 3}], "unknown key"),
])
def test_bad_mixtures_are_named(tasks, said):
    with pytest.raises(ConfigError, match=said):
        rg.parse_tasks(tasks)


def test_answer_formats_and_extraction():
    tags = rg.answer_template("tags")
    assert rg.extract("so <answer>1</answer> then <answer> 12 </answer>", tags) == ("12", True)
    assert rg.extract("it is 12", tags) == ("it is 12", False)
    assert rg.extract("work\n#### 7\nbye", rg.answer_template("hashes")) == ("7", True)
    assert rg.extract(" 9 ", rg.answer_template("plain")) == ("9", True)
    assert rg.extract("The answer is 4.", "The answer is {answer}.") == ("4", True)
    with pytest.raises(ConfigError, match="answer_format"):
        rg.answer_template("boxed")


def test_tasks_without_a_reference_answer_cannot_be_trained_on():
    with pytest.raises(ConfigError, match="no reference answer"):
        rg.training_rows(data_cfg(["graph_color"], size=3), seed=0)


def test_config_errors_come_before_any_model_loads(compose, tmp_path):
    from ftune.train import Trainer

    for bad, said in [("data.tasks=[chain_sun]", "Closest: chain_sum"),
                      ("data.tasks=[{name: chain_sum, weight: 0}]", "weight"),
                      ("eval.tasks=[leg_countin]", "eval.tasks\\[0\\].*leg_counting"),
                      ("eval.split=test", "eval.split=test is not read")]:
        cfg = compose(["model=hub", "model.name_or_path=/nonexistent", "data=reasoning_gym", "eval=reasoning_gym",
                       f"output_dir={tmp_path / 'run'}", bad])
        with pytest.raises(ConfigError, match=said):
            Trainer(cfg)


def test_train_and_eval_on_a_mixture_with_the_tiny_model(tmp_path):
    from tests._tiny import make_cfg, run

    out = tmp_path / "run"
    cfg = make_cfg(out, "data=reasoning_gym", "eval=reasoning_gym", "data.size=24", "trainer.max_steps=2",
                   "data.tasks=[chain_sum,{name: products, config: {max_digits: 2}}]",
                   "eval.tasks=[chain_sum,leg_counting]", "eval.limit=6", "eval.max_new_tokens=4",
                   "eval.at_start=true", "eval.at_end=true")
    run(cfg)
    metrics = json.loads((out / "eval_end" / "metrics.json").read_text())
    assert metrics["n"] == 6 and set(metrics["tasks"]) == {"chain_sum", "leg_counting"}
    assert metrics["tasks"]["chain_sum"]["trained"] and not metrics["tasks"]["leg_counting"]["trained"]
    assert metrics["groups"]["trained"]["n"] == 3
    preds = [json.loads(x) for x in (out / "eval_end" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and all(set(p) >= {"task", "output", "prediction", "gold", "score", "correct"}
                                   for p in preds)
    start = json.loads((out / "eval_start" / "metrics.json").read_text())
    assert [p["question"] for p in preds] == [json.loads(x)["question"] for x in
                                              (out / "eval_start" / "predictions.jsonl").read_text().splitlines()]
    assert start["n"] == 6


def test_verifier_judge_gives_credit_only_in_the_answer_format():
    # S3FT's numeric_match accepted a right number in any form, so rewritten targets lost the trained <answer> form.
    from ftune.data.sources import DataError
    from ftune.eval.judges import NumericMatch, Verifier

    d = data_cfg(["chain_sum", "basic_arithmetic"], size=10)
    rows = rg.training_rows(d, seed=3)[0]
    v = Verifier(d, seed=3)
    gold = {r["id"]: r["messages"][-1]["content"] for r in rows}
    answers = {r["id"]: rg.extract(gold[r["id"]], rg.answer_template("tags"))[0] for r in rows}
    items = [{"id": i, "gold": gold[i], "answer": f"<answer>{a}</answer>"} for i, a in answers.items()]
    assert all(v(items))
    bare = [{"id": i, "gold": gold[i], "answer": f"The answer is {a}."} for i, a in answers.items()]
    assert not any(v(bare)) and all(NumericMatch()(bare))
    wrong = [{"id": i, "gold": gold[i], "answer": f"<answer>{float(a) + 1:g}</answer>"} for i, a in answers.items()]
    assert not any(v(wrong))
    with pytest.raises(DataError, match="no reasoning-gym problem has id 'chain_sum-99'"):
        v([{"id": "chain_sum-99", "answer": "1"}])
    with pytest.raises(ConfigError, match="needs data=reasoning_gym"):
        Verifier(OmegaConf.create({"source": "gsm8k"}), 0)
