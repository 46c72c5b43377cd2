"""Packing, collation and the seeded batch order (ftune.data.batching)."""

from __future__ import annotations

import random

import pytest
import torch

from ftune.data.batching import BatchOrder, collate, label_count, pack
from ftune.data.tokenize import IGNORE


def make_rows(lengths, seed=0):
    """Rows whose tokens encode their example (token = 1000 * index + position), half of each labelled."""
    rows = []
    for i, n in enumerate(lengths):
        ids = [1000 * i + p for p in range(n)]
        labels = [IGNORE] * (n // 2) + ids[n // 2:]
        rows.append({"input_ids": ids, "labels": labels, "id": f"ex-{i}"})
    return rows


@pytest.mark.parametrize("max_length", [16, 32, 100])
def test_pack_places_every_example_once_within_max_length(max_length):
    lengths = [random.Random(max_length).randint(1, 16) for _ in range(40)]
    rows = make_rows(lengths)
    packed = pack(rows, max_length)
    ids = [i for r in packed for i in r["ids"]]
    assert sorted(ids) == sorted(r["id"] for r in rows)
    assert len(ids) == len(set(ids))
    assert sum(len(r["input_ids"]) for r in packed) == sum(lengths)
    assert all(len(r["input_ids"]) <= max_length for r in packed)
    assert len(packed) >= -(-sum(lengths) // max_length)
    if max_length == 100:  # first-fit-decreasing does not waste whole rows here
        assert len(packed) <= -(-sum(lengths) // max_length) + 1


def test_pack_positions_restart_at_each_example():
    rows = make_rows([5, 3, 7, 2, 6, 1])
    by_id = {r["id"]: r for r in rows}
    for packed in pack(rows, 12):
        assert len(packed["position_ids"]) == len(packed["input_ids"]) == len(packed["labels"])
        offset = 0
        for ex_id in packed["ids"]:
            src = by_id[ex_id]
            n = len(src["input_ids"])
            assert packed["input_ids"][offset: offset + n] == src["input_ids"]
            assert packed["labels"][offset: offset + n] == src["labels"]
            assert packed["position_ids"][offset: offset + n] == list(range(n))
            offset += n
        assert offset == len(packed["input_ids"])
        starts = [i for i, p in enumerate(packed["position_ids"]) if p == 0]
        assert len(starts) == len(packed["ids"])


def test_collate_pads_without_labels_and_continues_positions():
    rows = make_rows([3, 7])
    packed_row = {"input_ids": [1, 2, 3, 4], "labels": [IGNORE, 2, IGNORE, 4], "position_ids": [0, 1, 0, 1]}
    batch = collate([*rows, packed_row], pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (3, 7)
    assert batch["input_ids"].dtype == torch.long
    for b, r in enumerate([*rows, packed_row]):
        n = len(r["input_ids"])
        assert batch["input_ids"][b, :n].tolist() == r["input_ids"]
        assert batch["labels"][b, :n].tolist() == r["labels"]
        assert (batch["input_ids"][b, n:] == 0).all()
        assert (batch["labels"][b, n:] == IGNORE).all()
        pos = batch["position_ids"][b].tolist()
        assert pos[:n] == r.get("position_ids", list(range(n)))
        tail = pos[n - 1:]
        assert all(b2 == a + 1 for a, b2 in zip(tail, tail[1:]))
    assert batch["position_ids"][2].tolist() == [0, 1, 0, 1, 2, 3, 4]
    assert label_count(batch) == sum(1 for r in [*rows, packed_row] for x in r["labels"][1:] if x != IGNORE)


def test_batch_order_deterministic_and_epochs_are_permutations():
    a = BatchOrder(num_rows=37, batch_size=4, grad_accum=2, world_size=1, rank=0, seed=7)
    b = BatchOrder(num_rows=37, batch_size=4, grad_accum=2, world_size=1, rank=0, seed=7)
    assert a.steps_per_epoch == 4
    steps = range(3 * a.steps_per_epoch)
    assert [a.micro_batches(s) for s in steps] == [b.micro_batches(s) for s in steps]
    # Jumping straight to a step (resume) gives the same batches as walking there.
    assert BatchOrder(37, 4, 2, 1, 0, 7).micro_batches(9) == a.micro_batches(9)
    epochs = []
    for e in range(3):
        seen = [i for s in range(e * 4, (e + 1) * 4) for mb in a.micro_batches(s) for i in mb]
        assert len(seen) == 32 == len(set(seen))
        assert set(seen) <= set(range(37))
        assert all(len(mb) == 4 for s in range(e * 4, (e + 1) * 4) for mb in a.micro_batches(s))
        epochs.append(seen)
    assert epochs[0] != epochs[1] != epochs[2]
    other_seed = BatchOrder(37, 4, 2, 1, 0, 8)
    assert [other_seed.micro_batches(s) for s in range(4)] != [a.micro_batches(s) for s in range(4)]


def padded_fraction(order: BatchOrder, lengths: list[int], steps: int) -> float:
    computed = useful = 0
    for s in range(steps):
        for mb in order.micro_batches(s):
            computed += max(lengths[i] for i in mb) * len(mb)
            useful += sum(lengths[i] for i in mb)
    return 1 - useful / computed


def test_group_by_length_batches_similar_lengths_and_stays_a_seeded_random_permutation():
    rng = random.Random(0)
    lengths = [rng.randint(20, 500) for _ in range(1000)]
    plain = BatchOrder(1000, batch_size=4, grad_accum=2, world_size=1, rank=0, seed=3)
    grouped = BatchOrder(1000, batch_size=4, grad_accum=2, world_size=1, rank=0, seed=3, lengths=lengths)
    n = grouped.steps_per_epoch
    assert n == 125
    # Padding: about a third of the computed tokens for random batches of 4, a few percent when grouped.
    assert padded_fraction(plain, lengths, n) > 0.25
    assert padded_fraction(grouped, lengths, n) < 0.05
    for e in range(2):  # every epoch uses each row once (1000 = 125 x 8: nothing left out)
        seen = [i for s in range(e * n, (e + 1) * n) for mb in grouped.micro_batches(s) for i in mb]
        assert sorted(seen) == list(range(1000))
    # Each epoch starts with its longest row (memory peaks in the first step); which lengths come after that stays
    # random: the next steps are not the next-longest rows, and epochs differ.
    for e in range(2):
        assert max(lengths[i] for i in grouped.micro_batches(e * n)[0]) == max(lengths)
    after = [lengths[i] for s in range(1, 10) for mb in grouped.micro_batches(s) for i in mb]
    assert max(after) - min(after) > 200
    assert grouped.micro_batches(0) != grouped.micro_batches(n)
    # Seeded and resumable: a fresh order jumping to a step gives the same batches.
    again = BatchOrder(1000, 4, 2, 1, 0, 3, lengths=lengths)
    assert again.micro_batches(n + 7) == grouped.micro_batches(n + 7)
    assert BatchOrder(1000, 4, 2, 1, 0, 4, lengths=lengths).micro_batches(0) != grouped.micro_batches(0)


def test_group_by_length_leaves_out_random_rows_and_balances_ranks():
    rng = random.Random(1)
    lengths = [rng.randint(10, 300) for _ in range(203)]  # 203 = 12 steps x 16 rows + 11 left out
    ranks = [BatchOrder(203, batch_size=4, grad_accum=2, world_size=2, rank=r, seed=5, lengths=lengths)
             for r in range(2)]
    single = BatchOrder(203, batch_size=8, grad_accum=2, world_size=1, rank=0, seed=5, lengths=lengths)
    left_out = []
    for e in range(3):
        seen = [i for s in range(e * 12, (e + 1) * 12) for rk in ranks for mb in rk.micro_batches(s) for i in mb]
        assert len(seen) == len(set(seen)) == 192
        left_out.append(set(range(203)) - set(seen))
        for s in range(e * 12, (e + 1) * 12):  # ranks split the same global micro-batch as one process of batch 8
            for k in range(2):
                r0, r1 = ranks[0].micro_batches(s)[k], ranks[1].micro_batches(s)[k]
                assert sorted(r0 + r1) == sorted(single.micro_batches(s)[k])
                widths = [max(lengths[i] for i in r) for r in (r0, r1)]
                assert max(widths) - min(widths) <= 40  # both ranks pad to about the same width
    assert left_out[0] != left_out[1] != left_out[2]  # not always the same (e.g. the shortest) rows


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_two_ranks_partition_the_single_rank_batch(grad_accum):
    single = BatchOrder(100, batch_size=8, grad_accum=grad_accum, world_size=1, rank=0, seed=1)
    ranks = [BatchOrder(100, batch_size=4, grad_accum=grad_accum, world_size=2, rank=r, seed=1) for r in range(2)]
    assert single.steps_per_epoch == ranks[0].steps_per_epoch
    for step in range(2 * single.steps_per_epoch + 1):
        big = single.micro_batches(step)
        parts = [rk.micro_batches(step) for rk in ranks]
        for k in range(grad_accum):
            r0, r1 = parts[0][k], parts[1][k]
            assert len(r0) == len(r1) == 4
            assert set(r0).isdisjoint(r1)
            assert sorted(r0 + r1) == sorted(big[k])
