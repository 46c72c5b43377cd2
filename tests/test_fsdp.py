"""trainer.distributed: the choice is checked before the model loads, FSDP2 / DeepSpeed are refused where accelerate
would not run them (a CPU), and accelerate's FSDP2 engine, switched on over gloo on CPU (tests/_sharded_worker.py),
trains 2 processes x batch 2 x accumulation 2 to the trajectory of 1 process x batch 8, saves a plain PEFT adapter and
resumes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from ftune.config import ConfigError
from ftune.preflight import validate_train
from ftune.training import distributed as dist
from ftune.training import engine_state

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import (  # noqa: E402
    EVALS,
    assert_evaluated_like,
    assert_gathered_only_the_adapter,
    assert_resumes_in_one_process,
    losses,
    make_cfg,
    run,
)

# No dropout and a constant lr, as in test_distributed.py.
BASE = ["data.size=64", "data.packing=false", "peft.dropout=0", "trainer.lr=5e-3", "trainer.scheduler=constant",
        "trainer.warmup_ratio=0"]
WORKER = Path(__file__).parent / "_sharded_worker.py"


def fsdp2_run(out: Path, *overrides: str, base: list[str] = BASE, home: Path | None = None, nproc: int = 2) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={port}", str(WORKER), "fsdp2", str(out), *base, *overrides]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "TOKENIZERS_PARALLELISM": "false",
           **({"FTUNE_HOME": str(home)} if home else {})}
    r = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]


def test_unknown_engine_is_refused_with_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="trainer.distributed='fsdp'.*ddp, fsdp2, deepspeed_zero2, deepspeed_zero3"):
        validate_train(make_cfg(tmp_path, "trainer.distributed=fsdp"))


def test_more_processes_than_gpus_are_refused_before_any_starts(tmp_path, monkeypatch, capsys):
    """With CUDA, every process needs a GPU of its own: `ftune train --nproc 4` on 2 GPUs is refused before torchrun
    starts, and a rank that torchrun or accelerate launched with too many neighbours before the model loads."""
    from ftune import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(cli, "_torchrun", lambda argv: pytest.fail("processes were started"))
    assert cli.launch(4, ["model=tiny_random"]) == 2
    err = capsys.readouterr().err
    assert "4 processes were launched on this machine and it has 2 CUDA GPU(s) visible" in err
    assert "(CUDA_VISIBLE_DEVICES=0,1)" in err
    assert "ftune train --nproc 2" in err
    cfg = make_cfg(tmp_path)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="3 processes were launched on this machine and it has 2 CUDA GPU"):
        dist.check_device(cfg)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    dist.check_device(cfg)  # one GPU each


@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed_zero2", "deepspeed_zero3"])
def test_sharded_engines_are_refused_on_cpu_before_the_model_loads(tmp_path, monkeypatch, engine):
    import ftune.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match=f"trainer.distributed={engine} needs CUDA GPUs.*trainer.distributed=ddp"):
        run(make_cfg(tmp_path / "run", f"trainer.distributed={engine}"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(("var", "name"), [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_an_accelerate_config_asking_for_sharding_is_refused_on_cpu(tmp_path, monkeypatch, var, name):
    """What `accelerate launch --config_file configs/accelerate/fsdp2.yaml` sets; on a CPU accelerate ignores it."""
    monkeypatch.setenv(var, "true")
    with pytest.raises(ConfigError, match=f"asks for {name} \\({var}=true\\).*ftune train --nproc N"):
        run(make_cfg(tmp_path / "run"))


def test_the_engines_are_accelerates_plugins(tmp_path):
    """What `Accelerator(...)` receives: nothing for DDP, accelerate's FSDP2 plugin, DeepSpeed's ZeRO config with
    ftune's clipping (none for trainer.max_grad_norm=0) and accumulation count (the plugins are built here without
    GPUs)."""
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    assert dist.plugins(make_cfg(tmp_path).trainer) == {}
    fsdp = dist.plugins(make_cfg(tmp_path, "trainer.distributed=fsdp2").trainer)["fsdp_plugin"]
    assert isinstance(fsdp, FullyShardedDataParallelPlugin) and fsdp.fsdp_version == 2 and fsdp.reshard_after_forward
    for stage in (2, 3):
        ds = dist.plugins(make_cfg(tmp_path, f"trainer.distributed=deepspeed_zero{stage}",
                                   "trainer.max_grad_norm=0.5").trainer)["deepspeed_plugin"]
        assert isinstance(ds, DeepSpeedPlugin) and ds.zero_stage == stage
        config = ds.deepspeed_config
        assert config["zero_optimization"]["stage"] == stage
        assert config["gradient_clipping"] == 0.5 and config["gradient_accumulation_steps"] == 1
        ds = dist.plugins(make_cfg(tmp_path, f"trainer.distributed=deepspeed_zero{stage}", "trainer.max_grad_norm=0",
                                   "trainer.grad_accum=3").trainer)["deepspeed_plugin"]
        ds.fill_match("gradient_clipping", must_match=False, gradient_clipping=1.0)  # as accelerate's prepare does
        assert ds.deepspeed_config.get("gradient_clipping", 0) == 0  # no clipping, as asked
        assert ds.deepspeed_config["gradient_accumulation_steps"] == 3


def test_combinations_the_running_engine_cannot_support(tmp_path):
    fsdp = SimpleNamespace(is_fsdp2=True, distributed_type=DistributedType.FSDP)
    dist.check_state(make_cfg(tmp_path, "eval=gsm8k", "eval.at_end=true"), fsdp)  # every rank evaluates
    with pytest.raises(ConfigError, match="trainer.liger=true applies the LM head outside"):
        dist.check_state(make_cfg(tmp_path, "trainer.liger=true"), fsdp)
    dist.check_state(make_cfg(tmp_path, "trainer.save_every=2", "trainer.grad_accum=2"), fsdp)  # FSDP2 allows these
    fsdp1 = SimpleNamespace(is_fsdp2=False, distributed_type=DistributedType.FSDP)
    with pytest.raises(ConfigError, match="FSDP version 1.*fsdp_version: 2"):
        dist.check_state(make_cfg(tmp_path), fsdp1)
    zero3 = SimpleNamespace(is_fsdp2=False, distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(
        deepspeed_plugin=SimpleNamespace(zero_stage=3, deepspeed_config={"gradient_clipping": 1.0})))
    dist.check_state(make_cfg(tmp_path, "eval=gsm8k", "eval.at_start=true"), zero3)  # every rank evaluates
    with pytest.raises(ConfigError, match="trainer.liger=true applies the LM head outside.*DeepSpeed ZeRO-3"):
        dist.check_state(make_cfg(tmp_path, "trainer.liger=true"), zero3)
    def ds(gas):  # gradient_accumulation_steps as ftune's plugin ("auto" when unset) or a launch config sets it
        config = {"gradient_clipping": 1.0, **({} if gas is None else {"gradient_accumulation_steps": gas})}
        return SimpleNamespace(is_fsdp2=False, distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(
            deepspeed_plugin=SimpleNamespace(zero_stage=2, deepspeed_config=config)))

    dist.check_state(make_cfg(tmp_path, "eval=gsm8k", "eval.at_end=true"), ds(1))  # ZeRO-2: each rank has the model
    with pytest.raises(ConfigError, match="DeepSpeed steps the optimizer inside its backward.*spike_factor=0"):
        dist.check_state(make_cfg(tmp_path, "trainer.spike_factor=3"), ds(1))
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=1 and this run has trainer.grad_accum=4.*"
                                          "--gradient_accumulation_steps 4"):
        dist.check_state(make_cfg(tmp_path, "trainer.grad_accum=4"), ds(1))
    for gas in (4, "auto", None):
        dist.check_state(make_cfg(tmp_path, "trainer.grad_accum=4"), ds(gas))
    dist.check_state(make_cfg(tmp_path, "trainer.max_grad_norm=1.0"), ds(1))  # as the launch config files set it
    with pytest.raises(ConfigError, match="gradient_clipping=1.0 and this run has trainer.max_grad_norm=0"):
        dist.check_state(make_cfg(tmp_path, "trainer.max_grad_norm=0"), ds(1))
    dist.check_state(make_cfg(tmp_path, "trainer.save_every=2", "trainer.resume=auto"), ds(1))  # its own checkpoints


def fake_acc(engine: str, processes: int = 2, stage: int | None = None) -> SimpleNamespace:
    """What check_resume / check_engine_limits / engine_record read of an Accelerator: ddp | fsdp2 | ds (DeepSpeed,
    ZeRO `stage`)."""
    kind = {"ddp": DistributedType.MULTI_CPU, "fsdp2": DistributedType.FSDP, "ds": DistributedType.DEEPSPEED}
    return SimpleNamespace(is_fsdp2=engine == "fsdp2", distributed_type=kind[engine], num_processes=processes,
                           mixed_precision="no",
                           state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))


def test_methods_an_engine_cannot_run_are_refused_with_the_engines_that_can():
    from ftune.peft.adalink import AdaLink
    from ftune.peft.hft import HFT
    from ftune.peft.lift import LIFT
    from ftune.peft.lora import LoRA
    from ftune.peft.prompt_tuning import PromptTuning

    acc = fake_acc
    engines = {"ddp": acc("ddp"), "fsdp2": acc("fsdp2"), "zero2": acc("ds", stage=2), "zero3": acc("ds", stage=3)}
    refused = {LIFT: {"fsdp2", "zero2", "zero3"}, PromptTuning: set(), HFT: set(), AdaLink: set(), LoRA: set()}
    for cls, bad in refused.items():
        for engine, a in engines.items():
            if engine in bad:
                with pytest.raises(ConfigError, match=rf"peft={cls.name} does not run under .*Use "
                                                      rf"trainer.distributed=ddp") as e:
                    dist.check_engine_limits(a, cls.__new__(cls), "peft")
                for other in set(engines) - bad - {"ddp"}:  # the engines that work are named
                    assert other in str(e.value), (cls, engine, other)
            else:
                dist.check_engine_limits(a, cls.__new__(cls), "peft")
        dist.check_engine_limits(acc("fsdp2", processes=1), cls.__new__(cls), "peft")  # one process: nothing is sharded
    from ftune.objectives.masked_thought import MaskedThought

    for noise, bad in (("mask", {"fsdp2", "zero3"}), ("random", set())):
        for engine, a in engines.items():
            if engine in bad:
                with pytest.raises(ConfigError, match=r"objective=masked_thought with objective.noise=mask does "
                                                      r"not run under .*deepspeed_zero2 with it, or objective.noise="):
                    dist.check_engine_limits(a, MaskedThought(noise=noise), "objective")
            else:
                dist.check_engine_limits(a, MaskedThought(noise=noise), "objective")


def test_how_a_checkpoint_resumes_under_each_engine(tmp_path):
    """An engine's own files load as they are (DDP's and FSDP2's with any number of processes); DeepSpeed's partitions
    into another number of processes or the other ZeRO stage go through a universal checkpoint; another engine's
    state is converted, except a DDP state from an ftune that did not save its parameter names; a checkpoint without
    engine.json is not checked."""
    acc = fake_acc
    def written_by(a, record: dict | None = None):
        d = tmp_path / f"ckpt-{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        (d / engine_state.ENGINE_FILE).write_text(json.dumps(record or dist.engine_record(a)))
        return d

    how, NATIVE, UNIVERSAL, CONVERT = (engine_state.check_resume, engine_state.NATIVE, engine_state.UNIVERSAL,
                                       engine_state.CONVERT)
    ds3 = written_by(acc("ds", 2, 3))
    assert how(acc("ds", 2, 3), ds3) == NATIVE  # DeepSpeed's own files load as they are
    assert how(acc("ds", 4, 3), ds3) == UNIVERSAL  # converted to a universal checkpoint first
    assert how(acc("ds", 2, 2), ds3) == UNIVERSAL  # another stage: also through one
    assert how(acc("ds", 3, 2), ds3) == UNIVERSAL
    assert how(acc("ddp", 1), ds3) == CONVERT
    assert how(acc("fsdp2"), ds3) == CONVERT
    fsdp, ddp = written_by(acc("fsdp2", 4)), written_by(acc("ddp", 1))
    assert json.loads((ddp / engine_state.ENGINE_FILE).read_text())["param_names"] is True
    assert how(acc("fsdp2", 2), fsdp) == NATIVE
    assert how(acc("ddp", 3), ddp) == NATIVE
    assert how(acc("ds", 4, 2), fsdp) == CONVERT
    assert how(acc("ddp", 4), fsdp) == CONVERT
    assert how(acc("fsdp2", 1), ddp) == CONVERT
    assert how(acc("ds", 2, 3), ddp) == CONVERT
    earlier = written_by(None, {"engine": "ddp", "processes": 1, "zero_stage": None})
    assert how(acc("ddp", 2), earlier) == NATIVE
    with pytest.raises(ConfigError, match=r"written under DDP \(or one process\) by an earlier ftune.*this run uses "
                                          r"FSDP2.*trainer.distributed=ddp"):
        how(acc("fsdp2", 2), earlier)
    old = tmp_path / "no-record"
    old.mkdir()
    assert how(acc("ds", 2, 2), old) == NATIVE


@pytest.fixture(scope="module")
def fsdp2_and_one(tmp_path_factory):
    """2 processes x batch 2 x 2 micro-batches under FSDP2 (the first without gradient sync; checkpoint at step 2) and
    1 process x batch 8, 4 steps each."""
    root = tmp_path_factory.mktemp("fsdp")
    fsdp2_run(root / "fsdp2", "trainer.batch_size=2", "trainer.grad_accum=2", "trainer.max_steps=4",
              "trainer.save_every=2")
    run(make_cfg(root / "one", *BASE, "trainer.batch_size=8", "trainer.max_steps=4"))
    return root / "fsdp2", root / "one"


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_process_with_the_global_batch(fsdp2_and_one):
    two, one = fsdp2_and_one
    ranks = [json.loads((two / f"fsdp_rank{k}.json").read_text()) for k in (0, 1)]
    for r in ranks:  # really sharded: each rank holds half of every trainable tensor
        assert r["world"] == 2 and r["fsdp2"] and r["sharded"] and 2 * r["local_numel"] == r["full_numel"]
    l2, l1 = losses(two), losses(one)
    assert len(l2) == len(l1) == 4 and l2[-1] < l2[0]
    # Same rows per step (BatchOrder splits the global batch by rank and micro-batch), the loss normalised by the
    # global batch's label tokens, FSDP2 accumulating unsynced gradients (accelerate's no_sync) and its reduce-scatter
    # averaging over ranks: equal up to float summation order.
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=0, atol=2e-5)
    # final/ is a plain PEFT adapter, gathered to full tensors: same keys and shapes as one process writes.
    assert json.loads((two / "final" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    w2, w1 = (load_file(run / "final" / "adapter_model.safetensors") for run in (two, one))
    assert w2.keys() == w1.keys()
    for k in w1:
        assert w2[k].shape == w1[k].shape, k
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-4)  # Adam magnifies summation-order noise
    assert max(float(v.abs().max()) for k, v in w1.items() if "lora_B" in k) > 1e-3  # B starts at zero: it moved


@pytest.mark.slow
def test_fsdp2_bf16_follows_the_float32_trajectory(fsdp2_and_one, tmp_path):
    """trainer.mixed_precision=bf16 gives FSDP2 accelerate's MixedPrecisionPolicy (the weights gathered in bf16 for
    compute, float32 shards stepped by the optimizer): the losses stay within bf16 rounding of the float32 run's."""
    _, one = fsdp2_and_one
    out = tmp_path / "bf16"
    fsdp2_run(out, "trainer.batch_size=4", "trainer.max_steps=4", "trainer.mixed_precision=bf16")
    assert json.loads((out / "fsdp_rank0.json").read_text())["param_dtype"] == "torch.bfloat16"
    l2, l1 = losses(out), losses(one)
    assert l2 != l1  # really computed in bf16
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=0, atol=1e-3)


