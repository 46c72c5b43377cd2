"""`objective=dpo`: the DPO family on preference pairs (losses in ftune/objectives/preference.py).

Chosen and rejected responses go through one concatenated forward pass. The reference model is, in order of
preference: the same model with its PEFT adapter disabled (no second copy in memory); log-probs precomputed once
before training (`precompute_ref=true`, one model in memory); or a frozen copy of the initial model. SimPO and ORPO
need no reference.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager

import torch

from ftune.config import ConfigError
from ftune.data.batching import collate_packed
from ftune.objectives.preference import LOSSES, REFERENCE_FREE, preference_loss
from ftune.objectives.sft import labelled_token_ce
from ftune.peft.base import adapter_disabled, can_disable_adapter
from ftune.training import distributed as dist

log = logging.getLogger(__name__)


def sequence_logps(model, batch: dict[str, torch.Tensor], chunk_size: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the labelled tokens of each sequence and the number of those tokens: (S,), (S,).

    Sequences are the batch's `seq_ids` (several packed in a row, see `collate_pairs`), or else its rows. The head and
    the float32 log-softmax run `chunk_size` positions at a time (None = auto, `linear_ce.auto_chunk_rows`).
    """
    ce, rows, cols = labelled_token_ce(model, batch, chunk_size)
    seq_ids = batch.get("seq_ids")
    if seq_ids is None:
        seq_ids = torch.arange(batch["labels"].shape[0], device=ce.device)[:, None].expand_as(batch["labels"])
    seq = seq_ids[rows, cols]
    n_seq = int(seq_ids.max()) + 1
    logps = ce.new_zeros(n_seq).index_add(0, seq, -ce)
    return logps, torch.bincount(seq, minlength=n_seq)


def frozen_copy(model):
    """A frozen copy of the initial model: the reference of full fine-tuning (a PEFT model disables its adapter)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


@contextmanager
def reference_model(model, adapter: bool, frozen=None):
    """The base model: `model` with its adapter switched off when `adapter` (peft's or ftune's own: SSF, AdaLink),
    else the `frozen` copy (full fine-tuning)."""
    if adapter:
        with adapter_disabled(model):
            yield model
    else:
        yield frozen


def collate_pairs(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> 2B sequences (0..B-1 chosen, B..2B-1 rejected) for one forward pass, packed several to a row as
    wide as the longest (`seq_ids` tells them apart): short answers and prompts waste no padding. Precomputed
    reference log-probs ride along."""
    sides = [{"input_ids": r[f"{s}_input_ids"], "labels": r[f"{s}_labels"]} for s in ("chosen", "rejected")
             for r in rows]
    batch = collate_packed(sides, pad_id)
    if all("ref_logp" in r for r in rows):
        batch["ref_logp"] = torch.tensor([r["ref_logp"][0] for r in rows] + [r["ref_logp"][1] for r in rows])
    return batch


