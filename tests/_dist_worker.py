"""Run by torchrun in tests/test_distributed.py: train with the given overrides, then write this rank's digest of its
trainable parameters (sha256 of each tensor's bytes) to OUT/params_rank{RANK}.json.

    python -m torch.distributed.run --nproc_per_node=2 tests/_dist_worker.py OUT [overrides ...]
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from _tiny import make_cfg


def digest(model) -> dict[str, str]:
    return {n: hashlib.sha256(p.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
            for n, p in model.named_parameters() if p.requires_grad}


def main() -> None:
    from ftune.train import Trainer

    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    trainer = Trainer(make_cfg(out, *overrides))
    before = digest(trainer.acc.unwrap_model(trainer.model))
    trainer.run()
    after = digest(trainer.acc.unwrap_model(trainer.model))
    rank = trainer.acc.process_index
    (out / f"params_rank{rank}.json").write_text(json.dumps({
        "world": trainer.acc.num_processes, "trainable": after, "changed": before != after}))


if __name__ == "__main__":
    from ftune.training.distributed import end_process_group

    try:
        main()
    finally:
        end_process_group()
