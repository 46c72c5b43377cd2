"""`objective=pso`: Pairwise Sample Optimization (Miao et al., ICLR 2025, arXiv 2410.03190), adapted to language models.

From the paper: fine-tune by increasing the relative likelihood margin between target samples and reference
samples drawn from the model itself, with a pairwise logistic loss whose log-likelihood ratios are taken against the
frozen initial model; offline-sampled and online-sampled variants.

The language-model adaptation (ftune's, not the paper's, which works on diffusion denoising steps):
- the target sample is the gold response y* of an SFT example, the reference sample y_ref is the model's own answer;
- loss `−log σ(β[(lp_θ(y*) − lp_0(y*)) − (lp_θ(y_ref) − lp_0(y_ref))])` on sequence-level summed token log-probs
  (the paper sums per denoising step), with π_0 the frozen initial model: DPO with self-generated rejected answers;
- `mode=offline` samples y_ref once from π_0 before training (cached on disk; deterministic under the seed);
  `mode=online` re-samples y_ref from the current policy for the step's examples every `resample_every` steps;
- pairs whose sample equals the gold response are skipped (offline) or carry no gradient (online), and counted;
  with `judge=numeric_match`, samples whose final answer already matches the gold one are skipped too;
- β is an LM-scale value (0.1 by default), not the paper's diffusion β = 50.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import torch

from ftune.atomic import write_json_atomic
from ftune.config import ConfigError
from ftune.data.pipeline import PreparedData
from ftune.data.tokenize import IGNORE
from ftune.eval import gsm8k
from ftune.objectives.dpo import DPO, collate_pairs
from ftune.objectives.sampling import cache_key, generate_from
from ftune.paths import ftune_home
from ftune.training import distributed as dist

log = logging.getLogger(__name__)
JUDGES = (None, "numeric_match")


def split_row(row: dict) -> tuple[list[int], list[int]]:
    """An SFT row -> (prompt ids, response ids)."""
    first = next(i for i, x in enumerate(row["labels"]) if x != IGNORE)
    return row["input_ids"][:first], row["input_ids"][first:]


def make_pair(row: dict, sample: list[int], eos_id: int) -> dict:
    """Chosen = the gold response, rejected = the model's sample, both after the same prompt.

    The sample keeps the tokens the model produced; when it ended with EOS, the template's trailing tokens after
    the gold response's EOS (e.g. ChatML's newline) are appended so both sides end alike.
    """
    prompt, gold = split_row(row)
    tail = gold[gold.index(eos_id) + 1:] if eos_id in gold else []
    rejected = sample + (tail if sample and sample[-1] == eos_id else [])
    return {"id": row["id"], "chosen_input_ids": row["input_ids"], "chosen_labels": row["labels"],
            "rejected_input_ids": prompt + rejected, "rejected_labels": [IGNORE] * len(prompt) + rejected,
            "sft_row": row}


class PSO:
    """Pairwise Sample Optimization on SFT data (see the module docstring for what is the paper's).

    Args:
        mode: offline (samples from the initial model, once) | online (from the current policy).
        beta: β of the logistic margin.
        resample_every: online mode: re-sample the step's examples every this many steps.
        max_new_tokens: length cap of a sample.
        temperature: 0 = greedy samples; > 0 samples with this temperature (seeded).
        judge: null | numeric_match: skip samples whose final answer already equals the gold one (offline mode;
            online pairs keep every fresh sample).
        precompute_ref: reference log-probs computed once (offline mode only).
        gen_batch_size: prompts per generation batch.
    """

    can_pack = False
    data_kind = "sft"

    def __init__(self, mode: str = "offline", beta: float = 0.1, resample_every: int = 1, max_new_tokens: int = 256,
                 temperature: float = 0.0, judge: str | None = None, precompute_ref: bool = False,
                 gen_batch_size: int = 16):
        if mode not in ("offline", "online"):
            raise ConfigError(f"objective.mode={mode!r} must be offline or online.")
        if judge not in JUDGES:
            raise ConfigError(f"objective.judge={judge!r} must be null or numeric_match.")
        if resample_every < 1 or max_new_tokens < 1 or gen_batch_size < 1:
            raise ConfigError("objective.resample_every, max_new_tokens and gen_batch_size must be >= 1.")
        if precompute_ref and mode == "online":
            raise ConfigError("objective.precompute_ref=true needs fixed pairs; online PSO re-samples them. Use "
                              "mode=offline, or precompute_ref=false.")
        self.mode, self.resample_every, self.max_new_tokens = mode, resample_every, max_new_tokens
        self.temperature, self.judge, self.gen_batch_size = temperature, judge, gen_batch_size
        self.dpo = DPO(loss="sigmoid", beta=beta, precompute_ref=precompute_ref)
        self.stats = {"pairs": 0, "skipped_identical": 0, "skipped_judged_correct": 0}

    collate = staticmethod(collate_pairs)

    def normalizer(self, batch: dict[str, torch.Tensor]) -> int:
        return self.dpo.normalizer(batch)

    def needs_frozen_copy(self, model) -> bool:
        return self.dpo.needs_frozen_copy(model)

    def _sample(self, run, rows: list[dict], progress: bool, share: bool = False) -> list[list[int]]:
        return generate_from(run, [split_row(r)[0] for r in rows], self.max_new_tokens, self.gen_batch_size,
                             self.temperature, progress, share)

    def _cached_samples(self, run, rows: list[dict], what: str) -> list[list[int]]:
        key = cache_key(run.cfg.model.name_or_path, run.cfg.seed, self.temperature, self.max_new_tokens,
                        [[r["id"], r["input_ids"]] for r in rows])
        path = ftune_home() / "pso_samples" / f"{key}.json"
        # Every rank takes the same branch (they sample together: in step under FSDP2 / ZeRO-3, a share each under
        # data parallelism): the cache is used only if every machine's FTUNE_HOME has it.
        if dist.agreed(run.acc, [path.exists()])[0]:
            log.info("PSO: reusing %d cached %s samples from %s", len(rows), what, path)
            return json.loads(path.read_text())
        # Seeded in a forked RNG, so training draws the same random numbers with or without the cache.
        with torch.random.fork_rng():
            torch.manual_seed(run.cfg.seed)
            samples = self._sample(run, rows, progress=run.cfg.trainer.progress, share=True)
        write_json_atomic(path, samples)
        return samples

    def _keep(self, row: dict, sample: list[int], tokenizer) -> str | None:
        """Why this pair carries no signal (None if it does)."""
        eos = tokenizer.eos_token_id
        gold = split_row(row)[1]
        if sample == (gold[: gold.index(eos) + 1] if eos in gold else gold):
            return "skipped_identical"
        if self.judge == "numeric_match":
            text = tokenizer.decode(sample, skip_special_tokens=True)
            gold_text = tokenizer.decode(gold, skip_special_tokens=True)
            if gsm8k.score(text, gold_text):
                return "skipped_judged_correct"
        return None

    def _pairs(self, run, rows: list[dict], what: str) -> list[dict]:
        samples = self._cached_samples(run, rows, what)
        pairs = []
        for row, sample in zip(rows, samples):
            reason = self._keep(row, sample, run.tokenizer)
            if reason:
                self.stats[reason] += 1
            else:
                pairs.append(make_pair(row, sample, run.tokenizer.eos_token_id))
        self.stats["pairs"] += len(pairs) if what == "train" else 0
        return pairs

    def _sampled_per_step(self) -> bool:
        """Online, re-sampling every step and judging nothing: each row gets its sample right before it is used, so
        samples drawn up front for the training rows would be thrown away unread."""
        return self.mode == "online" and self.resample_every == 1 and self.judge is None

    def setup(self, run) -> PreparedData:
        """Sample reference answers from the initial model and turn every SFT row into a (gold, sample) pair: the
        pairs are the data."""
        if self._sampled_per_step():  # placeholder rejected side (the gold: zero gradient); before_step replaces it
            eos = run.tokenizer.eos_token_id
            train = [make_pair(r, split_row(r)[1], eos) for r in run.data.train]
            self.stats["pairs"] = len(train)
        else:
            train = self._pairs(run, run.data.train, "train")
        held_out = self._pairs(run, run.data.eval, "eval") if run.data.eval else []
        log.info("PSO pairs: %s", self.stats)
        if not train:
            raise ConfigError("PSO: every sample equals its gold answer (or was judged correct): no pairs to train on. "
                              "Use objective.temperature > 0, or turn off objective.judge.")
        data = replace(run.data, train=train, eval=held_out, stats={**run.data.stats, "pso": dict(self.stats)})
        self.dpo.setup(replace(run, data=data))
        return data

    def before_step(self, run, rows: list[list[dict]]) -> None:
        """Online mode: replace the rejected side of this step's pairs with fresh samples of the current policy."""
        if self.mode != "online" or run.step % self.resample_every:
            return
        flat = [r for micro in rows for r in micro]
        samples = self._sample(run, [r["sft_row"] for r in flat], progress=False)
        for r, sample in zip(flat, samples):
            if self._keep(r["sft_row"], sample, run.tokenizer) == "skipped_identical":
                self.stats["skipped_identical"] += 1  # identical sides: zero gradient, kept for a fixed batch size
            r.update({k: v for k, v in make_pair(r["sft_row"], sample, run.tokenizer.eos_token_id).items()
                      if k.startswith("rejected")})

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.dpo(model, batch)
