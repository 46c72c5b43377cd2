"""Judges: accept or reject a model's answer to an example, given the example's gold answer (or tests).

Used by `objective=s3ft` to decide whether the model's own answer (or its paraphrase of the gold answer) may replace
the gold response. A judge is a callable `judge(items) -> list[bool]`; an item is a dict with `prompt` (the
conversation up to the answer), `gold` (the gold response text), `answer` (the text to judge) and `tests` (the
example's tests, for `unit_tests`).

- `numeric_match`: the final numbers agree (GSM8K-style extraction: `#### N`, "the answer is N", else the last
  number; `,`/`$` stripped, compared by value) — ftune.eval.gsm8k.
- `verifier`: the task's own verifier (reasoning-gym `score_answer`) on the answer in the data's answer format
  (`<answer>...</answer>` by default), full credit only: the judge of data=reasoning_gym, where `numeric_match`
  would also accept a right number outside the trained format. Items carry their example's `id` (`TASK-i`).
- `unit_tests`: the answer's code (a fenced block, MBPP's [BEGIN]...[DONE], or the whole text) followed by the
  example's tests runs in a fresh `python -I` in a temporary directory, with a timeout, resource limits, no
  environment (so no proxies) and, where the kernel allows it, its own empty network namespace. Best effort, not a
  security boundary: run untrusted answers on a machine you do not mind them running on.
- `llm_judge`: a model (by default the base model being fine-tuned, as in the S3FT paper) reads the question, the
  reference and the answer and is asked for yes/no; the answer is accepted when the log-probability mass of the first
  token on "yes" variants beats the one on "no" variants.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ftune.config import ConfigError
from ftune.data.sources import DataError
from ftune.eval import gsm8k
from ftune.eval.generation import left_pad
from ftune.training import distributed as dist

log = logging.getLogger(__name__)
JUDGES = ("numeric_match", "verifier", "unit_tests", "llm_judge")
# Sources whose examples never carry tests (so unit_tests cannot judge them).
NO_TESTS_SOURCES = ("gsm8k", "gsm_symbolic")
JUDGE_PROMPT = ("Question:\n{question}\n\nReference answer:\n{reference}\n\nProposed answer:\n{answer}\n\n"
                "Is the proposed answer correct, that is, does it reach the same final answer as the reference? "
                "Reply with yes or no.")


def last_user(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


# ------------------------------------------------------------------------------------------------ numeric_match
class NumericMatch:
    """The answer's final number equals the gold answer's (gold without a number: always rejected)."""

    def __call__(self, items: list[dict]) -> list[bool]:
        return [gsm8k.score(it["answer"], it["gold"]) for it in items]


# ----------------------------------------------------------------------------------------------------- verifier
class Verifier:
    """Full credit from the reasoning-gym task's `score_answer` for the answer extracted in the data's answer format.
    Built from the run's data config and seed, which regenerate each training example's problem (`TASK-i` ids)."""

    def __init__(self, data_cfg, seed: int):
        from ftune.data import reasoning_gym as rg

        if data_cfg.source != "reasoning_gym":
            raise ConfigError(f"objective.judge=verifier scores answers with reasoning-gym's verifiers and needs "
                              f"data=reasoning_gym (data.source is {data_cfg.source}). Use judge=numeric_match for "
                              f"GSM8K-style data.")
        self.rg = rg
        self.template = rg.answer_template(data_cfg.get("answer_format") or "tags")
        self.problems = {f"{label}-{i}": (spec, e) for i, (spec, label, e) in
                         enumerate(rg.training_problems(data_cfg, seed))}

    def score(self, example_id: str, answer: str) -> float:
        if example_id not in self.problems:
            raise DataError(f"judge=verifier: no reasoning-gym problem has id {example_id!r} in this data config.")
        spec, entry = self.problems[example_id]
        pred, _ = self.rg.extract(answer, self.template)
        try:
            return float(self.rg.scorer(spec).score_answer(pred, entry) or 0.0)
        except Exception:  # noqa: BLE001 - a verifier that cannot parse an answer scores it wrong
            return 0.0

    def __call__(self, items: list[dict]) -> list[bool]:
        return [self.score(str(it["id"]), it["answer"]) >= 1.0 for it in items]


# --------------------------------------------------------------------------------------------------- unit_tests
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\r?\n(.*?)```", re.S | re.I)
_BEGIN = re.compile(r"\[\[?BEGIN\]\]?(.*?)(?:\[\[?DONE\]\]?|$)", re.S)


def extract_code(text: str) -> str:
    """The code of an answer: its first fenced block, else the [BEGIN]...[DONE] span (MBPP prompts), else the text."""
    if m := _FENCE.search(text):
        return m.group(1)
    if m := _BEGIN.search(text):
        code = m.group(1).strip()
        if len(code) >= 2 and code[0] == code[-1] == "'" and not code.startswith("'''"):
            code = code[1:-1]  # MBPP's few-shot prompts quote the code: [BEGIN] 'def f(): ...' [DONE]
        return code
    return text


def _unshare_network() -> None:
    # Linux only; a new network namespace holds only a down loopback. Needs root or unprivileged user namespaces.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x40000000) != 0:                    # CLONE_NEWNET
            libc.unshare(0x10000000 | 0x40000000)            # CLONE_NEWUSER | CLONE_NEWNET
    except (OSError, AttributeError):
        pass


def _limits(timeout: float, memory_bytes: int):
    def apply() -> None:
        try:
            import resource

            cpu = int(timeout) + 1
            for what, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory_bytes),
                                (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_CORE, 0)):
                resource.setrlimit(what, (value, value))
        except (ImportError, ValueError, OSError):
            pass
        _unshare_network()

    return apply


def run_tests(code: str, tests: list[str] | str, timeout: float = 10.0,
              memory_bytes: int = 2 << 30) -> tuple[bool, str]:
    """Run `code` followed by `tests` (assert statements or a test script); (passed, reason).

    reason: "passed", "timeout", or the last line of the error (e.g. "AssertionError", "SyntaxError: ...").
    """
    program = code + "\n\n" + (tests if isinstance(tests, str) else "\n".join(tests)) + "\n"
    with tempfile.TemporaryDirectory(prefix="ftune-judge-") as cwd:
        Path(cwd, "program.py").write_text(program)
        os.chmod(cwd, 0o777)  # writable for the program even when it runs under an unmapped user namespace id
        env = {"PATH": "/usr/bin:/bin", "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        proc = subprocess.Popen([sys.executable, "-I", "program.py"], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=_limits(timeout, memory_bytes) if os.name == "posix" else None)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the program's own session: it and anything it started
            proc.communicate()
            return False, "timeout"
    if proc.returncode == 0:
        return True, "passed"
    if proc.returncode < 0:
        return False, f"killed by signal {-proc.returncode}"  # e.g. the CPU-time limit (SIGXCPU)
    lines = err.decode(errors="replace").strip().splitlines()
    return False, (lines[-1][:200] if lines else f"exit status {proc.returncode}")


class UnitTests:
    """The answer's code passes the example's `tests`."""

    def __init__(self, timeout: float = 10.0):
        self.timeout = timeout

    def __call__(self, items: list[dict]) -> list[bool]:
        return [run_tests(extract_code(it["answer"]), it["tests"], self.timeout)[0] for it in items]


# ---------------------------------------------------------------------------------------------------- llm_judge
def yes_no_ids(tokenizer) -> tuple[list[int], list[int]]:
    """First-token ids of the spellings of yes and of no (with and without a leading space, capitalised or not)."""
    def first(words):
        return {tokenizer.encode(w, add_special_tokens=False)[0] for w in words}

    yes, no = first(("yes", "Yes", " yes", " Yes", "YES")), first(("no", "No", " no", " No", "NO"))
    if yes & no:
        raise ConfigError("judge=llm_judge: this tokenizer starts 'yes' and 'no' with the same token, so a one-token "
                          "yes/no reading is impossible; use another judge.")
    return sorted(yes), sorted(no)


@torch.no_grad()
def yes_no_margins(model, prompts: list[list[int]], yes: list[int], no: list[int], pad_id: int,
                   batch_size: int = 16) -> list[float]:
    """log P(yes) - log P(no) of the next token after each prompt (left-padded batches)."""
    was_training = dist.in_training_mode(model)
    model.eval()
    device = next(model.parameters()).device
    out: list[float] = [0.0] * len(prompts)
    for s in range(0, len(prompts), batch_size):
        idx = list(range(s, min(s + batch_size, len(prompts))))
        ids, mask = left_pad([prompts[i] for i in idx], pad_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       use_cache=False, logits_to_keep=1).logits[:, -1].float()
        logp = logits.log_softmax(-1)
        margin = logp[:, yes].logsumexp(-1) - logp[:, no].logsumexp(-1)
        for b, i in enumerate(idx):
            out[i] = float(margin[b])
    model.train(was_training)
    return out


class LLMJudge:
    """A model says whether the answer is right, given the reference.

    Args:
        scorer: conversations -> yes-minus-no margins (accept when > 0); see `model_scorer`.
        prompt: the user message, with {question}, {reference} and {answer} placeholders.
    """

    def __init__(self, scorer: Callable[[list[list[dict]]], list[float]], prompt: str = JUDGE_PROMPT):
        check_prompt("judge_prompt", prompt, ("question", "reference", "answer"))
        self.scorer, self.prompt = scorer, prompt

    def conversation(self, item: dict) -> list[dict]:
        text = self.prompt.format(question=last_user(item["prompt"]), reference=item["gold"], answer=item["answer"])
        return [{"role": "user", "content": text}]

    def __call__(self, items: list[dict]) -> list[bool]:
        if not items:
            return []
        return [m > 0 for m in self.scorer([self.conversation(it) for it in items])]


def model_scorer(model, tokenizer, batch_size: int = 16) -> Callable[[list[list[dict]]], list[float]]:
    """An LLMJudge scorer reading the yes/no logits of `model` after its chat template's assistant header."""
    from ftune.data.tokenize import prompt_ids

    yes, no = yes_no_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def score(conversations: list[list[dict]]) -> list[float]:
        return yes_no_margins(model, [prompt_ids(tokenizer, c) for c in conversations], yes, no, pad, batch_size)

    return score


