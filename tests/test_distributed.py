"""Data parallelism on CPU (gloo): `ftune train --nproc 2` against one process with the same global batch, every rank
holding the same parameters, a launch whose processes would not sync refused, and resume under two processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import losses  # noqa: E402
from test_cli import ftune, ftune_exe  # noqa: E402

# No dropout (each rank draws its own masks) and a constant lr (a shorter run then equals the start of a longer one).
BASE = ["model=tiny_random", "data.size=64", "data.eval_size=0", "data.max_length=256", "data.packing=false",
        "eval=none", "trainer.progress=false", "peft.dropout=0", "trainer.lr=5e-3", "trainer.warmup_ratio=0",
        "trainer.scheduler=constant", "trainer.log_every=1"]
WORKER = Path(__file__).parent / "_dist_worker.py"


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "adapter_model.safetensors")


def torchrun(args: list[str], cpu_group: bool, cwd: Path) -> subprocess.CompletedProcess:
    """Two processes launched by torchrun; `cpu_group` sets ACCELERATE_USE_CPU=true (else it is left unset)."""
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={port}", *args]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    if cpu_group:
        env["ACCELERATE_USE_CPU"] = "true"
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_equal_one_process_with_the_global_batch(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    r2 = ftune("train", "--nproc", "2", *BASE, "trainer.batch_size=4", "trainer.max_steps=4", f"output_dir={two}",
               cwd=tmp_path, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    r1 = ftune("train", *BASE, "trainer.batch_size=8", "trainer.max_steps=4", f"output_dir={one}", cwd=tmp_path,
               timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    # 2 x 4 rows per step are the same 8 rows as 1 x 8 (BatchOrder splits the global batch by rank), and the loss is
    # normalised by the label tokens of the whole global batch: same trajectory up to float summation order.
    l2, l1 = losses(two), losses(one)
    assert len(l2) == len(l1) == 4 and l2[-1] < l2[0]
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=0, atol=2e-5)
    w2, w1 = adapter(two), adapter(one)
    assert w2.keys() == w1.keys()
    for k in w1:
        # Adam divides by the gradient's running RMS, which magnifies summation-order noise where a gradient is tiny:
        # agreement to 1e-4, against updates of lr x steps = 2e-2 per entry.
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-4)
    assert max(float(v.abs().max()) for k, v in w1.items() if "lora_B" in k) > 1e-3  # B starts at zero: it moved
    # Only rank 0 writes the run: one .hydra/, one metrics file with one record per step.
    assert (two / ".hydra" / "config.yaml").is_file() and len(l2) == 4


@pytest.mark.slow
def test_masked_thought_masks_each_example_as_one_process_does(tmp_path):
    """Masked Thought draws each example's mask from (seed, step, example id): 2 processes x 2 accumulated packed
    micro-batches of 2 rows train like 1 process x 8 rows (with draws per process and micro-batch, the second loss
    differed by ~1e-2)."""
    two, one = tmp_path / "two", tmp_path / "one"
    mft = [a for a in BASE if a != "data.packing=false"] + [
        "objective=masked_thought", "objective.warmup_ratio=0.5", "data.packing=true", "trainer.max_steps=3"]
    r2 = ftune("train", "--nproc", "2", *mft, "trainer.batch_size=2", "trainer.grad_accum=2", f"output_dir={two}",
               cwd=tmp_path, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    r1 = ftune("train", *mft, "trainer.batch_size=8", f"output_dir={one}", cwd=tmp_path, timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    rates = [r["mask_rate"] for r in map(json.loads, (one / "metrics.jsonl").read_text().splitlines())
             if "mask_rate" in r]
    assert rates[0] == 0 and 0.1 < rates[1] < rates[2] < 0.4  # p = 0.4 * step / 2.5: 0, 0.16, 0.32
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(one)), rtol=0, atol=2e-5)


@pytest.mark.slow  # the same split of items over the processes runs in the default suite for GSM8K's answers
def test_pso_offline_samples_are_split_over_the_processes(tmp_path, monkeypatch):
    """Every rank holds the same rows, so under data parallelism each samples every other prompt and the answers are
    gathered back in order: the cached samples equal one process's (greedy) and each rank generated half of them."""
    import re

    pso = [*BASE, "objective=pso", "objective.max_new_tokens=8", "data.size=16", "trainer.max_steps=2"]
    monkeypatch.setenv("FTUNE_HOME", str(tmp_path / "home2"))  # an empty sample cache for each run
    r2 = ftune("train", "--nproc", "2", *pso, "trainer.batch_size=2", f"output_dir={tmp_path / 'two'}", cwd=tmp_path,
               timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    # rank 0's log (train.log): its share of the prompts
    (k, n), = [tuple(map(int, m)) for m in re.findall(r"Process 0 of 2 computes (\d+) of (\d+) items",
                                                       (tmp_path / "two" / "train.log").read_text())]
    assert n >= 8 and k == (n + 1) // 2
    monkeypatch.setenv("FTUNE_HOME", str(tmp_path / "home1"))
    r1 = ftune("train", *pso, "trainer.batch_size=4", f"output_dir={tmp_path / 'one'}", cwd=tmp_path, timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    two, one = (sorted((tmp_path / h / "pso_samples").glob("*.json")) for h in ("home2", "home1"))
    assert len(two) == len(one) == 1 and two[0].name == one[0].name
    samples = json.loads(one[0].read_text())
    assert len(samples) == n and json.loads(two[0].read_text()) == samples
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "two")), torch.tensor(losses(tmp_path / "one")),
                               rtol=0, atol=2e-5)