@pytest.mark.slow
def test_fsdp2_resume_continues_the_same_trajectory(fsdp2_and_one, tmp_path):
    full, _ = fsdp2_and_one
    cut = tmp_path / "resumed"
    fsdp2_run(cut, "trainer.batch_size=2", "trainer.grad_accum=2", "trainer.max_steps=4",
              f"trainer.resume={full / 'checkpoints' / 'checkpoint-2'}")
    # The full optimizer state (keyed by name) and the gathered adapter go back into the shards.
    torch.testing.assert_close(torch.tensor(losses(cut)), torch.tensor(losses(full)[2:]), rtol=0, atol=1e-6)
    a, b = (load_file(run / "final" / "adapter_model.safetensors") for run in (cut, full))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_fsdp2_resumes_a_checkpoint_holding_the_full_optimizer_state(fsdp2_and_one, tmp_path):
    """Checkpoints of earlier ftune versions held the FSDP2 optimizer state gathered in full (keyed by parameter name)
    in training_state.pt, with no `optimizer/` shards: they still resume (set_optimizer_state_dict scatters it)."""
    import shutil

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from ftune.training.checkpoint import finalize

    full, _ = fsdp2_and_one
    tmp = tmp_path / "old" / ".tmp-checkpoint-2"
    shutil.copytree(full / "checkpoints" / "checkpoint-2", tmp)
    dcp_to_torch_save(tmp / "optimizer", tmp_path / "gathered.pt")
    state = torch.load(tmp / "training_state.pt", weights_only=False)
    state["optimizer"] = torch.load(tmp_path / "gathered.pt", weights_only=False)["optimizer"]
    assert any(k.endswith("lora_A.default.weight") for k in state["optimizer"]["state"])  # keyed by name, in full
    torch.save(state, tmp / "training_state.pt")
    shutil.rmtree(tmp / "optimizer")
    (tmp / "manifest.json").unlink()
    old = finalize(tmp, tmp_path / "old" / "checkpoint-2")
    cut = tmp_path / "resumed"
    fsdp2_run(cut, "trainer.batch_size=2", "trainer.grad_accum=2", "trainer.max_steps=4", f"trainer.resume={old}")
    torch.testing.assert_close(torch.tensor(losses(cut)), torch.tensor(losses(full)[2:]), rtol=0, atol=1e-6)


