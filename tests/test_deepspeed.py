"""trainer.distributed=deepspeed_zero2 / deepspeed_zero3 run by DeepSpeed itself (accelerate's engine, switched on over
gloo on CPU by tests/_sharded_worker.py): 2 processes x batch 4 train to the trajectory of 1 process x batch 8, under
LoRA and full fine-tuning, for SFT and DPO; the final adapter or model is gathered from the shards; what a sharded
model cannot do is refused. The refusals on a CPU without the switch are in tests/test_fsdp.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import (  # noqa: E402
    EVALS,
    assert_continues,
    assert_evaluated_like,
    assert_gathered_only_the_adapter,
    assert_resumes_in_one_process,
    losses,
    make_cfg,
    run,
)

from ftune.training.checkpoint import verify  # noqa: E402

pytest.importorskip("deepspeed", reason="DeepSpeed is installed by `make setup`")

# No dropout and a constant lr, as in test_distributed.py and test_fsdp.py.
BASE = ["data.size=64", "data.packing=false", "peft.dropout=0", "trainer.lr=5e-3", "trainer.scheduler=constant",
        "trainer.warmup_ratio=0"]
FULL = [a for a in BASE if not a.startswith("peft.")] + ["peft=none", "trainer.lr=1e-3"]
WORKER = Path(__file__).parent / "_sharded_worker.py"


def deepspeed_run(out: Path, stage: int, *overrides: str, expect_ok: bool = True, launch_env: dict | None = None,
                  home: Path | None = None, nproc: int = 2) -> subprocess.CompletedProcess:
    """trainer.distributed=deepspeed_zero{stage}; or, with `launch_env`, trainer.distributed=ddp and the engine
    chosen by the environment `accelerate launch --config_file` gives its processes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    engine = f"deepspeed_zero{stage}" if launch_env is None else "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={port}", str(WORKER), "deepspeed", str(out),
           f"trainer.distributed={engine}", *overrides]
    env = {**os.environ, **(launch_env or {}), "ACCELERATE_USE_CPU": "true", "TOKENIZERS_PARALLELISM": "false",
           **({"FTUNE_HOME": str(home)} if home else {})}
    r = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)
    if expect_ok:
        assert r.returncode == 0, r.stderr[-4000:]
        for k in range(nproc):
            seen = json.loads((out / f"deepspeed_rank{k}.json").read_text())
            assert seen["world"] == nproc and seen["engine"] == "DeepSpeedEngine" and seen["stage"] == stage, seen
            assert seen["partitioned"] == (stage == 3), seen  # ZeRO-3 really holds a part of each weight per rank
            assert seen["optimizer"] in ("DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3"), seen
    return r


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in b:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)  # Adam magnifies summation-order noise


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    run(make_cfg(root / "lora", *BASE, "trainer.batch_size=8", "trainer.max_steps=4"))
    return root


