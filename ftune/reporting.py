"""How a command's errors reach the user: the errors a user can fix become one paragraph and exit code 2; the
libraries' noise that asks nothing of the user is silenced. Every entry point (train, eval, generate, select) runs
its job through `run_reporting_errors`."""

from __future__ import annotations

import logging
import os
import sys

from ftune.run_record import LOG_FORMAT, begin_job, end_job


def quiet_library_noise(cfg) -> None:
    """Silence messages the libraries print on every run that ask nothing of the user: DeepSpeed's "unable to detect
    a GPU" warning when accelerate merely imports it on a machine without an accelerator (the CPU is then named for
    it), peft's call of a deprecated transformers property, and bitsandbytes' hint about an optional 4-bit CPU kernel
    package unless the run quantizes."""
    import warnings

    import torch
    from omegaconf import OmegaConf

    if "DS_ACCELERATOR" not in os.environ and not torch.accelerator.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    if not (OmegaConf.is_config(cfg) and OmegaConf.select(cfg, "peft.quantize", default=None)):
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def run_reporting_errors(fn, cfg, hydra_job: bool = False):
    """Run fn(cfg); turn the errors a user can fix into one clear paragraph and exit code 2. `hydra_job`: fn is the
    job of a Hydra entry point (its command line and run record come from Hydra's node: ftune/run_record.py)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    quiet_library_noise(cfg)
    root = logging.getLogger()
    if not root.handlers:  # `python -m ftune.train` (torchrun, accelerate launch): no CLI set it up
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    for handler in root.handlers:  # Hydra's own console format ("[HYDRA] ...") is for its launcher's messages
        if type(handler) is logging.StreamHandler:
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.setLevel(min(root.level or logging.INFO, logging.INFO))

    from ftune.config import ConfigError
    from ftune.data.sources import DataError
    from ftune.models.loading import ModelLoadError

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN and "output_dir" in cfg:
        cfg.output_dir = HydraConfig.get().runtime.output_dir  # sweep job k writes to <output_dir>/k
    from ftune.training.checkpoint import SaveError
    from ftune.training.watchdog import TrainingError

    begin_job(hydra_job)
    try:
        return fn(cfg)
    except (ConfigError, DataError, ModelLoadError, SaveError, TrainingError) as e:
        kind = next(k for cls, k in ((ConfigError, "config"), (DataError, "data"), (ModelLoadError, "model"),
                                     (SaveError, "save"), (TrainingError, "training")) if isinstance(e, cls))
        print(f"ftune: {kind} error: {e}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:  # gloo's timeout at a collective, or a peer gone: said with what to look at
        from ftune.training.network import collective_timeout_said, peer_closed_said

        said = collective_timeout_said(e, cfg) or peer_closed_said(e)
        if said is None:
            raise
        print(f"ftune: distributed error: {said}", file=sys.stderr)
        sys.exit(2)
    finally:
        end_job()


HYDRA_COMMANDS = ("train", "eval", "generate", "select")


def run_hydra_main(main, command: str, overrides: list[str]) -> None:
    """Run the Hydra entry point `main` of `ftune COMMAND`. Hydra composes the command line once; what it cannot
    compose (a misspelt key, a group option that does not exist, a value of the wrong type) is said as one config
    error, exit code 2, by the first process only (torchrun's ranks all compose the same command line)."""
    from hydra.errors import ConfigCompositionException, OverrideParseException

    from ftune.config import explain_composition_error

    before = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises what it cannot compose instead of printing it
    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"ftune: config error: {explain_composition_error(command, overrides, e)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before
