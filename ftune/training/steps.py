"""The steps that build a training run, in the order `Trainer.__init__` (ftune/train.py) takes them, each with its
inputs and outputs explicit:

    preflight.train(cfg) -> Plan (plug-ins built)            ftune/preflight.py
    accelerator(cfg, peft, objective) -> acc; run_dir(cfg, acc) -> the run directory (checked, recorded)
    run_state.resume_point(cfg, checkpoints) -> the checkpoint to continue from  ftune/training/run_state.py
    load_data(cfg, acc, peft, objective, selector) -> model_dir, tokenizer, tokenizer key, data
    task_inputs(cfg, tokenizer, key) -> the eval task's prepared inputs
    build_model(cfg, peft, model_dir, acc) -> the model with the PEFT method applied
    build_optimizer(model, peft, trainer_cfg) -> optimizer
    acc.prepare(model, optimizer); objective.setup(RunContext) -> the data to train on (or None: as it is)
    adapter_inputs(acc, model), batch_order(cfg, rows, objective, acc) -> the step's context and the data order

Library calls are imported inside the functions, where they are used (and where tests replace them).
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig

from ftune.config import ConfigError
from ftune.training import distributed as dist

log = logging.getLogger("ftune")


def check_world_size(seen: int) -> None:
    """Refuse to train when the launcher started more processes than accelerate joined into one group: each would
    then train alone on its shard, never syncing gradients (on CPU this happens without ACCELERATE_USE_CPU=true)."""
    launched = int(os.environ.get("FTUNE_NPROC") or os.environ.get("WORLD_SIZE") or 1)
    if launched != seen:
        raise ConfigError(f"{launched} processes were launched but accelerate sees {seen}, so they would not share "
                          f"gradients. On a CPU, set ACCELERATE_USE_CPU=true (gloo), or launch with "
                          f"`ftune train --nproc {launched} ...`, which sets what is needed.")


def accelerator(cfg: DictConfig, peft, objective):
    """The Accelerator of `trainer.distributed` (accelerate's DDP, FSDP2 or DeepSpeed), after the checks that need
    the launched processes: all of them joined, and the plug-ins can run under the engine."""
    from accelerate.state import AcceleratorState

    from ftune.training import cpu_malloc

    # A second job in the same process (a `-m` sweep, the tests) may ask for another precision; accelerate keeps
    # its state in a process-wide singleton, so reset it (the process group, if any, is kept).
    AcceleratorState._reset_state()
    acc = dist.make_accelerator(cfg)
    check_world_size(acc.num_processes)
    # Before the data and the model take memory: freed CPU buffers stay in the process (trainer.cpu_malloc).
    log.info("trainer.cpu_malloc: %s", cpu_malloc.apply(cfg.trainer.cpu_malloc, acc.device.type))
    dist.check_engine_limits(acc, peft, "peft")
    dist.check_engine_limits(acc, objective, "objective")
    return acc


def run_dir(cfg: DictConfig, acc) -> Path:
    """One directory for every rank (rank 0's), fresh or resumable, writable, and seen from every machine; the main
    process then writes the run's record there (.hydra/, train.log)."""
    from ftune import preflight, run_record
    from ftune.training import run_state

    def fresh_and_writable(out: Path) -> None:
        run_state.check_fresh(out, cfg.trainer.resume)
        preflight.check_writable(out)

    out = dist.shared_output_dir(acc, Path(cfg.output_dir), fresh_and_writable)
    if acc.is_main_process:
        run_record.write(cfg, out)
    else:
        cfg.output_dir = str(out)
    return out


def load_data(cfg: DictConfig, acc, peft, objective, selector):
    """Resolve the model, check the PEFT method's targets on its skeleton, load the tokenizer and prepare the data
    (selection, tokenization, rows). Returns (model_dir, tokenizer, tokenizer_key, data).

    Rank 0 first converts or builds the model and fills the tokenization cache (under FTUNE_HOME); then the first
    rank of each other machine, which finds them there if FTUNE_HOME is shared and builds its own if not; then the
    remaining ranks read them. (Two nested barriers: on one machine the middle phase is empty.)"""
    from ftune.data.pipeline import prepare
    from ftune.models.loading import fingerprint, load_tokenizer, resolve_model_dir
    from ftune.peft.base import preflight_targets

    with acc.main_process_first(), acc.local_main_process_first():
        model_dir = resolve_model_dir(cfg.model.name_or_path, cfg.model.revision)
        with dist.without_zero3_init(acc):
            preflight_targets(peft, model_dir, cfg.model.trust_remote_code)
        tokenizer = load_tokenizer(model_dir)
        key = fingerprint(model_dir) + str(model_dir)
        data = prepare(cfg.data, tokenizer, key, cfg.seed, selector, pack_rows=cfg.data.packing,
                       kind=objective.data_kind)
    # No objective makes more rows than examples, so too few examples for one step is known before the model loads.
    t = cfg.trainer
    n_examples, rows_per_step = data.stats["train_examples"], t.batch_size * t.grad_accum * acc.num_processes
    if n_examples < rows_per_step:
        raise ConfigError(f"only {n_examples} training examples, fewer than one optimizer step needs "
                          f"(trainer.batch_size x trainer.grad_accum x processes = {rows_per_step}). "
                          f"Lower them, or train on more examples.")
    return model_dir, tokenizer, key, data


def task_inputs(cfg: DictConfig, tokenizer, key: str) -> list:
    """The eval task's inputs when the run evaluates at its start or end (none otherwise)."""
    from ftune.eval.tasks import task_inputs as inputs

    if cfg.eval.task == "none" or not (cfg.eval.at_start or cfg.eval.at_end):
        return []
    return inputs(cfg.data, cfg.eval, tokenizer, cfg.seed, key)


def build_model(cfg: DictConfig, peft, model_dir: Path, acc) -> torch.nn.Module:
    """Load the base (quantized as the PEFT method asks), choose the attention of packed rows, turn on gradient
    checkpointing, apply the PEFT method, compile."""
    from ftune.models.loading import load_model

    t = cfg.trainer
    compute = torch.bfloat16 if acc.mixed_precision == "bf16" else torch.float32  # auto resolved
    model, _, _ = load_model(cfg.model, peft.quantization_config(compute), model_dir)
    packed_attention = cfg.model.packed_attention
    if packed_attention == "auto":
        # Per example on a CPU (1.05-1.7x tok/s on packed rows there). Not yet by default on GPUs: there one kernel
        # launch per example may cost more than the masked FLOPs it saves (scripts/gpu_check.sh attention).
        packed_attention = "per_example" if acc.device.type == "cpu" and not t.compile else "masked"
    if packed_attention == "per_example":
        from ftune.models.packed_attention import use_packed_attention

        if use_packed_attention(model):
            log.info("model.packed_attention=%s: packed rows attend per example (SDPA per example, no row mask)",
                     cfg.model.packed_attention)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = peft.apply(model, t.gradient_checkpointing)
    if t.compile:  # in place (nn.Module.compile): parameter names, and so the saved files, stay as they are
        model.compile()
    return model


def build_optimizer(model: torch.nn.Module, peft, t: DictConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; a PEFT method may bring its own (LIFT) or per-parameter rates (LoRA+)."""
    from ftune.training.optim import build_optimizer as adamw

    make = getattr(peft, "build_optimizer", adamw)
    return make(model, t, getattr(peft, "lr_scale", None))


def adapter_inputs(acc, model: torch.nn.Module):
    """Under autocast, LoRA layers skip peft's float32 round trip of their inputs in the training step (a context
    manager for the step; a no-op without autocast)."""
    with acc.autocast():  # whether the step really runs under torch autocast (DeepSpeed casts by itself)
        autocast_on = torch.is_autocast_enabled(acc.device.type)
    if not autocast_on:
        return nullcontext()
    from ftune.peft.lora import AdapterInputsAsIs

    return AdapterInputsAsIs(model)


def batch_order(cfg: DictConfig, rows: list[dict], objective, acc):
    """The order of the training rows over steps, micro-batches and processes (grouped by length when asked)."""
    from ftune.data.batching import BatchOrder, row_tokens

    t = cfg.trainer
    lengths = [row_tokens(r) for r in rows] if cfg.data.group_by_length else None
    if lengths is not None and getattr(objective, "data_kind", "sft") == "preference":
        log.warning("data.group_by_length=true with %s: its batches already pack the chosen and rejected sequences "
                    "into shared rows, and grouping pairs by length was measured slower for DPO (SmolLM2 on a CPU: "
                    "293 vs 315 tok/s) with a larger peak memory. Consider data.group_by_length=false.",
                    type(objective).__name__)
    order = BatchOrder(len(rows), t.batch_size, t.grad_accum, acc.num_processes, acc.process_index, cfg.seed,
                       lengths)
    if order.steps_per_epoch == 0:
        raise ConfigError(f"only {len(rows)} training rows, fewer than one optimizer step needs "
                          f"(trainer.batch_size x trainer.grad_accum x processes = {order.rows_per_step}). "
                          f"Lower them, or train on more examples.")
    return order
