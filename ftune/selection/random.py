"""Uniform random subset: the baseline every selection method is compared against."""

from __future__ import annotations

import random

from ftune.config import ConfigError


class RandomSelection:
    """Keep `budget` examples drawn uniformly without replacement (seeded; order of the source kept)."""

    any_data_kind = True  # it never reads a record: preference pairs and many-shot examples are drawn alike

    def __init__(self, budget: int):
        if budget < 1:
            raise ConfigError(f"selection.budget={budget} must be >= 1.")
        self.budget = budget

    def __call__(self, records: list[dict], seed: int) -> tuple[list[dict], dict]:
        if self.budget >= len(records):
            return records, {"selected": len(records), "pool": len(records)}
        keep = sorted(random.Random(seed).sample(range(len(records)), self.budget))
        return [records[i] for i in keep], {"selected": len(keep), "pool": len(records)}
