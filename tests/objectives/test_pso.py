"""PSO adapted to LMs: pair construction, skipping, the sample cache, online re-sampling, and the loss at init."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent))
from _tiny import losses, make_cfg, run  # noqa: E402

from ftune.data.tokenize import IGNORE  # noqa: E402
from ftune.objectives.pso import PSO, make_pair, split_row  # noqa: E402

EOS = 2
ROW = {"id": "r0", "input_ids": [1, 10, 11, 12, 20, 21, EOS, 198],
       "labels": [IGNORE, IGNORE, IGNORE, IGNORE, 20, 21, EOS, 198]}


class Tok:
    eos_token_id = EOS

    def decode(self, ids, skip_special_tokens=False):
        words = {EOS: "<eos>", 198: "\n"}
        return " ".join(words.get(i, str(i)) for i in ids if not (skip_special_tokens and i == EOS))


def test_make_pair_gold_vs_sample():
    pair = make_pair(ROW, [30, 31, 32, EOS], EOS)
    assert pair["chosen_input_ids"] == ROW["input_ids"] and pair["chosen_labels"] == ROW["labels"]
    # prompt + sample + the template's tail after EOS (the newline 198), labels only on the answer
    assert pair["rejected_input_ids"] == [1, 10, 11, 12, 30, 31, 32, EOS, 198]
    assert pair["rejected_labels"] == [IGNORE] * 4 + [30, 31, 32, EOS, 198]
    truncated = make_pair(ROW, [30, 31], EOS)  # no EOS: no tail appended
    assert truncated["rejected_input_ids"] == [1, 10, 11, 12, 30, 31]
    assert split_row(ROW) == ([1, 10, 11, 12], [20, 21, EOS, 198])


def test_identical_and_judged_correct_samples_are_skipped():
    pso = PSO(judge="numeric_match")
    assert pso._keep(ROW, [20, 21, EOS], Tok()) == "skipped_identical"
    assert pso._keep(ROW, [20, 22, EOS], Tok()) is None
    # gold decodes to "20 21 \n", the sample to "5 21": same final number -> already correct
    assert pso._keep(ROW, [5, 21, EOS], Tok()) == "skipped_judged_correct"
    assert PSO()._keep(ROW, [5, 21, EOS], Tok()) is None  # no judge: kept


def test_bad_options_are_refused():
    from ftune.config import ConfigError

    with pytest.raises(ConfigError, match="mode"):
        PSO(mode="sometimes")
    with pytest.raises(ConfigError, match="precompute_ref"):
        PSO(mode="online", precompute_ref=True)


SMALL_PSO = ["objective=pso", "data.size=16", "data.eval_size=0", "objective.max_new_tokens=8",
             "trainer.batch_size=2", "trainer.lr=1e-2"]


def test_offline_pso_starts_at_log2_and_caches_samples(tmp_path, monkeypatch):
    t = run(make_cfg(tmp_path / "a", *SMALL_PSO, "trainer.max_steps=3"))
    first = losses(tmp_path / "a")
    assert first[0] == pytest.approx(math.log(2), abs=1e-5)  # policy == initial model at step 1
    assert first[-1] < first[0]
    assert t.objective.stats["pairs"] == len(t.data.train) > 0
    assert all(r["rejected_labels"][: len(split_row(r["sft_row"])[0])] == [IGNORE] * len(split_row(r["sft_row"])[0])
               for r in t.data.train)

    def no_generation(*args, **kwargs):
        raise AssertionError("offline samples must come from the cache")

    monkeypatch.setattr("ftune.objectives.sampling.generate_ids", no_generation)
    run(make_cfg(tmp_path / "b", *SMALL_PSO, "trainer.max_steps=3"))
    assert losses(tmp_path / "b") == first  # same cached samples, same seed: same trajectory


def test_the_sample_cache_is_used_only_if_every_rank_has_it(tmp_path, monkeypatch):
    """Ranks sample together (in step under FSDP2 / ZeRO-3, a share each under data parallelism), so all must agree
    to use the cache: with a machine whose FTUNE_HOME lacks it (dist.agreed says so), this process samples again,
    although its own cache has the file."""
    import ftune.objectives.sampling as sampling
    from ftune.training import distributed as dist

    run(make_cfg(tmp_path / "a", *SMALL_PSO, "trainer.max_steps=2"))
    calls = []
    real = sampling.generate_ids
    monkeypatch.setattr(sampling, "generate_ids", lambda *a, **k: calls.append(1) or real(*a, **k))
    asked = []
    monkeypatch.setattr(dist, "agreed", lambda acc, flags: asked.append(list(flags)) or [False] * len(flags))
    run(make_cfg(tmp_path / "b", *SMALL_PSO, "trainer.max_steps=2"))
    assert asked and asked[0] == [True] and calls  # this rank had it; another did not: sampled again
    assert losses(tmp_path / "b") == losses(tmp_path / "a")  # greedy samples: the same pairs
    calls.clear()
    monkeypatch.setattr(dist, "agreed", lambda acc, flags: flags)  # every rank has it
    run(make_cfg(tmp_path / "c", *SMALL_PSO, "trainer.max_steps=2"))
    assert not calls


def test_online_pso_resamples_the_steps_rows(tmp_path, monkeypatch):
    calls = []

    def fake_sample(self, trainer, rows, progress):
        calls.append((trainer.step, len(rows)))
        return [[40 + trainer.step, EOS] for _ in rows]

    monkeypatch.setattr(PSO, "_sample", fake_sample)
    t = run(make_cfg(tmp_path / "o", *SMALL_PSO, "objective.mode=online", "objective.resample_every=2",
                     "trainer.max_steps=4", "trainer.grad_accum=2"))
    # setup's initial samples may come from the cache; then steps 0 and 2 re-sample their 2 x 2 rows
    assert [c for c in calls if c[1] == 4] == [(0, 4), (2, 4)]
    resampled = [r for r in t.data.train if r["rejected_input_ids"][-2:] in ([42, EOS], [42, EOS, 198])
                 or 42 in r["rejected_input_ids"]]
    assert len(resampled) == 4


def test_online_pso_sampling_every_step_draws_only_the_rows_it_trains_on(tmp_path, monkeypatch):
    calls, used, marks = [], [], []

    def fake_sample(self, trainer, rows, progress):
        if not marks:  # token ids no training row contains, one per step
            seen = {t for r in trainer.data.train for t in r["chosen_input_ids"]}
            marks.extend(t for t in range(1000, 2000) if t not in seen)
        calls.append((trainer.step, len(rows)))
        return [[marks[trainer.step], EOS] for _ in rows]

    real_call = PSO.__call__

    def spy(self, model, batch):  # the rejected sides the loss really sees
        used.append(batch["input_ids"].clone())
        return real_call(self, model, batch)

    monkeypatch.setattr(PSO, "_sample", fake_sample)
    monkeypatch.setattr(PSO, "__call__", spy)
    t = run(make_cfg(tmp_path / "o", *SMALL_PSO, "objective.mode=online", "objective.resample_every=1",
                     "trainer.max_steps=3"))
    # Nothing drawn up front for the training rows: one draw per step, of that step's 2 rows.
    assert calls == [(0, 2), (1, 2), (2, 2)]
    assert t.objective.stats["pairs"] == len(t.data.train) > 10
    # Every batch trained on carries that step's fresh sample (its own token), never the placeholder.
    for step, ids in enumerate(used):
        assert [int((ids == m).sum()) for m in marks[:3]] == [2 if k == step else 0 for k in range(3)], step
