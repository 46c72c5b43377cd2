"""Typed config schemas, recipe registration and cross-field checks.

The fixed groups (model, data, trainer, eval) are dataclasses registered in Hydra's ConfigStore, so an unknown key or
a wrong type fails while Hydra composes the config. The pluggable groups (peft, objective, selection) name their code
with `_target_`; their keys are checked against that callable's signature and annotations by `check_target`.
Everything here runs before a model or dataset is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from ftune.paths import recipes_dir


class ConfigError(ValueError):
    """A config problem the user can fix; the message names the key and the fix."""


@dataclass
class ModelConfig:
    name_or_path: str = MISSING
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    # Packed rows in training: "per_example" runs SDPA once per example (ftune/models/packed_attention.py), "masked"
    # runs it over the whole row under transformers' block mask; "auto": per_example on a CPU, masked on a GPU.
    packed_attention: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    source: str = MISSING
    path: str | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    split: str = "train"
    eval_split: str | None = None
    eval_size: int = 64
    size: int | None = None
    format: str = "auto"
    fields: Any = None  # renames {ours: theirs}; null, not {}: Hydra cannot add keys to a {} node
    keep_fields: list[str] = field(default_factory=list)  # raw columns carried with each example (e.g. a domain)
    system_prompt: str | None = None
    tasks: Any = None           # data=reasoning_gym: the mixture, [name, ...] or [{name, weight, config}, ...]
    answer_format: str = "tags"  # data=reasoning_gym: tags | plain | hashes | a template with {answer}
    limit: int | None = None
    max_length: int = 512
    truncation: str = "drop"
    packing: bool = False
    group_by_length: bool = False
    num_proc: int = 1


@dataclass
class TrainerConfig:
    max_steps: int = -1
    epochs: int = 1
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    spike_factor: float = 0.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    distributed: str = "ddp"
    dist_timeout: int = 1800
    compile: bool = False
    cpu_malloc: str = "auto"
    liger: bool = False
    activation_offload: bool = False
    profile_steps: int = 0
    profile_from: int = 3
    log_every: int = 1
    eval_every: int = 0
    save_every: int = 0
    keep_last: int = 2
    resume: str | None = None
    progress: bool = True


@dataclass
class EvalConfig:
    task: str = "gsm8k"
    split: str | None = "test"  # eval=gsm8k's split; null for the tasks that score the held-out part of `data`
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 256
    at_start: bool = False
    at_end: bool = False
    shots: list[Any] = field(default_factory=lambda: [0, 5, "many"])  # eval=many_shot: in-context examples per prompt
    single_task: str | None = None                                     # eval=many_shot: the data set as one task
    match: str = "auto"                                                # eval=many_shot: answer comparison
    tasks: Any = None       # eval=reasoning_gym: the tasks scored (null: the training mixture); untrained ones too
    seed: int = 0           # eval=reasoning_gym: which held-out problems (the same for every training seed)
    overlap: str = "error"  # eval=reasoning_gym: a held-out question also in training: error | replace


@dataclass
class TrainSchema:
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: dict[str, Any] = field(default_factory=dict)
    objective: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    selection: dict[str, Any] = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = MISSING
    seed: int = 42


@dataclass
class EvalSchema:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: str | None = None
    output_dir: str = MISSING
    seed: int = 42


@dataclass
class GenerateSchema:
    model: ModelConfig = field(default_factory=ModelConfig)
    run_dir: str | None = None
    prompt: str = MISSING
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 42


CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "model.packed_attention": ("auto", "per_example", "masked"),
    "data.source": ("gsm8k", "gsm_symbolic", "reasoning_gym", "jsonl", "hub", "hh_rlhf"),
    "data.format": ("auto", "prompt_completion", "messages", "alpaca"),
    "data.truncation": ("drop", "truncate", "error"),
    "trainer.scheduler": ("cosine", "linear", "constant"),
    "trainer.mixed_precision": ("no", "bf16", "fp16", "auto"),
    "trainer.distributed": ("ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"),
    "trainer.cpu_malloc": ("auto", "reuse", "system"),
    "eval.task": ("gsm8k", "preference", "many_shot", "reasoning_gym", "none"),
    "eval.overlap": ("error", "replace"),
    "eval.match": ("auto", "exact", "numeric"),
}


def register_configs() -> None:
    """Store the schemas and every top-level recipe in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="ftune_schema", node=TrainSchema)
    cs.store(name="ftune_eval_schema", node=EvalSchema)
    cs.store(name="ftune_generate_schema", node=GenerateSchema)
    for path in sorted(recipes_dir().glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def _type_ok(value: Any, annotation: Any) -> bool:
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple, ListConfig))
    if origin is dict or annotation is dict:
        return isinstance(value, (dict, DictConfig))
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def check_target(group: str, node: DictConfig | dict) -> type | None:
    """Check a pluggable group (`peft`, `objective`, `selection`) against its `_target_`'s signature.

    Returns the imported callable (None when `_target_` is null). Raises ConfigError naming the key and the fix.
    """
    node = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    target = node.get("_target_")
    if target is None:
        extra = [k for k in node if k != "_target_"]
        if extra:
            raise ConfigError(f"{group}: keys {extra} are set but `{group}._target_` is null, so nothing reads them. "
                              f"Pick a {group} method (e.g. `{group}=...`) or remove the keys.")
        return None
    module_name, _, attr = str(target).rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{group}._target_: cannot import '{target}' ({e}). Check the spelling, or put your own "
                          f"module on PYTHONPATH (ftune adds the launch directory).") from None
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    params = {n: p for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key, value in node.items():
        if key == "_target_":
            continue
        if key not in params:
            alias = getattr(fn, "aliases", {}).get(key)
            hint = f" Did you mean '{alias}'?" if alias else _suggest(key, params)
            raise ConfigError(f"{group}.{key}: unknown key for {target}.{hint} "
                              f"Valid keys: {', '.join(sorted(params))}.")
        ann = hints.get(key, params[key].annotation)
        if not _type_ok(value, ann):
            raise ConfigError(f"{group}.{key}={value!r}: expected {getattr(ann, '__name__', ann)}, got "
                              f"{type(value).__name__}. Fix the value, e.g. `{group}.{key}=...` on the command line.")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in node]
    if missing:
        raise ConfigError(f"{group}: {target} needs {missing}; set them, e.g. `+{group}.{missing[0]}=...`.")
    return fn


