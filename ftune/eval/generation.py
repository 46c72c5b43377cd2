"""Batched generation through the chat template (left padding, KV cache)."""

from __future__ import annotations

import torch

from ftune.data.tokenize import prompt_ids
from ftune.training import distributed as dist


@torch.no_grad()
def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (ids, attention mask) of token-id prompts, so every prompt ends at the last position."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    return ids, mask


def _fsdp2_sharded(model) -> bool:
    """Whether `model` is (part of) a model sharded by torch's FSDP2 `fully_shard` over several processes."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _shared_prefix_cache(model, ids: torch.Tensor, mask: torch.Tensor, group: int) -> dict:
    """{generate's keyword: a KV cache}: the cache of every prompt but its last token, computed once and repeated
    `group` times (each prompt's copies are consecutive), so that `generate` runs the prompt's prefill once for its
    `group` completions."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], use_cache=True,
                logits_to_keep=1)
    key = "cache" if "cache" in out else "past_key_values"  # transformers >= 5.2x renamed it `cache`
    cache = out[key]
    cache.batch_repeat_interleave(group)
    return {key: cache}


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], max_new_tokens: int, batch_size: int, pad_id: int, eos_id: int,
                 temperature: float = 0.0, progress: bool = False, top_p: float | None = None,
                 top_k: int | None = None, group: int = 1) -> list[list[int]]:
    """New token ids for each prompt (up to and including EOS); greedy when temperature == 0, else sampled with
    `temperature`, nucleus `top_p` and `top_k` (0: no top-k cut; None for either: the model's generation config).

    `group` > 1: that many completions of each prompt, consecutive in the output (len(prompts) x group of them),
    `batch_size` completions per batch; each prompt's prefill runs once and its KV cache is shared by its group
    (GRPO's G samples; the prompt is most of the tokens of a short answer)."""
    from tqdm.auto import tqdm

    was_training = dist.in_training_mode(model)
    model.eval()
    device = next(model.parameters()).device
    # Longest first keeps padding low inside each batch; results go back to the input order.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in range(len(prompts) * group)]
    kwargs = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens, "pad_token_id": pad_id,
              "eos_token_id": eos_id, "use_cache": True}
    sharded = _fsdp2_sharded(model)
    if sharded:  # transformers keeps the ranks in step by itself under ZeRO-3, not under FSDP2
        kwargs["synced_gpus"] = True
    if temperature > 0:
        kwargs.update({"temperature": temperature, **{k: v for k, v in (("top_p", top_p), ("top_k", top_k))
                                                      if v is not None}})
    else:
        kwargs.update({"temperature": None, "top_p": None, "top_k": None})
    # A shared prefill needs at least two prompt tokens (one cached, one to start from), and every rank's forwards
    # in step (not so under FSDP2, whose ranks may have different prompts).
    share = group > 1 and not sharded and min(len(p) for p in prompts) >= 2
    per = max(1, batch_size // group)
    bar = tqdm(total=len(order) * group, desc="Generating", disable=not progress, leave=False)
    for s in range(0, len(order), per):
        idx = order[s: s + per]
        ids, mask = left_pad([prompts[i] for i in idx], pad_id)
        ids, mask, width = ids.to(device), mask.to(device), ids.shape[1]
        extra = _shared_prefix_cache(model, ids, mask, group) if share else {}
        if group > 1:
            ids, mask = ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs, **extra)
        for b in range(out.shape[0]):
            new = out[b, width:].tolist()
            outputs[idx[b // group] * group + b % group] = new[: new.index(eos_id) + 1] if eos_id in new else new
        bar.update(out.shape[0])
    bar.close()
    model.train(was_training)
    return outputs


def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 256, batch_size: int = 16,
             temperature: float = 0.0, progress: bool = False) -> list[str]:
    """Answer each conversation (its messages up to the user's turn) as text."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [prompt_ids(tokenizer, msgs) for msgs in conversations]
    new = generate_ids(model, encoded, max_new_tokens, batch_size, pad, tokenizer.eos_token_id, temperature, progress)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new]
