"""`objective=verified_dpo`: DPO on pairs the verifier builds from the model's own samples, a correct answer over an
incorrect one (the pair construction of Iterative Reasoning Preference Optimization, Pang et al., NeurIPS 2024,
arXiv 2404.19733, and of RFT-style self-training; one iteration here).

Before training, the initial model answers every training prompt `samples` times (temperature `temperature`,
seeded); each answer is scored by the judge (`verifier`: reasoning-gym's `score_answer` in the data's answer format;
`numeric_match` for GSM8K-style data). A prompt with at least one correct and one incorrect answer gives one pair,
chosen = its first correct answer, rejected = its first incorrect one; prompts whose answers are all right or all
wrong give none, and are counted (`verified_pairs` in the run's data stats). Then the DPO-family loss of
`objective.loss` (ftune/objectives/preference.py: DPO, cDPO, IPO, SimPO, ORPO) on the pairs, with the adapter-
disabled base model as the reference.

`shots` > 0 puts that many solved examples of the same task (other training rows, fixed per prompt) before the
question while sampling, so that a base model that does not yet answer in the task's format can produce answers the
verifier accepts (STaR and IRPO sample with few-shot or instruction prompts); the pairs are then trained after the
plain 0-shot prompt, as the model is evaluated. Samples are cached on disk by model, settings and rows.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import replace

import torch

from ftune.atomic import write_json_atomic
from ftune.config import ConfigError
from ftune.data.pipeline import PreparedData
from ftune.data.tokenize import IGNORE, prompt_ids
from ftune.objectives.dpo import DPO, collate_pairs
from ftune.objectives.pso import split_row
from ftune.objectives.sampling import cache_key, generate_from
from ftune.paths import ftune_home
from ftune.training import distributed as dist

log = logging.getLogger(__name__)
JUDGES = ("verifier", "numeric_match")


def pair_from(row: dict, chosen: list[int], rejected: list[int], eos_id: int) -> dict:
    """Both answers after the row's own (0-shot) prompt; an answer that ended with EOS gets the template's trailing
    tokens after the gold response's EOS (e.g. ChatML's newline), as the gold response has them."""
    prompt, gold = split_row(row)
    tail = gold[gold.index(eos_id) + 1:] if eos_id in gold else []

    def side(ids: list[int]) -> list[int]:
        return ids + (tail if ids and ids[-1] == eos_id else [])

    c, r = side(chosen), side(rejected)
    return {"id": row["id"], "chosen_input_ids": prompt + c, "chosen_labels": [IGNORE] * len(prompt) + c,
            "rejected_input_ids": prompt + r, "rejected_labels": [IGNORE] * len(prompt) + r}


def build_pairs(rows: list[dict], samples: list[list[list[int]]], correct: list[list[bool]], eos_id: int
                ) -> tuple[list[dict], dict]:
    """One pair per row with a correct and an incorrect sample (the first of each); counts of what was dropped."""
    pairs, stats = [], {"prompts": len(rows), "pairs": 0, "all_correct": 0, "all_wrong": 0}
    for row, outs, ok in zip(rows, samples, correct):
        good = [o for o, c in zip(outs, ok) if c]
        bad = [o for o, c in zip(outs, ok) if not c]
        if good and bad:
            pairs.append(pair_from(row, good[0], bad[0], eos_id))
        else:
            stats["all_correct" if good else "all_wrong"] += 1
    stats["pairs"] = len(pairs)
    return pairs, stats


class VerifiedDPO:
    """DPO-family loss on verifier-built pairs of the model's own answers (see the module docstring).

    Args:
        loss, beta, label_smoothing, simpo_gamma, orpo_lambda: as objective=dpo (beta null = the loss's paper value).
        samples: answers per prompt (>= 2).
        temperature: sampling temperature (> 0).
        max_new_tokens: length cap of an answer.
        shots: solved examples of the same task shown before the question while sampling (0 = none).
        judge: verifier (reasoning-gym, data=reasoning_gym) | numeric_match (final numbers, GSM8K-style).
        gen_batch_size: prompts per generation batch.
    """

    can_pack = False
    data_kind = "sft"

    def __init__(self, loss: str = "sigmoid", beta: float | None = None, label_smoothing: float = 0.0,
                 simpo_gamma: float = 1.0, orpo_lambda: float = 0.1, samples: int = 4, temperature: float = 1.0,
                 max_new_tokens: int = 256, shots: int = 0, judge: str = "verifier", gen_batch_size: int = 16):
        if samples < 2:
            raise ConfigError(f"objective.samples={samples} must be >= 2: a pair needs a correct and an incorrect "
                              f"answer to the same prompt.")
        if temperature <= 0:
            raise ConfigError(f"objective.temperature={temperature} must be > 0: greedy answers to one prompt are all "
                              f"the same, so no pair could be built.")
        if judge not in JUDGES:
            raise ConfigError(f"objective.judge={judge!r} must be verifier (data=reasoning_gym) or numeric_match.")
        if shots < 0 or max_new_tokens < 1 or gen_batch_size < 1:
            raise ConfigError("objective.shots must be >= 0, max_new_tokens and gen_batch_size >= 1.")
        self.samples, self.temperature, self.max_new_tokens = samples, temperature, max_new_tokens
        self.shots, self.judge, self.gen_batch_size = shots, judge, gen_batch_size
        self.dpo = DPO(loss=loss, beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
                       orpo_lambda=orpo_lambda)
        self.stats: dict = {}

    collate = staticmethod(collate_pairs)

    @staticmethod
    def check_config(cfg) -> None:
        judge = cfg.objective.get("judge", "verifier")
        if judge == "verifier" and cfg.data.source != "reasoning_gym":
            raise ConfigError(f"objective=verified_dpo with judge=verifier scores answers with reasoning-gym's "
                              f"verifiers and needs data=reasoning_gym (data.source is {cfg.data.source}). Use "
                              f"objective.judge=numeric_match for GSM8K-style data.")

    def normalizer(self, batch: dict[str, torch.Tensor]) -> int:
        return self.dpo.normalizer(batch)

    def needs_frozen_copy(self, model) -> bool:
        return self.dpo.needs_frozen_copy(model)

    def _judge(self, run):
        from ftune.eval import judges

        return judges.Verifier(run.cfg.data, run.cfg.seed) if self.judge == "verifier" else \
            judges.NumericMatch()

    def _prompts(self, run, rows: list[dict], examples: dict[str, dict]) -> list[list[int]]:
        """The sampling prompt of each row: 0-shot (its own prompt ids), or `shots` solved examples of its task
        first."""
        if not self.shots:
            return [split_row(r)[0] for r in rows]
        by_task: dict[str, list[dict]] = {}
        for ex in examples.values():
            by_task.setdefault(str(ex.get("task", "all")), []).append(ex)
        rng = random.Random(run.cfg.seed)
        out = []
        for r in rows:
            ex = examples[str(r["id"])]
            others = [o for o in by_task[str(ex.get("task", "all"))] if o["id"] != ex["id"]]
            demos = rng.sample(others, min(self.shots, len(others)))
            system = [m for m in ex["messages"][:1] if m["role"] == "system"]
            turns = [m for d in demos for m in d["messages"] if m["role"] != "system"]
            out.append(prompt_ids(run.tokenizer, [*system, *turns, *[m for m in ex["messages"][:-1]
                                                                        if m["role"] != "system"]]))
        return out

    def _sampled(self, run, rows: list[dict], examples: dict[str, dict], what: str) -> list[list[list[int]]]:
        prompts = self._prompts(run, rows, examples)
        key = cache_key("verified_dpo/1", run.cfg.model.name_or_path, run.cfg.seed, self.samples,
                        self.temperature, self.max_new_tokens, prompts, [r["id"] for r in rows])
        path = ftune_home() / "verified_dpo_samples" / f"{key}.json"
        if dist.agreed(run.acc, [path.exists()])[0]:
            log.info("verified_dpo: reusing %d cached %s samples from %s", len(rows), what, path)
            return json.loads(path.read_text())
        with torch.random.fork_rng():  # seeded apart from training's random numbers
            torch.manual_seed(run.cfg.seed)
            flat = generate_from(run, [p for p in prompts for _ in range(self.samples)], self.max_new_tokens,
                                 self.gen_batch_size, self.temperature, run.cfg.trainer.progress, share=True)
        out = [flat[i * self.samples:(i + 1) * self.samples] for i in range(len(rows))]
        write_json_atomic(path, out)
        return out

    def _pairs(self, run, rows: list[dict], examples: dict[str, dict], judge, what: str) -> list[dict]:
        samples = self._sampled(run, rows, examples, what)
        tok = run.tokenizer
        items = [{"id": str(r["id"]), "gold": tok.decode(split_row(r)[1], skip_special_tokens=True),
                  "answer": tok.decode(s, skip_special_tokens=True)} for r, outs in zip(rows, samples) for s in outs]
        flat = judge(items)
        correct = [flat[i * self.samples:(i + 1) * self.samples] for i in range(len(rows))]
        pairs, stats = build_pairs(rows, samples, correct, tok.eos_token_id)
        stats["sample_accuracy"] = sum(flat) / max(1, len(flat))
        self.stats[what] = stats
        return pairs

    def setup(self, run) -> PreparedData:
        """Sample, judge and pair before training (the pairs are the data); then the DPO reference."""
        from ftune.data.sources import load_conversations

        examples = {str(ex["id"]): ex for ex in load_conversations(run.cfg.data, run.cfg.data.split,
                                                                   run.cfg.seed)[0]}
        judge = self._judge(run)
        train = self._pairs(run, run.data.train, examples, judge, "train")
        held_out = self._pairs(run, run.data.eval, examples, judge, "eval") if run.data.eval else []
        log.info("verified_dpo pairs: %s", self.stats)
        if not train:
            s = self.stats["train"]
            raise ConfigError(f"verified_dpo: no prompt had both a correct and an incorrect answer among its "
                              f"{self.samples} samples ({s['all_correct']} all correct, {s['all_wrong']} all wrong). "
                              f"Raise objective.samples or objective.temperature, or give objective.shots=N solved "
                              f"examples so that the model answers in the task's format.")
        data = replace(run.data, train=train, eval=held_out,
                       stats={**run.data.stats, "verified_pairs": dict(self.stats)})
        self.dpo.setup(replace(run, data=data))
        return data

    def before_step(self, run, rows: list[list[dict]]) -> None:
        """Offline pairs: nothing to refresh."""

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.dpo(model, batch)
