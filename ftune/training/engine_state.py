"""The optimizer state a checkpoint holds under each engine, and its way back into a run under any engine.

Each engine keeps the state in its own layout: one process or DDP torch's state dict (keyed by position, with the
parameter names saved beside it), FSDP2 each rank's shards (torch.distributed.checkpoint, keyed by name), DeepSpeed
each rank's flat partition (`DeepSpeedEngine.save_checkpoint`). `engine.json` in each checkpoint records which engine,
ZeRO stage and number of processes wrote it; check_resume decides how it goes back:

- NATIVE: the engine's own load (FSDP2's `dcp.load` reshards onto any number of processes);
- UNIVERSAL: DeepSpeed's partitions into another number of processes or the other ZeRO stage, through DeepSpeed's
  universal checkpoint (`ds_to_universal`, its layout completed for the loading stage);
- CONVERT: another engine's state, through torch's full optimizer state keyed by parameter name.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from ftune.config import ConfigError
from ftune.training import precision
from ftune.training.distributed import (
    check_state,
    engine_record,
    full_parameters,
    is_sharded,
    reshard_all,
    with_precision,
)

log = logging.getLogger(__name__)


ENGINE_FILE = "engine.json"  # in every checkpoint: the engine, world size and precision that wrote it
DS_DIR, DS_TAG = "deepspeed", "state"  # DeepSpeed's own checkpoint inside ftune's: <checkpoint>/deepspeed/state/
FSDP2_OPTIM_DIR = "optimizer"  # FSDP2: torch.distributed.checkpoint's shards of the optimizer state


NATIVE, UNIVERSAL, CONVERT = "native", "universal", "convert"  # how a checkpoint's optimizer state is loaded


def keep_resumed_precision(acc, cfg, path: Path):
    """The Accelerator for resuming from checkpoint `path` under trainer.mixed_precision=auto: the precision the
    checkpoint trained with where it differs from this machine's choice (one run keeps one arithmetic, on whichever
    machine it continues), unless this device cannot run it; `acc` itself otherwise. A checkpoint that did not record
    its precision (an earlier ftune) keeps this machine's choice. An explicit precision is never changed."""
    import json

    record = path / ENGINE_FILE
    if cfg.trainer.mixed_precision != "auto" or not record.exists():
        return acc
    wrote = json.loads(record.read_text()).get("mixed_precision")
    if wrote in (None, acc.mixed_precision):
        return acc
    if wrote == "bf16" and acc.device.type == "cuda" and not precision.gpu_runs_bf16():
        log.warning("trainer.mixed_precision=auto: %s trained with bf16 autocast, which this GPU does not run; it "
                    "continues in %s.", path, acc.mixed_precision)
        return acc
    log.info("trainer.mixed_precision=auto: %s as %s trained (this machine alone would choose %s; set "
             "trainer.mixed_precision explicitly to change it).", wrote, path, acc.mixed_precision)
    acc = with_precision(acc, cfg, wrote)
    check_state(cfg, acc)
    return acc


