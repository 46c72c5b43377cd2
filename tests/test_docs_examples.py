"""docs/architecture.md's plug-in examples, run as written: each file block is written out, and a short training
with the tiny model uses them through a config directory of the user's own (no edit to ftune)."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import make_cfg, run  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def doc_files() -> dict[str, str]:
    """{path: content} of every block the doc marks with `<!-- file: PATH -->`."""
    return dict(re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", DOC.read_text(), re.S))


@pytest.fixture
def project(tmp_path, monkeypatch):
    for name, text in doc_files().items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))  # the launch directory, as `ftune` puts it on the path
    for mod in [m for m in sys.modules if m.startswith("my_methods")]:
        monkeypatch.delitem(sys.modules, mod)
    return tmp_path


def test_the_doc_has_an_example_of_each_plug_in():
    assert set(doc_files()) >= {"my_methods/focal.py", "conf/objective/focal.yaml", "my_methods/norm_tuning.py",
                                "conf/peft/norm_tuning.yaml", "my_methods/shortest.py", "conf/selection/shortest.yaml"}


def _cfg(project: Path, *overrides: str):
    return make_cfg(project / "run", f"hydra.searchpath=[file://{project / 'conf'}]", "trainer.max_steps=2",
                    "trainer.batch_size=4", *overrides)


def test_the_objective_example_trains_and_its_loss_is_the_focal_loss(project):
    from ftune.train import Trainer

    cfg = _cfg(project, "objective=focal", "objective.gamma=0.0")
    trainer = Trainer(cfg)
    # gamma = 0 is plain cross-entropy: the example's loss on a batch equals SFT's there.
    from ftune.objectives.sft import SFT

    rows = trainer.data.train[:4]
    batch = trainer.objective.collate(rows, trainer.tokenizer.pad_token_id)
    with torch.no_grad():
        focal, _ = trainer.objective(trainer.model, batch)
        sft, _ = SFT()(trainer.model, batch)
    assert math.isclose(float(focal), float(sft), rel_tol=1e-4), (float(focal), float(sft))
    trainer.run()
    rows = [json.loads(x) for x in (project / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]


def test_the_peft_example_trains_the_norms_only(project):
    cfg = _cfg(project, "peft=norm_tuning")
    trainer = run(cfg)
    saved = load_file(project / "run" / "final" / "ftune_adapter.safetensors")
    assert saved and all("norm" in k for k in saved)
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained == set(saved)


def test_the_selector_example_keeps_the_shortest_responses(project):
    cfg = _cfg(project, "selection=shortest", "selection.budget=12")
    trainer = run(cfg)
    assert trainer.data.stats["train_examples"] == 12
