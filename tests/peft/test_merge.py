"""`ftune merge`: a merged LoRA / DoRA / (IA)^3 / QLoRA run gives the unmerged run's logits from a plain HF model
directory; prompt tuning, full fine-tunes and existing outputs are refused with the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
from _tiny import make_cfg, run  # noqa: E402

from ftune.config import ConfigError  # noqa: E402
from ftune.merge import merge_run  # noqa: E402

IDS = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]])
TRAIN = ["data.size=8", "trainer.max_steps=2", "trainer.batch_size=2", "trainer.lr=5e-2"]


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.mark.parametrize("overrides", [["peft.dropout=0"], ["peft=dora", "peft.dropout=0"], ["peft=ia3"]],
                         ids=["lora", "dora", "ia3"])
def test_merged_model_equals_the_adapter_model(tmp_path, overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftune.models.loading import resolve_model_dir
    from ftune.models.runs import load_from_run

    run(make_cfg(tmp_path / "r", *TRAIN, *overrides))
    unmerged, _ = load_from_run(tmp_path / "r")
    base = AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny_random"))
    assert not torch.allclose(_logits(unmerged), _logits(base), atol=1e-4)  # the adapter does something
    out = merge_run(tmp_path / "r")
    assert out == tmp_path / "r" / "merged" and not list(out.parent.glob(".tmp-*"))
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template
    assert not any("lora" in n or "ia3" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged), _logits(unmerged), rtol=1e-4, atol=1e-4)


def test_qlora_merges_into_the_unquantized_base(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftune.models.loading import resolve_model_dir

    run(make_cfg(tmp_path / "q", *TRAIN, "peft=qlora", "peft.r=8", "peft.dropout=0"))
    out = merge_run(tmp_path / "q", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(merged.config, "quantization_config")
    assert all(type(m) is not torch.nn.Linear or m.weight.dtype == torch.float32 for m in merged.modules())
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny_random")),
                                          tmp_path / "q" / "final")
    torch.testing.assert_close(_logits(merged), _logits(reference), rtol=1e-4, atol=1e-4)


def test_unmergeable_and_existing_outputs_are_refused(tmp_path):
    run(make_cfg(tmp_path / "p", *TRAIN, "peft=prompt_tuning", "peft.num_virtual_tokens=2"))
    with pytest.raises(ConfigError, match="prompt_tuning cannot be merged"):
        merge_run(tmp_path / "p")
    assert not (tmp_path / "p" / "merged").exists()
    run(make_cfg(tmp_path / "f", *TRAIN, "peft=none", "trainer.lr=1e-3"))
    with pytest.raises(ConfigError, match="full fine-tune"):
        merge_run(tmp_path / "f")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="--force"):
        merge_run(tmp_path / "p", tmp_path / "taken")


def test_force_replaces_only_an_earlier_merge(tmp_path):
    """--force must not delete the run being merged, a directory above it, or anything that is not a merge output."""
    run(make_cfg(tmp_path / "r", *TRAIN, "peft.dropout=0"))
    final = tmp_path / "r" / "final"
    for out in (tmp_path / "r", tmp_path, final):
        with pytest.raises(ConfigError, match="which this command reads|no ftune_merge.json"):
            merge_run(final if out != final else tmp_path / "r", out, force=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="no ftune_merge.json"):
        merge_run(tmp_path / "r", tmp_path / "notes", force=True)
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(ConfigError, match="not a directory"):
        merge_run(tmp_path / "r", tmp_path / "a_file", force=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine" and (tmp_path / "a_file").read_text() == "mine"
    assert (final / "adapter_model.safetensors").exists() and not (tmp_path / "r" / "merged").exists()
    merged = merge_run(tmp_path / "r")
    with pytest.raises(ConfigError, match="already a merged model"):
        merge_run(merged)
    (tmp_path / "empty").mkdir()
    assert merge_run(tmp_path / "r", tmp_path / "empty", force=True) == tmp_path / "empty"
    assert merge_run(tmp_path / "r", merged, force=True) == merged


def test_cli_merge_writes_and_force_replaces(tmp_path, capsys):
    from ftune.merge import main

    run(make_cfg(tmp_path / "r", *TRAIN, "peft.dropout=0"))
    first = subprocess.run([sys.executable, "-m", "ftune.cli", "merge", str(tmp_path / "r")], capture_output=True,
                           text=True)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "r" / "merged" / "config.json").exists()
    with pytest.raises(SystemExit) as refused:
        main([str(tmp_path / "r")])
    assert refused.value.code == 2 and "--force" in capsys.readouterr().err
    stamp = (tmp_path / "r" / "merged" / "ftune_merge.json").stat().st_mtime_ns
    main([str(tmp_path / "r"), "--force"])
    assert (tmp_path / "r" / "merged" / "ftune_merge.json").stat().st_mtime_ns != stamp
    assert list((tmp_path / "r" / "merged").glob("*.safetensors"))