def check_resume(acc, path: Path) -> str:
    """How a checkpoint's optimizer state goes back (checked before the model loads). Each engine keeps it in its own
    layout: one process or DDP torch's own state dict, FSDP2 each rank's shards (torch.distributed.checkpoint; both
    read back with any number of processes), DeepSpeed each rank's partition, which DeepSpeed reads back directly only
    into the same ZeRO stage and number of processes. Returns NATIVE (the engine's own load), UNIVERSAL (DeepSpeed
    partitions into another number of processes or the other ZeRO stage, through DeepSpeed's universal checkpoint) or
    CONVERT (another engine's state, through a full state keyed by parameter name: load_optimizer_state). A checkpoint
    without `engine.json` (written before ftune recorded it) is not checked."""
    import json

    record = path / ENGINE_FILE
    if not record.exists():
        return NATIVE
    wrote, now = json.loads(record.read_text()), engine_record(acc)
    names = {"deepspeed": "DeepSpeed", "fsdp2": "FSDP2", "ddp": "DDP (or one process)"}
    if wrote["engine"] != now["engine"]:
        if wrote["engine"] == "ddp" and not wrote.get("param_names"):
            raise ConfigError(
                f"trainer.resume: {path} was written under DDP (or one process) by an earlier ftune, which did not "
                f"record which parameter each optimizer state belongs to, and this run uses {names[now['engine']]}. "
                f"Resume it with trainer.distributed=ddp (any number of processes), or start a new run from its "
                f"weights.")
        log.info("trainer.resume: %s was written under %s; its optimizer state is converted for %s.", path,
                 names[wrote["engine"]], names[now["engine"]])
        return CONVERT
    if now["engine"] != "deepspeed" or (wrote["processes"], wrote["zero_stage"]) == (now["processes"],
                                                                                     now["zero_stage"]):
        return NATIVE
    change = [f"{wrote['processes']} processes to {now['processes']}"] if wrote["processes"] != now["processes"] else []
    if wrote["zero_stage"] != now["zero_stage"]:
        change.append(f"ZeRO-{wrote['zero_stage']} to ZeRO-{now['zero_stage']}")
    log.info("trainer.resume: %s holds DeepSpeed partitions; from %s they are converted to DeepSpeed's universal "
             "checkpoint and loaded from it.", path, " and ".join(change))
    return UNIVERSAL


def to_universal(source: Path, folder: Path, stage: int) -> None:
    """DeepSpeed's `ds_to_universal` conversion of one checkpoint tag (every rank's ZeRO partitions) into a universal
    checkpoint at `folder`/DS_TAG (`folder` emptied first) that ZeRO `stage` loads: each parameter's float32 master and
    optimizer moments in full. DeepSpeed wants a `universal_checkpoint_info` entry that only Megatron-DeepSpeed writes;
    `inject_missing_state` adds the default one. Its progress output goes to the debug log.

    DeepSpeed's converter writes the layout of the stage that saved, and each stage's universal load reads only its
    own: ZeRO-1/2 read `mp_rank_00_model_states.pt`, every state as {"param": full-shape tensor}, `step.pt` per
    parameter and the global state (`ds_version`, `param_groups`) at the top of `zero/optimizer_state.pt`; ZeRO-3 reads
    `zero_pp_rank_0_mp_rank_00_model_states.pt` and the step and groups under its `optimizer_state_dict`. The layout
    is completed here for both, so a checkpoint moves between stages as well as between numbers of processes. (Only
    the model-states file's counters are read in a universal load; the weights come from `zero/`.)"""
    import argparse
    import io
    import shutil

    import deepspeed
    from deepspeed.checkpoint import ds_to_universal

    if folder.exists():  # left by an interrupted conversion
        shutil.rmtree(folder)
    out = io.StringIO()
    args = argparse.Namespace(input_folder=str(source), output_folder=str(folder / DS_TAG), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        ds_to_universal.main(args)
    log.debug("ds_to_universal: %s", out.getvalue())

    tag, zero = folder / DS_TAG, folder / DS_TAG / "zero"
    model_states = sorted(tag.glob("*model_states.pt"))[0]
    meta = torch.load(model_states, map_location="cpu", weights_only=False)
    for f in tag.glob("*model_states.pt"):
        f.unlink()
    torch.save(meta, tag / model_states_file(stage))
    shapes = {name: shape for group in meta["param_shapes"] for name, shape in group.items()}
    optim = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
    inner = optim.get("optimizer_state_dict")  # written from ZeRO-3 partitions
    step = inner["state"][0]["step"] if inner else None
    for name, shape in shapes.items():
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            state = torch.load(zero / name / f"{key}.pt", map_location="cpu", weights_only=False)
            if not isinstance(state, dict):  # ZeRO-3's flat tensor
                torch.save({"param": state.detach().reshape(shape), "cat_dim": 0}, zero / name / f"{key}.pt")
        if (zero / name / "step.pt").exists():
            step = torch.load(zero / name / "step.pt", map_location="cpu", weights_only=False)
        else:
            torch.save(step, zero / name / "step.pt")
    optim.setdefault("ds_version", meta.get("ds_version", deepspeed.__version__))
    optim.setdefault("optimizer_state_dict", {"state": {0: {"step": step}}, "param_groups": optim["param_groups"]})
    torch.save(optim, zero / "optimizer_state.pt")


def model_states_file(stage: int) -> str:
    """The file of counters and shapes that a universal load of ZeRO `stage` looks for."""
    return "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"


def read_universal(folder: Path) -> tuple[dict, dict]:
    """A universal checkpoint (completed by to_universal) as torch's full optimizer state keyed by parameter name (the
    layout of `get_optimizer_state_dict(..., full_state_dict=True)`) and each parameter's float32 master."""
    tag = folder / DS_TAG
    zero = tag / "zero"
    meta = torch.load(next(tag.glob("*model_states.pt")), map_location="cpu", weights_only=False)
    groups = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)["param_groups"]
    if len(groups) != len(meta["param_shapes"]):
        raise RuntimeError(f"{folder}: {len(groups)} optimizer groups but {len(meta['param_shapes'])} groups of shapes")
    state, masters, param_groups = {}, {}, []
    for settings, shapes in zip(groups, meta["param_shapes"]):
        param_groups.append({**{k: v for k, v in settings.items() if k != "params"}, "params": list(shapes)})
        for name in shapes:
            def load(key: str, name: str = name):
                return torch.load(zero / name / f"{key}.pt", map_location="cpu", weights_only=False)

            masters[name] = load("fp32")["param"]
            state[name] = {"step": load("step"), "exp_avg": load("exp_avg")["param"],
                           "exp_avg_sq": load("exp_avg_sq")["param"]}
    return {"state": state, "param_groups": param_groups}, masters


