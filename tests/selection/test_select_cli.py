"""`ftune select`: writes the subset, its indices, a report and a histogram; deterministic under the seed; the printed
command trains on the subset; bad input refused before any model loads."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from ftune.config import ConfigError
from ftune.data.sources import DataError
from ftune.select import select_data

sys.path.insert(0, str(Path(__file__).parents[1]))
from _tiny import losses, make_cfg, run  # noqa: E402


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pool") / "pool.jsonl"
    rows = [{"prompt": f"What is {i} plus {i % 7}?", "completion": f"{i} plus {i % 7} is {i + i % 7}."}
            for i in range(40)]
    rows.append(dict(rows[5]))  # an exact duplicate, for selection=dedup
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def select(out: Path, pool: Path, *overrides: str, seed: int = 0) -> dict:
    args = ["data=jsonl", f"data.path={pool}", "data.eval_size=8", "data.max_length=128", f"seed={seed}", *overrides]
    return select_data(make_cfg(out, *args), ["model=tiny_random", f"seed={seed}", "data.max_length=128"])


def test_kmq_outputs_determinism_and_training_on_the_subset(tmp_path, pool, ftune_home):
    kmq = ["selection=kmq", "selection.budget=12", "selection.k=3", "selection.batch_size=8"]
    report = select(tmp_path / "a", pool, *kmq)
    out = tmp_path / "a"
    selected = [json.loads(x) for x in (out / "selected.jsonl").read_text().splitlines()]
    indices = json.loads((out / "selected_indices.json").read_text())
    saved = json.loads((out / "report.json").read_text())
    assert len(selected) == 12 == len(set(indices["indices"])) and saved["budget_met"] is True
    assert saved["pool"] == 33 and saved["held_out"] == 8  # 41 read, last 8 held out
    assert [r["id"] for r in selected] == indices["ids"] == [f"train-{i}" for i in indices["indices"]]
    assert sum(saved["cluster_sizes"]) == 33 and saved["clusters_represented"] == 3
    assert (out / "scores.png").stat().st_size > 1000 and len((out / "heldout.jsonl").read_text().splitlines()) == 8
    # Same seed, same subset (embeddings come from the cache); another seed, another subset.
    select(tmp_path / "b", pool, *kmq)
    select(tmp_path / "c", pool, *kmq, seed=1)
    assert (tmp_path / "b" / "selected.jsonl").read_text() == (out / "selected.jsonl").read_text()
    assert (tmp_path / "c" / "selected.jsonl").read_text() != (out / "selected.jsonl").read_text()
    # The printed command, run (with a step budget for the test): it reads the subset and the held-out file back.
    command = shlex.split(report["train_command"])
    assert command[:4] == ["ftune", "train", "data=jsonl", f"data.path={(out / 'selected.jsonl').resolve()}"]
    assert "model=tiny_random" in command and f"data.eval_split={(out / 'heldout.jsonl').resolve()}" in command
    cfg = make_cfg(tmp_path / "run", *command[2:], "trainer.max_steps=2", "trainer.batch_size=2")
    trainer = run(cfg)
    assert trainer.data.stats["train_examples"] == 12 and trainer.data.stats["eval_examples"] == 8
    assert len(losses(tmp_path / "run")) == 2
    with pytest.raises(ConfigError, match=r"already holds a selection"):
        select(tmp_path / "a", pool, *kmq)


def test_dedup_and_plain_callables(tmp_path, pool):
    report = select(tmp_path / "d", pool, "selection=dedup", "selection.threshold=null", "data.eval_size=0")
    assert report["exact_duplicates"] == 1 and report["selected"] == 40 and report["score_histogram"] is None
    assert "data.eval_size=0" in report["train_command"]
    report = select(tmp_path / "r", pool, "selection=random", "selection.budget=5", "data.eval_size=0")
    assert report["selected"] == 5 and report["budget_met"] is True
    ids = json.loads((tmp_path / "r" / "selected_indices.json").read_text())
    assert ids["ids"] == [f"train-{i}" for i in ids["indices"]] and ids["indices"] == sorted(set(ids["indices"]))


def test_bad_input_before_any_model_loads(tmp_path, pool, monkeypatch):
    import ftune.selection.embed as embed

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(embed.Embedder, "_compute", no_model)
    with pytest.raises(ConfigError, match=r"ftune select needs a selection method"):
        select(tmp_path / "n", pool)
    with pytest.raises(ConfigError, match=r"selection\.budget=500 is larger than the pool of 33"):
        select(tmp_path / "b", pool, "selection=kmq", "selection.budget=500")
    with pytest.raises(ConfigError, match=r"selection\.k=50 clusters is more than the pool of 33"):
        select(tmp_path / "k", pool, "selection=kmq", "selection.budget=5", "selection.k=50")
    with pytest.raises(ConfigError, match=r"needs selection\.target_path"):
        select(tmp_path / "t", pool, "selection=got_d", "selection.budget=5")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"no records at all"):
        select(tmp_path / "e", pool, "selection=got_d", "selection.budget=5", f"selection.target_path={empty}")
    with pytest.raises(ConfigError, match=r"selection\.budget=500 is larger than the pool of 33"):
        select(tmp_path / "g", pool, "selection=got_d", "selection.budget=500", f"selection.target_path={pool}")


def test_got_d_end_to_end(tmp_path, pool):
    target = tmp_path / "target.jsonl"
    target.write_text("".join(json.dumps({"prompt": f"What is {i} plus 3?", "completion": f"{i} plus 3 is {i + 3}."})
                              + "\n" for i in (3, 10)))
    report = select(tmp_path / "o", pool, "selection=got_d", "selection.budget=6", f"selection.target_path={target}")
    assert report["selected"] == 6 and report["targets"] == 2 and report["marginal_error"] < 1e-3
    assert (tmp_path / "o" / "scores.png").exists()


def test_console_script(tmp_path, pool):
    """The real `ftune select`: listed in the help; a bad budget exits 2 with the config error and writes nothing."""
    import os
    import shutil
    import subprocess

    exe = Path(sys.executable).parent / "ftune"
    exe = str(exe) if exe.exists() else shutil.which("ftune")
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    assert "select" in subprocess.run([exe, "--help"], capture_output=True, text=True, env=env).stdout
    out = subprocess.run([exe, "select", "model=tiny_random", "data=jsonl", f"data.path={pool}", "selection=kmq",
                          "selection.budget=500", f"output_dir={tmp_path / 'x'}"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "ftune: config error: selection=kmq: selection.budget=500 is larger than the pool of 41" in out.stderr
    assert not (tmp_path / "x" / "selected.jsonl").exists()
