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


def generate_ids(model, prompts: list[list[int]], max_new_tokens: int, batch_size: int, pad_id: int, eos_id: int,
                 temperature: float = 0.0, progress: bool = False) -> list[list[int]]:
    """New token ids for each prompt (up to and including EOS); greedy when temperature == 0."""
    from tqdm.auto import tqdm

    was_training = dist.in_training_mode(model)
    model.eval()
    device = next(model.parameters()).device
    # Longest first keeps padding low inside each batch; results go back to the input order.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    kwargs = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens, "pad_token_id": pad_id,
              "eos_token_id": eos_id, "use_cache": True}
    if _fsdp2_sharded(model):  # transformers keeps the ranks in step by itself under ZeRO-3, not under FSDP2
        kwargs["synced_gpus"] = True
    kwargs.update({"temperature": temperature} if temperature > 0 else {"temperature": None, "top_p": None,
                                                                       "top_k": None})
    bar = tqdm(total=len(order), desc="Generating", disable=not progress, leave=False)
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        ids, mask = left_pad([prompts[i] for i in idx], pad_id)
        width = ids.shape[1]
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        for b, i in enumerate(idx):
            new = out[b, width:].tolist()
            outputs[i] = new[: new.index(eos_id) + 1] if eos_id in new else new
        bar.update(len(idx))
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
