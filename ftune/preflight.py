"""One preflight: every check of a composed config that needs no model and no data, run before anything loads,
reporting **all** the problems it finds at once.

    cfg (composed once by Hydra) -> preflight.train(cfg) -> Plan (the plug-ins, built) -> Trainer

Each check is a small function that raises ConfigError naming the key, the value and the fix; `Problems.run` runs
it and keeps its message, so one config with three mistakes is one error listing three (`PreflightError`, a
ConfigError). A check whose inputs another problem made unreadable is skipped rather than reported twice.

The rules read what plug-ins declare as data on their class (ftune/protocols.py lists the declarations:
`data_kind`, `can_pack`, `any_data_kind`, `fuses_lm_loss`, `not_under`, ...) and their own `check_config(cfg)`;
no rule compares class names or paths. Checks that need the data or the model (a malformed line, a target module
the model lacks) run later, where they are read, in the second phase (`ftune.data`, `ftune.peft.base`).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ftune.config import SCHEMA_GROUPS, SCHEMAS, ConfigError, build, said_at_once, suggest, unknown_top_key
from ftune.protocols import PROTOCOLS, missing_members
from ftune.run_record import given


class PreflightError(ConfigError):
    """Every problem the preflight found; printed as one paragraph when there is one, a numbered list otherwise."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(said_at_once(self.problems, "the config"))


class Problems:
    """Runs checks and collects their ConfigErrors instead of stopping at the first."""

    def __init__(self):
        self.found: list[str] = []
        self.failed: set[str] = set()  # the pluggable groups whose keys were refused (not built: it would repeat)

    def run(self, check, *args, **kwargs):
        """check(*args, **kwargs), or None when it raised ConfigError (kept)."""
        try:
            return check(*args, **kwargs)
        except PreflightError as e:
            self.found += [m for m in e.problems if m not in self.found]
        except ConfigError as e:
            if str(e) not in self.found:
                self.found.append(str(e))
        return None

    def add(self, message: str) -> None:
        if message not in self.found:
            self.found.append(message)

    def raise_any(self) -> None:
        if self.found:
            raise PreflightError(self.found)


@dataclass
class Plan:
    """What the preflight found a training config to ask for: each pluggable group's callable, and the plug-ins
    built from it (their constructors check their own values)."""

    targets: dict[str, Any] = field(default_factory=dict)
    peft: Any = None
    objective: Any = None
    selector: Any = None


# ----------------------------------------------------------------------------------------------- single values
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

# What a value left `???` by its config group (model=hub) should be.
REQUIRED_HINTS = {"model.name_or_path": "a hub id such as Qwen/Qwen2.5-0.5B-Instruct, or a local model directory"}


def check_choice(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if value is not None and value not in CHOICES[key]:
        hint = suggest(str(value), CHOICES[key])
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(CHOICES[key])}.{hint}")


def positive(cfg: DictConfig, key: str, allow_zero: bool = False) -> None:
    v = OmegaConf.select(cfg, key)
    if v is not None and (v < 0 or (v == 0 and not allow_zero)):
        raise ConfigError(f"{key}={v} must be {'>= 0' if allow_zero else '> 0'}.")


def check_schema_keys(cfg: DictConfig, p: Problems) -> None:
    """A key added with `+group.key=...` or `+key=...` (or by a recipe) that no schema field holds would be silently
    ignored."""
    schema = OmegaConf.get_type(cfg) if isinstance(cfg, DictConfig) else None
    if dataclasses.is_dataclass(schema):
        top = [f.name for f in dataclasses.fields(schema)]
        command = next((c for c, s in SCHEMAS.items() if s is schema), "train")
        for key in cfg:
            if key not in top:
                p.add(unknown_top_key(f"+{key}={cfg.get(key)}", str(key), command, top))
    for group, schema in SCHEMA_GROUPS.items():
        node = cfg.get(group) if isinstance(cfg, DictConfig) else None
        if not isinstance(node, DictConfig):
            continue
        known = [f.name for f in dataclasses.fields(schema)]
        for key in node:
            if key not in known:
                p.add(f"{group}.{key}: unknown key, nothing reads it.{suggest(str(key), known)} "
                      f"Valid keys: {', '.join(known)}.")