def write_universal(full: dict, masters: dict, folder: Path, stage: int, processes: int) -> None:
    """The inverse of read_universal, for DeepSpeed to load another engine's state: torch's full optimizer state keyed
    by name and the float32 weights as a universal checkpoint in the layout ZeRO `stage` reads (see to_universal)."""
    import shutil

    import deepspeed
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    if folder.exists():
        shutil.rmtree(folder)
    tag = folder / DS_TAG
    step = None
    for name, s in full["state"].items():
        (tag / "zero" / name).mkdir(parents=True)
        shape = masters[name].shape
        for key, value in (("fp32", masters[name]), ("exp_avg", s["exp_avg"]), ("exp_avg_sq", s["exp_avg_sq"])):
            torch.save({"param": value.detach().float().reshape(shape).clone(), "cat_dim": 0},
                       tag / "zero" / name / f"{key}.pt")
        step = torch.as_tensor(s["step"], dtype=torch.float32).clone()
        torch.save(step, tag / "zero" / name / "step.pt")
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(g["params"])))}
              for g in full["param_groups"]]
    torch.save({"param_groups": groups, "ds_version": deepspeed.__version__,
                "optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": groups}},
               tag / "zero" / "optimizer_state.pt")
    shapes = [{name: masters[name].shape for name in g["params"]} for g in full["param_groups"]]
    torch.save({"module": None, "buffer_names": [], "optimizer": None, "param_shapes": shapes,
                "frozen_param_shapes": None, "shared_params": {}, "frozen_param_fragments": None,
                "lr_scheduler": None, "data_sampler": None, "random_ltd": None, "skipped_steps": 0,
                "global_steps": int(step), "global_samples": 0, "dp_world_size": processes, "mp_world_size": 1,
                "ds_version": deepspeed.__version__,
                UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}},
               tag / model_states_file(stage))


