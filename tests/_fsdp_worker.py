"""Run by torchrun in tests/test_fsdp.py: train with accelerate's FSDP2 engine on CPU (gloo), then write this rank's
view of its parameters to OUT/fsdp_rank{RANK}.json.

accelerate enables FSDP only on an accelerator and otherwise keeps plain data parallelism, so ftune refuses
trainer.distributed=fsdp2 on a CPU. Here, for the test alone, the Accelerator is switched to accelerate's FSDP state
after it is built: everything after that (fully_shard through accelerate's `fsdp2_prepare_model`, DTensor gradient
clipping, ftune's full-state-dict save and resume) runs the FSDP2 code that runs on GPUs, with gloo instead of NCCL.

    python -m torch.distributed.run --nproc_per_node=2 tests/_fsdp_worker.py OUT [overrides ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _tiny import make_cfg


def fsdp_on_cpu(real):
    def make(cfg):
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        from ftune.training import distributed as dist

        acc = real(cfg)
        acc.state.fsdp_plugin = dist.plugins(cfg.trainer)["fsdp_plugin"]
        acc.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        assert acc.is_fsdp2
        dist.check_state(cfg, acc)
        return acc

    return make


def main() -> None:
    from torch.distributed.tensor import DTensor

    from ftune.train import Trainer
    from ftune.training import distributed as dist

    dist.accelerator_available = lambda: True
    dist.make_accelerator = fsdp_on_cpu(dist.make_accelerator)
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    trainer = Trainer(make_cfg(out, "trainer.distributed=fsdp2", *overrides))
    trainer.run()
    params = dict(trainer.model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    (out / f"fsdp_rank{trainer.acc.process_index}.json").write_text(json.dumps({
        "world": trainer.acc.num_processes, "fsdp2": trainer.acc.is_fsdp2,
        "sharded": all(isinstance(params[n], DTensor) for n in trainable),
        "local_numel": sum(params[n].to_local().numel() for n in trainable),
        "full_numel": sum(params[n].numel() for n in trainable)}))


if __name__ == "__main__":
    main()