def test_fsdp2_checkpoint_resumes_resharded_onto_three_processes(tmp_path):
    """Each rank writes its own shards of the optimizer state (torch.distributed.checkpoint; nothing is gathered), and
    a run on 3 processes resumes from 2 processes' checkpoint: dcp.load reshards it; so does one process without
    FSDP2. 2 x 6 and 3 x 4 rows are the same
    12 rows per step, so the resumed losses continue the uninterrupted run's (to 2e-5; without the optimizer state
    the last differs by ~4e-3)."""
    full, cut = tmp_path / "two", tmp_path / "three"
    fsdp2_run(full, "trainer.batch_size=6", "trainer.max_steps=4", "trainer.save_every=2", "data.size=96")
    ckpt = full / "checkpoints" / "checkpoint-2"
    shards = ckpt / "optimizer"
    assert sorted(p.name for p in shards.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert torch.load(ckpt / "training_state.pt", weights_only=False)["optimizer"] == {}  # nothing gathered
    fsdp2_run(cut, "trainer.batch_size=4", "trainer.max_steps=4", "data.size=96", f"trainer.resume={ckpt}", nproc=3)
    torch.testing.assert_close(torch.tensor(losses(cut)), torch.tensor(losses(full)[2:]), rtol=0, atol=2e-5)
    for out in (full, cut):  # saves (checkpoint-2, final) and the resume's load: the frozen base stays sharded
        assert_gathered_only_the_adapter(out, "fsdp")
    a, b = (load_file(r / "final" / "adapter_model.safetensors") for r in (cut, full))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
    # and in one process: the shards gathered by name (dcp_to_torch_save) into torch's own optimizer state
    assert_resumes_in_one_process(tmp_path / "one", full, 12, *BASE, "data.size=96")


@pytest.mark.slow
def test_fsdp2_full_fine_tuning_equals_one_process(tmp_path):
    """Every weight trained and sharded (the LM head too, so it must be applied inside the sharded forward); final/ is
    a plain HF model directory with the full weights."""
    base = [a for a in BASE if not a.startswith("peft.")] + ["peft=none", "trainer.lr=1e-3", "trainer.max_steps=3"]
    fsdp2_run(tmp_path / "fsdp2", "trainer.batch_size=4", base=base)
    run(make_cfg(tmp_path / "one", *base, "trainer.batch_size=8"))
    l2, l1 = losses(tmp_path / "fsdp2"), losses(tmp_path / "one")
    assert len(l2) == 3 and l2[-1] < l2[0]
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=0, atol=2e-5)
    w2, w1 = (load_file(tmp_path / r / "final" / "model.safetensors") for r in ("fsdp2", "one"))
    assert w2.keys() == w1.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-4)


