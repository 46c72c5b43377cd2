"""Two machines, simulated on this one: one launcher per node, as a user runs them on each machine (accelerate's
`--num_machines 2 --machine_rank K` with configs/accelerate/ddp_multinode.yaml, or torchrun's `--nnodes 2 --node_rank
K`), each started in a directory of its own and with its own FTUNE_HOME (a machine-local cache), meeting over a TCP
rendezvous on 127.0.0.1. What a second machine adds over `--nproc 2` on one: each launcher's Hydra picks its own
default output_dir (relative to its own launch directory), transformers writes weights only on global rank 0 (the
second machine still builds its own cache), and the run directory may sit on storage the other machine cannot see."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import losses  # noqa: E402
from test_cli import ftune  # noqa: E402

from ftune.paths import configs_dir  # noqa: E402

# No dropout (each rank draws its own masks), a constant lr; 2 machines x batch 2 against 1 process x batch 4.
BASE = ["model=tiny_random", "data.size=64", "data.eval_size=0", "data.max_length=256", "data.packing=false",
        "eval=none", "trainer.progress=false", "peft.dropout=0", "trainer.lr=5e-3", "trainer.warmup_ratio=0",
        "trainer.scheduler=constant", "trainer.log_every=1", "trainer.max_steps=3"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_nodes(tmp_path: Path, launcher: str, args: list[str], node1_prefix: list[str] = ()) -> list[tuple]:
    """Start node 0 and node 1 together (one process each), each in tmp_path/nodeK with FTUNE_HOME tmp_path/nodeK/home;
    return [(returncode, stdout, stderr)] per node."""
    port = free_port()
    procs = []
    for k in (0, 1):
        node = tmp_path / f"node{k}"
        node.mkdir(exist_ok=True)
        env = {**os.environ, "ACCELERATE_USE_CPU": "true", "FTUNE_HOME": str(node / "home"),
               "TOKENIZERS_PARALLELISM": "false", "HYDRA_FULL_ERROR": "0"}
        if launcher == "accelerate":
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(configs_dir() / "accelerate" / "ddp_multinode.yaml"), "--num_machines", "2",
                   "--num_processes", "2", "--machine_rank", str(k), "--main_process_ip", "127.0.0.1",
                   "--main_process_port", str(port), "--dynamo_backend", "no"]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={k}",
                   "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}"]
        cmd = [*(node1_prefix if k == 1 else ()), *cmd, "-m", "ftune.train", *args]
        procs.append(subprocess.Popen(cmd, cwd=node, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, stdout, stderr))
    return out


@pytest.mark.parametrize("launcher", ["accelerate", pytest.param("torchrun", marks=pytest.mark.slow)])
def test_two_machines_train_one_run_like_one_process_with_the_global_batch(tmp_path, launcher):
    nodes = launch_nodes(tmp_path, launcher, [*BASE, "trainer.batch_size=2", "trainer.save_every=2"])
    for k, (rc, _, err) in enumerate(nodes):
        assert rc == 0, f"node {k}:\n{err[-3000:]}"
    # No output_dir was given: node 0's Hydra chose outputs/<date>/<time> under node0/, and node 1 wrote there too
    # (each rank saves its RNG state into every checkpoint), leaving nothing in a directory of its own.
    runs = [d for d in (tmp_path / "node0" / "outputs").glob("*/*") if d.is_dir()]
    assert len(runs) == 1, runs
    run = runs[0]
    assert sorted(p.name for p in (run / "checkpoints" / "checkpoint-2").glob("rng_rank*.pt")) == \
        ["rng_rank0.pt", "rng_rank1.pt"]
    assert not [d for d in (tmp_path / "node1").rglob("*") if d.is_file() and "home" not in d.parts]
    assert not list((tmp_path / "node1" / "outputs").glob("*")), "node 1's own empty <date>/<time> folders are left"
    # Node 1 built its own model cache (FTUNE_HOME is per machine here), weights included.
    assert (tmp_path / "node1" / "home" / "models" / "tiny_random" / "model.safetensors").is_file()

    one = tmp_path / "one"
    r = ftune("train", *BASE, "trainer.batch_size=4", f"output_dir={one}", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # The 2 x 2 rows of a step are the 4 rows one process takes, and the gradients are averaged over the machines.
    l2, l1 = losses(run), losses(one)
    assert len(l2) == len(l1) == 3 and l2[-1] < l2[0]
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=0, atol=2e-5)
    w2, w1 = (load_file(r / "final" / "adapter_model.safetensors") for r in (run, one))
    assert w2.keys() == w1.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-4)


def test_a_run_directory_the_other_machine_cannot_see_is_refused(tmp_path):
    """Node 1 runs in a mount namespace with an empty tmpfs over the shared directory: the same path, another disk."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--mount", "true"],
                                                          capture_output=True).returncode != 0:
        pytest.skip("needs `unshare --mount` (root or user namespaces) to give node 1 a file system of its own")
    shared = tmp_path / "shared"
    shared.mkdir()
    script = f'mount -t tmpfs tmpfs {shared} && exec "$@"'
    nodes = launch_nodes(tmp_path, "torchrun", [*BASE, "trainer.batch_size=2", f"output_dir={shared / 'run'}"],
                         node1_prefix=["unshare", "--mount", "sh", "-c", script, "sh"])
    for k, (rc, _, err) in enumerate(nodes):
        assert rc != 0, f"node {k} trained"
        said = f"output_dir={shared / 'run'} is not shared: rank 1 on {socket.gethostname()} cannot see"
        assert said in err, err[-3000:]
        assert "storage every machine mounts" in err
    # Refused before training: no run (Hydra's own .hydra/ and train.log only), and rank 0 removed its probe file.
    assert sorted(p.name for p in (shared / "run").iterdir()) == [".hydra", "train.log"]


@pytest.mark.slow
def test_resume_on_two_machines_continues_the_same_trajectory(tmp_path):
    """Both machines resume from the checkpoint rank 0 wrote into the shared run directory (trainer.resume=auto on
    each): the resumed steps equal those of an uninterrupted two-machine run, bit for bit."""
    args = [*(a for a in BASE if not a.startswith("trainer.max_steps=")), "trainer.batch_size=2",
            "trainer.save_every=2"]
    full, cut = tmp_path / "full", tmp_path / "cut"

    def two_machines(*extra):
        for k, (rc, _, err) in enumerate(launch_nodes(tmp_path, "torchrun", [*args, *extra])):
            assert rc == 0, f"node {k}:\n{err[-3000:]}"

    two_machines("trainer.max_steps=6", f"output_dir={full}")
    two_machines("trainer.max_steps=3", f"output_dir={cut}")
    assert (cut / "checkpoints" / "checkpoint-2").is_dir()
    two_machines("trainer.max_steps=6", "trainer.resume=auto", f"output_dir={cut}")
    assert len(losses(full)) == 6 and [r["step"] for r in map(json.loads, (cut / "metrics.jsonl").read_text()
                                                              .splitlines()) if "loss" in r][-4:] == [3, 4, 5, 6]
    torch.testing.assert_close(torch.tensor(losses(cut)[-4:]), torch.tensor(losses(full)[-4:]), rtol=0, atol=0)
    w_full, w_cut = (load_file(r / "final" / "adapter_model.safetensors") for r in (full, cut))
    for k, v in w_full.items():
        assert torch.equal(w_cut[k], v), k