@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_zero_lora_two_processes_equal_one_process_with_the_global_batch(one_process, tmp_path, stage):
    """DeepSpeed averages the ranks' gradients and steps inside its backward; ftune's loss is normalised by the global
    batch's label tokens, so 2 x 4 rows train like 8 rows in one process (equal up to float summation order)."""
    out = tmp_path / f"zero{stage}"
    deepspeed_run(out, stage, *BASE, "trainer.batch_size=4", "trainer.max_steps=4")
    l2, l1 = losses(out), losses(one_process / "lora")
    assert len(l2) == len(l1) == 4 and l2[-1] < l2[0]
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=0, atol=2e-5)
    assert json.loads((out / "final" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    w2, w1 = (load_file(r / "final" / "adapter_model.safetensors") for r in (out, one_process / "lora"))
    assert_same_weights(w2, w1)
    assert max(float(v.abs().max()) for k, v in w1.items() if "lora_B" in k) > 1e-3  # B starts at zero: it moved


def accelerate_launch_env(config_file: Path) -> dict:
    """The ACCELERATE_* variables `accelerate launch --config_file FILE` sets for its processes (accelerate's own
    parsing and `prepare_deepspeed_cmd_env`, as its `launch_command` calls them)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "--num_processes", "2",
                                               "-m", "ftune.train"])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_") and k != "ACCELERATE_USE_CPU"}


def grad_norms(out: Path) -> list[float]:
    return [json.loads(line)["grad_norm"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "grad_norm" in line]


@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_zero_gradient_accumulation_equals_one_process_with_the_global_batch(one_process, tmp_path, stage):
    """trainer.grad_accum under DeepSpeed: 2 processes x 2 micro-batches of 2 rows train like 1 process x 8 rows. The
    engine reduces and steps only at the last micro-batch (a step per micro-batch would double the steps), and the
    loss, already divided by the global batch's label tokens, is not divided again by DeepSpeed's accumulation count:
    the gradient norms DeepSpeed reports equal one process's (Adam alone would hide a halved gradient)."""
    out = tmp_path / f"zero{stage}"
    deepspeed_run(out, stage, *BASE, "trainer.batch_size=2", "trainer.grad_accum=2", "trainer.max_steps=4")
    one = one_process / "lora"
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(one)), rtol=0, atol=2e-5)
    g2, g1 = grad_norms(out), grad_norms(one)
    assert len(g2) == len(g1) == 4
    torch.testing.assert_close(torch.tensor(g2), torch.tensor(g1), rtol=1e-4, atol=0)


@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_the_accelerate_deepspeed_config_files_train_like_one_process(one_process, tmp_path, stage):
    """configs/accelerate/deepspeed_zero{2,3}.yaml: accelerate builds the plugin from the launcher's environment (its
    micro-batch left "auto", DeepSpeed clipping at 1.0 like trainer.max_grad_norm)."""
    env = accelerate_launch_env(Path(__file__).parents[1] / "configs" / "accelerate" / f"deepspeed_zero{stage}.yaml")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
    out = tmp_path / "launched"
    deepspeed_run(out, stage, *BASE, "trainer.batch_size=4", "trainer.max_steps=4", launch_env=env)
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(one_process / "lora")), rtol=0,
                               atol=2e-5)


def test_zero3_full_fine_tuning_equals_one_process_and_saves_the_full_model(tmp_path):
    """Every weight partitioned (built under zero.Init, the LM head too); final/ holds the gathered full weights."""
    deepspeed_run(tmp_path / "zero3", 3, *FULL, "trainer.batch_size=4", "trainer.max_steps=3")
    run(make_cfg(tmp_path / "one", *FULL, "trainer.batch_size=8", "trainer.max_steps=3"))
    l2, l1 = losses(tmp_path / "zero3"), losses(tmp_path / "one")
    assert len(l2) == 3 and l2[-1] < l2[0]
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=0, atol=2e-5)
    assert_same_weights(*(load_file(tmp_path / r / "final" / "model.safetensors") for r in ("zero3", "one")))


def deepspeed_resumed(tmp_path: Path, stage: int, *overrides: str) -> tuple[Path, Path]:
    """4 steps with a checkpoint at step 2, and a second run resumed from that checkpoint."""
    full, cut = tmp_path / "full", tmp_path / "resumed"
    deepspeed_run(full, stage, *overrides, "trainer.batch_size=6", "trainer.max_steps=4", "trainer.save_every=2")
    ckpt = full / "checkpoints" / "checkpoint-2"
    assert verify(ckpt) is None  # in ftune's manifest, written after every rank's files
    bf16 = "trainer.mixed_precision=bf16" in overrides
    assert json.loads((ckpt / "engine.json").read_text()) == {"engine": "deepspeed", "processes": 2,
                                                              "zero_stage": stage,
                                                              "mixed_precision": "bf16" if bf16 else "no"}
    # DeepSpeed's own checkpoint: each rank's partition of the optimizer state and of the float32 master weights
    # (named bf16_zero_pp_rank_... under DeepSpeed's bf16)
    prefix = "bf16_" if bf16 else ""
    assert {f"{prefix}zero_pp_rank_{k}_mp_rank_00_optim_states.pt" for k in (0, 1)} <= {
        p.name for p in (ckpt / "deepspeed" / "state").iterdir()}
    deepspeed_run(cut, stage, *overrides, "trainer.batch_size=6", "trainer.max_steps=4", f"trainer.resume={ckpt}")
    return full, cut


