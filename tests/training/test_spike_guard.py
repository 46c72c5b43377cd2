"""trainer.spike_factor: a step whose loss jumps above factor x the recent median is skipped and counted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ftune.training.watchdog import SpikeGuard

sys.path.insert(0, str(Path(__file__).parents[1]))
from _tiny import crash_after_checkpoint, make_cfg  # noqa: E402


def test_threshold_is_factor_times_median_once_the_history_is_full():
    g = SpikeGuard(2.0, window=32, min_history=8)
    for loss in (8.0, 1.0, 7.0, 2.0, 6.0, 3.0, 5.0):
        assert g.threshold() is None and not g.is_spike(loss)
    assert g.threshold() is None  # 7 of 8
    assert not g.is_spike(4.0)
    assert g.threshold() == 2.0 * 4.5  # median of 1..8
    assert not g.is_spike(9.0)  # not above the limit: accepted, joins the history
    assert g.threshold() == 2.0 * 5.0  # median of 1..9
    assert g.is_spike(10.01) and g.skipped == 1
    assert g.threshold() == 10.0  # the spike did not enter the history


def test_off_when_factor_is_zero():
    g = SpikeGuard(0.0, min_history=1)
    assert not any(g.is_spike(x) for x in (1.0, 1.0, 1e6))
    assert g.skipped == 0 and g.threshold() is None


def test_a_lasting_level_is_accepted_after_patience_spikes():
    g = SpikeGuard(3.0, min_history=4, patience=3)
    for _ in range(4):
        g.is_spike(1.0)
    assert [g.is_spike(5.0) for _ in range(5)] == [True, True, True, False, True]
    assert g.skipped == 4 and list(g.history) == [1.0] * 4 + [5.0]


def test_window_keeps_the_last_losses_and_state_round_trips():
    g = SpikeGuard(2.0, window=4, min_history=4)
    for loss in (100.0, 100.0, 1.0, 1.0, 1.0, 1.0):
        g.is_spike(loss)
    assert g.threshold() == 2.0  # the two early 100s left the window
    assert g.is_spike(3.0)
    h = SpikeGuard(2.0, window=4, min_history=4)
    h.load_state_dict(g.state_dict())
    assert h.state_dict() == g.state_dict() == {"history": [1.0] * 4, "in_a_row": 1, "skipped": 1}


def test_loop_skips_a_spiking_step(tmp_path, monkeypatch):
    """Step 10's loss is made 50x the others: with spike_factor=3 that step applies no update and is counted (the
    guard off is every other training test: each step is applied)."""
    from ftune.objectives.sft import SFT
    from ftune.train import Trainer
    from ftune.training.metrics import read_metrics

    real = SFT.__call__
    calls = {"n": 0}

    def spike_on_tenth(self, model, batch):
        calls["n"] += 1
        loss, m = real(self, model, batch)
        return (loss * 50, m) if calls["n"] == 10 else (loss, m)

    monkeypatch.setattr(SFT, "__call__", spike_on_tenth)
    t = Trainer(make_cfg(tmp_path / "r", "trainer.max_steps=12", "trainer.batch_size=2", "trainer.lr=1e-3",
                         "trainer.spike_factor=3"))
    stepped_after_calls = []
    real_step = t.optimizer.step
    t.optimizer.step = lambda *a, **k: (stepped_after_calls.append(calls["n"]), real_step(*a, **k))[1]
    summary = t.run()
    assert stepped_after_calls == [n for n in range(1, 13) if n != 10]
    assert summary["spike_skipped_steps"] == 1 and summary["skipped_steps"] == 0 and summary["steps"] == 12
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if "loss" in r}
    assert losses[10] > 3 * max(v for k, v in losses.items() if k != 10)  # the spike was real


@pytest.mark.slow
def test_resumed_run_keeps_the_guard_history(tmp_path, monkeypatch):
    """Crash after checkpoint-5, resume: the spike at step 10 is still caught, because the history of steps 1-9
    comes back from the checkpoint (steps 6-9 alone would be too few for the guard to act), and the final adapter
    equals the uninterrupted run's bit for bit."""
    import torch
    from safetensors.torch import load_file

    from ftune.objectives.sft import SFT
    from ftune.train import Trainer

    real_call, real_before = SFT.__call__, SFT.before_step
    at = {"step": -1}

    def before_step(self, trainer, rows):
        at["step"] = trainer.step
        return real_before(self, trainer, rows)

    def spike_at_step_10(self, model, batch):
        loss, m = real_call(self, model, batch)
        return (loss * 50, m) if at["step"] == 9 else (loss, m)

    monkeypatch.setattr(SFT, "before_step", before_step)
    monkeypatch.setattr(SFT, "__call__", spike_at_step_10)
    common = ["trainer.max_steps=11", "trainer.save_every=5", "trainer.batch_size=2", "trainer.lr=1e-3",
              "trainer.spike_factor=3"]
    full = Trainer(make_cfg(tmp_path / "full", *common)).run()
    assert full["spike_skipped_steps"] == 1

    crash_after_checkpoint(monkeypatch, make_cfg(tmp_path / "resumed", *common), "checkpoint-5")
    resumed = Trainer(make_cfg(tmp_path / "resumed", *common, "trainer.resume=auto"))
    assert resumed.step == 5 and len(resumed.spikes.history) == 5
    assert resumed.run()["spike_skipped_steps"] == 1
    a = load_file(tmp_path / "full" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