def test_gsm8k_eval_answers_are_split_over_the_processes(tmp_path):
    """eval.at_start / at_end under data parallelism: each process answers a share of GSM8K's questions, rank 0
    records them all, and the predictions equal one process's."""
    import re

    evals = [*BASE, "trainer.max_steps=2", "eval=gsm8k", "eval.at_start=true", "eval.at_end=true", "eval.limit=5",
             "eval.max_new_tokens=8"]
    r2 = ftune("train", "--nproc", "2", *evals, "trainer.batch_size=4", f"output_dir={tmp_path / 'two'}",
               cwd=tmp_path, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    shares = re.findall(r"Process 0 of 2 computes (\d+) of (\d+) items", (tmp_path / "two" / "train.log").read_text())
    assert shares == [("3", "5"), ("3", "5")]  # at start and at end
    r1 = ftune("train", *evals, "trainer.batch_size=8", f"output_dir={tmp_path / 'one'}", cwd=tmp_path, timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    for tag in ("start", "end"):
        two, one = ((tmp_path / r / f"eval_{tag}" / "predictions.jsonl").read_text() for r in ("two", "one"))
        assert len(two.splitlines()) == 5 and two == one, tag
    assert not list((tmp_path / "two").glob("eval_*/*.tmp"))


def _task_data(tmp_path: Path, task: str) -> tuple[list[str], int]:
    """Overrides for a short run evaluated by `task` at start and end, and how many items the task has."""
    if task == "preference":  # 4 held-out pairs, each scored by the policy and the adapter-disabled reference
        path = tmp_path / "prefs.jsonl"
        path.write_text("".join(json.dumps({"prompt": f"Is {i} a nice number?", "chosen": "Yes, a fine one.",
                                            "rejected": "No idea."}) + "\n" for i in range(12)))
        return ["objective=dpo", f"data.path={path}", "eval=preference", "eval.batch_size=3"], 4
    path = tmp_path / "mix.jsonl"  # 3 held-out queries x 2 shot settings, answered greedily
    path.write_text("".join(json.dumps({"task": t, "input": f"{i}", "output": f"{i}{t[0]}"}) + "\n"
                            for i in range(10) for t in ("add", "copy")))
    return ["objective=many_icl", f"data.path={path}", "data.max_length=128", "eval=many_shot", "eval.shots=[0,2]",
            "eval.limit=3", "eval.max_new_tokens=4", "eval.batch_size=2"], 6


@pytest.mark.slow  # as the PSO test above: GSM8K's split is the default suite's
@pytest.mark.parametrize("task", ["preference", "many_shot"])
def test_preference_and_many_shot_evals_are_split_over_the_processes(tmp_path, task):
    """Like GSM8K's: each process scores or answers a share of the task's items, and rank 0 records them all, equal to
    one process's records (log-probs up to float noise, since the shares are batched differently)."""
    import re

    overrides, n = _task_data(tmp_path, task)
    overrides += ["data=jsonl", "data.eval_size=4", "trainer.max_steps=1", "eval.at_start=true", "eval.at_end=true"]
    keys = {o.split("=")[0] for o in overrides}
    evals = [*(a for a in BASE if a.split("=")[0] not in keys), *overrides]  # the task's values replace BASE's
    r2 = ftune("train", "--nproc", "2", *evals, "trainer.batch_size=2", f"output_dir={tmp_path / 'two'}",
               cwd=tmp_path, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    shares = re.findall(r"Process 0 of 2 computes (\d+) of (\d+) items", (tmp_path / "two" / "train.log").read_text())
    assert shares == [(str((n + 1) // 2), str(n))] * 2  # at start and at end
    r1 = ftune("train", *evals, "trainer.batch_size=4", f"output_dir={tmp_path / 'one'}", cwd=tmp_path, timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    for tag in ("start", "end"):
        two, one = ([json.loads(x) for x in (tmp_path / r / f"eval_{tag}" / "predictions.jsonl").open()]
                    for r in ("two", "one"))
        assert len(two) == len(one) == n and [p["id"] for p in two] == [p["id"] for p in one], tag
        for a, b in zip(two, one):
            floats = [k for k, v in b.items() if isinstance(v, float)]
            assert {k: a[k] for k in floats} == pytest.approx({k: b[k] for k in floats}, abs=1e-4), tag
            assert {k: v for k, v in a.items() if k not in floats} == {k: v for k, v in b.items() if k not in floats}
    assert not list((tmp_path / "two").glob("eval_*/*.tmp"))


def test_every_rank_holds_the_same_parameters(tmp_path):
    out = tmp_path / "run"
    r = torchrun([str(WORKER), str(out), *BASE, "trainer.batch_size=2", "trainer.max_steps=3"],
                 True, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    digests = [json.loads((out / f"params_rank{k}.json").read_text()) for k in (0, 1)]
    assert digests[0]["world"] == digests[1]["world"] == 2
    assert digests[0]["trainable"] == digests[1]["trainable"]  # bitwise: the sha256 of every trainable tensor
    assert digests[0]["changed"]  # training moved them (not two copies of the untouched initial weights)


def test_processes_that_would_not_sync_are_refused(tmp_path):
    """torchrun on CPU without ACCELERATE_USE_CPU: two processes, each alone in its group; training must not start."""
    r = torchrun(["-m", "ftune.train", *BASE, "trainer.max_steps=2", f"output_dir={tmp_path / 'run'}"], False,
                 tmp_path)
    assert r.returncode != 0
    assert "2 processes were launched but accelerate sees 1" in r.stderr
    assert "ACCELERATE_USE_CPU=true" in r.stderr and "--nproc 2" in r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_process_kept_waiting_past_dist_timeout_says_why(tmp_path):
    """Rank 0 reads the training file first while rank 1 waits at the barrier after it; the file is a named pipe no
    one writes, so rank 0 never comes. trainer.dist_timeout=3 reaches the process group (torch's own timeout is 30
    minutes on gloo) and rank 1's gloo timeout is said with the setting and what to look at."""
    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)
    start = time.monotonic()
    r = ftune("train", "--nproc", "2", *BASE, "data=jsonl", f"data.path={fifo}", "trainer.dist_timeout=3",
              f"output_dir={tmp_path / 'run'}", cwd=tmp_path, timeout=180)
    assert r.returncode == 2 and time.monotonic() - start < 120
    assert "ftune.train FAILED" not in r.stderr  # the paragraph is the report: torchrun's is not printed
    assert ("ftune: distributed error: rank 1 of 2 waited 3 s (trainer.dist_timeout=3) for the other processes at a "
            "collective operation") in r.stderr, r.stderr[-3000:]
    assert "raise trainer.dist_timeout (seconds)" in r.stderr


def signalled_launch(tmp_path: Path, send) -> tuple[subprocess.CompletedProcess, Path]:
    """`ftune train --nproc 2` in a session of its own, `send(launcher_pid)` once the first step is logged; saves take
    4 s more (FTUNE_TEST_SAVE_PAUSE), so signals sent on while the ranks save would find them in it."""
    out = tmp_path / "run"
    env = {**os.environ, "FTUNE_TEST_SAVE_PAUSE": "4", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [ftune_exe(), "train", "--nproc", "2", *BASE, "data.size=400", "trainer.batch_size=2",
           "trainer.max_steps=100000", f"output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    send(proc.pid)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), out


def assert_stopped_with_a_checkpoint(r: subprocess.CompletedProcess, out: Path, signum: int) -> None:
    from ftune.training.checkpoint import list_checkpoints, verify

    assert r.returncode == 128 + signum, r.stderr[-3000:]
    ckpts = list_checkpoints(out / "checkpoints")
    assert len(ckpts) == 1 and verify(ckpts[0]) is None, ckpts
    step = int(ckpts[0].name.split("-")[1])
    assert r.stderr.count(f"ftune: stopped by signal {signum} after step {step}; checkpoint saved") == 1, r.stderr
    assert "Traceback" not in r.stderr and "FAILED" not in r.stderr, r.stderr[-3000:]


def test_ctrl_c_stops_every_rank_after_one_checkpoint(tmp_path):
    """SIGINT to the terminal's process group: each rank gets it from the terminal and again from the launcher, which
    forwards what it receives. The copy is the same request (before, it counted as a second one and the ranks died
    where they were), so every rank finishes the step and the checkpoint, and the launcher exits 130 quietly."""
    r, out = signalled_launch(tmp_path, lambda pid: os.killpg(pid, signal.SIGINT))
    assert_stopped_with_a_checkpoint(r, out, signal.SIGINT)


@pytest.mark.slow
def test_sigterm_to_the_launcher_alone_reaches_the_ranks(tmp_path):
    """A container runtime or scheduler signals the launcher only: it forwards the signal, the ranks save, and it waits
    for them (torchrun alone would kill them 30 s later) and exits 143."""
    r, out = signalled_launch(tmp_path, lambda pid: os.kill(pid, signal.SIGTERM))
    assert_stopped_with_a_checkpoint(r, out, signal.SIGTERM)


def test_a_config_error_on_the_ranks_is_said_once_without_torchruns_report(tmp_path):
    r = ftune("train", "--nproc", "2", *BASE, "data.size=4", "trainer.batch_size=4", f"output_dir={tmp_path / 'run'}",
              cwd=tmp_path, timeout=300)
    assert r.returncode == 2
    assert "ftune: config error: only 4 training examples" in r.stderr
    assert "Traceback" not in r.stderr and "FAILED" not in r.stderr and "closing signal" not in r.stderr, r.stderr


@pytest.mark.slow
def test_resume_under_two_processes_continues_the_same_trajectory(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ["--nproc", "2", *BASE, "trainer.batch_size=2", "trainer.save_every=2"]
    assert ftune("train", *args, "trainer.max_steps=6", f"output_dir={full}", cwd=tmp_path, timeout=300).returncode == 0
    assert ftune("train", *args, "trainer.max_steps=3", f"output_dir={cut}", cwd=tmp_path, timeout=300).returncode == 0
    r = ftune("train", *args, "trainer.max_steps=6", "trainer.resume=auto", f"output_dir={cut}", cwd=tmp_path,
              timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(losses(cut)[-4:]), torch.tensor(losses(full)[-4:]), rtol=0, atol=0)
    for k, v in adapter(full).items():
        assert torch.equal(adapter(cut)[k], v), k


def test_a_process_takes_its_group_down_at_the_end(tmp_path):
    """end_process_group (the last thing `ftune train` does): the group is destroyed, and a process without one is
    left alone."""
    code = ("import torch.distributed as d\n"
            "from ftune.training.distributed import end_process_group\n"
            "end_process_group()\n"  # no group yet: nothing to do
            f"d.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
            "assert d.is_initialized()\n"
            "end_process_group()\n"
            "assert not d.is_initialized()\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
