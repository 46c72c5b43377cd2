"""Run by torchrun in tests/test_fsdp.py and tests/test_deepspeed.py: train with accelerate's FSDP2 or DeepSpeed engine
on CPU (gloo), then write this rank's view of the engine to OUT/{fsdp,deepspeed}_rank{RANK}.json.

accelerate enables FSDP and DeepSpeed only on an accelerator and otherwise keeps plain data parallelism, so ftune
refuses trainer.distributed=fsdp2 / deepspeed_* on a CPU. Here, for the tests alone, the Accelerator is switched to
the engine's state after it is built. Everything after that runs the code that runs on GPUs, with gloo instead of NCCL:

- fsdp2: fully_shard through accelerate's `fsdp2_prepare_model`, DTensor gradient clipping, ftune's full-state-dict
  save and resume;
- deepspeed (the ZeRO stage from trainer.distributed=deepspeed_zero2/3, or, with trainer.distributed=ddp, the plugin
  accelerate builds from the ACCELERATE_DEEPSPEED_* environment an `accelerate launch --config_file` sets): ZeRO-3's
  `zero.Init` while transformers builds the model, `deepspeed.initialize` through `accelerator.prepare`, the engine's
  backward and step on DeepSpeed's CPU accelerator, its parameter gathering for the final save.

    python -m torch.distributed.run --nproc_per_node=2 tests/_sharded_worker.py fsdp2|deepspeed OUT [overrides ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _tiny import make_cfg


def switched_on_cpu(real, engine: str):
    def make(cfg):
        from accelerate.state import PartialState
        from accelerate.utils import DeepSpeedPlugin, DistributedType

        from ftune.training import distributed as dist

        acc = real(cfg)  # built with ACCELERATE_USE_CPU=true: gloo, every rank joined
        if engine == "fsdp2":
            acc.state.fsdp_plugin = dist.plugins(cfg.trainer)["fsdp_plugin"]
            if acc.state.mixed_precision != "no":  # as AcceleratorState does
                acc.state.fsdp_plugin.set_mixed_precision(acc.state.mixed_precision)
            kind = DistributedType.FSDP
        else:
            plugin = (dist.plugins(cfg.trainer)["deepspeed_plugin"] if cfg.trainer.distributed != "ddp"
                      else DeepSpeedPlugin())
            plugin.set_mixed_precision(acc.state.mixed_precision)  # as AcceleratorState does: DeepSpeed's bf16 mode
            acc.state.deepspeed_plugins = {"default": plugin}
            plugin.select(_from_accelerator_state=True)  # also registers the ZeRO config with transformers
            kind = DistributedType.DEEPSPEED
        acc.state.distributed_type = kind
        PartialState._shared_state["distributed_type"] = kind
        assert acc.is_fsdp2 == (engine == "fsdp2")
        dist.check_state(cfg, acc)
        return acc

    return make


def fsdp2_view(trainer) -> dict:
    from torch.distributed.tensor import DTensor

    params = dict(trainer.model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    return {"world": trainer.acc.num_processes, "fsdp2": trainer.acc.is_fsdp2,
            "sharded": all(isinstance(params[n], DTensor) for n in trainable),
            "local_numel": sum(params[n].to_local().numel() for n in trainable),
            "full_numel": sum(params[n].numel() for n in trainable),
            # the dtype FSDP2 gathers the weights in for compute (its MixedPrecisionPolicy; None: as stored)
            "param_dtype": str(trainer.model._get_fsdp_state()._mp_policy.param_dtype)}


def deepspeed_view(trainer) -> dict:
    engine = trainer.model  # accelerate's prepare returns DeepSpeed's engine in place of the model
    return {"world": trainer.acc.num_processes, "engine": type(engine).__name__,
            "optimizer": type(engine.optimizer).__name__, "stage": engine.zero_optimization_stage(),
            # the weights' dtypes (ZeRO-3: of each rank's part, `ds_tensor`). Under bf16, ZeRO-3's zero.Init makes
            # the model's own weights bf16 and leaves an adapter's, added after it, in float32.
            "dtypes": {kind: sorted({str(getattr(p, "ds_tensor", p).dtype) for p in engine.module.parameters()
                                     if p.requires_grad == (kind == "trainable")}) for kind in ("trainable", "frozen")},
            # ZeRO-3 keeps each rank's part of every weight in `ds_tensor` (the weight itself is a placeholder, or
            # stays gathered after a forward when it is below DeepSpeed's persistence threshold).
            "partitioned": all(hasattr(p, "ds_tensor") and p.ds_tensor.numel() < p.ds_numel
                               for p in engine.module.parameters())}


def recording_gathers(real, seen: list):
    """dist.full_parameters, recording on each entry how many trainable and frozen parameters are held in full
    (FSDP2: not a DTensor; ZeRO-3: not an empty placeholder) while the PEFT method saves or loads. ZeRO-3 keeps
    parameters below its persistence threshold gathered all the time (`ds_persist`): frozen ones are not counted."""
    import contextlib

    from torch.distributed.tensor import DTensor

    @contextlib.contextmanager
    def wrapped(acc, model, *args, **kwargs):
        with real(acc, model, *args, **kwargs) as unwrapped:
            trainable = [p for p in unwrapped.parameters() if p.requires_grad]
            frozen = [p for p in unwrapped.parameters() if not p.requires_grad and not getattr(p, "ds_persist", False)]
            seen.append({"trainable": len(trainable), "frozen": len(frozen),
                         **{f"{k}_full": sum(not isinstance(p, DTensor) and p.numel() > 0 for p in ps)
                            for k, ps in (("trainable", trainable), ("frozen", frozen))}})
            yield unwrapped

    return wrapped


def counting_reduces(real, seen: list):
    """dist.backward, recording for each micro-batch whether it was the step's last and how many times FSDP2 reduced
    (reduce-scattered) gradients during its backward."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as groups

    calls, reduce = [0], groups.foreach_reduce

    def counted(*args, **kwargs):
        calls[0] += 1
        return reduce(*args, **kwargs)

    groups.foreach_reduce = counted

    def backward(acc, model, loss, last):
        before = calls[0]
        real(acc, model, loss, last)
        seen.append({"last": last, "reduces": calls[0] - before})

    return backward


def main() -> None:
    from ftune.train import Trainer
    from ftune.training import distributed as dist

    engine, out, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    dist.accelerator_available = lambda: True
    dist.make_accelerator = switched_on_cpu(dist.make_accelerator, engine)
    gathers: list = []
    dist.full_parameters = recording_gathers(dist.full_parameters, gathers)
    backwards: list = []
    if engine == "fsdp2":
        dist.backward = counting_reduces(dist.backward, backwards)
    trainer = Trainer(make_cfg(out, *(["trainer.distributed=fsdp2"] if engine == "fsdp2" else []), *overrides))
    seen = deepspeed_view(trainer) if engine == "deepspeed" else None  # before a forward gathers anything
    trainer.run()
    seen = {**(seen or fsdp2_view(trainer)), "gathers": gathers, "backwards": backwards}
    name = "fsdp" if engine == "fsdp2" else "deepspeed"
    (out / f"{name}_rank{trainer.acc.process_index}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    from ftune.training.distributed import end_process_group

    try:
        main()
    finally:
        end_process_group()