# ------------------------------------------------------------------------------------------- checks on the data
def check_prompt(key: str, template: str, fields: tuple[str, ...]) -> None:
    try:
        template.format(**{f: "" for f in fields})
    except (KeyError, IndexError, ValueError) as e:
        names = ", ".join("{" + f + "}" for f in fields)
        raise ConfigError(f"objective.{key}: the template may use only the placeholders {names} (double any other "
                          f"braces: {{{{ }}}}); got {e!r}.") from None
    missing = [f for f in fields if "{" + f + "}" not in template]
    if missing:
        raise ConfigError(f"objective.{key}: the template lacks {', '.join('{' + f + '}' for f in missing)}.")


def check_judge(judge: str) -> None:
    if judge not in JUDGES:
        import difflib

        close = difflib.get_close_matches(str(judge), JUDGES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"objective.judge={judge!r} is not a judge.{hint} Use numeric_match (final numbers, e.g. "
                          f"GSM8K), verifier (reasoning-gym's own, data=reasoning_gym), unit_tests (code run "
                          f"against the example's `tests`) or llm_judge (the model "
                          f"answers yes/no).")


def check_source(judge: str, source: str) -> None:
    """Judge vs data source, from the config alone."""
    check_judge(judge)
    if judge == "verifier" and source != "reasoning_gym":
        raise ConfigError(f"objective.judge=verifier scores answers with reasoning-gym's verifiers and needs "
                          f"data=reasoning_gym (data is {source}). Use judge=numeric_match for GSM8K-style data.")
    if judge == "unit_tests" and source in NO_TESTS_SOURCES:
        raise ConfigError(f"objective.judge=unit_tests runs each example's tests, but data={source} has no tests. "
                          f"Use judge=numeric_match for {source}, or data=jsonl/hub with a `tests` field per example.")