# ---------------------------------------------------------------------------------- the pluggable groups' keys
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


def check_target(group: str, node: DictConfig | dict, p: Problems | None = None) -> type | None:
    """Check a pluggable group (`peft`, `objective`, `selection`) against its `_target_`'s signature: every key a
    parameter, of the annotated type, none required left out. Returns the imported callable (None when `_target_`
    is null or cannot be imported). Without `p`, the first problem raises."""
    own = p is None
    p = Problems() if own else p
    node = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    target = node.get("_target_")
    if target is None:
        extra = [k for k in node if k != "_target_"]
        if extra:
            p.add(f"{group}: keys {extra} are set but `{group}._target_` is null, so nothing reads them. "
                  f"Pick a {group} method (e.g. `{group}=...`) or remove the keys.")
        if own:
            p.raise_any()
        return None
    module_name, _, attr = str(target).rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        p.add(f"{group}._target_: cannot import '{target}' ({e}). Check the spelling, or put your own module on "
              f"PYTHONPATH (ftune adds the launch directory).")
        if own:
            p.raise_any()
        return None
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    params = {n: q for n, q in sig.parameters.items() if q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)}
    for key, value in node.items():
        if key == "_target_":
            continue
        if key not in params:
            alias = getattr(fn, "aliases", {}).get(key)
            hint = f" Did you mean '{alias}'?" if alias else suggest(key, params)
            p.add(f"{group}.{key}: unknown key for {target}.{hint} Valid keys: {', '.join(sorted(params))}.")
            continue
        ann = hints.get(key, params[key].annotation)
        if not _type_ok(value, ann):
            p.add(f"{group}.{key}={value!r}: expected {getattr(ann, '__name__', ann)}, got {type(value).__name__}. "
                  f"Fix the value, e.g. `{group}.{key}=...` on the command line.")
    missing = [n for n, q in params.items() if q.default is inspect.Parameter.empty and n not in node]
    if missing:
        p.add(f"{group}: {target} needs {missing}; set them, e.g. `+{group}.{missing[0]}=...`.")
    lacks = missing_members(group, fn) if inspect.isclass(fn) and group in PROTOCOLS else []
    if lacks:
        p.add(f"{group}._target_={target} lacks {', '.join(lacks)} of the {PROTOCOLS[group].__name__} interface "
              f"(ftune/protocols.py says what each does). Add them to the class, or pick another {group}.")
    if own:
        p.raise_any()
    return fn


# --------------------------------------------------------------------------------------- every command's checks
def check_common(cfg: DictConfig, p: Problems) -> bool:
    """Checks of the keys every command shares. False when values are missing (`???`), so nothing else can be read."""
    seed = OmegaConf.select(cfg, "seed", default=None)
    if seed is not None and not 0 <= seed < 2**32:
        p.add(f"seed={seed} must be in [0, 2**32) (numpy's seeds).")
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra."))
    if missing:
        said = "; ".join(f"`{k}=...` ({REQUIRED_HINTS[k]})" if k in REQUIRED_HINTS else f"`{k}=...`" for k in missing)
        them = "it" if len(missing) == 1 else "them"
        p.add(f"{', '.join(missing)} must be set: the config leaves {them} to you. Add {said} to the command line.")
        return False
    check_schema_keys(cfg, p)
    for key in CHOICES:
        if OmegaConf.select(cfg, key, default=None) is not None:
            p.run(check_choice, cfg, key)
    if "data" in cfg:
        _check_data(cfg, p)
    if "max_new_tokens" in cfg:  # ftune generate
        p.run(positive, cfg, "max_new_tokens")
        p.run(positive, cfg, "temperature", allow_zero=True)
    if "eval" in cfg:
        _check_eval(cfg, p)
    return True


