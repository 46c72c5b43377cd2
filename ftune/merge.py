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


def load_merged(run_dir: str | Path, allow_full: bool = False):
    """(plain float32 model with the run's update folded in, its weights dir, its saved config)."""
    from ftune.config import build
    from ftune.models.loading import load_model
    from ftune.models.runs import _weights_dir

    weights = _weights_dir(Path(run_dir).expanduser())
    if (weights / "ftune_merge.json").exists() and not (weights / "ftune_config.yaml").exists():
        raise ConfigError(f"{weights} is already a merged model (written by `ftune merge` or `ftune soup`): there is "
                          f"no adapter to fold in. Use it as it is: model=hub model.name_or_path={weights}, or "
                          f"AutoModelForCausalLM.from_pretrained('{weights}').")
    if not (weights / "ftune_config.yaml").exists():
        raise ConfigError(f"{weights} has no ftune_config.yaml, so its base model and PEFT method are unknown. Point "
                          f"the path at a directory written by `ftune train`.")
    saved = OmegaConf.load(weights / "ftune_config.yaml")
    method = build(saved.peft)
    fp32 = OmegaConf.merge(saved.model, {"dtype": "float32"})
    if not method.adapter:
        if not allow_full:
            raise ConfigError(f"{weights} is a full fine-tune (peft={saved.peft._target_}): it already is a plain "
                              f"model, loadable with AutoModelForCausalLM.from_pretrained('{weights}'). Nothing to "
                              f"merge.")
        model, _, _ = load_model(OmegaConf.merge(fp32, {"name_or_path": str(weights)}), None, weights)
        return model, weights, saved
    base, _, _ = load_model(fp32, None)
    return method.merge(base, weights), weights, saved


def check_output(out: Path, force: bool, sources: list[Path]) -> None:
    """Refuse an output directory whose replacement would lose something: without --force any existing one; with it,
    one that holds a source of this merge or soup, or anything but an earlier merge/soup output (ftune_merge.json)."""
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise ConfigError(f"{out} already exists. Pass --force to replace it, or --out DIR for another directory.")
    if not out.is_dir() or out.is_symlink():
        raise ConfigError(f"--out {out} is not a directory; --force replaces only a directory written by an earlier "
                          f"`ftune merge` or `ftune soup`. Choose another --out.")
    resolved = out.resolve()
    for source in sources:
        source = Path(source).expanduser().resolve()
        if source == resolved or resolved in source.parents:
            raise ConfigError(f"--out {out} holds {source}, which this command reads: replacing it would delete that "
                              f"run. Choose another --out.")
    if any(out.iterdir()) and not (out / "ftune_merge.json").exists():
        raise ConfigError(f"--out {out} is not the output of an earlier `ftune merge` or `ftune soup` (it has no "
                          f"ftune_merge.json), and --force replaces only those, so that nothing else is deleted. "
                          f"Choose another --out, or remove {out} yourself.")


def write_model(model, tokenizer_dir: Path, out: Path, force: bool, info: dict, sources: list[Path]) -> Path:
    """save_pretrained + tokenizer + ftune_merge.json into a temp dir beside `out`, then rename it to `out`."""
    from ftune.models.loading import load_tokenizer

    check_output(out, force, sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(tokenizer_dir).save_pretrained(tmp)
        (tmp / "ftune_merge.json").write_text(json.dumps(info, indent=2) + "\n")
        tmp.chmod(0o755)
        if out.exists():  # --force
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def merge_run(run_dir: str | Path, out: str | Path | None = None, force: bool = False) -> Path:
    """Merge the adapter of `run_dir` (a run, its final/ or a checkpoint-N/) into its base; returns the output dir."""
    from ftune.models.loading import DTYPES

    run_dir = Path(run_dir).expanduser()
    out = Path(out).expanduser() if out else run_dir / "merged"
    check_output(out, force, [run_dir])
    merged, weights, saved = load_merged(run_dir)
    info = {"source": str(weights.resolve()), "peft": saved.peft._target_, "base": saved.model.name_or_path,
            "dtype": saved.model.dtype}
    return write_model(merged.to(DTYPES[saved.model.dtype]), weights, out, force, info, [run_dir, weights])


def main(argv: list[str] | None = None) -> None:
    from ftune.reporting import run_reporting_errors

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
