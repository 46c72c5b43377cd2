"""Where configs, recipes and caches live, in a source checkout and in an installed wheel alike."""

from __future__ import annotations

import os
from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _first_existing(name: str) -> Path:
    # Wheel: ftune/configs; source checkout (also editable installs): <repo>/configs.
    for candidate in (_PKG / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"ftune's {name}/ directory is missing from {_PKG} and {_PKG.parent}; reinstall ftune.")


def configs_dir() -> Path:
    return _first_existing("configs")


def recipes_dir() -> Path:
    return _first_existing("recipes")


def ftune_home() -> Path:
    """Cache root for converted models and tokenized data: $FTUNE_HOME, default ~/.cache/ftune."""
    return Path(os.environ.get("FTUNE_HOME") or Path.home() / ".cache" / "ftune").expanduser()
