"""Answers from the model being trained, and their on-disk cache: shared by the objectives that train on data the
model generates itself before training (`pso` offline samples, `s3ft` rewritten responses)."""

from __future__ import annotations

import hashlib
import json
import logging

from ftune.eval.generation import generate_ids
from ftune.training import distributed as dist

log = logging.getLogger(__name__)


def generate_from(trainer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, temperature: float = 0.0,
                  progress: bool = False, share: bool = False) -> list[list[int]]:
    """New token ids of the trainer's model for each prompt (batched; greedy when temperature == 0).

    `share`: every rank holds the same prompts (PSO's offline samples). Under plain data parallelism each rank then
    answers every N-th prompt and the answers are gathered, so N processes sample N times faster. A model sharded by
    FSDP2 / ZeRO-3 needs every rank in each forward: there every rank answers every prompt, in step."""
    acc = trainer.acc
    split = share and acc.num_processes > 1 and not dist.every_rank_generates(acc)
    mine = prompts[acc.process_index:: acc.num_processes] if split else prompts
    if split:
        log.info("Sampling %d of %d prompts on process %d.", len(mine), len(prompts), acc.process_index)
    tok = trainer.tokenizer
    model = acc.unwrap_model(trainer.model)
    with acc.autocast(), dist.ready_to_generate(acc, trainer.model):
        answers = generate_ids(model, mine, max_new_tokens, batch_size, tok.pad_token_id, tok.eos_token_id,
                               temperature, progress)
    if not split:
        return answers
    from accelerate.utils import gather_object

    everyone: list[list[int]] = [[] for _ in prompts]
    for rank, part in enumerate(gather_object([answers])):  # one list per rank, in rank order
        everyone[rank:: acc.num_processes] = part
    return everyone


def cache_key(*parts) -> str:
    """A short stable key of JSON-serialisable parts (settings, example ids and tokens)."""
    return hashlib.sha256(json.dumps(list(parts)).encode()).hexdigest()[:24]


