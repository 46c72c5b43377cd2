"""`objective=masked_thought`: Masked Thought fine-tuning (MFT; Chen et al., ACL 2024, arXiv 2403.02178, Eq. 1).

From the paper and its code (ChangyuChen347/MaskedThought):
- each response token (chain of thought, answer and EOS) is replaced in the *input* with probability p; the labels
  keep the original tokens, so the loss is the ordinary shifted cross-entropy of SFT; the prompt is never masked;
- the noise is a new `<mask>` token whose embedding starts at the mean embedding (`noise=mask`), the pad token
  (`noise=pad`), or a uniformly random vocabulary id (`noise=random`, the paper's GSM8K Llama-2 setting, "similar
  effects" to `<mask>`);
- the rate ramps up linearly: `p(step) = min(p, p * step / (w * T + 1))` for T optimizer steps (trainer_436.py).

ftune's adaptations:
- positions are drawn iid Bernoulli(p) (the code draws n ~ Binomial(N, p), then n positions without replacement: the
  same distribution) from a torch Generator per example, seeded by (seed, step, example id): an example is masked
  the same whatever the number of processes, `grad_accum` or packing put it, so a run on N processes trains like one
  process with the global batch, and a resumed run masks exactly as an uninterrupted one;
- `noise=mask` adds no token to the vocabulary (that would touch the tokenizer, the saved adapter and every loader):
  it reuses a token id the data never contains -- the tokenizer's mask token, else a spare embedding row past the
  tokenizer's vocabulary, else its last unused special token (`<empty_output>` for SmolLM2), or `mask_token` --
  and sets that row of the input (and output) embedding to the mean embedding when training starts. Under LoRA the
  row is frozen at the mean and is not part of the saved adapter; the token never occurs at inference;
- `warmup_ratio=0` means a constant rate from the first step (the code's `update_mask_rate=False`).
Held-out losses are computed without noise (the model is in eval mode there).
"""

from __future__ import annotations

import hashlib
import logging

import torch

from ftune.config import ConfigError
from ftune.data.batching import collate, label_count
from ftune.data.tokenize import IGNORE
from ftune.objectives.sft import labelled_ce_sum
from ftune.training import distributed as dist

log = logging.getLogger(__name__)
NOISES = ("random", "mask", "pad")


def mask_rate(step: int, total_steps: int, rate: float, warmup_ratio: float) -> float:
    """The paper code's linear warm-up of the mask rate: min(p, p * step / (w * T + 1)); w = 0 is a constant p."""
    if warmup_ratio == 0:
        return rate
    return min(rate, rate * step / (warmup_ratio * total_steps + 1))


