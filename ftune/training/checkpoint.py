"""Atomic, verifiable checkpoints.

A checkpoint is written into `.tmp-checkpoint-N`, every file fsynced, then `manifest.json` (sha256 of every file) is
written last and the directory renamed to `checkpoint-N`. A directory without a manifest, or whose files do not
match it, is incomplete: resume skips it (with a warning naming it) for the previous good one. Old checkpoints are
deleted only after a newer one is complete.

Fault-injection hook (tests only): with `FTUNE_TEST_SAVE_PAUSE=SECONDS` set, `finalize` sleeps that long in two halves,
before the manifest is written and before the rename, so `scripts/crash_test.py` can SIGKILL a run inside a save.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
STATE = "training_state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class SaveError(RuntimeError):
    """A checkpoint or the final model could not be written (disk full, permissions); earlier ones are intact."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def finalize(tmp: Path, final: Path) -> Path:
    """fsync every file in `tmp`, write the manifest last, rename to `final` (replacing nothing that is complete)."""
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
            files[str(p.relative_to(tmp))] = {"sha256": _sha256(p), "bytes": p.stat().st_size}
    pause = float(os.environ.get("FTUNE_TEST_SAVE_PAUSE", 0))  # fault injection only, see the module docstring
    time.sleep(pause / 2)
    manifest = tmp / MANIFEST
    with open(manifest, "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    time.sleep(pause / 2)
    if final.exists():  # an older, identical-step leftover (e.g. re-saving the same step after resume)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def verify(ckpt: Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    manifest = ckpt / MANIFEST
    if not manifest.exists():
        return "no manifest (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return "unreadable manifest"
    for rel, meta in files.items():
        p = ckpt / rel
        if not p.exists():
            return f"missing {rel}"
        if p.stat().st_size != meta["bytes"] or _sha256(p) != meta["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_valid(root: Path) -> Path | None:
    """The newest intact checkpoint under `root`; damaged or partial ones are skipped with a warning."""
    for ckpt in reversed(list_checkpoints(root)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        log.warning("Skipping checkpoint %s: %s. Falling back to the previous one.", ckpt, problem)
    return None


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and leftover temporary directories."""
    complete = [p for p in list_checkpoints(root) if (p / MANIFEST).exists()]
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-checkpoint-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def saved_step(ckpt: Path) -> int:
    """The optimizer step a checkpoint (or final/) was saved at, read without loading its optimizer state."""
    try:
        state = torch.load(ckpt / STATE, mmap=True, weights_only=False, map_location="cpu")
    except RuntimeError:  # a file torch cannot map (saved in its legacy format): read it whole
        state = torch.load(ckpt / STATE, weights_only=False, map_location="cpu")
    return int(state["step"])


def step_of(ckpt: Path) -> int:
    m = _NAME.match(ckpt.name)
    if not m:
        raise ValueError(f"{ckpt} is not a checkpoint-N directory")
    return int(m.group(1))
