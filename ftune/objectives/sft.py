"""Supervised fine-tuning: summed token cross-entropy on response tokens.

The loop divides the summed loss by the number of label tokens in the whole accumulated (and all-reduced) batch,
so gradient accumulation and data parallelism do not change the loss (cf. transformers PR #34191).
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F

from ftune.data.batching import collate, label_count
from ftune.data.tokenize import IGNORE
from ftune.objectives.linear_ce import auto_chunk_rows, linear_cross_entropy, linear_cross_entropy_sum
from ftune.training import distributed as dist

log = logging.getLogger(__name__)


def token_ce_sum(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Sum of cross-entropy over positions whose target is not -100, upcasting to float32 one chunk at a time.

    Args:
        logits: (N, V) logits for N positions.
        targets: (N,) token ids, -100 where ignored.
        chunk_size: positions per float32 chunk (caps the upcast memory at chunk_size x V floats); None = auto
            (`linear_ce.auto_chunk_rows`).
    """
    return _chunked_ce(logits, targets, chunk_size, "sum")


def _chunked_ce(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int | None, reduction: str) -> torch.Tensor:
    """Float32 cross-entropy of (N, V) logits, `chunk_size` positions at a time: summed, or (N,) per position."""
    chunk_size = chunk_size or auto_chunk_rows(logits.shape[-1], logits.device.type)
    parts = [F.cross_entropy(logits[s: s + chunk_size].float(), targets[s: s + chunk_size], ignore_index=IGNORE,
                             reduction=reduction) for s in range(0, logits.shape[0], chunk_size)]
    if reduction == "sum":
        return torch.stack(parts).sum() if parts else logits.new_zeros((), dtype=torch.float32)
    return torch.cat(parts) if parts else logits.new_zeros(0, dtype=torch.float32)


# Per model: whether applying its output embeddings to the last hidden states reproduces its logits (true for
# Llama-like models; false for models that scale or soft-cap logits, e.g. Gemma 2, which keep the logits path).
_HEAD_MATCHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _unwrap(model):
    return model.module if hasattr(model, "module") else model  # DDP / FSDP wrappers


def _head_matches(model, batch: dict[str, torch.Tensor], rows: torch.Tensor, cols: torch.Tensor) -> bool:
    from torch.distributed.fsdp import FSDPModule

    key = _unwrap(model)
    if getattr(key, "get_output_embeddings", lambda: None)() is None:  # no separate head to apply
        return False
    if isinstance(key, FSDPModule):
        # FSDP2 (trainer.distributed=fsdp2) gathers the head's weight only inside the model's forward and reduces its
        # gradient when that forward's backward ends: applying the head afterwards would miss both.
        return False
    if key not in _HEAD_MATCHES:
        was_training = dist.in_training_mode(model)
        model.eval()  # no dropout, so both paths see the same activations
        with torch.no_grad():
            keep = cols[:8]
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None,
                        use_cache=False, logits_to_keep=keep, output_hidden_states=True)
            ours = _unwrap(model).get_output_embeddings()(out.hidden_states[-1][rows[:8], keep])
            theirs = out.logits[rows[:8], torch.arange(len(keep), device=keep.device)]
            _HEAD_MATCHES[key] = bool(torch.allclose(ours.float(), theirs.float(), rtol=1e-3, atol=1e-3))
        model.train(was_training)
        if not _HEAD_MATCHES[key]:
            log.info("%s: its logits are not its output embeddings applied to the last hidden states; computing the "
                     "LM head on whole positions.", type(_unwrap(model)).__name__)
    return _HEAD_MATCHES[key]


def _label_pairs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, targets): the positions (row, col) whose next token is a label, and those labels."""
    labels = batch["labels"]
    # A label at position 0 starts a packed sequence: the token before it belongs to another one.
    rows, cols = ((labels[:, 1:] != IGNORE) & (batch["position_ids"][:, 1:] != 0)).nonzero(as_tuple=True)
    return rows, cols, labels[rows, cols + 1]


def _hidden_at(model, batch: dict[str, torch.Tensor], rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Last hidden states at (rows, cols), (N, H), from a forward that computes no logits."""
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None,
                use_cache=False, logits_to_keep=cols[:0], output_hidden_states=True)
    return out.hidden_states[-1][rows, cols]


