"""TRL's side of scripts/bench_train.py: the child (`bench_train.py --child trl`: SFTTrainer / DPOTrainer on the
examples ftune trains on, in ftune's order) and one measured run of it."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .ftune_side import ftune_dpo_pairs, ftune_example_order
from .machine import run_child, steady_rate, tail
from .settings import (
    DPO_BETA,
    IGNORE,
    LORA,
    MAX_GRAD_NORM,
    SEED,
    TRL_REUSE_TUNABLES,
    WARMUP_RATIO,
    WEIGHT_DECAY,
    gsm8k_rows,
)


# ----------------------------------------------------------------------------------------------------------- TRL
def trl_child(a) -> None:
    """Runs inside the TRL child process: train with SFTTrainer and write the measurements to --child-out."""
    import dataclasses

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    packing = a.child_packing == "on"
    dpo = a.objective == "dpo"
    if dpo:
        from trl import DPOConfig as Config
        from trl import DPOTrainer as BaseTrainer
    else:
        from trl import SFTConfig as Config
        from trl import SFTTrainer as BaseTrainer
    precision = a.precision
    data_dir = Path(os.environ["FTUNE_DATA_DIR"])
    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    if dpo:  # the pairs ftune trains on, parsed by ftune, in ftune's order
        pairs = json.loads(a.pairs_file.read_text())
        order = list(range(len(pairs)))
        ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in pairs])
        # Same as ftune's DPO: sigmoid loss, reference = adapter disabled (not precomputed), dropout left on.
        method = dict(beta=DPO_BETA, precompute_ref_log_probs=False, disable_dropout=False)
    else:
        rows = gsm8k_rows(data_dir, a.examples)
        order = json.loads(a.order_file.read_text()) if a.order_file else None
        if order is not None:  # ftune's examples in ftune's order, read sequentially: both sides see the same batches
            rows = [rows[i] for i in order]
        ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}],
                                 "completion": [{"role": "assistant", "content": r["answer"]}]} for r in rows])
        method = dict(packing=packing, completion_only_loss=True, assistant_only_loss=False)
    work = a.child_out.parent / f"trl-{a.child_packing}"
    # SFTConfig turns activation (gradient) checkpointing on by default; ftune's default is off. transformers 5.x
    # renamed the argument to activation_checkpointing (gradient_checkpointing is a deprecated alias).
    fields = {f.name for f in dataclasses.fields(Config)}
    no_ckpt = {"activation_checkpointing": False} if "activation_checkpointing" in fields \
        else {"gradient_checkpointing": False}
    sequential = order is not None and "train_sampling_strategy" in fields
    if sequential:
        no_ckpt["train_sampling_strategy"] = "sequential"
    config = Config(
        output_dir=str(work), max_steps=a.steps, per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=1, learning_rate=a.lr, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM,
        lr_scheduler_type="cosine", warmup_steps=int(round(WARMUP_RATIO * a.steps)),
        bf16=precision == "bf16", fp16=False, use_cpu=a.child_device == "cpu", **no_ckpt,
        max_length=a.seq_len, **method,
        report_to="none", save_strategy="no", eval_strategy="no", logging_steps=10, disable_tqdm=True,
        seed=SEED, dataloader_num_workers=0,
    )
    # Full fine-tuning: no peft_config (DPOTrainer then keeps a frozen copy of the model as the reference).
    peft_config = None if a.peft == "full" else LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], bias="none",
        target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    stats = {"tokens": [], "padded": [], "loss_tokens": [], "rows": [], "widths": [], "losses": []}

    class Counting(BaseTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            if order is not None and not sequential:  # older transformers: no train_sampling_strategy
                return torch.utils.data.SequentialSampler(self.train_dataset)
            return super()._get_train_sampler(*args, **kwargs)

        def training_step(self, *args, **kwargs):
            inputs = args[1] if len(args) > 1 else kwargs["inputs"]
            ids = inputs["input_ids"]
            # Padding-free (packing) batches are one flattened row of real tokens; otherwise the mask marks them.
            stats["tokens"].append(int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else ids.numel())
            stats["padded"].append(ids.numel())
            stats["loss_tokens"].append(int((inputs["labels"][:, 1:] != IGNORE).sum()) if "labels" in inputs
                                        else int(inputs["completion_mask"][:, 1:].sum()))  # DPO: completion tokens
            stats["rows"].append(ids.shape[0])
            # Row width the model sees (padding-free: the whole batch flattened into one row).
            stats["widths"].append(ids.shape[1])
            loss = super().training_step(*args, **kwargs)
            stats["losses"].append(float(loss))  # this step's mean loss (no gradient accumulation)
            return loss

    times = {"begin": None, "ends": [], "cpu_begin": None, "cpu_ends": []}

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            times["begin"], times["cpu_begin"] = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            times["ends"].append(time.perf_counter())
            times["cpu_ends"].append(time.process_time())

    trainer = Counting(model=model, args=config, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                       callbacks=[Timer()])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    lens = ([len(p) + len(c) + len(p) + len(r) for p, c, r in zip(*(trainer.train_dataset[k] for k in
                                                                     ("prompt_ids", "chosen_ids", "rejected_ids")))]
            if dpo else [len(x) for x in trainer.train_dataset["input_ids"]])
    t0 = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - t0
    steps = len(times["ends"])
    res = {"framework": "trl", "packing": packing, "trl_version": trl.__version__,
           "example_order": "ftune's (same batches)" if order is not None else "TRL's own random sampler",
           "transformers_version": transformers.__version__, "steps_done": steps, "train_wall_s": train_s,
           "final_loss": stats["losses"][-1] if stats["losses"] else None,
           "mean_loss": sum(stats["losses"]) / len(stats["losses"]) if stats["losses"] else out.training_loss,
           "trainable_params": trainable, "dataset_rows": len(lens),
           "dataset_mean_row_tokens": sum(lens) / max(len(lens), 1),
           "useful_tokens": float(sum(stats["tokens"])), "padded_tokens": sum(stats["padded"]),
           "activation_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)
                                            or config.gradient_checkpointing),
           "bf16_autocast": trainer.accelerator.mixed_precision,
           "loss_tokens": sum(stats["loss_tokens"]), "widest_row": max(stats["widths"]), "optim": str(config.optim),
           "step_seconds": [round(t1 - t0_, 4)
                            for t0_, t1 in zip([times["begin"]] + times["ends"][:-1], times["ends"])],
           "tokens_per_s_source": "time between on_step_end callbacks (data loading, forward, backward, optimizer, "
                                  f"logging) and the real tokens counted in {BaseTrainer.__name__}.training_step"}
    if dpo:
        res["trl_loss_type"] = str(config.loss_type)
    if len(stats["tokens"]) != steps:
        res["note"] = f"counted {len(stats['tokens'])} micro-batches for {steps} steps"
    step_tokens = [float(x) for x in stats["tokens"][:steps]]
    res.update(steady_rate(step_tokens, times["ends"], a.warmup_steps, times["begin"]),
               warmup_excluded=a.warmup_steps > 0,
               tokens_per_cpu_s=steady_rate(step_tokens, times["cpu_ends"], a.warmup_steps,
                                            times["cpu_begin"])["tokens_per_s"])
    a.child_out.write_text(json.dumps(res))


def bench_trl(a, packing: bool, precision: str, env: dict, work: Path, model_dir: Path) -> dict:
    tag = "pack" if packing else "nopack"
    out = work / f"trl-{tag}.json"
    order_note = None
    order_args: list[str] = []
    if a.objective == "dpo":  # no fallback: TRL gets ftune's pairs or the comparison means nothing
        pairs_file = work / "ftune_pairs.json"
        pairs_file.write_text(json.dumps(ftune_dpo_pairs(a, precision)))
        order_args = ["--pairs-file", str(pairs_file)]
    elif not packing and not a.random_order:
        try:
            order_file = work / "ftune_order.json"
            order_file.write_text(json.dumps(ftune_example_order(a, precision)))
            order_args = ["--order-file", str(order_file)]
        except Exception as e:  # noqa: BLE001 - ftune's internals changed: TRL draws its own batches
            order_note = f"could not rebuild ftune's example order ({type(e).__name__}: {e}); TRL used its own"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "trl", "--child-out", str(out),
           "--child-packing", "on" if packing else "off", "--model-dir", str(model_dir),
           "--examples", str(a.examples), "--steps", str(a.steps), "--warmup-steps", str(a.warmup_steps),
           "--precision", precision, "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size),
           "--objective", a.objective, "--peft", a.peft, "--lr", str(a.lr), "--child-device", a.device, *order_args]
    print(f"[bench] TRL {'DPOTrainer' if a.objective == 'dpo' else 'SFTTrainer'} "
          f"(packing={'on' if packing else 'off'})", flush=True)
    log_path = work / f"trl-{tag}.log"
    if a.trl_malloc == "reuse":  # the thresholds of ftune's trainer.cpu_malloc=reuse (ftune/training/cpu_malloc.py)
        env = dict(env, GLIBC_TUNABLES=TRL_REUSE_TUNABLES)
    proc = run_child(cmd, env, log_path, work, gpu=a.device == "cuda")
    proc.pop("progress_wall"), proc.pop("progress_cpu")
    res = {"framework": "trl", "packing": packing, **proc, "log": str(log_path)}
    if proc["exit_code"] != 0 or not out.exists():
        res["error"] = tail(log_path)
        print(f"[bench] TRL failed (exit {proc['exit_code']}):\n{res['error']}", file=sys.stderr)
        return res
    res.update(json.loads(out.read_text()))
    if order_note:
        res["note"] = order_note
    return res
