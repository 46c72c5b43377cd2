"""`objective=grpo`: online RL from verifiable rewards, the GRPO family (GRPO, Dr. GRPO, DAPO, GSPO; the maths in
ftune/objectives/grpo_loss.py, the rewards in ftune/objectives/rewards.py, the specs in shared/METHODS.md §16).

Each optimizer step (every `num_iterations` steps, mu):
1. the step's training prompts (trainer.batch_size per micro-batch per process) each get `num_generations` (G)
   completions from the current policy, batched with a KV cache (ftune/eval/generation.py), sampled with
   `temperature` / `top_p` / `top_k` from a generator seeded by (seed, step, process): the same seed gives the same
   completions, and a resumed run draws what the uninterrupted one would have;
2. every reward function scores every completion; the completion's reward is their weighted sum; its advantage is
   its reward minus its group's mean, divided by the group's std (`scale_rewards=group`, GRPO), the step's std
   (`batch`) or nothing (`none`, Dr. GRPO);
3. with mu > 1 the completions' log-probs under the policy that sampled them are stored (`old_logp`, saved with a
   checkpoint) and the same completions serve mu optimizer steps; with mu = 1 they equal the current ones
   (ratio 1, the plain policy gradient with a group baseline), so no extra forward runs;
4. the loss is the clipped importance-weighted advantage per completion token (clip-higher: `epsilon` below,
   `epsilon_high` above; per token, or per completion with `importance_sampling_level=sequence`, GSPO), plus `beta`
   x the k3 KL to the reference (the model with its adapter disabled; a frozen copy under full fine-tuning; no
   reference forward at all when beta = 0), normalised as `loss_type` says (grpo | bnpo | dr_grpo | dapo).

trainer.batch_size counts prompts: a micro-batch holds batch_size x G completions (TRL's per_device_train_batch_size
counts completions). Logged every step (metrics.jsonl, TensorBoard; this process's completions): each reward
function's mean and std, the reward's, the share of groups whose rewards are all equal (they carry no gradient;
warned about when most are), KL, clipped shares, completion lengths, entropy, generation and training seconds;
`completions.jsonl` in the run directory holds prompts, completions, rewards and advantages every
`log_completions_every` steps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ftune.config import ConfigError
from ftune.data.batching import collate_packed
from ftune.data.tokenize import IGNORE
from ftune.objectives import grpo_loss
from ftune.objectives import rewards as rw
from ftune.objectives.dpo import frozen_copy, reference_model
from ftune.objectives.linear_ce import linear_cross_entropy
from ftune.objectives.pso import split_row
from ftune.objectives.sampling import generate_from
from ftune.objectives.sft import _chunked_ce, _fused_inputs, labelled_logits
from ftune.peft.base import can_disable_adapter

log = logging.getLogger(__name__)
WARN_EVERY = 10     # steps between two warnings that most groups carry no gradient
ENTROPY_CHUNK = 128  # positions per chunk of the no-grad entropy pass (SmolLM2's head: 128 x 49,152 logits)


def _entropy(project, x: torch.Tensor) -> torch.Tensor:
    """Per-position entropy (nats) of the softmax of `project(x)`, chunk by chunk, without gradients."""
    out = []
    with torch.no_grad():
        for s in range(0, x.shape[0], ENTROPY_CHUNK):
            logits = project(x[s: s + ENTROPY_CHUNK]).float()
            logp = logits.log_softmax(-1)
            out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out) if out else x.new_zeros(0, dtype=torch.float32)


def to_padded(values: torch.Tensor, seq: torch.Tensor, n_seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat per-token values with their sequence index -> ([S, L] values, [S, L] mask), tokens in order. The flat
    tokens of one sequence are contiguous and in order (a sequence lies in one packed row, read row-major)."""
    n = values.shape[0]
    counts = torch.bincount(seq, minlength=n_seq)
    arange = torch.arange(n, device=values.device)
    first = torch.full((n_seq,), n, device=values.device, dtype=torch.long).scatter_reduce(0, seq, arange, "amin")
    pos = arange - first[seq]
    width = int(counts.max()) if n else 0
    padded = values.new_zeros(n_seq, width)
    mask = torch.zeros(n_seq, width, dtype=torch.bool, device=values.device)
    padded = padded.index_put((seq, pos), values)
    mask[seq, pos] = True
    return padded, mask