def assert_continues_exactly(full: Path, cut: Path, weights: str) -> None:
    l_full, l_cut = losses(full), losses(cut)
    assert len(l_cut) == 2
    torch.testing.assert_close(torch.tensor(l_cut), torch.tensor(l_full[2:]), rtol=0, atol=1e-6)
    a, b = (load_file(r / "final" / weights) for r in (cut, full))
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def assert_resumes_on_three_processes(three: Path, full: Path, stage: int, weights: str, atol: float,
                                      *overrides: str) -> None:
    """`full`'s 2-process checkpoint-2 resumed on 3 processes (the same global batch of 12 rows) through DeepSpeed's
    universal checkpoint, made in the run's directory and removed after the load, continues `full`'s losses (to 2e-5:
    summation order differs with 3 ranks) and ends with its weights."""
    deepspeed_run(three, stage, *overrides, "trainer.batch_size=4", "trainer.max_steps=4",
                  f"trainer.resume={full / 'checkpoints' / 'checkpoint-2'}", nproc=3)
    assert_continues(three, full, weights, weight_atol=atol)


def assert_resumes_in_another_stage(other: Path, full: Path, stage: int, *overrides: str) -> None:
    """`full`'s checkpoint-2 (ZeRO-2 or 3) resumed under the other ZeRO stage, on as many processes, through a
    universal checkpoint completed with that stage's layout: the same losses (to 1e-5: the stages sum in another
    order) and final adapter."""
    deepspeed_run(other, stage, *overrides, "trainer.batch_size=6", "trainer.max_steps=4",
                  f"trainer.resume={full / 'checkpoints' / 'checkpoint-2'}")
    assert_continues(other, full, loss_atol=1e-5)


@pytest.mark.slow  # the default suite resumes a one-process checkpoint under ZeRO-3 (test_a_one_process_...)
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_resume_continues_the_same_trajectory(tmp_path, stage):
    """trainer.save_every / trainer.resume under DeepSpeed: the engine's own save_checkpoint / load_checkpoint put
    back the Adam moments and master weights each rank holds (without them the 4th loss differs by ~0.1), ftune's
    scheduler (cosine with warmup) and step counter come from its own state file; onto another number of processes
    and (ZeRO-2) into ZeRO-3 through DeepSpeed's universal checkpoint, and (ZeRO-3) into one process. LoRA+ makes two
    parameter groups with different learning rates: ZeRO-3's universal load gave both the first group's lr and one
    shared Adam step (the 4th loss on 3 processes was off by 3e-2)."""
    schedule = ["trainer.scheduler=cosine", "trainer.warmup_ratio=0.25", "peft.loraplus_lr_ratio=16",
                "trainer.lr=5e-4"]
    full, cut = deepspeed_resumed(tmp_path, stage, *BASE, *schedule)
    assert_continues_exactly(full, cut, "adapter_model.safetensors")
    if stage == 3:
        for out in (full, cut):  # saves (checkpoint-2, final) and the resume's load
            assert_gathered_only_the_adapter(out)
    assert_resumes_on_three_processes(tmp_path / "three", full, stage, "adapter_model.safetensors", 1e-5,
                                      *BASE, *schedule)
    if stage == 2:
        assert_resumes_in_another_stage(tmp_path / "other", full, 3, *BASE, *schedule)
    else:  # DeepSpeed's partitions converted into torch's own optimizer state (in tests/test_engine_resume.py: all)
        assert_resumes_in_one_process(tmp_path / "one", full, 12, *BASE, *schedule)


