"""The GRPO family's maths: group-relative advantages, the clipped per-token loss with the k3 KL, and each variant's
token normalisation (shared/METHODS.md §16). Pure tensor functions, so each can be checked against hand-computed
values; the sampling and the rewards are elsewhere.

- GRPO (Shao et al., DeepSeekMath, arXiv 2402.03300): advantage `(r_i - mean_G r) / std_G r`, loss the mean over the
  G completions of each one's token-mean; KL to the reference with the k3 estimator
  `exp(lp_ref - lp) - (lp_ref - lp) - 1`, added per token before aggregation (as TRL's `_compute_loss`).
- BNPO: the token-mean over the micro-batch.
- Dr. GRPO (Liu et al., arXiv 2503.20783): no std scaling (`scale_rewards=none`), and the token sum divided by a
  constant, completions x max_completion_length (their `masked_sum(..., constant_normalizer=...)`), which removes the
  length bias of `grpo`.
- DAPO (Yu et al., arXiv 2503.14476): the token sum over the tokens of the whole (accumulated) batch, clip-higher
  (`epsilon_high` above `epsilon`), soft overlong punishment in the reward.
- GSPO (Zheng et al., arXiv 2507.18071), `importance_sampling_level=sequence`: one ratio per completion, the exp of
  its token-mean log-ratio, used for every token of it.

TRL's internals change every minor release, so these are written here, with TRL v1.9's names and normalisers.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
IS_LEVELS = ("token", "sequence")


def advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """One advantage per completion. `rewards` holds G consecutive completions of each prompt. The group mean is the
    baseline; `scale`: group (divide by the group's std, Bessel-corrected as TRL), batch (by the whole batch's std),
    none (Dr. GRPO: no division). A group whose rewards are all equal gets 0 (it carries no gradient)."""
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale!r}: one of {', '.join(SCALE_REWARDS)}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not make groups of {group_size} (>= 2) completions")
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / (r.std() + eps)
    return adv.view(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate, exp(ref - lp) - (ref - lp) - 1: >= 0, and 0 where the two agree."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def ratios(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, level: str = "token") -> torch.Tensor:
    """Importance ratios per token [B, T]: token level exp(lp - lp_old); sequence level (GSPO) one ratio per
    completion, exp of the mean log-ratio over its tokens, broadcast to its tokens (gradients flow through lp)."""
    log_ratio = logp - old_logp
    if level == "token":
        return torch.exp(log_ratio)
    if level != "sequence":
        raise ValueError(f"importance_sampling_level={level!r}: token or sequence")
    m = mask.to(log_ratio.dtype)
    seq = (log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1)
    return torch.exp(seq).unsqueeze(-1).expand_as(logp)


def token_losses(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                 epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
                 ref_logp: torch.Tensor | None = None, level: str = "token") -> tuple[torch.Tensor, dict]:
    """l_it = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * KL_it, [B, T] (masked positions are
    still computed; `aggregate` drops them). Returns the losses and what to log: the share of completion tokens
    whose ratio was clipped (low / high), and the mean KL."""
    hi = epsilon if epsilon_high is None else epsilon_high
    rho = ratios(logp, old_logp, mask, level)
    a = adv.unsqueeze(-1)
    clipped = torch.clamp(rho, 1 - epsilon, 1 + hi)
    loss = -torch.min(rho * a, clipped * a)
    m = mask.bool()
    n = m.sum().clamp(min=1)
    stats = {"clip_low": float(((rho < 1 - epsilon) & (a < 0) & m).sum() / n),
             "clip_high": float(((rho > 1 + hi) & (a > 0) & m).sum() / n)}
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        kl = k3_kl(logp, ref_logp)
        loss = loss + beta * kl
        stats["kl"] = float((kl.detach() * m).sum() / n)
    return loss, stats


def aggregate(loss: torch.Tensor, mask: torch.Tensor, loss_type: str = "dapo", max_completion_length: int | None = None,
              batch_tokens: float | None = None) -> torch.Tensor:
    """The scalar loss of a micro-batch from per-token losses [B, T] and the completion mask, as each paper
    normalises: grpo = mean over completions of each one's token-mean; bnpo = token-mean of the micro-batch;
    dr_grpo = token sum / (B * max_completion_length); dapo = token sum / `batch_tokens`, the completion tokens of the
    whole accumulated batch (per process), so every token of the batch weighs the same whatever micro-batch it is in
    (default: this micro-batch's)."""
    m = mask.to(loss.dtype)
    total = (loss * m).sum()
    if loss_type == "grpo":
        return ((loss * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return total / m.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type=dr_grpo normalises by max_completion_length")
        return total / (loss.shape[0] * max_completion_length)
    if loss_type == "dapo":
        return total / (batch_tokens if batch_tokens else m.sum().clamp(min=1))
    raise ValueError(f"loss_type={loss_type!r}: one of {', '.join(LOSS_TYPES)}")


def soft_overlong_punishment(lengths: torch.Tensor, max_completion_length: int, cache: int) -> torch.Tensor:
    """DAPO's reward for length (TRL's get_soft_overlong_punishment): 0 up to L_max - L_cache tokens, then falling
    linearly to -1 at L_max, and -1 beyond."""
    start = max_completion_length - cache
    lengths = lengths.float()
    inside = (start - lengths) / cache
    return torch.where(lengths <= start, torch.zeros_like(lengths),
                       torch.where(lengths <= max_completion_length, inside, torch.full_like(lengths, -1.0)))
