"""`objective=many_icl`: ManyICL, many-shot in-context fine-tuning (He, Peng, Jiang, Go, arXiv 2506.11103).

From the paper (abstract only; its code is not public): one model is fine-tuned on several tasks at once with long
sequences holding many in-context examples of a task and, instead of predicting only the final answer, every answer
in the context is a supervised target (`target_mask=all_answers`). It is compared with zero/few-shot in-context
fine-tuning, where only the final answer is a target (`target_mask=last_answer`; `max_shots` gives the few-shot
variant), and with one fine-tuned model per task.

ftune's adaptation (METHODS.md §3 [adapt], not the paper's): the sequence layout and chat template
(ftune/data/many_shot.py); K = as many examples of one task as fit `data.max_length`; the contexts are rebuilt from a
fresh shuffle every epoch; `all_tokens` labels every token (the v2 abstract's "every example" read literally); the loss
is the token-mean cross-entropy over the labelled tokens of the accumulated batch, exactly as `objective=sft`, so a
sequence with more answers weighs more.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from ftune.config import ConfigError
from ftune.data.batching import collate, label_count
from ftune.data.many_shot import TARGET_MASKS, ManyShotBuilder, check_tasks, load_task_examples
from ftune.data.pipeline import PreparedData
from ftune.objectives.sft import labelled_ce_sum

log = logging.getLogger(__name__)


class ManyICL:
    """Next-token cross-entropy on many-shot sequences of one task each (see the module docstring).

    Args:
        target_mask: all_answers (ManyICL) | last_answer (in-context fine-tuning baseline) | all_tokens.
        single_task: treat the whole data set as this one task (data without a task field, e.g. GSM8K).
        max_shots: at most this many examples per sequence; None = as many as fit data.max_length.
        chunk_size: positions per chunk of the LM head + cross-entropy (None = auto, as in objective=sft).
    """

    can_pack = False
    data_kind = "many_shot"
    collate = staticmethod(collate)

    def __init__(self, target_mask: str = "all_answers", single_task: str | None = None, max_shots: int | None = None,
                 chunk_size: int | None = None):
        if target_mask not in TARGET_MASKS:
            raise ConfigError(f"objective.target_mask={target_mask!r} must be one of {', '.join(TARGET_MASKS)}: "
                              f"all_answers (ManyICL), last_answer (in-context fine-tuning baseline), all_tokens.")
        if max_shots is not None and max_shots < 1:
            raise ConfigError(f"objective.max_shots={max_shots} must be >= 1, or null for as many as fit.")
        if single_task is not None and not single_task.strip():
            raise ConfigError("objective.single_task is empty: name the task (e.g. gsm8k), or null to read each "
                              "example's task field.")
        self.target_mask, self.single_task, self.max_shots, self.chunk_size = (
            target_mask, single_task, max_shots, chunk_size)
        self.builder: ManyShotBuilder | None = None
        self._epoch, self._rows = 0, None

    @staticmethod
    def check_config(cfg) -> None:
        """Before any model loads: every example needs a task (or `objective.single_task`), every task 2 examples."""
        data, single = cfg.data, cfg.objective.get("single_task")
        if data.source == "hh_rlhf":
            raise ConfigError("objective=many_icl trains on (input, answer) examples, but data=hh_rlhf holds "
                              "preference pairs. Use data=jsonl with {task, input, output} records, or data=gsm8k.")
        if cfg.eval.task == "many_shot" and cfg.eval.single_task != single:
            raise ConfigError(f"eval.single_task={cfg.eval.single_task} differs from objective.single_task={single}, "
                              f"so the eval prompts would not match the training sequences. Set them equal (or "
                              f"leave eval.single_task at its default, which follows the objective).")
        if single is not None:
            return
        if data.source in ("gsm8k", "gsm_symbolic"):
            raise ConfigError(f"data={data.source} has no task field, and objective=many_icl builds each sequence "
                              f"from examples of one task. Treat the data set as one task with "
                              f"objective.single_task={data.source}.")
        examples, _ = load_task_examples(data, data.split, cfg.seed)
        check_tasks(examples, None, "train")
        if data.eval_split:
            check_tasks(load_task_examples(data, data.eval_split, cfg.seed)[0], None, "eval", min_examples=1)

    def _builder(self, run, pieces: list[dict], what: str) -> ManyShotBuilder:
        cfg = run.cfg
        check_tasks(pieces, self.single_task, what, min_examples=1)
        return ManyShotBuilder(pieces, run.tokenizer, cfg.data.max_length, self.target_mask, cfg.seed,
                               self.single_task, cfg.data.system_prompt, self.max_shots,
                               min_examples=2 if what == "train" else 1, what=what)

    def setup(self, run) -> PreparedData:
        """The first epoch's many-shot sequences of the tokenized examples (and the held-out ones), as the data."""
        self.builder = self._builder(run, run.data.train, "train")
        train = self.builder.epoch_rows(0)
        stats = self.builder.stats(train)
        held_out = self._builder(run, run.data.eval, "eval").epoch_rows(0) if run.data.eval else run.data.eval
        log.info("ManyICL (%s): %d task(s), %d sequences per epoch, %.1f examples per sequence (min %d, max %d), "
                 "%.0f tokens per sequence.", self.target_mask, len(stats["tasks"]), stats["sequences_per_epoch"],
                 stats["mean_shots"], stats["min_shots"], stats["max_shots"], stats["mean_tokens"])
        return replace(run.data, train=train, eval=held_out, stats={**run.data.stats, "many_icl": stats})

    def before_step(self, run, rows: list[list[dict]]) -> None:
        """From the second epoch on, put that epoch's sequence in each slot (a fresh shuffle of every task)."""
        epoch = run.step // run.order.steps_per_epoch
        if epoch == 0:
            return
        if epoch != self._epoch:
            self._rows, self._epoch = self.builder.epoch_rows(epoch), epoch
        for micro in rows:
            micro[:] = [self._rows[r["slot"]] for r in micro]

    def normalizer(self, batch: dict[str, torch.Tensor]) -> int:
        return label_count(batch)

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return labelled_ce_sum(model, batch, self.chunk_size), {}
