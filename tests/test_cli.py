"""The `ftune` console script, run in subprocesses exactly as a user runs it."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ftune.paths import recipes_dir

TINY = ["model=tiny_random", "data.size=64", "data.eval_size=0", "trainer.max_steps=2", "trainer.progress=false",
        "eval=none"]


def ftune_exe() -> str:
    local = Path(sys.executable).parent / "ftune"
    exe = str(local) if local.exists() else shutil.which("ftune")
    assert exe, "the `ftune` console script is not installed"
    return exe


def ftune(*args, cwd, timeout=120) -> subprocess.CompletedProcess:
    """Run `ftune ARGS` in `cwd` with this session's environment (FTUNE_HOME, offline hub)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([ftune_exe(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def composed(*args, cwd) -> dict:
    out = ftune("train", *args, "--cfg", "job", cwd=cwd)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_recipes_lists_names_and_descriptions(tmp_path):
    out = ftune("recipes", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    listed = dict(line.split(None, 1) for line in out.stdout.splitlines() if line.strip())
    assert {"quickstart", "lora_gsm8k"} <= set(listed)
    for name in ("quickstart", "lora_gsm8k"):
        first_comment = next(line for line in (recipes_dir() / f"{name}.yaml").read_text().splitlines()
                             if line.startswith("#") and "@package" not in line)
        assert listed[name].strip() == first_comment.lstrip("# ").strip()
        assert len(listed[name]) > 20
    assert listed["lora_gsm8k"].startswith("LoRA")


def test_overrides_on_both_sides_of_a_hydra_flag(tmp_path):
    """Hydra alone refuses `a=1 --cfg job b=2` ("unrecognized arguments: b=2"); ftune puts the overrides (found by
    Hydra's own parser) before the flags, in their order."""
    from ftune.cli import overrides_before_flags

    assert overrides_before_flags(["a=1", "--cfg", "job", "b=2", "~c"]) == ["a=1", "b=2", "~c", "--cfg", "job"]
    assert overrides_before_flags(["--config-dir=/x=y", "a=1"]) == ["a=1", "--config-dir=/x=y"]
    assert overrides_before_flags(["a=1", "--nonsense"]) == ["a=1", "--nonsense"]  # left to Hydra to refuse
    cfg = composed("model=tiny_random", "--cfg", "job", "trainer.lr=0.25", "seed=7", cwd=tmp_path)
    assert cfg["trainer"]["lr"] == 0.25 and cfg["seed"] == 7 and cfg["model"]["name_or_path"] == "tiny_random"


def test_help(tmp_path):
    out = ftune("--help", cwd=tmp_path)
    assert out.returncode == 0
    assert "Commands:" in out.stdout and "train" in out.stdout and "recipes" in out.stdout
    bare = ftune(cwd=tmp_path)
    assert bare.returncode == 2 and "usage: ftune" in bare.stdout


def test_train_help(tmp_path):
    out = ftune("train", "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    recipes = sorted(x.stem for x in recipes_dir().glob("*.yaml"))
    assert f"recipe: {', '.join(recipes)}" in out.stdout
    assert "peft: adalink, dora, hft, ia3, lift, lora, none, prompt_tuning, qlora, ssf" in out.stdout


def test_unknown_command_suggests(tmp_path):
    out = ftune("trian", cwd=tmp_path)
    assert out.returncode == 2
    assert "unknown command 'trian'" in out.stderr and "Did you mean 'train'?" in out.stderr


def test_cfg_job_shows_recipe_and_override_wins(tmp_path):
    cfg = composed("+recipe=quickstart", cwd=tmp_path)
    assert cfg["trainer"]["max_steps"] == 80 and cfg["data"]["size"] == 800
    cfg = composed("+recipe=quickstart", "trainer.max_steps=7", cwd=tmp_path)
    assert cfg["trainer"]["max_steps"] == 7 and cfg["data"]["size"] == 800
    assert not (tmp_path / "outputs").exists()


def test_info_defaults(tmp_path):
    out = ftune("train", "+recipe=quickstart", "--info", "defaults", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for entry in ("recipe/quickstart", "trainer/default", "peft/lora", "ftune_schema"):
        assert entry in out.stdout


def test_user_config_dir(tmp_path):
    user = tmp_path / "myconfigs"
    (user / "trainer").mkdir(parents=True)
    (user / "trainer" / "mine.yaml").write_text("max_steps: 11\nbatch_size: 2\nlr: 3.0e-4\n")
    cfg = composed("--config-dir", str(user), "trainer=mine", cwd=tmp_path)
    assert cfg["trainer"]["max_steps"] == 11 and cfg["trainer"]["batch_size"] == 2
    assert math.isclose(cfg["trainer"]["lr"], 3e-4)
    assert cfg["trainer"]["epochs"] == 1  # the rest comes from the schema
    # The user's group option is checked against the schema like a built-in one.
    (user / "trainer" / "typo.yaml").write_text("max_stepz: 11\n")
    out = ftune("train", "--config-dir", str(user), "trainer=typo", "--cfg", "job", cwd=tmp_path)
    assert out.returncode != 0 and "max_stepz" in out.stderr


def test_config_error_is_one_clear_line(tmp_path):
    out = ftune("train", "model=tiny_random", "trainer.mixed_precision=fp8", f"output_dir={tmp_path / 'run'}",
                cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("ftune:")]
    assert len(errors) == 1
    assert errors[0].startswith("ftune: config error: trainer.mixed_precision='fp8'")


def test_config_error_from_a_constructor_is_reported(tmp_path):
    out = ftune("train", "model=tiny_random", "peft=none", "+peft.quantize=4bit", f"output_dir={tmp_path / 'run'}",
                cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "ftune: config error: peft=none (full fine-tuning) with peft.quantize=4bit" in out.stderr


def test_data_error_names_file_and_line(tmp_path, tiny_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    out = ftune("train", *TINY, "data=jsonl", f"data.path={bad}", f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert f"ftune: data error: {bad}:2: not valid JSON" in out.stderr


def test_tiny_training_run(tmp_path, tiny_tokenizer):
    run = tmp_path / "run"
    out = ftune("train", *TINY, f"output_dir={run}", cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run / "final" / "adapter_config.json").is_file()
    assert (run / "final" / "adapter_model.safetensors").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in losses)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    assert not (tmp_path / "outputs").exists()
    # Library messages that ask nothing of the user stay out of a plain CPU run's output (quiet_library_noise).
    for noise in ("unable to detect", "is_gradient_checkpointing", "pip install kernels"):
        assert noise not in out.stdout + out.stderr, noise


def test_sweep_jobs_get_their_own_output_dirs(tmp_path, tiny_tokenizer):
    args = ["model=tiny_random", "data.size=16", "data.eval_size=0", "trainer.max_steps=1", "trainer.batch_size=2",
            "trainer.progress=false", "eval=none"]
    out = ftune("train", "-m", *args, "trainer.lr=1e-3,2e-3", cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    finals = sorted(tmp_path.rglob("final/adapter_config.json"))
    assert len(finals) == 2, f"the jobs did not get one run directory each: {finals}"
    runs = [f.parent.parent for f in finals]
    assert [r.name for r in runs] == ["0", "1"] and runs[0].parent == runs[1].parent
    assert runs[0].parent.is_relative_to(tmp_path / "outputs")
    lrs = []
    for run in runs:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r] == [1]
        lrs.append(yaml.safe_load((run / "final" / "ftune_config.yaml").read_text())["trainer"]["lr"])
        assert (run / ".hydra" / "overrides.yaml").is_file()
    assert lrs == [1e-3, 2e-3]


def test_a_refused_rerun_leaves_the_earlier_runs_recorded_config_alone(tmp_path):
    """The run's record (.hydra/, train.log) is written after the checks, so a refused rerun, from `ftune train` or
    from `python -m ftune.train` (what torchrun and accelerate launch run), leaves the earlier run's as it was."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    recorded = {name: f"the earlier run's {name}\n" for name in ("config.yaml", "overrides.yaml", "hydra.yaml")}
    for name, text in recorded.items():
        (run / ".hydra" / name).write_text(text)
    for cmd in (["train"], [sys.executable, "-m", "ftune.train"]):
        args = [*TINY, f"output_dir={run}"]
        r = (ftune(*cmd, *args, cwd=tmp_path) if cmd == ["train"] else
             subprocess.run([*cmd, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120))
        assert r.returncode == 2, r.stderr[-2000:]
        assert f"output_dir={run} already holds a run. Continue it with trainer.resume=auto" in r.stderr
        assert {p.name: p.read_text() for p in (run / ".hydra").iterdir()} == recorded
        assert sorted(p.name for p in run.iterdir()) == [".hydra", "metrics.jsonl"]  # no train.log added either


def test_an_output_dir_that_cannot_be_made_is_refused_before_hydra(tmp_path):
    """Hydra makes the run directory before the job starts and would end in a FileNotFoundError traceback."""
    (tmp_path / "a_file").write_text("not a directory")
    run = tmp_path / "a_file" / "run"
    for command in (["train", *TINY], ["eval", "model=tiny_random"]):
        r = ftune(*command, f"output_dir={run}", cwd=tmp_path)
        assert r.returncode == 2, r.stderr[-2000:]
        assert f"ftune: config error: output_dir={run} is not writable (Not a directory). Choose another" in r.stderr
        assert "Traceback" not in r.stderr


def test_resume_auto_without_an_output_dir_is_refused(tmp_path):
    """Without output_dir a run gets a fresh outputs/<date>/<time>: trainer.resume=auto would find nothing there and
    train from the start."""
    r = ftune("train", *TINY, "trainer.resume=auto", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "trainer.resume=auto continues the run in output_dir, but no output_dir was given" in r.stderr
    assert not (tmp_path / "outputs").exists()


def test_a_resumed_run_keeps_the_first_runs_recorded_config(tmp_path):
    """`.hydra/config.yaml` records how the first steps were trained; a resumed run records its own config (here a
    longer max_steps) in `.hydra/resume-<time>/` instead of overwriting it."""
    run = tmp_path / "run"
    first = ftune("train", *TINY, f"output_dir={run}", cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    recorded = (run / ".hydra" / "config.yaml").read_text()
    assert yaml.safe_load(recorded)["trainer"]["max_steps"] == 2
    again = ftune("train", *TINY, "trainer.max_steps=3", "trainer.resume=auto", f"output_dir={run}", cwd=tmp_path,
                  timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run / ".hydra" / "config.yaml").read_text() == recorded
    resumes = sorted((run / ".hydra").glob("resume-*/config.yaml"))
    assert len(resumes) == 1, sorted(p.name for p in (run / ".hydra").iterdir())
    assert yaml.safe_load(resumes[0].read_text())["trainer"]["max_steps"] == 3
    assert "trainer.resume=auto" in (resumes[0].parent / "overrides.yaml").read_text()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 3


def test_a_model_beside_a_run_dir_is_refused(tmp_path, capsys, monkeypatch):
    """The run's recorded base is what eval/generate load: a model named beside run_dir was silently ignored."""
    from ftune.cli import main
    from ftune.config import ConfigError
    from ftune.preflight import refuse_model_beside_run_dir

    monkeypatch.setattr(sys, "path", list(sys.path))  # main() puts the launch directory on sys.path
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "ftune_config.yaml").write_text("model:\n  name_or_path: tiny_random\n")
    for command in ("eval", "generate"):
        with pytest.raises(SystemExit) as e:
            main([command, f"run_dir={tmp_path / 'run'}", "model=smollm2_135m", *(["prompt=hi"] * (command != "eval"))])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "model=smollm2_135m would be ignored" in err and "trained on tiny_random" in err
    with pytest.raises(ConfigError, match=r"model\.name_or_path=x would be ignored"):
        refuse_model_beside_run_dir([f"run_dir={tmp_path / 'run' / 'final'}", "model.name_or_path=x"])
    refuse_model_beside_run_dir([f"run_dir={tmp_path / 'run'}", "model.dtype=bfloat16"])  # a setting, not a model
    refuse_model_beside_run_dir([f"run_dir={tmp_path}", "model=hub"])  # no recorded base: the model named is it


def test_eval_of_a_jsonl_file_names_eval_split(tmp_path, capsys, monkeypatch):
    """`ftune eval data=jsonl` reads eval.split as the file to score; left at `test` it was said as a missing
    data.eval_split, after the imports. A single data=gsm8k file is scored as it is (no training file to avoid)."""
    from ftune.cli import main

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2\n#### 2"}) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["eval", "model=tiny_random", "data=jsonl", "data.path=qa.jsonl", f"output_dir={tmp_path / 'e1'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "eval.split=test: with data=jsonl the eval task reads eval.split as the path" in err
    assert "eval=none" not in err
    from omegaconf import OmegaConf

    from ftune.config import ConfigError
    from ftune.preflight import check_eval_data

    d = OmegaConf.create({"source": "gsm8k", "path": "qa.jsonl", "split": "train", "eval_split": None})
    e = OmegaConf.create({"task": "gsm8k", "split": "test", "at_start": False, "at_end": True})
    check_eval_data(d, e, in_training=False)
    with pytest.raises(ConfigError, match="would score the model on its own training examples"):
        check_eval_data(d, e)


@pytest.mark.parametrize(("command", "expect"), [
    ("eval", {"eval.limit": 200, "data.packing": True, "data.source": "gsm8k", "model.name_or_path": "smollm2-135m"}),
    ("generate", {"model.name_or_path": "smollm2-135m", "max_new_tokens": 256}),
    ("select", {"peft.r": 16, "trainer.grad_accum": 4, "eval.limit": 200}),
])
def test_a_recipe_works_with_every_command_taking_the_parts_it_reads(command, expect, capsys, monkeypatch):
    """`ftune eval +recipe=lora_gsm8k` takes the recipe's model, data and eval (no peft/trainer: eval has none)."""
    from omegaconf import OmegaConf

    from ftune.cli import main
    from ftune.config import register_configs

    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        main([command, "+recipe=lora_gsm8k", *(["prompt=hi"] if command == "generate" else []), "--cfg", "job"])
    finally:
        register_configs()  # the other tests compose training configs
    cfg = OmegaConf.create(yaml.safe_load(capsys.readouterr().out))
    for key, value in expect.items():
        got = OmegaConf.select(cfg, key)
        assert got == value or (key == "model.name_or_path" and value in str(got)), (key, got)
    if command != "select":
        assert "peft" not in cfg and "trainer" not in cfg


def test_a_command_line_hydra_refuses_is_said_once_by_several_processes(tmp_path):
    # Each of torchrun's ranks composes the command line; the first one says what is wrong, once, with the fix.
    out = ftune("train", "--nproc", "2", *TINY, "trainer.max_step=5", f"output_dir={tmp_path}/run", cwd=tmp_path,
                timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.count("trainer.max_step is not a key. Did you mean 'max_steps'?") == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()
