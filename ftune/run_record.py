"""The record of a run in its directory, written by the job once its checks have passed (Hydra is told to write
nothing itself: `hydra.output_subdir: null`, no job logging, `hydra.run.dir: .`), so a refused run leaves an
earlier run's directory exactly as it was and an unmakeable output_dir is an error, not a traceback.

- `.hydra/config.yaml`, `hydra.yaml`, `overrides.yaml`: what Hydra would have written. A run that continues an
  earlier one (trainer.resume) writes them to `.hydra/resume-<UTC time>/`, so the record of how the first steps
  were trained stays.
- `<command>.log` (train.log, evaluate.log, ...): this process's log from here on, as Hydra's job logging wrote it.

Only the main process of a multi-process run writes them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ftune.atomic import write_text_atomic

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


_job: list = []  # the Hydra node of the job running now (set by ftune.reporting.run_reporting_errors)


def begin_job(hydra_job: bool) -> None:
    """Called as a job starts: a Hydra entry point's job reads the command line from its Hydra node; a composed
    config used through the API (e.g. `ftune.train.train(cfg)`) has none, even after a Hydra job ran in the same
    process (Hydra leaves its node set)."""
    from hydra.core.hydra_config import HydraConfig

    _job[:] = [HydraConfig.get()] if hydra_job and HydraConfig.initialized() else []


def end_job() -> None:
    close_log()
    _job.clear()


def hydra_overrides() -> list[str] | None:
    """The command line's overrides, as the running job's Hydra node holds them (None outside a Hydra job)."""
    return list(_job[0].overrides.task) if _job else None


def given(overrides: list[str], key: str) -> str | None:
    """The value of `key=` (or `+key=`, `++key=`) among overrides, the last one if repeated."""
    value = None
    for arg in overrides:
        k, sep, v = arg.partition("=")
        if sep and k.lstrip("+~") == key:
            value = v
    return value


def given_on_command_line(key: str) -> bool:
    """Whether `key=` was on the command line; False outside a Hydra job."""
    return given(hydra_overrides() or [], key) is not None


def write(cfg: DictConfig, out: Path) -> Path | None:
    """Write the record into `out` and start its log file; returns the record's directory (None outside Hydra)."""
    if not _job:
        return None  # the API (ftune.train.train(cfg)): the caller keeps its own record
    hc = _job[0]
    where = out / ".hydra"
    if (where / "config.yaml").is_file():
        where = where / f"resume-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    where.mkdir(parents=True, exist_ok=True)
    write_text_atomic(where / "config.yaml", OmegaConf.to_yaml(cfg))
    write_text_atomic(where / "hydra.yaml", OmegaConf.to_yaml({"hydra": hc}))
    write_text_atomic(where / "overrides.yaml", OmegaConf.to_yaml(list(hc.overrides.task)))
    close_log()
    handler = logging.FileHandler(out / f"{hc.job.name}.log")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    _open.append(handler)
    return where


_open: list[logging.Handler] = []


def close_log() -> None:
    """Stop writing the log file `write` started (at the end of a job: a sweep runs several in one process)."""
    root = logging.getLogger()
    while _open:
        handler = _open.pop()
        root.removeHandler(handler)
        handler.close()