def build(node: DictConfig):
    """hydra.utils.instantiate, but a ConfigError raised by the constructor reaches the user as itself."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except InstantiationException as e:
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise


def _check_choice(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if value is not None and value not in CHOICES[key]:
        hint = _suggest(str(value), CHOICES[key])
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(CHOICES[key])}.{hint}")


def _positive(cfg: DictConfig, key: str, allow_zero: bool = False) -> None:
    v = OmegaConf.select(cfg, key)
    if v is not None and (v < 0 or (v == 0 and not allow_zero)):
        raise ConfigError(f"{key}={v} must be {'>= 0' if allow_zero else '> 0'}.")


# The fixed groups and their schemas: a key added with `+group.key=...` (or by a recipe) that no schema field holds
# would be silently ignored, so it is refused with a suggestion.
SCHEMA_GROUPS = {"model": ModelConfig, "data": DataConfig, "trainer": TrainerConfig, "eval": EvalConfig}
SCHEMAS = {"train": TrainSchema, "eval": EvalSchema, "generate": GenerateSchema, "select": TrainSchema}
CONFIG_NAMES = {"train": "train", "eval": "evaluate", "generate": "generate", "select": "train"}


def _check_schema_keys(cfg: DictConfig) -> None:
    for group, schema in SCHEMA_GROUPS.items():
        node = cfg.get(group) if isinstance(cfg, DictConfig) else None
        if not isinstance(node, DictConfig):
            continue
        known = [f.name for f in dataclasses.fields(schema)]
        for key in node:
            if key not in known:
                raise ConfigError(f"{group}.{key}: unknown key, nothing reads it.{_suggest(str(key), known)} "
                                  f"Valid keys: {', '.join(known)}.")


def _is_override(arg: str) -> bool:
    return not arg.startswith("-") and ("=" in arg or arg.startswith("~"))


def overrides_first(argv: list[str]) -> list[str]:
    """The overrides (in their order), then Hydra's flags. Hydra reads its overrides as one run of positional
    arguments, so `a=1 --cfg job b=2` is refused as "unrecognized arguments: b=2"; a flag's value (`job`,
    `defaults`, a directory) holds no `=`."""
    return [a for a in argv if _is_override(a)] + [a for a in argv if not _is_override(a)]


def with_overrides(argv: list[str], *extra: str) -> list[str]:
    """`argv` with `extra` overrides added after the user's own, before Hydra's flags."""
    argv = overrides_first(argv)
    n = sum(map(_is_override, argv))
    return [*argv[:n], *extra, *argv[n:]]


def given(argv: list[str], key: str) -> str | None:
    """The value of `key=` (or `+key=`, `++key=`) on the command line, the last one if repeated."""
    value = None
    for arg in argv:
        k, sep, v = arg.partition("=")
        if sep and k.lstrip("+~") == key:
            value = v
    return value


def refuse_model_beside_run_dir(overrides: list[str]) -> None:
    """`ftune eval/generate run_dir=RUN model=...`: a run recorded the base model it was trained on, and that base is
    the one loaded, so another model named beside it would be silently ignored."""
    run_dir = given(overrides, "run_dir")
    chosen = [f"{k}={v}" for k in ("model", "model.name_or_path") if (v := given(overrides, k)) is not None]
    if not run_dir or run_dir == "null" or not chosen:
        return
    recorded = next((d / "ftune_config.yaml" for d in (Path(run_dir).expanduser(), Path(run_dir).expanduser() / "final")
                     if (d / "ftune_config.yaml").is_file()), None)
    if recorded is None:
        return  # not a run of ours (e.g. a bare adapter): the model named is its base
    base = OmegaConf.select(OmegaConf.load(recorded), "model.name_or_path")
    raise ConfigError(f"{' and '.join(chosen)} would be ignored: run_dir={run_dir} was trained on {base} "
                      f"(recorded in {recorded}), and that base is the one loaded. Drop {chosen[0].split('=')[0]}=..., "
                      f"or drop run_dir to evaluate the model alone.")


def check_overrides(command: str, overrides: list[str]) -> None:
    """Command-line overrides whose key no schema field or config group holds, with a "did you mean" hint.

    Hydra rejects them too, but suggests appending the misspelt key with `+`; this names the key meant instead.
    Group choices (`peft=lorra`) are left to Hydra, which lists the available options.
    """
    schema = SCHEMAS.get(command)
    user_dir = any(a in ("--config-dir", "-cd") or a.startswith(("--config-dir=", "-cd=")) for a in overrides)
    if schema is None or user_dir:
        return  # a user config dir may bring its own groups
    top = [f.name for f in dataclasses.fields(schema)]
    pluggable = []
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        parts = key.split("@", 1)[0].split(".")  # `group@package=option` moves a group: check the group's name
        if "/" in key or parts[0] in ("hydra", "recipe"):
            continue
        if parts[0] not in top:
            raise ConfigError(f"{arg}: '{parts[0]}' is not a config group or key of `ftune {command}`."
                              f"{_suggest(parts[0], top)} Valid names: {', '.join(top)}.")
        fields = SCHEMA_GROUPS.get(parts[0])
        if fields is not None and len(parts) > 1:
            known = [f.name for f in dataclasses.fields(fields)]
            if parts[1] not in known:
                raise ConfigError(f"{arg}: {parts[0]}.{parts[1]} is not a key.{_suggest(parts[1], known)} "
                                  f"Valid keys of {parts[0]}: {', '.join(known)}.")
        elif fields is None and len(parts) > 1 and not arg.startswith(("+", "~")):
            pluggable.append((arg, parts))
    if pluggable:
        _check_pluggable_keys(command, overrides, pluggable)


def _check_pluggable_keys(command: str, overrides: list[str], dotted: list[tuple[str, list[str]]]) -> None:
    """`peft.rr=8` with peft=lora: the keys of a pluggable group (peft, objective, selection) are those of the option
    chosen (by the command line, a recipe or the default), so compose the config without the dotted overrides (Hydra's
    compose API, ~0.1 s) and look the key up there."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    from ftune.paths import configs_dir

    choices = [a for a in overrides if not a.startswith("-") and "=" in a and "." not in a.split("=", 1)[0]]
    register_configs()
    outer = get_gh_backup()  # an initialised Hydra around us (a test's compose) is left as it was
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(configs_dir()), version_base="1.3"):
            cfg = compose(config_name=CONFIG_NAMES[command], overrides=choices, return_hydra_config=True)
    except Exception:  # noqa: BLE001 - a bad choice or value: Hydra says which when the command runs
        return
    finally:
        restore_gh_from_backup(outer)
    for arg, (group, key, *_) in dotted:
        node = cfg.get(group)
        if not isinstance(node, DictConfig) or key in node:
            continue
        known = [str(k) for k in node if k != "_target_"]
        target = node.get("_target_")
        raise ConfigError(
            f"{arg}: {group}={cfg.hydra.runtime.choices.get(group)} ({target}) has no key '{key}'."
            f"{_suggest(key, known)} Its keys: {', '.join(known) or 'none'}. Another {group} method may take it "
            f"(`{group}=NAME`; `ftune {command} --help` lists them); a parameter of {target} that its config leaves "
            f"out is added with `+{group}.{key}=...`.")


