"""ftune compare: aggregation against hand values, resume skipping finished runs, bad arms (no training here)."""

from __future__ import annotations

import json
import re
import types

import pytest

from ftune import compare as cmp
from ftune.config import ConfigError


def scores(task_correct: list[tuple[str, int]]) -> dict:
    return {f"p{i}": (t, f"q{i}", float(c)) for i, (t, c) in enumerate(task_correct)}


def test_summarize_means_and_gains_by_hand():
    # 4 problems: two of task a (trained), two of task b (untrained); two seeds.
    sft = [scores([("a", 1), ("a", 0), ("b", 0), ("b", 0)]), scores([("a", 1), ("a", 1), ("b", 0), ("b", 1)])]
    mft = [scores([("a", 1), ("a", 1), ("b", 0), ("b", 0)]), scores([("a", 1), ("a", 1), ("b", 1), ("b", 1)])]
    base = [scores([("a", 0), ("a", 0), ("b", 0), ("b", 0)])] * 2
    groups = {"a": ["a"], "b": ["b"], "trained": ["a"], "untrained": ["b"], "all": ["a", "b"]}
    t = cmp.summarize({"sft": sft, "mft": mft}, base, "sft", groups, resamples=300)
    assert t["sft"]["a"]["accuracy"]["mean"] == pytest.approx(0.75)        # (1/2 + 2/2) / 2
    assert t["sft"]["all"]["gain_vs_base"]["mean"] == pytest.approx(0.5)  # (1/4 + 3/4) / 2
    assert t["mft"]["a"]["gain_vs_sft"]["mean"] == pytest.approx(0.25)    # (1/2 + 0) / 2
    assert t["mft"]["b"]["gain_vs_sft"]["mean"] == pytest.approx(0.25)    # (0 + 1/2) / 2
    assert "gain_vs_sft" not in t["sft"]["a"]
    lo, hi = t["mft"]["all"]["gain_vs_sft"]["ci95"]
    assert lo <= 0.25 <= hi


def test_arms_must_score_the_same_problems():
    a = [scores([("a", 1), ("a", 0)])]
    b = [{"p0": ("a", "q0", 1.0), "p1": ("a", "another question", 0.0)}]
    with pytest.raises(ConfigError, match="other held-out problems"):
        cmp.summarize({"sft": a, "x": b}, None, "sft", {"all": ["a"]})


@pytest.mark.parametrize(("text", "said"), [("sft", "NAME: key=value"), (": x=1", "NAME"),
                                            ("m: objective", "not key=value")])
def test_bad_arms(text, said):
    with pytest.raises(ConfigError, match=said):
        cmp.parse_arm(text)


def test_seeds_and_arm_parsing():
    assert cmp.parse_seeds("0,1, 2") == [0, 1, 2]
    with pytest.raises(ConfigError):
        cmp.parse_seeds("0,0")
    assert cmp.parse_arm("mft: objective=masked_thought 'data.system_prompt=a b'") == (
        "mft", ["objective=masked_thought", "data.system_prompt=a b"])


def fake_run(where, correct: list[int], start: bool):
    """What `ftune train` leaves in a finished run dir, for the harness to read."""
    def write_eval(tag, cs):
        d = where / tag
        d.mkdir(parents=True)
        d.joinpath("predictions.jsonl").write_text("".join(
            json.dumps({"id": f"t-{i}", "task": "t", "question": f"q{i}", "correct": bool(c)}) + "\n"
            for i, c in enumerate(cs)))
        d.joinpath("metrics.json").write_text(json.dumps({"tasks": {"t": {"trained": True}}}))
    write_eval("eval_end", correct)
    if start:
        write_eval("eval_start", [0] * len(correct))
    where.joinpath("metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    where.joinpath("summary.json").write_text(json.dumps({"task_end": {"n": len(correct)}, "steps": 5,
                                                          "train_tokens": 100, "train_seconds": 2}))


def test_a_killed_comparison_resumes_without_rerunning_finished_runs(tmp_path):
    calls, killed = [], []

    def runner(cmd):
        where = next(a.split("=", 1)[1] for a in cmd if a.startswith("output_dir="))
        calls.append((where, "trainer.resume=auto" in cmd))
        from pathlib import Path

        where = Path(where)
        if where.name == "mft-s1" and not killed:
            killed.append(where)
            where.mkdir(parents=True)  # killed mid-run: a directory, no summary
            return types.SimpleNamespace(returncode=137)
        where.mkdir(parents=True, exist_ok=True)
        fake_run(where, [1, 1, 0, 0] if "objective=x" in cmd else [1, 0, 0, 0], "eval.at_start=true" in cmd)
        return types.SimpleNamespace(returncode=0)

    arms = [("sft", []), ("mft", ["objective=x"])]
    with pytest.raises(SystemExit, match="finished so far are kept"):
        cmp.compare(["model=tiny_random"], arms, [0, 1], tmp_path, "sft", "cmd", resamples=50, runner=runner)
    assert [c[0].rsplit("/", 1)[1] for c in calls] == ["sft-s0", "mft-s0", "sft-s1", "mft-s1"]
    calls.clear()
    result = cmp.compare(["model=tiny_random"], arms, [0, 1], tmp_path, "sft", "cmd", resamples=50, runner=runner)
    assert calls == [(str(tmp_path / "runs" / "mft-s1"), True)]  # only the unfinished one, resumed
    assert result["table"]["mft"]["all"]["gain_vs_sft"]["mean"] == pytest.approx(0.25)
    assert result["table"]["sft"]["all"]["gain_vs_base"]["mean"] == pytest.approx(0.25)
    assert "| mft | all | 50.0 [" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.png").stat().st_size > 0 and json.loads((tmp_path / "compare.json").read_text())


@pytest.mark.parametrize("override", ["trainer.max_steps=40", "trainer.batch_size=4", "eval.limit=10",
                                      "data.tasks=[chain_sum]", "+data.size=100", "model=tiny_random",
                                      "eval=gsm8k"])
def test_an_arm_that_changes_the_budget_tasks_or_problems_is_refused_before_any_run(tmp_path, override):
    calls = []
    with pytest.raises(ConfigError, match=r"arms must share the budget.*--arm short: " + re.escape(override)):
        cmp.compare([], [("sft", []), ("short", [override])], [0], tmp_path, "sft", "cmd",
                    runner=lambda cmd: calls.append(cmd))
    assert calls == []
    assert cmp.shared_key("trainer.lr=1e-4") is None and cmp.shared_key("selection.budget=400") is None
    assert cmp.shared_key("trainer.max_steps_x=1") is None  # a prefix only counts at a key boundary


def test_runs_that_took_different_steps_are_an_error_not_a_footnote(tmp_path):
    def runner(cmd):
        from pathlib import Path

        where = Path(next(a.split("=", 1)[1] for a in cmd if a.startswith("output_dir=")))
        where.mkdir(parents=True, exist_ok=True)
        fake_run(where, [1, 0], "eval.at_start=true" in cmd)
        if where.name.startswith("mft"):  # a run that stopped early
            s = json.loads((where / "summary.json").read_text())
            (where / "summary.json").write_text(json.dumps({**s, "steps": 3}))
        return types.SimpleNamespace(returncode=0)

    with pytest.raises(ConfigError, match=r"different numbers of optimizer steps \(sft: \[5\], mft: \[3\]\)"):
        cmp.compare([], [("sft", []), ("mft", ["objective=x"])], [0], tmp_path, "sft", "cmd", resamples=20,
                    runner=runner)
    assert not (tmp_path / "compare.json").exists()