def check_examples(judge: str, examples: list[dict], first: int | None = 8) -> None:
    """Judge vs data content: unit_tests needs `tests` on every example (checked on the `first` ones, all if None);
    numeric_match needs gold answers that hold a number (at least one among the `first`)."""
    check_judge(judge)
    seen = examples if first is None else examples[:first]
    if judge == "unit_tests":
        for ex in seen:
            tests = ex.get("tests")
            ok = isinstance(tests, str) and tests.strip() or (
                isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests))
            if not ok:
                raise DataError(f"objective.judge=unit_tests: example '{ex['id']}' has no usable `tests` field (got "
                                f"{tests!r:.60}); each example needs `tests`, a list of assert statements or a test "
                                f"script as a string. Add it to the data, map your field with "
                                f"data.fields={{tests: YOUR_FIELD}} (e.g. MBPP's test_list), or use judge=llm_judge.")
    elif judge == "numeric_match" and seen:
        if all(gsm8k.gold_answer(ex["messages"][-1]["content"]) is None for ex in seen):
            raise DataError(f"objective.judge=numeric_match compares final numbers, but none of the first {len(seen)} "
                            f"gold answers holds a number (e.g. '{ex_preview(seen[0])}'). Use judge=llm_judge "
                            f"(or unit_tests for code with tests) for this data.")


def ex_preview(ex: dict) -> str:
    text = " ".join(ex["messages"][-1]["content"].split())
    return text[:60] + ("..." if len(text) > 60 else "")
