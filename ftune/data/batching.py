"""Packing, collation and the seeded, resumable batch order.

Collated batches carry `position_ids` and no attention mask: rows are right-padded, so with causal attention no real
token ever sees padding. Packed rows restart `position_ids` at every example; transformers (sdpa/eager) then builds a
block-diagonal mask, provided the forward gets `attention_mask=None` and `use_cache=False`, so packed examples never
attend to each other.
"""

from __future__ import annotations

import torch

from ftune.data.tokenize import IGNORE


def pack(rows: list[dict], max_length: int) -> list[dict]:
    """Greedy first-fit-decreasing packing into rows of at most `max_length` tokens.

    Each output row has input_ids, labels, position_ids (restarting per example) and ids (the source examples).
    """
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = len(rows[i]["input_ids"])
        for b, free in enumerate(space):
            if n <= free:
                bins[b].append(i)
                space[b] -= n
                break
        else:
            bins.append([i])
            space.append(max_length - n)
    packed = []
    for members in bins:
        members.sort()
        packed.append({
            "input_ids": [t for i in members for t in rows[i]["input_ids"]],
            "labels": [t for i in members for t in rows[i]["labels"]],
            "position_ids": [p for i in members for p in range(len(rows[i]["input_ids"]))],
            "ids": [rows[i]["id"] for i in members],
        })
    return packed


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest one; padding is never labelled and positions continue monotonically."""
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[b, :n] = torch.tensor(r["input_ids"])
        labels[b, :n] = torch.tensor(r["labels"])
        pos = r.get("position_ids") or list(range(n))
        position_ids[b, :n] = torch.tensor(pos)
        if n < width:
            position_ids[b, n:] = torch.arange(pos[-1] + 1, pos[-1] + 1 + width - n)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def collate_packed(seqs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Collate sequences several to a row, without padding between them: `pack` into rows as wide as the longest
    sequence (first-fit decreasing), then `collate`. `seq_ids` (rows, width) gives each token's index in `seqs`
    (-1 on padding), so per-sequence sums survive the packing; position_ids restart at every sequence, so none
    attends to another (see the module docstring)."""
    width = max(len(s["input_ids"]) for s in seqs)
    rows = pack([{"input_ids": s["input_ids"], "labels": s["labels"], "id": i} for i, s in enumerate(seqs)], width)
    batch = collate(rows, pad_id)
    seq_ids = torch.full_like(batch["input_ids"], -1)
    for b, r in enumerate(rows):
        at = 0
        for i in r["ids"]:
            n = len(seqs[i]["input_ids"])
            seq_ids[b, at: at + n] = i
            at += n
    batch["seq_ids"] = seq_ids
    return batch


def row_tokens(row: dict) -> int:
    """Real (non-padding) tokens of a row, whatever the objective's row layout (input_ids, chosen_input_ids, ...)."""
    return sum(len(v) for k, v in row.items() if k.endswith("input_ids"))


def label_count(batch: dict[str, torch.Tensor]) -> int:
    """Number of predicted tokens (labels after the causal shift) in a batch."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


# data.group_by_length: global micro-batches per length-sorted pool (HF's LengthGroupedSampler uses 50 batches).
GROUP_POOL = 64


class BatchOrder:
    """Which rows form micro-batch `k` of optimizer step `step`, for this process.

    The order is a seeded permutation per epoch, so any step's batches are computed directly from the step number:
    resuming needs no replay of the data. The global micro-batch (batch_size x world_size rows) is split by rank.

    With `lengths` (data.group_by_length=true) each epoch's permutation is cut into pools of GROUP_POOL global
    micro-batches; each pool is sorted by length and cut into global micro-batches, whose order over the epoch is then
    shuffled, except that the one holding the epoch's longest row comes first. A micro-batch thus holds rows of similar
    length (little padding, and balanced ranks), while which lengths come when stays random. Rows an epoch leaves out
    (fewer than one step's worth) are still chosen at random.
    """

    def __init__(self, num_rows: int, batch_size: int, grad_accum: int, world_size: int, rank: int, seed: int,
                 lengths: list[int] | None = None):
        self.num_rows, self.bs, self.accum, self.world, self.rank, self.seed = (
            num_rows, batch_size, grad_accum, world_size, rank, seed)
        if lengths is not None and len(lengths) != num_rows:
            raise ValueError(f"{len(lengths)} lengths for {num_rows} rows")
        self.lengths = lengths
        self.rows_per_step = batch_size * grad_accum * world_size
        self.steps_per_epoch = num_rows // self.rows_per_step
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.num_rows, generator=g).tolist()
            self._perm = perm if self.lengths is None else self._grouped(perm, g)
            self._perm_epoch = epoch
        return self._perm

    def _grouped(self, perm: list[int], g: torch.Generator) -> list[int]:
        group = self.bs * self.world  # one global micro-batch
        used = len(perm) - len(perm) % group  # the rest is left out this epoch (it is already a random choice)
        groups = []
        for s in range(0, used, group * GROUP_POOL):
            pool = sorted(perm[s: min(s + group * GROUP_POOL, used)], key=lambda i: -self.lengths[i])
            groups += [pool[k: k + group] for k in range(0, len(pool), group)]
        shuffled = [groups[i] for i in torch.randperm(len(groups), generator=g).tolist()]
        # The micro-batch with the epoch's longest row goes first, as in HF's LengthGroupedSampler: a batch too large
        # for memory fails in the first step, not hours in, and the allocator reaches its peak once (CPU: a later,
        # larger batch would fault fresh memory in mid-run).
        if shuffled:
            top = max(range(len(shuffled)), key=lambda k: max(self.lengths[i] for i in shuffled[k]))
            shuffled[0], shuffled[top] = shuffled[top], shuffled[0]
        return [i for grp in shuffled for i in grp] + perm[used:]

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, offset = divmod(step, self.steps_per_epoch)
        perm = self._permutation(epoch)
        start = offset * self.rows_per_step
        out = []
        for k in range(self.accum):
            g0 = start + k * self.bs * self.world + self.rank * self.bs
            out.append(perm[g0: g0 + self.bs])
        return out

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch
