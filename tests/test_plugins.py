"""Adding an objective is one class and no edit to ftune: the objective below lives in this test file and is named by
`objective._target_` (ftune/protocols.py is its contract; the preflight checks it fits)."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ftune.config import ConfigError
from ftune.data.batching import collate

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import make_cfg, run  # noqa: E402


class FirstAnswerTokenCE:
    """Cross-entropy of the first response token of each example only (a toy objective), with `weight` scaling
    it; it records what the loop gave it and what it returned."""

    data_kind = "sft"
    can_pack = False
    collate = staticmethod(collate)
    seen: list[dict] = []

    def __init__(self, weight: float = 1.0):
        self.weight = weight
        FirstAnswerTokenCE.seen = []

    def setup(self, run) -> None:
        FirstAnswerTokenCE.seen.append({"setup": type(run).__name__})

    def before_step(self, run, rows: list[list[dict]]) -> None:
        FirstAnswerTokenCE.seen.append({"before_step": run.step})

    def _first(self, labels: torch.Tensor) -> torch.Tensor:
        """(row, position) of each row's first label != -100, as logits positions (shifted by one)."""
        ok = labels[:, 1:] != -100
        return ok.float().argmax(1), ok.any(1)

    def normalizer(self, batch: dict[str, torch.Tensor]) -> int:
        return int(self._first(batch["labels"])[1].sum())

    def __call__(self, model, batch):
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        pos, has = self._first(batch["labels"])
        rows = torch.arange(len(pos))[has]
        logits = out.logits[rows, pos[has]]
        targets = batch["labels"][rows, pos[has] + 1]
        loss = self.weight * F.cross_entropy(logits.float(), targets, reduction="sum")
        FirstAnswerTokenCE.seen.append({"loss_sum": float(loss.detach()), "n": int(has.sum())})
        return loss, {"first_token_ce": float(loss.detach())}


class NoNormalizer:
    data_kind = "sft"
    collate = staticmethod(collate)

    def setup(self, run) -> None: ...

    def before_step(self, run, rows) -> None: ...

    def __call__(self, model, batch): ...


def test_an_objective_defined_outside_ftune_trains_through_the_loop(tmp_path):
    # Its YAML, in a config directory of the user's own (`ftune train --config-dir DIR objective=first_token`).
    (tmp_path / "conf" / "objective").mkdir(parents=True)
    (tmp_path / "conf" / "objective" / "first_token.yaml").write_text(
        f"_target_: {__name__}.FirstAnswerTokenCE\nweight: 0.5\n")
    cfg = make_cfg(tmp_path / "run", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "objective=first_token",
                   "trainer.max_steps=2", "trainer.batch_size=4")
    assert cfg.objective.weight == 0.5
    run(cfg)
    seen = FirstAnswerTokenCE.seen
    # It sees the run's narrow context, not the trainer; before_step with the loop's step.
    assert seen[0] == {"setup": "RunContext"} and [s["before_step"] for s in seen if "before_step" in s] == [0, 1]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["loss"] for r in rows if "loss" in r]
    # The loop's step loss is this objective's summed loss over its normalizer, step by step.
    calls = [s for s in seen if "loss_sum" in s]
    per_step = [calls[:len(calls) // 2], calls[len(calls) // 2:]]
    expected = [sum(c["loss_sum"] for c in cs) / sum(c["n"] for c in cs) for cs in per_step]
    assert len(logged) == 2 and all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(logged, expected)), \
        (logged, expected)
    assert (tmp_path / "run" / "final").is_dir()


def test_a_plug_in_missing_part_of_its_interface_is_refused_before_anything_loads(tmp_path):
    from ftune import preflight

    cfg = make_cfg(tmp_path / "run", f"objective._target_={__name__}.NoNormalizer")
    with pytest.raises(ConfigError, match=rf"objective\._target_={re.escape(__name__)}\.NoNormalizer lacks normalizer "
                                          rf"of the Objective interface \(ftune/protocols\.py"):
        preflight.train(cfg)
