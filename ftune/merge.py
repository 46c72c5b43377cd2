"""`ftune merge RUN_DIR [--out DIR] [--force]`: fold a run's adapter into its base model and save a plain HF model.

The output (default RUN_DIR/merged/) holds safetensors weights, config.json and the tokenizer, loadable with
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`. It is written to a temporary directory and
renamed into place, so an interrupted merge leaves nothing half-written; an existing directory is kept unless --force.
The base is loaded unquantized in float32 (for QLoRA: the original full-precision weights rather than their NF4
codes, the usual way a QLoRA adapter is merged), the method folds its update in, and the result is saved in the run's
`model.dtype`. Each PEFT method merges itself (`merge(base, directory)`); one that cannot (prompt tuning) says so.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from ftune.config import ConfigError


def merge_run(run_dir: str | Path, out: str | Path | None = None, force: bool = False) -> Path:
    """Merge the adapter of `run_dir` (a run, its final/ or a checkpoint-N/) into its base; returns the output dir."""
    from ftune.config import build
    from ftune.models.loading import DTYPES, load_model, load_tokenizer
    from ftune.models.runs import _weights_dir

    run_dir = Path(run_dir).expanduser()
    weights = _weights_dir(run_dir)
    out = Path(out).expanduser() if out else run_dir / "merged"
    if out.exists() and not force:
        raise ConfigError(f"{out} already exists. Pass --force to replace it, or --out DIR for another directory.")
    if not (weights / "ftune_config.yaml").exists():
        raise ConfigError(f"{weights} has no ftune_config.yaml, so its base model and PEFT method are unknown. Point "
                          f"RUN_DIR at a directory written by `ftune train`.")
    saved = OmegaConf.load(weights / "ftune_config.yaml")
    method = build(saved.peft)
    if not method.adapter:
        raise ConfigError(f"{weights} is a full fine-tune (peft={saved.peft._target_}): it already is a plain model, "
                          f"loadable with AutoModelForCausalLM.from_pretrained('{weights}'). Nothing to merge.")
    base, _, _ = load_model(OmegaConf.merge(saved.model, {"dtype": "float32"}), None)
    merged = method.merge(base, weights).to(DTYPES[saved.model.dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(weights).save_pretrained(tmp)
        (tmp / "ftune_merge.json").write_text(json.dumps(
            {"source": str(weights.resolve()), "peft": saved.peft._target_, "base": saved.model.name_or_path,
             "dtype": saved.model.dtype}, indent=2) + "\n")
        tmp.chmod(0o755)
        if out.exists():  # --force
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    from ftune.cli import run_reporting_errors

    parser = argparse.ArgumentParser(prog="ftune merge", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("run_dir", help="a run directory (or its final/ or a checkpoint-N/)")
    parser.add_argument("--out", default=None, help="output directory (default RUN_DIR/merged)")
    parser.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = run_reporting_errors(lambda a: merge_run(a.run_dir, a.out, a.force), args)
    print(f"merged model: {out}")


if __name__ == "__main__":
    sys.argv[0] = "ftune merge"
    main()
