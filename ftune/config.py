"""Typed config schemas and recipe registration.

The fixed groups (model, data, trainer, eval) are dataclasses registered in Hydra's ConfigStore, so an unknown key or
a wrong type fails while Hydra composes the config. The pluggable groups (peft, objective, selection) name their code
with `_target_`. Every check of a composed config is in ftune/preflight.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ftune.paths import recipes_dir


class ConfigError(ValueError):
    """A config problem the user can fix; the message names the key and the fix."""


def said_at_once(problems: list[str], where: str, more: int = 0) -> str:
    """Problems found together, as the user reads them: one as its own message, several as a numbered list (the
    preflight's config problems, the data phase's bad lines; `more`: further ones counted, not shown)."""
    if len(problems) == 1 and not more:
        return problems[0]
    lines = [f"{len(problems) + more} problems in {where}, each with its fix:"]
    lines += [f"  {i}. {p}" for i, p in enumerate(problems, 1)]
    if more:
        lines.append(f"  ... and {more} more line(s) like these.")
    return "\n".join(lines)


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
    context_examples: int = 0  # eval=reasoning_gym: solved problems of the task before each one (many-shot scoring)


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


def register_configs(command: str = "train") -> None:
    """Store the schemas and every top-level recipe in Hydra's ConfigStore (idempotent). A recipe is stored with the
    parts `command` reads (`recipe_for`), so `ftune eval +recipe=NAME` takes the recipe's model, data and eval."""
    cs = ConfigStore.instance()
    cs.store(name="ftune_schema", node=TrainSchema)
    cs.store(name="ftune_eval_schema", node=EvalSchema)
    cs.store(name="ftune_generate_schema", node=GenerateSchema)
    for path in sorted(recipes_dir().glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=recipe_for(command, OmegaConf.load(path)), package="_global_")


def recipe_for(command: str, recipe: DictConfig) -> DictConfig:
    """The recipe's parts that `command`'s config has: its top-level keys and group choices (`override /peft: ...`)
    that the command's schema holds; other recipes it includes are kept (they are stored filtered the same way)."""
    keep = {f.name for f in dataclasses.fields(SCHEMAS.get(command, TrainSchema))}
    if SCHEMAS.get(command, TrainSchema) is TrainSchema:
        return recipe

    def wanted(entry) -> bool:
        if not isinstance(entry, (dict, DictConfig)):
            return True  # `_self_`, or another recipe
        key = str(next(iter(entry)))
        return key.removeprefix("override ").lstrip("/").split("@")[0].split("/")[0] in keep

    out = OmegaConf.create({k: v for k, v in recipe.items() if k != "defaults" and k in keep})
    if "defaults" in recipe:
        out.defaults = [d for d in recipe.defaults if wanted(d)]
    return out


def suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def build(node: DictConfig):
    """hydra.utils.instantiate of the plug-in alone (a nested `_target_`, e.g. a GRPO reward function, is the
    plug-in's to read, not Hydra's to call), but a ConfigError raised by the constructor reaches the user as
    itself."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, _recursive_=False)
    except InstantiationException as e:
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise


# The fixed groups and their schemas: a key added with `+group.key=...` (or by a recipe) that no schema field holds
# would be silently ignored, so it is refused with a suggestion.
SCHEMA_GROUPS = {"model": ModelConfig, "data": DataConfig, "trainer": TrainerConfig, "eval": EvalConfig}
SCHEMAS = {"train": TrainSchema, "eval": EvalSchema, "generate": GenerateSchema, "select": TrainSchema}
CONFIG_NAMES = {"train": "train", "eval": "evaluate", "generate": "generate", "select": "train"}


def explain_composition_error(command: str, overrides: list[str], error: Exception) -> str:
    """What to say when Hydra could not compose the command line (its exception, raised where it composes).

    Hydra refuses a misspelt key but suggests appending it with `+`; this names the key meant instead. Other
    composition errors (a group option that does not exist, a value of the wrong type, bad override syntax) are
    Hydra's own message, which lists the options or says the type. Composing is Hydra's alone: nothing here reads
    the command line unless Hydra has refused it.
    """
    said = str(error).strip()
    cause = str(error.__cause__).strip().splitlines()[0] if error.__cause__ is not None else ""
    m = re.match(r"Could not override '([^']+)'", said)
    arg = next((a for a in overrides if m and a.split("=", 1)[0].lstrip("+~") == m.group(1)), None)
    if arg is not None and (text := _unknown_key(command, overrides, arg)):
        return text
    said = said.split("\nConfig search path:")[0].strip()  # MissingConfigException: the options, not the path
    if said.startswith("Error merging override ") and cause:
        return f"{said[len('Error merging override '):]}: {cause}"
    return f"{said}{' (' + cause + ')' if cause and cause not in said else ''}"


def _unknown_key(command: str, overrides: list[str], arg: str) -> str | None:
    schema = SCHEMAS.get(command)
    if schema is None:
        return None
    top = [f.name for f in dataclasses.fields(schema)]
    key = arg.split("=", 1)[0].lstrip("+~")
    parts = key.split("@", 1)[0].split(".")
    if "/" in key or parts[0] == "hydra":
        return None
    if parts[0] not in top:
        return unknown_top_key(arg, parts[0], command, top)
    fields = SCHEMA_GROUPS.get(parts[0])
    if fields is not None and len(parts) > 1:
        known = [f.name for f in dataclasses.fields(fields)]
        if parts[1] not in known:
            return (f"{arg}: {parts[0]}.{parts[1]} is not a key.{suggest(parts[1], known)} "
                    f"Valid keys of {parts[0]}: {', '.join(known)}.")
    if fields is None and len(parts) > 1:
        return _pluggable_key(command, overrides, arg, parts)
    return None


def unknown_top_key(arg: str, name: str, command: str, top: list[str]) -> str:
    return (f"{arg}: '{name}' is not a config group or key of `ftune {command}`.{suggest(name, top)} "
            f"Valid names: {', '.join(top)}.")


def _pluggable_key(command: str, overrides: list[str], arg: str, parts: list[str]) -> str | None:
    """`peft.rr=8` with peft=lora, refused by Hydra: the keys of a pluggable group (peft, objective, selection) are
    those of the option chosen (by the command line, a recipe or the default). Only on this error path, the config
    is composed without the dotted overrides (Hydra's compose API, ~0.1 s) to name the option and its keys."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    from ftune.paths import configs_dir

    choices = [a for a in overrides if not a.startswith("-") and "=" in a and "." not in a.split("=", 1)[0]]
    register_configs(command)
    outer = get_gh_backup()  # an initialised Hydra around us (a test's compose) is left as it was
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(configs_dir()), version_base="1.3"):
            cfg = compose(config_name=CONFIG_NAMES[command], overrides=choices, return_hydra_config=True)
    except Exception:  # noqa: BLE001 - another override is wrong too: Hydra's message says which
        return None
    finally:
        restore_gh_from_backup(outer)
    group, key = parts[0], parts[1]
    node = cfg.get(group)
    if not isinstance(node, DictConfig) or key in node:
        return None
    known = [str(k) for k in node if k != "_target_"]
    target = node.get("_target_")
    return (f"{arg}: {group}={cfg.hydra.runtime.choices.get(group)} ({target}) has no key '{key}'."
            f"{suggest(key, known)} Its keys: {', '.join(known) or 'none'}. Another {group} method may take it "
            f"(`{group}=NAME`; `ftune {command} --help` lists them); a parameter of {target} that its config leaves "
            f"out is added with `+{group}.{key}=...`.")
