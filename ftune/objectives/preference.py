"""Pairwise preference losses on per-sequence log-probabilities (pure tensor functions).

Notation: `lp(y|x)` is the summed log-probability of the response tokens only; `h` is the reference-relative margin
`[lp_θ(y_w) − lp_ref(y_w)] − [lp_θ(y_l) − lp_ref(y_l)]`.

- sigmoid (DPO, Rafailov et al. 2023, Eq. 7): `−log σ(β h)`.
- cdpo (conservative DPO / label smoothing ε, Mitchell 2023): `−(1−ε) log σ(β h) − ε log σ(−β h)`; ε = 0 is DPO.
- ipo (Azar et al. 2023, Eq. 17): `(h − 1/(2β))²` on summed log-probs, as in the reference implementation
  (eric-mitchell/direct-preference-optimization `preference_loss`; TRL averages per token instead).
- simpo (Meng et al. 2024, Eq. 6): `−log σ(β/|y_w| lp_θ(y_w) − β/|y_l| lp_θ(y_l) − γ)`, no reference.
- orpo (Hong et al. 2024, Eq. 6-7): `NLL(y_w) + λ · (−log σ(log odds(y_w) − log odds(y_l)))` with
  `odds = P / (1 − P)`, `P = exp(mean token log-prob)`; no reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "cdpo", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(P / (1 − P)) for P = exp(mean_logp) < 1, computed stably."""
    return mean_logp - torch.log1p(-torch.exp(mean_logp).clamp(max=1 - 1e-7))


def preference_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor | None,
    ref_rejected_logp: torch.Tensor | None,
    chosen_len: torch.Tensor,
    rejected_len: torch.Tensor,
    loss: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 1.0,
    orpo_lambda: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards of chosen and rejected (shapes (B,)).

    Rewards are `β (lp_θ − lp_ref)` for reference-based losses, `β lp_θ / |y|` for SimPO and the mean token log-prob
    for ORPO; they are detached (for logging and accuracy).
    """
    if loss in REFERENCE_FREE:
        if loss == "simpo":
            chosen_r, rejected_r = beta * chosen_logp / chosen_len, beta * rejected_logp / rejected_len
            losses = -F.logsigmoid(chosen_r - rejected_r - simpo_gamma)
        else:
            mean_c, mean_r = chosen_logp / chosen_len, rejected_logp / rejected_len
            ratio = -F.logsigmoid(log_odds(mean_c) - log_odds(mean_r))
            losses = -mean_c + orpo_lambda * ratio
            chosen_r, rejected_r = mean_c, mean_r
        return losses, chosen_r.detach(), rejected_r.detach()
    if ref_chosen_logp is None or ref_rejected_logp is None:
        raise ValueError(f"objective.loss={loss} needs reference log-probs")
    chosen_r = chosen_logp - ref_chosen_logp
    rejected_r = rejected_logp - ref_rejected_logp
    h = chosen_r - rejected_r
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss == "cdpo":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {loss!r}; choose one of {LOSSES}")
    return losses, (beta * chosen_r).detach(), (beta * rejected_r).detach()