def _check_data(cfg: DictConfig, p: Problems) -> None:
    d = cfg.data
    for key in ("data.max_length", "data.num_proc", "data.eval_size"):
        p.run(positive, cfg, key, allow_zero=key == "data.eval_size")
    if d.limit is not None:
        p.run(positive, cfg, "data.limit")
    fields = d.get("fields")
    if fields is not None and not (isinstance(fields, DictConfig) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in fields.items())):
        p.add(f"data.fields={fields!r} must map our field names to yours, e.g. "
              f"data.fields='{{prompt: question, completion: answer}}'.")
    if d.source == "jsonl" and not d.path:
        p.add("data=jsonl needs `data.path=FILE.jsonl` (your training file).")
    if d.source == "hub" and not d.hub_id:
        p.add("data=hub needs `data.hub_id=ORG/NAME` (a dataset on the Hugging Face hub, such as tatsu-lab/alpaca).")
    if d.source in ("gsm_symbolic", "reasoning_gym", "jsonl") and d.hub_id:
        p.add(f"data.hub_id={d.hub_id} would be ignored: data.source={d.source} reads "
              f"{'data.path' if d.source == 'jsonl' else 'generated problems'}. For a dataset on the Hugging Face hub "
              f"use `data=hub data.hub_id={d.hub_id}` (data.hub_config for its configuration, data.split for its "
              f"split); or drop data.hub_id.")
    if d.source in ("gsm_symbolic", "reasoning_gym", "hub") and d.path:
        what = ("generates its problems" if d.source != "hub"
                else f"loads data.hub_id={d.hub_id} from the Hugging Face hub")
        p.add(f"data.path={d.path} would be ignored: data.source={d.source} {what} and reads no file. For your own "
              f"file use `data=jsonl data.path={d.path}` ({{prompt, completion}}, {{messages}} or alpaca records; "
              f"preference pairs {{prompt, chosen, rejected}}); for a local copy of GSM8K, `data=gsm8k "
              f"data.path=DIR`; or drop data.path.")


def _check_eval(cfg: DictConfig, p: Problems) -> None:
    p.run(positive, cfg, "eval.batch_size")
    p.run(positive, cfg, "eval.max_new_tokens")
    if cfg.eval.limit is not None:
        p.run(positive, cfg, "eval.limit")
    task, split = cfg.eval.task, cfg.eval.split
    if task == "reasoning_gym" and split is not None:
        p.add(f"eval.split={split} is not read by eval=reasoning_gym: it draws fresh held-out problems (eval.tasks, "
              f"eval.limit, eval.seed). Drop eval.split (eval.split=null).")
    if task in ("preference", "many_shot") and split is not None:
        p.add(f"eval.split={split} is not read by eval={task}: it scores the held-out part of the data, "
              f"data.eval_split=SPLIT (a file with data=jsonl) or else the last data.eval_size examples. Set "
              f"data.eval_split={split} instead, and drop eval.split.")
    if task == "gsm8k" and split is None:
        p.add("eval=gsm8k needs eval.split, the split of the data it answers (e.g. eval.split=test).")
    k = cfg.eval.get("context_examples") or 0
    p.run(positive, cfg, "eval.context_examples", allow_zero=True)
    if k and task != "reasoning_gym":
        p.add(f"eval.context_examples={k} is read by eval=reasoning_gym only; for in-context examples with "
              f"eval={task}, use eval=many_shot (eval.shots=[0,5,many]).")


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