# β when objective.beta is null: each paper's value. DPO (Rafailov et al. 2023) 0.1, as do cDPO and IPO in the reference
# implementations; SimPO (Meng et al. 2024, Table 7 / the repo's configs) 2.0-2.5, the low end (Mistral-Base; its
# gamma_beta_ratio 0.5 then gives γ = 1.0, ftune's simpo_gamma default). ORPO has no β.
BETA_DEFAULTS = {"sigmoid": 0.1, "cdpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1}


class DPO:
    """Preference optimisation with `loss` in sigmoid (DPO) | cdpo | ipo | simpo | orpo.

    Args:
        loss: the variant (see ftune/objectives/preference.py for each formula and its paper).
        beta: β, the inverse temperature of the implicit reward (SimPO: the reward scale); None = the paper's value
            for `loss` (BETA_DEFAULTS: 0.1 for DPO / cDPO / IPO, 2.0 for SimPO; ORPO does not read it).
        label_smoothing: ε for cdpo (assumed label-flip probability).
        simpo_gamma: SimPO's target reward margin γ.
        orpo_lambda: ORPO's weight λ of the odds-ratio term.
        precompute_ref: compute reference log-probs once before training (one model in memory).
    """

    can_pack = False
    data_kind = "preference"

    def __init__(self, loss: str = "sigmoid", beta: float | None = None, label_smoothing: float = 0.0,
                 simpo_gamma: float = 1.0, orpo_lambda: float = 0.1, precompute_ref: bool = False):
        if loss not in LOSSES:
            raise ConfigError(f"objective.loss={loss!r} is not one of {', '.join(LOSSES)}.")
        if beta is None:
            beta = BETA_DEFAULTS[loss]
        elif beta <= 0:
            raise ConfigError(f"objective.beta={beta} must be > 0.")
        if not 0 <= label_smoothing < 0.5:
            raise ConfigError(f"objective.label_smoothing={label_smoothing} must be in [0, 0.5).")
        if label_smoothing and loss != "cdpo":
            raise ConfigError(f"objective.label_smoothing is only read by loss=cdpo (this run: loss={loss}).")
        self.loss, self.beta, self.eps = loss, beta, label_smoothing
        self.gamma, self.lam, self.precompute_ref = simpo_gamma, orpo_lambda, precompute_ref
        self.ref_model = None
        self.adapter = False

    collate = staticmethod(collate_pairs)

    def normalizer(self, batch: dict[str, torch.Tensor]) -> int:
        return (int(batch["seq_ids"].max()) + 1) // 2

    def needs_frozen_copy(self, model) -> bool:
        """Whether setup() copies the initial model as the reference (no adapter to switch off, none precomputed)."""
        return self.loss not in REFERENCE_FREE and not self.precompute_ref and not can_disable_adapter(model)

    def setup(self, run) -> None:
        """Choose the reference: adapter-disabled model, precomputed log-probs, or a frozen copy."""
        if self.loss in REFERENCE_FREE:
            return
        unwrapped = run.acc.unwrap_model(run.model)
        self.adapter = can_disable_adapter(unwrapped)
        if self.precompute_ref:
            for rows, what in ((run.data.train, "train"), (run.data.eval, "eval")):
                self._precompute(run, rows, what)
        elif self.needs_frozen_copy(unwrapped):
            log.info("Full fine-tuning with a reference: keeping a frozen copy of the initial model "
                     "(set objective.precompute_ref=true to hold one model only).")
            self.ref_model = frozen_copy(unwrapped)

    def before_step(self, run, rows: list[list[dict]]) -> None:
        """Offline pairs: nothing to refresh."""

    def _reference(self, model):
        return reference_model(model, self.adapter, self.ref_model)

    @torch.no_grad()
    def _precompute(self, run, rows: list[dict], what: str) -> None:
        bs, pad = run.cfg.trainer.batch_size, run.tokenizer.pad_token_id
        was_training = dist.in_training_mode(run.model)
        run.model.eval()
        for s in range(0, len(rows), bs):
            chunk = rows[s: s + bs]
            batch = {k: v.to(run.acc.device) for k, v in collate_pairs(chunk, pad).items()}
            with run.acc.autocast():
                logp, _ = sequence_logps(run.model, batch)
            for i, r in enumerate(chunk):
                r["ref_logp"] = (float(logp[i]), float(logp[i + len(chunk)]))
        run.model.train(was_training)
        log.info("Precomputed reference log-probs for %d %s pairs.", len(rows), what)

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logp, n_tokens = sequence_logps(model, batch)
        b = logp.shape[0] // 2
        ref_c = ref_r = None
        if self.loss not in REFERENCE_FREE:
            if "ref_logp" in batch:
                ref = batch["ref_logp"].to(logp)
            else:
                with torch.no_grad(), self._reference(model) as ref_model:
                    ref, _ = sequence_logps(ref_model, batch)
            ref_c, ref_r = ref[:b], ref[b:]
        losses, rc, rr = preference_loss(logp[:b], logp[b:], ref_c, ref_r, n_tokens[:b], n_tokens[b:], self.loss,
                                         self.beta, self.eps, self.gamma, self.lam)
        metrics = {"rewards/chosen": float(rc.sum()), "rewards/rejected": float(rr.sum()),
                   "rewards/margin": float((rc - rr).sum()), "rewards/accuracy": float((rc > rr).float().sum())}
        return losses.sum(), metrics