def read_full_state(acc, directory: Path, state: dict, names: list | None, scratch: Path) -> tuple[dict, dict | None]:
    """Another engine's optimizer state as torch's full state keyed by parameter name, and the float32 master weights
    where the engine kept them apart from the model's (DeepSpeed; else None). Every rank calls it; rank 0 converts
    FSDP2's shards (`dcp_to_torch_save`) or DeepSpeed's partitions (to_universal) into `scratch`, which all read."""
    import json

    wrote = json.loads((directory / ENGINE_FILE).read_text())["engine"]
    if wrote == "ddp":  # torch's state dict: keyed by position in the groups, whose names were saved beside it
        flat = [n for group in names for n in group]
        return {"state": {flat[i]: s for i, s in state["state"].items()},
                "param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": list(group)}
                                 for g, group in zip(state["param_groups"], names)]}, None
    if wrote == "fsdp2" and not (directory / FSDP2_OPTIM_DIR).is_dir():  # an earlier ftune's: full state in `state`
        return state, None
    if acc.is_main_process:
        if wrote == "fsdp2":
            from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

            scratch.mkdir(parents=True, exist_ok=True)
            dcp_to_torch_save(directory / FSDP2_OPTIM_DIR, scratch / "optimizer.pt")
        else:
            to_universal(directory / DS_DIR / DS_TAG, scratch, 2)
    acc.wait_for_everyone()
    if wrote == "fsdp2":
        return torch.load(scratch / "optimizer.pt", map_location="cpu", weights_only=False)["optimizer"], None
    return read_universal(scratch)


def load_full_state(acc, model: torch.nn.Module, optimizer, full: dict, masters: dict | None, scratch: Path) -> None:
    """Load torch's full optimizer state keyed by name (read_full_state) into this run's engine, and the float32 master
    weights if given. One process, DDP or FSDP2: torch's `set_optimizer_state_dict` places (and shards) it. DeepSpeed:
    it is written as a universal checkpoint (write_universal, with the weights gathered from the model where no
    masters came with it) and loaded as one."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    unwrapped = acc.unwrap_model(model)
    if acc.distributed_type != DistributedType.DEEPSPEED:
        set_optimizer_state_dict(unwrapped, optimizer.optimizer, full, options=StateDictOptions(full_state_dict=True))
        if masters is not None:
            unknown = set(masters) - {n for n, _ in unwrapped.named_parameters()}
            if unknown:  # strict=False below would skip them without a word
                raise RuntimeError(f"the checkpoint's master weights name parameters this model lacks: "
                                   f"{sorted(unknown)[:3]}")
            set_model_state_dict(unwrapped, masters, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    if masters is None:
        with full_parameters(acc, model, ranks="main", whole=False) as m:
            trainable = {n: p for n, p in m.named_parameters() if n in full["state"]}
            masters = {n: p.detach().float().clone() for n, p in trainable.items()}
        if any(p.dtype != torch.float32 for p in trainable.values()) and acc.is_main_process:
            log.warning("trainer.resume: DeepSpeed's bf16 mode holds the weights in bf16 and starts its float32 "
                        "masters from them, so the checkpoint's float32 weights lose their low bits once (as when "
                        "DeepSpeed starts from a float32 model).")
    if acc.is_main_process:
        write_universal(full, masters, scratch, acc.state.deepspeed_plugin.zero_stage, acc.num_processes)
    acc.wait_for_everyone()
    load_universal(model, scratch)


def load_universal(model, folder: Path) -> None:
    """The DeepSpeed engine's load of a universal checkpoint at `folder` (its config has `load_universal`), repaired."""
    model.load_checkpoint(str(folder), tag=DS_TAG, load_module_strict=False, load_optimizer_states=True,
                          load_lr_scheduler_states=False)
    repair_universal_load(model.optimizer.optimizer, folder)