# ------------------------------------------------------------------------------------------------ training runs
def _check_trainer(cfg: DictConfig, p: Problems) -> None:
    t = cfg.trainer
    for key in ("trainer.batch_size", "trainer.grad_accum", "trainer.epochs", "trainer.log_every",
                "trainer.keep_last", "trainer.dist_timeout", "trainer.profile_from",
                "trainer.adam_eps"):  # adam_eps 0: an untouched parameter's update is 0/0, NaN after the first step
        p.run(positive, cfg, key)
    for key in ("trainer.lr", "trainer.weight_decay", "trainer.warmup_steps", "trainer.max_grad_norm",
                "trainer.eval_every", "trainer.save_every", "trainer.profile_steps"):
        p.run(positive, cfg, key, allow_zero=True)
    if t.profile_steps and t.max_steps > 0 and t.profile_from + t.profile_steps - 1 > t.max_steps:
        p.add(f"trainer.profile_from={t.profile_from} with trainer.profile_steps={t.profile_steps} would record past "
              f"trainer.max_steps={t.max_steps}: lower profile_from or profile_steps.")
    if t.max_steps == 0 or t.max_steps < -1:
        p.add(f"trainer.max_steps={t.max_steps}: use a positive number of steps, or -1 to train for trainer.epochs "
              f"epochs.")
    if t.spike_factor and t.spike_factor <= 1:
        p.add(f"trainer.spike_factor={t.spike_factor}: a spike is a loss above factor x the recent median, so use a "
              f"factor > 1 (e.g. 3), or 0 to turn the guard off.")
    if not 0 <= t.warmup_ratio < 1:
        p.add(f"trainer.warmup_ratio={t.warmup_ratio} must be in [0, 1).")
    if len(t.adam_betas) != 2 or not all(0 <= b < 1 for b in t.adam_betas):
        p.add(f"trainer.adam_betas={list(t.adam_betas)} must be two numbers in [0, 1).")
    if t.resume not in (None, "auto") and not str(t.resume).strip():
        p.add("trainer.resume must be null, auto, or a checkpoint directory.")
    if t.mixed_precision == "fp16" and cfg.model.dtype == "bfloat16":
        p.add("trainer.mixed_precision=fp16 with model.dtype=bfloat16 mixes two half formats; use "
              "trainer.mixed_precision=bf16.")


def _check_combinations(cfg: DictConfig, targets: dict, p: Problems) -> None:
    """Pairs of choices that cannot work together, read from what the plug-ins declare."""
    objective_cls, selection_cls = targets["objective"], targets["selection"]
    if cfg.trainer.liger and not getattr(objective_cls, "fuses_lm_loss", False):
        p.add(f"trainer.liger=true replaces the LM head + cross-entropy of an objective that trains on them alone "
              f"(objective=sft); objective {cfg.objective.get('_target_')} computes its own loss. Use objective=sft, "
              f"or trainer.liger=false.")
    if objective_cls is not None and cfg.data.packing and not getattr(objective_cls, "can_pack", False):
        p.add(f"data.packing=true does not work with {cfg.objective._target_} (it needs one example per row). Set "
              f"data.packing=false.")
    if cfg.model.packed_attention == "per_example" and cfg.model.attn_implementation != "sdpa":
        p.add(f"model.packed_attention=per_example runs SDPA once per packed example, but "
              f"model.attn_implementation={cfg.model.attn_implementation}. Set model.attn_implementation=sdpa, or "
              f"model.packed_attention=auto.")
    if cfg.data.packing and cfg.data.get("group_by_length"):
        p.add("data.packing=true and data.group_by_length=true: packed rows are already full, so there is no padding "
              "to save. Keep one (packing for objectives that pack, group_by_length for the others).")
    if objective_cls is not None:
        kind = getattr(objective_cls, "data_kind", "sft")
        pair_sources, sft_sources = ("hh_rlhf",), ("gsm8k", "gsm_symbolic", "reasoning_gym")
        if kind == "preference" and cfg.data.source in sft_sources:
            p.add(f"objective {cfg.objective._target_} trains on preference pairs, but data={cfg.data.source} has "
                  f"prompt/response examples only. Use data=hh_rlhf, or data=jsonl with {{prompt, chosen, rejected}} "
                  f"records.")
        if kind == "sft" and cfg.data.source in pair_sources:
            p.add(f"data={cfg.data.source} holds preference pairs, but objective {cfg.objective._target_} trains on "
                  f"prompt/response examples. Use objective=dpo, or another data set.")
        if selection_cls is not None and kind != "sft" and not getattr(selection_cls, "any_data_kind", False):
            p.add(f"selection {cfg.selection._target_} scores prompt/response examples, but objective "
                  f"{cfg.objective._target_} trains on '{kind}' data. Use selection=random (any data) or "
                  f"selection=none; or train with data.limit=N for the first N examples.")
    quantize = cfg.peft.get("quantize")
    if quantize is not None and quantize not in ("4bit", "8bit"):
        p.add(f"peft.quantize={quantize!r} must be null, 4bit or 8bit.")