def test_a_one_process_checkpoint_resumes_under_zero3(tmp_path):
    """torch's optimizer state (saved with its parameter names) written as a universal checkpoint that ZeRO-3 loads
    onto 2 processes: the losses continue to 1e-5, with LoRA+'s two groups."""
    overrides = [*BASE, "peft.loraplus_lr_ratio=16", "trainer.lr=5e-4", "trainer.max_steps=4"]
    one, two = tmp_path / "one", tmp_path / "zero3"
    run(make_cfg(one, *overrides, "trainer.batch_size=12", "trainer.save_every=2"))
    deepspeed_run(two, 3, *overrides, "trainer.batch_size=6", f"trainer.resume={one / 'checkpoints' / 'checkpoint-2'}")
    assert_continues(two, one, loss_atol=1e-5)


@pytest.mark.slow
def test_zero2_bf16_resume_restores_the_float32_master_weights(tmp_path):
    """Under bf16 the model holds bf16 copies; the float32 masters the optimizer steps come back from DeepSpeed's files,
    so the resumed run follows the uninterrupted one exactly."""
    full, cut = deepspeed_resumed(tmp_path, 2, *BASE, "trainer.mixed_precision=bf16")
    assert_continues_exactly(full, cut, "adapter_model.safetensors")


@pytest.mark.slow
def test_zero3_full_fine_tuning_resumes(tmp_path):
    """Also onto 3 processes through the universal checkpoint: every weight's float32 master and moments."""
    full, cut = deepspeed_resumed(tmp_path, 3, *FULL)
    assert_continues_exactly(full, cut, "model.safetensors")
    for g in json.loads((full / "deepspeed_rank0.json").read_text())["gathers"]:
        assert g["trainable_full"] == g["trainable"] > 0, g  # the whole model, saved as model.safetensors
    assert_resumes_on_three_processes(tmp_path / "three", full, 3, "model.safetensors", 1e-4, *FULL)


def write_prefs(path: Path, n: int = 16) -> Path:
    rows = [{"prompt": f"Question {i}: is {i} a nice number?", "chosen": "Yes, it is a fine number.",
             "rejected": "No idea, go away."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_zero3_dpo_with_lora_equals_one_process(tmp_path):
    """The reference is the partitioned model with its adapter switched off: every rank joins its forward."""
    dpo = ["objective=dpo", "data=jsonl", f"data.path={write_prefs(tmp_path / 'prefs.jsonl')}", "data.eval_size=4",
           "peft.dropout=0", "trainer.lr=1e-2", "trainer.scheduler=constant", "trainer.max_steps=3"]
    deepspeed_run(tmp_path / "zero3", 3, *dpo, "trainer.batch_size=2")
    run(make_cfg(tmp_path / "one", *dpo, "trainer.batch_size=4"))
    l2, l1 = losses(tmp_path / "zero3"), losses(tmp_path / "one")
    assert len(l2) == 3 and l2[-1] < l2[0]
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=0, atol=2e-5)


@pytest.mark.slow
def test_zero3_full_dpo_needs_its_reference_precomputed(tmp_path):
    """A frozen copy of a partitioned model is refused (DeepSpeed's placeholders would be copied empty), before the
    model is sharded; with objective.precompute_ref=true the same run trains."""
    dpo = ["objective=dpo", "data=jsonl", f"data.path={write_prefs(tmp_path / 'prefs.jsonl')}", "data.eval_size=4",
           "peft=none", "trainer.lr=1e-3", "trainer.scheduler=constant", "trainer.batch_size=2", "trainer.max_steps=2"]
    r = deepspeed_run(tmp_path / "copy", 3, *dpo, expect_ok=False)
    assert r.returncode != 0
    assert ("DPO without an adapter keeps a frozen copy of the initial model as its reference, and a model sharded "
            "by DeepSpeed ZeRO-3 cannot be copied" in r.stderr and "objective.precompute_ref=true" in r.stderr)
    assert not (tmp_path / "copy" / "metrics.jsonl").exists()
    deepspeed_run(tmp_path / "precomputed", 3, *dpo, "objective.precompute_ref=true")
    assert len(losses(tmp_path / "precomputed")) == 2


@pytest.mark.slow
def test_zero3_bf16_follows_the_float32_trajectory(one_process, tmp_path):
    """trainer.mixed_precision=bf16 goes to DeepSpeed's own bf16 mode (bf16 weights, float32 master copies in the ZeRO
    optimizer): the losses stay within bf16 rounding of the float32 run's."""
    out = tmp_path / "bf16"
    deepspeed_run(out, 3, *BASE, "trainer.batch_size=4", "trainer.max_steps=4", "trainer.mixed_precision=bf16")
    assert json.loads((out / "deepspeed_rank0.json").read_text())["dtypes"]["frozen"] == ["torch.bfloat16"]
    l2, l1 = losses(out), losses(one_process / "lora")
    assert l2 != l1  # really computed in bf16
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=0, atol=1e-3)


