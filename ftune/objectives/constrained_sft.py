"""`objective=constrained_sft`: token-wise constrained fine-tuning (Qi et al., "Safety Alignment Should Be Made More
Than Just a Few Tokens Deep", ICLR 2025, arXiv 2406.05946, Eq. 3-5; code Unispac/shallow-vs-deep-alignment).

From the paper: with Δ_t = log π_θ(y_t | x, y_<t) − log π_aligned(y_t | x, y_<t) against the frozen initial model,

    L = Σ_t (2 / β_t) · softplus(−β_t Δ_t),        ∇L = Σ_t w_t · ∇(−log π_θ(y_t)),   w_t = 2 (1 − σ(β_t Δ_t)),

so tokens whose probability already rose above the initial model's get a smaller weight; β_t → 0 gives
cross-entropy (w_t → 1) and a large β_t keeps π_θ close to π_aligned at that position. β is larger on the first
response tokens: β_1 = β · first_token_bias_factor, β_2..β_bias_length = β · bias_factor, then β (defaults 0.1, 20,
5, 5: 0.5, 2.0 × 4, then 0.1).

As in the paper's code, the loss that is minimised is the surrogate −Σ_t sg(w_t) · log π_θ(y_t) with w_t clamped
at ≥ 1e-3: the same gradient as L (except where w_t < 1e-3), and a value that equals the cross-entropy while
π_θ = π_aligned. It is summed over response tokens and divided by the number of response tokens of the whole
accumulated batch (the code averages over the batch's response tokens). Logged per token: `weight` (w_t), `delta`
(Δ_t) and `objective` (the paper's L).

ftune's adaptations: π_aligned is the same model with its PEFT adapter disabled (no second copy) or, for full
fine-tuning, a frozen copy of the initial model (the code precomputes its log-probs); the token index t counts the
labelled tokens of each example (each packed example restarts at t = 1; in multi-turn data every assistant turn
of an example continues the count, as the code does for all labelled tokens of a sequence).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ftune.config import ConfigError
from ftune.data.batching import collate, label_count
from ftune.data.tokenize import IGNORE
from ftune.objectives.dpo import frozen_copy, reference_model
from ftune.objectives.sft import labelled_token_ce
from ftune.peft.base import can_disable_adapter

log = logging.getLogger(__name__)
MIN_WEIGHT = 1e-3  # the paper's code: clamp(min=1e-3)


def response_positions(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """0-based index of each labelled token among the labelled tokens of its example (-1 where unlabelled).

    Examples start where position_ids is 0 (every row starts one; packed rows start one per example).
    """
    labelled = (labels != IGNORE).long()
    upto = labelled.cumsum(-1)  # labelled tokens at or before t
    before_start = torch.where(position_ids == 0, upto - labelled, torch.zeros_like(upto))
    # upto is non-decreasing along a row, so a running max carries the count at the latest example start forward
    base = before_start.cummax(-1).values
    return torch.where(labelled.bool(), upto - 1 - base, torch.full_like(upto, -1))


def beta_schedule(positions: torch.Tensor, beta: float, first_token_bias_factor: float, bias_factor: float,
                  bias_length: int) -> torch.Tensor:
    """β_t per response position (0-based): β·first_token_bias_factor at 0, β·bias_factor below bias_length, else β
    (`get_beta_list` of the paper's code; bias_length = 0 gives β everywhere)."""
    betas = torch.full(positions.shape, float(beta))
    betas[(positions >= 0) & (positions < bias_length)] = beta * bias_factor
    if bias_length > 0:
        betas[positions == 0] = beta * first_token_bias_factor
    return betas


def constrained_token_losses(policy_logp: torch.Tensor, ref_logp: torch.Tensor, beta: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (surrogate loss, weight w_t, paper objective (2/β_t) softplus(−β_t Δ_t)).

    The surrogate −sg(max(w_t, 1e-3)) · log π_θ(y_t) carries the gradient of the paper's objective; the weight and
    the objective are detached (for logging).
    """
    delta = policy_logp - ref_logp
    weight = 2 * torch.sigmoid(-beta * delta)  # = 2 (1 − σ(β Δ))
    surrogate = -weight.detach().clamp(min=MIN_WEIGHT) * policy_logp
    objective = (2 / beta) * F.softplus(-beta * delta)
    return surrogate, weight.detach(), objective.detach()


class ConstrainedSFT:
    """Token-wise constrained SFT against the initial model (see the module docstring for the formula).

    Args:
        beta: β, the constraint strength after the first `bias_length` response tokens (paper: 0.1).
        bias_factor: β multiplier on response tokens 2..bias_length (paper: 20).
        first_token_bias_factor: β multiplier on the first response token (paper: 5).
        bias_length: how many leading response tokens get the stronger β (paper: 5; 0 = β everywhere).
        chunk_size: positions per chunk of the LM head + log-softmax (None = auto, as in objective=sft).
    """

    can_pack = True
    data_kind = "sft"
    collate = staticmethod(collate)

    def __init__(self, beta: float = 0.1, bias_factor: float = 20.0, first_token_bias_factor: float = 5.0,
                 bias_length: int = 5, chunk_size: int | None = None):
        if beta <= 0:
            raise ConfigError(f"objective.beta={beta} must be > 0 (small β approaches plain SFT; paper: 0.1).")
        if bias_factor <= 0 or first_token_bias_factor <= 0:
            raise ConfigError("objective.bias_factor and objective.first_token_bias_factor must be > 0 "
                              "(paper: 20 and 5).")
        if bias_length < 0:
            raise ConfigError(f"objective.bias_length={bias_length} must be >= 0 (paper: 5).")
        self.beta, self.bias_factor, self.first_factor = beta, bias_factor, first_token_bias_factor
        self.bias_length, self.chunk_size = bias_length, chunk_size
        self.adapter, self.ref_model = False, None

    @staticmethod
    def needs_frozen_copy(model) -> bool:
        """Whether setup() copies the initial model as the reference (no adapter to switch off)."""
        return not can_disable_adapter(model)

    def setup(self, run) -> None:
        """The reference: the model with its adapter disabled, else a frozen copy of the initial model."""
        unwrapped = run.acc.unwrap_model(run.model)
        self.adapter = can_disable_adapter(unwrapped)
        if self.needs_frozen_copy(unwrapped):
            log.info("Full fine-tuning with constrained_sft: keeping a frozen copy of the initial model as reference.")
            self.ref_model = frozen_copy(unwrapped)

    def before_step(self, run, rows: list[list[dict]]) -> None:
        """Nothing to refresh."""

    def normalizer(self, batch: dict[str, torch.Tensor]) -> int:
        return label_count(batch)

    def betas(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """β_t at every (row, position) of the batch's labels."""
        positions = response_positions(batch["labels"], batch["position_ids"])
        return beta_schedule(positions.cpu(), self.beta, self.first_factor, self.bias_factor, self.bias_length)

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        # Each label's log-prob under the policy and the reference, through the fused head where it is frozen.
        ce, rows, cols = labelled_token_ce(model, batch, self.chunk_size)
        policy = -ce
        with torch.no_grad(), reference_model(model, self.adapter, self.ref_model) as ref:
            reference = -labelled_token_ce(ref, batch, self.chunk_size)[0]
        beta = self.betas(batch)[rows.cpu(), cols.cpu()].to(policy.device)
        loss, weight, objective = constrained_token_losses(policy, reference, beta)
        metrics = {"weight": float(weight.sum()), "delta": float((policy - reference).detach().sum()),
                   "objective": float(objective.sum())}
        return loss.sum(), metrics
