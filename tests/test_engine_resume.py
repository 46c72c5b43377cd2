"""A checkpoint written under one engine resumes under every other one (ftune/training/engine_state.py
`check_resume` and `load_optimizer_state` with CONVERT): one process (DDP's layout), FSDP2, DeepSpeed ZeRO-2 and
ZeRO-3, each on 2 processes with the same global batch of 12 rows. The optimizer state goes from the writer's layout
into torch's full state keyed by parameter name and from there into the reader's (a universal checkpoint for
DeepSpeed), so the resumed losses continue the writer's uninterrupted run (to 2e-5) and the final weights match.
LoRA+ gives two parameter groups with different learning rates; full fine-tuning is checked for three pairs, and a
DeepSpeed bf16 checkpoint gives its float32 masters. The default suite has one process into ZeRO-3, ZeRO-3 and FSDP2
into one process (test_deepspeed.py, test_fsdp.py). Slow: about 5 minutes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import assert_continues, make_cfg, run  # noqa: E402
from test_deepspeed import deepspeed_run  # noqa: E402
from test_fsdp import fsdp2_run  # noqa: E402

pytest.importorskip("deepspeed", reason="DeepSpeed is installed by `make setup`")
pytestmark = pytest.mark.slow

LORA = ["data.size=64", "data.packing=false", "peft.dropout=0", "peft.loraplus_lr_ratio=16", "trainer.lr=5e-4",
        "trainer.scheduler=cosine", "trainer.warmup_ratio=0.25", "trainer.max_steps=4"]
FULL = [*(a for a in LORA if not a.startswith("peft.")), "peft=none", "trainer.lr=1e-3", "trainer.weight_decay=0.1"]
ENGINES = ("ddp", "fsdp2", "zero2", "zero3")


def train(engine: str, out: Path, *overrides: str) -> None:
    """4 steps of 12 rows: one process x 12 rows, or 2 processes x 6 under FSDP2 or DeepSpeed."""
    if engine == "ddp":
        run(make_cfg(out, *overrides, "trainer.batch_size=12"))
    elif engine == "fsdp2":
        fsdp2_run(out, *overrides, "trainer.batch_size=6", base=[])
    else:
        deepspeed_run(out, int(engine[-1]), *overrides, "trainer.batch_size=6")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Each engine's uninterrupted run, with a checkpoint at step 2 (made on first use)."""
    root, runs = tmp_path_factory.mktemp("written"), {}

    def get(engine: str, kind: str) -> Path:
        if (engine, kind) not in runs:
            out = root / f"{engine}-{kind}"
            train(engine, out, *(LORA if kind == "lora" else FULL), "trainer.save_every=2")
            runs[engine, kind] = out
        return runs[engine, kind]

    return get


@pytest.mark.parametrize(("source", "target"), [(s, t) for s in ENGINES for t in ENGINES if s != t])
def test_a_lora_checkpoint_resumes_under_another_engine(written, tmp_path, source, target):
    full = written(source, "lora")
    train(target, tmp_path / "resumed", *LORA, f"trainer.resume={full / 'checkpoints' / 'checkpoint-2'}")
    assert_continues(tmp_path / "resumed", full, weight_atol=1e-5)


@pytest.mark.parametrize(("source", "target"), [("zero3", "fsdp2"), ("fsdp2", "zero2"), ("ddp", "zero3")])
def test_a_full_fine_tuning_checkpoint_resumes_under_another_engine(written, tmp_path, source, target):
    """Every weight's optimizer state, with weight decay on all but the norms (two groups)."""
    full = written(source, "full")
    train(target, tmp_path / "resumed", *FULL, f"trainer.resume={full / 'checkpoints' / 'checkpoint-2'}")
    assert_continues(tmp_path / "resumed", full, "model.safetensors")


def test_a_deepspeed_bf16_checkpoint_resumes_elsewhere_with_its_float32_masters(tmp_path):
    """Under DeepSpeed's bf16 the model holds bf16 weights (the checkpoint's adapter is bf16) and the optimizer the
    float32 masters it steps. Another engine gets the masters, not the bf16 copies: resumed at the checkpoint's own
    step, one process saves them as they were."""
    from ftune.training import engine_state

    zero2, one = tmp_path / "zero2", tmp_path / "one"
    deepspeed_run(zero2, 2, *LORA, "trainer.mixed_precision=bf16", "trainer.batch_size=6", "trainer.max_steps=3",
                  "trainer.save_every=2")
    assert json.loads((zero2 / "deepspeed_rank0.json").read_text())["dtypes"] == {"trainable": ["torch.bfloat16"],
                                                                                 "frozen": ["torch.bfloat16"]}
    ckpt = zero2 / "checkpoints" / "checkpoint-2"
    run(make_cfg(one, *LORA, "trainer.batch_size=12", "trainer.max_steps=2", f"trainer.resume={ckpt}"))
    engine_state.to_universal(ckpt / "deepspeed" / "state", tmp_path / "universal", 2)
    _, masters = engine_state.read_universal(tmp_path / "universal")
    saved, final = (load_file(d / "adapter_model.safetensors") for d in (ckpt, one / "final"))
    assert len(masters) == len(final) > 0
    for name, master in masters.items():
        key = name.replace(".default", "")  # PEFT's file names drop the adapter's name
        assert saved[key].dtype == torch.bfloat16
        assert torch.equal(final[key], master), key
    assert sum(not torch.equal(saved[n.replace(".default", "")].float(), m) for n, m in masters.items()) > 0