def test_a_frozen_reference_copy_of_a_sharded_model_is_refused():
    """Full fine-tuning with a reference keeps a deep copy of the initial model, which FSDP2 refuses and which would
    copy ZeRO-3's empty placeholders; the ways around it pass."""
    from ftune.objectives.constrained_sft import ConstrainedSFT
    from ftune.objectives.dpo import DPO

    fsdp = SimpleNamespace(is_fsdp2=True, distributed_type=DistributedType.FSDP)
    zero3 = SimpleNamespace(is_fsdp2=False, distributed_type=DistributedType.DEEPSPEED,
                            state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    zero2 = SimpleNamespace(is_fsdp2=False, distributed_type=DistributedType.DEEPSPEED,
                            state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2)))
    ddp = SimpleNamespace(is_fsdp2=False, distributed_type=DistributedType.MULTI_CPU)
    full, adapted = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    adapted.disable_adapter = lambda: None  # what a peft model has: the reference is the model, adapter off
    for acc, name in ((fsdp, "FSDP2"), (zero3, "DeepSpeed ZeRO-3")):
        for objective in (DPO(), ConstrainedSFT()):
            with pytest.raises(ConfigError, match=f"{type(objective).__name__} without an adapter keeps a frozen "
                                                  f"copy.*sharded by {name}.*precompute_ref=true"):
                dist.check_reference(acc, objective, full)
            dist.check_reference(acc, objective, adapted)
        dist.check_reference(acc, DPO(precompute_ref=True), full)
        dist.check_reference(acc, DPO(loss="simpo"), full)  # reference-free
    for acc in (zero2, ddp):
        dist.check_reference(acc, DPO(), full)