# What a value left `???` by its config group (model=hub) should be.
REQUIRED_HINTS = {"model.name_or_path": "a hub id such as Qwen/Qwen2.5-0.5B-Instruct, or a local model directory"}


def validate_common(cfg: DictConfig) -> None:
    seed = OmegaConf.select(cfg, "seed", default=None)
    if seed is not None and not 0 <= seed < 2**32:
        raise ConfigError(f"seed={seed} must be in [0, 2**32) (numpy's seeds).")
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra."))
    if missing:
        said = "; ".join(f"`{k}=...` ({REQUIRED_HINTS[k]})" if k in REQUIRED_HINTS else f"`{k}=...`" for k in missing)
        them = "it" if len(missing) == 1 else "them"
        raise ConfigError(f"{', '.join(missing)} must be set: the config leaves {them} to you. Add {said} to the "
                          f"command line.")
    _check_schema_keys(cfg)
    for key in CHOICES:
        if OmegaConf.select(cfg, key, default=None) is not None:
            _check_choice(cfg, key)
    if "data" in cfg:
        for key in ("data.max_length", "data.num_proc", "data.eval_size"):
            _positive(cfg, key, allow_zero=key == "data.eval_size")
        if cfg.data.limit is not None:
            _positive(cfg, "data.limit")
        fields = cfg.data.get("fields")
        if fields is not None and not (isinstance(fields, DictConfig) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in fields.items())):
            raise ConfigError(f"data.fields={fields!r} must map our field names to yours, e.g. "
                              f"data.fields='{{prompt: question, completion: answer}}'.")
        if cfg.data.source == "jsonl" and not cfg.data.path:
            raise ConfigError("data=jsonl needs `data.path=FILE.jsonl` (your training file).")
        if cfg.data.source == "hub" and not cfg.data.hub_id:
            raise ConfigError("data=hub needs `data.hub_id=ORG/NAME` (a dataset on the Hugging Face hub, such as "
                              "tatsu-lab/alpaca).")
        if cfg.data.source in ("gsm_symbolic", "reasoning_gym", "jsonl") and cfg.data.hub_id:
            raise ConfigError(
                f"data.hub_id={cfg.data.hub_id} would be ignored: data.source={cfg.data.source} reads "
                f"{'data.path' if cfg.data.source == 'jsonl' else 'generated problems'}. For a dataset on the "
                f"Hugging Face hub use `data=hub data.hub_id={cfg.data.hub_id}` (data.hub_config for its "
                f"configuration, data.split for its split); or drop data.hub_id.")
        if cfg.data.source in ("gsm_symbolic", "reasoning_gym", "hub") and cfg.data.path:
            what = ("generates its problems" if cfg.data.source != "hub"
                    else f"loads data.hub_id={cfg.data.hub_id} from the Hugging Face hub")
            raise ConfigError(
                f"data.path={cfg.data.path} would be ignored: data.source={cfg.data.source} {what} and reads no file. "
                f"For your own file use `data=jsonl data.path={cfg.data.path}` ({{prompt, completion}}, {{messages}} "
                f"or alpaca records; preference pairs {{prompt, chosen, rejected}}); for a local copy of GSM8K, "
                f"`data=gsm8k data.path=DIR`; or drop data.path.")
    if "max_new_tokens" in cfg:  # ftune generate
        _positive(cfg, "max_new_tokens")
        _positive(cfg, "temperature", allow_zero=True)
    if "eval" in cfg:
        _positive(cfg, "eval.batch_size")
        _positive(cfg, "eval.max_new_tokens")
        if cfg.eval.limit is not None:
            _positive(cfg, "eval.limit")
        task, split = cfg.eval.task, cfg.eval.split
        if task == "reasoning_gym" and split is not None:
            raise ConfigError(f"eval.split={split} is not read by eval=reasoning_gym: it draws fresh held-out problems "
                              f"(eval.tasks, eval.limit, eval.seed). Drop eval.split (eval.split=null).")
        if task in ("preference", "many_shot") and split is not None:
            raise ConfigError(f"eval.split={split} is not read by eval={task}: it scores the held-out part of the "
                              f"data, data.eval_split=SPLIT (a file with data=jsonl) or else the last data.eval_size "
                              f"examples. Set data.eval_split={split} instead, and drop eval.split.")
        if task == "gsm8k" and split is None:
            raise ConfigError("eval=gsm8k needs eval.split, the split of the data it answers (e.g. eval.split=test).")


