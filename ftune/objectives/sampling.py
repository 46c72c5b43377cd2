"""Answers from the model being trained, and their on-disk cache: shared by the objectives that train on data the
model generates itself before training (`pso` offline samples, `s3ft` rewritten responses)."""

from __future__ import annotations

import hashlib
import json

from ftune.eval.generation import generate_ids
from ftune.training import distributed as dist


def generate_from(trainer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, temperature: float = 0.0,
                  progress: bool = False) -> list[list[int]]:
    """New token ids of the trainer's model for each prompt (batched; greedy when temperature == 0)."""
    tok = trainer.tokenizer
    model = trainer.acc.unwrap_model(trainer.model)
    # Under FSDP2 / ZeRO-3 every rank runs this with the same prompts (each forward needs all of them).
    with trainer.acc.autocast(), dist.ready_to_generate(trainer.acc, trainer.model):
        return generate_ids(model, prompts, max_new_tokens, batch_size, tok.pad_token_id, tok.eos_token_id,
                            temperature, progress)


def cache_key(*parts) -> str:
    """A short stable key of JSON-serialisable parts (settings, example ids and tokens)."""
    return hashlib.sha256(json.dumps(list(parts)).encode()).hexdigest()[:24]


