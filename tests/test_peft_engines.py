"""Every PEFT method under every engine that does not refuse it (ftune/training/distributed.py `check_engine_limits`): 2
processes x batch 2 train the loss trajectory of 1 process x batch 4 (3 steps). LoRA (and full fine-tuning under
FSDP2 and ZeRO-3) are covered in tests/test_distributed.py, test_fsdp.py and test_deepspeed.py; the refusals in
test_fsdp.py. Slow: about
20 s per pair (docs/distributed.md has the table)."""

from __future__ import annotations

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
COMMON = ["data.size=64", "data.eval_size=8", "data.packing=false", "trainer.max_steps=3", "trainer.scheduler=constant",
          "trainer.eval_every=2", "trainer.save_every=2"]
RUNS = {"ddp": ["lift", "hft", "adalink", "prompt_tuning", "dora", "ia3", "ssf", "none"],
        "fsdp2": ["hft", "adalink", "prompt_tuning", "dora", "ia3", "ssf"],
        "zero2": ["hft", "adalink", "prompt_tuning", "dora", "ia3", "ssf", "none"],
        "zero3": ["hft", "adalink", "prompt_tuning", "dora", "ia3", "ssf"]}


def method(peft: str) -> list[str]:
    return [f"peft={peft}", *COMMON, *(["peft.dropout=0"] if peft == "dora" else [])]  # no dropout: ranks draw apart


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The 1-process run of each method, made once."""
    root, made = tmp_path_factory.mktemp("one"), {}

    def get(peft: str) -> list[float]:
        if peft not in made:
            run(make_cfg(root / peft, *method(peft), "trainer.batch_size=4"))
            made[peft] = losses(root / peft)
        return made[peft]

    return get


@pytest.mark.slow
@pytest.mark.parametrize(("engine", "peft"), [(e, m) for e, ms in RUNS.items() for m in ms])
def test_method_under_engine_equals_one_process(tmp_path, one_process, engine, peft):
    out = tmp_path / "run"
    if engine == "ddp":
        keys = {a.split("=")[0] for a in COMMON}
        small = [a for a in SMALL if a.split("=")[0] not in keys]
        r = ftune("train", "--nproc", "2", *small, *method(peft), "trainer.batch_size=2", f"output_dir={out}",
                  cwd=tmp_path, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    elif engine == "fsdp2":
        fsdp2_run(out, *method(peft), "trainer.batch_size=2", base=[])
    else:
        deepspeed_run(out, int(engine[-1]), *method(peft), "trainer.batch_size=2")
    mine, one = losses(out), one_process(peft)
    assert len(mine) == 3 and mine[-1] != mine[0]
    torch.testing.assert_close(torch.tensor(mine), torch.tensor(one), rtol=0, atol=2e-5)
