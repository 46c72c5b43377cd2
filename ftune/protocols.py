"""The interfaces of ftune's plug-ins, in one place. A plug-in is any class named by `_target_` in its config group
(`objective=`, `peft=`, `selection=`): one module plus one YAML (configs/<group>/<name>.yaml, or
`<group>._target_=your_module.YourClass` on the command line: the launch directory is importable). Nothing else is
edited; the preflight (ftune/preflight.py) checks a plug-in's keys against its constructor's signature, reads its
declarations below, checks it has the methods its protocol names (`check_protocol`) and runs its `check_config`.

Declarations are class attributes with defaults, so a plug-in states only what differs from them. Data sources and
eval tasks are chosen by name (`data.source`, `eval.task`: ftune/data/sources.py, ftune/eval/tasks.py), and their
functions have the shapes of `DataSource` and `EvalTask` below.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch


@dataclass
class RunContext:
    """What an objective (and a PEFT method's `before_step`) sees of the run: the composed config, the accelerator,
    the prepared model and its tokenizer, the data (ftune.data.pipeline.PreparedData), and where the loop is. The
    loop keeps `step` current; `order` (ftune.data.batching.BatchOrder) and `total_steps` are set once the rows
    are final, after `setup`. A plug-in reads it and returns what it changes; it never writes to it."""

    cfg: Any
    acc: Any
    model: torch.nn.Module
    tokenizer: Any
    data: Any
    is_main: bool
    order: Any = None
    total_steps: int = 0
    step: int = 0


@runtime_checkable
class Objective(Protocol):
    """What a training step minimises. The loop (ftune/train.py) never branches on which objective it runs:

    - `collate(rows, pad_id)` turns one micro-batch of tokenized rows into tensors;
    - `normalizer(batch)` counts what the loss is summed over (e.g. response tokens), so that micro-batches and
      processes average correctly (the step's loss is sum of `__call__` / sum of normalizers);
    - `__call__(model, batch)` returns (the loss **summed** over the batch, {metric: float}) and is differentiated;
    - `setup(run)` runs once after the model is prepared (`run`: a RunContext): a reference, self-generated
      samples; it returns the data to train on when it rebuilds the rows (`dataclasses.replace(run.data, train=...)`)
      and None otherwise; `before_step(run, rows)` runs before each step (online sampling: it may replace the rows
      of the step's micro-batches in place).

    Declarations: `data_kind` "sft" (prompt/response rows) or "preference" (chosen/rejected pairs); `can_pack`
    (rows may hold several examples: data.packing); `fuses_lm_loss` (the loss is the LM head + cross-entropy alone,
    so trainer.liger may fuse them); `not_under` {engine: why} for engines it cannot run under; optionally
    `needs_frozen_copy(model) -> bool` and `check_config(cfg)` (a static method raising ConfigError). An online
    objective may also have `step_metrics() -> dict` (merged into each step's record as they are, e.g. rewards),
    `summary() -> dict` (the run summary's "objective") and `state_dict()` / `load_state_dict(state)` (saved with
    every checkpoint, per process, for an exact resume).
    """

    data_kind: ClassVar[str]
    can_pack: ClassVar[bool]

    def collate(self, rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]: ...

    def normalizer(self, batch: dict[str, torch.Tensor]) -> int: ...

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]: ...

    def setup(self, run: RunContext) -> Any: ...

    def before_step(self, run: RunContext, rows: list[list[dict]]) -> None: ...


@runtime_checkable
class PeftMethod(Protocol):
    """Which parameters train, and how they are saved.

    - `quantization_config(compute_dtype)`: the transformers quantization config the base loads with, or None;
    - `apply(model, gradient_checkpointing) -> model`: freeze, wrap or add the trainable parts;
    - `save(model, directory, write=True)` / `load_trainable(model, directory)`: what a checkpoint holds
      (`write=False`: the ranks that gather but do not write).

    Declarations: `adapter` (True: the base stays frozen and the reference is the model with the adapter off);
    `name` / `instead` / `not_under` (engines it cannot run under); `aliases` {their key: ours} for "did you mean";
    optionally `before_step(run)` (a RunContext), `build_optimizer(model, trainer_cfg, lr_scale)`, `lr_scale`,
    `check_config(cfg)`.
    """

    adapter: ClassVar[bool]

    def quantization_config(self, compute_dtype: torch.dtype) -> Any: ...

    def apply(self, model: torch.nn.Module, gradient_checkpointing: bool = False) -> torch.nn.Module: ...

    def save(self, model: torch.nn.Module, directory: Path, write: bool = True) -> None: ...

    def load_trainable(self, model: torch.nn.Module, directory: Path) -> None: ...


@runtime_checkable
class Selector(Protocol):
    """Which training examples are kept: `selector(records, seed) -> (kept records, report)` on the examples
    before tokenization (source order kept). Optionally `select(records, seed) -> ftune.selection.common.Selection`
    (indices and per-example scores, for `ftune select`), `bind_config(cfg)` (a selector that trains between
    rounds needs the run's config), `any_data_kind` (True: works on preference pairs too), `check_config(cfg)`."""

    def __call__(self, records: list[dict], seed: int) -> tuple[list[dict], dict]: ...


class DataSource(Protocol):
    """`rows, origin = source(data_cfg, split, seed)`: a split's raw records and where they came from (for
    messages); ftune/data/sources.py turns them into conversations."""

    def __call__(self, cfg: Any, split: str, seed: int) -> tuple[list[dict], str]: ...


class EvalTask(Protocol):
    """`metrics = task(model, tokenizer, examples, eval_cfg, out_dir, progress)`: scores the model, writes
    `predictions.jsonl` under out_dir and returns {"accuracy": ..., "n": ..., ...} (ftune/eval/tasks.py)."""

    def __call__(self, model: torch.nn.Module, tokenizer: Any, examples: list[dict], eval_cfg: Any, out_dir: Path,
                 progress: bool = True) -> dict: ...


PROTOCOLS: dict[str, type] = {"objective": Objective, "peft": PeftMethod, "selection": Selector}
# What the loop calls on each without asking first (the declarations have defaults and are read with them).
REQUIRED = {"objective": ("collate", "normalizer", "__call__", "setup", "before_step"),
            "peft": ("adapter", "quantization_config", "apply", "save", "load_trainable"),
            "selection": ("__call__",)}


def missing_members(group: str, cls: type) -> list[str]:
    """The members of its group's protocol that `cls` lacks (empty: it fits)."""
    return [n for n in REQUIRED[group] if not hasattr(cls, n)]