def token_logps(model, batch: dict[str, torch.Tensor], entropy: bool = False):
    """Log-probs of each completion's tokens [S, L], its mask [S, L], and (with `entropy`) the policy's entropy at
    each of those positions [S, L] (no gradient). The head runs fused with the loss where it can
    (ftune/objectives/linear_ce.py), so no (N, V) logits are kept for the backward."""
    fused = _fused_inputs(model, batch)
    if fused is not None:
        hidden, head, targets, rows, cols = fused
        ce = linear_cross_entropy(hidden, head.weight, head.bias, targets)
        ent = _entropy(lambda h: F.linear(h, head.weight, head.bias), hidden.detach()) if entropy else None
    else:
        logits, targets, rows, cols = labelled_logits(model, batch)
        ce = _chunked_ce(logits, targets, None, "none")
        ent = _entropy(lambda x: x, logits.detach()) if entropy else None
    seq = batch["seq_ids"][rows, cols]
    n_seq = int(batch["advantages"].shape[0])
    logp, mask = to_padded(-ce, seq, n_seq)
    return logp, mask, (to_padded(ent, seq, n_seq)[0] if ent is not None else None)


def trained_rows(rows: list[dict]) -> list[dict]:
    """The completions of a micro-batch that run forward and backward: all but those marked `skip` (advantage 0 with
    beta 0, whose loss and gradient are exactly 0), and at least one (every process runs a backward)."""
    return [r for r in rows if not r.get("skip")] or rows[:1]