def test_fsdp2_dpo_with_lora_equals_one_process(tmp_path):
    """DPO's reference is the sharded model with its adapter switched off; chosen and rejected sequences share rows.
    Step 2 evaluates the held-out loss and then saves a checkpoint: the eval's forward leaves the root module gathered,
    and the save (rank 0 alone writes) must not leave the ranks in different states (the next forward would all-gather
    on one rank only: a hang). eval=preference scores the held-out pairs before and after, like one process."""
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"Question {i}: is {i} a nice number?",
                                         "chosen": "Yes, it is a fine number.", "rejected": "No idea, go away."})
                             + "\n" for i in range(16)))
    dpo = ["objective=dpo", "data=jsonl", f"data.path={prefs}", "data.eval_size=4", "peft.dropout=0",
           "trainer.lr=1e-2", "trainer.scheduler=constant", "trainer.max_steps=4", "trainer.eval_every=2",
           "trainer.save_every=2", "eval=preference", "eval.at_start=true", "eval.at_end=true", "eval.batch_size=3"]
    fsdp2_run(tmp_path / "fsdp2", "trainer.batch_size=2", base=dpo)
    run(make_cfg(tmp_path / "one", *dpo, "trainer.batch_size=4"))
    l2, l1 = losses(tmp_path / "fsdp2"), losses(tmp_path / "one")
    assert len(l2) == 4 and l2[-1] < l2[0]
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=0, atol=2e-5)
    assert (tmp_path / "fsdp2" / "checkpoints" / "checkpoint-2").is_dir()
    for tag in ("start", "end"):
        two, one = ([json.loads(x) for x in (tmp_path / r / f"eval_{tag}" / "predictions.jsonl").open()]
                    for r in ("fsdp2", "one"))
        assert len(two) == len(one) == 4
        for a, b in zip(two, one):
            assert a == pytest.approx(b, abs=1e-4), tag


