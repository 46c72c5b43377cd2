"""Catalogue of bad configs and bad data: each is refused before a model loads, with a message naming the problem
and the fix, exactly as `ftune train` prints it.

One table per stage. To add a case, add a row: an id, the overrides (``{tmp}`` is the case's temporary directory,
``{data}`` the file written from ``data``), the data file's content (str or bytes, or None), the kind of error the
user sees (``config``, ``data`` or ``model``: the ``ftune: KIND error:`` prefix) and a regex the message must match.

"Before a model loads" is checked by making `ftune.models.loading.load_model` raise: a case that reaches it fails
with `ModelLoaded`, and `test_baselines_reach_the_model` shows the same configs without the fault do reach it.
The whole file runs in about 20 s on two CPU cores (tiny tokenizer, a few rows per case, no model).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ftune.training import checkpoint as ckpt


class ModelLoaded(AssertionError):
    """load_model was called: the check under test ran too late."""


SFT_ROWS = [{"id": f"s{i}", "prompt": f"What is {i} + 1?", "completion": f"It is {i + 1}."} for i in range(8)]
PAIR_ROWS = [{"id": f"p{i}", "prompt": f"What is {i} + 1?", "chosen": f"{i + 1}.", "rejected": f"{i + 2}."}
             for i in range(8)]
HH_ROWS = [{"chosen": f"\n\nHuman: hi {i}\n\nAssistant: hello", "rejected": f"\n\nHuman: hi {i}\n\nAssistant: go"}
           for i in range(8)]


def jsonl(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


@dataclass
class Case:
    id: str
    overrides: list[str]
    kind: str                      # config | data | model: what `ftune: KIND error:` says
    pattern: str                   # must match the message (re.search, DOTALL)
    data: str | bytes | None = None
    setup: object = None           # optional callable(tmp: Path) preparing files (checkpoints, old runs)
    marks: list = field(default_factory=list)


BASE = ["model=tiny_random", "eval=none", "data.eval_size=0", "trainer.max_steps=2", "trainer.batch_size=2",
        "trainer.progress=false"]
SFT = ["data=jsonl", "data.path={tmp}/good_sft.jsonl"]
DPO = ["objective=dpo", "data=jsonl", "data.path={tmp}/good_pairs.jsonl"]


# ------------------------------------------------------------------------------------------ checkpoint fixtures
def _fake_checkpoint(root: Path, step: int, model: str, peft: str | dict = "ftune.peft.lora.LoRA") -> Path:
    """A complete checkpoint directory (manifest and all) recording the given model and PEFT method (its `_target_`,
    or its whole config)."""
    tmp = root / f".tmp-checkpoint-{step}"
    tmp.mkdir(parents=True)
    (tmp / "adapter_model.safetensors").write_bytes(b"weights")
    (tmp / ckpt.STATE).write_bytes(b"state")
    (tmp / "ftune_config.yaml").write_text(OmegaConf.to_yaml({
        "model": {"name_or_path": model}, "peft": peft if isinstance(peft, dict) else {"_target_": peft}}))
    return ckpt.finalize(tmp, root / f"checkpoint-{step}")


def other_model_ckpt(tmp: Path) -> None:
    _fake_checkpoint(tmp / "old" / "checkpoints", 4, "HuggingFaceTB/SmolLM2-360M-Instruct")


def other_model_in_run(tmp: Path) -> None:
    _fake_checkpoint(tmp / "run" / "checkpoints", 2, "HuggingFaceTB/SmolLM2-360M-Instruct")


def other_peft_ckpt(tmp: Path) -> None:
    _fake_checkpoint(tmp / "old" / "checkpoints", 4, "tiny_random", peft="ftune.peft.full.FullFineTune")


def other_rank_ckpt(tmp: Path) -> None:
    from ftune.paths import configs_dir

    lora = OmegaConf.to_container(OmegaConf.load(configs_dir() / "peft" / "lora.yaml"))
    _fake_checkpoint(tmp / "old" / "checkpoints", 4, "tiny_random", peft={**lora, "r": 8, "dropout": 0.2})


def damaged_ckpt(tmp: Path) -> None:
    path = _fake_checkpoint(tmp / "old" / "checkpoints", 4, "tiny_random")
    (path / "adapter_model.safetensors").write_bytes(b"weightz")


def previous_run(tmp: Path) -> None:
    (tmp / "run").mkdir()
    (tmp / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')


# --------------------------------------------------------------------------------- config cases (no data read)
CONFIG_CASES = [
    # keys added with `+` to a fixed group would otherwise be silently ignored
    Case("plus-typo-trainer-key", [*SFT, "+trainer.max_step=5"], "config",
         r"trainer\.max_step: unknown key.*Did you mean 'max_steps'\?.*Valid keys: .*max_steps"),
    Case("plus-typo-data-key", [*SFT, "+data.pakcing=true"], "config", r"data\.pakcing: unknown key.*'packing'"),
    Case("plus-typo-model-key", [*SFT, "+model.dtyp=bfloat16"], "config", r"model\.dtyp: unknown key.*'dtype'"),
    Case("plus-typo-eval-key", [*SFT, "+eval.limt=5"], "config", r"eval\.limt: unknown key.*'limit'"),
    Case("context-examples-outside-reasoning-gym", [*SFT, "eval=gsm8k", "eval.context_examples=2"], "config",
         r"eval\.context_examples=2 is read by eval=reasoning_gym only.*eval=many_shot"),
    Case("peft-alias-lora-alpha", [*SFT, "+peft.lora_alpha=8"], "config",
         r"peft\.lora_alpha: unknown key.*Did you mean 'alpha'\?"),
    Case("objective-key-typo", [*SFT, "+objective.chunksize=64"], "config",
         r"objective\.chunksize: unknown key.*Did you mean 'chunk_size'\?"),
    Case("objective-wrong-type", [*SFT, "objective.chunk_size=big"], "config",
         r"objective\.chunk_size='big': expected int \| None, got str.*objective\.chunk_size=\.\.\."),
    Case("dpo-beta-wrong-type", [*DPO, "objective.beta=high"], "config", r"objective\.beta='high': expected float"),
    Case("qlora-with-full-finetuning", [*SFT, "peft=none", "+peft.quantize=4bit"], "config",
         r"peft=none \(full fine-tuning\) with peft\.quantize=4bit.*Use peft=qlora"),
    Case("quantize-unknown", [*SFT, "peft=qlora", "peft.quantize=2bit"], "config",
         r"peft\.quantize='2bit' must be null, 4bit or 8bit"),
    Case("lora-rank-zero", [*SFT, "peft.r=0"], "config", r"peft\.r=0 must be >= 1"),
    Case("lora-target-typo", [*SFT, "peft.target_modules=[q_proj,v_prj]"], "config",
         r"peft\.target_modules \['v_prj'\] match no module of this model\. Its linear layers are: .*v_proj"),
    Case("lora-target-regex-empty", [*SFT, "peft.target_modules=.*attn_qkv"], "config",
         r"peft\.target_modules=\.\*attn_qkv selects no linear layer of this model"),
    Case("lift-target-typo", [*SFT, "peft=lift", "peft.target_modules=[up_proj,dwn_proj]"], "config",
         r"peft\.target_modules \['dwn_proj'\] match no module"),
    Case("lora-dropout-one", [*SFT, "peft.dropout=1.0"], "config", r"peft\.dropout=1\.0 must be in \[0, 1\)"),
    Case("lora-alpha-zero", [*SFT, "peft.alpha=0"], "config",
         r"peft\.alpha=0(\.0)? must be > 0 \(the update is scaled by alpha / r"),
    Case("lora-bias-unknown", [*SFT, "peft.bias=some"], "config", r"peft\.bias='some' must be none, all or lora_only"),
    Case("packing-with-dpo", [*DPO, "data.packing=true"], "config",
         r"data\.packing=true does not work with ftune\.objectives\.dpo\.DPO.*Set data\.packing=false"),
    Case("packing-with-group-by-length", [*SFT, "data.packing=true", "data.group_by_length=true"], "config",
         r"data\.packing=true and data\.group_by_length=true: packed rows are already full.*Keep one"),
    Case("dpo-on-sft-source", ["objective=dpo", "data=gsm8k"], "config",
         r"trains on preference pairs, but data=gsm8k.*Use data=hh_rlhf, or data=jsonl with \{prompt, chosen"),
    Case("sft-on-pair-source", ["data=hh_rlhf"], "config",
         r"data=hh_rlhf holds preference pairs, but objective .*SFT.*Use objective=dpo"),
    Case("eval-split-with-preference-eval", [*DPO, "eval=preference", "eval.split=validation"], "config",
         r"eval\.split=validation is not read by eval=preference: it scores the held-out part of the data.*"
         r"Set data\.eval_split=validation instead"),
    Case("selection-scoring-pairs", [*DPO, "selection=kmq", "selection.budget=2"], "config",
         r"selection .*KMQ scores prompt/response examples, but objective .*DPO trains on 'preference' data\. "
         r"Use selection=random"),
    Case("dpo-loss-unknown", [*DPO, "objective.loss=kto"], "config", r"objective\.loss='kto' is not one of sigmoid"),
    Case("dpo-beta-zero", [*DPO, "objective.beta=0"], "config", r"objective\.beta=0 must be > 0"),
    Case("dpo-smoothing-without-cdpo", [*DPO, "objective.label_smoothing=0.1"], "config",
         r"objective\.label_smoothing is only read by loss=cdpo"),
    Case("scheduler-typo", [*SFT, "trainer.scheduler=cosin"], "config",
         r"trainer\.scheduler='cosin' is not one of cosine, linear, constant\. Did you mean 'cosine'\?"),
    Case("eval-task-typo", [*SFT, "eval.task=gsm9k"], "config", r"eval\.task='gsm9k' is not one of .*'gsm8k'"),
    Case("data-format-unknown", [*SFT, "data.format=sharegpt"], "config",
         r"data\.format='sharegpt' is not one of auto, prompt_completion, messages, alpaca"),
    Case("attn-unknown", [*SFT, "model.attn_implementation=flash"], "config",
         r"model\.attn_implementation='flash' is not one of sdpa, eager, flash_attention_2"),
    Case("packed-attention-eager", [*SFT, "model.attn_implementation=eager", "model.packed_attention=per_example"],
         "config", r"model\.packed_attention=per_example runs SDPA .* model\.attn_implementation=eager"),
    Case("packed-attention-unknown", [*SFT, "model.packed_attention=varlen"], "config",
         r"model\.packed_attention='varlen' is not one of auto, per_example, masked"),
    Case("lr-negative", [*SFT, "trainer.lr=-0.001"], "config", r"trainer\.lr=-0\.001 must be >= 0"),
    Case("grad-accum-zero", [*SFT, "trainer.grad_accum=0"], "config", r"trainer\.grad_accum=0 must be > 0"),
    Case("epochs-zero", [*SFT, "trainer.epochs=0"], "config", r"trainer\.epochs=0 must be > 0"),
    Case("keep-last-zero", [*SFT, "trainer.keep_last=0"], "config", r"trainer\.keep_last=0 must be > 0"),
    Case("save-every-negative", [*SFT, "trainer.save_every=-2"], "config", r"trainer\.save_every=-2 must be >= 0"),
    Case("max-length-zero", [*SFT, "data.max_length=0"], "config", r"data\.max_length=0 must be > 0"),
    Case("data-limit-zero", [*SFT, "data.limit=0"], "config", r"data\.limit=0 must be > 0"),
    Case("eval-batch-zero", [*SFT, "eval.batch_size=0"], "config", r"eval\.batch_size=0 must be > 0"),
    Case("warmup-ratio-negative", [*SFT, "trainer.warmup_ratio=-0.1"], "config",
         r"trainer\.warmup_ratio=-0\.1 must be in \[0, 1\)"),
    Case("adam-beta-over-one", [*SFT, "trainer.adam_betas=[0.9,1.5]"], "config",
         r"trainer\.adam_betas=\[0\.9, 1\.5\] must be two numbers in \[0, 1\)"),
    Case("spike-factor-below-one", [*SFT, "trainer.spike_factor=0.5"], "config",
         r"trainer\.spike_factor=0\.5: .*use a factor > 1 \(e\.g\. 3\), or 0 to turn the guard off"),
    Case("max-steps-minus-two", [*SFT, "trainer.max_steps=-2"], "config",
         r"trainer\.max_steps=-2: use a positive number of steps, or -1"),
    Case("jsonl-without-path", ["data=jsonl", "data.path=null"], "config",
         r"data=jsonl needs `data\.path=FILE\.jsonl`"),
    Case("selection-budget-zero", [*SFT, "selection=random", "selection.budget=0"], "config",
         r"selection\.budget=0 must be >= 1"),
    Case("selection-keys-without-method", [*SFT, "+selection.budget=5"], "config",
         r"selection: keys \['budget'\] are set but `selection\._target_` is null.*Pick a selection method"),
    Case("selection-budget-above-pool", [*SFT, "selection=kmq", "selection.budget=50"], "config",
         r"selection\.budget=50 is larger than the pool of 8 training examples\. Lower selection\.budget"),
    Case("selection-k-above-pool", [*SFT, "selection=kmq", "selection.budget=4", "selection.k=9"], "config",
         r"selection\.k=9 clusters is more than the pool of 8 examples"),
    Case("selection-got-d-no-target", [*SFT, "selection=got_d", "selection.budget=4"], "config",
         r"selection=got_d needs selection\.target_path=FILE\.jsonl"),
    Case("selection-got-d-empty-target", [*SFT, "selection=got_d", "selection.budget=4",
                                          "selection.target_path={data}"], "data", r"no records at all", data=""),
    Case("objective-target-missing-module", [*SFT, "objective._target_=mylosses.Focal"], "config",
         r"objective\._target_: cannot import 'mylosses\.Focal'.*PYTHONPATH"),
    Case("fp16-with-bf16-weights", [*SFT, "trainer.mixed_precision=fp16", "model.dtype=bfloat16"], "config",
         r"mixes two half formats; use trainer\.mixed_precision=bf16"),
    Case("resume-missing-dir", [*SFT, "trainer.resume={tmp}/nowhere"], "config",
         r"trainer\.resume=.*nowhere: no such directory\. Use auto, or a checkpoint-N directory"),
    Case("resume-other-model", [*SFT, "trainer.resume={tmp}/old/checkpoints/checkpoint-4"], "config",
         r"was trained with model\.name_or_path=HuggingFaceTB/SmolLM2-360M-Instruct, this run has tiny_random\. "
         r"Resume with the same model\.name_or_path, or start afresh", setup=other_model_ckpt),
    Case("resume-auto-other-model", [*SFT, "trainer.resume=auto"], "config",
         r"checkpoint-2 was trained with model\.name_or_path=HuggingFaceTB/SmolLM2-360M-Instruct.*Resume with the same",
         setup=other_model_in_run),
    Case("resume-other-peft", [*SFT, "trainer.resume={tmp}/old/checkpoints/checkpoint-4"], "config",
         r"was trained with peft\._target_=ftune\.peft\.full\.FullFineTune, this run has ftune\.peft\.lora\.LoRA",
         setup=other_peft_ckpt),
    Case("resume-other-rank", [*SFT, "trainer.resume={tmp}/old/checkpoints/checkpoint-4"], "config",
         r"checkpoint-4 was trained with peft\.r=8 \(this run: 16\)\. A resumed run keeps the method's settings",
         setup=other_rank_ckpt),
    Case("resume-damaged", [*SFT, "trainer.resume={tmp}/old/checkpoints/checkpoint-4"], "config",
         r"the checkpoint is damaged \(adapter_model\.safetensors does not match its checksum\)\. Use an earlier one",
         setup=damaged_ckpt),
    Case("output-dir-holds-a-run", SFT, "config",
         r"output_dir=.*run already holds a run\. Continue it with trainer\.resume=auto, or choose another",
         setup=previous_run),
    Case("batch-larger-than-data", [*SFT, "trainer.batch_size=6", "trainer.grad_accum=2"], "config",
         r"only 8 training examples, fewer than one optimizer step needs .* = 12\)\. Lower them"),
    Case("model-dir-missing", [*SFT, "model.name_or_path={tmp}/no_model"], "model", r"no_model.*no such directory"),
    Case("grpo-one-generation", [*SFT, "objective=grpo", "objective.num_generations=1"], "config",
         r"objective\.num_generations=1 must be an integer >= 2: GRPO's baseline is the mean reward"),
    Case("grpo-verifier-without-task", [*SFT, "objective=grpo"], "config",
         r"objective\.rewards: verifier needs a task with a verifier: data=reasoning_gym .* data is jsonl\. "
         r"Rewards that need no verifier: length, or your own function"),
    Case("grpo-reward-typo", [*SFT, "objective=grpo", "objective.rewards=[{name: verifer}]"], "config",
         r"objective\.rewards\[0\]: no built-in reward 'verifer'\. Did you mean 'verifier'\?"),
    Case("grpo-reward-import", [*SFT, "objective=grpo", "objective.rewards=[{_target_: myrewards.score}]"], "config",
         r"objective\.rewards: cannot import 'myrewards' for _target_='myrewards\.score'.*PYTHONPATH"),
    Case("grpo-reward-not-callable-as-reward", [*SFT, "objective=grpo", "objective.rewards=[{_target_: math.sqrt}]"],
         "config", r"objective\.rewards\[0\]: math\.sqrt cannot be called as a reward: it must take \(prompts, "
                   r"completions, \*\*kwargs\)"),
]

# ----------------------------------------------------------------------------------------------- data cases
NOT_UTF8 = jsonl(SFT_ROWS[:2]).encode() + b'{"prompt": "caf\xe9", "completion": "ok"}\n'
DATA_CASES = [
    Case("malformed-json", SFT[:1] + ["data.path={data}"], "data",
         r"data\.jsonl:3: not valid JSON .*fix or delete that line",
         data=jsonl(SFT_ROWS[:2]) + '{"prompt": "x", "completion": \n'),
    Case("missing-field", SFT[:1] + ["data.path={data}", "data.format=prompt_completion"], "data",
         r"data\.jsonl:2: missing field\(s\) \['completion'\] for format 'prompt_completion'.*map names with "
         r"data\.fields", data=jsonl([SFT_ROWS[0], {"prompt": "only a prompt"}])),
    Case("unknown-fields", SFT[:1] + ["data.path={data}"], "data",
         r"data\.jsonl:1: cannot tell the format from fields \['input', 'target'\].*data\.fields=",
         data=jsonl([{"input": "a", "target": "b"}])),
    Case("empty-strings-everywhere", SFT[:1] + ["data.path={data}"], "data",
         r"no usable examples in split 'train' \(read 3, 3 empty\)\. Check data\.path",
         data=jsonl([{"prompt": "a", "completion": ""}, {"prompt": "", "completion": "b"},
                     {"prompt": " ", "completion": " "}])),
    Case("not-utf8", SFT[:1] + ["data.path={data}"], "data", r"data\.jsonl:3: not UTF-8 text\. Re-encode",
         data=NOT_UTF8),
    Case("all-longer-than-max-length", SFT[:1] + ["data.path={data}", "data.max_length=8"], "data",
         r"all 8 example\(s\) are longer than data\.max_length=8.*Raise data\.max_length or set "
         r"data\.truncation=truncate", data=jsonl(SFT_ROWS)),
    Case("truncation-error", SFT[:1] + ["data.path={data}", "data.max_length=20", "data.truncation=error"], "data",
         r"example 's0' has \d+ tokens > data\.max_length=20\. Raise data\.max_length, or set data\.truncation=drop",
         data=jsonl(SFT_ROWS)),
    Case("duplicate-ids", SFT[:1] + ["data.path={data}"], "data",
         r"data\.jsonl:4: id 's1' already used at line 2\. Ids must be unique",
         data=jsonl(SFT_ROWS[:3] + [dict(SFT_ROWS[3], id="s1")])),
    # The data phase reads every line before it says anything: all the bad lines of a file in one error.
    Case("several-bad-lines-at-once", SFT[:1] + ["data.path={data}"], "data",
         r"^2 problems in .*data\.jsonl, each with its fix:\n  1\. .*data\.jsonl:2: not valid JSON.*\n  2\. "
         r".*data\.jsonl:4: expected a JSON object, got list",
         data=jsonl([SFT_ROWS[0], '{"prompt": "x",', SFT_ROWS[1], "[1, 2]"])),
    Case("several-bad-examples-at-once", SFT[:1] + ["data.path={data}", "data.format=prompt_completion"], "data",
         r"^3 problems in .*data\.jsonl.*1\. .*data\.jsonl:3: id 's0' already used at line 1.*2\. .*data\.jsonl:2: "
         r"missing field\(s\) \['completion'\].*3\. .*data\.jsonl:4: field 'prompt' must be a string",
         data=jsonl([SFT_ROWS[0], {"prompt": "only a prompt"}, dict(SFT_ROWS[1], id="s0"),
                     {"prompt": ["a"], "completion": "c"}])),
    Case("prompt-wrong-type", SFT[:1] + ["data.path={data}"], "data",
         r"data\.jsonl:2: field 'prompt' must be a string, got list",
         data=jsonl([SFT_ROWS[0], {"prompt": ["a", "b"], "completion": "c"}])),
    Case("messages-not-a-list", SFT[:1] + ["data.path={data}"], "data",
         r"data\.jsonl:1: 'messages' must be a non-empty list of \{role, content\}", data=jsonl([{"messages": "hi"}])),
    Case("message-content-not-string", SFT[:1] + ["data.path={data}"], "data",
         r"data\.jsonl:1: each message needs role in .* and a string content",
         data=jsonl([{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}])),
    Case("empty-file", SFT[:1] + ["data.path={data}"], "data",
         r"data\.jsonl: no records at all \(an empty file or split 'train'\)\. Check data\.path", data=""),
    Case("missing-file", SFT[:1] + ["data.path={tmp}/nope.jsonl"], "data",
         r"nope\.jsonl: no such file\. Check data\.path"),
    Case("missing-eval-file", [*SFT, "data.eval_split={tmp}/held_out.jsonl"], "data",
         r"held_out\.jsonl: no such file\. Check data\.eval_split"),
    Case("json-array-file", SFT[:1] + ["data.path={data}"], "data",
         r"data\.jsonl:1: expected a JSON object, got list\. The file must be JSON Lines",
         data=json.dumps(SFT_ROWS[:3]) + "\n"),
    Case("preference-data-with-sft", SFT[:1] + ["data.path={data}"], "data",
         r"data\.jsonl:1: this is a preference pair \(chosen/rejected\).*Use a preference objective \(objective=dpo\)",
         data=jsonl(PAIR_ROWS)),
    Case("sft-data-with-dpo", ["objective=dpo", "data=jsonl", "data.path={data}"], "data",
         r"data\.jsonl:1: missing field\(s\) \['chosen', 'rejected'\].*train it with objective=sft",
         data=jsonl(SFT_ROWS)),
    Case("pair-missing-rejected", ["objective=dpo", "data=jsonl", "data.path={data}"], "data",
         r"data\.jsonl:2: missing field\(s\) \['rejected'\]; preference data needs chosen and rejected",
         data=jsonl([PAIR_ROWS[0], {"prompt": "q", "chosen": "a"}])),
    Case("pair-prompt-wrong-type", ["objective=dpo", "data=jsonl", "data.path={data}"], "data",
         r"data\.jsonl:1: 'prompt' must be a string or a non-empty list of messages",
         data=jsonl([{"prompt": 7, "chosen": "a", "rejected": "b"}])),
    Case("pair-chosen-ends-with-user", ["objective=dpo", "data=jsonl", "data.path={data}"], "data",
         r"data\.jsonl:1: 'chosen' messages must end with the assistant's turn",
         data=jsonl([{"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}])),
    Case("identical-pairs-everywhere", ["objective=dpo", "data=jsonl", "data.path={data}"], "data",
         r"no usable preference pairs .*\(read 3: 3 with identical chosen and rejected.*needs two different, "
         r"non-empty responses", data=jsonl([{"prompt": f"q{i}", "chosen": "same", "rejected": "same"}
                                             for i in range(3)])),
    Case("hh-transcript-malformed", ["objective=dpo", "data=hh_rlhf", "data.path={data}"], "data",
         r"data\.jsonl:2: not an HH-RLHF transcript \('\\n\\nHuman: \.\.\. \\n\\nAssistant: \.\.\.'\)",
         data=jsonl([HH_ROWS[0], {"chosen": "Human: hi Assistant: yo", "rejected": "Human: hi Assistant: no"}])),
    Case("hh-transcripts-mismatched-everywhere", ["objective=dpo", "data=hh_rlhf", "data.path={data}"], "data",
         r"no usable preference pairs .*2 whose transcripts differ before the final answer",
         data=jsonl([{"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}] * 2)),
    Case("hh-ends-with-human", ["objective=dpo", "data=hh_rlhf", "data.path={data}"], "data",
         r"data\.jsonl:1: both transcripts must end with an Assistant turn",
         data=jsonl([{"chosen": "\n\nHuman: a\n\nAssistant: x\n\nHuman: ok",
                      "rejected": "\n\nHuman: a\n\nAssistant: y"}])),
]


def _format(items, tmp: Path, data_file: Path) -> list[str]:
    return [s.replace("{tmp}", str(tmp)).replace("{data}", str(data_file)) for s in items]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A temporary directory with good SFT and preference files, and load_model replaced by a tripwire."""
    import ftune.models.loading as loading

    def tripwire(*args, **kwargs):
        raise ModelLoaded("load_model was called: the bad input was not caught before the model loads")

    monkeypatch.setattr(loading, "load_model", tripwire)
    (tmp_path / "good_sft.jsonl").write_text(jsonl(SFT_ROWS))
    (tmp_path / "good_pairs.jsonl").write_text(jsonl(PAIR_ROWS))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_case(case: Case, tmp: Path, compose, capsys) -> str:
    """Compose BASE + the case's overrides and run `ftune train`'s reporting path; returns the error message."""
    from ftune.reporting import run_reporting_errors
    from ftune.train import train

    data_file = tmp / "data.jsonl"
    if case.data is not None:
        (data_file.write_bytes if isinstance(case.data, bytes) else data_file.write_text)(case.data)
    if case.setup is not None:
        case.setup(tmp)
    cfg = compose(_format([*BASE, f"output_dir={tmp}/run", *case.overrides], tmp, data_file))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_reporting_errors(train, cfg)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("ftune:")]
    assert len(lines) == 1, err
    prefix = f"ftune: {case.kind} error: "
    assert lines[0].startswith(prefix), lines[0]
    return err[err.index(lines[0]) + len(prefix):].rstrip()  # a list of problems goes on over the next lines


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CONFIG_CASES + DATA_CASES])
def test_refused_before_the_model_loads(case, workdir, compose, capsys):
    message = run_case(case, workdir, compose, capsys)
    assert re.search(case.pattern, message, re.DOTALL), f"message does not match {case.pattern!r}:\n{message}"


