"""`accelerate launch --multi_gpu --num_processes 2 -m ftune.train` with ACCELERATE_USE_CPU=true (accelerate's own
launcher, DDP over gloo on CPU) trains the same trajectory as `ftune train --nproc 2`. (`accelerate launch --cpu` starts
one process unless it is given an mpirun hostfile.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import losses  # noqa: E402
from test_cli import ftune  # noqa: E402

BASE = ["model=tiny_random", "data.size=64", "data.eval_size=0", "data.packing=false", "eval=none",
        "trainer.progress=false", "peft.dropout=0", "trainer.lr=5e-3", "trainer.warmup_ratio=0",
        "trainer.scheduler=constant", "trainer.batch_size=4", "trainer.max_steps=3"]


@pytest.mark.slow  # the default suite launches with accelerate in tests/test_multinode.py (two machines, accelerate)
def test_accelerate_launch_equals_ftune_nproc(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launched, nproc = tmp_path / "accelerate", tmp_path / "nproc"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "ftune.train", *BASE, f"output_dir={launched}"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = ftune("train", "--nproc", "2", *BASE, f"output_dir={nproc}", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    la, ln = losses(launched), losses(nproc)
    assert len(la) == 3 and la[-1] < la[0]
    torch.testing.assert_close(torch.tensor(la), torch.tensor(ln), rtol=0, atol=1e-6)  # same ranks, same rows
    # Both trained on 2 x 4 rows per step (one process of batch 4 would follow another trajectory, and the world-size
    # check refuses processes that accelerate did not join): the same tokens.
    summary = json.loads((launched / "summary.json").read_text())
    assert summary["train_tokens"] == json.loads((nproc / "summary.json").read_text())["train_tokens"]


ACCELERATE_CONFIGS = {"ddp_multinode": "MULTI_GPU", "fsdp2": "FSDP", "deepspeed_zero2": "DEEPSPEED",
                      "deepspeed_zero3": "DEEPSPEED"}


@pytest.mark.parametrize("name", sorted(ACCELERATE_CONFIGS))
def test_accelerate_configs_load_with_accelerates_loader(name):
    """configs/accelerate/*.yaml, as `accelerate launch --config_file` reads them."""
    from accelerate.commands.config.config_args import ClusterConfig

    from ftune.paths import configs_dir

    assert sorted(p.stem for p in (configs_dir() / "accelerate").glob("*.yaml")) == sorted(ACCELERATE_CONFIGS)
    config = ClusterConfig.from_yaml_file(configs_dir() / "accelerate" / f"{name}.yaml")
    assert config.distributed_type.value == ACCELERATE_CONFIGS[name]
    assert config.mixed_precision == "no" and not config.use_cpu  # ftune's trainer.mixed_precision decides
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2  # version 1 is refused
    if name.startswith("deepspeed"):
        ds = config.deepspeed_config
        assert ds["zero_stage"] == int(name[-1]) and ds["gradient_accumulation_steps"] == 1  # as ftune requires