def test_fsdp2_evaluates_before_and_after_training(tmp_path):
    """transformers' generate calls the inner model, never FSDP2's root module: ftune initialises the root and gathers
    its own weights (embeddings, final norm) around generation, every rank generates in step (synced_gpus; each
    decoder layer gathers its weights in its forward) and rank 0 records. Before training (the root not yet
    initialised by a forward) and after it (the root's weights resharded by the backward), the answers equal one
    process's. The training steps accumulate 2 micro-batches: FSDP2 reduce-scatters the gradients only in the last
    one's backward (the first accumulates them unsharded, accelerate's no_sync)."""
    fsdp2_run(tmp_path / "eval", "trainer.batch_size=2", "trainer.grad_accum=2", *EVALS)
    run(make_cfg(tmp_path / "one", *BASE, "trainer.batch_size=8", *EVALS))
    assert_evaluated_like(tmp_path / "eval", tmp_path / "one")
    assert losses(tmp_path / "eval") == pytest.approx(losses(tmp_path / "one"), abs=2e-5)
    for k in (0, 1):
        backwards = json.loads((tmp_path / "eval" / f"fsdp_rank{k}.json").read_text())["backwards"]
        assert [b["last"] for b in backwards] == [False, True] * 2
        assert [b["reduces"] > 0 for b in backwards] == [False, True] * 2, backwards


