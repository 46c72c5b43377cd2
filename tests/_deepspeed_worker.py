"""Run by torchrun in tests/test_deepspeed.py: train with accelerate's DeepSpeed engine on CPU (gloo), ZeRO stage from
the overrides (trainer.distributed=deepspeed_zero2 / deepspeed_zero3).

accelerate enables DeepSpeed only on an accelerator and otherwise keeps plain data parallelism, so ftune refuses
trainer.distributed=deepspeed_* on a CPU. Here, for the test alone, the Accelerator is switched to accelerate's
DeepSpeed state after it is built (as tests/_fsdp_worker.py does for FSDP2): everything after that (ZeRO-3's
`zero.Init` while transformers builds the model, `deepspeed.initialize` through `accelerator.prepare`, the engine's
backward and step, DeepSpeed's parameter gathering for the final save) runs the code that runs on GPUs, with
DeepSpeed's CPU accelerator and gloo instead of NCCL.

    python -m torch.distributed.run --nproc_per_node=2 tests/_deepspeed_worker.py OUT [overrides ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _tiny import make_cfg


def deepspeed_on_cpu(real):
    def make(cfg):
        from accelerate.state import PartialState
        from accelerate.utils import DeepSpeedPlugin, DistributedType

        from ftune.training import distributed as dist

        acc = real(cfg)  # built with ACCELERATE_USE_CPU=true: gloo, every rank joined
        # trainer.distributed=deepspeed_*: ftune's plugin; ddp: the plugin accelerate builds from the environment that
        # `accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml` sets (ACCELERATE_DEEPSPEED_*).
        plugin = (dist.plugins(cfg.trainer)["deepspeed_plugin"] if cfg.trainer.distributed != "ddp"
                  else DeepSpeedPlugin())
        acc.state.deepspeed_plugins = {"default": plugin}
        plugin.select(_from_accelerator_state=True)  # also registers the ZeRO config with transformers
        acc.state.distributed_type = DistributedType.DEEPSPEED
        PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
        dist.check_state(cfg, acc)
        return acc

    return make


def main() -> None:
    from ftune.train import Trainer
    from ftune.training import distributed as dist

    dist.accelerator_available = lambda: True
    dist.make_accelerator = deepspeed_on_cpu(dist.make_accelerator)
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    trainer = Trainer(make_cfg(out, *overrides))
    engine = trainer.model  # accelerate's prepare returns DeepSpeed's engine in place of the model
    params = list(engine.module.parameters())
    seen = {"world": trainer.acc.num_processes, "engine": type(engine).__name__,
            "optimizer": type(engine.optimizer).__name__, "stage": engine.zero_optimization_stage(),
            # ZeRO-3 keeps each rank's part of every weight in `ds_tensor` (the weight itself is a placeholder, or
            # stays gathered after a forward when it is below DeepSpeed's persistence threshold).
            "partitioned": all(hasattr(p, "ds_tensor") and p.ds_tensor.numel() < p.ds_numel for p in params)}
    trainer.run()
    (out / f"deepspeed_rank{trainer.acc.process_index}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
