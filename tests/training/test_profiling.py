"""trainer.profile_steps: torch.profiler records exactly the chosen steps and writes a trace and an operator table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import losses, make_cfg, run  # noqa: E402

from ftune.config import ConfigError  # noqa: E402
from ftune.preflight import validate_train  # noqa: E402


def test_profile_records_the_chosen_steps(tmp_path):
    cfg = make_cfg(tmp_path / "p", "trainer.max_steps=5", "trainer.batch_size=2", "trainer.profile_steps=2",
                   "trainer.profile_from=3")
    run(cfg)
    trace = json.loads((tmp_path / "p" / "profile" / "trace_rank0.json").read_text())
    steps = sorted(e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#"))
    # profiler.step() is called after each optimizer step, so step k (1-based) is ProfilerStep#(k-1): steps 3 and 4
    assert steps == ["ProfilerStep#2", "ProfilerStep#3"]
    assert sorted(f.name for f in (tmp_path / "p" / "profile").iterdir()) == ["ops_rank0.txt", "trace_rank0.json"]
    table = (tmp_path / "p" / "profile" / "ops_rank0.txt").read_text()
    assert "2 step(s) from step 3" in table and ("aten::mm" in table or "aten::addmm" in table)
    # the profiled run trains as the plain one does
    plain = make_cfg(tmp_path / "q", "trainer.max_steps=5", "trainer.batch_size=2")
    run(plain)
    assert losses(tmp_path / "p") == pytest.approx(losses(tmp_path / "q"), rel=1e-5)
    assert not (tmp_path / "q" / "profile").exists()


def test_profile_window_past_the_last_step_is_refused(tmp_path):
    cfg = make_cfg(tmp_path / "r", "trainer.max_steps=4", "trainer.profile_steps=3", "trainer.profile_from=3")
    with pytest.raises(ConfigError, match=r"profile_steps=3 would record past trainer.max_steps=4"):
        validate_train(cfg)


def test_a_window_the_process_never_reaches_warns(tmp_path, caplog):
    """A resumed run counts steps from its resume: if it ends before profile_from, say so instead of nothing."""
    from types import SimpleNamespace

    from ftune.training.profiling import step_profiler

    prof = step_profiler(SimpleNamespace(profile_steps=1, profile_from=5), tmp_path, rank=0)
    prof.start()
    for _ in range(2):
        prof.step()
    with caplog.at_level("WARNING", logger="ftune"):
        prof.stop()
    assert "no profile was written; lower trainer.profile_from" in caplog.text
    assert not (tmp_path / "profile").exists()