def noise_inputs(input_ids: torch.Tensor, labels: torch.Tensor, rate: float, generator: torch.Generator,
                 replace_id: int | None = None, vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each labelled (response) position of `input_ids` with probability `rate`.

    Labels are aligned with the inputs (labels[t] == input_ids[t] on response tokens, -100 elsewhere), so the prompt
    and padding are never touched. The replacement is `replace_id`, or a uniform id in [0, vocab_size) when
    `replace_id` is None. Random numbers come from `generator` (CPU). Returns (noised ids, replaced positions).
    """
    shape = input_ids.shape
    drawn = torch.rand(shape, generator=generator) < rate
    if replace_id is None:
        noise = torch.randint(0, vocab_size, shape, generator=generator)
    else:
        noise = torch.full(shape, replace_id, dtype=input_ids.dtype)
    chosen = drawn.to(labels.device) & (labels != IGNORE)
    return torch.where(chosen, noise.to(input_ids.device), input_ids), chosen


def example_generator(seed: int, step: int, example_id: str) -> torch.Generator:
    key = hashlib.sha256(f"{seed}:{step}:{example_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)


def segments(row: dict) -> list[tuple[str, int, int]]:
    """(example id, start, length) of each example in a data row: one, or several when packed (`ids`, with
    `position_ids` restarting at every example)."""
    n = len(row["input_ids"])
    if "ids" not in row:
        return [(str(row["id"]), 0, n)]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    assert len(starts) == len(row["ids"]), "a packed row's position_ids restart once per example"
    return [(str(e), a, b - a) for e, a, b in zip(row["ids"], starts, [*starts[1:], n])]


def noise_examples(input_ids: torch.Tensor, labels: torch.Tensor, rows: list[dict], rate: float, seed: int,
                   step: int, replace_id: int | None = None,
                   vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`noise_inputs` example by example: row b of the batch is `rows[b]` collated, and each example in it draws from
    its own generator (`example_generator`), so its mask does not depend on the rows around it."""
    noised, chosen = input_ids.clone(), torch.zeros_like(labels, dtype=torch.bool)
    for b, row in enumerate(rows):
        for example_id, at, n in segments(row):
            part = slice(at, at + n)
            noised[b, part], chosen[b, part] = noise_inputs(input_ids[b, part], labels[b, part], rate,
                                                             example_generator(seed, step, example_id), replace_id,
                                                             vocab_size)
    return noised, chosen


def unused_token_id(tokenizer, num_rows: int, mask_token: str | None = None) -> int:
    """The id `noise=mask` uses: `mask_token`, the tokenizer's mask token, a spare embedding row, or the last special
    token other than BOS/EOS/pad/unk (see the module docstring)."""
    if mask_token is not None:
        tid = tokenizer.convert_tokens_to_ids(mask_token)
        if tid is None or tid >= num_rows or (tid == tokenizer.unk_token_id and mask_token != tokenizer.unk_token):
            raise ConfigError(f"objective.mask_token={mask_token!r} is not a single token of this tokenizer. Name one "
                              f"of its special tokens that the data never contains, or use objective.noise=random.")
        return tid
    if tokenizer.mask_token_id is not None and tokenizer.mask_token_id < num_rows:
        return tokenizer.mask_token_id
    if num_rows > len(tokenizer):
        return len(tokenizer)
    reserved = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    special = [i for i, t in tokenizer.added_tokens_decoder.items() if t.special and i not in reserved and i < num_rows]
    if not special:
        raise ConfigError("objective.noise=mask: this tokenizer has no mask token, no spare embedding row and no "
                          "unused special token to stand for <mask>. Set objective.mask_token to a token the data "
                          "never contains, or use objective.noise=random (the paper's GSM8K setting) or noise=pad.")
    return max(special)


@torch.no_grad()
def set_mean_embedding(model, token_id: int, num_tokens: int) -> None:
    """Set row `token_id` of the input and output embeddings to the mean of the other rows below `num_tokens`."""
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    weights = {id(m.weight): m.weight for m in layers if m is not None and m.weight.shape[0] > token_id}
    for w in weights.values():
        rows = w[:num_tokens].float()
        mean = (rows.sum(0) - (rows[token_id] if token_id < num_tokens else 0)) / (num_tokens - (token_id < num_tokens))
        w[token_id] = mean.to(w.dtype)


class MaskedThought:
    """Masked Thought: SFT with the response tokens of the input randomly replaced (see the module docstring).

    Args:
        rate: p, the (final) replacement probability of a response token, in [0, 1) (paper: 0.4 GSM8K, 0.2 MATH).
        noise: random (uniform vocabulary id) | mask (an unused token set to the mean embedding) | pad (the pad
            id, which is EOS for tokenizers without a pad token, e.g. SmolLM2 and Llama-2).
        warmup_ratio: w, the fraction of the optimizer steps over which the rate ramps up linearly; 0 = constant.
        mask_token: noise=mask: the token to use (null = chosen automatically).
        chunk_size: positions per chunk of the LM head + cross-entropy (None = auto, as in objective=sft).
    """

    can_pack = True
    data_kind = "sft"
    collate = staticmethod(collate)

    def __init__(self, rate: float = 0.4, noise: str = "random", warmup_ratio: float = 0.66,
                 mask_token: str | None = None, chunk_size: int | None = None):
        if not 0 <= rate < 1:
            raise ConfigError(f"objective.rate={rate} must be in [0, 1) (the paper uses 0.4 on GSM8K, 0.2 on MATH).")
        if noise not in NOISES:
            raise ConfigError(f"objective.noise={noise!r} must be one of {', '.join(NOISES)}.")
        if not 0 <= warmup_ratio <= 1:
            raise ConfigError(f"objective.warmup_ratio={warmup_ratio} must be in [0, 1] (0 = constant rate).")
        if mask_token is not None and noise != "mask":
            raise ConfigError(f"objective.mask_token is only read by noise=mask (this run: noise={noise}).")
        self.rate, self.noise, self.warmup_ratio, self.mask_token = rate, noise, warmup_ratio, mask_token
        if noise == "mask":  # engines it cannot run under (dist.check_engine_limits), refused before the model loads
            self.name, self.instead = "masked_thought with objective.noise=mask", "objective.noise=random or pad"
            self.not_under = {e: "writes the mean embedding into the mask token's row of the embedding matrix, which "
                                 "that engine splits across the ranks" for e in ("fsdp2", "zero3")}
        self.chunk_size = chunk_size
        self.replace_id: int | None = None
        self.vocab_size: int | None = None
        self.seed, self.step, self.total_steps, self.micro = 0, 0, 1, 0
        self.rows: list[list[dict]] = []

    def setup(self, run) -> None:
        """Pick the replacement id (and initialise the mask token's embedding to the mean)."""
        model, tok = run.acc.unwrap_model(run.model), run.tokenizer
        rows = model.get_input_embeddings().num_embeddings  # not the weight's shape: empty under ZeRO-3
        self.seed = run.cfg.seed
        self.vocab_size = min(tok.vocab_size, rows)
        if self.noise == "pad":
            self.replace_id = tok.pad_token_id
        elif self.noise == "mask":
            self.replace_id = unused_token_id(tok, rows, self.mask_token)
            name = tok.convert_ids_to_tokens(self.replace_id) if self.replace_id < len(tok) else "(spare row)"
            for what, data in (("training", run.data.train), ("held-out", run.data.eval)):
                if any(self.replace_id in r["input_ids"] for r in data):
                    raise ConfigError(f"objective.noise=mask: the stand-in mask token {name!r} (id {self.replace_id}) "
                                      f"occurs in the {what} data, so masked and real tokens would look alike. Set "
                                      f"objective.mask_token to a token the data never contains, or use noise=random.")
            set_mean_embedding(model, self.replace_id, min(len(tok), rows))
            log.info("Masked Thought: <mask> is token %r (id %d), its embedding set to the mean embedding.", name,
                     self.replace_id)

    def before_step(self, run, rows: list[list[dict]]) -> None:
        """Record the step (the mask rate and the random draws depend on it) and this process's rows (which examples
        each micro-batch holds)."""
        self.step, self.total_steps, self.micro, self.rows = run.step, run.total_steps, 0, rows

    def normalizer(self, batch: dict[str, torch.Tensor]) -> int:
        return label_count(batch)

    def current_rate(self) -> float:
        return mask_rate(self.step, self.total_steps, self.rate, self.warmup_ratio)

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        metrics = {}
        rate = self.current_rate()
        if dist.in_training_mode(model):  # held-out losses are measured on clean inputs
            replaced = 0.0
            if rate > 0:
                rows = self.rows[self.micro] if self.micro < len(self.rows) else None
                if rows is None or len(rows) != len(batch["input_ids"]):
                    raise RuntimeError("MaskedThought: a training forward needs before_step(run, rows) with the "
                                       "rows of each micro-batch, in the order they are passed.")
                ids, chosen = noise_examples(batch["input_ids"], batch["labels"], rows, rate, self.seed, self.step,
                                             self.replace_id, self.vocab_size)
                batch, replaced = dict(batch, input_ids=ids), float(chosen[:, 1:].sum())
            self.micro += 1
            metrics["mask_rate"] = replaced  # a sum: the loop divides it by the label tokens
        return labelled_ce_sum(model, batch, self.chunk_size), metrics
