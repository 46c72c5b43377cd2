"""The distributed engine of a run (`trainer.distributed`): accelerate's own DDP, FSDP2 or DeepSpeed ZeRO.

ftune shards nothing itself. It picks accelerate's plugin (FullyShardedDataParallelPlugin(fsdp_version=2) or
DeepSpeedPlugin(zero_stage=...)), refuses combinations that cannot work before the model loads, and moves state
between sharded parameters and the plain files a checkpoint holds:

- the model: the weights the PEFT method saves (an adapter method's trainable ones; the whole model for full
  fine-tuning, HFT, LIFT) are gathered onto rank 0 and put in place of the sharded parameters while it saves, so
  `final/` is the same HF / PEFT directory a single process writes;
- the optimizer: never gathered. Under FSDP2, each rank writes its shards of the state (torch.distributed.checkpoint,
  keyed by parameter name, resharded on load for any number of processes); under DeepSpeed, the engine's own
  checkpoint (`deepspeed/`: each rank's partition of the optimizer state and float32 master weights, written by
  `DeepSpeedEngine.save_checkpoint`). Saving, loading and converting it between engines: engine_state.py.

accelerate (1.15) switches to FSDP or DeepSpeed only on an accelerator (CUDA, XPU, NPU, ...): on a CPU it keeps
plain data parallelism and ignores the plugin, so ftune refuses those engines there instead of silently running DDP.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from ftune.config import ConfigError, TrainerConfig
from ftune.training import network, precision

log = logging.getLogger(__name__)


def accelerator_available() -> bool:
    """Whether accelerate would run FSDP / DeepSpeed here (it does not on a CPU; see the module docstring)."""
    return torch.cuda.is_available() and not cpu_forced()


def cpu_forced() -> bool:
    """ACCELERATE_USE_CPU=true: accelerate keeps every process on the CPU, GPUs or not."""
    return os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true")


def gpu_shortage(processes: int) -> str | None:
    """Why `processes` processes on this machine cannot each have a CUDA GPU of their own, or None."""
    if cpu_forced() or not torch.cuda.is_available() or processes <= (n := torch.cuda.device_count()):
        return None
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"{processes} processes were launched on this machine and it has {n} CUDA GPU(s)"
            f"{f' visible (CUDA_VISIBLE_DEVICES={shown})' if shown is not None else ''}; each process trains on a GPU "
            f"of its own. Launch at most {n} (`ftune train --nproc {n}`, `torchrun --nproc_per_node={n}`), or make "
            f"more GPUs visible.")


def check_device(cfg) -> None:
    """Refuse an engine or a GPU-only option that cannot run here, before the model loads."""
    t, engine = cfg.trainer, cfg.trainer.distributed
    if short := gpu_shortage(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))):
        raise ConfigError(short)
    if t.liger:  # (an objective that does not declare `fuses_lm_loss` is refused by the preflight)
        missing = [w for w, ok in (("CUDA", accelerator_available()),
                                   ("the liger-kernel package", importlib.util.find_spec("liger_kernel") is not None))
                   if not ok]
        if missing:
            raise ConfigError(f"trainer.liger=true runs Liger's Triton kernel, which needs {' and '.join(missing)} "
                              f"(missing here). Install liger-kernel on a CUDA machine, or set trainer.liger=false.")
    if t.activation_offload and not accelerator_available():
        raise ConfigError("trainer.activation_offload=true moves saved activations from GPU to CPU memory; without "
                          "CUDA they already are in CPU memory, so it would only add copies. Set "
                          "trainer.activation_offload=false.")
    launched = [name for var, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"))
                if os.environ.get(var, "false").lower() in ("1", "true")]
    if launched and not accelerator_available():  # `accelerate launch --config_file fsdp2.yaml` on a CPU
        raise ConfigError(f"the accelerate launch config asks for {launched[0]} (ACCELERATE_USE_"
                          f"{'FSDP' if launched[0] == 'FSDP' else 'DEEPSPEED'}=true), which accelerate runs only on "
                          f"CUDA GPUs. On CPUs use `ftune train --nproc N` (DDP over gloo), or "
                          f"`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N -m ftune.train`.")
    if engine == "ddp":
        return
    if not accelerator_available():
        raise ConfigError(f"trainer.distributed={engine} needs CUDA GPUs: accelerate enables "
                          f"{'FSDP' if engine == 'fsdp2' else 'DeepSpeed'} only on an accelerator and would silently "
                          f"run plain data parallelism on a CPU (or with ACCELERATE_USE_CPU=true). Use "
                          f"trainer.distributed=ddp here.")
    if engine.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"trainer.distributed={engine} needs the deepspeed package, which is not installed. "
                          f"Install it (`pip install deepspeed`), or use trainer.distributed=fsdp2 or ddp.")


def check_state(cfg, acc) -> None:
    """Combinations the engine accelerate actually runs (from ftune's config or `accelerate launch --config_file`)
    cannot support; still before the model loads."""
    t = cfg.trainer
    if acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2:  # an accelerate config without fsdp_version
        raise ConfigError("accelerate runs FSDP version 1 here (the accelerate config has no `fsdp_version: 2`); ftune "
                          "saves and resumes FSDP2 only. Set `fsdp_version: 2` in its fsdp_config (see "
                          "configs/accelerate/fsdp2.yaml), or use trainer.distributed=fsdp2.")
    sharded = sharding_engine(acc)
    if sharded and t.liger:
        raise ConfigError(f"trainer.liger=true applies the LM head outside the model's forward, where {sharded} has "
                          f"not gathered its weight (nor will reduce its gradient). Use trainer.liger=false with "
                          f"{sharded}.")
    if acc.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed's engine steps inside `backward` (at the last micro-batch), so ftune cannot skip a bad step there.
        if t.spike_factor:
            raise ConfigError(f"DeepSpeed steps the optimizer inside its backward, so ftune cannot skip a spiking "
                              f"step: set trainer.spike_factor=0 (got {t.spike_factor}), or use "
                              f"trainer.distributed=fsdp2.")
        gas = acc.state.deepspeed_plugin.deepspeed_config.get("gradient_accumulation_steps", "auto")
        clip = acc.state.deepspeed_plugin.deepspeed_config.get("gradient_clipping", 0.0)
        if clip != "auto" and float(clip) != max(t.max_grad_norm, 0):  # set by an accelerate config file
            raise ConfigError(f"the accelerate config gives DeepSpeed gradient_clipping={clip} and this run has "
                              f"trainer.max_grad_norm={t.max_grad_norm}; DeepSpeed clips inside its step, with its "
                              f"own value. Set the two equal (gradient_clipping in the config file, 0 for none).")
        if gas != "auto" and int(gas) != t.grad_accum:  # set by `accelerate launch --config_file` / its flag
            raise ConfigError(f"the accelerate config gives DeepSpeed gradient_accumulation_steps={gas} and this run "
                              f"has trainer.grad_accum={t.grad_accum}. ftune accumulates trainer.grad_accum "
                              f"micro-batches per step: set the two equal (gradient_accumulation_steps in the config "
                              f"file, or `accelerate launch --gradient_accumulation_steps {t.grad_accum}`).")


def check_engine_limits(acc, method, key: str) -> None:
    """A PEFT method or objective (`key`) that cannot run under the engine (its `not_under`: engine -> why; found by
    training every method under every engine) is refused before the model loads, naming the engines that work and
    the method's `instead`."""
    record = engine_record(acc)
    engine = f"zero{record['zero_stage']}" if record["engine"] == "deepspeed" else record["engine"]
    limits = getattr(method, "not_under", None) or {}
    why = limits.get(engine)
    if acc.num_processes > 1 and why:
        names = {"fsdp2": "FSDP2", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3"}
        works = ["trainer.distributed=ddp"] + [f"trainer.distributed={'deepspeed_' if e != 'fsdp2' else ''}{e}"
                                               for e in names if e not in limits]
        raise ConfigError(f"{key}={method.name} does not run under {names[engine]}: it {why}. Use "
                          f"{' or '.join(works)} with it, or {method.instead} under {names[engine]}.")


def engine_record(acc) -> dict:
    ds = acc.distributed_type == DistributedType.DEEPSPEED
    engine = "deepspeed" if ds else "fsdp2" if acc.is_fsdp2 else "ddp"
    return {"engine": engine, "processes": acc.num_processes,
            "zero_stage": acc.state.deepspeed_plugin.zero_stage if ds else None,
            "mixed_precision": acc.mixed_precision,  # what trainer.mixed_precision=auto chose, kept on resume
            # torch's optimizer state is keyed by position; the names saved beside it let another engine place it
            **({"param_names": True} if engine == "ddp" else {})}


def plugins(t) -> dict:
    """Keyword arguments for `Accelerator(...)` that select the engine (none for DDP)."""
    if t.distributed == "fsdp2":
        from accelerate.utils import FullyShardedDataParallelPlugin

        # One FSDP unit per decoder layer (the model's `_no_split_modules`), resharded after forward (ZeRO-3 like).
        return {"fsdp_plugin": FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
            state_dict_type="FULL_STATE_DICT", activation_checkpointing=False)}
    if t.distributed.startswith("deepspeed"):
        from accelerate.utils import DeepSpeedPlugin

        return {"deepspeed_plugin": DeepSpeedPlugin(
            zero_stage=int(t.distributed[-1]), gradient_accumulation_steps=t.grad_accum,
            # 0 (not None, which accelerate turns into "auto" and then fills with 1.0): DeepSpeed does not clip
            gradient_clipping=float(max(t.max_grad_norm, 0)))}
    return {}


def _accelerator(cfg, mp: str):
    """Accelerator(...), which joins the process group: a group that cannot connect is said with the fix."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # torch waits 10 minutes (NCCL) or 30 (gloo) at a collective; rank 0 alone downloading or converting a large model
    # and tokenizing a large dataset, while the others wait at the barrier after it, can take longer.
    seconds = getattr(cfg.trainer, "dist_timeout", TrainerConfig.dist_timeout)  # (a plain namespace may lack it)
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=seconds))
    try:
        return Accelerator(mixed_precision=mp, kwargs_handlers=[timeout], **plugins(cfg.trainer))
    except RuntimeError as e:
        said = network.connect_failure_said(e)
        if said is None:
            raise
        raise ConfigError(said) from e


def make_accelerator(cfg):
    """The Accelerator for `trainer.distributed`, after the checks. With trainer.distributed=ddp and an engine chosen
    by `accelerate launch --config_file ...` (ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED), accelerate builds
    that engine from its environment; ftune then follows `acc.distributed_type`, never the config value."""
    network.check_main_address()
    network.choose_gloo_interface()
    requested, planned = cfg.trainer.mixed_precision, planned_device()
    mp, why = precision.resolve(requested, planned)
    acc = _accelerator(cfg, mp)
    if requested == "auto":
        if acc.device.type != planned:  # accelerate placed the run elsewhere than torch's own accelerator
            mp, why = precision.resolve(requested, acc.device.type)
        if acc.num_processes > 1:  # every process measured for itself; all take rank 0's choice
            from accelerate.utils import broadcast_object_list

            mp, why = broadcast_object_list([mp, why], from_process=0)
        acc = with_precision(acc, cfg, mp)
    log.info(why)
    check_state(cfg, acc)
    return acc


def with_precision(acc, cfg, mp: str):
    """`acc` itself, or, where its mixed precision is not `mp`, a new Accelerator with `mp` (accelerate keeps one
    state per process: it is reset first; the process group stays)."""
    if mp == acc.mixed_precision:
        return acc
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    return _accelerator(cfg, mp)


def end_process_group() -> None:
    """Take the process group (torchrun, accelerate launch) down before the interpreter exits, where gloo's threads
    may otherwise abort the exit ("terminate called without an active exception") and NCCL warns. Only at the end of
    a process: a second run in the same process (a sweep, the tests) keeps using the group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def planned_device() -> str:
    """The device type accelerate will train on: torch's current accelerator (cuda, mps, xpu, ...) unless
    ACCELERATE_USE_CPU keeps every process on the CPU."""
    if cpu_forced() or not torch.accelerator.is_available():
        return "cpu"
    return torch.accelerator.current_accelerator().type


def shared_output_dir(acc, out: Path, checks: Callable[[Path], None], wait_s: float = 10.0) -> Path:
    """The one run directory of a multi-process run, checked, before any long work starts.

    Each launcher's Hydra resolves the default `outputs/<date>/<time>` itself, so ranks started by torchrun, `accelerate
    launch` or on other machines disagree by microseconds (and a relative path by the launch directory): every rank
    takes rank 0's absolute path, and removes the empty directory its own Hydra made for its own choice (and the date
    folder above it, if that is left empty). Rank 0 runs `checks` (a fresh or resumable, writable directory) and writes
    a probe file there; every rank must see it, since all of them write their RNG state into each checkpoint and read
    checkpoints back on resume. A directory on one machine's local disk is refused, on every rank with the same message,
    naming the ranks that cannot see it.
    """
    if acc.num_processes == 1:
        checks(out)
        return out
    from accelerate.utils import broadcast_object_list, gather_object

    mine = out.absolute()
    problem, probe = None, None
    if acc.is_main_process:
        try:
            checks(mine)
            probe = f".ftune-probe-{secrets.token_hex(8)}"
            (mine / probe).write_text("rank 0 was here")
        except (ConfigError, OSError) as e:
            problem = str(e)
    chosen, problem, probe = broadcast_object_list([str(mine), problem, probe], from_process=0)
    chosen = Path(chosen)
    if chosen != mine:
        with contextlib.suppress(OSError):  # an empty directory only: never one that holds anything
            mine.rmdir()
            if re.fullmatch(r"\d{4}-\d{2}-\d{2}", mine.parent.name):  # the default's date folder, if now empty
                mine.parent.rmdir()
    if problem:
        raise ConfigError(problem)
    deadline = time.monotonic() + wait_s  # network file systems may show a new file to other clients a little late
    while not (seen := (chosen / probe).is_file()) and time.monotonic() < deadline:
        time.sleep(0.5)
    views = gather_object([(acc.process_index, socket.gethostname(), seen)])  # collective: every rank has looked
    if acc.is_main_process:
        with contextlib.suppress(OSError):
            (chosen / probe).unlink()
    blind = [f"rank {rank} on {host}" for rank, host, ok in views if not ok]
    if blind:
        raise ConfigError(f"output_dir={chosen} is not shared: {', '.join(blind)} cannot see the file rank 0 wrote "
                          f"there. Every process writes into each checkpoint and reads it back on resume, so the "
                          f"run directory must be on storage every machine mounts at the same path (NFS, Lustre, a "
                          f"cloud file system). Pass output_dir=/shared/path/NAME on every machine.")
    return chosen


def clipped_parameters(acc, model: torch.nn.Module, optimizer) -> list[torch.nn.Parameter]:
    """What the optimizer holds, for gradient clipping. Under FSDP, accelerate's `clip_grad_norm_` compares this list
    with the model's parameters by `==`, which only works (instead of raising on a tensor comparison) when the lengths
    differ or the entries are the same objects in the same order; so under FSDP they come in the model's order."""
    held = [p for g in optimizer.param_groups for p in g["params"]]
    if acc.distributed_type != DistributedType.FSDP:
        return held
    ids = {id(p) for p in held}
    return [p for p in model.parameters() if id(p) in ids]


def in_training_mode(model: torch.nn.Module) -> bool:
    """`model.training`, also for DeepSpeed's engine: its train() and eval() switch only the module it wraps, and the
    engine's own flag stays True."""
    inner = getattr(model, "module", None)
    return inner.training if isinstance(inner, torch.nn.Module) else model.training


def is_sharded(acc) -> bool:
    """Whether the prepared model's parameters are sharded across processes (FSDP2)."""
    return acc.is_fsdp2


def is_zero3(acc) -> bool:
    return acc.distributed_type == DistributedType.DEEPSPEED and acc.state.deepspeed_plugin.zero_stage == 3


def fit_deepspeed_config(acc, batch_size: int, grad_accum: int, max_grad_norm: float, universal: bool = False) -> None:
    """accelerate reads DeepSpeed's micro-batch from a prepared DataLoader and refuses to prepare without one; ftune
    batches itself (BatchOrder) and prepares the model and optimizer only, so a config that leaves it "auto" (ftune's
    own plugin, `accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml`) is given trainer.batch_size,
    the rows per process and micro-batch, an "auto" accumulation count trainer.grad_accum and an "auto" clipping
    trainer.max_grad_norm (check_state refused numbers that differ). accelerate's own accumulation count is set to
    match, so it does not warn about the difference. `universal`: the run resumes from a universal checkpoint
    (engine_state.check_resume)."""
    if acc.distributed_type != DistributedType.DEEPSPEED:
        return
    config = acc.state.deepspeed_plugin.deepspeed_config
    if universal:
        config.setdefault("checkpoint", {})["load_universal"] = True
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = batch_size
    if config.get("gradient_accumulation_steps", "auto") == "auto":
        config["gradient_accumulation_steps"] = grad_accum
    if config.get("gradient_clipping") == "auto":  # accelerate would fill it with 1.0 whatever trainer.max_grad_norm
        config["gradient_clipping"] = max_grad_norm
    acc.gradient_accumulation_steps = grad_accum


def micro_batch_sync(acc, model, last: bool):
    """The context of one micro-batch's forward and backward (both inside it): DDP and FSDP2 skip the gradient
    reduction until the last one (accelerate's no_sync; FSDP2 keeps the unsharded gradients until then); DeepSpeed
    reduces by itself at the boundary `backward` declares."""
    if last or acc.distributed_type == DistributedType.DEEPSPEED:
        return contextlib.nullcontext()
    return acc.no_sync(model)


def backward(acc, model, loss: torch.Tensor, last: bool) -> None:
    """Backward for one micro-batch. The loss is already divided by the global batch's normaliser (the micro-batches'
    losses sum to the step's mean), so DeepSpeed is told not to divide it again by its accumulation count
    (`scale_wrt_gas=False`), and the accumulation boundary is the last micro-batch, where DeepSpeed's engine reduces,
    clips and steps (DeepSpeed's public engine API; accelerate's own `backward` would take the boundary from its
    `accumulate()` bookkeeping, which ftune's loop does not use)."""
    if acc.distributed_type == DistributedType.DEEPSPEED:
        model.set_gradient_accumulation_boundary(last)
        model.backward(loss, scale_wrt_gas=False)
        if last:
            model.step()
    else:
        acc.backward(loss)


def sharding_engine(acc) -> str | None:
    """The engine's name when each rank holds only part of every weight (FSDP2, ZeRO-3), else None."""
    return "FSDP2" if acc.is_fsdp2 else "DeepSpeed ZeRO-3" if is_zero3(acc) else None


def every_rank_generates(acc) -> bool:
    """Whether generation needs every rank in each forward (each holds only part of the weights: FSDP2, ZeRO-3)."""
    return sharding_engine(acc) is not None


def shared_out(acc, items: list, fn: Callable[[list], list]) -> list:
    """`fn(items)` computed by all processes together under data parallelism (each process holds the whole model):
    each maps every N-th item and the results are gathered back in order. Every process must call it."""
    if acc.num_processes == 1:
        return fn(items)
    from accelerate.utils import gather_object

    n = acc.num_processes
    mine = items[acc.process_index:: n]
    log.info("Process %d of %d computes %d of %d items.", acc.process_index, n, len(mine), len(items))
    out: list = [None] * len(items)
    for rank, part in enumerate(gather_object([fn(mine)])):  # one list per rank, in rank order
        out[rank:: n] = part
    return out


def agreed(acc, flags: list[bool]) -> list[bool]:
    """Each flag true on every rank (a collective reduce; the flags unchanged in one process). Used where the ranks
    must take the same branch because they generate together, e.g. "this cache file is here", which machines with
    their own FTUNE_HOME can see differently."""
    if acc.num_processes == 1 or not flags:
        return flags
    t = torch.tensor([float(f) for f in flags], device=acc.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return [bool(v) for v in t.tolist()]


@contextlib.contextmanager
def ready_to_generate(acc, model: torch.nn.Module) -> Iterator[None]:
    """FSDP2: the prepared (root) module with its own parameters gathered, for transformers' `generate`, which calls
    the inner model's forward and never the root's. Each decoder layer still gathers its weights in its own forward
    (every rank must generate, in step: `synced_gpus`). The root is initialised first (FSDP2 does that in the root's
    first forward, and a layer reached first would claim to be a root)."""
    if not acc.is_fsdp2:
        yield
        return
    model._get_fsdp_state()._lazy_init()
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def check_reference(acc, objective, model: torch.nn.Module) -> None:
    """An objective that keeps a frozen copy of the initial model (full fine-tuning with a reference) cannot copy a
    sharded one: refused before the model is sharded, with the ways around it."""
    sharded = sharding_engine(acc)
    if sharded and getattr(objective, "needs_frozen_copy", lambda m: False)(model):
        raise ConfigError(f"{type(objective).__name__} without an adapter keeps a frozen copy of the initial model as "
                          f"its reference, and a model sharded by {sharded} cannot be copied. Use a PEFT method "
                          f"with an adapter (peft=lora: the reference is the model with the adapter switched off), "
                          f"objective.precompute_ref=true where the objective has it (DPO, PSO: reference "
                          f"log-probs computed once before training), or trainer.distributed=ddp or "
                          f"deepspeed_zero2.")


@contextlib.contextmanager
def without_zero3_init(acc) -> Iterator[None]:
    """Under ZeRO-3, transformers builds every model inside DeepSpeed's `zero.Init`, which partitions each parameter
    with collectives as it is created; a model that one rank builds alone (the meta-device skeleton of the
    target-module check, built while the other ranks wait) must not be, or the ranks deadlock. transformers decides
    from the DeepSpeed config accelerate registers with it, so that is withdrawn meanwhile. (accelerate's
    `zero3_init_context_manager(enable=False)` re-registers the same config, which leaves zero.Init on.)"""
    if not is_zero3(acc):
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        acc.state.deepspeed_plugin.set_deepspeed_weakref()


def reshard_all(unwrapped: torch.nn.Module) -> None:
    """Every FSDP2 unit of the model back to its shards, on every rank (local: it frees the gathered copies). While a
    unit is gathered (the root after a forward without backward, e.g. an eval) its module holds the full tensors in
    place of the sharded parameters that the optimizer and the state-dict helpers know."""
    from torch.distributed.fsdp import FSDPModule

    for m in unwrapped.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@contextlib.contextmanager
def full_parameters(acc, model: torch.nn.Module, ranks: str = "main", whole: bool = True
                    ) -> Iterator[torch.nn.Module]:
    """The unwrapped model with plain, full parameters in place of its shards, for a PEFT method's save/load.

    Every process must enter it (gathering is collective). With `ranks="main"` only rank 0 receives the full tensors
    (saving); with `ranks="all"` every process does, and whatever the body writes into them is scattered back into
    the shards on exit (loading). `whole=False` gathers only the trainable parameters, all that an adapter method
    saves or loads: the frozen base stays sharded (LoRA on a 70B model must not gather 140 GB onto each rank to
    write a few MB). Without sharding it yields the unwrapped model unchanged.
    """
    unwrapped = acc.unwrap_model(model)
    chosen = [(n, p) for n, p in unwrapped.named_parameters(remove_duplicate=False) if whole or p.requires_grad]
    if is_zero3(acc):  # DeepSpeed's own gathering; on exit rank 0's values are partitioned back (loading)
        import deepspeed

        params = list({id(p): p for _, p in chosen}.values())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if ranks == "all" else None):
            yield unwrapped
        return
    if not is_sharded(acc):
        yield unwrapped
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor

    # A module left gathered by its last forward (the root after an eval without backward) would otherwise be
    # resharded on rank 0 alone by the state_dict hooks of the PEFT method's save, and its next forward would
    # all-gather on rank 0 alone: a hang.
    reshard_all(unwrapped)
    everywhere = ranks == "all"
    receives = everywhere or acc.is_main_process
    sharded, plain = {}, {}  # (module, attribute) -> the sharded parameter, and its full stand-in
    gathered = set()
    for name, p in chosen:  # in the same order on every rank: each full_tensor() is an all-gather
        if id(p) not in gathered:  # once per tensor (a tied embedding and LM head share one)
            gathered.add(id(p))
            full = p.full_tensor() if isinstance(p, DTensor) else p
            if not receives:
                continue
            full = full.detach().clone() if everywhere else full.detach().cpu()
            plain[id(p)] = torch.nn.Parameter(full, requires_grad=p.requires_grad)
        elif not receives:
            continue
        owner, _, attr = name.rpartition(".")
        module = unwrapped.get_submodule(owner)
        sharded[(module, attr)] = p
        module._parameters[attr] = plain[id(p)]
    if not receives:
        yield unwrapped
        return
    # FSDP2's load_state_dict hooks re-shard whatever a load writes; the stand-ins are plain tensors, so they are
    # held back while the PEFT method loads into them (the values are scattered into the shards below).
    hooks = {m: (m._load_state_dict_pre_hooks, m._load_state_dict_post_hooks) for m in unwrapped.modules()}
    for m in hooks:
        m._load_state_dict_pre_hooks, m._load_state_dict_post_hooks = type(m._load_state_dict_pre_hooks)(), \
            type(m._load_state_dict_post_hooks)()
    try:
        yield unwrapped
        loaded = {name: unwrapped.get_parameter(name).detach() for name, _ in chosen} if everywhere else None
    finally:
        for m, (pre, post) in hooks.items():
            m._load_state_dict_pre_hooks, m._load_state_dict_post_hooks = pre, post
        for (module, attr), p in sharded.items():
            module._parameters[attr] = p
    if everywhere:
        set_model_state_dict(unwrapped, loaded, options=StateDictOptions(full_state_dict=True, strict=False))
