"""Whole-file writes: a reader (or a crash) never sees a half-written output file."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file next to `path` (one per process), then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj, indent: int | None = None) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")
