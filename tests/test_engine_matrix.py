"""Every PEFT method and every objective under every engine that does not refuse it (ftune/training/distributed.py
`check_engine_limits`): 2 processes x batch 2 train the loss trajectory of 1 process x batch 4 (3 steps). LoRA with
SFT (and full fine-tuning under FSDP2 and ZeRO-3), DPO, PSO and S3FT are covered in tests/test_distributed.py,
test_fsdp.py and test_deepspeed.py; the refusals in test_fsdp.py. Slow: about 20 s per pair (docs/distributed.md has
the table)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import SMALL, losses, make_cfg, run  # noqa: E402
from test_cli import ftune  # noqa: E402
from test_deepspeed import deepspeed_run  # noqa: E402
from test_fsdp import fsdp2_run  # noqa: E402

# A held-out eval and then a checkpoint at step 2: FSDP2's root unit is left gathered by the eval when the optimizer
# state is saved (methods with trainable weights there, HFT, AdaLink, prompt tuning, failed before every unit was
# resharded first).
COMMON = ["data.size=64", "data.eval_size=8", "trainer.max_steps=3", "trainer.scheduler=constant",
          "trainer.eval_every=2", "trainer.save_every=2"]
ENGINES = ("ddp", "fsdp2", "zero2", "zero3")
PEFT = {"ddp": ["lift", "hft", "adalink", "prompt_tuning", "dora", "ia3", "ssf", "none"],
        "fsdp2": ["hft", "adalink", "prompt_tuning", "dora", "ia3", "ssf"],
        "zero2": ["hft", "adalink", "prompt_tuning", "dora", "ia3", "ssf", "none"],
        "zero3": ["hft", "adalink", "prompt_tuning", "dora", "ia3", "ssf"]}


def method(peft: str) -> list[str]:
    return [f"peft={peft}", "data.packing=false", *COMMON,
            *(["peft.dropout=0"] if peft == "dora" else [])]  # no dropout: ranks draw apart


def preference_data(folder: Path) -> Path:
    path = folder / "prefs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question {i}: is {i} a nice number?", "chosen": "Yes, a fine one.",
                                        "rejected": "No idea, go away."}) + "\n" for i in range(24)))
    return path


def task_mixture(folder: Path) -> Path:
    path = folder / "mix.jsonl"
    path.write_text("".join(json.dumps({"task": t, "input": f"{i} {t}", "output": f"{i}{t[0]}"}) + "\n"
                            for i in range(40) for t in ("add", "copy")))
    return path


# Objectives other than SFT (LoRA without dropout, unless named), each with what it needs. Masked Thought draws each
# example's mask from (seed, step, example id), so it equals one process too; packed rows as well.
OBJECTIVES = {
    "masked_thought": lambda d: ["objective=masked_thought", "objective.warmup_ratio=0.5", "data.packing=false"],
    "masked_thought_packed": lambda d: ["objective=masked_thought", "objective.noise=pad", "objective.warmup_ratio=0",
                                        "data.packing=true", "data.max_length=256"],
    "constrained_sft": lambda d: ["objective=constrained_sft", "data.packing=false"],
    "many_icl": lambda d: ["objective=many_icl", "data=jsonl", f"data.path={task_mixture(d)}", "data.max_length=128"],
    "dpo_ia3": lambda d: ["objective=dpo", "data=jsonl", f"data.path={preference_data(d)}", "peft=ia3",
                          "trainer.lr=1e-2"],
    "simpo_hft": lambda d: ["objective=dpo", "objective.loss=simpo", "data=jsonl", f"data.path={preference_data(d)}",
                            "peft=hft", "trainer.lr=1e-4"],
}

def objective(name: str, folder: Path) -> list[str]:
    args = OBJECTIVES[name](folder)
    keys = {a.split("=")[0] for a in args}
    return [*args, *(a for a in COMMON if a.split("=")[0] not in keys),
            *(["peft.dropout=0"] if not any(a.startswith("peft=") for a in args) else [])]


def train_under(engine: str, out: Path, *overrides: str) -> None:
    """2 processes x batch 2 under `engine`."""
    if engine == "ddp":
        keys = {a.split("=")[0] for a in overrides}
        small = [a for a in SMALL if a.split("=")[0] not in keys]
        r = ftune("train", "--nproc", "2", *small, *overrides, "trainer.batch_size=2", f"output_dir={out}",
                  cwd=out.parent, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    elif engine == "fsdp2":
        fsdp2_run(out, *overrides, "trainer.batch_size=2", base=[])
    else:
        deepspeed_run(out, int(engine[-1]), *overrides, "trainer.batch_size=2")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The 1-process run of each case, made once."""
    root, made = tmp_path_factory.mktemp("one"), {}

    def get(name: str, overrides: list[str]) -> list[float]:
        if name not in made:
            run(make_cfg(root / name, *overrides, "trainer.batch_size=4"))
            made[name] = losses(root / name)
        return made[name]

    return get


def assert_equal_trajectories(mine: list[float], one: list[float]) -> None:
    assert len(mine) == 3 and mine[-1] != mine[0]
    torch.testing.assert_close(torch.tensor(mine), torch.tensor(one), rtol=0, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("engine", "peft"), [(e, m) for e, ms in PEFT.items() for m in ms])
def test_method_under_engine_equals_one_process(tmp_path, one_process, engine, peft):
    out = tmp_path / "run"
    train_under(engine, out, *method(peft))
    assert_equal_trajectories(losses(out), one_process(peft, method(peft)))


@pytest.mark.slow
@pytest.mark.parametrize(("engine", "name"), [(e, o) for o in OBJECTIVES for e in ENGINES])
def test_objective_under_engine_equals_one_process(tmp_path, one_process, engine, name):
    out, args = tmp_path / "run", objective(name, tmp_path)
    train_under(engine, out, *args)
    assert_equal_trajectories(losses(out), one_process(name, args))