@pytest.mark.slow
def test_zero3_pso_samples_with_every_rank_in_each_forward(tmp_path):
    """PSO's offline samples are generated by every rank from the same prompts (greedy, same weights), so each
    generation step's forward, which gathers ZeRO-3's partitions, is joined by all ranks."""
    r = deepspeed_run(tmp_path / "pso", 3, "objective=pso", "objective.max_new_tokens=8", "data.size=16",
                      "data.packing=false", "peft.dropout=0", "trainer.batch_size=2", "trainer.max_steps=2",
                      home=tmp_path / "home")  # an empty sample cache
    assert "reusing" not in r.stderr and list((tmp_path / "home" / "pso_samples").glob("*.json"))
    assert len(losses(tmp_path / "pso")) == 2


@pytest.mark.slow
def test_zero3_s3ft_rewrites_the_data_like_one_process(tmp_path, monkeypatch):
    """Every rank prepares every S3FT chunk in step (3 chunks over 2 ranks would otherwise leave one rank waiting in a
    partitioned forward), rank 0 writes them; the rewritten data equals one process's."""
    s3ft = ["objective=s3ft", "data.size=12", "objective.max_new_tokens=4", "objective.save_every=4",
            "data.packing=false", "peft.dropout=0", "trainer.max_steps=2"]
    deepspeed_run(tmp_path / "s3ft", 3, *s3ft, "trainer.batch_size=2", home=tmp_path / "home2")
    monkeypatch.setenv("FTUNE_HOME", str(tmp_path / "home1"))
    run(make_cfg(tmp_path / "one", *s3ft, "trainer.batch_size=4"))
    chunks2, chunks1 = (sorted(p.read_text() for p in (tmp_path / h / "s3ft").rglob("chunk-*.json"))
                        for h in ("home2", "home1"))
    assert len(chunks1) == 3 and chunks2 == chunks1
    assert len(losses(tmp_path / "s3ft")) == 2


@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_evaluates_before_and_after_training(tmp_path, stage):
    """eval.at_start / at_end: ZeRO-2 keeps the whole model on every rank and rank 0 generates alone; ZeRO-3's
    partitioned model needs every rank in each forward, so every rank generates (the decoding loops kept in step by
    transformers' synced_gpus) and rank 0 records. The answers equal those of one process."""
    deepspeed_run(tmp_path / "eval", stage, *BASE, "trainer.batch_size=4", *EVALS)
    run(make_cfg(tmp_path / "one", *BASE, "trainer.batch_size=8", *EVALS))
    assert_evaluated_like(tmp_path / "eval", tmp_path / "one")
