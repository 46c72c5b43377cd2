"""Answers from the model being trained, and their on-disk cache: shared by the objectives that train on data the
model generates itself before training (`pso` offline samples, `s3ft` rewritten responses)."""

from __future__ import annotations

import hashlib
import json

from ftune.eval.generation import generate_ids
from ftune.training import distributed as dist


def generate_from(run, prompts: list[list[int]], max_new_tokens: int, batch_size: int, temperature: float = 0.0,
                  progress: bool = False, share: bool = False, top_p: float | None = None,
                  top_k: int | None = None, group: int = 1) -> list[list[int]]:
    """New token ids of the run's model for each prompt (batched; greedy when temperature == 0).

    `share`: every rank holds the same prompts (PSO's offline samples). Under plain data parallelism each rank then
    answers every N-th prompt and the answers are gathered, so N processes sample N times faster. A model sharded by
    FSDP2 / ZeRO-3 needs every rank in each forward: there every rank answers every prompt, in step."""
    acc, tok = run.acc, run.tokenizer
    model = acc.unwrap_model(run.model)

    def answer(mine: list[list[int]]) -> list[list[int]]:
        with acc.autocast(), dist.ready_to_generate(acc, run.model):
            return generate_ids(model, mine, max_new_tokens, batch_size, tok.pad_token_id, tok.eos_token_id,
                                temperature, progress, top_p, top_k, group)

    split = share and acc.num_processes > 1 and not dist.every_rank_generates(acc)
    return dist.shared_out(acc, prompts, answer) if split else answer(prompts)


def cache_key(*parts) -> str:
    """A short stable key of JSON-serialisable parts (settings, example ids and tokens)."""
    return hashlib.sha256(json.dumps(list(parts)).encode()).hexdigest()[:24]