def check_eval_data(d: DictConfig, e: DictConfig, in_training: bool = True) -> None:
    """Where the GSM8K-style eval would read nothing, or (in a training run) the run's own training file. With
    `ftune eval` (in_training=False) a single data.path file is the file to score."""
    scored = e.task == "gsm8k" and (not in_training or (e.at_start or e.at_end) and e.split != d.split)
    if in_training and d.source == "gsm8k" and d.path and Path(d.path).suffix in (".jsonl", ".gz"):
        same = [f"eval.split={e.split}"] if scored else []
        same += [f"data.eval_split={d.eval_split}"] if d.eval_split and d.eval_split != d.split else []
        if same:
            raise ConfigError(
                f"data.path={d.path} is one file, read for every split, so {' and '.join(same)} would score the model "
                f"on its own training examples. Point data.path at a directory holding {d.split}.jsonl and "
                f"{e.split if scored else d.eval_split}.jsonl (GSM8K's layout), or use data=jsonl with "
                f"data.eval_split=PATH and eval.split=PATH.")
    if d.source == "jsonl" and scored and not Path(e.split).expanduser().is_file():
        raise ConfigError(
            f"eval.split={e.split}: with data=jsonl the eval task reads eval.split as the path of a JSONL file of "
            f"questions and answers, and {e.split} is no file. Set eval.split=PATH.jsonl (your held-out examples)"
            f"{', or turn the eval off (eval=none)' if in_training else ''}.")