@pytest.mark.slow
def test_fsdp2_pso_samples_equal_one_process(tmp_path, monkeypatch):
    """PSO's offline samples, generated by every rank with the sharded model, are those one process generates."""
    pso = ["objective=pso", "objective.max_new_tokens=8", "data.size=16", "data.packing=false", "peft.dropout=0",
           "trainer.max_steps=2"]
    fsdp2_run(tmp_path / "pso", "trainer.batch_size=2", base=pso, home=tmp_path / "home2")
    monkeypatch.setenv("FTUNE_HOME", str(tmp_path / "home1"))
    run(make_cfg(tmp_path / "one", *pso, "trainer.batch_size=4"))
    two, one = (sorted((tmp_path / h / "pso_samples").glob("*.json")) for h in ("home2", "home1"))
    assert len(two) == len(one) == 1 and two[0].name == one[0].name
    assert json.loads(two[0].read_text()) == json.loads(one[0].read_text())
    assert len(losses(tmp_path / "pso")) == 2


@pytest.mark.slow
def test_fsdp2_s3ft_rewrites_the_data_like_one_process(tmp_path, monkeypatch):
    """S3FT's answers and paraphrases under FSDP2: every rank prepares every chunk in step (a rank making fewer
    generate calls would leave the others waiting in a layer's all-gather), rank 0 writes them."""
    s3ft = ["objective=s3ft", "data.size=12", "objective.max_new_tokens=4", "objective.save_every=4",
            "data.packing=false", "peft.dropout=0", "trainer.max_steps=2"]
    fsdp2_run(tmp_path / "s3ft", "trainer.batch_size=2", base=s3ft, home=tmp_path / "home2")
    monkeypatch.setenv("FTUNE_HOME", str(tmp_path / "home1"))
    run(make_cfg(tmp_path / "one", *s3ft, "trainer.batch_size=4"))
    comp2, comp1 = ({k: v for k, v in json.loads((tmp_path / r / "s3ft_composition.json").read_text()).items()
                     if k != "cache"} for r in ("s3ft", "one"))
    assert comp2 == comp1 and comp1["examples"] > 0 and comp1["paraphrases_tried"] > 0
    chunks2, chunks1 = (sorted(p.read_text() for p in (tmp_path / h / "s3ft").rglob("chunk-*.json"))
                        for h in ("home2", "home1"))
    assert len(chunks1) == 3 and chunks2 == chunks1
