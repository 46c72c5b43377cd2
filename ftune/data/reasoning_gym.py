"""reasoning-gym tasks: seeded problem mixtures for training (`data=reasoning_gym`) and verified held-out problems
for evaluation (`eval=reasoning_gym`), offline.

A mixture is a list of tasks, each a reasoning-gym dataset name, or `{name, weight, config}` where `config` holds the
task's generator settings (its difficulty knobs) and `weight` its share of the problems. Any task reasoning-gym
registers works by name.

Seeds. reasoning-gym draws problem i of a dataset seeded S from `Random(S + i)`, so two datasets share problems when
their index ranges [S, S + size) overlap; some tasks also need S + i < 2**32. Each task's seeds are a per-task offset
(a hash of its name and settings, below 2**20) plus a block of 2**20 indices: training seed s (0..2047) reads block s,
the held-out problems block 2048 + eval.seed. Different training seeds draw different problems, the held-out
problems are the same for every training seed (so arms and seeds are scored on the same problems), and no training
problem index is a held-out one. Identical question texts can still come from different indices where a task's
problem space is small: the held-out set is checked against the training set, and an overlap is an error (or, with
eval.overlap=replace, those problems are replaced by further fresh ones that training did not see).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import zlib
from dataclasses import dataclass

from omegaconf import DictConfig, ListConfig, OmegaConf

from ftune.config import ConfigError

log = logging.getLogger(__name__)
BLOCK = 2 ** 20  # problems per seed block (data.size and eval.limit stay below it)
SEEDS = 2048     # training seeds 0..2047; held-out seeds likewise, in the blocks after them
NAMED_FORMATS = {"tags": "<answer>{answer}</answer>", "plain": "{answer}", "hashes": "#### {answer}"}
SPEC_KEYS = ("name", "weight", "config")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    weight: float = 1.0
    config: str = "{}"  # the generator settings as canonical JSON (hashable, and the same text in every process)

    @property
    def kwargs(self) -> dict:
        return json.loads(self.config)


def registry() -> dict:
    from reasoning_gym.factory import DATASETS

    return DATASETS


def _accepted(name: str) -> dict:
    """The generator settings a task accepts, with their defaults (seed and size are ftune's)."""
    config_cls = registry()[name][1]
    out = {}
    for f in dataclasses.fields(config_cls):
        if f.name in ("seed", "size"):
            continue
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        out[f.name] = default
    return out


def parse_tasks(value, key: str = "data.tasks") -> list[TaskSpec]:
    """Check a mixture (names, weights, generator settings) and return its tasks; raises ConfigError naming the
    entry and the fix."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (str, dict)):
        value = [value]
    if not value:
        raise ConfigError(f"{key} is empty: name at least one reasoning-gym task, e.g. '{key}=[chain_sum]' or "
                          f"'{key}=[{{name: chain_sum, weight: 2, config: {{max_terms: 3}}}}]'.")
    known = registry()
    specs = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(f"{where}={item!r}: each task is a reasoning-gym name or {{name, weight, config}}.")
        extra = sorted(set(item) - set(SPEC_KEYS))
        if extra:
            raise ConfigError(f"{where}: unknown key(s) {extra}; a task takes {list(SPEC_KEYS)} (generator settings "
                              f"go under config: {{...}}).")
        name = str(item["name"])
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
            hint = f" Closest: {', '.join(close)}." if close else ""
            raise ConfigError(f"{where}: reasoning-gym has no task '{name}'.{hint} It offers {len(known)} tasks "
                              f"(python -c 'import reasoning_gym.factory as f; print(sorted(f.DATASETS))').")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"{where}.weight={weight!r}: a mixture weight must be a number > 0 (drop the task to "
                              f"leave it out).")
        kwargs = item.get("config") or {}
        if not isinstance(kwargs, dict):
            raise ConfigError(f"{where}.config={kwargs!r}: the task's generator settings, as {{key: value}}.")
        accepted = _accepted(name)
        wrong = sorted(set(kwargs) - set(accepted))
        if wrong:
            shown = ", ".join(f"{k}={v!r}" for k, v in accepted.items())
            raise ConfigError(f"{where}.config: {name} has no setting(s) {wrong}. It accepts: {shown}.")
        try:
            cfg = registry()[name][1](**kwargs, seed=0, size=1)
            if hasattr(cfg, "validate"):
                cfg.validate()
        except (AssertionError, ValueError, TypeError) as e:
            raise ConfigError(f"{where}.config={kwargs}: reasoning-gym refuses these settings for {name} "
                              f"({e or type(e).__name__}).") from None
        specs.append(TaskSpec(name, float(weight), json.dumps(kwargs, sort_keys=True)))
    return specs


def labels(specs: list[TaskSpec]) -> list[str]:
    """A name per task: its reasoning-gym name, with its settings where one name appears with several."""
    counts = {}
    for s in specs:
        counts[s.name] = counts.get(s.name, 0) + 1
    return [s.name if counts[s.name] == 1 else f"{s.name}{s.config}" for s in specs]


def allocate(total: int, specs: list[TaskSpec], key: str) -> list[int]:
    """Problems per task: `total` split by weight (largest remainder), at least one each."""
    if total < len(specs):
        raise ConfigError(f"{key}={total} is fewer than one problem for each of the {len(specs)} tasks.")
    if total >= BLOCK:
        raise ConfigError(f"{key}={total}: at most {BLOCK - 1} problems.")
    weights = sum(s.weight for s in specs)
    exact = [total * s.weight / weights for s in specs]
    counts = [max(1, int(x)) for x in exact]
    order = sorted(range(len(specs)), key=lambda i: counts[i] - exact[i])
    j = 0
    while sum(counts) != total:
        i = order[j % len(order)]
        if sum(counts) < total:
            counts[i] += 1
        elif counts[i] > 1:
            counts[i] -= 1
        j += 1
    return counts


def _base(spec: TaskSpec) -> int:
    return zlib.crc32(f"{spec.name}|{spec.config}".encode()) % BLOCK


def _block(seed: int, key: str) -> int:
    if not 0 <= seed < SEEDS:
        raise ConfigError(f"{key}={seed}: reasoning-gym problems are drawn for seeds 0..{SEEDS - 1}; pick one there.")
    return seed


def train_seed(spec: TaskSpec, seed: int) -> int:
    return _base(spec) + _block(seed, "seed") * BLOCK


def test_seed(spec: TaskSpec, eval_seed: int) -> int:
    return _base(spec) + (SEEDS + _block(eval_seed, "eval.seed")) * BLOCK


def validation_seed(spec: TaskSpec, eval_seed: int) -> int:
    """Validation problems (e.g. what a greedy soup selects on) come from their own blocks, after the test ones."""
    return _base(spec) + (2 * SEEDS + _block(eval_seed, "eval.seed")) * BLOCK


def generate(spec: TaskSpec, start_seed: int, size: int) -> list[dict]:
    import reasoning_gym

    ds = reasoning_gym.create_dataset(spec.name, size=size, seed=start_seed, **spec.kwargs)
    return [ds[i] for i in range(size)]


@functools.lru_cache(maxsize=64)
def scorer(spec: TaskSpec):
    """The task's dataset object, whose `score_answer(answer, entry)` is the verifier."""
    import reasoning_gym

    return reasoning_gym.create_dataset(spec.name, size=1, seed=0, **spec.kwargs)


def answer_template(fmt: str) -> str:
    template = NAMED_FORMATS.get(fmt, fmt)
    if "{answer}" not in template:
        raise ConfigError(f"data.answer_format={fmt!r}: use one of {sorted(NAMED_FORMATS)} or a template with "
                          f"{{answer}} in it, e.g. 'The answer is {{answer}}.'")
    return template


def system_prompt(given: str | None, template: str) -> str:
    if given is not None:
        return given
    if template == "{answer}":
        return "Reply with the final answer only."
    return f"Reply with the final answer only, written as {template.replace('{answer}', '...')}"


def extract(output: str, template: str) -> tuple[str, bool]:
    """(answer, in_format): the text in the answer slot of `template` (its last occurrence), else the whole reply."""
    prefix, _, suffix = template.partition("{answer}")
    text = output.strip()
    if not prefix.strip():
        end = text.rfind(suffix.strip()) if suffix.strip() else -1
        return (text[:end].strip(), True) if end >= 0 else (text, not suffix.strip())
    start = text.rfind(prefix.strip())
    if start < 0:
        return text, False
    rest = text[start + len(prefix.strip()):]
    end = rest.find(suffix.strip()) if suffix.strip() else rest.find("\n")
    return (rest[:end] if end >= 0 else rest).strip(), True


def conversation(question: str, system: str, answer: str | None = None, template: str = "{answer}") -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": question})
    if answer is not None:
        msgs.append({"role": "assistant", "content": template.replace("{answer}", answer)})
    return msgs


def _check_size(size, key: str) -> int:
    if size is None or isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ConfigError(f"{key}={size!r}: the number of problems to generate, a positive integer.")
    return size


def training_problems(data_cfg, seed: int) -> list[tuple[TaskSpec, str, dict]]:
    """(task, label, entry) of the training mixture, interleaved in a seeded order."""
    import random

    specs = parse_tasks(data_cfg.tasks)
    counts = allocate(_check_size(data_cfg.size, "data.size"), specs, "data.size")
    out = []
    for spec, label, n in zip(specs, labels(specs), counts):
        entries = generate(spec, train_seed(spec, seed), n)
        if any(e.get("answer") is None for e in entries):
            raise ConfigError(f"data.tasks: {spec.name} gives no reference answer to train on (its verifier accepts "
                              f"many answers). Score it with eval.tasks instead, or train with objective=grpo.")
        out += [(spec, label, e) for e in entries]
    random.Random(seed).shuffle(out)
    return out


def training_rows(data_cfg, seed: int) -> tuple[list[dict], str]:
    """Rows in the `messages` format for ftune.data.sources (each with its task label)."""
    template = answer_template(data_cfg.answer_format)
    system = system_prompt(data_cfg.system_prompt, template)
    rows = []
    for i, (_, label, e) in enumerate(training_problems(data_cfg, seed)):
        rows.append({"id": f"{label}-{i}", "task": label, "_line": i + 1,
                     "messages": conversation(e["question"], system, str(e["answer"]), template)})
    names = ",".join(sorted({r["task"] for r in rows}))
    return rows, f"reasoning-gym:[{names}](seed={seed})"


def eval_problems(data_cfg, eval_cfg, seed: int, part: str = "test") -> list[dict]:
    """Held-out problems of `eval.tasks` (or the training mixture), checked against the training problems when
    `data` is a reasoning-gym mixture. Each: {id, task, trained, messages (the prompt), entry, spec}.
    `part`: test (what is reported) or validation (what is selected on: other seeds, and no test problem)."""
    if part not in ("test", "validation"):
        raise ValueError(part)
    trained_data = data_cfg.source == "reasoning_gym"
    if eval_cfg.tasks is None and not trained_data:
        raise ConfigError("eval=reasoning_gym needs eval.tasks=[...] (reasoning-gym task names) when the data is not "
                          "a reasoning-gym mixture (data=reasoning_gym).")
    train_specs = parse_tasks(data_cfg.tasks) if trained_data else []
    specs = parse_tasks(eval_cfg.tasks, "eval.tasks") if eval_cfg.tasks is not None else train_specs
    total = _check_size(eval_cfg.limit, "eval.limit")
    counts = allocate(total, specs, "eval.limit")
    seen: set[str] = set()
    if trained_data:
        seen = {e["question"] for _, _, e in training_problems(data_cfg, seed)}
    # The prompt and answer format of the data config (what a reasoning-gym run trained with).
    template = answer_template(data_cfg.get("answer_format") or "tags")
    system = system_prompt(data_cfg.system_prompt, template)
    trained_names = {(s.name, s.config) for s in train_specs}
    context = eval_cfg.get("context_examples") or 0
    out = []
    if part == "validation":  # never a test problem of the same eval.seed (clashes are always replaced)
        seen |= {e["question"] for spec, n in zip(specs, counts)
                 for e in generate(spec, test_seed(spec, eval_cfg.seed), n)}
    for spec, label, n in zip(specs, labels(specs), counts):
        start = (test_seed if part == "test" else validation_seed)(spec, eval_cfg.seed)
        entries = generate(spec, start, n)
        clash = [e for e in entries if e["question"] in seen]
        if clash and (eval_cfg.overlap == "replace" or part == "validation"):
            pool = generate(spec, start, n * 4 + 64)
            entries = [e for e in pool if e["question"] not in seen][:n]
            if len(entries) < n:
                raise ConfigError(f"eval.tasks: only {len(entries)} problems of {label} that training did not see "
                                  f"among {len(pool)} drawn: its problem space is too small for data.size="
                                  f"{data_cfg.size}. Raise its difficulty (config) or lower data.size.")
        elif clash:
            raise ConfigError(
                f"{len(clash)} of {n} held-out {label} problems are also in the training set (e.g. "
                f"{clash[0]['question']!r:.120}): the task's problem space is small for data.size={data_cfg.size}. "
                f"Raise the task's difficulty (its config), lower data.size, or set eval.overlap=replace to score "
                f"fresh problems that training did not see in their place.")
        shots = context_pool(spec, eval_cfg) if context else []
        for i, e in enumerate(entries):
            messages = conversation(e["question"], system)
            if context:
                messages = context_prompt(messages, shots, e, context, f"{eval_cfg.seed}|{label}|{i}", template)
            out.append({"id": f"{label}-{'test' if part == 'test' else 'val'}-{i}", "task": label,
                        "trained": (spec.name, spec.config) in trained_names,
                        "messages": messages, "entry": e, "spec": spec, "template": template})
    return out


def context_pool(spec: TaskSpec, eval_cfg) -> list[dict]:
    """Solved problems that `eval.context_examples` draws from: the task's validation-seed problems (another seed
    block than training and test, so a shot is never a scored problem of the same eval.seed)."""
    k = eval_cfg.context_examples
    return generate(spec, validation_seed(spec, eval_cfg.seed), max(64, 4 * k))


def context_prompt(messages: list[dict], pool: list[dict], query: dict, k: int, key: str,
                   template: str) -> list[dict]:
    """The prompt with k solved problems of the query's task before it, each a user turn (the question) and an
    assistant turn (its answer in the trained format): the layout of objective=many_icl's training sequences
    (ftune/data/many_shot.py), here for many-shot scoring. The k are a seeded draw per query, never the query."""
    import random

    candidates = [e for e in pool if e["question"] != query["question"]]
    chosen = random.Random(key).sample(candidates, k)
    turns = [t for e in chosen for t in conversation(e["question"], "", str(e["answer"]), template)]
    head = [m for m in messages if m["role"] == "system"]
    return head + turns + [m for m in messages if m["role"] != "system"]


def check_config(cfg) -> None:
    """The reasoning-gym settings of a composed config, before any data or model loads: task names, weights,
    generator settings and sizes (the held-out/training overlap is checked where the problems are drawn)."""
    data, ev = cfg.get("data"), cfg.get("eval")
    if data is not None:
        if data.source == "reasoning_gym":
            specs = parse_tasks(data.tasks)
            allocate(_check_size(data.size, "data.size"), specs, "data.size")
            answer_template(data.answer_format)
            _block(cfg.get("seed", 0), "seed")
            if data.eval_split:
                raise ConfigError(f"data.eval_split={data.eval_split} is not read by data=reasoning_gym: the held-out "
                                  f"loss uses the last data.eval_size generated problems. Drop data.eval_split.")
        elif data.get("tasks") is not None:  # e.g. the quickstart recipe's mixture kept with data=jsonl
            log.warning("data.tasks is ignored: data.source=%s reads its own examples (data.tasks is the mixture of "
                        "data=reasoning_gym; to score reasoning-gym tasks, use eval.tasks).", data.source)
    if ev is not None and ev.task == "reasoning_gym":
        if ev.tasks is not None:
            specs = parse_tasks(ev.tasks, "eval.tasks")
        elif data is None or data.source != "reasoning_gym":
            raise ConfigError("eval=reasoning_gym needs eval.tasks=[...] (reasoning-gym task names) when the data is "
                              "not a reasoning-gym mixture (data=reasoning_gym).")
        else:
            specs = parse_tasks(data.tasks)
        allocate(_check_size(ev.limit, "eval.limit"), specs, "eval.limit")
        _block(ev.seed, "eval.seed")
    elif ev is not None and ev.get("tasks") is not None:
        log.warning("eval.tasks is ignored: it names the tasks of eval=reasoning_gym, and eval.task=%s.", ev.task)
