"""Session-wide test setup: offline hub, a private FTUNE_HOME, Hydra composition and the tiny tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before anything imports huggingface_hub / datasets: they read these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from ftune.config import register_configs  # noqa: E402

register_configs()


@pytest.fixture(scope="session", autouse=True)
def ftune_home(tmp_path_factory) -> Path:
    """FTUNE_HOME for the whole session: $FTUNE_TEST_HOME if set (a reusable cache), else a fresh temp dir."""
    home = Path(os.environ.get("FTUNE_TEST_HOME") or tmp_path_factory.mktemp("ftune_home")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("FTUNE_HOME")
    os.environ["FTUNE_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("FTUNE_HOME", None)
    else:
        os.environ["FTUNE_HOME"] = old


@pytest.fixture
def compose():
    """compose(overrides, config_name="train") -> the composed DictConfig (without the `hydra` node)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ftune.paths import configs_dir

    def _compose(overrides=(), config_name: str = "train"):
        with initialize_config_dir(config_dir=str(configs_dir()), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=False)

    return _compose


@pytest.fixture(scope="session")
def tiny_tokenizer(ftune_home):
    """The embedded SmolLM2 tokenizer (ChatML template), as saved with the `tiny_random` model."""
    from ftune.models.loading import load_tokenizer, resolve_model_dir

    return load_tokenizer(resolve_model_dir("tiny_random"))