def collate_completions(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Completion rows (prompt + completion, completion labelled) packed several to a row, with each completion's
    advantage, whether it counts (mask_truncated_completions), and its stored old log-probs when it has them. Rows
    marked `skip` are left out of the tensors but still counted (`count_rows`, `count_tokens`: the completions and
    completion tokens of the whole micro-batch), so each loss_type normalises as if they had run."""
    n_rows = len(rows)
    n_tokens = sum(sum(t != IGNORE for t in r["labels"][1:]) for r in rows if r.get("weight", 1.0) > 0)
    rows = trained_rows(rows)
    batch = collate_packed(rows, pad_id)
    batch["advantages"] = torch.tensor([r["advantage"] for r in rows], dtype=torch.float32)
    batch["weight"] = torch.tensor([r.get("weight", 1.0) for r in rows], dtype=torch.float32)
    batch["count_rows"] = torch.tensor(float(n_rows))
    batch["count_tokens"] = torch.tensor(float(n_tokens))
    if all("old_logp" in r for r in rows):
        width = max(len(r["old_logp"]) for r in rows)
        batch["old_logp"] = torch.tensor([r["old_logp"] + [0.0] * (width - len(r["old_logp"])) for r in rows])
    return batch


def seed_for(seed: int, step: int, rank: int) -> int:
    """The sampling seed of a generation step on a process (independent of how the run got there)."""
    return int(hashlib.sha256(f"grpo/{seed}/{step}/{rank}".encode()).hexdigest()[:15], 16)


class GRPO:
    """The GRPO family on SFT-style data: the prompts are used, the reference responses only by rewards that read
    them (see the module docstring).

    Args:
        num_generations: G, completions per prompt (>= 2: the group is the baseline).
        rewards: weighted reward functions, [{name: verifier | format | length, weight: w}, {_target_: mod.fn}]
            (ftune/objectives/rewards.py).
        temperature, top_p, top_k: sampling (top_k 0 = no cut).
        max_new_tokens: the completion length cap (TRL's max_completion_length).
        scale_rewards: group | batch | none.
        loss_type: grpo | bnpo | dr_grpo | dapo.
        epsilon: the lower clip range; epsilon_high the upper one (null: 0.28 with loss_type=dapo, DAPO's
            clip-higher, else epsilon).
        beta: weight of the k3 KL to the reference (0: no reference forward).
        num_iterations: mu, optimizer steps per generation batch.
        importance_sampling_level: token | sequence (GSPO).
        mask_truncated_completions: completions that hit max_new_tokens without EOS add no loss (DAPO's overlong
            filtering).
        gen_batch_size: completions per generation batch.
        log_completions_every: steps between records in completions.jsonl (0: never).
        log_entropy: compute the policy's entropy on completion tokens (one extra no-grad pass over the head), over
            the completions that train.
        skip_zero_advantage: with beta 0, completions whose advantage is 0 (every one of a group whose rewards are
            all equal) run no forward or backward: their loss and gradient are exactly 0, and they still count in
            each loss_type's normalisation, so the update is the same, for less compute.
    """

    can_pack = False
    data_kind = "sft"

    def __init__(self, num_generations: int = 8, rewards: list | None = None, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 256, scale_rewards: str = "group",
                 loss_type: str = "dapo", epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
                 num_iterations: int = 1, importance_sampling_level: str = "token",
                 mask_truncated_completions: bool = False, gen_batch_size: int = 64, log_completions_every: int = 10,
                 log_entropy: bool = True, skip_zero_advantage: bool = True):
        if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 2:
            raise ConfigError(f"objective.num_generations={num_generations!r} must be an integer >= 2: GRPO's "
                              f"baseline is the mean reward of a prompt's completions.")
        for key, value, allowed in (("scale_rewards", scale_rewards, grpo_loss.SCALE_REWARDS),
                                    ("loss_type", loss_type, grpo_loss.LOSS_TYPES),
                                    ("importance_sampling_level", importance_sampling_level, grpo_loss.IS_LEVELS)):
            if value not in allowed:
                raise ConfigError(f"objective.{key}={value!r} must be one of {', '.join(allowed)}.")
        if temperature <= 0:
            raise ConfigError(f"objective.temperature={temperature} must be > 0: greedy completions of one prompt are "
                              f"all the same, so every advantage would be 0.")
        if not 0 < top_p <= 1 or top_k < 0:
            raise ConfigError(f"objective.top_p={top_p} must be in (0, 1] and top_k={top_k} >= 0.")
        if max_new_tokens < 1 or gen_batch_size < 1 or num_iterations < 1 or log_completions_every < 0:
            raise ConfigError("objective.max_new_tokens, gen_batch_size and num_iterations must be >= 1, "
                              "log_completions_every >= 0.")
        high = epsilon_high if epsilon_high is not None else (0.28 if loss_type == "dapo" else epsilon)
        if not (0 <= epsilon < 1 and high >= 0):
            raise ConfigError(f"objective.epsilon={epsilon} must be in [0, 1), epsilon_high={high} >= 0.")
        if beta < 0:
            raise ConfigError(f"objective.beta={beta} must be >= 0.")
        self.G, self.temperature, self.top_p, self.top_k = num_generations, temperature, top_p, top_k
        self.max_new_tokens, self.scale, self.loss_type = max_new_tokens, scale_rewards, loss_type
        self.eps, self.eps_high, self.beta, self.mu = epsilon, high, beta, num_iterations
        self.level, self.mask_truncated = importance_sampling_level, mask_truncated_completions
        self.gen_batch_size, self.log_every, self.log_entropy = gen_batch_size, log_completions_every, log_entropy
        self.skip_zero = skip_zero_advantage
        self.rewards_entries = rw.parse(rewards if rewards is not None else [{"name": "verifier"}])
        self.reward_fns: list[rw.Reward] = []
        self.adapter, self.ref_model = False, None
        self.buffer: list[list[dict]] | None = None
        self.step_stats: dict = {}
        self.train_stats: dict = {}
        self.totals = {"generated_completions": 0, "generated_tokens": 0, "generation_seconds": 0.0}
        self.samples_path: Path | None = None
        self.zero_steps: list[bool] = []
        self.warned_at = -WARN_EVERY

    collate = staticmethod(collate_completions)

    @staticmethod
    def check_config(cfg) -> None:
        o = cfg.objective
        rw.check_source(rw.parse(o.get("rewards") or [{"name": "verifier"}]), cfg.data.source)

    def needs_frozen_copy(self, model) -> bool:
        return self.beta > 0 and not can_disable_adapter(model)

    # --------------------------------------------------------------------------------------------------- setup
    def setup(self, run):
        """Build the rewards and try each on a training example (a reward that fails does so before training), pick
        the reference, and drop the held-out rows (GRPO has no held-out loss: score it with eval=... instead)."""
        self.reward_fns = rw.build(self.rewards_entries, run.cfg.data, run.cfg.seed, self.max_new_tokens)
        first = run.data.train[0]
        self._score(run, [first], [split_row(first)[1]])
        unwrapped = run.acc.unwrap_model(run.model)
        if self.beta > 0:
            self.adapter = can_disable_adapter(unwrapped)
            if not self.adapter:
                log.info("GRPO with beta > 0 under full fine-tuning: keeping a frozen copy of the initial model.")
                self.ref_model = frozen_copy(unwrapped)
        if run.is_main and self.log_every:
            self.samples_path = Path(run.cfg.output_dir) / "completions.jsonl"
        log.info("GRPO: G=%d, loss_type=%s, scale_rewards=%s, epsilon=%g/%g, beta=%g, mu=%d, rewards: %s", self.G,
                 self.loss_type, self.scale, self.eps, self.eps_high, self.beta, self.mu,
                 ", ".join(f"{r.name} x {r.weight:g}" for r in self.reward_fns))
        return replace(run.data, eval=[])

    # --------------------------------------------------------------------------------------------- generation
    def _score(self, run, rows: list[dict], completions: list[list[int]]):
        """Per-function scores [N, F], the weighted reward [N], the texts and whether each hit max_new_tokens, of
        completions whose prompts are `rows`' (each row's completions consecutive). Prompts and reference answers are
        decoded once per row."""
        tok = run.tokenizer
        per = len(completions) // len(rows)
        parts = [split_row(r) for r in rows]
        prompt_texts = [t for t in tok.batch_decode([p for p, _ in parts], skip_special_tokens=True)
                        for _ in range(per)]
        golds = [t for t in tok.batch_decode([g for _, g in parts], skip_special_tokens=True) for _ in range(per)]
        texts = tok.batch_decode(completions, skip_special_tokens=True)
        truncated = [self._truncated(c, tok.eos_token_id) for c in completions]
        columns = {"ids": [str(r["id"]) for r in rows for _ in range(per)], "golds": golds,
                   "completion_ids": completions, "truncated": truncated}
        scores = torch.tensor([rw.score(r, prompt_texts, texts, **columns) for r in self.reward_fns]).T
        weights = torch.tensor([r.weight for r in self.reward_fns])
        return scores, (scores * weights).sum(-1), texts, truncated

    def _truncated(self, completion: list[int], eos: int) -> bool:
        return eos not in completion and len(completion) >= self.max_new_tokens

    def _generate(self, run, rows: list[list[dict]]) -> list[list[dict]]:
        G = self.G
        flat = [r for micro in rows for r in micro]
        prompts = [split_row(r)[0] for r in flat]
        tic = time.perf_counter()
        with torch.random.fork_rng(devices=[] if run.acc.device.type == "cpu" else [run.acc.device]):
            torch.manual_seed(seed_for(run.cfg.seed, run.step, run.acc.process_index))
            completions = generate_from(run, prompts, self.max_new_tokens, self.gen_batch_size, self.temperature,
                                        top_p=self.top_p, top_k=self.top_k, group=G)
        gen_s = time.perf_counter() - tic
        scores, reward, texts, truncated = self._score(run, flat, completions)
        adv = grpo_loss.advantages(reward, G, self.scale)
        out, k = [], 0
        for micro in rows:
            part = []
            for r in micro:
                prompt = prompts[k // G]
                for _ in range(G):
                    c = completions[k]
                    part.append({"id": r["id"], "input_ids": prompt + c, "labels": [IGNORE] * len(prompt) + c,
                                 "advantage": float(adv[k]),
                                 "weight": 0.0 if (self.mask_truncated and truncated[k]) else 1.0,
                                 "skip": self.skip_zero and self.beta == 0 and float(adv[k]) == 0.0})
                    k += 1
            out.append(part)
        if self.mu > 1:
            self._store_old_logps(run, out)
        self._record(run, flat, completions, texts, scores, reward, adv, truncated, gen_s)
        return out

    @torch.no_grad()
    def _store_old_logps(self, run, micro_rows: list[list[dict]]) -> None:
        """Log-probs of the completions under the policy that sampled them (in the mode training runs in), kept
        per row for the mu steps that reuse them."""
        pad = run.tokenizer.pad_token_id
        for part in micro_rows:
            part = trained_rows(part)
            batch = {k: v.to(run.acc.device) for k, v in collate_completions(part, pad).items()}
            with run.acc.autocast():
                logp, mask, _ = token_logps(run.model, batch)
            for i, r in enumerate(part):
                r["old_logp"] = logp[i][mask[i]].float().tolist()

    def _record(self, run, rows, completions, texts, scores, reward, adv, truncated, gen_s) -> None:
        G = self.G
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)
        groups = reward.view(-1, G)
        zero = float((groups.std(dim=1) == 0).float().mean()) if groups.numel() else 0.0
        stats = {"reward": float(reward.mean()), "reward_std": float(groups.std(dim=1).mean()),
                 "frac_reward_zero_std": zero, "completions/mean_length": float(lengths.mean()),
                 "completions/max_length": float(lengths.max()), "completions/min_length": float(lengths.min()),
                 "completions/truncated": float(sum(truncated)) / len(truncated), "generation_s": gen_s,
                 "generated_tokens_per_s": float(lengths.sum()) / max(gen_s, 1e-9)}
        for f, r in enumerate(self.reward_fns):
            col = scores[:, f]
            stats[f"rewards/{r.name}/mean"] = float(col.mean())
            stats[f"rewards/{r.name}/std"] = float(col.std()) if col.numel() > 1 else 0.0
        self.step_stats = stats
        self.totals["generated_completions"] += len(completions)
        self.totals["generated_tokens"] += int(lengths.sum())
        self.totals["generation_seconds"] += gen_s
        self.zero_steps.append(zero > 0.5)
        if zero > 0.5 and run.step >= self.warned_at + WARN_EVERY:  # said again at most every WARN_EVERY steps
            self.warned_at = run.step
            recent = self.zero_steps[-WARN_EVERY:]
            log.warning("step %d: %.0f%% of groups have equal rewards for all %d completions and give no gradient "
                        "(all right or all wrong; most groups were so in %d of the last %d steps). Make the task "
                        "harder or easier, raise objective.num_generations, objective.temperature or "
                        "trainer.batch_size, or add a partial-credit reward.", run.step + 1, 100 * zero, G,
                        sum(recent), len(recent))
        if self.samples_path is not None and run.step % self.log_every == 0:
            with open(self.samples_path, "a") as f:
                for p, r in enumerate(rows):
                    sl = slice(p * G, (p + 1) * G)
                    f.write(json.dumps({
                        "step": run.step + 1, "id": r["id"],
                        "prompt": run.tokenizer.decode(split_row(r)[0], skip_special_tokens=True),
                        "completions": texts[sl],
                        "rewards": {fn.name: scores[sl, i].tolist() for i, fn in enumerate(self.reward_fns)},
                        "reward": reward[sl].tolist(), "advantages": adv[sl].tolist()}) + "\n")

    def before_step(self, run, rows: list[list[dict]]) -> None:
        """Every mu-th step: G fresh completions per prompt, scored; the step trains on them (the rows of each
        micro-batch are replaced by its prompts' completions). In between: the stored completions again."""
        if run.step % self.mu == 0 or self.buffer is None:
            self.buffer = self._generate(run, rows)
        else:  # the generation batch's figures again; nothing was generated
            self.step_stats = {**self.step_stats, "generation_s": 0.0, "generated_tokens_per_s": 0.0}
        for micro, part in zip(rows, self.buffer):
            micro[:] = [dict(r) for r in part]
        self.train_stats = {}
        self._train_tic = time.perf_counter()

    # -------------------------------------------------------------------------------------------------- loss
    def normalizer(self, batch: dict[str, torch.Tensor]) -> float:
        """What the step's summed loss is divided by: completion tokens (dapo: every token of the accumulated batch
        weighs the same) or completions (grpo, bnpo, dr_grpo: `__call__` returns each micro-batch's loss times its
        completions, so the step averages micro-batches as TRL averages them over gradient accumulation)."""
        # Counted by collate_completions over the whole micro-batch, skipped completions included.
        return float(batch["count_tokens"] if self.loss_type == "dapo" else batch["count_rows"])

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logp, mask, ent = token_logps(model, batch, entropy=self.log_entropy)
        mask = mask & (batch["weight"].to(mask.device)[:, None] > 0)
        old = batch["old_logp"].to(logp)[:, : logp.shape[1]] if "old_logp" in batch else logp.detach()
        ref = None
        if self.beta > 0:
            with torch.no_grad(), reference_model(model, self.adapter, self.ref_model) as ref_model:
                ref, _, _ = token_logps(ref_model, batch)
        losses, stats = grpo_loss.token_losses(logp, old, batch["advantages"].to(logp), mask, self.eps,
                                               self.eps_high, self.beta, ref, self.level)
        if self.loss_type == "bnpo":  # the micro-batch's tokens, skipped ones included
            loss = grpo_loss.aggregate(losses, mask, "dapo", batch_tokens=float(batch["count_tokens"]) or 1.0)
            weight = float(batch["count_rows"])
        else:  # grpo, dr_grpo, dapo: summed over completions or tokens, so the skipped ones (all 0) change nothing
            loss = grpo_loss.aggregate(losses, mask, self.loss_type, self.max_new_tokens)
            weight = float(mask.sum()) if self.loss_type == "dapo" else logp.shape[0]
        n = float(mask.sum())
        acc = self.train_stats
        for k, v in stats.items():
            acc[k] = acc.get(k, 0.0) + v * n
        if ent is not None:
            acc["entropy"] = acc.get("entropy", 0.0) + float((ent * mask).sum())
        acc["tokens"] = acc.get("tokens", 0.0) + n
        return loss * weight, {}

    def step_metrics(self) -> dict[str, float]:
        """This step's generation and training figures (merged into the step's record by the loop)."""
        n = max(self.train_stats.get("tokens", 0.0), 1.0)
        out = dict(self.step_stats)
        for k in ("clip_low", "clip_high", "kl", "entropy"):
            if k in self.train_stats:
                out[k if k in ("kl", "entropy") else f"clip_ratio/{k[5:]}"] = self.train_stats[k] / n
        out["train_s"] = time.perf_counter() - getattr(self, "_train_tic", time.perf_counter())
        return out

    def summary(self) -> dict:
        t = self.totals
        return {**t, "generated_tokens_per_s": t["generated_tokens"] / max(t["generation_seconds"], 1e-9)}

    # ---------------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """What a resumed run needs to continue exactly: the stored completions (with their old log-probs) while
        they still serve steps (mu > 1). Sampling itself is seeded by step, so it needs no saved generator."""
        return {"buffer": self.buffer, "stats": self.step_stats} if self.mu > 1 else {}

    def load_state_dict(self, state: dict) -> None:
        self.buffer, self.step_stats = state.get("buffer"), state.get("stats", {})