def repair_universal_load(optimizer, folder: Path) -> None:
    """Undo two things ZeRO-3's universal load (DeepSpeed 0.19) gets wrong once the optimizer has more than one
    parameter group (LoRA+'s B matrices, or norms without weight decay):
    - it gives every group the first group's settings (lr, weight decay...); ZeRO-1/2's load sets them group by group.
      They are put back from the checkpoint;
    - it gives every group one and the same `step` tensor, which Adam increments in place once per group, so the
      second group steps with the wrong bias correction. Each gets its own copy."""
    saved = torch.load(folder / DS_TAG / "zero" / "optimizer_state.pt", map_location="cpu",
                       weights_only=False)["param_groups"]
    if len(saved) != len(optimizer.param_groups):
        raise RuntimeError(f"the universal checkpoint has {len(saved)} parameter groups and this optimizer "
                           f"{len(optimizer.param_groups)}")
    for group, settings in zip(optimizer.param_groups, saved):
        group.update({k: v for k, v in settings.items() if k != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def param_names(acc, model: torch.nn.Module, optimizer) -> list[list[str]] | None:
    """One process or DDP: each optimizer group's parameter names in order, saved beside torch's state dict (keyed by
    position) so that another engine can place it. None under FSDP2 and DeepSpeed, whose files are keyed by name."""
    if acc.distributed_type == DistributedType.DEEPSPEED or is_sharded(acc):
        return None
    names = {id(p): n for n, p in acc.unwrap_model(model).named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def optimizer_state(acc, model: torch.nn.Module, optimizer, directory: Path) -> dict:
    """The optimizer's state to save. One process or DDP: torch's state dict, returned for `training_state.pt`.
    Sharded engines write it from every rank, so that no rank holds all of it (collective):

    - FSDP2: each rank's shards with torch.distributed.checkpoint (`dcp.save`, keyed by parameter name) into
      `directory`/optimizer, which `dcp.load` reshards onto any number of processes;
    - DeepSpeed: each rank's partition with the engine's `save_checkpoint` into `directory`/deepspeed (trainable
      weights only, with their float32 masters and optimizer state).
    """
    if acc.distributed_type == DistributedType.DEEPSPEED:
        model.save_checkpoint(str(directory / DS_DIR), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)
        return {}
    if not is_sharded(acc):
        return optimizer.state_dict()
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    unwrapped = acc.unwrap_model(model)
    reshard_all(unwrapped)  # else a gathered unit's parameters are not the optimizer's
    dcp.save({"optimizer": get_optimizer_state_dict(unwrapped, optimizer.optimizer)},
             checkpoint_id=directory / FSDP2_OPTIM_DIR)
    return {}


def load_optimizer_state(acc, model: torch.nn.Module, optimizer, state: dict, directory: Path,
                         scratch: Path | None = None, how: str = NATIVE, names: list | None = None) -> None:
    """Put a checkpoint's optimizer state back, as check_resume decided (`how`). NATIVE: the engine's own load; under
    DeepSpeed the engine's `load_checkpoint` restores each rank's partition and the float32 master weights, and from
    them the trainable weights. UNIVERSAL: the partitions are first converted to DeepSpeed's universal checkpoint in
    `scratch` (a directory in this run's output, which every rank reads, removed after the load), which loads into any
    number of processes and either ZeRO stage. CONVERT: from another engine's layout (`names`: the parameter names
    saved with a DDP state). ftune's own scheduler and step counter are restored by the caller."""
    if how == CONVERT:
        load_full_state(acc, model, optimizer, *read_full_state(acc, directory, state, names, scratch), scratch)
    elif how == UNIVERSAL:
        if acc.is_main_process:
            to_universal(directory / DS_DIR / DS_TAG, scratch, acc.state.deepspeed_plugin.zero_stage)
        acc.wait_for_everyone()
        load_universal(model, scratch)
    if how != NATIVE:
        acc.wait_for_everyone()
        if acc.is_main_process:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
        return
    if acc.distributed_type == DistributedType.DEEPSPEED:
        model.load_checkpoint(str(directory / DS_DIR), tag=DS_TAG, load_module_strict=False,
                              load_optimizer_states=True, load_lr_scheduler_states=False)
        return
    if not is_sharded(acc):
        optimizer.load_state_dict(state)
        return
    if not (directory / FSDP2_OPTIM_DIR).is_dir():  # written by an earlier ftune: the full state in `state`
        load_full_state(acc, model, optimizer, state, None, scratch)
        return
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    unwrapped = acc.unwrap_model(model)
    import torch.distributed.checkpoint as dcp

    # The state to load into: this run's shards, which get_optimizer_state_dict initialises (the optimizer has not
    # stepped yet); dcp.load fills them in place from whichever shards of the saved run hold each part.
    target = {"optimizer": get_optimizer_state_dict(unwrapped, optimizer.optimizer)}
    dcp.load(target, checkpoint_id=directory / FSDP2_OPTIM_DIR)
    set_optimizer_state_dict(unwrapped, optimizer.optimizer, target["optimizer"])