def validate_train(cfg: DictConfig) -> dict[str, type | None]:
    """All checks that need no model: choices, ranges, targets, and combinations that cannot work together."""
    validate_common(cfg)
    t = cfg.trainer
    for key in ("trainer.batch_size", "trainer.grad_accum", "trainer.epochs", "trainer.log_every"):
        _positive(cfg, key)
    for key in ("trainer.lr", "trainer.weight_decay", "trainer.warmup_steps", "trainer.max_grad_norm",
                "trainer.eval_every", "trainer.save_every"):
        _positive(cfg, key, allow_zero=True)
    _positive(cfg, "trainer.keep_last")
    _positive(cfg, "trainer.dist_timeout")
    _positive(cfg, "trainer.profile_steps", allow_zero=True)
    _positive(cfg, "trainer.profile_from")
    _positive(cfg, "trainer.adam_eps")  # 0: an untouched parameter's update is 0/0, NaN after the first step
    if t.profile_steps and t.max_steps > 0 and t.profile_from + t.profile_steps - 1 > t.max_steps:
        raise ConfigError(f"trainer.profile_from={t.profile_from} with trainer.profile_steps={t.profile_steps} would "
                          f"record past trainer.max_steps={t.max_steps}: lower profile_from or profile_steps.")
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"trainer.max_steps={t.max_steps}: use a positive number of steps, or -1 to train for "
                          f"trainer.epochs epochs.")
    if t.spike_factor and t.spike_factor <= 1:
        raise ConfigError(f"trainer.spike_factor={t.spike_factor}: a spike is a loss above factor x the recent median, "
                          f"so use a factor > 1 (e.g. 3), or 0 to turn the guard off.")
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"trainer.warmup_ratio={t.warmup_ratio} must be in [0, 1).")
    if len(t.adam_betas) != 2 or not all(0 <= b < 1 for b in t.adam_betas):
        raise ConfigError(f"trainer.adam_betas={list(t.adam_betas)} must be two numbers in [0, 1).")
    if t.resume not in (None, "auto") and not str(t.resume).strip():
        raise ConfigError("trainer.resume must be null, auto, or a checkpoint directory.")
    targets = {g: check_target(g, cfg[g]) for g in ("peft", "objective", "selection")}
    if targets["objective"] is None:
        raise ConfigError("objective._target_ is null: pick an objective, e.g. `objective=sft`.")
    if targets["peft"] is None:
        raise ConfigError("peft._target_ is null: pick `peft=none` for full fine-tuning or `peft=lora`.")
    objective_cls = targets["objective"]
    if cfg.data.packing and not getattr(objective_cls, "can_pack", False):
        raise ConfigError(f"data.packing=true does not work with {cfg.objective._target_} (it needs one example per "
                          f"row). Set data.packing=false.")
    if cfg.model.packed_attention == "per_example" and cfg.model.attn_implementation != "sdpa":
        raise ConfigError(f"model.packed_attention=per_example runs SDPA once per packed example, but "
                          f"model.attn_implementation={cfg.model.attn_implementation}. Set "
                          f"model.attn_implementation=sdpa, or model.packed_attention=auto.")
    if cfg.data.packing and cfg.data.get("group_by_length"):
        raise ConfigError("data.packing=true and data.group_by_length=true: packed rows are already full, so there "
                          "is no padding to save. Keep one (packing for objectives that pack, group_by_length for "
                          "the others).")
    kind = getattr(objective_cls, "data_kind", "sft")
    pair_sources, sft_sources = ("hh_rlhf",), ("gsm8k", "gsm_symbolic", "reasoning_gym")
    if kind == "preference" and cfg.data.source in sft_sources:
        raise ConfigError(f"objective {cfg.objective._target_} trains on preference pairs, but data={cfg.data.source} "
                          f"has prompt/response examples only. Use data=hh_rlhf, or data=jsonl with "
                          f"{{prompt, chosen, rejected}} records.")
    if kind == "sft" and cfg.data.source in pair_sources:
        raise ConfigError(f"data={cfg.data.source} holds preference pairs, but objective {cfg.objective._target_} "
                          f"trains on prompt/response examples. Use objective=dpo, or another data set.")
    selection_cls = targets["selection"]
    if selection_cls is not None and kind != "sft" and not getattr(selection_cls, "any_data_kind", False):
        raise ConfigError(f"selection {cfg.selection._target_} scores prompt/response examples, but objective "
                          f"{cfg.objective._target_} trains on '{kind}' data. Use selection=random (any data) or "
                          f"selection=none; or train with data.limit=N for the first N examples.")
    check_eval_data(cfg.data, cfg.eval)
    quantize = cfg.peft.get("quantize")
    if quantize is not None and quantize not in ("4bit", "8bit"):
        raise ConfigError(f"peft.quantize={quantize!r} must be null, 4bit or 8bit.")
    if t.mixed_precision == "fp16" and cfg.model.dtype == "bfloat16":
        raise ConfigError("trainer.mixed_precision=fp16 with model.dtype=bfloat16 mixes two half formats; use "
                          "trainer.mixed_precision=bf16.")
    if hasattr(targets["peft"], "check_config"):  # the PEFT method's own cross-group checks
        targets["peft"].check_config(cfg)
    if hasattr(objective_cls, "check_config"):  # the objective's own checks, last as they may read the data
        objective_cls.check_config(cfg)
    if hasattr(targets["selection"], "check_config"):  # the selection method's own (e.g. its target file)
        targets["selection"].check_config(cfg)
    return targets