def labelled_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Logits only at the (row, position) pairs that predict a label: (N, V), with targets, rows and the label
    positions, each (N,). A sequence's first token is never a target (nothing before it in its sequence). No LM-head
    work is spent on another row's prompt or padding (the LM head of a 135M model is a fifth of its weights)."""
    rows, cols, targets = _label_pairs(batch)
    if _head_matches(model, batch, rows, cols):
        logits = _unwrap(model).get_output_embeddings()(_hidden_at(model, batch, rows, cols))
    else:
        keep = torch.unique(cols)
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None,
                    use_cache=False, logits_to_keep=keep)
        logits = out.logits[rows, torch.searchsorted(keep, cols)]
    return logits, targets, rows, cols + 1


def _plain_head(model) -> torch.nn.Linear | None:
    """The output embeddings when they are a plain nn.Linear without hooks, so that its weight and bias alone give
    its output (not so for, e.g., a quantized or adapter-wrapped head); else None."""
    head = getattr(_unwrap(model), "get_output_embeddings", lambda: None)()
    plain = type(head) is torch.nn.Linear and not head._forward_hooks and not head._forward_pre_hooks
    return head if plain else None


def _fused_inputs(model, batch: dict[str, torch.Tensor]):
    """(last hidden states at the labelled pairs, the head, targets, rows, label positions) where the model's logits
    are its plain head applied to its hidden states, so the head can run outside the model; else None."""
    rows, cols, targets = _label_pairs(batch)
    head = _plain_head(model)
    if head is None or not _head_matches(model, batch, rows, cols):
        return None
    return _hidden_at(model, batch, rows, cols), head, targets, rows, cols + 1


def labelled_ce_sum(model, batch: dict[str, torch.Tensor], chunk_size: int | None = None) -> torch.Tensor:
    """Summed cross-entropy at the (row, position) pairs that predict a label (see `labelled_logits`).

    Where the logits are the plain LM head applied to the last hidden states, the head and the loss run fused
    (`linear_ce.linear_cross_entropy_sum`: no (N, V) logits kept, gradients computed chunk by chunk); otherwise
    through the logits (`token_ce_sum`). Both give the same loss and gradients up to float rounding.
    """
    fused = _fused_inputs(model, batch)
    if fused is not None:
        hidden, head, targets, _, _ = fused
        return linear_cross_entropy_sum(hidden, head.weight, head.bias, targets, chunk_size)
    logits, targets, _, _ = labelled_logits(model, batch)
    return token_ce_sum(logits, targets, chunk_size)


def labelled_token_ce(model, batch: dict[str, torch.Tensor], chunk_size: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each label's cross-entropy (N,), float32, with its row and position (as `labelled_logits` returns them): fused
    through the head where it is plain and does not train (`linear_ce.linear_cross_entropy`), else from the logits."""
    fused = _fused_inputs(model, batch)
    if fused is not None:
        hidden, head, targets, rows, label_cols = fused
        return linear_cross_entropy(hidden, head.weight, head.bias, targets, chunk_size), rows, label_cols
    logits, targets, rows, label_cols = labelled_logits(model, batch)
    return _chunked_ce(logits, targets, chunk_size, "none"), rows, label_cols


class SFT:
    """`objective=sft`: next-token cross-entropy on response tokens (prompt tokens are labelled -100)."""

    can_pack = True
    data_kind = "sft"
    fuses_lm_loss = True  # its loss is the LM head + cross-entropy alone, so trainer.liger may fuse them
    collate = staticmethod(collate)

    def __init__(self, chunk_size: int | None = None):
        self.chunk_size = chunk_size
        self.fused = None  # Liger's fused linear cross-entropy, with trainer.liger=true

    def setup(self, run) -> None:
        """With trainer.liger=true, Liger's kernel (checked available before the model loaded) replaces the LM head
        + cross-entropy; otherwise nothing to prepare."""
        if run.cfg.trainer.liger:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            self.fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")

    def before_step(self, run, rows: list[list[dict]]) -> None:
        """Nothing to refresh (online objectives regenerate samples for the step's rows here)."""

    def normalizer(self, batch: dict[str, torch.Tensor]) -> int:
        return label_count(batch)

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        fused = _fused_inputs(model, batch) if self.fused is not None else None
        if fused is not None:  # else the path below
            # The same sum of cross-entropies, the (N, V) logits never materialised: Liger computes the head and the
            # loss chunk by chunk in Triton and writes the gradients during the forward.
            hidden, head, targets, _, _ = fused
            return self.fused(head.weight, hidden, targets, head.bias), {}
        return labelled_ce_sum(model, batch, self.chunk_size), {}
