"""Config composition, recipes and the checks that run before any model is loaded (ftune.config)."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from ftune.config import ConfigError, build
from ftune.objectives.sft import SFT
from ftune.paths import configs_dir, recipes_dir
from ftune.preflight import check_target, validate_train

RECIPES = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
PLUGGABLE = [pytest.param(group, p.stem) for group in ("peft", "objective", "selection")
             for p in sorted((configs_dir() / group).glob("*.yaml"))]


class NoPackObjective(SFT):
    """An objective that needs one example per row."""

    can_pack = False


def test_recipes_found():
    assert {"quickstart", "lora_gsm8k"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_composes_and_validates(compose, name):
    cfg = compose([f"+recipe={name}"])
    targets = validate_train(cfg)
    assert targets["peft"] is not None and targets["objective"] is not None


def test_recipe_values_reach_the_config(compose):
    quick = compose(["+recipe=quickstart"])
    assert quick.trainer.max_steps == 80 and quick.data.size == 800 and quick.data.tasks[0].name == "chain_sum"
    gsm = compose(["+recipe=lora_gsm8k"])
    assert gsm.data.source == "gsm8k" and gsm.trainer.grad_accum == 4 and gsm.eval.at_end is True


def test_fields_are_renamed_from_the_command_line(compose):
    """The README's `data.fields='{prompt: question, completion: answer}'` (Hydra cannot add keys to a `{}` node)."""
    cfg = compose(["data=jsonl", "data.path=x.jsonl", "data.fields={prompt: question, completion: answer}"])
    validate_train(cfg)
    assert dict(cfg.data.fields) == {"prompt": "question", "completion": "answer"}


def test_command_line_beats_recipe(compose):
    cfg = compose(["+recipe=quickstart", "trainer.max_steps=7", "model=tiny_random", "data=jsonl",
                   "data.path=x.jsonl"])
    assert cfg.trainer.max_steps == 7
    assert cfg.model.name_or_path == "tiny_random"
    assert cfg.data.source == "jsonl"


def test_default_config_validates(compose):
    targets = validate_train(compose([]))
    assert targets["selection"] is None


