"""Loss-spike guard (`trainer.spike_factor`): skip an optimizer step whose loss jumps far above the recent median.

A step whose loss exceeds `factor` x the median of the last `window` accepted step losses is not applied (its
gradients are dropped) and is counted. Once the history holds `min_history` losses the guard is active. If the loss
stays high for `patience` steps in a row it is taken as a new level (a harder part of the data, say), accepted, and
the guard goes on from there, so a real shift never stalls training. Its state is saved in checkpoints, so a resumed
run makes the same decisions as an uninterrupted one.

Related practice: axolotl's LossWatchDogCallback stops a run after `patience` steps above a fixed threshold; here the
threshold is relative to the run's own recent losses and the step is skipped rather than the run stopped.
"""

from __future__ import annotations

import statistics
from collections import deque


class TrainingError(RuntimeError):
    """Training cannot go on for a reason the user can fix (the message says how): `ftune` says it in a paragraph."""


class SpikeGuard:
    """`is_spike(loss)` -> True if the step should be skipped; accepted losses enter the history."""

    def __init__(self, factor: float, window: int = 32, min_history: int = 8, patience: int = 3):
        self.factor, self.min_history, self.patience = factor, min_history, patience
        self.history: deque[float] = deque(maxlen=window)
        self.in_a_row = 0
        self.skipped = 0

    def threshold(self) -> float | None:
        if self.factor <= 0 or len(self.history) < self.min_history:
            return None
        return self.factor * statistics.median(self.history)

    def is_spike(self, loss: float) -> bool:
        limit = self.threshold()
        if limit is not None and loss > limit and self.in_a_row < self.patience:
            self.in_a_row += 1
            self.skipped += 1
            return True
        self.in_a_row = 0
        self.history.append(loss)
        return False

    def state_dict(self) -> dict:
        return {"history": list(self.history), "in_a_row": self.in_a_row, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(state["history"])
        self.in_a_row, self.skipped = state["in_a_row"], state["skipped"]
