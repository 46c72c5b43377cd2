"""`ftune train`: the Hydra entry point and the one training loop.

config -> checks -> data -> model + PEFT -> loop (accumulate, clip, step, log, eval, checkpoint) -> final save.
The objective (`cfg.objective._target_`) is the only seam: the loop never branches on which objective it runs.
"""

from __future__ import annotations

import functools
import logging
import math
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from ftune import preflight
from ftune.atomic import write_json_atomic
from ftune.config import register_configs
from ftune.paths import configs_dir
from ftune.protocols import RunContext
from ftune.training import distributed as dist
from ftune.training import engine_state, run_state, steps
from ftune.training.metrics import MetricsLog, plot_loss, summary_text
from ftune.training.optim import build_scheduler
from ftune.training.profiling import step_profiler
from ftune.training.watchdog import SpikeGuard, TrainingError

log = logging.getLogger("ftune")
register_configs()


def _reduce_sum(accelerator, value: float | int) -> float:
    if accelerator.num_processes == 1:
        return float(value)
    t = torch.tensor(float(value), dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(t, reduction="sum"))


class Trainer:
    """Holds what the loop needs; `run()` is the loop, read top to bottom."""

    def __init__(self, cfg: DictConfig):
        from accelerate.utils import set_seed

        self.cfg, t = cfg, cfg.trainer
        plan = preflight.train(cfg)  # every config problem at once, before anything loads
        self.peft, self.objective, self.selector = plan.peft, plan.objective, plan.selector
        if hasattr(self.selector, "bind_config"):  # a selector that trains between rounds (iterative) needs the run
            self.selector.bind_config(cfg)
        self.acc = steps.accelerator(cfg, self.peft, self.objective)  # DDP, FSDP2 or DeepSpeed (accelerate's)
        self.is_main = self.acc.is_main_process
        self.out = steps.run_dir(cfg, self.acc)
        self.ckpt_root = self.out / "checkpoints"
        self.resume_from = run_state.resume_point(cfg, self.ckpt_root)
        if self.resume_from is not None:
            self.acc = engine_state.keep_resumed_precision(self.acc, cfg, self.resume_from)
        # How the checkpoint's optimizer state goes back: the engine's own load, through DeepSpeed's universal
        # checkpoint (DeepSpeed partitions for another number of processes or ZeRO stage), or from another engine.
        self.resume_how = (engine_state.NATIVE if self.resume_from is None
                           else engine_state.check_resume(self.acc, self.resume_from))
        set_seed(cfg.seed)

        model_dir, self.tokenizer, tok_key, self.data = steps.load_data(cfg, self.acc, self.peft, self.objective,
                                                                       self.selector)
        self.task = steps.task_inputs(cfg, self.tokenizer, tok_key)
        model = steps.build_model(cfg, self.peft, model_dir, self.acc)
        optimizer = steps.build_optimizer(model, self.peft, t)
        dist.check_reference(self.acc, self.objective, model)
        dist.fit_deepspeed_config(self.acc, t.batch_size, t.grad_accum, max(t.max_grad_norm, 0.0),
                                  universal=self.resume_how != engine_state.NATIVE)
        # Model and optimizer together: FSDP2 and DeepSpeed re-point the optimizer at the sharded parameters.
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        # The objective may need the initial model (a reference, self-generated samples) and may rebuild the rows.
        self.run_context = RunContext(cfg, self.acc, self.model, self.tokenizer, self.data, self.is_main)
        self.data = self.run_context.data = self.objective.setup(self.run_context) or self.data
        self.adapter_inputs = steps.adapter_inputs(self.acc, self.model)
        self.order = steps.batch_order(cfg, self.data.train, self.objective, self.acc)
        self.total_steps = t.max_steps if t.max_steps > 0 else t.epochs * self.order.steps_per_epoch
        self.run_context.order, self.run_context.total_steps = self.order, self.total_steps
        self.scheduler = build_scheduler(optimizer, t, self.total_steps)
        self.step, self.skipped = 0, 0
        self.spikes = SpikeGuard(t.spike_factor)
        if self.resume_from is not None:
            self._load(self.resume_from)

    # ----------------------------------------------------------------------------------------------- checkpoints
    def _save(self, name: str) -> Path:
        return run_state.save(self, name)

    def _load(self, path: Path) -> None:
        run_state.load(self, path)

    # ---------------------------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def eval_loss(self) -> dict[str, float]:
        """Held-out loss (and the objective's metrics) over the eval rows, split across processes."""
        if not self.data.eval:
            return {}
        self.model.eval()
        totals: dict[str, float] = {}
        count = 0.0
        bs, pad = self.cfg.trainer.batch_size, self.tokenizer.pad_token_id
        mine = self.data.eval[self.acc.process_index:: self.acc.num_processes]
        # Every rank runs as many batches as rank 0 (a sharded model needs every rank in each forward); a rank with
        # fewer rows repeats a row and does not count it.
        for s in range(0, math.ceil(len(self.data.eval) / self.acc.num_processes), bs):
            rows = mine[s: s + bs]
            batch = {k: v.to(self.acc.device) for k, v in self.objective.collate(rows or mine[:1] or self.data.eval[:1],
                                                                                  pad).items()}
            with self.acc.autocast():
                loss_sum, metrics = self.objective(self.model, batch)
            if not rows:
                continue
            for k, v in {"loss": float(loss_sum), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + v
            count += self.objective.normalizer(batch)
        self.model.train()
        count = _reduce_sum(self.acc, count)
        return {f"eval_{k}": _reduce_sum(self.acc, v) / max(count, 1) for k, v in sorted(totals.items())}

    def eval_task(self, tag: str) -> dict | None:
        from ftune.eval.tasks import run_task

        # Rank 0 evaluates and records. A model sharded by FSDP2 or ZeRO-3 needs every rank in each forward, so there
        # every rank runs the same task (generate keeps the ranks' decoding loops in step: synced_gpus) and the
        # others' results go to a scratch directory.
        # Under plain data parallelism the task's items are spread over the processes (each answers or scores a
        # share, and rank 0 gathers them in order).
        metrics, acc = None, self.acc
        spread = None
        if acc.num_processes > 1 and not dist.every_rank_generates(acc):
            spread = functools.partial(dist.shared_out, acc)
        if self.task and (self.is_main or dist.every_rank_generates(acc) or spread):
            with acc.autocast(), dist.ready_to_generate(acc, self.model), (
                    nullcontext(self.out / f"eval_{tag}") if self.is_main else tempfile.TemporaryDirectory()) as where:
                metrics = run_task(acc.unwrap_model(self.model), self.tokenizer, self.task, self.cfg.eval,
                                   Path(where), progress=self.cfg.trainer.progress and self.is_main, spread=spread)
            if self.is_main:
                log.info("%s accuracy (%s): %.3f on %d", self.cfg.eval.task, tag, metrics["accuracy"], metrics["n"])
        self.acc.wait_for_everyone()
        return metrics if self.is_main else None

    # ---------------------------------------------------------------------------------------------------- loop
    def run(self) -> dict:
        from ftune.training.signals import StopOnSignal

        with StopOnSignal() as stop:
            return self._run(stop)

    def _run(self, stop) -> dict:
        from tqdm.auto import tqdm

        from ftune.data.batching import row_tokens

        t, acc = self.cfg.trainer, self.acc
        metrics = MetricsLog(self.out, enabled=self.is_main, resume_step=self.step if self.cfg.trainer.resume else None)
        start_metrics = self.eval_task("start") if self.cfg.eval.at_start and self.step == 0 else None
        pad = self.tokenizer.pad_token_id
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.is_main and t.progress),
                   desc="train", dynamic_ncols=True)
        # What the optimizer holds (a method may change which of them train during the run, e.g. HFT per epoch).
        trainable = dist.clipped_parameters(acc, self.model, self.optimizer)
        tokens_seen, train_time, bad_in_a_row, last_loss = 0.0, 0.0, 0, float("nan")
        self.model.train()
        # Saved activations wait for backward in pinned CPU memory instead of GPU memory (CUDA only: check_device).
        pin = torch.cuda.is_available()
        offload = (lambda: torch.autograd.graph.save_on_cpu(pin_memory=pin)) if t.activation_offload else nullcontext
        profiler = step_profiler(t, self.out, acc.process_index)  # trainer.profile_steps > 0; else a no-op
        profiler.start()
        while self.step < self.total_steps:
            tic = time.perf_counter()
            rows = [[self.data.train[i] for i in idx] for idx in self.order.micro_batches(self.step)]
            self.run_context.step = self.step
            if hasattr(self.peft, "before_step"):  # e.g. HFT re-selecting its half at a new epoch
                self.peft.before_step(self.run_context)
            self.objective.before_step(self.run_context, rows)
            micro = [self.objective.collate(r, pad) for r in rows]
            n_global = _reduce_sum(acc, sum(self.objective.normalizer(b) for b in micro))
            loss_sum, sums = 0.0, {}
            for k, batch in enumerate(micro):
                batch = {key: v.to(acc.device) for key, v in batch.items()}
                last = k == len(micro) - 1
                # The backward stays inside micro_batch_sync: FSDP2 decides whether to reduce-scatter at backward time
                # (DDP already at the forward).
                with self.adapter_inputs, dist.micro_batch_sync(acc, self.model, last):
                    with acc.autocast(), offload():
                        part, parts = self.objective(self.model, batch)
                        # DDP averages gradients over processes, hence the world-size factor.
                        loss = part * acc.num_processes / max(n_global, 1)
                    dist.backward(acc, self.model, loss, last)
                loss_sum += float(part.detach())
                for name, v in parts.items():
                    sums[name] = sums.get(name, 0.0) + v
            step_loss = _reduce_sum(acc, loss_sum) / max(n_global, 1)
            grad_norm = acc.clip_grad_norm_(trainable, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
            finite, limit = math.isfinite(step_loss) and math.isfinite(float(grad_norm)), self.spikes.threshold()
            if finite and self.spikes.is_spike(step_loss):
                log.warning("step %d: loss %.4f > trainer.spike_factor x recent median = %.4f; step skipped.",
                            self.step + 1, step_loss, limit)  # counted from 1, as in metrics.jsonl
            elif finite:
                self.optimizer.step()
                bad_in_a_row = 0
            else:
                self.skipped += 1
                bad_in_a_row += 1
                log.warning("step %d: non-finite loss or gradient (loss=%s); step skipped.", self.step + 1,
                            step_loss)
                if bad_in_a_row >= 3:
                    ids = [r.get("ids", r.get("id")) for rs in rows for r in rs]
                    raise TrainingError(
                        f"3 non-finite steps in a row (last at step {self.step + 1}, examples {ids[:8]}). Lower "
                        f"trainer.lr, enable trainer.max_grad_norm, or check these examples. Checkpoints already "
                        f"written are complete and untouched.")
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step += 1
            # Useful tokens: real (non-padding) tokens of the step's rows, over all processes.
            tokens_seen += _reduce_sum(acc, sum(row_tokens(r) for rs in rows for r in rs))
            train_time += time.perf_counter() - tic
            profiler.step()
            last_loss = step_loss
            record = {"loss": step_loss, **{k: _reduce_sum(acc, v) / max(n_global, 1) for k, v in sums.items()},
                      "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                      "epoch": round(self.order.epoch_of(self.step), 4), "tokens_per_s": tokens_seen / train_time}
            if hasattr(self.objective, "step_metrics"):  # e.g. GRPO's rewards, KL and generation time of the step
                record.update(self.objective.step_metrics())
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            if self.step % t.log_every == 0 or self.step == self.total_steps:
                metrics.log(self.step, record)
            if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                if evals := self.eval_loss():
                    metrics.log(self.step, evals)
            stopping = _reduce_sum(acc, stop.signum is not None) > 0
            if self.step < self.total_steps and (stopping or t.save_every and self.step % t.save_every == 0):
                path = self._save(f"checkpoint-{self.step}")
            if stopping and self.step < self.total_steps:
                bar.close()
                metrics.close()
                if acc.is_main_process:  # every rank stops at this step; one message
                    name = f"signal {stop.signum}" if stop.signum is not None else "a signal on another process"
                    print(f"ftune: stopped by {name} after step {self.step}; checkpoint saved to {path}. Continue "
                          f"with `ftune train ... output_dir={self.out} trainer.resume=auto`.", file=sys.stderr)
                # A launcher stops the other ranks once one has exited: none exits before rank 0 has said so.
                acc.wait_for_everyone()
                raise SystemExit(128 + (stop.signum or signal.SIGTERM))
        profiler.stop()
        bar.close()
        final_eval = self.eval_loss()
        if final_eval:
            metrics.log(self.step, final_eval)
        final = self._save("final")
        end_metrics = self.eval_task("end") if self.cfg.eval.at_end else None
        metrics.close()
        summary = {"steps": self.step, "skipped_steps": self.skipped, "spike_skipped_steps": self.spikes.skipped,
                   "mixed_precision": acc.mixed_precision,  # what trainer.mixed_precision=auto chose
                   "final_loss": last_loss,
                   "eval": final_eval, "train_tokens": tokens_seen, "train_seconds": round(train_time, 2),
                   "tokens_per_s": tokens_seen / train_time if train_time else None, "output": str(final),
                   "task": self.cfg.eval.task, "task_start": start_metrics, "task_end": end_metrics,
                   # what the objective made of the training data, if it rebuilt it (e.g. s3ft's own/paraphrase/gold)
                   "composition": self.data.stats.get("composition"),
                   # what selection=... kept and why (clusters, budgets, rounds), if a method picked the examples
                   "selection": self.data.stats.get("selection"),
                   # what an online objective generated over the run (e.g. GRPO's completions and tokens/s)
                   "objective": self.objective.summary() if hasattr(self.objective, "summary") else None}
        if self.is_main:
            write_json_atomic(self.out / "summary.json", summary, indent=2)
            plot_loss(self.out / "metrics.jsonl", self.out / "loss.png")
            acc.print(summary_text(summary, self.out))
        return summary


def train(cfg: DictConfig) -> dict:
    """Run one training job from a composed config (also the API used by tests)."""
    return Trainer(cfg).run()


@hydra.main(config_path=str(configs_dir()), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ftune.reporting import run_reporting_errors

    try:
        run_reporting_errors(train, cfg, hydra_job=True)
    finally:
        dist.end_process_group()  # the process ends here


if __name__ == "__main__":  # torchrun / accelerate launch: `python -m ftune.train key=value ...`
    from ftune.reporting import run_hydra_main

    sys.argv[0] = "ftune train"
    run_hydra_main(main, "train", sys.argv[1:])