def validate_train(cfg: DictConfig, p: Problems | None = None) -> dict[str, type | None]:
    """Every check of a training config that needs no model: choices, ranges, the plug-ins' keys, combinations that
    cannot work together, and each plug-in's own `check_config`. Returns each pluggable group's callable. Without
    `p`, raises PreflightError listing every problem found."""
    own = p is None
    p = Problems() if own else p
    targets: dict[str, type | None] = {"peft": None, "objective": None, "selection": None}
    if check_common(cfg, p):
        _check_trainer(cfg, p)
        for g in targets:
            before = len(p.found)
            targets[g] = check_target(g, cfg[g], p)
            if len(p.found) > before:
                p.failed.add(g)
        if cfg.objective.get("_target_") is None:
            p.add("objective._target_ is null: pick an objective, e.g. `objective=sft`.")
        if cfg.peft.get("_target_") is None:
            p.add("peft._target_ is null: pick `peft=none` for full fine-tuning or `peft=lora`.")
        _check_combinations(cfg, targets, p)
        p.run(check_eval_data, cfg.data, cfg.eval)
        # The plug-ins' own cross-group checks (an objective's may peek at the data files).
        for group in ("peft", "objective", "selection"):
            if hasattr(targets[group], "check_config"):
                p.run(targets[group].check_config, cfg)
        from ftune.data.reasoning_gym import check_config as check_reasoning_gym

        p.run(check_reasoning_gym, cfg)
    if own:
        p.raise_any()
    return targets


def train(cfg: DictConfig) -> Plan:
    """The training run's preflight: every config check (validate_train), the device's, and the plug-ins built
    (their constructors check their values). Raises PreflightError with every problem, or returns the Plan."""
    from ftune.run_record import given_on_command_line, hydra_overrides
    from ftune.training.distributed import check_device

    p = Problems()
    plan = Plan(targets=validate_train(cfg, p))
    if (OmegaConf.select(cfg, "trainer.resume", default=None) == "auto" and hydra_overrides() is not None
            and not given_on_command_line("output_dir")):
        p.add("trainer.resume=auto continues the run in output_dir, but no output_dir was given: this run would start "
              "in a new outputs/<date>/<time> with nothing to continue. Add output_dir=<that run's directory> (`ftune "
              "train` prints it at the end of a run and when it stops).")
    if "trainer" in cfg and not OmegaConf.missing_keys(cfg):
        p.run(check_device, cfg)
    built = {g: p.run(build, cfg[g]) for g, fn in plan.targets.items() if fn is not None and g not in p.failed}
    plan.peft, plan.objective, plan.selector = (built.get(g) for g in ("peft", "objective", "selection"))
    p.raise_any()
    return plan


def refuse_model_beside_run_dir(overrides: list[str]) -> None:
    """`ftune eval/generate run_dir=RUN model=...` (`overrides`: the command line's, from the composed config's
    Hydra node): a run recorded the base model it was trained on, and that base is the one loaded, so another model
    named beside it would be silently ignored."""
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


def check_writable(out: Path) -> None:
    """An output directory that can be made and written (a probe file, one per process)."""
    import os

    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output_dir={out} is not writable ({e.strerror}). Choose another output_dir.") from None


def evaluate(cfg: DictConfig) -> None:
    """`ftune eval`'s preflight (the reasoning-gym problems are checked where the run's data is known)."""
    from ftune.run_record import hydra_overrides

    p = Problems()
    p.run(refuse_model_beside_run_dir, hydra_overrides() or [])
    if check_common(cfg, p):
        p.run(check_writable, Path(cfg.output_dir))
        if cfg.eval.task == "none":
            p.add("eval.task=none: nothing to evaluate. Use eval=gsm8k or eval=preference.")
        else:
            p.run(check_eval_data, cfg.data, cfg.eval, in_training=False)
    p.raise_any()


def generate(cfg: DictConfig) -> None:
    """`ftune generate`'s preflight."""
    from ftune.run_record import hydra_overrides

    p = Problems()
    p.run(refuse_model_beside_run_dir, hydra_overrides() or [])
    check_common(cfg, p)
    p.raise_any()
