"""Batched generation through the chat template (left padding, KV cache)."""

from __future__ import annotations

import torch

from ftune.data.tokenize import prompt_ids


@torch.no_grad()
def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 256, batch_size: int = 16,
             temperature: float = 0.0, progress: bool = False) -> list[str]:
    """Answer each conversation (its messages up to the user's turn); greedy when temperature == 0."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [prompt_ids(tokenizer, msgs) for msgs in conversations]
    # Longest first keeps padding low inside each batch; results go back to the input order.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    bar = tqdm(total=len(order), desc="Generating", disable=not progress, leave=False)
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for b, i in enumerate(idx):
            ids[b, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[b, width - len(encoded[i]):] = 1
        kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=pad,
                      eos_token_id=tokenizer.eos_token_id, use_cache=True)
        if temperature > 0:
            kwargs["temperature"] = temperature
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        for b, i in enumerate(idx):
            outputs[i] = tokenizer.decode(out[b, width:], skip_special_tokens=True).strip()
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return outputs
