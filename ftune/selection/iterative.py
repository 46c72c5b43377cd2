"""Iterative kMQ: Yu, Chen, Ahmadian, Fadaee, "Diversify and Conquer", arXiv 2409.11378, Algorithm 1.

Paper (and `for-ai/iterative-data-selection` `selection/iter.py`), N rounds of budget b/N each:
1. round 1 is kMQ (`ftune.selection.kmq`) with budget b/N; fine-tune the base model on the selected set;
2. the fine-tuned model answers the prompts selected in the last round (greedy); each gets
   S_i = score(x + y_gold) - score(x + y_gen): how far the model's answer falls short of the gold one;
3. per cluster s_j = mean of S_i over its examples scored this round, cluster weights w = softmax(s) (the code;
   the paper's Eq. 6 multiplies the previous weights by s_j / sum s, which needs positive scores); draw b/N ids from
   Multinomial(w), then examples uniformly from each drawn cluster among those not yet selected;
4. the union so far is the training set of the next round; after round N it is the selection.

Adaptations:
- score: the paper uses a reward model (FsfairX-LLaMA3-RM): `selection.reward=reward_model` with
  `selection.reward_model=sfairXC/FsfairX-LLaMA3-RM-v0.1` gives S_i = r(x + y_gold) - r(x + y_gen)
  (`ftune.selection.scorers.reward_margins`; recipes/paper_kmq_llama2_7b uses it). `numeric_match` (default: it
  needs no download, for math answers) scores an answer 1 when its final number matches the gold one, so
  S_i = 1 - correct_i: the clusters the model still gets wrong gain weight. `perplexity` scores a response
  by its mean token log-likelihood under
  `selection.scorer` (the base model by default, a fixed judge: the model being trained would favour its own greedy
  output), so S_i = nll(gen) - nll(gold). `module.function` is your own: items (dicts with `prompt` messages,
  `gold` and `answer` texts) -> one S_i each (e.g. a reward model's gold-minus-generated margin).
- "fine-tune" is the run's own training config (model, PEFT, precision, batch, lr) for one epoch over the cumulative
  selection (`selection.round_steps=epoch`, the paper's and the default) or a fixed number of optimizer steps
  (`round_steps=N`, quicker) with objective=sft, through the same loop as `ftune train`, once
  per round except the last (whose training is the run that follows the selection). The round runs live in a
  temporary directory and are deleted.
- A cluster with no example scored this round keeps its s_j of the round it was last scored in (the paper's
  multiplicative update also keeps an unscored cluster's standing); one never scored gets the mean of the others.
  A drawn cluster with no example left passes its draw on: the missing count is drawn again among the clusters
  that still have examples.
- One process only (the rounds train): under `--nproc N`, select first with `ftune select selection=iterative` and
  train on the subset.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ftune.config import ConfigError
from ftune.objectives.sft import SFT
from ftune.selection.common import Selection, check_budget, import_function, kept
from ftune.selection.kmq import KMQ, cluster_budgets

log = logging.getLogger(__name__)
REWARDS = ("numeric_match", "perplexity", "reward_model")


def round_budgets(budget: int, rounds: int) -> list[int]:
    """b/N per round, the remainder to the first rounds."""
    return [budget // rounds + (1 if r < budget % rounds else 0) for r in range(rounds)]


def cluster_weights(labels: torch.Tensor, k: int, scored: dict[int, float],
                    prior: list[float | None] | None = None) -> tuple[torch.Tensor, list[float | None]]:
    """softmax over clusters of s_j, the mean S_i of the cluster's examples scored this round; a cluster not scored
    this round keeps its s_j from `prior` (an earlier round), and one never scored gets the mean of the others."""
    sums, counts = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    for i, s in scored.items():
        sums[labels[i]] += s
        counts[labels[i]] += 1
    means: list[float | None] = [float(sums[j] / counts[j]) if counts[j] > 0 else (prior[j] if prior else None)
                                 for j in range(k)]
    known = [m for m in means if m is not None]
    fill = sum(known) / len(known) if known else 0.0
    s = torch.tensor([fill if m is None else m for m in means], dtype=torch.float64)
    return torch.softmax(s, 0), means


def draw_by_weight(labels: torch.Tensor, k: int, weights: torch.Tensor, m: int, taken: set[int],
                   gen: torch.Generator) -> list[int]:
    """m new examples: cluster ids ~ Multinomial(weights), then uniform inside each cluster among the not-taken;
    a draw that lands on an exhausted cluster is drawn again among the clusters with examples left."""
    free = [[i for i in (labels == j).nonzero().flatten().tolist() if i not in taken] for j in range(k)]
    for j in range(k):  # uniform order inside each cluster, fixed by the seed
        free[j] = [free[j][p] for p in torch.randperm(len(free[j]), generator=gen).tolist()]
    out: list[int] = []
    while len(out) < m:
        w = weights.clone().double()
        w[[j for j in range(k) if not free[j]]] = 0.0
        if float(w.sum()) <= 0:  # every cluster left has zero weight: draw in proportion to what is left
            w = torch.tensor([float(len(f)) for f in free], dtype=torch.float64)
            if float(w.sum()) <= 0:
                raise ValueError(f"cannot draw {m} new examples: the pool has only {len(out)} left")
        draws = torch.multinomial(w / w.sum(), m - len(out), replacement=True, generator=gen)
        for j in draws.tolist():
            if free[j]:
                out.append(free[j].pop())
    return out


class IterativeKMQ:
    """selection=iterative. Args are the keys of configs/selection/iterative.yaml (the kMQ ones as in kmq.yaml)."""

    def __init__(self, budget: int, rounds: int = 3, round_steps: int | str = "epoch", reward: str = "numeric_match",
                 reward_model: str | None = None, max_new_tokens: int = 256, gen_batch_size: int = 16,
                 k: int | None = None,
                 k_candidates: list[int] | None = None, quality: str = "perplexity", temperature: float = 1.0,
                 encoder: str = "tiny_random", scorer: str | None = None, max_length: int = 512, batch_size: int = 16,
                 n_iter: int = 100, n_redo: int = 3, progress: bool = True):
        if rounds < 1:
            raise ConfigError(f"selection.rounds={rounds} must be >= 1 (1 is plain kMQ).")
        if budget < rounds:
            raise ConfigError(f"selection.budget={budget} is less than selection.rounds={rounds}: every round "
                              f"selects budget/rounds examples. Raise the budget or lower the rounds.")
        if round_steps != "epoch" and (isinstance(round_steps, bool) or not isinstance(round_steps, int)
                                       or round_steps < 1):
            raise ConfigError(f"selection.round_steps={round_steps!r} must be epoch (one pass over the selection so "
                              f"far, the paper's) or a number of optimizer steps >= 1.")
        if reward == "reward_model" and not reward_model:
            raise ConfigError("selection.reward=reward_model needs selection.reward_model=PATH_OR_HUB_ID, a sequence-"
                              "classification reward model (the paper: sfairXC/FsfairX-LLaMA3-RM-v0.1).")
        if max_new_tokens < 1 or gen_batch_size < 1:
            raise ConfigError("selection.max_new_tokens and selection.gen_batch_size must be >= 1.")
        takes = "taking items (prompt, gold, answer) and returning one S_i per item"
        self.reward_fn = import_function("selection.reward", reward, REWARDS, takes) if reward not in REWARDS else None
        self.budget, self.rounds, self.round_steps, self.reward = budget, rounds, round_steps, reward
        self.reward_model = reward_model
        self.max_new_tokens, self.gen_batch_size, self.progress = max_new_tokens, gen_batch_size, progress
        self.kmq = KMQ(budget=budget, k=k, k_candidates=k_candidates, quality=quality, temperature=temperature,
                       encoder=encoder, scorer=scorer, max_length=max_length, batch_size=batch_size, n_iter=n_iter,
                       n_redo=n_redo, progress=progress)
        self.cfg: DictConfig | None = None

    def bind_config(self, cfg: DictConfig) -> None:
        """The run's config: each round trains with its model, PEFT and trainer settings."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and self.rounds > 1:
            raise ConfigError("selection=iterative trains a model between rounds and runs in one process. Select "
                              "first with `ftune select selection=iterative ...`, then train on the subset with "
                              "--nproc.")
        self.cfg = cfg

    def __call__(self, records: list[dict], seed: int) -> tuple[list[dict], dict]:
        return kept(records, self.select(records, seed))

    # ------------------------------------------------------------------------------------------------- one round
    def round_config(self, data_path: Path, out: Path, seed: int) -> DictConfig:
        """The run's config, training one epoch (or `round_steps` SFT steps) on the file, nothing evaluated or
        selected."""
        if self.cfg is None:
            raise RuntimeError("IterativeKMQ.bind_config(cfg) must be called before select(): the rounds train "
                               "with the run's model and trainer settings.")
        cfg = OmegaConf.create(OmegaConf.to_container(self.cfg, resolve=True))
        cfg.selection = {"_target_": None}
        cfg.objective = {"_target_": f"{SFT.__module__}.{SFT.__qualname__}"}
        cfg.data.merge_with({"source": "jsonl", "path": str(data_path), "hub_id": None, "hub_config": None,
                             "split": "train", "eval_split": None, "eval_size": 0, "size": None, "limit": None,
                             "format": "auto", "fields": {}})
        cfg.eval.merge_with({"task": "none", "at_start": False, "at_end": False})
        steps = {"max_steps": -1, "epochs": 1} if self.round_steps == "epoch" else {"max_steps": self.round_steps}
        cfg.trainer.merge_with({**steps, "save_every": 0, "eval_every": 0, "resume": None,
                                "progress": self.progress})
        cfg.output_dir, cfg.seed = str(out), seed
        return cfg

    def train_and_score(self, records: list[dict], train_idx: list[int], score_idx: list[int], work: Path,
                        r: int, seed: int) -> tuple[dict[int, float], dict]:
        """Train on train_idx; the trained model answers score_idx; S_i for each of those."""
        from ftune.data.tokenize import prompt_ids
        from ftune.objectives.sampling import generate_from
        from ftune.train import Trainer

        path = work / f"round{r}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for i in train_idx:
                f.write(json.dumps({"id": str(records[i]["id"]), "messages": records[i]["messages"]}) + "\n")
        trainer = Trainer(self.round_config(path, work / f"round{r}", seed))
        summary = trainer.run()
        prompts = [records[i]["messages"][:-1] for i in score_idx]
        new = generate_from(trainer, [prompt_ids(trainer.tokenizer, p) for p in prompts], self.max_new_tokens,
                            self.gen_batch_size, progress=self.progress)
        answers = [trainer.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new]
        del trainer
        golds = [records[i]["messages"][-1]["content"] for i in score_idx]
        items = [{"prompt": p, "gold": g, "answer": a} for p, g, a in zip(prompts, golds, answers)]
        if self.reward == "numeric_match":
            from ftune.eval.judges import NumericMatch

            correct = NumericMatch()(items)
            s = [1.0 - float(c) for c in correct]
            extra = {"answer_accuracy": sum(correct) / len(correct)}
        elif self.reward == "perplexity":
            gen = [{"id": f"{records[i]['id']}#gen{r}", "messages": [*p, {"role": "assistant", "content": a}]}
                   for i, p, a in zip(score_idx, prompts, answers)]
            nll_gen = self.kmq.scorer(gen).nll
            nll_gold = self.kmq.scorer([records[i] for i in score_idx]).nll
            if nll_gen is None:
                raise ConfigError("selection.reward=perplexity needs a causal LM as selection.scorer.")
            s = (nll_gen - nll_gold).nan_to_num(0.0).tolist()
            extra = {}
        elif self.reward == "reward_model":
            from ftune.selection.scorers import reward_margins

            s = reward_margins(items, self.reward_model, self.kmq.embedder.max_length, self.gen_batch_size)
            extra = {}
        else:
            s = [float(v) for v in self.reward_fn(items)]
            if len(s) != len(items):
                raise ValueError(f"selection.reward={self.reward} returned {len(s)} scores for {len(items)} items.")
            extra = {}
        info = {"round": r, "trained_on": len(train_idx), "steps": summary.get("steps"),
                "train_loss": summary.get("final_loss"),
                "scored": len(score_idx), "mean_S": sum(s) / len(s), **extra}
        return dict(zip(score_idx, s)), info

    # --------------------------------------------------------------------------------------------------- select
    def select(self, records: list[dict], seed: int) -> Selection:
        check_budget("iterative", self.budget, len(records))
        per_round = round_budgets(self.budget, self.rounds)
        c = self.kmq.clusters(records, seed)
        k, labels = c["k"], c["labels"]
        gen = torch.Generator().manual_seed(seed + 1)
        last = self.kmq.draw(c, cluster_budgets(c["sizes"], per_round[0]), gen)
        chosen, scored, rounds, means = list(last), {}, [], None
        with tempfile.TemporaryDirectory(prefix="ftune_iterative.") as tmp:
            for r in range(1, self.rounds):
                new_scores, info = self.train_and_score(records, sorted(chosen), last, Path(tmp), r, seed)
                scored.update(new_scores)
                weights, means = cluster_weights(labels, k, new_scores, means)
                last = draw_by_weight(labels, k, weights, per_round[r], set(chosen), gen)
                chosen += last
                rounds.append({**info, "cluster_mean_S": means, "cluster_weights": [round(float(w), 4)
                                                                                    for w in weights],
                               "selected": len(last)})
                log.info("iterative: round %d trained on %d, mean S %.3f; selected %d more.", r, info["trained_on"],
                         info["mean_S"], len(last))
        indices = sorted(chosen)
        report = {**self.kmq.report(c, self.budget, indices), "method": "iterative", "rounds": self.rounds,
                  "round_budgets": per_round, "round_steps": self.round_steps, "reward": self.reward,
                  "round_reports": rounds}
        scores = [scored.get(i, float("nan")) for i in range(len(records))]
        return Selection(indices, report, scores, f"S = score(gold) - score(generated) ({self.reward})")