def test_a_hub_dataset_group_validates_and_loads_from_the_hub(compose, monkeypatch):
    """data=hub with its id passes the checks and reaches datasets.load_dataset(hub_id, hub_config, split)."""
    import datasets

    from ftune.data import sources
    from ftune.data.pipeline import load_train_examples

    cfg = compose(["data=hub", "data.hub_id=org/set", "data.hub_config=main", "data.eval_size=0"])
    validate_train(cfg)
    asked = []

    def load_dataset(*args, **kwargs):
        asked.append((args, kwargs))
        return [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]

    monkeypatch.setattr(sources, "_hub_offline", lambda: False)
    monkeypatch.setattr("ftune.models.loading._hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    train, _, stats = load_train_examples(cfg.data, seed=0)
    assert asked == [(("org/set", "main"), {"split": "train"})]
    assert [ex["messages"][-1]["content"] for ex in train] == ["a0", "a1", "a2"] and stats["origin"] == "org/set"


@pytest.mark.parametrize(("group", "option"), PLUGGABLE)
def test_every_pluggable_target_checks(compose, group, option):
    cfg = compose([f"{group}={option}"])
    fn = check_target(group, cfg[group])
    assert (fn is None) == (cfg[group]._target_ is None)
    if fn is not None:
        instantiate(cfg[group])


def test_selection_random_validates(compose):
    cfg = compose(["selection=random", "selection.budget=10"])
    assert validate_train(cfg)["selection"].__name__ == "RandomSelection"


def test_required_argument_missing_is_reported(compose):
    cfg = compose(["selection=random", "~selection.budget"])
    with pytest.raises(ConfigError, match=r"needs \['budget'\]"):
        validate_train(cfg)


# --------------------------------------------------------------------------------------- rejected configs
@pytest.mark.parametrize(("overrides", "pattern"), [
    (["+peft.alpah=8"], r"peft\.alpah: unknown key .*Did you mean 'alpha'\?"),
    (["+peft.rank=4"], r"peft\.rank: unknown key for ftune\.peft\.lora\.LoRA.*Valid keys: .*\br\b"),
    (["peft.r=abc"], r"peft\.r='abc': expected int, got str"),
    (["peft.r=1.5"], r"peft\.r=1\.5: expected int, got float"),
    (["peft.alpha=[1,2]"], r"peft\.alpha=.*expected float"),
    (["trainer.max_steps=0"], r"trainer\.max_steps=0"),
    (["trainer.max_steps=-5"], r"trainer\.max_steps=-5"),
    (["trainer.mixed_precision=fp8"], r"trainer\.mixed_precision='fp8' is not one of no, bf16, fp16, auto"),
    (["trainer.cpu_malloc=keep"], r"trainer\.cpu_malloc='keep' is not one of auto, reuse, system"),
    (["model.dtype=float64"], r"model\.dtype='float64' is not one of"),
    (["data.truncation=cut"], r"data\.truncation='cut' is not one of drop, truncate, error"),
    (["data=jsonl"], r"data=jsonl needs `data\.path"),
    (["data.path=mine.jsonl"], r"data\.path=mine\.jsonl would be ignored: data\.source=gsm_symbolic generates its "
                               r"problems .*`data=jsonl data\.path=mine\.jsonl`"),
    (["data.source=hub", "data.hub_id=org/set", "data.path=mine.jsonl"],
     r"data\.path=mine\.jsonl would be ignored: data\.source=hub loads data\.hub_id=org/set"),
    (["trainer.batch_size=0"], r"trainer\.batch_size=0 must be > 0"),
    (["trainer.dist_timeout=0"], r"trainer\.dist_timeout=0 must be > 0"),
    (["trainer.adam_eps=0"], r"trainer\.adam_eps=0\.0 must be > 0"),
    (["data.fields=5"], r"data\.fields=5 must map our field names to yours"),
    (["data=gsm8k", "data.path=mine/train.jsonl", "eval=gsm8k", "eval.at_end=true"],
     r"data\.path=mine/train\.jsonl is one file, read for every split, so eval\.split=test would score the model on "
     r"its own training examples\. Point data\.path at a directory holding train\.jsonl and test\.jsonl"),
    (["data=gsm8k", "data.path=mine/train.jsonl", "eval=none", "data.eval_split=test"],
     r"so data\.eval_split=test would score"),
    (["data=jsonl", "data.path=mine.jsonl", "eval=gsm8k", "eval.at_end=true"],
     r"eval\.split=test: with data=jsonl the eval task reads eval\.split as the path of a JSONL file"),
    (["seed=-1"], r"seed=-1 must be in \[0, 2\*\*32\)"),
    (["model=hub"], r"model\.name_or_path must be set: the config leaves it to you\. Add "
                    r"`model\.name_or_path=\.\.\.` \(a hub id such as"),
    (["data=hub"], r"data=hub needs `data\.hub_id=ORG/NAME` \(a dataset on the Hugging Face hub"),
    (["data.hub_id=tatsu-lab/alpaca"], r"data\.hub_id=tatsu-lab/alpaca would be ignored: data\.source=gsm_symbolic "
                                       r"reads generated problems\. .*`data=hub data\.hub_id=tatsu-lab/alpaca`"),
    (["trainer.warmup_ratio=1.0"], r"trainer\.warmup_ratio=1\.0"),
    (["trainer.mixed_precision=fp16", "model.dtype=bfloat16"], r"trainer\.mixed_precision=fp16"),
    (["+selection.budget=5"], r"selection: keys \['budget'\] are set but `selection\._target_` is null"),
    (["objective._target_=ftune.objectives.nope.Loss"], r"objective\._target_: cannot import"),
    (["peft.quantize=3bit"], r"peft\.quantize='3bit'"),
])
def test_validate_train_rejects(compose, overrides, pattern):
    cfg = compose(overrides)
    with pytest.raises(ConfigError, match=pattern):
        validate_train(cfg)


@pytest.mark.parametrize(("overrides", "pattern"), [
    (["max_new_tokens=0"], r"max_new_tokens=0 must be > 0"),
    (["temperature=-1"], r"temperature=-1\.0 must be >= 0"),
])
def test_generate_rejects(compose, overrides, pattern):
    from ftune import preflight

    with pytest.raises(ConfigError, match=pattern):
        preflight.generate(compose(["prompt=hi", *overrides], config_name="generate"))


def test_peft_rank_suggests_r(compose):
    with pytest.raises(ConfigError, match=r"peft\.rank: .*Did you mean 'r'\?"):
        validate_train(compose(["+peft.rank=4"]))


def test_full_finetune_refuses_quantize(compose):
    """QLoRA with full fine-tuning: the constructor's ConfigError reaches the user unwrapped."""
    cfg = compose(["peft=none", "+peft.quantize=4bit"])
    validate_train(cfg)
    with pytest.raises(ConfigError, match=r"peft\.quantize=4bit.*peft=qlora"):
        build(cfg.peft)


def test_packing_needs_an_objective_that_can_pack(compose):
    target = f"{__name__}.NoPackObjective"
    cfg = compose([f"objective._target_={target}", "data.packing=true"])
    with pytest.raises(ConfigError, match=rf"data\.packing=true does not work with {target}"):
        validate_train(cfg)
    validate_train(compose([f"objective._target_={target}", "data.packing=false"]))
    validate_train(compose(["data.packing=true"]))  # SFT packs


def test_group_by_length_and_packing_exclude_each_other(compose):
    with pytest.raises(ConfigError, match=r"data\.packing=true and data\.group_by_length=true.*Keep one"):
        validate_train(compose(["data.packing=true", "data.group_by_length=true"]))
    validate_train(compose(["data.group_by_length=true"]))


@pytest.mark.parametrize("override", ["trainer.max_step=5", "trainer.batch_size=abc", "model.dtyp=float32",
                                      "data.max_length=long"])
def test_composition_rejects_unknown_keys_and_wrong_types(compose, override):
    with pytest.raises(ConfigCompositionException):
        compose([override])