# Several mistakes in one config: one error lists every one (each with its fix), before the model loads.
SEVERAL = [("trainer.warmup_ratio=2", r"trainer\.warmup_ratio=2(\.0)? must be in \[0, 1\)"),
           ("+peft.lora_alpha=8", r"peft\.lora_alpha: unknown key.*Did you mean 'alpha'\?"),
           ("eval.batch_size=0", r"eval\.batch_size=0 must be > 0"),
           ("data.packing=true", r"data\.packing=true does not work with ftune\.objectives\.dpo\.DPO"),
           ("objective.beta=high", r"objective\.beta='high': expected float")]


def test_several_mistakes_are_reported_at_once(workdir, compose, capsys):
    from ftune.reporting import run_reporting_errors
    from ftune.train import train

    cfg = compose(_format([*BASE, f"output_dir={workdir}/run", *DPO, *[o for o, _ in SEVERAL]], workdir,
                          workdir / "data.jsonl"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_reporting_errors(train, cfg)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith(f"ftune: config error: {len(SEVERAL)} problems in the config, each with its fix:\n"), err
    items = [line for line in err.splitlines()[1:] if re.match(r"  \d+\. ", line)]
    assert len(items) == len(SEVERAL), err
    for _, pattern in SEVERAL:
        assert any(re.search(pattern, i) for i in items), f"{pattern!r} is not among:\n{err}"
    assert not (workdir / "run" / "metrics.jsonl").exists()


def test_one_mistake_is_said_as_one_paragraph(workdir, compose, capsys):
    """With one problem the message is that problem alone (no list), as every catalogue case reads it."""
    from ftune import preflight

    cfg = compose(_format([*BASE, f"output_dir={workdir}/run", *SFT, "trainer.warmup_ratio=2"], workdir,
                          workdir / "data.jsonl"))
    with pytest.raises(preflight.PreflightError) as e:
        preflight.train(cfg)
    assert e.value.problems == [str(e.value)] and str(e.value).startswith("trainer.warmup_ratio=2")


@pytest.mark.parametrize("overrides", [SFT, DPO, ["objective=dpo", "data=hh_rlhf", "data.path={tmp}/hh.jsonl"],
                                       [*DPO, "selection=random", "selection.budget=2"]],
                         ids=["sft", "dpo", "hh", "dpo-random-selection"])
def test_baselines_reach_the_model(overrides, workdir, compose):
    """Without the fault, the same configs get as far as loading the model (so the tripwire is what would fire)."""
    from ftune.train import Trainer

    (workdir / "hh.jsonl").write_text(jsonl(HH_ROWS))
    cfg = compose(_format([*BASE, f"output_dir={workdir}/run", *overrides], workdir, workdir / "data.jsonl"))
    with pytest.raises(ModelLoaded):
        Trainer(cfg)


# ------------------------------------------------------------------------ the command line, before composition
# Misspelt keys and group names on the command line: Hydra refuses them but suggests appending the typo with `+`;
# `ftune` names the key meant instead. Group choices that do not exist are Hydra's own message (it lists options).
CLI_CASES = [
    ("trainer.max_step=5", r"trainer\.max_step is not a key\. Did you mean 'max_steps'\?"),
    ("trainer.batchsize=8", r"trainer\.batchsize is not a key\. Did you mean 'batch_size'\?"),
    ("data.max_len=128", r"data\.max_len is not a key\. Did you mean 'max_length'\?"),
    ("model.name=foo", r"model\.name is not a key\..*Valid keys of model: name_or_path"),
    ("objectiv=dpo", r"'objectiv' is not a config group or key of `ftune train`\. Did you mean 'objective'\?"),
    ("trainr.lr=1e-4", r"'trainr' is not a config group .*Did you mean 'trainer'\?"),
    ("+seeds=3", r"'seeds' is not a config group .*Did you mean 'seed'\?"),
    # The keys of peft / objective / selection are those of the option chosen (command line, recipe or default).
    ("peft.rr=8", r"peft\.rr=8: peft=lora \(ftune\.peft\.lora\.LoRA\) has no key 'rr'\. Did you mean 'r'\?"),
    ("peft=qlora peft.bits=4", r"peft=qlora .*has no key 'bits'.*Its keys: r, alpha,.* quantize"),
    ("peft=none peft.r=8", r"peft=none \(ftune\.peft\.full\.FullFineTune\) has no key 'r'\. Its keys: none"),
    ("+recipe=lora_gsm8k_kmq selection.budgt=3", r"selection=kmq .*has no key 'budgt'\. Did you mean 'budget'\?"),
    ("objective=dpo objective.betta=0.2", r"objective=dpo .*has no key 'betta'\. Did you mean 'beta'\?"),
]


@pytest.mark.parametrize(("override", "pattern"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_command_line_typos(override, pattern, workdir, capsys, monkeypatch):
    from ftune.cli import main

    monkeypatch.setattr(sys, "path", list(sys.path))  # main() puts the launch directory on sys.path

    with pytest.raises(SystemExit) as e:
        main(["train", "model=tiny_random", *override.split(), f"output_dir={workdir}/run"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("ftune: config error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(pattern, err), err


@pytest.mark.parametrize(("override", "pattern"), [
    ("peft=lorra", r"Could not find 'peft/lorra'.*Available options in 'peft':.*\blora\b"),
    ("objective=dpoo", r"Could not find 'objective/dpoo'.*Available options in 'objective':.*\bdpo\b"),
    ("data=jsonlines", r"Could not find 'data/jsonlines'.*Available options in 'data':.*\bjsonl\b"),
    ("trainer.batch_size=abc", r"trainer\.batch_size.*Value 'abc' (of type 'str' )?could not be converted to Integer"),
], ids=["peft", "objective", "data", "wrong-type"])
def test_composition_errors_list_the_options(override, pattern, compose):
    with pytest.raises(ConfigCompositionException) as e:
        compose([override])
    text = f"{e.value}\n{e.value.__cause__ or ''}"
    assert re.search(pattern, text, re.DOTALL), text


def test_catalogue_size():
    assert len(CONFIG_CASES) >= 30 and len(DATA_CASES) >= 15
    assert len({c.id for c in CONFIG_CASES + DATA_CASES}) == len(CONFIG_CASES + DATA_CASES)
