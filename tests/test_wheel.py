"""The built wheel works on its own: configs and recipes ship inside it and compose from any directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECK = """
import json, sys
import ftune, ftune.paths
from hydra import compose, initialize_config_dir
from ftune.config import register_configs
register_configs()
with initialize_config_dir(config_dir=str(ftune.paths.configs_dir()), version_base="1.3"):
    cfg = compose("train", overrides=["+recipe=quickstart"])
print(json.dumps({"file": ftune.__file__, "configs": str(ftune.paths.configs_dir()),
                  "recipes": str(ftune.paths.recipes_dir()), "max_steps": cfg.trainer.max_steps,
                  "model": cfg.model.name_or_path}))
"""


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> tuple[Path, Path]:
    """(python of a fresh venv holding only the ftune wheel, its site-packages)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("ftune", "configs", "recipes"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", ".",
         "-w", str(tmp / "dist")], cwd=src)
    (wheel,) = (tmp / "dist").glob("ftune-*.whl")

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    # Dependencies come from the main venv through a plain path line: .pth files *inside* that directory (the
    # editable-install finder of the checkout) are not processed, so `import ftune` must find the wheel's copy.
    (site / "_ftune_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, site


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


def test_wheel_composes_recipe_outside_the_repo(wheel_venv, tmp_path):
    python, site = wheel_venv
    out = run([str(python), "-c", CHECK], cwd=tmp_path, env=clean_env())
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(info["file"]).is_relative_to(site), info
    assert Path(info["configs"]) == site / "ftune" / "configs"
    assert Path(info["recipes"]) == site / "ftune" / "recipes"
    assert info["max_steps"] == 80 and info["model"] == "embedded:smollm2-135m-instruct"


def test_wheel_ships_every_config_and_the_console_script(wheel_venv, tmp_path):
    python, site = wheel_venv
    shipped = {p.relative_to(site / "ftune" / "configs") for p in (site / "ftune" / "configs").rglob("*.yaml")}
    assert shipped == {p.relative_to(REPO / "configs") for p in (REPO / "configs").rglob("*.yaml")}
    (dist_info,) = site.glob("ftune-*.dist-info")
    assert "ftune = ftune.cli:main" in (dist_info / "entry_points.txt").read_text()
    out = run([str(python), "-m", "ftune.cli", "recipes"], cwd=tmp_path, env=clean_env())
    assert {"quickstart", "lora_gsm8k"} <= {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
