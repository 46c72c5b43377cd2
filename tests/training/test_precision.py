"""trainer.mixed_precision=auto: bf16 on a GPU that has it; on a CPU, bf16 only where a timed product is clearly faster;
every process of a run takes rank 0's choice."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import make_cfg, run  # noqa: E402
from test_distributed import torchrun  # noqa: E402

from ftune.training import checkpoint as ckpt  # noqa: E402
from ftune.training import precision  # noqa: E402


@pytest.mark.parametrize("rates, choice", [((100.0, 119.0), "no"), ((100.0, 121.0), "bf16"),
                                           ((253.0, 146.0), "no"), ((191.0, 814.0), "bf16")])
def test_a_cpu_trains_in_bf16_only_where_it_multiplies_clearly_faster(monkeypatch, rates, choice):
    monkeypatch.setattr(precision, "cpu_rates", lambda: rates)
    got, why = precision.resolve("auto", "cpu")
    assert got == choice
    assert f"{rates[1]:.0f} GFLOP/s under bf16 autocast against {rates[0]:.0f} in float32" in why


def test_a_gpu_by_its_bf16_support_other_devices_float32_explicit_choices_kept(monkeypatch):
    monkeypatch.setattr(precision, "cpu_rates", lambda: pytest.fail("timed the CPU for another device"))
    for supported, choice in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",  # natively: emulated bf16 counts as none
                            lambda including_emulation=True, supported=supported: supported and not including_emulation)
        assert precision.resolve("auto", "cuda")[0] == choice
    assert precision.resolve("auto", "mps")[0] == "no"
    for explicit in ("no", "bf16", "fp16"):
        assert precision.resolve(explicit, "cpu")[0] == precision.resolve(explicit, "cuda")[0] == explicit


class Products(TorchDispatchMode):
    """The dtypes of the matrix products run under it (below autocast, so after its casts)."""

    def __init__(self):
        super().__init__()
        self.dtypes: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.matmul):
            self.dtypes.append(tuple(a.dtype for a in args[:2]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bf16, dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_the_timed_product_runs_as_the_training_step_would(bf16, dtype):
    with Products() as seen:
        rate = precision._gflops(bf16, shape=(64, 32, 16), repeats=2)
    assert rate > 0 and seen.dtypes == [(dtype, dtype)] * 3  # warm-up + 2 timed


def test_the_cpu_is_timed_once_per_process(monkeypatch):
    calls = []
    monkeypatch.setattr(precision, "_gflops", lambda bf16: calls.append(bf16) or (300.0 if bf16 else 100.0))
    precision.cpu_rates.cache_clear()
    try:
        assert precision.cpu_rates() == precision.cpu_rates() == (100.0, 300.0) and sorted(calls) == [False, True]
    finally:
        precision.cpu_rates.cache_clear()


@pytest.mark.parametrize("rates, choice", [((100.0, 500.0), "bf16"), ((500.0, 100.0), "no")])
def test_the_trainer_runs_and_reports_what_auto_chose(tmp_path, monkeypatch, rates, choice):
    monkeypatch.setattr(precision, "cpu_rates", lambda: rates)
    out = tmp_path / "run"
    trainer = run(make_cfg(out, "trainer.mixed_precision=auto", "trainer.max_steps=2"))
    with trainer.acc.autocast():
        autocast = torch.is_autocast_enabled("cpu")
    assert (trainer.acc.mixed_precision, autocast) == (choice, choice == "bf16")
    assert json.loads((out / "summary.json").read_text())["mixed_precision"] == choice


WORKER = """
import json, os, sys
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
from accelerate.state import AcceleratorState
from _tiny import make_cfg
from ftune.training import distributed as dist, precision

rank, out, seen = int(os.environ["RANK"]), Path(sys.argv[1]), []
for fast in ("bf16", "fp32"):  # rank 0 times `fast` faster; rank 1 the other one
    bf16_fast = (fast == "bf16") == (rank == 0)
    precision.cpu_rates = lambda: (100.0, 500.0) if bf16_fast else (500.0, 100.0)
    AcceleratorState._reset_state()  # as the trainer does before it builds its Accelerator
    acc = dist.make_accelerator(make_cfg(out, "trainer.mixed_precision=auto"))
    with acc.autocast():
        seen.append([acc.num_processes, acc.mixed_precision, torch.is_autocast_enabled("cpu")])
(out / f"rank{{rank}}.json").write_text(json.dumps(seen))
dist.end_process_group()
"""


def test_every_process_takes_rank_0s_choice(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(tests=str(Path(__file__).resolve().parents[1])))
    r = torchrun([str(worker), str(tmp_path)], True, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [[2, "bf16", True], [2, "no", False]]


def test_a_resumed_auto_run_keeps_the_precision_it_trained_with(tmp_path, monkeypatch):
    """Resumed on a machine where auto would choose otherwise, the run continues in the checkpoint's precision; an
    explicit choice, and auto from a checkpoint that did not record it (an earlier ftune), take this machine's."""
    out = tmp_path / "run"

    def train(fast: str, *overrides: str):
        monkeypatch.setattr(precision, "cpu_rates", lambda: (100.0, 500.0) if fast == "bf16" else (500.0, 100.0))
        return run(make_cfg(out, "trainer.save_every=1", *overrides))

    def recorded(step: int):
        return json.loads((out / "checkpoints" / f"checkpoint-{step}" / "engine.json").read_text())

    def recorded_final(step: int):  # each resume below goes on from the previous run's final/, saved at its last step
        assert ckpt.saved_step(out / "final") == step
        return json.loads((out / "final" / "engine.json").read_text())

    train("bf16", "trainer.mixed_precision=auto", "trainer.max_steps=3")
    assert recorded(2)["mixed_precision"] == "bf16"
    resumed = train("fp32", "trainer.mixed_precision=auto", "trainer.max_steps=4", "trainer.resume=auto")
    with resumed.acc.autocast():
        assert torch.is_autocast_enabled("cpu")
    assert resumed.resume_from.name == "final" and recorded_final(4)["mixed_precision"] == "bf16"
    assert json.loads((out / "summary.json").read_text())["mixed_precision"] == "bf16"

    explicit = train("bf16", "trainer.mixed_precision=no", "trainer.max_steps=5", "trainer.resume=auto")
    assert explicit.acc.mixed_precision == "no" and recorded_final(5)["mixed_precision"] == "no"
    from ftune.training import distributed as dist

    real = dist.engine_record  # final/ at step 6 written as an earlier ftune wrote it, without its precision
    monkeypatch.setattr(dist, "engine_record",
                        lambda acc: {k: v for k, v in real(acc).items() if k != "mixed_precision"})
    train("fp32", "trainer.mixed_precision=auto", "trainer.max_steps=6", "trainer.resume=auto")
    assert "mixed_precision" not in recorded_final(6)
    monkeypatch.setattr(dist, "engine_record", real)
    assert train("bf16", "trainer.mixed_precision=auto", "trainer.max_steps=7",
                 "trainer.resume=auto").acc.mixed_precision == "bf16"  # nothing recorded: this machine's choice
